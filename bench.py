"""Benchmark the experiments on this machine and print markdown tables.

Speed (default): per experiment, the MLP training step's GFLOP/s against this machine's torch.mm peak
(a square mm of the same dtype, timed between the step's reps), on a whole step's samples (as before the
occupancy grid culls) and on the ~4k a culled step sends (columns "culled"); the forward pass's inference
samples/s (and the ternary export's, for BitNeRF); and real training throughput (rays/s, samples/s) and
peak memory over --steps steps of the training loop on lego_tiny.
    python bench.py [--exps=exp1,exp2,exp3,exp4] [--steps=150] [--compile=both|on|off|preset] [--data=PATH]
Any other --key=value is a config override applied to every experiment (e.g. --batch_size=8192 --dtype=bfloat16).
Time to quality (--quality): train each experiment for --budget_s seconds (default 10 min on a CPU, 15 on a
GPU) and print the PSNR on all validation views when training time passes 2.5 / 5 / 10 / 30 minutes (CPU) or
15 s / 1 / 5 / 15 minutes (GPU), the share of the ray samples that reached the MLP's gradient pass (the rest the
grid culled or, with SKIP_ZERO_DENSITY, had zero density), and the MLP FLOPs of the whole run (gradient passes,
no-grad passes and grid updates) per second of training against the same dtype's torch.mm peak (the higher of
one timed before and one after training).
    python bench.py --quality [--budget_s=600] [--exps=exp1] [--data=.../nerf_synthetic/lego --downscale=4]
    python bench.py --quality --exps=exp7 --data=.../nerf_synthetic/lego --recipe=cpu800 --budget_s=3600  (800 px)
Several scenes (--scenes, quality mode): each experiment on each scene (a data path, @K for its downscale), then
the field's table: PSNR and SSIM per scene and their mean (a BitNeRF run's export with its size on its own row).
    python bench.py --quality --exps=exp7 --scenes=.../chair_tiny.npz,.../hotdog_tiny.npz,.../nerf_llff_data/fern@8
Each experiment runs in its own process so that its peak memory is its own.
Where a training step goes (--profile, on a CPU): per experiment, the median step without the profiler, then the
median step under torch.profiler (--steps each) and its milliseconds in the hash table's lookup forward (gather)
and backward (scatter), the MLP's matrix products and AdamW; the rest is every other op (sampling, hashing,
compositing, clipping), Python and the profiler's own cost. The occupancy grid's update, one in GRID_EVERY steps,
is timed apart; beside this machine's memory bandwidth (STREAM's copy and triad in torch), the rates the lookup
and AdamW reach on the bytes one pass must move.
    python bench.py --profile --exps=exp7 --data=.../nerf_synthetic/lego --recipe=cpu800 [--steps=20] [--warm_steps=300]
The all-reduce's share of a DDP step (--ddp, under torchrun): per experiment, the median forward + backward of
the model through DDP on each rank's share of a step's points (as before and after the grid culls), with the
gradient all-reduce and without it (no_sync), and the all-reduce of the gradient alone.
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 bench.py --ddp [--exps=exp5,exp7]
"""
import argparse
import atexit
import contextlib
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import configs

# about the points a trained exp1 step sends to the MLP once the occupancy grid has culled (docs/performance.md);
# rendering's model calls (one per block of 8 samples on 4,096 rays, after the grid) are of that size or smaller
CULLED_POINTS = 4096
QUALITY_MARKS_S = {"cpu": (150, 300, 600, 1800), "cuda": (15, 60, 300, 900)}  # where time-to-quality reads the PSNR
SHARED_TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "lego_tiny.npz")


def mm_sizes(device):
    """Square sizes the torch.mm peak is timed at."""
    if device.type == "cuda":  # a GPU needs large products to reach its peak (2048^3 is launch-bound there)
        return (4096, 8192)
    return (1024, 2048)


def square_mm_timer(n, dtype, device):
    """A function timing one n x n torch.mm in dtype, in seconds (operands made once).

    b is multiplied transposed, as F.linear does: on a CPU without oneDNN's bf16 kernels torch's fallback bf16
    GEMM runs far faster that way than as a @ b, while fp32 runs both layouts alike (docs/performance.md).
    """
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def timed():
        sync(device)
        t0 = time.perf_counter()
        a @ b.t()
        sync(device)
        return time.perf_counter() - t0
    return timed


def mm_peak_gflops(dtype, device, reps=5):
    """Best median GFLOP/s of square torch.mm over a few sizes: this machine's reference peak."""
    best = 0.0
    for n in mm_sizes(device):
        timed = square_mm_timer(n, dtype, device)
        times = [timed() for _ in range(reps + 1)]
        best = max(best, 2 * n ** 3 / warm_median(times, 1) / 1e9)
    return best


def warm_median(times, warmup):
    """The median of timings after the first `warmup` of them (warm-up, compilation)."""
    return statistics.median(times[warmup:])


def sync(device):
    """Wait for queued GPU work so timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def mlp_flops_per_point(model, backward=True):
    """Useful FLOPs per sample point: forward, weight and input gradient of every Linear, without the input
    gradient of the encoded input (first and skip layers: it needs none) or the padding columns; with
    backward=False those of the forward pass alone."""
    from nerf import encoded_dim

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not hasattr(model, "skips"):  # a HashNeRF: every Linear needs its input gradient (the table learns)
        forward = sum(2 * m.in_features * m.out_features for m in linears)
        return 3 * forward if backward else forward
    reading = linears[0].out_features * (1 + len(model.skips))  # outputs of the layers that read the encoding
    pad = model.in_dim - encoded_dim(model.pos_encode_dims)  # zero columns: computed (forward, weight grad), no use
    forward = sum(2 * m.in_features * m.out_features for m in linears) - 2 * pad * reading
    if not backward:
        return forward
    return 3 * forward - 2 * model.in_dim * reading + 2 * pad * reading  # pad: forward and weight grad only


def mlp_step_gflops(cfg, device, points, reps=5):
    """Median GFLOP/s of one forward + backward of the MLP on `points` random points, and of a square torch.mm
    in the step's dtype timed between its reps: the peak it is held against, under the same load (on a shared
    machine a peak taken minutes apart can differ by 2x)."""
    import train

    model = train.build_model(cfg, device)
    net = torch.compile(model) if cfg["COMPILE"] else model
    amp = train.autocast_context(cfg, device)
    pts = torch.rand(points, 3, device=device) * 2 - 1
    dirs = pts if cfg["USE_VIEWDIRS"] else None
    dtype = torch.float32 if cfg["DTYPE"] == "float32" else torch.bfloat16  # fp16 peak ~ bf16 peak on GPUs
    n = mm_sizes(device)[-1]
    timed_mm = square_mm_timer(n, dtype, device)
    times, mm_times = [], []
    for _ in range(reps + 2):  # the first two warm up (and compile)
        sync(device)
        t0 = time.perf_counter()
        with amp:
            rgb, sigma = net(pts, dirs)
        (rgb.float().sum() + sigma.float().sum()).backward()
        sync(device)
        times.append(time.perf_counter() - t0), mm_times.append(timed_mm())
    mlp = mlp_flops_per_point(model) * len(pts) / warm_median(times, 2) / 1e9
    return mlp, 2 * n ** 3 / warm_median(mm_times, 2) / 1e9


def count_mlp_points():
    """From now on, count the points training sends to the MLP, with and without gradients; returns the counts.

    Counted where every model call of the loop goes (render.query_points, OccupancyGrid.update) in training mode:
    validation and videos (eval mode) and the export's grid rebuild after training are not training time.
    """
    import render
    import train

    counts = {"grad": 0, "no_grad": 0, "training": True}
    query, update, export = render.query_points, render.OccupancyGrid.update, train.export_and_evaluate

    def counted_query(model, points, dirs):
        if counts["training"] and model.training:
            counts["grad" if torch.is_grad_enabled() else "no_grad"] += len(points)
        return query(model, points, dirs)

    def counted_update(*args, **kwargs):
        measured = update(*args, **kwargs)
        counts["no_grad"] += measured if counts["training"] else 0
        return measured

    def export_after_training(*args, **kwargs):
        counts["training"] = False
        return export(*args, **kwargs)

    render.query_points, render.OccupancyGrid.update, train.export_and_evaluate = (counted_query, counted_update,
                                                                                   export_after_training)
    return counts


@torch.no_grad()
def inference_samples_per_s(model, cfg, device, reps=5):
    """Median points per second of the model's forward pass alone, in calls of CULLED_POINTS as when rendering."""
    import train

    amp = train.autocast_context(cfg, device)
    pts = torch.rand(cfg["BATCH_SIZE"] * cfg["NUM_SAMPLES"], 3, device=device) * 2 - 1
    times = []
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        with amp:
            for p in pts.split(CULLED_POINTS):
                model(p, p if cfg["USE_VIEWDIRS"] else None)
        sync(device)
        times.append(time.perf_counter() - t0)
    return len(pts) / warm_median(times, 1)


# --profile: the parts of a step, by the profiler's names (scopes: their total time; aten ops: their own time)
PROFILE_PARTS = {"hash lookup": ("HashLookup",), "hash lookup backward": ("HashLookupBackward",),
                 "MLP products": ("aten::addmm", "aten::mm"), "AdamW": ("Optimizer.step#AdamW.step",)}


def timed_steps(step, steps):
    """The median seconds of `steps` calls of step()."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def stream_gb_per_s(n=1 << 26, reps=7):
    """This machine's memory bandwidth in GB/s (medians): STREAM's copy (a = b) and triad (a = b + 3 c) on n float32
    values, far beyond the caches."""
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    return {"copy": round(8 * n / timed_steps(lambda: a.copy_(b), reps) / 1e9, 1),
            "triad": round(12 * n / timed_steps(lambda: torch.add(b, c, alpha=3.0, out=a), reps) / 1e9, 1)}


def part_ms(events, names, steps):
    """Milliseconds per step the profiler found in the named events (a scope: its total; an aten op: its own time),
    or None where none ran (a compiled model's fused code has no HashLookup)."""
    found = [events[n] for n in names if n in events]
    if not found:
        return None
    return round(sum(e.self_cpu_time_total if e.key.startswith("aten::") else e.cpu_time_total for e in found)
                 / 1e3 / steps, 2)


def profile_row(cfg, device, steps, warm_steps):
    """--profile's measurements of one experiment (see the module's docstring) after warm_steps of training (with
    the grid's updates, so that it culls as in a run), as a dict of columns."""
    from torch.profiler import ProfilerActivity, profile

    import train

    # one thread a step: the profiler records the calling thread's ops only
    trainer = train.Trainer({**cfg, "TRAIN_THREADS": 1}, 0, 1, device)
    trainer.set_learning_rate(cfg["LR"])
    for _ in range(warm_steps):
        trainer.update_grid()
        trainer.train_step()
    counts = count_mlp_points()
    step_s = timed_steps(trainer.train_step, steps)
    points = (counts["grad"] + counts["no_grad"]) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled_ms = 1e3 * timed_steps(trainer.train_step, steps)
    events = {e.key: e for e in prof.key_averages()}
    row = {"step ms": round(1e3 * step_s, 1), "profiled step ms": round(profiled_ms, 1), "points/step": round(points)}
    for part, names in PROFILE_PARTS.items():
        row[f"{part} ms"] = part_ms(events, names, steps)
    row["rest ms"] = round(profiled_ms - sum(row[f"{p} ms"] or 0 for p in PROFILE_PARTS), 1)
    if trainer.grid is not None:
        fraction = 1.0 if trainer.state.step < train.GRID_FULL_UNTIL else 0.25  # as the loop's update at this step
        grid_s = timed_steps(lambda: trainer.grid.update(trainer.fast, fraction, generator=trainer.generator), 3)
        row["grid update ms/step"] = round(1e3 * grid_s / train.GRID_EVERY, 1)
    table = [p for n, p in trainer.model.named_parameters() if n.endswith("encoding.table")]
    if table and row["hash lookup ms"] and row["AdamW ms"]:
        # rates on the bytes one pass must move (the implementations make more passes: docs/fullres.md): the lookup
        # reads per corner and level a row index, a weight and the features; AdamW reads parameter, gradient and
        # both moments and writes three of them back
        enc = trainer.model.encoding
        row["lookup GB/s"] = round(points * 8 * len(enc.resolutions) * (8 + 4 + 4 * enc.features)
                                   / row["hash lookup ms"] / 1e6, 1)
        row["AdamW GB/s"] = round(28 * sum(p.numel() for p in trainer.model.parameters()) / row["AdamW ms"] / 1e6, 1)
        row["table MB"] = round(4 * table[0].numel() / 1e6, 1)
    return row


def bench_config(exp, args, overrides):
    """The experiment's preset with the overrides and the benchmark's own settings applied."""
    preset = configs.apply_overrides(getattr(configs, exp.upper()), overrides)
    out_dir = tempfile.mkdtemp(prefix=f"bench_{exp}_")
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)  # the run's checkpoint: not left behind in /tmp
    return {**preset, "DATA": args.data, "WANDB": "disabled", "VIDEO_FRAMES": 0,
            "COMPILE": {"on": True, "off": False}.get(args.compile, preset["COMPILE"]), "OUT_DIR": out_dir}


def run_child(args, overrides):
    """Measure one experiment in this process and print one JSON line."""
    import train
    import utils

    utils.keep_freed_memory()  # as training does: the MLP step is measured under the same allocator
    cfg = bench_config(args.child, args, overrides)
    device = train.resolve_device(cfg["DEVICE"])
    row = {"exp": args.child, "dtype": cfg["DTYPE"], "compile": cfg["COMPILE"], "batch": cfg["BATCH_SIZE"],
           "samples_per_ray": cfg["NUM_SAMPLES"] + cfg["NUM_FINE"], "device": str(device)}
    if args.profile:
        cfg.update(MAX_STEPS=10 ** 9, EVAL_EVERY=0, CKPT_EVERY=10 ** 9)
        row.update(profile_row(cfg, device, args.steps, args.warm_steps))
    elif args.quality:
        marks = quality_marks(device, args.budget_s)
        cfg.update(TIME_BUDGET_S=float(args.budget_s), MAX_STEPS=10 ** 9, EVAL_EVERY=0,
                   EVAL_AT_S=",".join(map(str, marks)))
        dtype = torch.float32 if cfg["DTYPE"] == "float32" else torch.bfloat16
        peak = mm_peak_gflops(dtype, device)
        counts = count_mlp_points()
        metrics = train.train(cfg)
        peak = max(peak, mm_peak_gflops(dtype, device))  # the higher of the peaks before and after: a fair reference
        for mark in marks:
            seen = [h["psnr"] for h in metrics["history"] if mark in h.get("at_s", [])]
            row[f"psnr@{mark:g}s"] = round(seen[0], 2) if seen else None
        with open(os.path.join(cfg["OUT_DIR"], "config.json")) as f:  # as trained: the config the run resolved
            model = train.build_model(json.load(f), device)
        mlp = (counts["grad"] * mlp_flops_per_point(model) + counts["no_grad"] * mlp_flops_per_point(model, False)) \
            / metrics["train_seconds"] / 1e9
        samples = metrics["steps"] * cfg["BATCH_SIZE"] * (cfg["NUM_SAMPLES"] + cfg["NUM_FINE"])
        row.update(resolution=metrics["resolution"], background=metrics["background"], steps=metrics["steps"],
                   ssim=round(metrics["val_ssim"], 3), samples_per_s=metrics["samples_per_s"],
                   scores=scene_scores(metrics),
                   **{"% of samples trained": round(100 * counts["grad"] / samples, 1), "mlp_gflops": round(mlp, 1),
                      "mm_peak_gflops": round(peak), "% of mm peak": round(100 * mlp / peak, 1)})
    else:
        cfg.update(MAX_STEPS=args.steps, EVAL_EVERY=0, CKPT_EVERY=10 ** 9)
        model_cfg = train.data_config(cfg)  # the model training builds: its table's size is the data's
        whole = cfg["BATCH_SIZE"] * (cfg["NUM_SAMPLES"] + cfg["NUM_FINE"])
        for key, points in (("", whole), (" culled", CULLED_POINTS)):
            mlp, peak = mlp_step_gflops(model_cfg, device, points)
            row.update({f"mlp_gflops{key}": round(mlp, 1), f"mm_peak_gflops{key}": round(peak),
                        f"% of mm peak{key}": round(100 * mlp / peak, 1)})
        model = train.build_model(model_cfg, device).eval()
        row["infer_samples_per_s"] = round(inference_samples_per_s(model, cfg, device))
        if cfg["MODEL"] == "bitnerf":  # and the exported ternary model, as eval.py runs it
            from bitnerf import export_ternary, load_ternary
            exported = load_ternary(export_ternary(model, {}), model_cfg).to(device)
            row["export_infer_samples_per_s"] = round(inference_samples_per_s(exported, cfg, device))
        metrics = train.train(cfg)
        row.update(rays_per_s=metrics["rays_per_s"], samples_per_s=metrics["samples_per_s"])
    row["peak_mem_mb"] = round(utils.peak_memory_mb(device))
    print("BENCH " + json.dumps(row), flush=True)


def ddp_step_ms(ddp, pts, dirs, amp, device, reps):
    """Median ms of a DDP forward + backward on pts with the gradient all-reduce, and of one under no_sync."""
    synced, local = [], []
    for _ in range(reps + 2):  # the first two warm up (and compile); the two kinds alternate, sharing the noise
        for times, context in ((synced, contextlib.nullcontext()), (local, ddp.no_sync())):
            sync(device)
            t0 = time.perf_counter()
            with context, amp:
                rgb, sigma = ddp(pts, dirs)
                (rgb.float().sum() + sigma.float().sum()).backward()
            sync(device)
            times.append(1e3 * (time.perf_counter() - t0))
    return [warm_median(ts, 2) for ts in (synced, local)]


def allreduce_ms(numel, device, reps):
    """Median ms of all-reducing numel fp32 values across the ranks."""
    import torch.distributed as dist

    flat, times = torch.zeros(numel, device=device), []
    for _ in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return warm_median(times, 1)


def run_ddp(args, overrides, reps=9):
    """Under torchrun: the all-reduce's share of each experiment's DDP step; rank 0 prints the table."""
    import torch.distributed as dist

    import train

    cfgs = [train.data_config(bench_config(exp, args, overrides)) for exp in args.exps.split(",")]  # the data's table
    rank, world, device = train.init_distributed(cfgs[0], train.resolve_device(cfgs[0]["DEVICE"]))
    rows = []
    for cfg in cfgs:
        model, amp = train.build_model(cfg, device), train.autocast_context(cfg, device)
        net, _ = train.compile_model(cfg, model, device, amp)
        ddp = train.wrap_ddp(cfg, net, device)
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        reduce_ms = allreduce_ms(numel, device, reps)
        whole = cfg["BATCH_SIZE"] * (cfg["NUM_SAMPLES"] + cfg["NUM_FINE"])
        for key, points in (("whole", whole), ("culled", CULLED_POINTS)):
            pts = torch.rand(points // world, 3, device=device) * 2 - 1
            synced, local = ddp_step_ms(ddp, pts, pts if cfg["USE_VIEWDIRS"] else None, amp, device, reps)
            rows.append({"exp": cfg["EXPERIMENT"], "encoding": cfg["ENCODING"], "model": cfg["MODEL"],
                         "step points": key, "points per rank": len(pts), "gradient MB": round(4 * numel / 2 ** 20, 2),
                         "step ms": round(synced, 1), "step ms without all-reduce": round(local, 1),
                         "% of step all-reduce": round(100 * (synced - local) / synced, 1),
                         "all-reduce alone ms": round(reduce_ms, 1)})
        del ddp
    gc.collect()  # the DDP modules must be gone before the group, or gloo can abort at exit (as train.train)
    if rank == 0:
        print(f"# DDP, {world} processes, backend {dist.get_backend()}, {os.cpu_count()}-core CPU, "
              f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, OMP_NUM_THREADS "
              f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, device {device}")
        print(markdown(rows, list(rows[0])))
    dist.destroy_process_group()


def run_children(args, overrides, scene, exp, comp):
    """Measure one experiment (one compile setting) on one scene in a child process; its row, or none if it failed."""
    name, data, downscale = scene
    cmd = [sys.executable, __file__, f"--child={exp}", f"--compile={comp}", f"--data={data}", f"--steps={args.steps}",
           f"--warm_steps={args.warm_steps}",
           f"--budget_s={args.budget_s}", *([f"--downscale={downscale}"] if downscale else []), *overrides]
    mode = ["--quality"] if args.quality else ["--profile"] if args.profile else []
    out = subprocess.run(cmd + mode, capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")]
    if out.returncode or not line:
        print(f"{exp} (compile {comp}{f', {name}' if name else ''}) failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return []
    row = {**({"scene": name} if name else {}), **json.loads(line[-1][6:])}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return [row]


def quality_marks(device, budget_s):
    """The training times (s) time-to-quality reads PSNR at on this device, within the budget (which ends one)."""
    return [m for m in QUALITY_MARKS_S[device.type] if m < budget_s] + [budget_s]


def parse_scenes(text):
    """--scenes: comma-separated data paths, each with an optional @K (its --downscale); [(name, path, K or None)],
    named by the path's last part (without .npz) and numbered where two share a name."""
    scenes = []
    for item in text.split(","):
        path, _, factor = item.partition("@")
        if not path or (factor and (not factor.isdigit() or int(factor) < 1)):
            raise configs.UserError(f"--scenes: {item!r} is not PATH or PATH@K (K, the downscale, >= 1)")
        name = os.path.basename(os.path.normpath(path)).removesuffix(".npz")
        taken = {n for n, _, _ in scenes}
        name = next(f"{name}{k or ''}" for k in range(len(scenes) + 1) if f"{name}{k or ''}" not in taken)
        scenes.append((name, path, int(factor) if factor else None))
    return scenes


def scene_scores(metrics):
    """What the scene table shows of one run's metrics: PSNR, SSIM and, for a BitNeRF run, its export's and size."""
    scores = {"psnr": metrics["val_psnr"], "ssim": metrics["val_ssim"]}
    if "export_psnr" in metrics:
        scores.update(export_psnr=metrics["export_psnr"], export_ssim=metrics["export_ssim"],
                      export_kb=metrics["export_bytes"] / 1e3)
    return scores


def scene_tables(scores):
    """The field's tables from {scene: {experiment: scene_scores}}: PSNR (dB) and SSIM, a row per experiment (a
    BitNeRF export on its own, with its size), a column per scene and their mean (over all of them, or '-')."""
    scenes = list(scores)
    exps = list(dict.fromkeys(e for by_exp in scores.values() for e in by_exp))
    text = []
    for metric, title, fmt in (("psnr", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.3f}")):
        rows = []
        for exp, key, label in [(e, k, n) for e in exps for k, n in ((metric, e), (f"export_{metric}", f"{e} export"))]:
            cells = {s: scores[s][exp] for s in scenes if key in scores[s].get(exp, {})}
            if cells:
                size = (lambda c: f" ({c['export_kb']:.0f} kB)") if key == "export_psnr" else (lambda c: "")
                full = len(cells) == len(scenes)
                rows.append({"experiment": label, **{s: fmt.format(c[key]) + size(c) for s, c in cells.items()},
                             "mean": fmt.format(statistics.mean(c[key] for c in cells.values())) if full else "-"})
        text += [f"{title} on each scene's held-out views:", "", markdown(rows, ["experiment", *scenes, "mean"]), ""]
    return "\n".join(text)


def markdown(rows, cols):
    """A markdown table of the given columns."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main():
    """Run each experiment in a child process and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--exps", default="exp1,exp2,exp3,exp4")
    p.add_argument("--data", default=SHARED_TINY if os.path.exists(SHARED_TINY) else "tiny_nerf")
    p.add_argument("--steps", type=int, default=150, help="training steps timed per experiment")
    p.add_argument("--compile", default="both", choices=("both", "on", "off", "preset"),
                   help="both: each experiment eager and compiled (speed mode; quality mode takes the preset's)")
    p.add_argument("--quality", action="store_true", help="time-to-quality mode")
    p.add_argument("--budget_s", type=float, default=None, help="quality mode: seconds of training (default 600 on "
                   "a CPU, 900 on a GPU)")
    p.add_argument("--scenes", default=None, help="quality mode: comma-separated data paths (PATH@K: downscale K) to "
                   "run each experiment on, and a table of PSNR/SSIM per scene and their mean")
    p.add_argument("--ddp", action="store_true", help="under torchrun: the all-reduce's share of a DDP step")
    p.add_argument("--profile", action="store_true", help="where a training step goes, and the memory bandwidth")
    p.add_argument("--warm_steps", type=int, default=300, help="profile mode: steps trained first (grid updates "
                   "included), so that the grid culls as in a run")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args()
    if args.child:
        return run_child(args, overrides)
    try:
        scenes = parse_scenes(args.scenes) if args.scenes else [(None, args.data, None)]
    except configs.UserError as e:
        p.error(str(e))
    if args.profile and (args.quality or args.ddp):
        p.error("--profile is a mode of its own: drop --quality / --ddp")
    if args.profile and torch.cuda.is_available() and "--device=cpu" not in overrides:
        p.error("--profile splits a CPU step (the profiler's CPU activity); on a GPU machine add --device=cpu")
    if args.scenes and not args.quality:
        p.error("--scenes is for --quality (time to quality per scene); the speed mode takes one --data")
    for exp in args.exps.split(","):  # bad names and overrides stop here, before any child starts
        if not hasattr(configs, exp.upper()) or not exp.startswith("exp"):
            p.error(f"--exps: unknown experiment {exp!r}; use names like exp1,exp3")
        try:
            configs.apply_overrides(getattr(configs, exp.upper()), overrides)
        except configs.ConfigError as e:
            p.error(str(e))
    if args.ddp:
        if "RANK" not in os.environ:
            p.error("--ddp runs under torchrun: OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 bench.py "
                    "--ddp")
        return run_ddp(args, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.budget_s = args.budget_s or QUALITY_MARKS_S[device.type][-1]
    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else f"{os.cpu_count()}-core CPU ({torch.backends.cpu.get_cpu_capability()})")
    data = args.scenes or os.path.basename(args.data)
    print(f"# {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, data {data}")
    if args.profile:
        print(f"memory bandwidth (STREAM in torch, GB/s): {stream_gb_per_s()}")
    elif not args.quality:
        peaks = {dt: mm_peak_gflops(getattr(torch, dt), device) for dt in ("float32", "bfloat16")}
        print(f"torch.mm peak: fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s")
    if args.compile == "both":
        compiles = ("preset",) if args.quality or args.profile else ("off", "on")
    else:
        compiles = (args.compile,)
    rows = [row for scene in scenes for exp in args.exps.split(",") for comp in compiles
            for row in run_children(args, overrides, scene, exp, comp)]
    if args.profile:
        print(markdown(rows, ["exp", "compile", "batch", "samples_per_ray", "step ms", "profiled step ms",
                              "points/step", *[f"{p} ms" for p in PROFILE_PARTS], "rest ms", "grid update ms/step",
                              "table MB", "lookup GB/s", "AdamW GB/s", "peak_mem_mb"]))
    elif args.quality:
        marks = [f"psnr@{m:g}s" for m in quality_marks(device, args.budget_s)]
        print(markdown(rows, ["scene"] * bool(args.scenes) + ["exp", "resolution", "background", "dtype", "batch",
                                                               "samples_per_ray", *marks, "ssim", "steps",
                              "samples_per_s",
                              "% of samples trained", "mlp_gflops", "mm_peak_gflops", "% of mm peak", "peak_mem_mb"]))
        if args.scenes:
            scores = {}
            for row in rows:
                scores.setdefault(row["scene"], {})[row["exp"]] = row["scores"]
            print("\n" + scene_tables(scores))
    else:
        print(markdown(rows, ["exp", "dtype", "compile", "batch", "samples_per_ray", "rays_per_s", "samples_per_s",
                              "mlp_gflops", "mm_peak_gflops", "% of mm peak", "mlp_gflops culled",
                              "mm_peak_gflops culled", "% of mm peak culled", "infer_samples_per_s",
                              "export_infer_samples_per_s", "peak_mem_mb"]))


if __name__ == "__main__":
    main()
