"""The training loop end to end: learning, resuming, outputs, eval.py and bad input at the command line."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from configs import EXP7, UserError
from conftest import FAST, ROOT, one_line_error, run_cli


def test_validation_psnr_rises_on_the_synthetic_scene(small_cfg):
    cfg = {**small_cfg, "MAX_STEPS": 300, "EVAL_EVERY": 50, "EVAL_VIEWS": 4, "VIDEO_FRAMES": 3}
    metrics = train.train(cfg)
    first, last = metrics["history"][0]["psnr"], metrics["val_psnr"]
    assert last > first + 4.0 and last > 19.0, (first, last)
    out = cfg["OUT_DIR"]
    for name in ("ckpt.pt", "config.json", "metrics.json", "video.mp4", "video.gif", "depth.mp4", "depth.gif"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f) == cfg
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 300 and set(ckpt) >= {"model", "optimizer", "generator", "config"}


@pytest.mark.parametrize("encoding", ["frequency", "hash"])
def test_resume_after_interruption_gives_the_same_parameters(encoding, small_cfg, tmp_path, monkeypatch):
    if encoding == "hash":  # exp7's model and optimiser (two parameter groups, epsilon 1e-15), a small table
        small_cfg.update({k: EXP7[k] for k in ("ENCODING", "LR", "HASH_LR", "ADAM_EPS")}, HASH_LOG2_SIZE=12)
    straight = {**small_cfg, "OUT_DIR": str(tmp_path / "straight")}
    train.train(straight)
    expected = torch.load(os.path.join(straight["OUT_DIR"], "ckpt.pt"), weights_only=True)

    real_save = train.save_checkpoint

    def save_then_die(ckpt, path):
        real_save(ckpt, path)
        if ckpt["step"] == 20:
            raise KeyboardInterrupt  # killed right after the step-20 checkpoint

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.train(small_cfg)
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    metrics = train.train(small_cfg)
    resumed = torch.load(os.path.join(small_cfg["OUT_DIR"], "ckpt.pt"), weights_only=True)
    assert resumed["step"] == expected["step"] == 40
    for k, v in expected["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    with open(os.path.join(straight["OUT_DIR"], "metrics.json")) as f:
        assert metrics["val_psnr"] == json.load(f)["val_psnr"]


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
    from configs import EXP1

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


def test_a_resume_applies_changed_optimizer_settings_and_records_what_ran(small_cfg, capsys):
    """load_state_dict put the checkpoint's weight decay, eps and AMSGrad back while config.json said otherwise."""
    train.train({**small_cfg, "MAX_STEPS": 10})
    changed = {"WEIGHT_DECAY": 0.5, "ADAM_EPS": 1e-3, "AMSGRAD": True}
    train.train({**small_cfg, **changed, "MAX_STEPS": 20})
    assert "WEIGHT_DECAY=0.0 (this run: 0.5), ADAM_EPS=1e-08 (this run: 0.001), AMSGRAD=False (this run: True)" \
        in capsys.readouterr().err
    ckpt = torch.load(os.path.join(small_cfg["OUT_DIR"], "ckpt.pt"), weights_only=True)
    group = ckpt["optimizer"]["param_groups"][0]
    assert (group["weight_decay"], group["eps"], group["amsgrad"]) == (0.5, 1e-3, True)
    for state in ckpt["optimizer"]["state"].values():  # AMSGrad's running maximum was kept from step 11 on
        assert state["step"] == 20 and (state["max_exp_avg_sq"] >= state["exp_avg_sq"]).all()
    with open(os.path.join(small_cfg["OUT_DIR"], "config.json")) as f:
        recorded = json.load(f)
    assert {k: recorded[k] for k in changed} == changed


def test_a_resume_applies_a_changed_hash_table_lr(small_cfg):
    cfg = {**small_cfg, **{k: EXP7[k] for k in ("ENCODING", "LR", "HASH_LR", "ADAM_EPS")}, "HASH_LOG2_SIZE": 12}
    train.train({**cfg, "MAX_STEPS": 10})
    train.train({**cfg, "HASH_LR": 3e-2, "MAX_STEPS": 20})
    rest, table = torch.load(os.path.join(cfg["OUT_DIR"], "ckpt.pt"), weights_only=True)["optimizer"]["param_groups"]
    assert table["lr_scale"] == pytest.approx(3.0) and table["lr"] == pytest.approx(3 * rest["lr"])


def test_a_checkpoint_is_never_resumed_on_other_data_and_is_kept(small_cfg, tmp_path, monkeypatch):
    """It resumed a synthetic-scene run on lego without a word, and the final line called it a lego run."""
    import numpy as np

    from conftest import write_blender
    from dataset import synthetic_scene

    train.train({**small_cfg, "MAX_STEPS": 5})
    out = Path(small_cfg["OUT_DIR"])
    before = {name: (out / name).read_bytes() for name in ("ckpt.pt", "config.json")}
    npz = tmp_path / "scene.npz"
    np.savez(npz, **dict(zip(("images", "poses", "focal"), synthetic_scene(n_views=6, size=16), strict=True)))
    with pytest.raises(UserError, match=rf"ckpt.pt was trained on other data: data=synthetic \(this run: {npz}\), "
                                        r"resolution=48x48 \(this run: 16x16\), far=5.0 \(this run: 6.0\); use "
                                        r"another --out_dir or delete ckpt.pt \(or pass --data=synthetic"):
        train.train({**small_cfg, "DATA": str(npz), "MAX_STEPS": 10})
    assert {name: (out / name).read_bytes() for name in before} == before
    folder = write_blender(tmp_path / "scene", *synthetic_scene(n_views=6, size=16))  # white, then black
    white = {**small_cfg, "DATA": folder, "OUT_DIR": str(tmp_path / "white"), "MAX_STEPS": 5}
    train.train(white)
    with pytest.raises(UserError, match=r"other data: background=white \(this run: black\); use another"):
        train.train({**white, "BACKGROUND": "black", "MAX_STEPS": 10})
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    monkeypatch.chdir(moved)  # the same folder by another path resumes
    assert train.train({**white, "DATA": os.path.relpath(folder), "MAX_STEPS": 10})["steps"] == 10


def test_data_auto_resumes_on_the_checkpoints_data_only_if_it_asked_for_auto_too(small_cfg, tmp_path, monkeypatch):
    import numpy as np

    import dataset

    monkeypatch.setenv("NERF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(dataset, "TINY_NERF_URL", "http://127.0.0.1:9/tiny_nerf_data.npz")  # offline
    auto, smoke = ({**small_cfg, "DATA": data, "OUT_DIR": str(tmp_path / data), "MAX_STEPS": 5}
                   for data in ("auto", "synthetic"))
    assert train.train(auto)["data"] == train.train(smoke)["data"] == "synthetic"
    np.savez(tmp_path / "src.npz", **dict(zip(("images", "poses", "focal"), dataset.synthetic_scene(6, 16),
                                              strict=True)))
    monkeypatch.setattr(dataset, "TINY_NERF_URL", f"file://{tmp_path / 'src.npz'}")  # back online
    assert train.train({**auto, "MAX_STEPS": 10})["data"] == "synthetic"  # 'auto' then and now: its own data
    with pytest.raises(UserError, match=r"other data: data=synthetic \(this run: tiny_nerf\).*--data=synthetic"):
        train.train({**smoke, "DATA": "auto", "MAX_STEPS": 10})  # a plain exp1.py after a --data=synthetic smoke


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


def test_ctrl_c_ends_the_step_checkpoints_and_a_rerun_ends_like_an_uninterrupted_run(small_cfg, tmp_path,
                                                                                     monkeypatch):
    import signal

    straight = {**small_cfg, "OUT_DIR": str(tmp_path / "straight"), "CKPT_EVERY": 1000}
    train.train(straight)
    real_lr = train.learning_rate

    def ctrl_c_during_step_8(cfg, step, *args):
        if step == 7:  # mid-step: the batch of step 8 is still to be drawn and trained
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr(cfg, step, *args)

    monkeypatch.setattr(train, "learning_rate", ctrl_c_during_step_8)
    before = signal.getsignal(signal.SIGINT)
    cfg = {**small_cfg, "CKPT_EVERY": 1000}  # no periodic checkpoint: the stop must write its own
    with pytest.raises(train.Interrupted, match="SIGINT at step 8: checkpoint written to .*rerun") as stopped:
        train.train(cfg)
    assert stopped.value.code == 130
    assert torch.load(os.path.join(cfg["OUT_DIR"], "ckpt.pt"), weights_only=True)["step"] == 8
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    monkeypatch.setattr(train, "learning_rate", real_lr)
    train.train(cfg)
    a = torch.load(os.path.join(straight["OUT_DIR"], "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(cfg["OUT_DIR"], "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 40
    for k, v in a["model"].items():
        assert torch.equal(b["model"][k], v), k


def test_sigterm_at_the_command_line_checkpoints_and_exits_143(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "exp1.py", *FAST, "--max_steps=100000", "--ckpt_every=5",
                             f"--out_dir={out}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped: SIGTERM at step ") and "rerun the same command to resume" in last, last
    step = int(last.split("at step ")[1].split(":")[0])
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == step > 0


KILL_DURING_SAVE = """
import os, signal, sys, torch, train
real = torch.save
def save(obj, f, **kwargs):
    if isinstance(obj, dict) and obj.get("step") == 20:
        f.write(b"half a checkpoint"); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
    real(obj, f, **kwargs)
torch.save = save
train.main(__import__("configs").EXP1, sys.argv[1:])
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(small_cfg, tmp_path):
    args = [f"--{k.lower()}={v}" for k, v in small_cfg.items() if k not in ("EXPERIMENT",)]
    killed = run_cli("-c", KILL_DURING_SAVE, *args)
    assert killed.returncode == -9, killed.stderr
    path = os.path.join(small_cfg["OUT_DIR"], "ckpt.pt")
    assert os.path.getsize(path + ".tmp") > 0  # the half-written file is there, under its temp name
    assert torch.load(path, weights_only=True)["step"] == 10  # the previous checkpoint is intact
    rerun = run_cli("exp1.py", *args)
    assert rerun.returncode == 0 and "resuming" in rerun.stderr and "at step 10" in rerun.stderr, rerun.stderr
    assert torch.load(path, weights_only=True)["step"] == 40 and not os.path.exists(path + ".tmp")


def test_disk_full_during_training_is_a_clear_error_and_keeps_the_last_checkpoint(small_cfg):
    train.train({**small_cfg, "MAX_STEPS": 10})
    path = os.path.join(small_cfg["OUT_DIR"], "ckpt.pt")
    before = Path(path).read_bytes()
    os.symlink("/dev/full", path + ".tmp")  # the next checkpoint write hits a full disk (ENOSPC)
    with pytest.raises(UserError, match=r"could not write .*ckpt.pt \(No space left on device\); the previous one"):
        train.train({**small_cfg, "MAX_STEPS": 30})
    assert Path(path).read_bytes() == before and not os.path.lexists(path + ".tmp")
    assert torch.load(path, weights_only=True)["step"] == 10


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(small_cfg, monkeypatch):
    train.train({**small_cfg, "MAX_STEPS": 10})
    path = os.path.join(small_cfg["OUT_DIR"], "ckpt.pt")
    before = Path(path).read_bytes()
    real, calls = train.render_rays, []

    def nan_from_the_second_call(*args, **kwargs):
        rgb, depth, acc = real(*args, **kwargs)
        calls.append(1)
        return (rgb * float("nan") if len(calls) >= 2 else rgb), depth, acc

    monkeypatch.setattr(train, "render_rays", nan_from_the_second_call)  # resumed at 10: step 12 goes bad
    with pytest.raises(UserError, match="non-finite loss or gradient at step 12"):
        train.train({**small_cfg, "MAX_STEPS": 30})
    assert Path(path).read_bytes() == before


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


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    one_line_error(run_cli("exp1.py", "--bogus=3"), "unknown key --bogus")
    one_line_error(run_cli("exp1.py", "--num_samples=0"), "must be > 0")
    one_line_error(run_cli("exp1.py", "--data=/no/such/file.npz", f"--out_dir={tmp_path / 'a'}"), "data not found")
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    one_line_error(run_cli("exp1.py", *FAST, f"--out_dir={blocker / 'sub'}"), "cannot write to --out_dir")
    assert blocker.read_text() == "keep me"
    one_line_error(run_cli("exp2.py", *FAST, "--dtype=float16", "--device=cpu", f"--out_dir={tmp_path / 'b'}"),
                   "float16 needs CUDA")
    one_line_error(run_cli("exp5.py", *FAST, "--ddp_backend=nccl", f"--out_dir={tmp_path / 'c'}",
                           env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                "MASTER_PORT": "29599"}), "nccl needs CUDA")
    one_line_error(run_cli("eval.py", str(tmp_path / "none")), "no checkpoint at")


def test_corrupt_or_mismatched_checkpoint_is_refused_and_kept(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    one_line_error(run_cli("exp1.py", *FAST, f"--out_dir={out}"), "not a readable checkpoint")
    assert (out / "ckpt.pt").read_bytes() == b"not a checkpoint"
    other = tmp_path / "other"
    assert run_cli("exp1.py", *FAST, f"--out_dir={other}").returncode == 0
    before = (other / "ckpt.pt").read_bytes()
    one_line_error(run_cli("exp1.py", *FAST, "--emb_dim=32", f"--out_dir={other}"),
                   "model of another shape: emb_dim=16 (this run: 32); pass its values as --key=value")
    assert (other / "ckpt.pt").read_bytes() == before
    ckpt = torch.load(other / "ckpt.pt", weights_only=True)  # as older code wrote it: the input not padded 63 -> 64
    ckpt["model"]["layers.0.weight"] = ckpt["model"]["layers.0.weight"][:, :63]
    torch.save(ckpt, other / "ckpt.pt")
    before = (other / "ckpt.pt").read_bytes()
    one_line_error(run_cli("exp1.py", *FAST, f"--out_dir={other}"), "do not fit this version's model")
    one_line_error(run_cli("eval.py", str(other)), "do not fit this version's model")
    assert (other / "ckpt.pt").read_bytes() == before


def test_wandb_offline_without_a_key_writes_a_local_run(small_cfg, monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, so 'auto' must go offline
    cfg = {**small_cfg, "WANDB": "auto", "MAX_STEPS": 10, "EVAL_EVERY": 5}
    train.train(cfg)
    runs = [d for d in os.listdir(os.path.join(cfg["OUT_DIR"], "wandb")) if d.startswith("offline-run")]
    assert len(runs) == 1


def test_lego_tiny_psnr_rises(lego_tiny, small_cfg):
    """Real data: a minute of training clearly beats the untrained model on held-out lego views."""
    cfg = {**small_cfg, "DATA": lego_tiny, "MAX_STEPS": 400, "EVAL_EVERY": 50, "EVAL_VIEWS": 2,
           "NUM_LAYERS": 8, "NUM_SAMPLES": 64, "BATCH_SIZE": 1024, "CHUNK": 4096}
    metrics = train.train(cfg)
    assert metrics["val_psnr"] > 17.0 and metrics["val_psnr"] > metrics["history"][0]["psnr"] + 3.0, metrics


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


def test_sigkill_at_a_random_moment_then_rerun_ends_like_an_uninterrupted_run(tmp_path):
    """A real SIGKILL (no cleanup runs) after the first checkpoint; the same command then finishes the job."""
    import random
    import signal
    import time

    args = [*FAST, "--emb_dim=32", "--num_layers=4", "--max_steps=80", "--ckpt_every=20", "--batch_size=256"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_cli("exp1.py", *args, f"--out_dir={straight}").returncode == 0
    proc = subprocess.Popen([sys.executable, "exp1.py", *args, f"--out_dir={killed}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(random.uniform(0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(killed / "ckpt.pt", weights_only=True)["step"] < 80  # it really was cut short
    res = run_cli("exp1.py", *args, f"--out_dir={killed}")
    assert res.returncode == 0, res.stderr
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(killed / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 80
    for k, v in a["model"].items():
        assert torch.equal(b["model"][k], v), k


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
        renders.append((out[0].detach(), out[2].detach()))
        return out

    def recording_batch(*args, **kwargs):
        rays, target = real_batch(*args, **kwargs)
        targets.append(target)
        return rays, target

    monkeypatch.setattr(train, "render_rays", recording_render)
    monkeypatch.setattr(train, "sample_batch", recording_batch)
    cfg = {**small_cfg, "OPACITY_REG": 0.5, "MAX_STEPS": 50, "LOG_EVERY": 5}  # strong: mixing it in would show;
    # 50 steps: warm-up (a tenth of the run) lasts to step 5, where the regulariser has not won yet
    metrics = train.train(cfg)
    for point in metrics["curve"]:
        (rgb, acc), target = renders[point["step"] - 1], targets[point["step"] - 1]
        assert point["loss"] == pytest.approx(F.mse_loss(rgb, target).item(), rel=1e-6)
        assert point["opacity_reg"] == pytest.approx(0.5 * (acc * (1 - acc)).mean().item(), rel=1e-5)
    assert metrics["curve"][0]["opacity_reg"] > 0.1 * metrics["curve"][0]["loss"]  # at step 5, before it wins


def test_a_checkpoint_written_before_a_key_existed_resumes_with_its_default(small_cfg):
    train.train({**small_cfg, "MAX_STEPS": 10})
    path = os.path.join(small_cfg["OUT_DIR"], "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    for key in ("DENSITY_ACT", "LAUNCH", "ERT_TRANSMITTANCE"):  # as an older version wrote it
        del ckpt["config"][key]
    torch.save(ckpt, path)
    assert train.train({**small_cfg, "MAX_STEPS": 20})["steps"] == 20


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
    import utils

    real, seen = utils.OccupancyGrid.update, []

    def recording_update(self, model, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(self, model, *args, **kwargs)

    monkeypatch.setattr(utils.OccupancyGrid, "update", recording_update)
    train.train({**small_cfg, "DTYPE": "bfloat16", "MAX_STEPS": 17})
    assert seen == [False]
