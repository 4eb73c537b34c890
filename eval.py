"""Render every view of a split and print one JSON line of metrics.

    python eval.py RUN_DIR_OR_CKPT_OR_EXPORT [--data=PATH] [--split=auto|all|train|val|test] [--out=DIR]
Without --data it scores the run's own validation split (or test split, for a folder that has one).
"""
import argparse
import json
import sys
import time

from bitnerf import EXPORT_FORMAT, load_ternary
from configs import UserError
from dataset import load_scene
from nerf import model_kwargs
from train import autocast_context, build_model, resolve_device
from utils import (
    build_grid,
    checkpoint_path,
    evaluate_views,
    keep_freed_memory,
    load_checkpoint,
    load_weights,
    rebuild_grid,
)


def default_split(data_arg, scene):
    """All views of a .npz passed with --data; else the test split when the scene has one, else val (a run's own
    data without --data: its validation split, never the views it trained on)."""
    if data_arg and data_arg.endswith(".npz"):
        return "all"
    return "test" if "test" in scene.splits else "val"


def run(args):
    """Load the checkpoint (or BitNeRF ternary export) and data, render, and return the metrics dict."""
    keep_freed_memory()
    path = checkpoint_path(args.ckpt)
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    device = resolve_device(args.device)
    exported = ckpt.get("format") == EXPORT_FORMAT
    if exported:
        model = load_ternary(ckpt, model_kwargs(cfg)).to(device)
    else:
        model = build_model(cfg, device)
        load_weights(model, ckpt["model"], path)
    data = args.data or cfg["DATA"]
    scene = load_scene(data, cfg["DOWNSCALE"], cfg["WHITE_BKGD"])
    split = default_split(args.data, scene) if args.split == "auto" else args.split
    if split not in scene.splits:
        raise UserError(f"--split={split}: {data} has only {', '.join(sorted(scene.splits))}")
    views = scene.splits[split]
    views.images, views.poses, scene.background = views.images.to(device), views.poses.to(device), \
        scene.background.to(device)
    if exported:  # an export carries no occupancy grid: measure one from the model
        grid = rebuild_grid(model, cfg, scene, device)
    else:
        grid = build_grid(cfg, scene, device)
        if grid is not None:
            grid.load_state_dict(ckpt["grid"])
    t0 = time.perf_counter()
    scores, _ = evaluate_views(model, views, scene, cfg, grid, autocast_context(cfg, device), save_dir=args.out)
    return {"psnr": round(scores["psnr"], 4), "ssim": round(scores["ssim"], 4), "views": scores["views"],
            "seconds": round(time.perf_counter() - t0, 2), "split": split, "step": ckpt.get("step"),
            "exported": exported}


def main(argv=None):
    """Parse arguments, evaluate, print the JSON line; bad input is one line on stderr and exit 2."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="run directory holding ckpt.pt, or a checkpoint file")
    p.add_argument("--data", default=None, help="data to evaluate on (default: the run's DATA, its val/test split)")
    p.add_argument("--split", default="auto", choices=("auto", "all", "train", "val", "test"))
    p.add_argument("--out", default=None, help="also save each render and its depth map as PNG here")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
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
