"""The one training loop every experiment runs: `python expN.py [--key=value ...]`."""
import ctypes
import gc
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bitnerf import BitNeRF, export_ternary, load_ternary, plain_state, quantize_for_training
from configs import ConfigError, UserError, apply_overrides, usage
from dataset import load_scene, sample_batch
from nerf import NeRF, model_kwargs
from utils import (OccupancyGrid, Rays, Shard, colorize_depth, pose_spherical, psnr, render_image, render_rays, ssim, to_uint8,
                   write_video)

GRID_EVERY = 16  # steps between occupancy-grid updates
GRID_FULL_UNTIL = 256  # before this step every update visits every cell; after it, a random quarter


def resolve_device(name):
    """'auto' -> cuda when present, else cpu; asking for cuda without one is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but no CUDA device is visible; use --device=cpu or --device=auto")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def init_distributed(cfg, device):
    """(rank, world size, device) from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); (0, 1, device) without.

    nccl on CUDA, gloo on CPU; each rank of a CUDA run takes the GPU of its LOCAL_RANK.
    """
    if "RANK" not in os.environ:
        return 0, 1, device
    backend = {"auto": "nccl" if device.type == "cuda" else "gloo"}.get(cfg["DDP_BACKEND"], cfg["DDP_BACKEND"])
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("--ddp_backend=nccl needs CUDA; use --ddp_backend=gloo (or auto) on CPU")
    if device.type == "cuda":
        if int(os.environ["LOCAL_RANK"]) >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {os.environ['LOCAL_RANK']} but only {torch.cuda.device_count()} GPUs; "
                              "lower torchrun's --nproc_per_node")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, store=attempt_store(), rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))
    return dist.get_rank(), dist.get_world_size(), device


def attempt_store():
    """torchrun's rendezvous store, under a prefix per restart attempt.

    After `--max-restarts` restarts a group, torchrun hands the workers the same agent store; without a
    prefix a restarted rank can read the dead attempt's gloo addresses and fail with "Connection refused".
    """
    from datetime import timedelta

    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # else rank 0 hosts it, as torch does
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=not agent and os.environ["RANK"] == "0", timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def all_reduce(values, op="sum"):
    """Sum (or max) a list of floats over all ranks of the process group."""
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def peak_memory_mb(device):
    """Peak GPU memory allocated, or the process's peak resident memory on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 1024)


def autocast_context(cfg, device):
    """The autocast context of the config's DTYPE, built once; float16 needs CUDA for its GradScaler."""
    if cfg["DTYPE"] == "float16" and device.type != "cuda":
        raise ConfigError(f"--dtype=float16 needs CUDA (its GradScaler), but the device is {device.type}; "
                          "use --dtype=bfloat16 or --dtype=float32")
    if cfg["DTYPE"] == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, cfg["DTYPE"]))


def bf16_matmul_is_slow(device):
    """Whether bf16 matmuls here take torch's slow reference path: a CPU without oneDNN's bf16 kernels (no AVX-512)."""
    try:
        return device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a build without oneDNN: unknown, so say nothing
        return False


def use_cuda_graph(cfg, device):
    """Whether to capture the training step as a CUDA graph: asked for, on CUDA, not under torchrun, not float16.

    DDP's gradient hooks (even with one process) and float16's GradScaler make host-side decisions every step,
    which a graph cannot.
    """
    return cfg["CUDA_GRAPH"] and device.type == "cuda" and not dist.is_initialized() and cfg["DTYPE"] != "float16"


def build_optimizer(cfg, model, device, graphed=False):
    """AdamW as configured; a fused kernel where asked and supported, otherwise a notice and the plain one.

    A CUDA graph needs the fused, capturable one: it keeps its step counts on the GPU and can skip a step there.
    """
    kwargs = dict(lr=cfg["LR"], weight_decay=cfg["WEIGHT_DECAY"], amsgrad=cfg["AMSGRAD"])
    if graphed:
        return torch.optim.AdamW(model.parameters(), fused=True, capturable=True, **kwargs)
    if cfg["FUSED_OPTIM"]:
        try:
            return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
        except (RuntimeError, TypeError) as e:  # torch says which device or dtype it lacks
            print(f"notice: fused AdamW unavailable on {device.type} ({e}); using the plain one", file=sys.stderr)
    return torch.optim.AdamW(model.parameters(), foreach=True, **kwargs)  # on CPU the default loops over tensors


def capture_training_step(loss_and_grads, optimizer, generator, warmup=3):
    """One whole training step (batch, render, backward, clipping, AdamW) captured as a CUDA graph.

    Returns the graph and its (loss, gradient norm) tensors, which each replay overwrites. Replaying it is one
    launch instead of ~250, and a GPU step is launch-bound (README). As torch's recipe for capturing a whole
    network asks, warm-up passes on a side stream first create the gradients and AdamW's state; they change no
    weight, and the generator is rewound after them. In the graph, AdamW reads the learning rate from a tensor
    (the loop fills it) and skips a step whose gradient norm is not finite (found_inf), as the eager loop does.
    """
    device = generator.device
    state = generator.get_state()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            optimizer.zero_grad(set_to_none=True)
            loss_and_grads()
        optimizer.found_inf = torch.ones((), device=device)  # step() creates AdamW's state; found_inf: no update
        optimizer.step()
    torch.cuda.current_stream(device).wait_stream(side)
    generator.set_state(state)
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(generator)
    optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients it writes
    with torch.cuda.graph(graph):
        loss, grad_norm = loss_and_grads()
        optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
        optimizer.step()
    return graph, (loss, grad_norm)


class Interrupted(Exception):
    """Training was stopped by a signal after checkpointing; `code` is the exit status (128 + the signal)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class GracefulStop:
    """While active, Ctrl-C or SIGTERM only asks the loop to stop after its current step (a second one stops at once).

    Only for one process and its main thread: under torchrun the ranks would first have to agree on the step.
    """

    def __init__(self, active):
        self.active = active and threading.current_thread() is threading.main_thread()
        self.signum, self.previous = None, {}

    def __enter__(self):
        if self.active:
            self.previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def request(self, signum, frame):
        """The signal handler: remember the first signal; a second one interrupts at once."""
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def progress(cfg, step, seconds):
    """Fraction of training done: by steps, or by time when a time budget would end it sooner."""
    p = step / cfg["MAX_STEPS"]
    if cfg["TIME_BUDGET_S"] > 0:
        p = max(p, seconds / cfg["TIME_BUDGET_S"])
    return min(p, 1.0)


def learning_rate(cfg, step, frac):
    """Linear warm-up, then cosine decay from LR to MIN_LR over the run's progress."""
    if step < cfg["WARMUP_STEPS"]:
        return cfg["LR"] * (step + 1) / cfg["WARMUP_STEPS"]
    return cfg["MIN_LR"] + 0.5 * (cfg["LR"] - cfg["MIN_LR"]) * (1 + math.cos(math.pi * frac))


def save_checkpoint(ckpt, path, **save_kwargs):
    """torch.save through a temp file in the same directory, fsynced, then renamed over the old one.

    A failed write (disk full, directory gone) removes the temp file, keeps the old file and says so.
    """
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f, **save_kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = "the previous one is kept" if os.path.exists(path) else "there is no earlier one"
        raise UserError(f"could not write {path} ({e.strerror or e}); {kept}; free disk space or pick another "
                        "--out_dir, then rerun to resume") from None


def checkpoint_path(arg):
    """The checkpoint file a command-line argument names: RUN_DIR/ckpt.pt for a run directory, else the file."""
    path = os.path.join(arg, "ckpt.pt") if os.path.isdir(arg) else arg
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; pass a run directory (holding ckpt.pt) or a .pt file")
    return path


def load_checkpoint(path):
    """A checkpoint (or BitNeRF export) dict loaded with weights_only=True, or a UserError saying what to do."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["config"], ckpt["rest" if "format" in ckpt else "model"]  # noqa: B018 - a dict without these is not ours
    except Exception as e:  # torch raises many types for a damaged file
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}); "
                        "delete it to start over, or pick another --out_dir") from None
    return ckpt


def load_weights(model, state, path):
    """Load a checkpoint's weights into model, or a UserError when they do not fit it (an older layout)."""
    try:
        model.load_state_dict(state)  # into torchao weights too: their copy_ writes the inner tensor
    except RuntimeError:
        raise UserError(f"{path}: its weights do not fit this version's model (written by an older one?); delete "
                        "it to start over, or pick another --out_dir") from None


def build_model(cfg, device):
    """The NeRF or BitNeRF (quantized for QAT) a config describes, on device, seeded for a reproducible init."""
    torch.manual_seed(cfg["SEED"])
    if cfg["MODEL"] == "bitnerf":
        return quantize_for_training(BitNeRF(**model_kwargs(cfg)).to(device))
    return NeRF(**model_kwargs(cfg)).to(device)


def checkpoint_shape(cfg):
    """What a checkpoint must match to be resumed or evaluated: the model's and the grid's shapes."""
    return {"model": cfg.get("MODEL", "nerf"), **model_kwargs(cfg),
            "grid_res": cfg["GRID_RES"] if cfg["OCC_GRID"] else None}


def rebuild_grid(model, cfg, scene, device, passes=4):
    """An occupancy grid measured from a model alone (for an export, which carries no grid): max of passes."""
    grid = build_grid(cfg, scene, device)
    if grid is not None:
        generator = torch.Generator(device=device).manual_seed(cfg["SEED"])
        for _ in range(passes):
            grid.update(model, 1.0, decay=1.0, generator=generator)
    return grid


def export_bitnerf(model, cfg, path):
    """Write the ternary export of a BitNeRF to path; returns its size and that of the fp32 weights, in bytes."""
    import io

    legacy = dict(_use_new_zipfile_serialization=False)  # the zip format costs ~1.4 kB more in a ~13 kB file
    keep = ("DATA", "DOWNSCALE", "WHITE_BKGD", "NUM_SAMPLES", "NUM_FINE", "OCC_GRID", "SCENE_BOUND", "GRID_RES",
            *(k.upper() for k in model_kwargs(cfg)))  # what eval.py needs; every byte counts in a ~12 kB file
    save_checkpoint(export_ternary(model, {k: cfg[k] for k in keep}), path, **legacy)
    fp32 = io.BytesIO()
    torch.save({k: v.float() for k, v in plain_state(model.state_dict()).items()}, fp32, **legacy)
    return os.path.getsize(path), len(fp32.getvalue())


def build_grid(cfg, scene, device):
    """The occupancy grid a config asks for (or None); a cell counts as empty below alpha 0.01 per sample."""
    if not cfg["OCC_GRID"]:
        return None
    step = (scene.far - scene.near) / cfg["NUM_SAMPLES"]
    return OccupancyGrid(cfg["SCENE_BOUND"], cfg["GRID_RES"], -math.log(1 - 0.01) / step).to(device)


def render_view(model, c2w, views, scene, cfg, grid, amp):
    """Render the camera c2w at a split's resolution and the config's sampling, under autocast amp."""
    H, W = views.hw
    with amp:
        return render_image(model, c2w, H, W, views.focal, scene.near, scene.far, cfg["NUM_SAMPLES"],
                            scene.background, cfg["CHUNK"], grid, cfg["NUM_FINE"], cfg["ERT_TRANSMITTANCE"])


def evaluate_views(model, views, scene, cfg, grid, amp, n_views=None, save_dir=None, rank=0, world=1):
    """Mean per-view PSNR and SSIM over the first n_views of a split (all by default), plus view 0's renders.

    Under DDP each rank renders every world-th view and the sums are all-reduced. With save_dir, each
    render and its colourised depth are also written there as PNG.
    """
    import imageio.v2 as imageio

    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
    model.eval()
    sums, first = [0.0, 0.0, 0.0], None
    for k in range(rank, len(views.images) if n_views is None else min(n_views, len(views.images)), world):
        rgb, depth, _ = render_view(model, views.poses[k], views, scene, cfg, grid, amp)
        target = views.images[k]
        sums = [sums[0] + psnr(rgb, target), sums[1] + ssim(rgb, target), sums[2] + 1]
        first = first or (rgb, target, depth)
        if save_dir:
            imageio.imwrite(os.path.join(save_dir, f"{k:03d}.png"), to_uint8(rgb))
            imageio.imwrite(os.path.join(save_dir, f"{k:03d}_depth.png"), colorize_depth(depth, scene.near, scene.far))
    model.train()
    total_psnr, total_ssim, count = all_reduce(sums) if world > 1 else sums
    return {"psnr": total_psnr / count, "ssim": total_ssim / count, "views": int(count)}, first


def render_videos(model, views, scene, cfg, grid, amp, out_dir):
    """The 360-degree orbit (rgb and colourised depth) written as mp4 and gif; returns the rgb mp4 path."""
    radius = views.poses[:, :3, 3].norm(dim=-1).mean().item()
    rgb_frames, depth_frames = [], []
    model.eval()
    for theta in torch.linspace(0.0, 360.0, cfg["VIDEO_FRAMES"] + 1)[:-1].tolist():
        c2w = pose_spherical(theta, -30.0, radius).to(views.poses.device)
        rgb, depth, acc = render_view(model, c2w, views, scene, cfg, grid, amp)
        rgb_frames.append(to_uint8(rgb))
        depth_frames.append(colorize_depth(torch.where(acc > 0.5, depth / acc.clamp_min(1e-6), scene.far),
                                           scene.near, scene.far))
    model.train()
    for name, frames in (("video", rgb_frames), ("depth", depth_frames)):
        for ext in ("mp4", "gif"):
            write_video(frames, os.path.join(out_dir, f"{name}.{ext}"))
    return os.path.join(out_dir, "video.mp4")


def export_and_evaluate(model, cfg, views, scene, grid, amp, out_dir):
    """Export a BitNeRF to OUT_DIR/bitnerf_ternary.pt, reload the file and evaluate it as exported."""
    path = os.path.join(out_dir, "bitnerf_ternary.pt")
    size, fp32_size = export_bitnerf(model, cfg, path)
    exported = load_ternary(torch.load(path, weights_only=True), model_kwargs(cfg)).to(views.poses.device)
    scores, _ = evaluate_views(exported, views, scene, cfg, rebuild_grid(exported, cfg, scene, views.poses.device), amp)
    print(f"export: {path}, {size} bytes ({fp32_size / size:.1f}x smaller than fp32), val PSNR {scores['psnr']:.2f} dB",
          file=sys.stderr)
    return {"export_psnr": scores["psnr"], "export_ssim": scores["ssim"], "export_bytes": size,
            "fp32_weights_bytes": fp32_size}


def has_wandb_key():
    """Whether a W&B API key is configured: $WANDB_API_KEY, or `wandb login`'s entry in ~/.netrc."""
    netrc = os.path.expanduser("~/.netrc")
    if os.environ.get("WANDB_API_KEY"):
        return True
    if not os.path.exists(netrc):
        return False
    with open(netrc) as f:
        return "api.wandb.ai" in f.read()


def open_wandb(cfg, out_dir, run_id=None):
    """A wandb run (imported lazily), or None; 'auto' goes offline without an API key and never hangs."""
    mode = cfg["WANDB"]
    if mode == "disabled":
        return None
    import wandb

    if mode == "auto":
        mode = "online" if has_wandb_key() else "offline"
    try:
        return wandb.init(project=cfg["WANDB_PROJECT"], name=cfg["EXPERIMENT"], config=cfg, dir=out_dir,
                          mode=mode, id=run_id, resume="allow" if run_id else None, settings=wandb.Settings(init_timeout=60, silent=True))
    except Exception as e:  # a logging service must never stop training
        print(f"notice: wandb could not start ({type(e).__name__}: {e}); continuing without it", file=sys.stderr)
        return None


def log_images(run, step, first):
    """Predicted vs target image and the depth map of one validation view, as uint8 (floats show black)."""
    import wandb

    rgb, target, depth = first
    run.log({"val/pred": wandb.Image(to_uint8(rgb)), "val/target": wandb.Image(to_uint8(target)),
             "val/depth": wandb.Image(colorize_depth(depth, depth.min().item(), depth.max().item()))}, step=step)


def prepare_out_dir(cfg, rank=0):
    """Create OUT_DIR and prove it is writable before any training time is spent."""
    out_dir = cfg["OUT_DIR"]
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_test.{rank}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to --out_dir={out_dir} ({e.strerror}); pick a writable directory") from None
    return out_dir


def write_json(obj, path):
    """JSON through a temp file and a rename."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def keep_freed_memory():
    """Have glibc reuse freed heap memory for tensors up to 256 MiB instead of mapping fresh pages for each.

    By default each tensor above glibc's mmap threshold (128 KiB, rising to at most 32 MiB) is a fresh mapping
    whose pages fault in one by one as it is first written: on the 2-core box ~0.5 ms per 4,096 x 64
    activation, and 400-760k faults in a 120-frame video (73k with this).
    """
    if sys.platform.startswith("linux") and hasattr(libc := ctypes.CDLL(None), "mallopt"):
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed memory
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD: allocate below 256 MiB from the heap


def train(cfg):
    """Train (or resume) the experiment a config describes, as one process or one torchrun rank; final metrics."""
    keep_freed_memory()
    rank, world, device = init_distributed(cfg, resolve_device(cfg["DEVICE"]))
    if not dist.is_initialized() and cfg["EXPERIMENT"] in ("exp5", "exp6"):
        print(f"notice: not started by torchrun, so {cfg['EXPERIMENT']} runs as one process (world size 1); "
              f"use torchrun --standalone --nproc_per_node=2 {cfg['EXPERIMENT']}.py", file=sys.stderr)
    try:
        return fit(cfg, rank, world, device)
    finally:
        if dist.is_initialized():
            gc.collect()  # the DDP module must be gone before the group, or gloo can abort at exit
            dist.destroy_process_group()


def wrap_ddp(cfg, net, device):
    """The DistributedDataParallel module every training forward goes through."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if cfg["MODEL"] == "bitnerf":
        from bitnerf_ddp import wrap_bitnerf

        return wrap_bitnerf(net, device)
    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None)


def fit(cfg, rank, world, device):
    """The training loop of one rank (rank 0 of 1 without torchrun); returns the final metrics dict."""
    from tqdm import tqdm

    if cfg["BATCH_SIZE"] % world:
        raise ConfigError(f"--batch_size={cfg['BATCH_SIZE']} (the global batch) does not split over {world} "
                          f"processes; use a multiple of {world}")
    main_rank = rank == 0  # only it writes files, logs and renders videos
    amp = autocast_context(cfg, device)
    if main_rank and cfg["DTYPE"] == "bfloat16" and bf16_matmul_is_slow(device):
        print("notice: this CPU has no fast bf16 matmul (oneDNN's needs AVX-512), so --dtype=bfloat16 trains far "
              "slower than float32 (12-14x on the README's 2-core test CPU); use it here to study numerics",
              file=sys.stderr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["DTYPE"] == "float16")  # bf16 needs no scaling
    out_dir = prepare_out_dir(cfg, rank)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path) if os.path.exists(ckpt_path) else None
    if ckpt is not None and checkpoint_shape(ckpt["config"]) != checkpoint_shape(cfg):
        raise UserError(f"{ckpt_path} holds a model of another shape ({checkpoint_shape(ckpt['config'])}); "
                        "pick another --out_dir or delete it")
    scene = load_scene(cfg["DATA"], cfg["DOWNSCALE"], cfg["WHITE_BKGD"])
    train_views, val_views = scene.splits["train"], scene.splits["val"]
    for v in (train_views, val_views):
        v.images, v.poses = v.images.to(device), v.poses.to(device)
    scene.background = scene.background.to(device)
    if main_rank:
        write_json(cfg, os.path.join(out_dir, "config.json"))

    model = build_model(cfg, device)
    grid = build_grid(cfg, scene, device)
    graphed = use_cuda_graph(cfg, device)
    optimizer = build_optimizer(cfg, model, device, graphed)
    # every rank holds the same generator state: each draws the global batch and keeps its shard (utils.Shard)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg["SEED"])
    step, train_s, history, curve = 0, 0.0, [], []  # validation scores; training loss every LOG_EVERY steps
    if ckpt is not None:
        load_weights(model, ckpt["model"], ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        generator.set_state(ckpt["generator"].to(generator.get_state().device))
        if grid is not None:
            grid.load_state_dict(ckpt["grid"])
        step, train_s, history, curve = ckpt["step"], ckpt["train_seconds"], ckpt["history"], ckpt.get("curve", [])
        if main_rank:
            print(f"resuming {ckpt_path} at step {step} ({train_s:.0f} s trained)", file=sys.stderr)

    def checkpoint():
        if main_rank:  # plain tensors only (torchao's training weights do not load with weights_only=True)
            save_checkpoint({"model": plain_state(model.state_dict()), "optimizer": plain_state(optimizer.state_dict()),
                             "scaler": scaler.state_dict(), "step": step, "config": cfg,
                             "generator": generator.get_state(), "train_seconds": train_s,
                             "grid": grid.state_dict() if grid is not None else None, "history": history,
                             "curve": curve, "wandb_id": run.id if run else None}, ckpt_path)

    fast = torch.compile(model, dynamic=True) if cfg["COMPILE"] else model  # the grid varies the batch size
    compile_s = 0.0
    if cfg["COMPILE"]:  # compile the training and rendering graphs up front so neither is billed as training
        t0 = time.perf_counter()
        for n, grad in ((cfg["BATCH_SIZE"] * cfg["NUM_SAMPLES"], True), (cfg["CHUNK"] * cfg["NUM_SAMPLES"], False)):
            dummy = torch.zeros(n, 3, device=device)
            with torch.set_grad_enabled(grad), amp:
                out = fast(dummy, dummy if cfg["USE_VIEWDIRS"] else None)
            if grad:
                sum(o.sum() for o in out).backward()
        model.zero_grad(set_to_none=True)
        compile_s = time.perf_counter() - t0
        print(f"compiled in {compile_s:.1f} s", file=sys.stderr)
    # compile first, then wrap, as DDP expects; under torchrun always, so one process exercises the DDP path too
    net = wrap_ddp(cfg, fast, device) if dist.is_initialized() else fast

    shard = cfg["BATCH_SIZE"] // world
    lo = rank * shard
    skip_zero_density = cfg["SKIP_ZERO_DENSITY"] and cfg["DENSITY_ACT"] == "relu"  # softplus is never zero

    def loss_and_grads():
        """Draw a batch, render it and backpropagate its loss; returns (loss, gradient norm before clipping)."""
        rays, target = sample_batch(train_views, cfg["BATCH_SIZE"], generator)
        rays, target = Rays(*(x[lo: lo + shard] for x in rays)), target[lo: lo + shard]
        with amp:
            rgb, _, acc = render_rays(net, rays, scene.near, scene.far, cfg["NUM_SAMPLES"], scene.background,
                                      Shard(generator, lo, cfg["BATCH_SIZE"]), grid, cfg["NUM_FINE"],
                                      skip_zero_density=skip_zero_density, fixed_shapes=graphed)
        loss = F.mse_loss(rgb, target)  # DDP averages the ranks' gradients: the mean over the global batch
        if cfg["OPACITY_REG"]:
            loss = loss + cfg["OPACITY_REG"] * (acc * (1 - acc)).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        return loss, torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["GRAD_CLIP"] or float("inf"))

    graph = None
    if graphed:
        t0 = time.perf_counter()
        graph, (graph_loss, graph_grad_norm) = capture_training_step(loss_and_grads, optimizer, generator)
        capture_s = time.perf_counter() - t0
        compile_s += capture_s
        print(f"captured the training step as a CUDA graph in {capture_s:.1f} s", file=sys.stderr)

    run = open_wandb(cfg, out_dir, ckpt.get("wandb_id") if ckpt else None) if main_rank else None
    done = lambda: step >= cfg["MAX_STEPS"] or 0 < cfg["TIME_BUDGET_S"] <= train_s  # noqa: E731
    bar = tqdm(total=cfg["MAX_STEPS"], initial=step, desc=cfg["EXPERIMENT"], dynamic_ncols=True,
               disable=None if main_rank else True)
    rays_per_s = 0.0
    with GracefulStop(not dist.is_initialized()) as stop:  # Ctrl-C: end the step, checkpoint, stop
        while not done() and stop.signum is None:
            t0 = time.perf_counter()
            lr = learning_rate(cfg, step, progress(cfg, step, train_s))
            for group in optimizer.param_groups:
                if graph is not None:
                    group["lr"].fill_(lr)  # the graph reads the learning rate from this tensor
                else:
                    group["lr"] = lr
            if grid is not None and step % GRID_EVERY == 0 and step > 0:
                # through the compiled model: the eager QAT forward made each update 2.3x slower (~15% of training time)
                grid.update(fast, 1.0 if step < GRID_FULL_UNTIL else 0.25, generator=generator)
            if graph is not None:
                graph.replay()
                loss, grad_norm = graph_loss, graph_grad_norm
            else:
                optimizer.zero_grad(set_to_none=True)
                loss, grad_norm = loss_and_grads()
            # the gradient norm is taken after DDP's all-reduce, so every rank makes the same decision
            bad = not torch.isfinite(grad_norm) and not scaler.is_enabled()
            if bad and cfg["NONFINITE"] == "stop":
                raise UserError(f"non-finite loss or gradient at step {step + 1}; the last good checkpoint is kept in "
                                f"{ckpt_path}; lower --lr, set --grad_clip, or --nonfinite=skip")
            if bad:  # (the graph's AdamW has skipped it already)
                print(f"notice: non-finite gradient at step {step + 1}; step skipped", file=sys.stderr)
            elif graph is None:
                scaler.step(optimizer)  # with fp16, a step whose gradients overflowed is skipped and the scale lowered
            scaler.update()
            step += 1
            dt = time.perf_counter() - t0
            train_s += dt
            if world > 1 and cfg["TIME_BUDGET_S"]:  # every rank must stop at the same step
                train_s = all_reduce([train_s], "max")[0]
            rays_per_s = cfg["BATCH_SIZE"] / dt if rays_per_s == 0 else 0.9 * rays_per_s + 0.1 * cfg["BATCH_SIZE"] / dt
            if main_rank and (step % cfg["LOG_EVERY"] == 0 or done()):
                stats = {"train/loss": loss.item(), "train/psnr": -10 * math.log10(max(loss.item(), 1e-10)),
                         "train/grad_norm": grad_norm.item(), "train/lr": lr, "train/rays_per_s": rays_per_s}
                curve.append({"step": step, "train_seconds": round(train_s, 2), "loss": stats["train/loss"]})
                bar.set_postfix(loss=f"{stats['train/loss']:.4f}", psnr=f"{stats['train/psnr']:.2f}",
                                rays_s=f"{rays_per_s:.0f}")
                if run:
                    run.log(stats, step=step)
            bar.update(1)
            if cfg["EVAL_EVERY"] and step % cfg["EVAL_EVERY"] == 0 and not done():
                scores, first = evaluate_views(fast, val_views, scene, cfg, grid, amp, cfg["EVAL_VIEWS"], rank=rank,
                                               world=world)
                history.append({"step": step, "train_seconds": round(train_s, 2), **scores})
                bar.write(f"step {step}: val PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.3f} "
                          f"({scores['views']} views, {train_s:.0f} s)") if main_rank else None
                if run:
                    run.log({"val/psnr": scores["psnr"], "val/ssim": scores["ssim"]}, step=step)
                    log_images(run, step, first)
            if step % cfg["CKPT_EVERY"] == 0 and not done():
                checkpoint()
    bar.close()
    checkpoint()
    if stop.signum is not None:
        if run:
            run.finish(exit_code=128 + stop.signum)
        raise Interrupted(f"{signal.Signals(stop.signum).name} at step {step}: checkpoint written to {ckpt_path}; "
                          "rerun the same command to resume", 128 + stop.signum)
    del net  # a DDP module must be garbage-collected before destroy_process_group (see train)

    t0 = time.perf_counter()
    scores, first = evaluate_views(fast, val_views, scene, cfg, grid, amp, rank=rank, world=world)
    history.append({"step": step, "train_seconds": round(train_s, 2), **scores})
    metrics = {"experiment": cfg["EXPERIMENT"], "val_psnr": scores["psnr"], "val_ssim": scores["ssim"],
               "val_views": scores["views"], "steps": step, "train_seconds": round(train_s, 2),
               "compile_seconds": round(compile_s, 2), "eval_seconds": round(time.perf_counter() - t0, 2),
               "rays_per_s": round(step * cfg["BATCH_SIZE"] / max(train_s, 1e-9), 1),
               "samples_per_s": round(step * cfg["BATCH_SIZE"] * (cfg["NUM_SAMPLES"] + cfg["NUM_FINE"])
                                      / max(train_s, 1e-9), 1),
               "peak_mem_mb": round(peak_memory_mb(device)), "device": str(device), "world_size": world,
               "history": history, "curve": curve}
    if not main_rank:
        return metrics
    print(f"final: val PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.3f} on {scores['views']} views "
          f"after {step} steps, {train_s:.0f} s", file=sys.stderr)
    if cfg["VIDEO_FRAMES"]:
        t0 = time.perf_counter()
        video = render_videos(fast, val_views, scene, cfg, grid, amp, out_dir)
        metrics["video_seconds"] = round(time.perf_counter() - t0, 2)
    if cfg["MODEL"] == "bitnerf":
        metrics.update(export_and_evaluate(model, cfg, val_views, scene, grid, amp, out_dir))
    write_json(metrics, os.path.join(out_dir, "metrics.json"))
    if run:
        import wandb

        if cfg["VIDEO_FRAMES"]:
            run.log({"video": wandb.Video(video, format="mp4")}, step=step)
        run.log({"val/psnr": scores["psnr"], "val/ssim": scores["ssim"]}, step=step)
        log_images(run, step, first)
        run.finish()
    return metrics


def main(preset, argv=None):
    """Command-line entry: parse overrides, train, and turn bad input into one line on stderr + exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(usage(preset, os.path.basename(sys.argv[0])))
        return
    debug = "--debug" in argv
    try:
        train(apply_overrides(preset, [a for a in argv if a != "--debug"]))
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.code)
