"""The one training loop every experiment runs: `python expN.py [--key=value ...]`.

`fit` reads top to bottom: build the run (a Trainer: data, model, optimizer, grid, step), then per step the
learning rate, a grid update, the training step, logging, validation and a checkpoint; then the final
evaluation, video, export and metrics. The run's scalar state (a RunState) is exactly what a checkpoint adds
to the tensors, so resuming restores it whole.
"""
import copy
import gc
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bitnerf import build_bitnerf, export_bitnerf, load_ternary, plain_state
from configs import ConfigError, UserError, apply_overrides, eval_at_seconds, hash_data_defaults, usage
from dataset import protocol, resolve_data, sample_batch, scene_of, score_name, scored_on
from nerf import model_class, model_kwargs
from render import (
    Frame,
    Rays,
    Shard,
    build_grid,
    chunks_in_parallel,
    evaluate_views,
    rebuild_grid,
    render_rays,
    render_videos,
)
from utils import (
    all_reduce,
    checkpoint_path,
    keep_freed_memory,
    load_checkpoint,
    load_weights,
    peak_memory_mb,
    save_checkpoint,
    to_uint8,
    write_json,
)

GRID_EVERY = 16  # steps between occupancy-grid updates
GRID_FULL_UNTIL = 256  # before this step every update visits every cell; after it, a random quarter
OPTIMIZER_KEYS = ("WEIGHT_DECAY", "ADAM_EPS", "ADAM_BETA2", "AMSGRAD", "FUSED_OPTIM", "HASH_LR")  # in AdamW groups
WARMUP_SHARE = 0.1  # the LR warm-up lasts WARMUP_STEPS steps or this share of the run, whichever is shorter


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
    kwargs = dict(lr=cfg["LR"], weight_decay=cfg["WEIGHT_DECAY"], amsgrad=cfg["AMSGRAD"], eps=cfg["ADAM_EPS"],
                  betas=(0.9, cfg["ADAM_BETA2"]))
    groups = parameter_groups(cfg, model)
    if graphed:
        return torch.optim.AdamW(groups, fused=True, capturable=True, **kwargs)
    if cfg["FUSED_OPTIM"]:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError) as e:  # torch says which device or dtype it lacks
            print(f"notice: fused AdamW unavailable on {device.type} ({e}); using the plain one", file=sys.stderr)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)  # on CPU the default loops over tensors


def load_optimizer_state(optimizer, state_dict):
    """Load a checkpoint's AdamW state (moments, step counts) but keep this run's settings, which load_state_dict
    replaces with the checkpoint's: eps, weight decay, AMSGrad, fused, each group's lr_scale (OPTIMIZER_KEYS).

    AMSGrad turned on starts its running maximum at the current second moment; each step count is moved to where
    this run's kernel (fused or capturable: the parameter's device; else the CPU) keeps it.
    """
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    for group, mine in zip(optimizer.param_groups, settings, strict=True):
        group.update(mine)
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            if group["amsgrad"]:
                state.setdefault("max_exp_avg_sq", state["exp_avg_sq"].clone())
            else:
                state.pop("max_exp_avg_sq", None)
            state["step"] = state["step"].to(p.device if group["fused"] or group["capturable"] else "cpu")


def parameter_groups(cfg, model):
    """AdamW's parameter groups, each with its lr_scale (its peak LR over LR): a hash table at HASH_LR, without
    weight decay (a decayed entry forgets what the rays seldom reach), and the rest at LR."""
    table = [p for n, p in model.named_parameters() if n.endswith("encoding.table")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("encoding.table")]
    if not table:
        return [{"params": rest, "lr_scale": 1.0}]
    return [{"params": rest, "lr_scale": 1.0},
            {"params": table, "lr_scale": cfg["HASH_LR"] / cfg["LR"], "weight_decay": 0.0}]


def capture_training_step(loss_and_grads, optimizer, generator, warmup=3):
    """One whole training step (batch, render, backward, clipping, AdamW) captured as a CUDA graph.

    loss_and_grads returns a tuple of tensors whose last is the gradient norm; this returns the graph and that
    tuple, which each replay overwrites. Replaying it is one launch instead of hundreds, and a GPU step is
    launch-bound. As torch's recipe for capturing a whole network asks, warm-up passes on a side stream first
    create the gradients and AdamW's state; they change no weight, and the generator is rewound after them. In
    the graph, AdamW reads the learning rate from a tensor (the loop fills it) and skips a step whose gradient
    norm is not finite (found_inf), as the eager loop does.
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
        outputs = loss_and_grads()
        optimizer.found_inf = (~torch.isfinite(outputs[-1])).float()
        optimizer.step()
    return graph, outputs


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
    """Fraction of training done after `step` steps and `seconds` of training: by steps, or by time when a time
    budget would end it sooner."""
    p = step / cfg["MAX_STEPS"]
    if cfg["TIME_BUDGET_S"] > 0:
        p = max(p, seconds / cfg["TIME_BUDGET_S"])
    return min(p, 1.0)


def warmup_factor(cfg, step, frac):
    """The share of LR that step (0-based) trains at: linear warm-up over WARMUP_STEPS steps or the first
    WARMUP_SHARE of the run's progress frac, whichever ends first (a short run still reaches LR); 1 after it."""
    if not cfg["WARMUP_STEPS"]:
        return 1.0
    return min(1.0, max((step + 1) / cfg["WARMUP_STEPS"], frac / WARMUP_SHARE))


def learning_rate(cfg, step, frac, warmup_end):
    """Step's learning rate at the run's progress frac: the warm-up, then a cosine from LR to MIN_LR over the rest of
    the run, from warmup_end (the progress at which warm-up ended; None while it lasts) to its end."""
    if warmup_end is None:
        return cfg["LR"] * warmup_factor(cfg, step, frac)
    rest = min(1.0, (frac - warmup_end) / (1 - warmup_end)) if warmup_end < 1 else 0.0
    return cfg["MIN_LR"] + 0.5 * (cfg["LR"] - cfg["MIN_LR"]) * (1 + math.cos(math.pi * rest))


def skips_zero_density(cfg):
    """Whether training leaves out samples of zero density: asked for, and the density can be zero (a ReLU; the
    hash model's exp density never is)."""
    return cfg["SKIP_ZERO_DENSITY"] and cfg["DENSITY_ACT"] == "relu" and cfg["ENCODING"] == "frequency"


def train_threads(cfg, device, grid):
    """How many Python threads a step's batch is split over (Trainer.threaded_loss_and_grads): TRAIN_THREADS, or by
    default 2 where no occupancy grid culls (a step of many samples: fern's 1.3-1.6x faster on 2 cores, the only
    count measured, docs/captures.md; so the same on any CPU of 2 or more torch threads) and 1 where one does (no
    faster). Always 1 on CUDA, under torchrun (DDP's backward) and for a compiled model."""
    if device.type != "cpu" or dist.is_initialized() or cfg["COMPILE"]:
        return 1
    threads = cfg["TRAIN_THREADS"] or (min(2, torch.get_num_threads()) if grid is None else 1)
    return min(threads, cfg["BATCH_SIZE"])  # every slice at least one ray


def build_model(cfg, device):
    """The NeRF or BitNeRF (quantized for QAT) a config describes, on device, seeded for a reproducible init."""
    torch.manual_seed(cfg["SEED"])
    if cfg["MODEL"] == "bitnerf":
        return build_bitnerf(cfg, device)
    return model_class(cfg)(**model_kwargs(cfg)).to(device)


def checkpoint_shape(cfg):
    """What a checkpoint must match to be resumed or evaluated: the model's and the grid's shapes."""
    shape = {"model": cfg["MODEL"], "encoding": cfg["ENCODING"], **model_kwargs(cfg)}
    if cfg["MODEL"] == "bitnerf" and cfg["ENCODING"] == "hash":
        shape["hash_table_bits"] = cfg["HASH_TABLE_BITS"]
    return {**shape, "grid_res": cfg["GRID_RES"] if cfg["OCC_GRID"] else None}


def compile_model(cfg, model, device, amp):
    """torch.compile the model if the config asks, with its training and rendering graphs compiled up front (so
    neither is billed as training); returns the model to call and the seconds spent."""
    if not cfg["COMPILE"]:
        return model, 0.0
    fast = torch.compile(model, dynamic=True)  # the grid varies the batch size
    t0 = time.perf_counter()
    for n, grad in ((cfg["BATCH_SIZE"] * cfg["NUM_SAMPLES"], True), (cfg["CHUNK"] * cfg["NUM_SAMPLES"], False)):
        points = torch.zeros(n, 3, device=device)
        dirs = torch.zeros(n, 3, device=device) if cfg["USE_VIEWDIRS"] else None  # not points: dynamo guards aliasing
        with torch.set_grad_enabled(grad), amp:
            out = fast(points, dirs)
        if grad:
            sum(o.sum() for o in out).backward()
    model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    print(f"compiled in {seconds:.1f} s", file=sys.stderr)
    return fast, seconds


def wrap_ddp(cfg, net, device):
    """The DistributedDataParallel module every training forward goes through."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if cfg["MODEL"] == "bitnerf":
        from bitnerf_ddp import wrap_bitnerf

        return wrap_bitnerf(net, device)
    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None)


def export_and_evaluate(model, cfg, views, scene, grid, amp, out_dir):
    """Export a BitNeRF to OUT_DIR/bitnerf_ternary.pt, reload the file and evaluate it as exported."""
    path = os.path.join(out_dir, "bitnerf_ternary.pt")
    size, fp32_size = export_bitnerf(model, cfg, path)
    device = views.pixels.device
    exported = load_ternary(torch.load(path, weights_only=True), cfg).to(device)
    scores, _ = evaluate_views(exported, views, scene, cfg, rebuild_grid(exported, cfg, scene.frame, device), amp)
    print(f"export: {path}, {size} bytes ({fp32_size / size:.1f}x smaller than fp32), {score_name(scene)} PSNR "
          f"{scores['psnr']:.2f} dB", file=sys.stderr)
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
        return wandb.init(project=cfg["WANDB_PROJECT"], name=cfg["EXPERIMENT"], config=cfg, dir=out_dir, mode=mode,
                          id=run_id, resume="allow" if run_id else None,
                          settings=wandb.Settings(init_timeout=60, silent=True))
    except Exception as e:  # a logging service must never stop training
        print(f"notice: wandb could not start ({type(e).__name__}: {e}); continuing without it", file=sys.stderr)
        return None


def log_images(run, step, first):
    """Predicted vs target image and the depth picture of one validation view, as uint8 (floats show black)."""
    import wandb

    rgb, target, depth = first
    run.log({"val/pred": wandb.Image(to_uint8(rgb)), "val/target": wandb.Image(to_uint8(target)),
             "val/depth": wandb.Image(depth)}, step=step)


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


def differences(saved, now):
    """'key=saved (this run: now), ...' for each key of a checkpoint's record whose value this run's differs from
    ('' when none does)."""
    return ", ".join(f"{k}={v} (this run: {now.get(k)})" for k, v in saved.items() if k in now and now[k] != v)


def data_identity(data):
    """DATA as a checkpoint records it: a file or folder as its absolute path (the run may resume from another
    directory), a name ('synthetic', 'tiny_nerf') as it is."""
    return os.path.realpath(data) if os.path.exists(data) else data


def scene_record(cfg, asked, scene, views):
    """What a resumed run's data must match, saved in ckpt.pt: the data (and the DATA asked for, e.g. 'auto'), the
    training views' resolution, the background and the scene's bounds."""
    frame = scene.frame
    return {"data": data_identity(cfg["DATA"]), "asked": asked, **protocol(scene, views), "space": frame.space,
            "near": frame.near, "far": frame.far, "scene_bound": frame.bound}


def saved_scene_record(ckpt):
    """A checkpoint's scene record; for one written before it was kept, what its config tells (its data, as asked
    for or not, and the cube)."""
    cfg = ckpt["config"]
    return ckpt.get("scene") or {"data": data_identity(cfg["DATA"]), "asked": cfg["DATA"],
                                 "scene_bound": cfg["SCENE_BOUND"]}


def run_frame(cfg, ckpt):
    """The frame a run trains in: its checkpoint's, or the one FRAME holds or names (a run directory or checkpoint),
    with the config's SPACE, NEAR, FAR and SCENE_BOUND over it where set (a resume then sees the change and
    refuses it); None: the data's own."""
    frame = ckpt["config"]["FRAME"] if ckpt is not None and isinstance(ckpt["config"]["FRAME"], dict) else cfg["FRAME"]
    if frame == "auto":
        return None
    if not isinstance(frame, dict):
        frame = load_checkpoint(checkpoint_path(frame))["config"]["FRAME"]
        if not isinstance(frame, dict):
            raise UserError(f"--frame={cfg['FRAME']}: that run kept no frame (it predates frames); train without "
                            "--frame, or name a newer run")
    space = None if cfg["SPACE"] == "auto" else cfg["SPACE"]
    return Frame.of(frame).with_overrides(space, cfg["NEAR"], cfg["FAR"], cfg["SCENE_BOUND"])


def check_resumable(ckpt, cfg, record, path):
    """Refuse to resume a checkpoint of another model shape, or on other data (check_same_scene)."""
    other_shape = differences(checkpoint_shape(ckpt["config"]), checkpoint_shape(cfg))
    if other_shape:
        raise UserError(f"{path} holds a model of another shape: {other_shape}; pass its values as --key=value to "
                        "resume it, or pick another --out_dir or delete it")
    check_same_scene(saved_scene_record(ckpt), record, path)


def check_same_scene(saved, now, path):
    """Refuse to resume a checkpoint on other data than it trained on (other views, resolution, background or
    bounds): a run that mixed two scenes would report a number of neither."""
    differ = differences({k: v for k, v in saved.items() if k != "asked"}, now)
    if differ:
        again = f" (or pass --data={saved['data']} to resume it)" if saved["data"] != now["data"] else ""
        raise UserError(f"{path} was trained on other data: {differ}; use another --out_dir or delete ckpt.pt"
                        + again)


def with_frame(cfg, frame, saved=None):
    """The config with what a scene's frame resolves: FRAME and its keys, and the hash keys left at 0 (a resumed
    run's saved config's values, else the frame's space's)."""
    hashed = {k: cfg[k] or (saved or {}).get(k) or v for k, v in hash_data_defaults(frame.space).items()}
    return {**cfg, "FRAME": frame.record(), "SPACE": frame.space, "NEAR": frame.near, "FAR": frame.far,
            "SCENE_BOUND": frame.bound, **hashed}


def data_config(cfg):
    """The config as a new run on its data resolves it (Trainer.load_data), without training: for building the
    model the run would train (bench.py), whose table size can depend on the data."""
    cfg = {**cfg, "DATA": run_data(cfg, None, 0, 1)}
    return with_frame(cfg, scene_of(cfg, ("train",), run_frame(cfg, None)).frame)


def run_data(cfg, ckpt, rank, world):
    """The data this run trains on: DATA; for 'auto', the data of the checkpoint it resumes if that run asked for
    'auto' too (and resolved it to its data), else what resolve_data finds.

    Under torchrun rank 0 resolves it first (a download happens once), then the others.
    """
    saved = saved_scene_record(ckpt) if ckpt is not None else {"asked": None}
    data = saved["data"] if cfg["DATA"] == "auto" and saved["asked"] == "auto" else cfg["DATA"]
    if world > 1 and rank > 0:
        dist.barrier()
    data = resolve_data(data, quiet=rank > 0)
    if world > 1 and rank == 0:
        dist.barrier()
    return data


@dataclass
class RunState:
    """The scalar part of a checkpoint: where the run is and what it has measured so far."""

    step: int = 0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)  # validation scores
    curve: list = field(default_factory=list)  # training loss every LOG_EVERY steps
    wandb_id: str = None
    warmup_end: float = None  # the run's progress when the LR warm-up ended (the cosine spans the rest); None before


class Trainer:
    """Everything one rank trains with, built once from a config: data, model, optimizer, grid and step."""

    def __init__(self, cfg, rank, world, device):
        if cfg["BATCH_SIZE"] % world:
            raise ConfigError(f"--batch_size={cfg['BATCH_SIZE']} (the global batch) does not split over {world} "
                              f"processes; use a multiple of {world}")
        self.rank, self.world, self.device = rank, world, device
        self.main_rank = rank == 0  # only it writes files, logs and renders videos
        if cfg["VIEWER"] and self.main_rank:  # a busy port or a bad size: said now, not after loading and compiling
            from view import check_settings

            check_settings(cfg["VIEWER_HOST"], cfg["VIEWER_PORT"], cfg["VIEWER_RES"], cfg["VIEWER_FRAME_S"])
        self.amp = autocast_context(cfg, device)
        if self.main_rank and cfg["DTYPE"] == "bfloat16" and bf16_matmul_is_slow(device):
            print("notice: this CPU has no fast bf16 matmul (oneDNN's needs AVX-512), so --dtype=bfloat16 trains far "
                  "slower than float32 (docs/performance.md); use it here to study numerics", file=sys.stderr)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg["DTYPE"] == "float16")  # bf16 needs no scaling
        self.out_dir = prepare_out_dir(cfg, rank)
        self.ckpt_path = os.path.join(self.out_dir, "ckpt.pt")
        ckpt = load_checkpoint(self.ckpt_path) if os.path.exists(self.ckpt_path) else None
        asked = cfg["DATA"]
        self.cfg = cfg = self.load_data(cfg, ckpt)
        self.scene_record = scene_record(cfg, asked, self.scene, self.train_views)
        if ckpt is not None:
            check_resumable(ckpt, cfg, self.scene_record, self.ckpt_path)
        if self.main_rank:
            write_json(cfg, os.path.join(self.out_dir, "config.json"))
        self.model = build_model(cfg, device)
        self.grid = build_grid(cfg, self.scene.frame, device)
        self.graphed = use_cuda_graph(cfg, device)  # the one place that chooses the graphed step over the eager one
        self.optimizer = build_optimizer(cfg, self.model, device, self.graphed)
        # every rank holds the same generator state: each draws the global batch and keeps its shard (utils.Shard)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(cfg["SEED"])
        self.state = self.resume(ckpt) if ckpt is not None else RunState()
        if world > 1:
            self.check_same_start()
        done = {m for h in self.state.history for m in h.get("at_s", [])}
        self.marks = [m for m in eval_at_seconds(cfg) if m not in done]  # EVAL_AT_S marks not yet validated at
        self.fast, self.compile_seconds = compile_model(cfg, self.model, device, self.amp)
        # compile first, then wrap, as DDP expects; under torchrun always, so one process exercises the DDP path too
        self.net = wrap_ddp(cfg, self.fast, device) if dist.is_initialized() else self.fast
        self.shard = cfg["BATCH_SIZE"] // world
        self.threads = train_threads(cfg, device, self.grid)
        self.graph = self.capture() if self.graphed else None
        self.run = open_wandb(cfg, self.out_dir, self.state.wandb_id) if self.main_rank else None
        self.state.wandb_id = self.run.id if self.run else None
        self.rays_per_s = 0.0
        from tqdm import tqdm

        self.bar = tqdm(total=cfg["MAX_STEPS"], initial=self.state.step, desc=cfg["EXPERIMENT"], dynamic_ncols=True,
                        disable=None if self.main_rank else True)
        self.viewer = self.open_viewer() if cfg["VIEWER"] and self.main_rank else None

    def open_viewer(self):
        """The web viewer of the model as it trains (VIEWER, rank 0): it renders between steps (see watch)."""
        from view import Viewer, field_renderer

        cfg = self.cfg
        render = field_renderer(self.fast, self.scene, cfg, self.grid, self.amp)
        viewer = Viewer(render, self.scene.frame, self.train_views.cameras, self.train_views, cfg["VIEWER_HOST"],
                        cfg["VIEWER_PORT"], cfg["VIEWER_RES"], cfg["VIEWER_FRAME_S"], training=True,
                        title=f"{cfg['EXPERIMENT']} (training)")
        print(f"viewer: http://{cfg['VIEWER_HOST']}:{viewer.port}", file=sys.stderr, flush=True)
        return viewer

    def watch(self, stopping):
        """Between steps, with the viewer on: the run's progress to it and the frames its browsers wait for; held
        here while its pause is on (neither counts as training time). Under torchrun the other ranks wait here for
        rank 0, so that its frames and pauses do not count as their training time either."""
        while self.viewer is not None:
            self.viewer.update(self.state.step, self.rays_per_s, self.state.train_seconds)
            self.viewer.poll(self.state.step)
            if not self.viewer.paused or stopping():
                break
            time.sleep(0.05)
        if self.cfg["VIEWER"] and self.world > 1:
            dist.barrier()

    def close_viewer(self):
        """Stop the viewer's server (once); the finished run is for view.py."""
        if self.viewer is not None:
            self.viewer.close()
            self.viewer = None
            print(f"viewer stopped; view the result with: python view.py {self.out_dir}", file=sys.stderr)

    def load_data(self, cfg, ckpt):
        """The scene (in its checkpoint's frame, FRAME's or the data's own) and its training and validation views on
        the device; returns the config with what the data resolved: DATA, and FRAME and its keys."""
        cfg = {**cfg, "DATA": run_data(cfg, ckpt, self.rank, self.world)}
        saved = ckpt["config"] if ckpt is not None else None  # a resume keeps its table and grid resolution
        self.scene = scene_of(cfg, ("train", "val"), run_frame(cfg, ckpt))
        self.train_views, self.val_views = (self.scene.splits[s].to(self.device) for s in ("train", "val"))
        self.scene.background = self.scene.background.to(self.device)
        return with_frame(cfg, self.scene.frame, saved)

    def resume(self, ckpt):
        """Restore weights, optimizer, scaler, generator and grid from a checkpoint; returns its RunState."""
        load_weights(self.model, ckpt["model"], self.ckpt_path)
        load_optimizer_state(self.optimizer, ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.generator.set_state(ckpt["generator"].to(self.generator.get_state().device))
        if self.grid is not None:
            self.grid.load_state_dict(ckpt["grid"])
        # a checkpoint from before warmup_end was kept: its cosine spanned the whole run, from progress 0
        warmup_end = ckpt.get("warmup_end", 0.0 if ckpt["step"] >= self.cfg["WARMUP_STEPS"] else None)
        state = RunState(ckpt["step"], ckpt["train_seconds"], ckpt["history"], ckpt.get("curve", []),
                         ckpt.get("wandb_id"), warmup_end)
        changed = differences({k: ckpt["config"][k] for k in OPTIMIZER_KEYS}, self.cfg)
        if self.main_rank:
            print(f"resuming {self.ckpt_path} at step {state.step} ({state.train_seconds:.0f} s trained)",
                  file=sys.stderr)
            if changed:
                print(f"notice: optimizer settings other than the checkpoint's, applied from step {state.step + 1}: "
                      f"{changed}", file=sys.stderr)
        return state

    def check_same_start(self):
        """Under torchrun, stop unless every rank starts at the same step (a node that cannot see OUT_DIR's
        checkpoint would start over while the others resume)."""
        latest, negated_earliest = all_reduce([self.state.step, -self.state.step], "max")
        if latest != -negated_earliest:
            raise UserError(f"the ranks would start at steps {-negated_earliest:.0f} to {latest:.0f}: some cannot see "
                            f"{self.ckpt_path}; put --out_dir on storage every node sees (or copy ckpt.pt there)")

    def capture(self):
        """The training step captured as a CUDA graph (its outputs are kept in self.graph_outputs)."""
        t0 = time.perf_counter()
        graph, self.graph_outputs = capture_training_step(self.loss_and_grads, self.optimizer, self.generator)
        seconds = time.perf_counter() - t0
        self.compile_seconds += seconds
        print(f"captured the training step as a CUDA graph in {seconds:.1f} s", file=sys.stderr)
        return graph

    def loss_and_grads(self):
        """Draw a batch, render it and backpropagate its loss; returns (photometric MSE, the regularisers (opacity,
        distortion), gradient norm before clipping)."""
        cfg, lo, n = self.cfg, self.rank * self.shard, self.shard
        rays, target = sample_batch(self.train_views, cfg["BATCH_SIZE"], self.generator, self.scene.frame)
        rays, target = Rays(*(x[lo: lo + n] for x in rays)), target[lo: lo + n]
        if self.threads > 1:  # on a CPU: no GradScaler (float16 is CUDA's), so its unscale_ below does nothing
            mse, reg = self.threaded_loss_and_grads(rays, target)
        else:
            with self.amp:
                mse, reg, loss = self.batch_loss(rays, target, Shard(self.generator, lo, cfg["BATCH_SIZE"]))
            self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if cfg["GRAD_CLIP"]:
            return mse, reg, torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["GRAD_CLIP"])
        # the norm alone: clipping at infinity would still multiply every gradient (a whole hash table's) by 1.0
        return mse, reg, torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])

    def batch_loss(self, rays, target, generator):
        """Render a batch's rays; returns (photometric MSE, the regularisers (opacity, distortion), the loss)."""
        cfg = self.cfg
        rgb, _, acc, *spread = render_rays(self.net, rays, self.scene.frame, cfg["NUM_SAMPLES"], self.scene.background,
                                           generator, self.grid, cfg["NUM_FINE"], cfg["ERT_TRANSMITTANCE"],
                                           skips_zero_density(cfg), self.graphed, bool(cfg["DISTORTION"]))
        mse = F.mse_loss(rgb, target)  # DDP averages the ranks' gradients: the mean over the global batch
        opacity = cfg["OPACITY_REG"] * (acc * (1 - acc)).mean() if cfg["OPACITY_REG"] else torch.zeros_like(mse)
        reg = torch.stack([opacity, cfg["DISTORTION"] * spread[0].mean() if spread else torch.zeros_like(mse)])
        return mse, reg, mse + reg.sum() if cfg["OPACITY_REG"] or spread else mse

    def threaded_loss_and_grads(self, rays, target):
        """batch_loss over self.threads slices of the batch at once, each on its own Python thread; sets the
        parameters' gradients (the batch's mean loss) and returns the batch's (MSE, regularisers).

        Each slice's gradients are taken apart (autograd.grad) and summed in slice order, and each slice draws its
        jitter from a generator seeded from the run's, so a run is reproducible and resumes exactly. A step then
        draws other jitter than a one-thread step of the same seed.
        """
        seeds = torch.randint(2 ** 62, (self.threads,), generator=self.generator, device=self.device).tolist()
        sliced = [Rays(*parts) for parts in zip(*(x.tensor_split(self.threads) for x in rays), strict=True)]
        targets = target.tensor_split(self.threads)
        params = [p for p in self.model.parameters() if p.requires_grad]

        def slice_grads(k):
            share = len(targets[k]) / len(target)  # each slice's mean, weighted: the batch's mean
            generator = torch.Generator(device=self.device).manual_seed(seeds[k])
            with copy.copy(self.amp):  # autocast is per thread, and a context object entered once at a time
                mse, reg, loss = self.batch_loss(sliced[k], targets[k], generator)
            return mse.detach() * share, reg.detach() * share, torch.autograd.grad(loss * share, params,
                                                                                   allow_unused=True)

        with chunks_in_parallel(self.threads) as map_slices:
            parts = list(map_slices(slice_grads, range(self.threads)))
        for i, p in enumerate(params):
            grads = [g[i] for *_, g in parts if g[i] is not None]
            p.grad = sum(grads[1:], grads[0]) if grads else None
        return sum(m for m, *_ in parts), sum(r for _, r, _ in parts)

    def done(self):
        """Whether training is over: MAX_STEPS reached, or the time budget spent."""
        return self.state.step >= self.cfg["MAX_STEPS"] or 0 < self.cfg["TIME_BUDGET_S"] <= self.state.train_seconds

    def announce(self):
        """One line on stderr (rank 0) as training starts: what trains on what, from which step, until when (the
        progress bar is off when stderr is not a terminal, as in a log)."""
        cfg, rec = self.cfg, self.scene_record
        until = f"{cfg['MAX_STEPS']} steps" + (f" or {cfg['TIME_BUDGET_S']:g} s" if cfg["TIME_BUDGET_S"] else "")
        if self.main_rank:
            print(f"training {cfg['EXPERIMENT']} on {cfg['DATA']} ({len(self.train_views)} views, "
                  f"{rec['resolution']}, {rec['background']}, {rec['space']}"
                  f"{f', {self.threads} threads a step' if self.threads > 1 else ''}) from step {self.state.step} "
                  f"until {until}", file=sys.stderr, flush=True)

    def scheduled_learning_rate(self):
        """The LR of the next step, at the progress the run will have made once it is done (by steps; by time, the
        time so far): the last step of a run MAX_STEPS long trains at MIN_LR. Records when warm-up ends."""
        state = self.state
        frac = progress(self.cfg, state.step + 1, state.train_seconds)
        if state.warmup_end is None and warmup_factor(self.cfg, state.step, frac) >= 1:
            state.warmup_end = frac
        return learning_rate(self.cfg, state.step, frac, state.warmup_end)

    def set_learning_rate(self, lr):
        """Set every parameter group's learning rate, lr times its lr_scale (the graph reads it from the tensor it
        captured)."""
        for group in self.optimizer.param_groups:
            scaled = lr * group.get("lr_scale", 1.0)  # a checkpoint's groups from before lr_scale lack it
            if self.graph is not None:
                group["lr"].fill_(scaled)
            else:
                group["lr"] = scaled

    def update_grid(self):
        """Every GRID_EVERY steps, measure the model's density in the occupancy grid (all cells early, then a quarter).

        In fp32, outside autocast: the grid only decides which samples to skip, so it reads the density the weights
        hold at full precision, and on CPUs without bf16 kernels a bf16 update would cost far more.
        """
        step = self.state.step
        if self.grid is not None and step % GRID_EVERY == 0 and step > 0:
            # through the compiled model: the eager QAT forward is far slower (docs/bitnerf.md)
            self.grid.update(self.fast, 1.0 if step < GRID_FULL_UNTIL else 0.25, generator=self.generator)

    def train_step(self):
        """One training step, graphed or eager; returns (MSE, regularisers, gradient norm) as tensors."""
        if self.graph is not None:
            self.graph.replay()
            mse, reg, grad_norm = self.graph_outputs
        else:
            self.optimizer.zero_grad(set_to_none=True)
            mse, reg, grad_norm = self.loss_and_grads()
        # the gradient norm is taken after DDP's all-reduce, so every rank makes the same decision
        bad = not torch.isfinite(grad_norm) and not self.scaler.is_enabled()
        if bad and self.cfg["NONFINITE"] == "stop":
            raise UserError(f"non-finite loss or gradient at step {self.state.step + 1}; the last good checkpoint is "
                            f"kept in {self.ckpt_path}; lower --lr, set --grad_clip, or --nonfinite=skip")
        if bad:  # (the graph's AdamW has skipped it already)
            print(f"notice: non-finite gradient at step {self.state.step + 1}; step skipped", file=sys.stderr)
        elif self.graph is None:
            self.scaler.step(self.optimizer)  # with fp16, a step whose gradients overflowed is skipped, scale lowered
        self.scaler.update()
        self.state.step += 1
        return mse, reg, grad_norm

    def add_time(self, seconds):
        """Count a step's seconds (under torchrun with a budget or EVAL_AT_S the slowest rank's, so that all stop or
        validate at one step)."""
        self.state.train_seconds += seconds
        if self.world > 1 and (self.cfg["TIME_BUDGET_S"] or self.marks):
            self.state.train_seconds = all_reduce([self.state.train_seconds], "max")[0]
        rays = self.cfg["BATCH_SIZE"] / seconds
        self.rays_per_s = rays if self.rays_per_s == 0 else 0.9 * self.rays_per_s + 0.1 * rays

    def log(self, lr, mse, reg, grad_norm):
        """Every LOG_EVERY steps (and the last): the photometric loss and PSNR, the regulariser apart, to the bar,
        the curve and W&B."""
        step = self.state.step
        self.bar.update(1)
        if not self.main_rank or (step % self.cfg["LOG_EVERY"] and not self.done()):
            return
        stats = {"train/loss": mse.item(), "train/psnr": -10 * math.log10(max(mse.item(), 1e-10)),
                 "train/opacity_reg": reg[0].item(), "train/distortion": reg[1].item(),
                 "train/grad_norm": grad_norm.item(), "train/lr": lr,
                 "train/rays_per_s": self.rays_per_s}
        self.state.curve.append({"step": step, "train_seconds": round(self.state.train_seconds, 2),
                                 "loss": stats["train/loss"], "opacity_reg": stats["train/opacity_reg"],
                                 "distortion": stats["train/distortion"]})
        self.bar.set_postfix(loss=f"{stats['train/loss']:.4f}", psnr=f"{stats['train/psnr']:.2f}",
                             rays_s=f"{self.rays_per_s:.0f}")
        if self.run:
            self.run.log(stats, step=step)

    def validate(self, n_views=None):
        """Score the validation views (the first n_views, or all), record it in the history; returns view 0."""
        scores, first = evaluate_views(self.fast, self.val_views, self.scene, self.cfg, self.grid, self.amp, n_views,
                                       rank=self.rank, world=self.world)
        self.record(scores)
        if self.run:
            self.run.log({"val/psnr": scores["psnr"], "val/ssim": scores["ssim"]}, step=self.state.step)
            log_images(self.run, self.state.step, first)
        return scores

    def record(self, scores):
        """Add a validation's scores to the history, tagged with the EVAL_AT_S marks training time has passed."""
        seconds = self.state.train_seconds
        passed = [m for m in self.marks if m <= seconds]
        self.marks = self.marks[len(passed):]
        self.state.history.append({"step": self.state.step, "train_seconds": round(seconds, 2),
                                   **{k: v for k, v in scores.items() if k != "per_view"},
                                   **({"at_s": passed} if passed else {})})

    def validate_if_due(self):
        """Every EVAL_EVERY steps on EVAL_VIEWS views, and on all once training time passes an EVAL_AT_S mark (not
        at the end: the final evaluation follows)."""
        if self.done():
            return
        if self.marks and self.state.train_seconds >= self.marks[0]:
            scores = self.validate()
        elif self.cfg["EVAL_EVERY"] and self.state.step % self.cfg["EVAL_EVERY"] == 0:
            scores = self.validate(self.cfg["EVAL_VIEWS"])
        else:
            return
        if self.main_rank:
            self.bar.write(f"step {self.state.step}: {score_name(self.scene)} PSNR {scores['psnr']:.2f} dB, "
                           f"SSIM {scores['ssim']:.3f} "
                           f"({scores['views']} views, {self.state.train_seconds:.0f} s)")

    def video_if_due(self):
        """Every VIDEO_EVERY steps (not the last: the final video follows), rank 0 renders video_stepN.mp4/gif."""
        step, every = self.state.step, self.cfg["VIDEO_EVERY"]
        if self.main_rank and every and self.cfg["VIDEO_FRAMES"] and step % every == 0 and not self.done():
            path = render_videos(self.fast, self.val_views, self.scene, self.cfg, self.grid, self.amp, self.out_dir,
                                 f"_step{step}")
            if self.run:
                import wandb

                self.run.log({"video": wandb.Video(path, format="mp4")}, step=step)

    def checkpoint(self):
        """Write ckpt.pt (rank 0): the tensors, as plain tensors (torchao's training weights do not load with
        weights_only=True), the config and the RunState."""
        if self.main_rank:
            save_checkpoint({"model": plain_state(self.model.state_dict()),
                             "optimizer": plain_state(self.optimizer.state_dict()), "scaler": self.scaler.state_dict(),
                             "generator": self.generator.get_state(),
                             "grid": self.grid.state_dict() if self.grid is not None else None, "config": self.cfg,
                             "scene": self.scene_record,
                             **asdict(self.state)}, self.ckpt_path)

    def checkpoint_if_due(self):
        """Every CKPT_EVERY steps (the last one is written after the loop)."""
        if self.state.step % self.cfg["CKPT_EVERY"] == 0 and not self.done():
            self.checkpoint()

    def interrupted(self, signum):
        """The Interrupted error for a run stopped by signum, after its checkpoint; closes the W&B run."""
        if self.run:
            self.run.finish(exit_code=128 + signum)
        return Interrupted(f"{signal.Signals(signum).name} at step {self.state.step}: checkpoint written to "
                           f"{self.ckpt_path}; rerun the same command to resume", 128 + signum)

    def metrics(self, scores, eval_seconds):
        """The final metrics dict (metrics.json) from the last validation's scores."""
        cfg, state = self.cfg, self.state
        per_s = state.step * cfg["BATCH_SIZE"] / max(state.train_seconds, 1e-9)
        return {"experiment": cfg["EXPERIMENT"], "data": cfg["DATA"], **protocol(self.scene, self.val_views),
                "space": self.scene.frame.space,
                "scored_on": scored_on(self.scene), "val_psnr": scores["psnr"],
                "val_ssim": scores["ssim"], "val_views": scores["views"], "steps": state.step,
                "train_seconds": round(state.train_seconds, 2), "compile_seconds": round(self.compile_seconds, 2),
                "eval_seconds": round(eval_seconds, 2), "rays_per_s": round(per_s, 1),
                "samples_per_s": round(per_s * (cfg["NUM_SAMPLES"] + cfg["NUM_FINE"]), 1),
                "peak_mem_mb": round(peak_memory_mb(self.device)), "device": str(self.device),
                "world_size": self.world, "history": state.history, "curve": state.curve}

    def finish(self):
        """Evaluate on every validation view; rank 0 then renders the video, exports a BitNeRF, writes
        metrics.json and closes W&B. Returns the metrics."""
        self.net = None  # a DDP module must be garbage-collected before destroy_process_group (see train)
        t0 = time.perf_counter()
        scores, first = evaluate_views(self.fast, self.val_views, self.scene, self.cfg, self.grid, self.amp,
                                       rank=self.rank, world=self.world)
        self.record(scores)
        metrics = self.metrics(scores, time.perf_counter() - t0)
        if not self.main_rank:
            return metrics
        print(f"final: {score_name(self.scene)} PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.3f} on "
              f"{scores['views']} views of "
              f"{self.cfg['DATA']} after {self.state.step} steps, {self.state.train_seconds:.0f} s", file=sys.stderr)
        if self.cfg["VIDEO_FRAMES"]:
            t0 = time.perf_counter()
            video = render_videos(self.fast, self.val_views, self.scene, self.cfg, self.grid, self.amp, self.out_dir)
            metrics["video_seconds"] = round(time.perf_counter() - t0, 2)
        if self.cfg["MODEL"] == "bitnerf":
            metrics.update(export_and_evaluate(self.model, self.cfg, self.val_views, self.scene, self.grid, self.amp,
                                               self.out_dir))
        write_json(metrics, os.path.join(self.out_dir, "metrics.json"))
        if self.run:
            import wandb

            if self.cfg["VIDEO_FRAMES"]:
                self.run.log({"video": wandb.Video(video, format="mp4")}, step=self.state.step)
            self.run.log({"val/psnr": scores["psnr"], "val/ssim": scores["ssim"]}, step=self.state.step)
            log_images(self.run, self.state.step, first)
            self.run.finish()
        return metrics


def fit(cfg, rank, world, device):
    """The training loop of one rank (rank 0 of 1 without torchrun); returns the final metrics dict."""
    trainer = Trainer(cfg, rank, world, device)
    try:
        with GracefulStop(not dist.is_initialized()) as stop:  # Ctrl-C: end the step, checkpoint, stop
            trainer.announce()
            while not trainer.done() and stop.signum is None:
                trainer.watch(lambda: stop.signum is not None)
                if stop.signum is not None:  # stopped while paused: no further step
                    break
                t0 = time.perf_counter()
                lr = trainer.scheduled_learning_rate()
                trainer.set_learning_rate(lr)
                trainer.update_grid()
                mse, reg, grad_norm = trainer.train_step()
                trainer.add_time(time.perf_counter() - t0)
                trainer.log(lr, mse, reg, grad_norm)
                trainer.validate_if_due()
                trainer.video_if_due()
                trainer.checkpoint_if_due()
    finally:
        trainer.close_viewer()
    trainer.bar.close()
    trainer.checkpoint()
    if stop.signum is not None:
        raise trainer.interrupted(stop.signum)
    return trainer.finish()


def train(cfg):
    """Train (or resume) the experiment a config describes, as one process or one torchrun rank; final metrics."""
    keep_freed_memory()
    rank, world, device = init_distributed(cfg, resolve_device(cfg["DEVICE"]))
    if not dist.is_initialized() and cfg["LAUNCH"] == "torchrun":
        print(f"notice: not started by torchrun, so {cfg['EXPERIMENT']} runs as one process (world size 1); "
              f"use torchrun --standalone --nproc_per_node=2 {cfg['EXPERIMENT']}.py", file=sys.stderr)
    try:
        return fit(cfg, rank, world, device)
    finally:
        if dist.is_initialized():
            gc.collect()  # the DDP module must be gone before the group, or gloo can abort at exit
            dist.destroy_process_group()


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
