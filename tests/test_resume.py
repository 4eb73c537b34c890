"""Stopping and resuming: a resumed run ends as an uninterrupted one, whatever stopped it (Ctrl-C, SIGTERM, SIGKILL,
a full disk, a NaN), keeps what was written, takes this run's settings and never another run's data or shape."""
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as evaluate
import train
from configs import EXP1, EXP7, UserError
from conftest import FAST, ROOT, main_error, run_cli, synthetic_capture


@pytest.mark.parametrize("encoding", ["frequency", "hash"])
def test_resume_after_interruption_gives_the_same_parameters(encoding, small_cfg, tmp_path, monkeypatch):
    if encoding == "hash":  # exp7's model and optimiser (two parameter groups, epsilon 1e-15), a small table, on a
        # transforms.json capture: the resumed run keeps the frame the first chose from its views; each step's batch
        # over two threads, whose jitter the run's generator seeds
        small_cfg.update({k: EXP7[k] for k in ("ENCODING", "LR", "HASH_LR", "ADAM_EPS", "ADAM_BETA2")},
                         HASH_LOG2_SIZE=12, DATA=synthetic_capture(tmp_path / "capture", list(range(16))),
                         TRAIN_THREADS=2)
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


def test_a_resume_applies_changed_optimizer_settings_and_records_what_ran(small_cfg, capsys):
    """load_state_dict put the checkpoint's weight decay, eps, betas and AMSGrad back while config.json said
    otherwise."""
    train.train({**small_cfg, "MAX_STEPS": 10})
    changed = {"WEIGHT_DECAY": 0.5, "ADAM_EPS": 1e-3, "ADAM_BETA2": 0.99, "AMSGRAD": True}
    train.train({**small_cfg, **changed, "MAX_STEPS": 20})
    assert "WEIGHT_DECAY=0.0 (this run: 0.5), ADAM_EPS=1e-08 (this run: 0.001), ADAM_BETA2=0.999 (this run: 0.99), " \
        "AMSGRAD=False (this run: True)" in capsys.readouterr().err
    ckpt = torch.load(os.path.join(small_cfg["OUT_DIR"], "ckpt.pt"), weights_only=True)
    group = ckpt["optimizer"]["param_groups"][0]
    assert (group["weight_decay"], group["eps"], tuple(group["betas"]), group["amsgrad"]) == (0.5, 1e-3, (0.9, 0.99),
                                                                                              True)
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
                                        r"resolution=48x48 \(this run: 16x16\); use another --out_dir or "
                                        r"delete ckpt.pt \(or pass --data=synthetic"):
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


def test_corrupt_or_mismatched_checkpoint_is_refused_and_kept(tmp_path, capsys):
    """Through the main the scripts call, in this process (test_train: one at the command line)."""
    exp1 = functools.partial(train.main, EXP1)
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    main_error(capsys, exp1, [*FAST, f"--out_dir={out}"], "not a readable checkpoint")
    assert (out / "ckpt.pt").read_bytes() == b"not a checkpoint"
    other = tmp_path / "other"
    exp1([*FAST, f"--out_dir={other}"])
    before = (other / "ckpt.pt").read_bytes()
    main_error(capsys, exp1, [*FAST, "--emb_dim=32", f"--out_dir={other}"],
               "model of another shape: emb_dim=16 (this run: 32); pass its values as --key=value")
    assert (other / "ckpt.pt").read_bytes() == before
    ckpt = torch.load(other / "ckpt.pt", weights_only=True)  # as older code wrote it: the input not padded 63 -> 64
    ckpt["model"]["layers.0.weight"] = ckpt["model"]["layers.0.weight"][:, :63]
    torch.save(ckpt, other / "ckpt.pt")
    before = (other / "ckpt.pt").read_bytes()
    main_error(capsys, exp1, [*FAST, f"--out_dir={other}"], "do not fit this version's model")
    main_error(capsys, evaluate.main, [str(other)], "do not fit this version's model")
    assert (other / "ckpt.pt").read_bytes() == before


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


def test_a_checkpoint_written_before_a_key_existed_resumes_with_its_default(small_cfg):
    train.train({**small_cfg, "MAX_STEPS": 10})
    path = os.path.join(small_cfg["OUT_DIR"], "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    for key in ("DENSITY_ACT", "LAUNCH", "ERT_TRANSMITTANCE"):  # as an older version wrote it
        del ckpt["config"][key]
    torch.save(ckpt, path)
    assert train.train({**small_cfg, "MAX_STEPS": 20})["steps"] == 20
