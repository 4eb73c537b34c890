"""Rays, sampling, volume rendering, occupancy grid, metrics, camera paths, video and file I/O."""
import ctypes
import json
import math
import os
import sys
from collections import namedtuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from configs import EXP1, UserError

Rays = namedtuple("Rays", ["origins", "viewdirs"])
# One rank's rows [lo, lo + rows) of a global batch of `total` rays: random draws are made for the whole batch
# from a generator every rank holds in the same state, then sliced, so a step does not depend on the world size.
Shard = namedtuple("Shard", ["generator", "lo", "total"])
ERT_BLOCK = 8  # samples per ray queried at a time under early ray termination (fewer: more, smaller model calls)


def uniform(generator, rows, cols, like):
    """U[0, 1) of shape (rows, cols) like `like`; with a Shard, this rank's rows of the global draw."""
    if isinstance(generator, Shard):
        u = torch.rand(generator.total, cols, generator=generator.generator, device=like.device, dtype=like.dtype)
        return u[generator.lo: generator.lo + rows]
    return torch.rand(rows, cols, generator=generator, device=like.device, dtype=like.dtype)


def pixel_directions(i, j, H, W, focal):
    """Camera-frame unit directions through pixel centres (column i, row j); OpenGL: -z forward, +y up."""
    d = torch.stack([(i + 0.5 - W / 2) / focal, -(j + 0.5 - H / 2) / focal, -torch.ones_like(i)], dim=-1)
    return d / d.norm(dim=-1, keepdim=True)


def rays_for_pixels(c2w, i, j, H, W, focal):
    """World-space rays through pixels (i, j) of cameras c2w (..., 4, 4) broadcast against i and j."""
    d = pixel_directions(i.to(c2w.dtype), j.to(c2w.dtype), H, W, focal)
    dirs = (c2w[..., :3, :3] @ d[..., None])[..., 0]
    return Rays(c2w[..., :3, 3].expand_as(dirs), dirs)


def get_rays(c2w, H, W, focal):
    """All H*W rays of one camera, row-major, as a Rays of (H*W, 3) tensors."""
    j, i = torch.meshgrid(torch.arange(H, device=c2w.device), torch.arange(W, device=c2w.device), indexing="ij")
    return rays_for_pixels(c2w, i.reshape(-1), j.reshape(-1), H, W, focal)


def sample_along_rays(rays, near, far, num_samples, generator=None):
    """Stratified depths (R, S): one uniform sample per bin when a generator is given, bin centres otherwise."""
    R = rays.origins.shape[0]
    bins = torch.arange(num_samples, device=rays.origins.device, dtype=rays.origins.dtype).expand(R, num_samples)
    if generator is None:
        u = torch.full_like(bins, 0.5)
    else:
        u = uniform(generator, R, num_samples, bins)
    return near + (far - near) * (bins + u) / num_samples


def segment_lengths(t, far):
    """The depth interval each sample (R, S) stands for: up to the next sample, the last one up to far."""
    return torch.diff(t, dim=-1, append=torch.full_like(t[..., :1], far))


def volume_render(rgb, sigma, t, far, background):
    """Composite samples (R, S) front to back; returns rgb (R, 3), depth (R,), opacity (R,), weights (R, S).

    Each sample stands for the segment up to the next one (the last one up to `far`). Transmittance is
    the *exclusive* product: a sample is attenuated by what lies before it, not by itself.
    """
    tau = sigma * segment_lengths(t, far)
    alpha = 1.0 - torch.exp(-tau)
    # the sum of the optical depth before each sample, summed as such: a running sum minus the sample's own term
    # loses the terms before a large one in fp32 (and gives inf - inf = NaN at an infinite density)
    trans = torch.exp(-torch.cumsum(F.pad(tau[..., :-1], (1, 0)), dim=-1))
    weights = alpha * trans
    acc = weights.sum(-1)
    out_rgb = (weights[..., None] * rgb).sum(-2) + (1.0 - acc)[..., None] * background
    depth = (weights * t).sum(-1)
    return out_rgb, depth, acc, weights


def sample_pdf(t, weights, far, num, generator=None):
    """num sorted depths (R, num) drawn by inverse CDF from the piecewise-constant pdf of weights.

    Sample i's weight is spread over the bin between the midpoints to its neighbours (the first bin starts
    at t[0], the last ends at far): density seen at a sample may begin before it. Strata of u keep the
    draws spread out; without a generator u is the strata centres (deterministic).
    """
    R, S = weights.shape
    edges = torch.cat([t[:, :1], (t[:, 1:] + t[:, :-1]) / 2, torch.full_like(t[:, :1], far)], dim=-1)
    pdf = weights + 1e-5  # a ray the first pass found empty still gets evenly spread samples
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf / pdf.sum(-1, keepdim=True), dim=-1)], -1)
    jitter = 0.5 if generator is None else uniform(generator, R, num, t)
    u = ((torch.arange(num, device=t.device, dtype=t.dtype) + jitter) / num).expand(R, num).contiguous()
    hi = torch.searchsorted(cdf.contiguous(), u, right=True).clamp(1, S)
    c0, c1 = cdf.gather(-1, hi - 1), cdf.gather(-1, hi)
    e0, e1 = edges.gather(-1, hi - 1), edges.gather(-1, hi)
    return e0 + (u - c0) / (c1 - c0).clamp_min(1e-12) * (e1 - e0)


class OccupancyGrid(nn.Module):
    """Which cells of the cube [-bound, bound]^3 may hold density (as in nerfacc / instant-ngp).

    Samples in empty cells, or outside the cube, get zero density without querying the model. Every
    cell starts occupied; `update` replaces the cells it visits with max(decay * old, measured density).
    """

    def __init__(self, bound, resolution, sigma_threshold):
        super().__init__()
        self.bound, self.resolution, self.sigma_threshold = bound, resolution, sigma_threshold
        self.register_buffer("density", torch.full((resolution,) * 3, float("inf")))
        # The occupied cells, padded by one empty cell on every side: a point outside the cube, clamped onto
        # the padding, reads False, so the lookup needs no separate inside test.
        self.register_buffer("mask", torch.zeros((resolution + 2,) * 3, dtype=torch.bool), persistent=False)
        self.refresh()

    def threshold(self):
        """Cells above this are occupied; the mean caps it so a young, faint model is not culled away."""
        finite = self.density[torch.isfinite(self.density)]
        return min(self.sigma_threshold, finite.mean().item()) if finite.numel() else self.sigma_threshold

    def refresh(self):
        """Recompute the occupied cells; density changes only in update and load_state_dict."""
        self.mask[1:-1, 1:-1, 1:-1] = self.density > self.threshold()

    def load_state_dict(self, state_dict, strict=True):
        """Load the density, then derive the occupied cells from it."""
        result = super().load_state_dict(state_dict, strict)
        self.refresh()
        return result

    def occupied(self, origins, dirs, t):
        """Which samples origins + t * dirs (rays (R, 3), depths (R, S)) must be sent to the model: bool (R, S).

        Works in padded-cell units from the start, so the points themselves are never materialised (faster than
        computing them, then their cells: docs/performance.md).
        """
        scale = self.resolution / (2 * self.bound)
        u = torch.addcmul(((origins + self.bound) * scale + 1)[:, None, :], (dirs * scale)[:, None, :], t[..., None])
        return self.mask[u.clamp_(0, self.resolution + 1).long().unbind(-1)]  # u >= 0: long() is floor()

    @torch.no_grad()
    def update(self, model, fraction=1.0, decay=0.95, generator=None, chunk=None):
        """Measure the model's density at a jittered point in a random `fraction` of the cells; returns their count.

        On a CPU 4,096 points per model call keep the activations in cache; a GPU takes 65,536 per call, as there
        a call costs its kernel launches, not its arithmetic (docs/performance.md).
        """
        n = self.resolution ** 3
        dev = self.density.device
        chunk = chunk or (65536 if dev.type == "cuda" else 4096)
        cells = torch.randperm(n, generator=generator, device=dev)[: max(1, int(n * fraction))]
        ijk = torch.stack([cells // self.resolution ** 2, cells // self.resolution % self.resolution,
                           cells % self.resolution], -1)
        jitter = torch.rand(ijk.shape, generator=generator, device=dev)
        pts = (ijk + jitter) / self.resolution * 2 * self.bound - self.bound
        measured = torch.cat([model(p, torch.zeros_like(p) if model.use_viewdirs else None)[1].float()
                              for p in pts.split(chunk)])
        flat = self.density.view(-1)
        old = flat[cells]
        flat[cells] = torch.maximum(torch.where(torch.isfinite(old), old * decay, 0.0), measured)
        self.refresh()
        return len(cells)


def query_points(model, points, dirs):
    """model(points, dirs), called on at least 2 rows: torch.compile specializes batch sizes 0 and 1, and each
    would recompile the model (seconds apiece for a compiled BitNeRF with gradients)."""
    n = len(points)
    if n >= 2:
        return model(points, dirs)
    pad = lambda x: None if x is None else torch.cat([x, x.new_zeros(2 - n, x.shape[-1])])  # noqa: E731
    rgb, sigma = model(pad(points), pad(dirs))
    return rgb[:n], sigma[:n]


def query_kept(model, rays, t, keep, skip_zero_density=False):
    """The model's rgb (R, S, 3) and density (R, S) at depths t along rays; zero where keep is False (not queried).

    With skip_zero_density and gradients on, a no-grad pass first finds the samples of zero density and the
    gradient pass leaves them out: such a sample has zero weight and, under a ReLU density, zero gradient, so it
    changes neither the loss nor its gradient, and finding it takes a forward pass alone (no backward).
    """
    rows, cols = keep.nonzero(as_tuple=True)
    dirs = rays.viewdirs[rows]
    points = torch.addcmul(rays.origins[rows], dirs, t[rows, cols, None])
    inner = getattr(model, "module", model)  # under DDP the no-grad pass needs no gradient sync
    dirs = dirs if inner.use_viewdirs else None
    if skip_zero_density and torch.is_grad_enabled():
        with torch.no_grad():
            live = (query_points(inner, points, dirs)[1] > 0).nonzero()[:, 0]
        rows, cols, points = rows[live], cols[live], points[live]
        dirs = dirs[live] if dirs is not None else None
    rgb_kept, sigma_kept = query_points(model, points, dirs)
    rgb = torch.zeros(*keep.shape, 3, device=t.device).index_put((rows, cols), rgb_kept.float())
    sigma = torch.zeros(keep.shape, device=t.device).index_put((rows, cols), sigma_kept.float())
    return rgb, sigma


def query_all(model, rays, t, keep):
    """The model's rgb (R, S, 3) and density (R, S) at every depth t along rays, then zero where keep is False.

    The same as query_kept, but no sample is left out: every call has the same shapes, as a CUDA graph needs.
    """
    points = torch.addcmul(rays.origins[:, None], rays.viewdirs[:, None], t[..., None]).reshape(-1, 3)
    use_viewdirs = getattr(model, "module", model).use_viewdirs
    dirs = rays.viewdirs[:, None].expand(*t.shape, 3).reshape(-1, 3) if use_viewdirs else None
    rgb, sigma = query_points(model, points, dirs)
    return (torch.where(keep[..., None], rgb.float().view(*t.shape, 3), 0.0),
            torch.where(keep, sigma.float().view(t.shape), 0.0))


def shade(model, rays, t, far, background, grid=None, min_transmittance=0.0, skip_zero_density=False,
          fixed_shapes=False):
    """Query the model at depths t (only where the occupancy grid says there may be density) and composite.

    With min_transmittance > 0 and no gradients (rendering), samples are queried front to back in blocks of
    ERT_BLOCK, and a ray whose transmittance fell below min_transmittance is no longer queried (early ray
    termination): the skipped samples could change its colour and opacity by less than min_transmittance.
    With fixed_shapes (training under a CUDA graph) every sample is queried and the culled ones zeroed instead
    (query_all): the same result, with shapes that do not depend on the grid.
    """
    keep = grid.occupied(rays.origins, rays.viewdirs, t) if grid is not None else torch.ones_like(t, dtype=torch.bool)
    if fixed_shapes:
        return volume_render(*query_all(model, rays, t, keep), t, far, background)
    if not min_transmittance or torch.is_grad_enabled():
        rgb, sigma = query_kept(model, rays, t, keep, skip_zero_density)
        return volume_render(rgb, sigma, t, far, background)
    deltas = segment_lengths(t, far)
    rgb, sigma = torch.zeros(*t.shape, 3, device=t.device), torch.zeros(t.shape, device=t.device)
    optical_depth = torch.zeros(t.shape[0], device=t.device)  # -log transmittance before the current block
    for lo in range(0, t.shape[1], ERT_BLOCK):
        block = slice(lo, lo + ERT_BLOCK)
        alive = optical_depth < -math.log(min_transmittance)
        rgb[:, block], sigma[:, block] = query_kept(model, rays, t[:, block], keep[:, block] & alive[:, None])
        optical_depth += (sigma[:, block] * deltas[:, block]).sum(-1)
    return volume_render(rgb, sigma, t, far, background)


def render_rays(model, rays, near, far, num_samples, background, generator=None, grid=None, num_fine=0,
                min_transmittance=0.0, skip_zero_density=False, fixed_shapes=False):
    """Render rays: stratified samples, and with num_fine a coarse -> fine pass as in the NeRF paper.

    The coarse pass runs without gradients through the same model; its weights place num_fine more
    samples, and the loss sees the union of both sets (so empty space is still supervised).
    min_transmittance turns on early ray termination when rendering (see shade); skip_zero_density leaves the
    samples of zero density out of the gradient pass when training (see query_kept); fixed_shapes queries every
    sample instead of compacting the kept ones (see shade), for a CUDA graph.
    Returns rgb (R, 3), depth (R,), opacity (R,).
    """
    t = sample_along_rays(rays, near, far, num_samples, generator)
    if num_fine:
        with torch.no_grad():
            weights = shade(model, rays, t, far, background, grid, min_transmittance, fixed_shapes=fixed_shapes)[3]
        t = torch.sort(torch.cat([t, sample_pdf(t, weights, far, num_fine, generator)], dim=-1), dim=-1).values
    return shade(model, rays, t, far, background, grid, min_transmittance, skip_zero_density, fixed_shapes)[:3]


@torch.no_grad()
def render_image(model, c2w, H, W, focal, near, far, num_samples, background, chunk, grid=None, num_fine=0,
                 min_transmittance=0.0):
    """Render one view CHUNK rays at a time (memory independent of image size); rgb (H,W,3), depth, opacity."""
    rays = get_rays(c2w, H, W, focal)
    outs = [render_rays(model, Rays(o, d), near, far, num_samples, background, grid=grid, num_fine=num_fine,
                        min_transmittance=min_transmittance)
            for o, d in zip(rays.origins.split(chunk), rays.viewdirs.split(chunk), strict=True)]
    rgb, depth, acc = (torch.cat(x) for x in zip(*outs, strict=True))
    return rgb.reshape(H, W, 3), depth.reshape(H, W), acc.reshape(H, W)


def psnr(pred, target):
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    return -10.0 * math.log10(max(torch.mean((pred - target) ** 2).item(), 1e-10))


def ssim(pred, target):
    """Structural similarity of two (H, W, 3) images in [0, 1] (torchmetrics, Gaussian window)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    to_nchw = lambda x: x.permute(2, 0, 1)[None].float().clamp(0, 1)  # noqa: E731
    return structural_similarity_index_measure(to_nchw(pred), to_nchw(target), data_range=1.0).item()


def pose_spherical(theta, phi, radius):
    """Camera-to-world matrix on a sphere looking at the origin (degrees), as in the NeRF authors' code."""
    th, ph = math.radians(theta), math.radians(phi)
    trans = torch.eye(4)
    trans[2, 3] = radius
    rot_phi = torch.tensor([[1, 0, 0, 0], [0, math.cos(ph), -math.sin(ph), 0],
                            [0, math.sin(ph), math.cos(ph), 0], [0, 0, 0, 1]], dtype=torch.float32)
    rot_theta = torch.tensor([[math.cos(th), 0, -math.sin(th), 0], [0, 1, 0, 0],
                              [math.sin(th), 0, math.cos(th), 0], [0, 0, 0, 1]], dtype=torch.float32)
    swap = torch.tensor([[-1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float32)
    return swap @ rot_theta @ rot_phi @ trans


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

    Its config gains the keys added since it was written, with EXP1's values, so that old runs resume and evaluate.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["config"], ckpt["rest" if "format" in ckpt else "model"]  # noqa: B018 - a dict without these is not ours
    except Exception as e:  # torch raises many types for a damaged file
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}); "
                        "delete it to start over, or pick another --out_dir") from None
    old = ckpt["config"]
    if "WHITE_BKGD" in old:  # the key BACKGROUND replaced
        old["BACKGROUND"] = "white" if old.pop("WHITE_BKGD") else "black"
    ckpt["config"] = {**EXP1, **old}
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


def build_grid(cfg, scene, device):
    """The occupancy grid a config asks for (or None); a cell counts as empty below alpha 0.01 per sample."""
    if not cfg["OCC_GRID"]:
        return None
    step = (scene.far - scene.near) / cfg["NUM_SAMPLES"]
    return OccupancyGrid(cfg["SCENE_BOUND"], cfg["GRID_RES"], -math.log(1 - 0.01) / step).to(device)


def rebuild_grid(model, cfg, scene, device, passes=16):
    """An occupancy grid measured from a model alone (for an export, which carries no grid): max of passes.

    Each pass measures one jittered point per cell; a hash model's thin structures need many passes to be found
    (what 4 and 16 passes cost an export: docs/hash.md)."""
    grid = build_grid(cfg, scene, device)
    if grid is not None:
        generator = torch.Generator(device=device).manual_seed(cfg["SEED"])
        for _ in range(passes):
            grid.update(model, 1.0, decay=1.0, generator=generator)
    return grid


def render_view(model, c2w, views, scene, cfg, grid, amp, downscale=1):
    """Render the camera c2w at a split's resolution (divided by downscale) and the config's sampling, under amp."""
    H, W = views.hw
    with amp:
        return render_image(model, c2w, H // downscale, W // downscale, views.focal / downscale, scene.near, scene.far,
                            cfg["NUM_SAMPLES"], scene.background, cfg["CHUNK"], grid, cfg["NUM_FINE"],
                            cfg["ERT_TRANSMITTANCE"])


def evaluate_views(model, views, scene, cfg, grid, amp, n_views=None, save_dir=None, rank=0, world=1):
    """Mean per-view PSNR and SSIM over the first n_views of a split (all by default), plus view 0's renders.

    The scores also list each view's ("per_view", of this rank's views). Under DDP each rank renders every
    world-th view and the sums are all-reduced. With save_dir, each render and its depth picture are also written
    there as PNG.
    """
    import imageio.v2 as imageio

    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
    model.eval()
    per_view, first = [], None
    for k in range(rank, len(views.images) if n_views is None else min(n_views, len(views.images)), world):
        rgb, depth, acc = render_view(model, views.poses[k], views, scene, cfg, grid, amp)
        target = views.images[k]
        per_view.append({"view": k, "psnr": psnr(rgb, target), "ssim": ssim(rgb, target)})
        if first is None or save_dir:  # the depth picture only where it is shown or saved
            depth = depth_image(depth, acc, scene.near, scene.far)
            first = first or (rgb, target, depth)
        if save_dir:
            imageio.imwrite(os.path.join(save_dir, f"{k:03d}.png"), to_uint8(rgb))
            imageio.imwrite(os.path.join(save_dir, f"{k:03d}_depth.png"), depth)
    model.train()
    sums = [sum(v["psnr"] for v in per_view), sum(v["ssim"] for v in per_view), len(per_view)]
    total_psnr, total_ssim, count = all_reduce(sums) if world > 1 else sums
    return {"psnr": total_psnr / count, "ssim": total_ssim / count, "views": int(count), "per_view": per_view}, first


def render_videos(model, views, scene, cfg, grid, amp, out_dir, tag=""):
    """The 360-degree orbit (rgb and depth) at the views' resolution / VIDEO_DOWNSCALE, written as mp4 and gif
    (named video{tag}, depth{tag}); returns the rgb mp4 path."""
    radius = views.poses[:, :3, 3].norm(dim=-1).mean().item()
    rgb_frames, depth_frames = [], []
    model.eval()
    for theta in torch.linspace(0.0, 360.0, cfg["VIDEO_FRAMES"] + 1)[:-1].tolist():
        c2w = pose_spherical(theta, -30.0, radius).to(views.poses.device)
        rgb, depth, acc = render_view(model, c2w, views, scene, cfg, grid, amp, cfg["VIDEO_DOWNSCALE"])
        rgb_frames.append(to_uint8(rgb))
        depth_frames.append(depth_image(depth, acc, scene.near, scene.far))
    model.train()
    for name, frames in (("video", rgb_frames), ("depth", depth_frames)):
        for ext in ("mp4", "gif"):
            write_video(frames, os.path.join(out_dir, f"{name}{tag}.{ext}"))
    return os.path.join(out_dir, f"video{tag}.mp4")
