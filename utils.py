"""Metrics, pictures and videos, files written atomically, checkpoints, memory and a distributed helper."""
import ctypes
import json
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from configs import UserError, with_defaults


def psnr(pred, target):
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    return -10.0 * math.log10(max(torch.mean((pred - target) ** 2).item(), 1e-10))


def ssim(pred, target):
    """Structural similarity of two (H, W, 3) images in [0, 1] (torchmetrics, Gaussian window)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    to_nchw = lambda x: x.permute(2, 0, 1)[None].float().clamp(0, 1)  # noqa: E731
    return structural_similarity_index_measure(to_nchw(pred), to_nchw(target), data_range=1.0).item()


def to_uint8(img):
    """Float image in [0, 1] -> uint8 numpy (wandb and imageio want uint8; floats show as black)."""
    return (img.detach().float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def depth_image(depth, acc, near, far):
    """Expected depth (H, W) as uint8 RGB (turbo colormap over [near, far]); rays with opacity <= 0.5 show far.

    Depth is divided by the ray's opacity, so a half-transparent edge shows where its surface is, not nearer.
    Every depth picture (W&B, eval.py's PNGs, the depth video) is made here.
    """
    depth = torch.where(acc > 0.5, depth / acc.clamp_min(1e-6), far)
    x = ((depth.detach().float().cpu().numpy() - near) / (far - near)).clip(0, 1)[..., None]
    powers = np.concatenate([x ** k for k in range(6)], axis=-1)
    coeffs = np.array([  # Google's polynomial approximation of turbo
        [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
        [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
        [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
    ])
    return (powers @ coeffs.T * 255 + 0.5).clip(0, 255).astype(np.uint8)


def write_gif(frames, path, fps):
    """uint8 frames as a looping GIF with one 256-colour palette, taken from every 8th frame, for all of them.

    imageio's default quantizes each frame to its own palette: several times slower, and the colours flicker.
    """
    from PIL import Image

    palette = Image.fromarray(np.concatenate(frames[::8])).quantize(256, dither=Image.Dither.NONE)
    images = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=1000 / fps, loop=0)


def write_mp4(frames, path, fps):
    """uint8 frames as an H.264 mp4 (the container named explicitly: the path may be a temp name)."""
    import imageio_ffmpeg

    height, width = frames[0].shape[:2]
    writer = imageio_ffmpeg.write_frames(path, (width, height), fps=fps, quality=8, macro_block_size=2,
                                         output_params=["-f", "mp4"])
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def write_video(frames, path, fps=30):
    """Write uint8 frames to mp4 or gif (by extension), atomically."""
    write = write_gif if path.endswith(".gif") else write_mp4
    atomic_write(path, lambda tmp: write(frames, tmp, fps))


def atomic_write(path, write):
    """Write path through `path.tmp` beside it: write(tmp), fsync, rename over path; a crash keeps the old file.

    Any failure removes the temp file and keeps the old one; a failed write (disk full, directory gone) is a
    UserError saying so.
    """
    tmp = path + ".tmp"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        if not isinstance(e, OSError):
            raise
        kept = "the previous one is kept" if os.path.exists(path) else "there is no earlier one"
        raise UserError(f"could not write {path} ({e.strerror or e}); {kept}; free disk space or pick another "
                        "--out_dir, then rerun to resume") from None


def save_checkpoint(ckpt, path, **save_kwargs):
    """torch.save a checkpoint (or export) dict atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(ckpt, f, **save_kwargs)
    atomic_write(path, write)


def write_json(obj, path):
    """JSON, indented, atomically."""
    write_text(json.dumps(obj, indent=2), path)


def write_text(text, path):
    """A text file, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def checkpoint_path(arg):
    """The checkpoint file a command-line argument names: RUN_DIR/ckpt.pt for a run directory, else the file."""
    path = os.path.join(arg, "ckpt.pt") if os.path.isdir(arg) else arg
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; pass a run directory (holding ckpt.pt) or a .pt file")
    return path


def load_checkpoint(path):
    """A checkpoint (or BitNeRF export) dict loaded with weights_only=True, or a UserError saying what to do.

    Its config gains the keys added since it was written (configs.with_defaults), so that old runs resume and
    evaluate.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["config"], ckpt["rest" if "format" in ckpt else "model"]  # noqa: B018 - a dict without these is not ours
    except Exception as e:  # torch raises many types for a damaged file
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}); "
                        "delete it to start over, or pick another --out_dir") from None
    ckpt["config"] = with_defaults(ckpt["config"])
    return ckpt


def load_weights(model, state, path):
    """Load a checkpoint's weights into model, or a UserError when they do not fit it (an older layout)."""
    try:
        model.load_state_dict(state)  # into torchao weights too: their copy_ writes the inner tensor
    except RuntimeError:
        raise UserError(f"{path}: its weights do not fit this version's model (written by an older one?); delete "
                        "it to start over, or pick another --out_dir") from None


def keep_freed_memory():
    """Have glibc reuse freed heap memory for tensors up to 256 MiB instead of mapping fresh pages for each.

    By default each tensor above glibc's mmap threshold is a fresh mapping whose pages fault in one by one as it
    is first written, which costs real time on small CPU steps (docs/performance.md).
    """
    if sys.platform.startswith("linux") and hasattr(libc := ctypes.CDLL(None), "mallopt"):
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed memory
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD: allocate below 256 MiB from the heap


def peak_memory_mb(device):
    """Peak GPU memory allocated, or the process's peak resident memory on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 1024)


def all_reduce(values, op="sum"):
    """Sum (or max) a list of floats over all ranks of the process group."""
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()
