"""The training loop end to end: learning, the LR schedule, outputs, logging, data and bad input at the command
line (resuming: test_resume.py; eval.py: test_eval.py)."""
import functools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import eval as evaluate
import train
from configs import EXP1, EXP2, EXP5
from conftest import FAST, ROOT, main_error, one_line_error, run_cli


def test_validation_psnr_rises_on_the_synthetic_scene(small_cfg):
    cfg = {**small_cfg, "MAX_STEPS": 300, "EVAL_EVERY": 50, "EVAL_VIEWS": 4, "VIDEO_FRAMES": 3}
    metrics = train.train(cfg)
    first, last = metrics["history"][0]["psnr"], metrics["val_psnr"]
    assert last > first + 4.0 and last > 19.0, (first, last)
    out = cfg["OUT_DIR"]
    for name in ("ckpt.pt", "config.json", "metrics.json", "video.mp4", "video.gif", "depth.mp4", "depth.gif"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "config.json")) as f:
        recorded = json.load(f)
    # the synthetic scene's, resolved and kept (the hash keys too: a 2^15 table and 256 cells in a cube)
    frame = {"SPACE": "cube", "NEAR": 2.0, "FAR": 5.0, "SCENE_BOUND": 1.5, "HASH_LOG2_SIZE": 15, "HASH_FINEST_RES": 256}
    assert recorded == {**cfg, **frame, "FRAME": recorded["FRAME"]} and recorded["FRAME"]["far"] == 5.0
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 300 and set(ckpt) >= {"model", "optimizer", "generator", "config"}


def lr_schedule(cfg, seconds_per_step=0.0):
    """The learning rate of every step of a run of cfg whose steps each take seconds_per_step, from the trainer's own
    schedule."""
    from types import SimpleNamespace

    trainer, lrs = SimpleNamespace(cfg=cfg, state=train.RunState()), []
    while not train.Trainer.done(trainer):
        lrs.append(train.Trainer.scheduled_learning_rate(trainer))
        trainer.state.step += 1
        trainer.state.train_seconds += seconds_per_step
    return lrs


@pytest.mark.parametrize("run, peak", [("120 steps", 11), ("30 steps", 2), ("10 seconds", 8)])
def test_the_lr_warms_up_to_its_peak_then_falls_smoothly_to_min_lr_in_any_run(run, peak):
    """Warm-up takes WARMUP_STEPS or a tenth of the run, whichever is shorter; the cosine spans the rest. Before, a
    120-step run fell 11x in one step when warm-up ended, and a 30-step one never left warm-up (ending at 0.3 LR)."""

    timed = "seconds" in run
    cfg = {**EXP1, "WARMUP_STEPS": 100, "MAX_STEPS": 10 ** 9 if timed else int(run.split()[0]),
           "TIME_BUDGET_S": 10.0 if timed else 0.0}
    lrs = lr_schedule(cfg, seconds_per_step=0.125 if timed else 0.0)  # by time: 80 steps
    span, after = EXP1["LR"] - EXP1["MIN_LR"], len(lrs) - peak - 1
    assert max(lrs) == pytest.approx(EXP1["LR"]) and lrs.index(max(lrs)) == peak  # a tenth of the run
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1], strict=True))  # a linear ramp up
    drops = [a - b for a, b in zip(lrs[peak:], lrs[peak + 1:], strict=False)]
    assert min(drops) >= 0 and max(drops) <= 1.01 * span * math.pi / 2 / after  # the cosine's steepest: no cliff
    assert lrs[-1] == pytest.approx(EXP1["MIN_LR"], abs=0.01 * span)  # by time: the last step's share short of it


def test_a_long_run_warms_up_over_warmup_steps():
    from configs import EXP1

    lrs = lr_schedule({**EXP1, "WARMUP_STEPS": 100, "MAX_STEPS": 7000})
    assert lrs[:100] == pytest.approx([EXP1["LR"] * (k + 1) / 100 for k in range(100)]) and lrs[99] == max(lrs)
    assert lrs[-1] == pytest.approx(EXP1["MIN_LR"]) and lrs[3549] == pytest.approx(
        (EXP1["LR"] + EXP1["MIN_LR"]) / 2, rel=1e-3)  # halfway through the 6,900 steps after warm-up


def test_the_cuda_graph_is_used_only_on_cuda_without_torchrun_or_float16():
    import torch.distributed as dist

    from configs import EXP1

    cuda = torch.device("cuda")
    assert train.use_cuda_graph(EXP1, cuda)
    assert not train.use_cuda_graph({**EXP1, "CUDA_GRAPH": False}, cuda)
    assert not train.use_cuda_graph({**EXP1, "DTYPE": "float16"}, cuda)
    assert not train.use_cuda_graph(EXP1, torch.device("cpu"))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # torchrun, one process: DDP
    try:
        assert not train.use_cuda_graph(EXP1, cuda)
    finally:
        dist.destroy_process_group()


def test_a_step_over_threads_has_the_one_thread_steps_loss_and_gradients(small_cfg, monkeypatch):
    """Slices of the batch on threads, each slice's gradient taken apart: their weighted sum is the batch's mean
    loss and gradient (jitter off, so both see the same samples; the hash model with a fine pass and the opacity
    regulariser, on 3 slices of unequal size)."""
    cfg = {**small_cfg, "ENCODING": "hash", "HASH_LOG2_SIZE": 12, "NUM_FINE": 8, "BATCH_SIZE": 301, "TRAIN_THREADS": 3}
    trainer = train.Trainer(cfg, 0, 1, torch.device("cpu"))
    assert trainer.threads == 3
    rays, target = train.sample_batch(trainer.train_views, cfg["BATCH_SIZE"], trainer.generator, trainer.scene.frame)
    one_pass = trainer.batch_loss
    monkeypatch.setattr(trainer, "batch_loss", lambda rays, target, generator: one_pass(rays, target, None))
    mse, reg = trainer.threaded_loss_and_grads(rays, target)
    threaded = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    trainer.model.zero_grad(set_to_none=True)
    expected_mse, expected_reg, loss = one_pass(rays, target, None)
    loss.backward()
    torch.testing.assert_close(mse, expected_mse.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(reg, expected_reg.detach(), rtol=1e-5, atol=1e-12)
    assert reg[0] > 0
    for n, p in trainer.model.named_parameters():
        assert p.grad.abs().max() > 0, n
        torch.testing.assert_close(threaded[n], p.grad, rtol=1e-4, atol=1e-7 * p.grad.abs().max().item(), msg=n)


def test_training_threads_default_to_two_only_where_no_grid_culls():
    """TRAIN_THREADS 0: 2 in NDC (no occupancy grid; 1 on a one-thread CPU), 1 with a grid; never more than the
    batch's rays, and 1 on CUDA, under torchrun or for a compiled model."""
    import torch.distributed as dist

    cpu = torch.device("cpu")
    assert train.train_threads(EXP1, cpu, None) == min(2, torch.get_num_threads())
    assert train.train_threads(EXP1, cpu, object()) == 1
    assert train.train_threads({**EXP1, "TRAIN_THREADS": 3}, cpu, object()) == 3
    assert train.train_threads({**EXP1, "TRAIN_THREADS": 3, "BATCH_SIZE": 2}, cpu, None) == 2
    assert train.train_threads(EXP1, torch.device("cuda"), None) == 1
    assert train.train_threads({**EXP1, "COMPILE": True, "TRAIN_THREADS": 2}, cpu, None) == 1
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # torchrun: DDP's backward
    try:
        assert train.train_threads({**EXP1, "TRAIN_THREADS": 2}, cpu, None) == 1
    finally:
        dist.destroy_process_group()


def test_non_finite_steps_can_be_skipped_instead(small_cfg, monkeypatch):
    real, calls = train.render_rays, []

    def nan_on_the_fifth_call(*args, **kwargs):
        rgb, depth, acc = real(*args, **kwargs)
        calls.append(1)
        return (rgb * float("nan") if len(calls) == 5 else rgb), depth, acc

    monkeypatch.setattr(train, "render_rays", nan_on_the_fifth_call)
    metrics = train.train({**small_cfg, "NONFINITE": "skip"})
    assert metrics["steps"] == small_cfg["MAX_STEPS"] and metrics["val_psnr"] > 0
    ckpt = torch.load(os.path.join(small_cfg["OUT_DIR"], "ckpt.pt"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """At the command line once; the other cases through the main the scripts call, in this process."""
    one_line_error(run_cli("exp1.py", "--bogus=3"), "unknown key --bogus")
    exp1, exp2, exp5 = (functools.partial(train.main, preset) for preset in (EXP1, EXP2, EXP5))
    main_error(capsys, exp1, ["--num_samples=0"], "must be > 0")
    main_error(capsys, exp1, ["--data=/no/such/file.npz", f"--out_dir={tmp_path / 'a'}"], "data not found")
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    main_error(capsys, exp1, [*FAST, f"--out_dir={blocker / 'sub'}"], "cannot write to --out_dir")
    assert blocker.read_text() == "keep me"
    main_error(capsys, exp2, [*FAST, "--dtype=float16", "--device=cpu", f"--out_dir={tmp_path / 'b'}"],
               "float16 needs CUDA")
    main_error(capsys, evaluate.main, [str(tmp_path / "none")], "no checkpoint at")
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29599"}.items():
        monkeypatch.setenv(key, value)
    main_error(capsys, exp5, [*FAST, "--ddp_backend=nccl", "--device=cpu", f"--out_dir={tmp_path / 'c'}"],
               "nccl needs CUDA")


def test_wandb_offline_without_a_key_writes_a_local_run(small_cfg, monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, so 'auto' must go offline
    cfg = {**small_cfg, "WANDB": "auto", "MAX_STEPS": 10, "EVAL_EVERY": 5}
    train.train(cfg)
    runs = [d for d in os.listdir(os.path.join(cfg["OUT_DIR"], "wandb")) if d.startswith("offline-run")]
    assert len(runs) == 1


def test_lego_tiny_psnr_rises(lego_tiny, small_cfg):
    """Real data: 200 steps clearly beat the model of step 40 on held-out lego views (15.0 -> 17.0 dB)."""
    cfg = {**small_cfg, "DATA": lego_tiny, "MAX_STEPS": 200, "EVAL_EVERY": 40, "EVAL_VIEWS": 2,
           "NUM_SAMPLES": 64, "BATCH_SIZE": 1024, "CHUNK": 4096}
    metrics = train.train(cfg)
    assert metrics["val_psnr"] > 16.5 and metrics["val_psnr"] > metrics["history"][0]["psnr"] + 1.5, metrics


def test_wandb_key_is_found_in_the_environment_or_netrc(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not train.has_wandb_key()
    (tmp_path / ".netrc").write_text("machine example.org\n  login x\n")
    assert not train.has_wandb_key()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    assert train.has_wandb_key()
    monkeypatch.setenv("WANDB_API_KEY", "from-the-environment")
    (tmp_path / ".netrc").unlink()
    assert train.has_wandb_key()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensor_memory_is_reused_without_page_faults():
    """After keep_freed_memory a freed 64 MiB tensor's pages back the next one; by default they fault in anew."""
    code = """import resource, sys, torch, utils
if sys.argv[1] == "keep":
    utils.keep_freed_memory()
torch.ones(16 << 20)  # 64 MiB, freed at once
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(8 << 20)  # 32 MiB: 8,192 pages
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)"""
    faults = {mode: int(subprocess.run([sys.executable, "-c", code, mode], cwd=ROOT, capture_output=True, text=True,
                                       check=True).stdout) for mode in ("keep", "default")}
    assert faults["default"] > 8000 and faults["keep"] < 800, faults


def test_the_logged_training_loss_is_the_photometric_mse_and_the_regulariser_is_logged_apart(small_cfg, monkeypatch):
    import torch.nn.functional as F

    real_render, real_batch, renders, targets = train.render_rays, train.sample_batch, [], []

    def recording_render(*args, **kwargs):
        out = real_render(*args, **kwargs)
        renders.append((out[0].detach(), out[2].detach(), out[3].detach()))
        return out

    def recording_batch(*args, **kwargs):
        rays, target = real_batch(*args, **kwargs)
        targets.append(target)
        return rays, target

    monkeypatch.setattr(train, "render_rays", recording_render)
    monkeypatch.setattr(train, "sample_batch", recording_batch)
    cfg = {**small_cfg, "OPACITY_REG": 0.5, "DISTORTION": 0.1, "MAX_STEPS": 50, "LOG_EVERY": 5}  # strong: mixing
    # them in would show; 50 steps: warm-up (a tenth of the run) lasts to step 5, where the regulariser has not won yet
    metrics = train.train(cfg)
    for point in metrics["curve"]:
        (rgb, acc, spread), target = renders[point["step"] - 1], targets[point["step"] - 1]
        assert point["loss"] == pytest.approx(F.mse_loss(rgb, target).item(), rel=1e-6)
        assert point["opacity_reg"] == pytest.approx(0.5 * (acc * (1 - acc)).mean().item(), rel=1e-5)
        assert point["distortion"] == pytest.approx(0.1 * spread.mean().item(), rel=1e-5)
    assert metrics["curve"][0]["opacity_reg"] > 0.1 * metrics["curve"][0]["loss"]  # at step 5, before it wins
    assert metrics["curve"][0]["distortion"] > 0


def test_data_auto_falls_back_to_the_synthetic_scene_offline_and_names_it(small_cfg, tmp_path, monkeypatch, capsys):
    import dataset

    monkeypatch.setenv("NERF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(dataset, "TINY_NERF_URL", "http://127.0.0.1:9/tiny_nerf_data.npz")  # refused at once
    metrics = train.train({**small_cfg, "DATA": "auto", "MAX_STEPS": 5})
    err = capsys.readouterr().err
    assert err.count("notice: no tiny_nerf_data.npz") == 1 and "SYNTHETIC scene" in err
    assert "views of synthetic after 5 steps" in err.strip().splitlines()[-1]
    with open(os.path.join(small_cfg["OUT_DIR"], "config.json")) as f:
        assert json.load(f)["DATA"] == "synthetic"
    assert metrics["data"] == "synthetic"
    with open(os.path.join(small_cfg["OUT_DIR"], "metrics.json")) as f:
        assert json.load(f)["data"] == "synthetic"


def test_data_auto_takes_the_tiny_nerf_data_when_it_can_be_had(tmp_path, monkeypatch):
    import numpy as np

    import dataset

    images, poses, focal = dataset.synthetic_scene(n_views=6, size=16)
    np.savez(tmp_path / "src.npz", images=images, poses=poses, focal=focal)
    monkeypatch.setenv("NERF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(dataset, "TINY_NERF_URL", f"file://{tmp_path / 'src.npz'}")
    assert dataset.resolve_data("auto") == "tiny_nerf" and dataset.resolve_data("auto") == "tiny_nerf"  # cached
    assert os.listdir(tmp_path / "cache") == ["tiny_nerf_data.npz"]
    assert dataset.resolve_data("synthetic") == "synthetic"


def test_grid_updates_run_in_float32_under_bf16_autocast(small_cfg, monkeypatch):
    """The grid measures density outside autocast (train.Trainer.update_grid says why)."""
    import render

    real, seen = render.OccupancyGrid.update, []

    def recording_update(self, model, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(self, model, *args, **kwargs)

    monkeypatch.setattr(render.OccupancyGrid, "update", recording_update)
    train.train({**small_cfg, "DTYPE": "bfloat16", "MAX_STEPS": 17})
    assert seen == [False]
