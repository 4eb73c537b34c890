"""Run every experiment (presets, configs.VARIANTS) for one time budget; write media/results.md, curves, GIFs.

    python report.py [--budget_s=600] [--data=PATH [--downscale=N]] [--seeds=N] [--only=exp1,exp4] [--quick]
    python report.py --scenes=PATH[@K],PATH[@K],... [--only=exp7,exp7-bitnerf] [--budget_s=1200]
    python report.py --data=.../nerf_synthetic/lego --recipe=cpu800 --budget_s=3600 --only=exp7   (800 px, an hour)
    python report.py --scenes=... --only=exp7 --hash_log2_size=17   (any other --key=value: every experiment's config)

Each experiment trains from scratch in its own run directory (a preset with LAUNCH=torchrun under torchrun with
2 processes; on a GPU machine one per GPU, at most 2) and is evaluated on all the held-out views each time its
training time passes an eighth of the budget (the PSNR curve; a half under --quick) and at the end. With
--seeds=N each experiment trains N times (SEED 0 .. N-1): the table gives mean +- standard deviation, the curves
their spread. Once all have run, their 360-degree orbit and depth GIFs, the table and the curves are written to
the media directory.
A full report (every preset, not --quick, no config overrides) writes media/ and rewrites the README's results
block; --only, --quick, --scenes and overrides write theirs under the run directory instead. --quick (a few seconds
per experiment, a coarser occupancy grid) checks that the pipeline works. --scenes runs the report on each scene (a
data path, @K: its downscale) into OUT_DIR/SCENE (its results.md, curves and GIFs under MEDIA_DIR/SCENE), then
writes scenes.md: the field's table of PSNR and SSIM per scene and their mean, a BitNeRF export and its size on a
row of its own. Ctrl-C, SIGTERM or SIGHUP (a closed terminal) stops the running experiment at its checkpoint and
writes nothing to the media directory.
"""
import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time

import configs
from bench import SHARED_TINY, markdown, parse_scenes, quality_marks, scene_scores, scene_tables
from utils import atomic_write, write_text

ROOT = os.path.dirname(os.path.abspath(__file__))
EXPERIMENTS = (*configs.PRESETS, *configs.VARIANTS)
VIDEO_FRAMES = 60  # orbit frames rendered per experiment: half the default, to keep the GIFs in git small
# --quick: a pipeline check. A 32^3 occupancy grid: a BitNeRF export's grid, measured from the model, costs 8x less
QUICK = {"budget_s": 10.0, "video_frames": 4, "data": "synthetic", "curve_points": 2, "grid_res": 32}
# keys every experiment's command line sets from the report's own options (command()): not overridable (GRID_RES,
# which --quick sets, is: an override of it wins)
REPORT_KEYS = {"DATA", "DOWNSCALE", "RECIPE", "OUT_DIR", "TIME_BUDGET_S", "MAX_STEPS", "WANDB", "VIDEO_FRAMES",
               "EVAL_EVERY", "EVAL_AT_S", "SEED"}
CURVE_POINTS = 8  # validations on all views per run, at equal shares of the budget (the last one at its end)
README_BEGIN, README_END = "<!-- report:begin -->", "<!-- report:end -->"
COLUMNS = ["experiment", "precision", "bits/weight", "processes", "steps", "train s", "wall s", "samples/s",
           "peak mem MB", "checkpoint", "export", "val PSNR", "val SSIM"]


def precision(cfg):
    """What the experiment computes in: weights and autocast dtype."""
    weights = "ternary QAT" if cfg["MODEL"] == "bitnerf" else "fp32"
    if cfg["MODEL"] == "bitnerf" and cfg["ENCODING"] == "hash":
        weights += f", {cfg['HASH_TABLE_BITS']}-bit table"
    return weights if cfg["DTYPE"] == "float32" else f"{weights}, {cfg['DTYPE']} autocast"


def bits_per_weight(cfg):
    """Bits per hidden-layer weight of the model as saved for inference (and per hash-table entry, where it differs)."""
    if cfg["MODEL"] != "bitnerf":
        return "32"
    return f"1.58, table {cfg['HASH_TABLE_BITS']}" if cfg["ENCODING"] == "hash" else "1.58 (2 packed)"


def size_text(path):
    """A file's size in kB or MB, or '-' if there is none."""
    if not os.path.exists(path):
        return "-"
    size = os.path.getsize(path)
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


def ddp_processes():
    """Processes for exp5/exp6: 2; on a CUDA machine one per GPU, at most 2 (each nccl rank needs a GPU of its own)."""
    import torch

    return min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2


def time_marks(budget_s):
    """The training times (s) before the budget's end at which bench.py --quality reads PSNR on this machine's
    device (CPU: 2.5, 5, 10, 30 min; GPU: 15 s, 1, 5, 15 min): the table gives the PSNR there too."""
    import torch

    return quality_marks(torch.device("cuda" if torch.cuda.is_available() else "cpu"), budget_s)[:-1]


def columns(args):
    """The table's columns: COLUMNS with the PSNR at each of the time marks before the final one."""
    at = COLUMNS.index("val PSNR")
    return COLUMNS[:at] + [f"PSNR@{m:g}s" for m in time_marks(args.budget_s)] + COLUMNS[at:]


def eval_marks(budget_s, points=CURVE_POINTS):
    """The training times (s) of a run's all-view validations before its end: each 1/points of the budget (the
    curve) and the time marks."""
    return sorted({budget_s * k / points for k in range(1, points)} | {*time_marks(budget_s)})


def curve_points(args):
    """Validations per run on the PSNR curve: a --quick report checks the pipeline with 2, the real one draws 8."""
    return QUICK["curve_points"] if args.quick else CURVE_POINTS


def psnr_at(run, mark):
    """A run's PSNR on all validation views when its training time passed mark seconds (None if it never did)."""
    return next((h["psnr"] for h in run["history"] if mark in h.get("at_s", [])), None)


def run_dir_of(args, exp, seed):
    """Where one run of an experiment trains: OUT_DIR/exp, or OUT_DIR/exp/seedK with several seeds."""
    return os.path.join(args.out_dir, exp, *([f"seed{seed}"] if args.seeds > 1 else []))


def preset_and_flags(exp):
    """The preset whose script an experiment of the report runs, and the flags it adds (none for a preset)."""
    return configs.VARIANTS.get(exp, (exp, ()))


def experiment_config(exp, overrides=()):
    """The config an experiment of the report trains: its preset, with a variant's flags and then the report's
    (config_args) applied."""
    preset, flags = preset_and_flags(exp)
    return configs.apply_overrides(configs.PRESETS[preset], [*flags, *overrides])


def config_args(args):
    """What the report applies over every experiment's config: its --recipe, then the config overrides."""
    return [f"--recipe={args.recipe}"] * bool(args.recipe) + args.overrides


def command(exp, args, run_dir, seed=0):
    """The command line that trains one experiment (with its config's SEED plus seed) for the report."""
    preset, flags = preset_and_flags(exp)
    cfg = experiment_config(exp, config_args(args))
    script = os.path.join(ROOT, f"{preset}.py")  # run from the caller's directory: relative paths mean the same
    launch = [sys.executable, script]
    if cfg["LAUNCH"] == "torchrun":
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ddp_processes()}",
                  script]
    overrides = [f"--data={args.data}", f"--out_dir={run_dir}", f"--time_budget_s={args.budget_s}",
                 "--max_steps=1000000000", f"--wandb={args.wandb}",  # the budget, not MAX_STEPS, ends each run
                 f"--video_frames={QUICK['video_frames'] if args.quick else VIDEO_FRAMES}", "--eval_every=0",
                 "--eval_at_s=" + ",".join(f"{m:g}" for m in eval_marks(args.budget_s, curve_points(args))),
                 f"--seed={cfg['SEED'] + seed}"]
    if args.recipe:
        overrides.append(f"--recipe={args.recipe}")
    if args.downscale:
        overrides.append(f"--downscale={args.downscale}")
    if args.quick:
        overrides.append(f"--grid_res={QUICK['grid_res']}")
    return launch + list(flags) + overrides + args.overrides  # the user's last: they win over a variant's flags


class Stopped(Exception):
    """The report was asked to stop by SIGTERM or SIGHUP (a closed terminal); Ctrl-C is a KeyboardInterrupt."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_stopped(signum, frame):
    """The handler of SIGTERM and SIGHUP while experiments run: stop the way Ctrl-C does."""
    raise Stopped(signum)


def run_experiment(exp, args, run_dir, group, seed=0):
    """Train one experiment (its output goes to run_dir/log.txt); its metrics, or None if it failed."""
    os.makedirs(run_dir, exist_ok=True)
    cmd = command(exp, args, run_dir, seed)
    print(f"[{time.strftime('%H:%M:%S')}] {exp}: {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(os.path.join(run_dir, "log.txt"), "w") as log:
        # its own session: a Ctrl-C (or a closed terminal's SIGHUP) reaches report.py alone, which passes the child
        # exactly one SIGINT
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "WANDB_RUN_GROUP": group})
        try:
            code = proc.wait()
        except (KeyboardInterrupt, Stopped):
            proc.send_signal(signal.SIGINT)  # the run ends its step, checkpoints and exits
            proc.wait()
            raise
    wall = time.perf_counter() - t0
    metrics_path = os.path.join(run_dir, "metrics.json")
    if code or not os.path.exists(metrics_path):
        print(f"{exp} failed (exit code {code}); see {os.path.join(run_dir, 'log.txt')}", file=sys.stderr)
        return None
    with open(metrics_path) as f:
        metrics = json.load(f)
    print(f"  {metrics['steps']} steps, val PSNR {metrics['val_psnr']:.2f} dB, {wall:.0f} s", flush=True)
    return {**metrics, "wall_seconds": round(wall, 1)}


def spread(values, fmt):
    """One table cell: the value, or over several seeds their mean +- sample standard deviation."""
    import statistics

    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def table_row(exp, runs, run_dir, marks=(), overrides=()):
    """One row of the results table from the metrics of an experiment's runs (one per seed), with the PSNR at the
    given training times."""
    cfg = experiment_config(exp, overrides)
    cell = lambda key, fmt: spread([m[key] for m in runs], fmt)  # noqa: E731
    at = {m: [psnr_at(r, m) for r in runs] for m in marks}
    psnr = cell("val_psnr", "{:.2f}".format)
    if "export_psnr" in runs[0]:
        psnr += f" (export {cell('export_psnr', '{:.2f}'.format)})"
    return {"experiment": exp, "precision": precision(cfg), "bits/weight": bits_per_weight(cfg),
            "processes": runs[0]["world_size"], "steps": cell("steps", "{:.0f}".format),
            "train s": cell("train_seconds", "{:.0f}".format), "wall s": cell("wall_seconds", "{:.0f}".format),
            "samples/s": cell("samples_per_s", "{:,.0f}".format), "peak mem MB": cell("peak_mem_mb", "{:.0f}".format),
            "checkpoint": size_text(os.path.join(run_dir, "ckpt.pt")),
            "export": size_text(os.path.join(run_dir, "bitnerf_ternary.pt")), "val PSNR": psnr,
            **{f"PSNR@{m:g}s": "-" if None in v else spread(v, "{:.2f}".format) for m, v in at.items()},
            "val SSIM": cell("val_ssim", "{:.3f}".format)}


def loss_band(runs):
    """Training seconds and the min, mean and max training loss over runs, interpolated onto one time axis."""
    import numpy as np

    end = min(r["curve"][-1]["train_seconds"] for r in runs)
    x = np.linspace(0, end, 200)
    ys = np.stack([np.interp(x, [c["train_seconds"] for c in r["curve"]], [c["loss"] for c in r["curve"]])
                   for r in runs])
    return x, ys.min(0), ys.mean(0), ys.max(0)


def psnr_band(runs):
    """Training seconds of the all-view validations (EVAL_AT_S marks and the final one, which is last and has no
    mark) and the mean and standard deviation of their PSNR over runs."""
    import numpy as np

    points = [[(h["at_s"][0] if h.get("at_s") else h["train_seconds"], h["psnr"]) for h in r["history"]
               if h.get("at_s") or h is r["history"][-1]] for r in runs]
    n = min(map(len, points))
    ys = np.array([[p for _, p in pts[:n]] for pts in points])
    return [t for t, _ in points[0][:n]], ys.mean(0), ys.std(0, ddof=1) if len(runs) > 1 else np.zeros(n)


def plot_curves(results, path):
    """Training loss and validation PSNR against training seconds, one line per experiment (over seeds: the mean,
    with the loss's min-max and the PSNR's +- one standard deviation shaded), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, psnr_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for exp, runs in results.items():
        x, lo, mean, hi = loss_band([r for r in runs if r["curve"]])
        line, = loss_ax.plot(x, mean, label=exp)
        loss_ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.25, linewidth=0)
        t, mean, std = psnr_band(runs)
        psnr_ax.plot(t, mean, marker=".", color=line.get_color(), label=exp)
        psnr_ax.fill_between(t, mean - std, mean + std, color=line.get_color(), alpha=0.25, linewidth=0)
    loss_ax.set(xlabel="training seconds", ylabel="training loss (MSE, one batch)", yscale="log")
    psnr_ax.set(xlabel="training seconds", ylabel="validation PSNR (dB), all views")
    for ax in (loss_ax, psnr_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def machine():
    """One line naming the machine: GPU, or CPU model, cores and torch's CPU capability."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    return f"{model}, {os.cpu_count()} cores ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__} CPU"


def commit():
    """The short hash of the code's git commit, marked when the checkout has uncommitted changes; '?' without git."""
    run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    try:
        head = run("rev-parse", "--short", "HEAD")
        return f"{head} with uncommitted changes" if run("status", "--porcelain", "--untracked-files=no") else head
    except OSError:
        return "?"


def results_markdown(rows, results, args, argv, total_s, media="", gifs=True):
    """The text of results.md: how it was made, the table, the curves and the GIFs (linked under media); without
    gifs (the README's block) a link to results.md in their place."""
    first = next(iter(results.values()))[0]
    seeds = f"; each cell the mean ± sample standard deviation over {args.seeds} seeds" if args.seeds > 1 else ""
    lines = [f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Data: `{os.path.basename(args.data)}` at "
             f"{first['resolution']}, {first['background']} background, validation PSNR/SSIM on its held-out views "
             f"(never trained on){seeds}.",
             f"Command: `python report.py {shlex.join(argv)}`".rstrip() + f", code of commit {args.commit} — "
             f"{total_s / 60:.0f} min in all; "
             f"each experiment trained {args.budget_s:.0f} s from scratch (evaluation and videos not counted); "
             f"orbits of {QUICK['video_frames'] if args.quick else VIDEO_FRAMES} frames.",
             "", markdown(rows, columns(args)), "",
             "samples/s counts every sample on every ray (those the occupancy grid skips too); peak memory is the "
             "resident memory of the process (rank 0 under torchrun) on CPU, allocated memory on GPU. checkpoint: "
             "`ckpt.pt` (weights, optimizer, grid); export: a BitNeRF run's exported file.", "",
             f"![loss and PSNR curves]({media}curves.png)", "",
             "Curves: the training loss is rank 0's batch every LOG_EVERY steps; validation PSNR is on all held-out "
             f"views at every 1/{curve_points(args)} of the budget and at the PSNR@ times"
             + (", shaded: loss min-max and PSNR ± one standard deviation over seeds" if args.seeds > 1 else "")
             + ". PSNR@Ns: the PSNR on all validation views when training time passed N s.", ""]
    if not gifs:
        return "\n".join(lines) + f"\nEach experiment's orbit and depth GIFs: [{media}results.md]({media}results.md).\n"
    orbits = [f"**{exp}** ![{exp} orbit]({media}{exp}_rgb.gif) ![{exp} depth]({media}{exp}_depth.gif)"
              for exp in results]
    return "\n".join(lines) + "\n" + "\n\n".join(orbits) + "\n"


def update_readme(path, text):
    """Replace the README's block between the report markers with text (written through a temp file)."""
    with open(path) as f:
        readme = f.read()
    if README_BEGIN not in readme or README_END not in readme:
        raise configs.UserError(f"{path} has no {README_BEGIN} ... {README_END} block to fill; add one")
    head, rest = readme.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    write_text(f"{head}{README_BEGIN}\n{text}{README_END}{tail}", path)


def parse_args(argv):
    """Command-line options (and config overrides, checked); --quick fills in a short budget unless one is given."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)  # --seed is not --seeds
    p.add_argument("--budget_s", type=float, default=None, help="training seconds per experiment (default 600)")
    p.add_argument("--data", default=None, help="default: ../shared/data/lego_tiny.npz if present, else tiny_nerf "
                   "(downloaded); synthetic for --quick")
    p.add_argument("--downscale", type=int, default=None, help="a nerf_synthetic --data folder's image downscale "
                   "(1 = 800 px, 4 = 200 px; default: the presets')")
    p.add_argument("--recipe", default=None, choices=tuple(configs.RECIPES), help="a recipe over every preset, as "
                   "`expN.py --recipe` (e.g. cpu800: 800 px views); the report's budget and marks still apply")
    p.add_argument("--scenes", default=None, help="comma-separated data paths (PATH@K: downscale K): the report on "
                   "each, and scenes.md, a table of PSNR/SSIM per scene and their mean (in place of --data)")
    p.add_argument("--seeds", type=int, default=1, help="runs per experiment (SEED 0 .. N-1): mean +- std")
    p.add_argument("--only", default=",".join(EXPERIMENTS), help="comma-separated experiments to run")
    p.add_argument("--quick", action="store_true", help="a few seconds per experiment: checks the pipeline")
    p.add_argument("--out_dir", default=None, help="run directories go here (default out/report-DATE-TIME)")
    p.add_argument("--media_dir", default=None, help="results.md, curves and GIFs (default media for a full report, "
                   "else out_dir)")
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"),
                   help="README whose results block a full report rewrites")
    p.add_argument("--wandb", default="auto", choices=configs.CHOICES["WANDB"])
    p.epilog = "Any other --key=value (a configs.py key, as expN.py takes it) is applied to every experiment."
    args, args.overrides = p.parse_known_args(argv)
    args.budget_s = args.budget_s or (QUICK["budget_s"] if args.quick else 600.0)
    if not args.data:
        args.data = QUICK["data"] if args.quick else SHARED_TINY if os.path.exists(SHARED_TINY) else "auto"
    args.out_dir = args.out_dir or os.path.join("out", time.strftime("report-%Y%m%d-%H%M%S"))
    args.exps = args.only.split(",")
    if args.seeds < 1 or (args.downscale is not None and args.downscale < 1):
        raise configs.UserError(f"--seeds={args.seeds} --downscale={args.downscale}: both must be >= 1")
    args.scenes = parse_scenes(args.scenes) if args.scenes else None
    # a partial, multi-scene or overridden report must not replace the full one
    full = not (args.quick or args.scenes or args.overrides) and sorted(args.exps) == sorted(EXPERIMENTS)
    args.media_dir = args.media_dir or (os.path.join(ROOT, "media") if full else args.out_dir)
    args.readme = args.readme if full else None
    unknown = [e for e in args.exps if e not in EXPERIMENTS]
    if unknown:
        raise configs.UserError(f"--only={args.only}: unknown {', '.join(unknown)}; "
                                f"choose from {', '.join(EXPERIMENTS)}")
    check_overrides(args)
    for data in [path for _, path, _ in args.scenes] if args.scenes else [args.data]:
        named = data in ("auto", "tiny_nerf", "synthetic")
        if not data.endswith(".npz") and not named and not os.path.isdir(data):
            raise configs.UserError(f"--data={data}: no such file or folder; pass a .npz, a scene folder or tiny_nerf")
    return args


def check_overrides(args):
    """Refuse a config override the report sets itself, or one an experiment's config rejects, before any run."""
    own = [a for a in args.overrides if a.removeprefix("--").partition("=")[0].upper() in REPORT_KEYS]
    if own:
        raise configs.UserError(f"{own[0]}: the report sets it (use --data, --downscale, --recipe, --budget_s, "
                                "--seeds, --out_dir or --wandb)")
    for exp in args.exps:
        experiment_config(exp, config_args(args))


def scene_args(args, scene):
    """The report's arguments for one scene of --scenes: its data and downscale, its own run and media folders."""
    name, data, downscale = scene
    return argparse.Namespace(**{**vars(args), "data": data, "downscale": downscale or args.downscale, "scenes": None,
                                 "out_dir": os.path.join(args.out_dir, name),
                                 "media_dir": os.path.join(args.media_dir, name), "readme": None})


def mean_scores(runs):
    """The scene table's scores of an experiment's runs (one per seed): each the mean over the seeds."""
    scores = [scene_scores(m) for m in runs]
    return {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}


def report_scenes(args, argv):
    """The report on each scene of --scenes, then scenes.md with the per-scene table; returns whether all ran."""
    scores, complete = {}, True
    for scene in args.scenes:
        one, t0 = scene_args(args, scene), time.perf_counter()  # each scene's results.md: its own minutes
        os.makedirs(one.media_dir, exist_ok=True)
        results, rows = run_all(one, argv)
        complete &= len(results) == len(args.exps)
        if results:
            write_media(results, rows, one, argv, time.perf_counter() - t0)
            scores[scene[0]] = {exp: mean_scores(runs) for exp, runs in results.items()}
    if scores:
        first = next(iter(scores))
        head = (f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Command: `python report.py "
                f"{shlex.join(argv)}`, code of commit {args.commit}; each experiment trained {args.budget_s:.0f} s "
                f"per scene{f', mean over {args.seeds} seeds' if args.seeds > 1 else ''}. Scenes: "
                + ", ".join(f"`{n}` = `{p}`" + (f" at downscale {k}" if k else "") for n, p, k in args.scenes)
                + f". Each scene's table, curves and GIFs: its folder (e.g. [{first}/results.md]({first}/results.md)).")
        text = head + "\n\n" + scene_tables(scores)
        write_text(text, os.path.join(args.media_dir, "scenes.md"))
        print(text + f"wrote {os.path.join(args.media_dir, 'scenes.md')}")
    return complete


def run_all(args, argv):
    """Run the experiments (each once per seed) one after another; returns {exp: [metrics of each finished run]}
    and the table rows of the experiments whose runs all finished."""
    group, results, rows = os.path.basename(args.out_dir), {}, []
    for exp in args.exps:
        runs = []
        for seed in range(args.seeds):
            run_dir = run_dir_of(args, exp, seed)
            try:
                metrics = run_experiment(exp, args, run_dir, group, seed)
            except (KeyboardInterrupt, Stopped) as e:
                signum = getattr(e, "signum", signal.SIGINT)
                print(f"stopped: {'Ctrl-C' if signum == signal.SIGINT else e} during {exp}; its checkpoint is in "
                      f"{run_dir} (rerun its command to resume); nothing was written to {args.media_dir}",
                      file=sys.stderr)
                sys.exit(128 + signum)
            runs += [metrics] if metrics is not None else []
        if len(runs) == args.seeds:
            results[exp] = runs
            rows.append(table_row(exp, runs, run_dir, time_marks(args.budget_s), config_args(args)))
    return results, rows


def write_media(results, rows, args, argv, total_s):
    """The GIFs, curves and results.md (and the README block of a full report), each written atomically."""
    for exp in results:
        for name, suffix in (("video", "rgb"), ("depth", "depth")):
            src = os.path.join(run_dir_of(args, exp, 0), f"{name}.gif")
            if os.path.exists(src):
                atomic_write(os.path.join(args.media_dir, f"{exp}_{suffix}.gif"),
                             lambda tmp, src=src: shutil.copyfile(src, tmp))
    plot_curves(results, os.path.join(args.media_dir, "curves.png"))
    write_text(results_markdown(rows, results, args, argv, total_s), os.path.join(args.media_dir, "results.md"))
    print(markdown(rows, columns(args)))
    print(f"wrote {os.path.join(args.media_dir, 'results.md')}")
    if args.readme:
        media = os.path.relpath(args.media_dir, os.path.dirname(os.path.abspath(args.readme)))
        update_readme(args.readme, results_markdown(rows, results, args, argv, total_s, media + "/", gifs=False))


def main(argv=None):
    """Run the experiments, then write the table, curves, GIFs (and the README block for a full report)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        os.makedirs(args.media_dir, exist_ok=True)
        args.commit = commit()  # the code the runs train with, read before the report writes media/ and the README
    except (configs.UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    t0 = time.perf_counter()
    handlers = {s: signal.signal(s, raise_stopped) for s in (signal.SIGTERM, signal.SIGHUP)}
    if args.scenes:
        sys.exit(0 if report_scenes(args, argv) else 1)
    results, rows = run_all(args, argv)
    for s, handler in handlers.items():  # writing the media is atomic, file by file: the default stop will do
        signal.signal(s, handler)
    if results:
        try:
            write_media(results, rows, args, argv, time.perf_counter() - t0)
        except configs.UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    if len(results) < len(args.exps):
        sys.exit(1)


if __name__ == "__main__":
    main()
