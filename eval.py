"""Render every view of a split and print one JSON line of metrics, naming the protocol they were measured under.

    python eval.py RUN_DIR_OR_CKPT_OR_EXPORT [--data=PATH] [--split=auto|all|train|val|test] [--per_view]
By default it scores a nerf_synthetic folder's test split (else val), a run's own .npz or synthetic data on its
validation split, a .npz passed with --data on all its views; at the run's resolution (DOWNSCALE) and background,
reading only the split scored. PSNR is per view, then
averaged; SSIM is torchmetrics' structural_similarity_index_measure with its defaults (Gaussian 11x11 window,
sigma 1.5, data range 1, on images in [0, 1]): the field's usual SSIM. LPIPS is not computed.
"""
import argparse
import json
import os
import sys
import time

import torch

from bitnerf import EXPORT_FORMAT, load_ternary
from configs import UserError
from dataset import folder_splits, protocol, scene_of, scored_on
from render import Frame, build_grid, evaluate_views, rebuild_grid
from train import autocast_context, build_model, resolve_device
from utils import checkpoint_path, keep_freed_memory, load_checkpoint, load_weights


def default_split(data_arg, data):
    """All views of a .npz passed with --data; a folder's test split when it has one; else val (a run's own data
    without --data: its validation split, not the views it trained on unless a capture held none out)."""
    if data_arg and data_arg.endswith(".npz"):
        return "all"
    return "test" if os.path.isdir(data) and "test" in folder_splits(data) else "val"


def load_model(ckpt, cfg, device, path):
    """The checkpoint's model (or the export's ternary model) on device."""
    if "format" in ckpt:
        if ckpt["format"] != EXPORT_FORMAT:
            raise UserError(f"{path}: a {ckpt['format']} export, which this version cannot read (it reads "
                            f"{EXPORT_FORMAT}); evaluate it with the commit that wrote it")
        return load_ternary(ckpt, cfg).to(device)
    model = build_model(cfg, device)
    load_weights(model, ckpt["model"], path)
    return model


def load_field(ckpt, cfg, frame, device, path):
    """The checkpoint's (or export's) model and its occupancy grid over the frame (None where the config has none)."""
    model = load_model(ckpt, cfg, device, path)
    if "format" in ckpt:  # an export carries no occupancy grid: measure one from the model
        return model, rebuild_grid(model, cfg, frame, device)
    grid = build_grid(cfg, frame, device)
    if grid is not None:
        grid.load_state_dict(ckpt["grid"])
    return model, grid


def runnable_config(cfg, device):
    """The checkpoint's config, in float32 where its DTYPE cannot run on this device (float16 needs CUDA), with a
    notice."""
    if cfg["DTYPE"] == "float16" and device.type != "cuda":
        print(f"notice: the checkpoint trained under float16 autocast, which needs CUDA; evaluating in float32 on "
              f"{device.type}", file=sys.stderr)
        return {**cfg, "DTYPE": "float32"}
    return cfg


def prepare_out(out):
    """Create the --out folder before any rendering, or say in one line why it cannot be."""
    if out is None:
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out={out} is a file; pass a folder for the renders (created if missing)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out={out}: cannot create it ({e.strerror}); pass a writable folder") from None


def load_run(arg, device_name):
    """The checkpoint (or export) a command-line argument names: (path, checkpoint, runnable config, device, the
    run's saved frame or None for a run from before frames were saved)."""
    path = checkpoint_path(arg)
    ckpt = load_checkpoint(path)
    device = resolve_device(device_name)
    cfg = runnable_config(ckpt["config"], device)
    return path, ckpt, cfg, device, Frame.of(cfg["FRAME"]) if isinstance(cfg["FRAME"], dict) else None


def render_threads(threads, device):
    """How many chunks of a view's rays to render at once, torch's threads shared out among them: --threads, by
    default one per torch thread on a CPU (each chunk single-threaded: faster than those threads on one chunk,
    docs/fullres.md), and one on CUDA."""
    if threads is not None and threads < 1:
        raise UserError(f"--threads={threads}: must be at least 1 (the chunks of rays rendered at once)")
    return threads or (torch.get_num_threads() if device.type == "cpu" else 1)


def run(args):
    """Load the checkpoint (or BitNeRF ternary export) and the split scored, render, and return the metrics dict."""
    keep_freed_memory()
    # the run's frame: other views of its capture (their own poses_bounds.npy or transforms.json) land in it too
    path, ckpt, cfg, device, frame = load_run(args.ckpt, args.device)
    prepare_out(args.out)
    exported = "format" in ckpt
    data = args.data or cfg["DATA"]
    split = default_split(args.data, data) if args.split == "auto" else args.split
    scene = scene_of({**cfg, "DATA": data}, (split,), frame)
    if split not in scene.splits:
        raise UserError(f"--split={split}: {data} has only {', '.join(sorted(scene.splits))}")
    views, scene.background = scene.splits[split].to(device), scene.background.to(device)
    model, grid = load_field(ckpt, cfg, scene.frame, device, path)
    t0 = time.perf_counter()
    scores, _ = evaluate_views(model, views, scene, cfg, grid, autocast_context(cfg, device), save_dir=args.out,
                               threads=render_threads(args.threads, device))
    result = {"psnr": round(scores["psnr"], 4), "ssim": round(scores["ssim"], 4), "data": data, "split": split,
              "views": scores["views"], **protocol(scene, views), "space": scene.frame.space,
              "seconds": round(time.perf_counter() - t0, 2),
              "dtype": cfg["DTYPE"], "step": ckpt.get("step"), "exported": exported}
    if split == "val" and scene.val_is_train:  # --holdout=0: training's views, as training named them
        result["scored_on"] = scored_on(scene)
    if args.per_view:
        result["per_view"] = [{"view": v["view"], "psnr": round(v["psnr"], 4), "ssim": round(v["ssim"], 4)}
                              for v in scores["per_view"]]
    return result


def main(argv=None):
    """Parse arguments, evaluate, print the JSON line; bad input is one line on stderr and exit 2."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="run directory holding ckpt.pt, or a checkpoint file")
    p.add_argument("--data", default=None, help="data to evaluate on (default: the run's DATA, its val split)")
    p.add_argument("--split", default="auto", choices=("auto", "all", "train", "val", "test"))
    p.add_argument("--per_view", action="store_true", help="also list each view's PSNR and SSIM")
    p.add_argument("--out", default=None, help="also save each render and its depth map as PNG here")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="chunks of rays rendered at once, torch's "
                   "threads shared out (default: torch's thread count on a CPU, measured on 2 cores only; 1 on CUDA)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    args = p.parse_args(argv)
    try:
        print(json.dumps(run(args)))
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
