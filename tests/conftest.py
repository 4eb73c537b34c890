"""Shared fixtures and helpers: the repo on sys.path, the real data beside the repo, small fast configs,
command-line runs, and trained runs made once per session."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per test worker (and its child processes): 2 workers, 2 cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# inductor's first compile on a new machine builds and loads a test program per vector ISA (~10 s); the CPU's flags
# alone decide here. Set before torch is imported; child processes inherit it.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
FULL_HW, FOCAL = (48, 64), 50.0  # llff_capture's full-size images and focal length
sys.path.insert(0, ROOT)

from configs import EXP1, EXP4  # noqa: E402
from dataset import synthetic_scene  # noqa: E402

# pytest-xdist gives a worker the next test file, in collection order (--no-loadscope-reorder), once it is nearly
# idle: the longest files first (pytest --durations=0 says which), so no worker is left with a long one at the end
LONGEST_FIRST = ("test_ddp.py", "test_hash.py", "test_train.py", "test_bitnerf.py", "test_report.py",
                 "test_captures.py", "test_viewer.py", "test_resume.py", "test_multinode.py", "test_precision.py",
                 "test_scale.py", "test_eval.py")


def pytest_collection_modifyitems(items):
    """Collect the files of LONGEST_FIRST first, in its order, then the others in theirs."""
    order = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))


# a seconds-long run at the command line: small MLP, no compile, no wandb, no video, 2 steps
FAST = ["--data=synthetic", "--compile=false", "--wandb=disabled", "--video_frames=0", "--max_steps=2",
        "--emb_dim=16", "--num_layers=2", "--eval_every=0"]


def run_cli(*args, cwd=ROOT, env=None, timeout=300):
    """Run a script of the repo (with extra environment variables); returns the completed process."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line_error(res, words):
    """Assert a command failed as bad input should: exit 2, one 'error: ...' line naming words, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and words in lines[-1], res.stderr
    assert "Traceback" not in res.stderr


def main_error(capsys, main, argv, words):
    """one_line_error for a script's main called in this process (what the script runs, without its start-up);
    returns what it wrote to stderr."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with pytest.raises(SystemExit) as stop:
            main(argv)
    finally:  # view.main takes Ctrl-C back from an ignoring parent: this worker's later children must not see that
        for s, handler in handlers.items():
            signal.signal(s, handler)
    err = capsys.readouterr().err
    one_line_error(subprocess.CompletedProcess(argv, stop.value.code, "", err), words)
    return err


def write_blender(folder, images, poses, focal, splits=("train", "val")):
    """A nerf_synthetic-style folder: RGBA PNGs (RGB images get alpha 1 where not black) and transforms json."""
    if images.shape[-1] == 3:
        images = np.concatenate([images, (images.max(-1, keepdims=True) > 0).astype(np.float32)], -1)
    W = images.shape[2]
    for split in splits:
        os.makedirs(folder / split, exist_ok=True)
        frames = []
        for k, (img, pose) in enumerate(zip(images, poses, strict=True)):
            imageio.imwrite(folder / split / f"r_{k}.png", (img * 255).round().astype(np.uint8))
            frames.append({"file_path": f"./{split}/r_{k}", "transform_matrix": pose.tolist()})
        angle = 2 * np.arctan(W / (2 * focal))
        (folder / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": angle, "frames": frames}))
    return str(folder)


def write_images(folder, images):
    """uint8 PNGs image000.png ... of float images (N, H, W, 3) into folder."""
    os.makedirs(folder, exist_ok=True)
    for k, image in enumerate(images):
        imageio.imwrite(os.path.join(folder, f"image{k:03d}.png"), (np.asarray(image) * 255).round().astype(np.uint8))


def write_llff(folder, c2w, hw, focal, bounds, images_by_factor):
    """An LLFF capture: poses_bounds.npy (OpenGL c2w written in LLFF's [down, right, back] columns, the full-size
    [H, W, focal]) and an images_K/ folder for each factor."""
    c2w = np.asarray(c2w, dtype=np.float64)
    llff = np.concatenate([-c2w[:, :3, 1:2], c2w[:, :3, 0:1], c2w[:, :3, 2:4],
                           np.tile(np.array([[*hw, focal]]).T[None], (len(c2w), 1, 1))], 2)
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "poses_bounds.npy"), np.concatenate([llff.reshape(-1, 15), bounds], 1))
    for factor, images in images_by_factor.items():
        write_images(os.path.join(folder, f"images_{factor}"), images)
    return str(folder)


def llff_capture(folder):
    """A made-up 4-view forward-facing LLFF capture (random images) with images_4/ and images_8/ of FULL_HW images
    at FOCAL; (folder, its c2w)."""
    c2w = np.tile(np.eye(4), (4, 1, 1))
    c2w[:, :3, 3] = [[0.1 * k, -0.05 * k, 0.02 * k] for k in range(4)]
    rng = np.random.default_rng(0)
    images = {f: rng.random((4, FULL_HW[0] // f, FULL_HW[1] // f, 3)) for f in (4, 8)}
    bounds = np.array([[2.0, 10.0], [2.5, 9.0], [3.0, 12.0], [2.2, 8.0]])
    return write_llff(folder, c2w, FULL_HW, FOCAL, bounds, images), c2w


def write_transforms(folder, frames, images, **shared):
    """A transforms.json capture: images/NNN.png and the frames (each with its transform_matrix and own keys)."""
    os.makedirs(folder / "images", exist_ok=True)
    listed = []
    for k, (fr, image) in enumerate(zip(frames, images, strict=True)):
        imageio.imwrite(folder / "images" / f"{k:03d}.png", (np.asarray(image) * 255).round().astype(np.uint8))
        listed.append({"file_path": f"images/{k:03d}.png", **fr})
    (folder / "transforms.json").write_text(json.dumps({**shared, "frames": listed[::-1]}))  # any order
    return str(folder)


def synthetic_capture(folder, views):
    """The procedural scene's views (at 24 px) as a transforms.json capture, camera_angle_x only."""
    images, poses, focal = synthetic_scene(n_views=16, size=24)
    frames = [{"transform_matrix": poses[k].tolist()} for k in views]
    return write_transforms(folder, frames, images[views], camera_angle_x=2 * math.atan(12 / focal))


def images_of(views):
    """A split's images stacked (N, H, W, 3) (its views of one size)."""
    import torch

    return torch.stack([views.image(k) for k in range(len(views))])


def table_rows(markdown):
    """The rows of the results table in a report's results.md, as dicts keyed by column."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True)) for ln in lines[2:]]


def check_quick_report(tmp_path, exps, *overrides):
    """Run `report.py --quick` (with config overrides) on some experiments; assert each went through the report and
    its row of the table parses, with an export for a BitNeRF, and that the GIFs and curves were written."""
    import report

    out = run_cli("report.py", "--quick", "--budget_s=2", f"--only={','.join(exps)}", f"--out_dir={tmp_path}",
                  "--wandb=disabled", *overrides, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = table_rows((tmp_path / "results.md").read_text())
    assert [r["experiment"] for r in rows] == exps
    for r in rows:
        cfg = report.experiment_config(r["experiment"], overrides)
        assert int(r["steps"]) > 0 and float(r["train s"]) >= 2 - 1
        assert float(r["samples/s"].replace(",", "")) > 0 and int(r["peak mem MB"]) > 0
        assert 5.0 < float(r["val PSNR"].split()[0]) < 60.0 and -1.0 <= float(r["val SSIM"]) <= 1.0
        assert int(r["processes"]) == (2 if cfg["LAUNCH"] == "torchrun" else 1)
        assert r["checkpoint"].endswith(("kB", "MB"))
        if cfg["MODEL"] == "bitnerf":  # exp4, exp6, exp7-bitnerf: the export, evaluated as exported
            assert r["export"].endswith("kB") and float(r["val PSNR"].split("export ")[1].rstrip(")")) > 5.0
        else:
            assert r["export"] == "-"
        assert (tmp_path / f"{r['experiment']}_rgb.gif").stat().st_size > 0
        assert (tmp_path / f"{r['experiment']}_depth.gif").stat().st_size > 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return rows


def small(out_dir):
    """A seconds-long exp1 on the synthetic scene: small MLP, no compile, no wandb, no video."""
    return {**EXP1, "DATA": "synthetic", "OUT_DIR": str(out_dir), "NUM_LAYERS": 4, "NUM_SAMPLES": 32,
            "BATCH_SIZE": 512, "MAX_STEPS": 40, "WARMUP_STEPS": 5, "EVAL_EVERY": 0, "CKPT_EVERY": 10, "LOG_EVERY": 10,
            "VIDEO_FRAMES": 0, "COMPILE": False, "WANDB": "disabled", "CHUNK": 1024}


@pytest.fixture
def small_cfg(tmp_path):
    """small() in this test's temporary directory."""
    return small(tmp_path / "run")


@pytest.fixture
def lego_tiny():
    """Path of ../shared/data/lego_tiny.npz; the test is skipped where it is absent."""
    path = os.path.join(SHARED_DATA, "lego_tiny.npz")
    if not os.path.exists(path):
        pytest.skip("../shared/data/lego_tiny.npz not present")
    return path


def trained_once(tmp_path_factory, name, cfg_of):
    """Train cfg_of(out_dir) once per session; returns (a function copying the run into a test's directory, the
    run's metrics)."""
    import train

    cfg = cfg_of(tmp_path_factory.mktemp(name) / "run")
    metrics = train.train(cfg)

    def copy(dest):
        shutil.copytree(cfg["OUT_DIR"], dest)
        return {**cfg, "OUT_DIR": str(dest)}
    return copy, metrics


@pytest.fixture(scope="session")
def nerf_run(tmp_path_factory):
    """small()'s 40 steps, trained once: (copy(dest) -> its config in dest, metrics)."""
    return trained_once(tmp_path_factory, "nerf", small)


@pytest.fixture(scope="session")
def bitnerf_run(tmp_path_factory):
    """A 40-step exp4 on the synthetic scene, with SEED, CHUNK and ERT_TRANSMITTANCE overridden, trained once."""
    return trained_once(tmp_path_factory, "bitnerf", lambda out: {
        **small(out), "MODEL": EXP4["MODEL"], "EXPERIMENT": "exp4", "SEED": 3, "CHUNK": 700,
        "ERT_TRANSMITTANCE": 0.02, "GRID_RES": 32})
