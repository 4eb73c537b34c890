"""The standard protocol at scale: nerf_synthetic folders at every downscale over white, eval's protocol fields and
its one split, renders independent of the chunk size, EVAL_AT_S, VIDEO_EVERY, recipes and report.py --seeds."""
import argparse
import json
import os
import shutil

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

import dataset
import eval as evaluate
import train
from configs import EXP1, EXP4, RECIPES, ConfigError, apply_overrides
from conftest import images_of, run_cli, small, write_blender
from dataset import load_scene, synthetic_scene
from render import build_grid, render_view


@pytest.fixture(scope="module")
def rgba():
    """Six 16 x 16 RGBA views with fractional alpha (a horizontal ramp times the shape's mask) and their cameras."""
    images, poses, focal = synthetic_scene(n_views=6, size=16)
    ramp = np.linspace(0.1, 1, 16, dtype=np.float32)[None, None, :, None]
    alpha = (images.max(-1, keepdims=True) > 0) * ramp
    return np.concatenate([images, alpha], -1), poses, focal


@pytest.fixture(scope="module")
def folder(tmp_path_factory, rgba):
    """The RGBA views as a nerf_synthetic folder with train, val and test splits."""
    return write_blender(tmp_path_factory.mktemp("scene") / "lego", *rgba, splits=("train", "val", "test"))


@pytest.mark.parametrize("downscale", [1, 2, 4, 8])
def test_white_background_compositing_is_exact_at_every_downscale(folder, downscale):
    png = np.stack([imageio.imread(os.path.join(folder, "val", f"r_{k}.png")) for k in range(6)]) / 255.0
    over_white = png[..., :3] * png[..., 3:] + 1 - png[..., 3:]  # composited at full size, then averaged
    n = 16 // downscale
    expected = over_white.reshape(6, n, downscale, n, downscale, 3).mean((2, 4))
    views = load_scene(folder, downscale=downscale).splits["val"]
    assert views.cameras.hw(0) == (n, n)
    np.testing.assert_allclose(images_of(views).numpy(), expected, rtol=0, atol=1e-6)
    black = images_of(load_scene(folder, downscale=downscale, background="black").splits["val"]).numpy()
    np.testing.assert_allclose(black, (png[..., :3] * png[..., 3:]).reshape(6, n, downscale, n, downscale, 3)
                               .mean((2, 4)), rtol=0, atol=1e-6)
    assert (images_of(views).numpy() - black).max() > 0.5  # the two backgrounds differ where alpha is 0


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, folder):
    """A 30-step exp1 on the folder at full size (16 px, white background), trained once."""
    cfg = {**small(tmp_path_factory.mktemp("folder_run") / "run"), "DATA": folder, "MAX_STEPS": 30, "DOWNSCALE": 1}
    return cfg, train.train(cfg)


def test_eval_names_the_protocol_and_reads_only_the_split_it_scores(folder_run, folder, tmp_path, monkeypatch):
    cfg, metrics = folder_run
    assert (metrics["resolution"], metrics["background"]) == ("16x16", "white")
    read = []
    real = dataset.load_blender_split
    monkeypatch.setattr(dataset, "load_blender_split", lambda f, split, *a: read.append(split) or real(f, split, *a))
    result = evaluate.run(argparse.Namespace(ckpt=cfg["OUT_DIR"], data=folder, split="auto", out=None, device="cpu",
                                             per_view=True, threads=None))
    assert read == ["test"]  # not the 6 training images
    assert {k: result[k] for k in ("split", "views", "resolution", "background", "data")} == \
        {"split": "test", "views": 6, "resolution": "16x16", "background": "white", "data": folder}
    per_view = result["per_view"]
    assert [v["view"] for v in per_view] == list(range(6))
    assert np.mean([v["psnr"] for v in per_view]) == pytest.approx(result["psnr"], abs=1e-3)
    assert np.mean([v["ssim"] for v in per_view]) == pytest.approx(result["ssim"], abs=1e-3)
    # a folder holding only transforms_test.json (and its images) is enough
    only_test = tmp_path / "only_test"
    os.makedirs(only_test)
    shutil.copy(os.path.join(folder, "transforms_test.json"), only_test)
    shutil.copytree(os.path.join(folder, "test"), only_test / "test")
    res = run_cli("eval.py", cfg["OUT_DIR"], f"--data={only_test}", "--split=test")
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert (out["psnr"], out["views"], out["split"]) == (result["psnr"], 6, "test")
    res = run_cli("eval.py", cfg["OUT_DIR"], f"--data={only_test}", "--split=val")
    assert res.returncode == 2 and "no transforms_val.json" in res.stderr.strip().splitlines()[-1]


def test_a_full_size_render_is_the_same_image_at_two_chunk_sizes(folder_run, folder):
    cfg, _ = folder_run
    ckpt = torch.load(os.path.join(cfg["OUT_DIR"], "ckpt.pt"), weights_only=True)
    model = train.build_model(cfg, torch.device("cpu"))
    model.load_state_dict(ckpt["model"])
    scene = load_scene(folder, splits=("val",))
    grid = build_grid(cfg, scene.frame, torch.device("cpu"))
    grid.load_state_dict(ckpt["grid"])
    views = scene.splits["val"]
    renders = [render_view(model.eval(), views.cameras[2], scene, {**cfg, "CHUNK": chunk}, grid,
                           torch.no_grad()) for chunk in (37, 4096)]
    for a, b in zip(*renders, strict=True):
        assert a.shape[:2] == (16, 16)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert renders[0][0].std() > 0.01 and renders[0][2].max() > 0.1  # something is drawn: not a blank image


def test_eval_at_s_validates_on_all_views_at_each_mark(tmp_path):
    cfg = {**small(tmp_path / "run"), "MAX_STEPS": 10 ** 6, "TIME_BUDGET_S": 1.5, "EVAL_AT_S": "0.5,1"}
    history = train.train(cfg)["history"]
    marked = [h for h in history if h.get("at_s")]
    assert [h["at_s"] for h in marked] == [[0.5], [1.0]]
    assert all(h["views"] == 4 and h["train_seconds"] >= h["at_s"][0] for h in marked)  # every validation view
    assert history[-1]["train_seconds"] >= 1.5 and "at_s" not in history[-1]
    with pytest.raises(ConfigError, match="--eval_at_s=5,x"):
        apply_overrides(EXP1, ["--eval_at_s=5,x"])


def test_video_every_writes_its_videos_at_the_video_downscale(tmp_path):
    cfg = {**small(tmp_path / "run"), "MAX_STEPS": 6, "VIDEO_EVERY": 3, "VIDEO_FRAMES": 2, "VIDEO_DOWNSCALE": 2}
    train.train(cfg)
    files = sorted(os.listdir(cfg["OUT_DIR"]))
    assert {"video_step3.mp4", "video_step3.gif", "depth_step3.mp4", "depth_step3.gif", "video.mp4"} <= set(files)
    assert "video_step6.mp4" not in files  # the last step's video is the final one
    frames = imageio.mimread(os.path.join(cfg["OUT_DIR"], "video_step3.gif"))
    assert len(frames) == 2 and frames[0].shape[:2] == (24, 24)  # the 48 px synthetic views halved


def test_recipes_layer_over_any_preset_and_the_command_line_wins():
    for name, recipe in RECIPES.items():
        cfg = apply_overrides(EXP4, [f"--recipe={name}"])
        assert {k: cfg[k] for k in recipe} == recipe and cfg["MODEL"] == "bitnerf" and cfg["RECIPE"] == name
    cfg = apply_overrides(EXP1, ["--batch_size=512", "--recipe=gpu800"])
    assert cfg["BATCH_SIZE"] == 512 and cfg["DOWNSCALE"] == 1 and cfg["GRID_RES"] == RECIPES["gpu800"]["GRID_RES"]
    with pytest.raises(ConfigError, match="--recipe=huge"):
        apply_overrides(EXP1, ["--recipe=huge"])


@pytest.mark.parametrize("recipe", ["cpu800", "gpu800"])
def test_the_full_size_recipes_train_and_write_their_video(tmp_path, folder, recipe):
    res = run_cli("exp1.py", f"--recipe={recipe}", f"--data={folder}", f"--out_dir={tmp_path / 'run'}", "--max_steps=3",
                  "--time_budget_s=0", "--num_layers=2", "--emb_dim=16", "--video_frames=2", "--wandb=disabled",
                  "--device=cpu", "--batch_size=256")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["resolution"], metrics["background"], metrics["steps"]) == ("16x16", "white", 3)
    size = 16 // RECIPES[recipe].get("VIDEO_DOWNSCALE", 1)  # the CPU's orbit is smaller
    assert imageio.mimread(tmp_path / "run" / "video.gif")[0].shape[:2] == (size, size)


def test_report_reads_the_psnr_at_the_time_to_quality_marks(monkeypatch):
    import report

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU's marks, on any machine
    assert report.time_marks(600.0) == [150, 300]
    assert {75, 150, 300, 525} <= set(report.eval_marks(600.0)) and 600 not in report.eval_marks(600.0)
    args = argparse.Namespace(budget_s=600.0)
    cols = report.columns(args)
    assert cols[cols.index("val PSNR") - 2:cols.index("val PSNR")] == ["PSNR@150s", "PSNR@300s"]
    run = {"history": [{"psnr": 20.0, "at_s": [75.0]}, {"psnr": 24.5, "at_s": [150.0]}, {"psnr": 26.0}]}
    assert (report.psnr_at(run, 150), report.psnr_at(run, 300)) == (24.5, None)
