"""eval.py: one JSON line of scores for a run, a checkpoint or an export, on its own or other views; bad input."""
import json
import os

import pytest
import torch

from conftest import FAST, one_line_error, run_cli


def test_eval_prints_one_json_line(nerf_run, tmp_path):
    copy, metrics = nerf_run
    cfg = copy(tmp_path / "run")
    res = run_cli("eval.py", cfg["OUT_DIR"])  # without --data: the run's own data, its validation split
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["views"] == 4 and out["split"] == "val"
    assert out["psnr"] == pytest.approx(metrics["val_psnr"], abs=1e-3) and 0 < out["ssim"] <= 1
    assert len(res.stdout.strip().splitlines()) == 1


def test_eval_saves_renders_of_every_view(nerf_run, tmp_path):
    import imageio.v2 as imageio

    cfg = nerf_run[0](tmp_path / "run")
    res = run_cli("eval.py", os.path.join(cfg["OUT_DIR"], "ckpt.pt"), "--data=synthetic", "--split=all",
                  f"--out={tmp_path / 'renders'}")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["views"] == 40 and len(os.listdir(tmp_path / "renders")) == 80
    assert imageio.imread(tmp_path / "renders" / "000_depth.png").shape == (48, 48, 3)


def test_eval_scores_a_float16_gpu_checkpoint_on_a_cpu_in_float32(nerf_run, tmp_path):
    """A run trained under float16 autocast (CUDA only) is still scored on a CPU: in float32, with a notice."""
    copy, metrics = nerf_run
    path = os.path.join(copy(tmp_path / "run")["OUT_DIR"], "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["DTYPE"] = "float16"  # as a GPU run of exp2 with --dtype=float16 writes it
    torch.save(ckpt, path)
    res = run_cli("eval.py", path, "--device=cpu")
    assert res.returncode == 0, res.stderr
    assert "float16 autocast, which needs CUDA; evaluating in float32 on cpu" in res.stderr
    out = json.loads(res.stdout)
    assert out["dtype"] == "float32" and out["psnr"] == pytest.approx(metrics["val_psnr"], abs=1e-3)


def test_eval_out_naming_a_file_is_one_line_and_keeps_the_file(nerf_run, tmp_path):
    cfg = nerf_run[0](tmp_path / "run")
    existing = tmp_path / "renders.png"
    existing.write_bytes(b"a picture the user keeps")
    one_line_error(run_cli("eval.py", cfg["OUT_DIR"], f"--out={existing}"), "is a file; pass a folder")
    assert existing.read_bytes() == b"a picture the user keeps"


def test_eval_of_an_npz_run_scores_its_validation_views_unless_the_npz_is_passed(tmp_path):
    """Without --data, a run trained on a .npz is scored on its held-out views only, never on its training views."""
    import numpy as np

    from dataset import synthetic_scene

    images, poses, focal = synthetic_scene(n_views=10, size=16)
    npz = str(tmp_path / "scene.npz")
    np.savez(npz, images=images, poses=poses, focal=focal)
    res = run_cli("exp1.py", *FAST, f"--data={npz}", f"--out_dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr
    own = json.loads(run_cli("eval.py", str(tmp_path / "run")).stdout)
    assert (own["split"], own["views"]) == ("val", 1)  # 10 views: 9 train, 1 validates
    passed = json.loads(run_cli("eval.py", str(tmp_path / "run"), f"--data={npz}").stdout)
    assert (passed["split"], passed["views"]) == ("all", 10)
