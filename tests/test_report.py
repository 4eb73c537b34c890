"""report.py: one command runs every experiment and writes a results table, curves and GIFs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import configs
import report
from configs import UserError
from conftest import ROOT, check_quick_report, run_cli, table_rows


def test_quick_report_runs_experiments_and_writes_a_table_that_parses(tmp_path):
    """exp7 (the hash model, fine samples) and exp7-bitnerf (exported), eager: a config override reaches an experiment
    after a variant's own flags (exp7-bitnerf's --compile=true). test_bitnerf's quick report runs a compiled BitNeRF
    under torchrun."""
    readme = Path(ROOT) / "README.md"
    readme_before = readme.read_text()
    exps = ["exp7", "exp7-bitnerf"]  # exp7-bitnerf as wide as exp7 (64): eager ternary layers validate slowly
    assert [r["experiment"] for r in check_quick_report(tmp_path, exps, "--compile=false", "--emb_dim=64")] == exps
    assert json.loads((tmp_path / "exp7-bitnerf" / "metrics.json").read_text())["compile_seconds"] == 0
    assert readme.read_text() == readme_before  # --quick never rewrites the README


def test_ddp_experiments_take_two_processes_or_one_per_gpu(monkeypatch):
    args = report.parse_args(["--out_dir=x"])
    nproc = lambda exp: [a for a in report.command(exp, args, "run") if a.startswith("--nproc")]  # noqa: E731
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert nproc("exp5") == nproc("exp6") == ["--nproc_per_node=2"] and nproc("exp1") == []
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    for gpus, procs in ((1, 1), (2, 2), (8, 2)):  # nccl: a GPU per rank
        monkeypatch.setattr("torch.cuda.device_count", lambda gpus=gpus: gpus)
        assert nproc("exp6") == [f"--nproc_per_node={procs}"]


def test_each_scene_of_a_multi_scene_report_trains_its_own_data_in_its_own_folders():
    args = report.parse_args(["--out_dir=x", "--media_dir=m", "--only=exp7", "--scenes=synthetic,synthetic@2"])
    assert args.readme is None  # a multi-scene report never rewrites the README's table
    one, two = (report.scene_args(args, scene) for scene in args.scenes)
    cmd = report.command("exp7", two, report.run_dir_of(two, "exp7", 0))
    assert {"--data=synthetic", "--downscale=2", f"--out_dir={os.path.join('x', 'synthetic1', 'exp7')}"} <= set(cmd)
    assert (one.out_dir, one.media_dir, one.downscale) == (os.path.join("x", "synthetic"),
                                                           os.path.join("m", "synthetic"), None)
    runs = [{"val_psnr": 30.0, "val_ssim": 0.9, "export_psnr": 29.0, "export_ssim": 0.8, "export_bytes": 1000},
            {"val_psnr": 32.0, "val_ssim": 0.8, "export_psnr": 30.0, "export_ssim": 0.9, "export_bytes": 1000}]
    assert report.mean_scores(runs) == pytest.approx({"psnr": 31.0, "ssim": 0.85, "export_psnr": 29.5,
                                                      "export_ssim": 0.85, "export_kb": 1.0})
    with pytest.raises(UserError, match="--data=nowhere: no such file"):
        report.parse_args(["--out_dir=x", "--scenes=synthetic,nowhere"])


def test_the_table_names_what_each_model_stores_its_weights_in():
    hash_bit = {**configs.EXP7, "MODEL": "bitnerf", "HASH_TABLE_BITS": 8}
    assert [report.bits_per_weight(c) for c in (configs.EXP1, configs.EXP4, configs.EXP7, hash_bit)] == [
        "32", "1.58 (2 packed)", "32", "1.58, table 8"]
    assert report.precision(hash_bit) == "ternary QAT, 8-bit table" and report.precision(configs.EXP4) == "ternary QAT"


def test_a_full_report_validates_at_each_eighth_of_the_budget_a_quick_one_at_half():
    marks = lambda *argv: next(a for a in report.command("exp1", report.parse_args([*argv, "--out_dir=x"]), "run")  # noqa: E731
                               if a.startswith("--eval_at_s="))
    assert marks("--budget_s=8") == "--eval_at_s=1,2,3,4,5,6,7"
    assert marks("--quick", "--budget_s=4") == "--eval_at_s=2"


def test_a_report_at_800_px_trains_each_preset_under_the_recipe_for_its_own_budget():
    cmd = report.command("exp7", report.parse_args(["--out_dir=x", "--recipe=cpu800", "--budget_s=3600"]), "run")
    cfg = configs.apply_overrides(configs.EXP7, [a for a in cmd if a.startswith("--")])
    assert (cfg["RECIPE"], cfg["DOWNSCALE"], cfg["TIME_BUDGET_S"]) == ("cpu800", 1, 3600.0)
    assert {"600", "1800", "3150"} <= set(cfg["EVAL_AT_S"].split(","))  # 10 and 30 minutes, the curve's last eighth


def test_the_psnr_curve_ends_at_the_final_evaluation_the_table_reports():
    history = lambda final: [{"step": 10, "train_seconds": 2.1, "psnr": 20.0, "at_s": [2.0]},  # noqa: E731
                             {"step": 15, "train_seconds": 3.0, "psnr": 21.0},  # an EVAL_EVERY one on fewer views
                             {"step": 30, "train_seconds": 4.0, "psnr": final}]  # the final one: no mark
    t, mean, std = report.psnr_band([{"history": history(22.0)}, {"history": history(24.0)}])
    assert list(t) == [2.0, 4.0] and list(mean) == [20.0, 23.0] and std[1] > 0


def test_report_rewrites_only_the_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_BEGIN}\nold table\n{report.README_END}\nlicense\n")
    report.update_readme(str(readme), "new table\n")
    assert readme.read_text() == f"intro\n{report.README_BEGIN}\nnew table\n{report.README_END}\nlicense\n"
    readme.write_text("no markers\n")
    with pytest.raises(UserError):
        report.update_readme(str(readme), "new table\n")
    assert readme.read_text() == "no markers\n"


def test_only_a_full_report_writes_media_and_the_readme(tmp_path):
    full = report.parse_args([f"--out_dir={tmp_path}"])
    assert full.media_dir == os.path.join(ROOT, "media") and full.readme == os.path.join(ROOT, "README.md")
    for partial in (["--only=exp1,exp4"], ["--quick"], ["--emb_dim=32"]):
        args = report.parse_args([*partial, f"--out_dir={tmp_path}"])
        assert args.media_dir == str(tmp_path) and args.readme is None, partial


def test_the_report_names_the_commit_its_runs_trained_on_read_before_it_wrote_media(monkeypatch, tmp_path):
    """A full report writes the tracked media/ before results.md: the commit read then always looked modified."""
    tree = {"state": "abc1234"}
    monkeypatch.setattr(report, "commit", lambda: tree["state"])

    def train_then_dirty_the_tree(args, argv):
        tree["state"] = "abc1234 with uncommitted changes"  # as copying the GIFs into media/ does
        return {"exp1": [{"resolution": "100x100", "background": "black"}]}, [{"experiment": "exp1"}]
    written = []
    monkeypatch.setattr(report, "run_all", train_then_dirty_the_tree)
    monkeypatch.setattr(report, "write_media", lambda results, rows, args, argv, total_s: written.append(
        report.results_markdown(rows, results, args, argv, total_s)))
    report.main(["--only=exp1", f"--out_dir={tmp_path}"])
    assert "code of commit abc1234 — " in written[0]


def test_the_readme_block_links_the_gifs_that_results_md_shows(tmp_path):
    """The README stays a manual under 15 KB: its results block links results.md for the orbits."""
    args = report.parse_args([f"--out_dir={tmp_path}"])
    args.commit = "abc1234"
    results, rows = {"exp1": [{"resolution": "100x100", "background": "black"}]}, [{"experiment": "exp1"}]
    block = report.results_markdown(rows, results, args, [], 60.0, "media/", gifs=False)
    assert "[media/results.md](media/results.md)" in block and ".gif" not in block
    assert "![exp1 orbit](media/exp1_rgb.gif)" in report.results_markdown(rows, results, args, [], 60.0, "media/")


def test_unknown_experiment_is_one_line_and_exit_2(tmp_path):
    out = run_cli("report.py", "--only=exp1,exp9", f"--out_dir={tmp_path}")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "exp9" in out.stderr
    assert not os.listdir(tmp_path)


def test_config_overrides_reach_every_experiment_after_its_own_flags_and_report_keys_are_refused():
    args = report.parse_args(["--out_dir=x", "--only=exp1,exp7-bitnerf", "--compile=false", "--emb_dim=32"])
    for exp in args.exps:
        cmd = report.command(exp, args, "run")
        assert cmd[-2:] == ["--compile=false", "--emb_dim=32"]
        assert configs.apply_overrides(configs.EXP1, cmd[2:])["COMPILE"] is False  # the last one wins
    metrics = dict.fromkeys(("val_psnr", "val_ssim", "world_size", "steps", "train_seconds", "wall_seconds",
                             "samples_per_s", "peak_mem_mb"), 1)
    row = report.table_row("exp1", [metrics], "run", (), ["--dtype=bfloat16"])
    assert row["precision"] == "fp32, bfloat16 autocast"  # the table describes what trained
    for bad, words in (("--seed=3", "--seed=3: the report sets it"), ("--emb_dim=x", "expected int"),
                       ("--nope=1", "unknown key --nope"), ("stray", "bad argument 'stray'")):
        with pytest.raises(UserError, match=words):
            report.parse_args(["--out_dir=x", "--only=exp1", bad])
    # checked as the runs will train: under the recipe (cpu800's finest grid 2048 is above this base resolution)
    report.parse_args(["--out_dir=x", "--only=exp7", "--recipe=cpu800", "--hash_base_res=512"])


def test_report_with_two_seeds_gives_mean_and_spread_and_groups_its_wandb_runs_offline(tmp_path):
    out_dir = tmp_path / "report-test-group"
    out = run_cli("report.py", "--quick", "--budget_s=2", "--only=exp1", "--seeds=2", f"--out_dir={out_dir}",
                  "--wandb=offline", "--num_layers=2", "--emb_dim=32", timeout=300)  # a small MLP validates faster
    assert out.returncode == 0, out.stderr[-3000:]
    row = table_rows((out_dir / "results.md").read_text())[0]
    mean, std = (float(x) for x in row["val PSNR"].split(" ± "))
    runs = [json.loads((out_dir / "exp1" / f"seed{k}" / "metrics.json").read_text()) for k in range(2)]
    assert mean == pytest.approx(np.mean([r["val_psnr"] for r in runs]), abs=0.006)
    spread = np.std([r["val_psnr"] for r in runs], ddof=1)
    assert std == pytest.approx(spread, abs=0.006) and spread > 0  # two seeds, two runs (the cell rounds to 0.01)
    assert json.loads((out_dir / "exp1" / "seed1" / "config.json").read_text())["SEED"] == configs.EXP1["SEED"] + 1
    assert "mean ± sample standard deviation over 2 seeds" in (out_dir / "results.md").read_text()
    assert (out_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for k in range(2):
        wandb_runs = list((out_dir / "exp1" / f"seed{k}" / "wandb").glob("offline-run-*/run-*.wandb"))
        # the group is a length-prefixed protobuf string field of the run record (the path in the config is not)
        assert len(wandb_runs) == 1 and bytes([len(out_dir.name)]) + out_dir.name.encode() in wandb_runs[0].read_bytes()


def processes_naming(text):
    """The pids of the live processes whose command line contains text (Linux: /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                pids.append(int(entry.name))
        except OSError:  # it ended while we looked
            pass
    return pids


def test_sigterm_and_sighup_take_one_handler_while_the_experiments_run(monkeypatch, tmp_path):
    """The signal test's SIGHUP case stands for SIGTERM: both stop the report the same way, then are put back."""
    seen = {}

    def run_all(args, argv):
        seen.update({s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)})
        return [], []
    monkeypatch.setattr(report, "run_all", run_all)
    with pytest.raises(SystemExit):
        report.main(["--quick", "--only=exp1", f"--out_dir={tmp_path}"])
    assert seen == {signal.SIGTERM: report.raise_stopped, signal.SIGHUP: report.raise_stopped}
    assert signal.getsignal(signal.SIGTERM) is not report.raise_stopped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_stops_the_report_and_its_experiment_at_a_checkpoint_with_nothing_in_media(tmp_path, signum):
    """Ctrl-C or a closed terminal's SIGHUP (SIGTERM takes SIGHUP's handler): the running experiment checkpoints and
    exits, nothing is left running (SIGTERM and SIGHUP orphaned it, and it went on writing its outputs) and media/
    gets nothing."""
    out_dir, media = tmp_path / "runs", tmp_path / "media"
    proc = subprocess.Popen([sys.executable, "report.py", "--quick", "--budget_s=60", "--only=exp1,exp3",
                             f"--out_dir={out_dir}", f"--media_dir={media}", "--wandb=disabled"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if ours ignores it
    log, deadline = out_dir / "exp1" / "log.txt", time.time() + 120
    try:
        while time.time() < deadline and not (log.exists() and "training exp1 on" in log.read_text()):
            time.sleep(0.1)  # exp1 has started training
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signum, err
        name = "Ctrl-C" if signum == signal.SIGINT else signum.name
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"stopped: {name} during exp1;"), err
        assert processes_naming(str(out_dir)) == []  # the experiment is not left running
        assert "stopped: SIGINT at step" in log.read_text()  # it checkpointed where it was
        assert (out_dir / "exp1" / "ckpt.pt").exists() and not (out_dir / "exp1" / "metrics.json").exists()
        assert not (out_dir / "exp3").exists()
        assert os.listdir(media) == []  # no GIF, curves or results.md of a half-done report
    finally:
        for pid in processes_naming(str(out_dir)):  # an orphan must not outlive the test
            os.kill(pid, signal.SIGKILL)
