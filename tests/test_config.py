"""Command-line overrides: matching, parsing, type and range errors."""
import pytest

from configs import EXP1, EXP2, EXP3, EXP4, EXP5, EXP6, ConfigError, apply_overrides, key_docs


def test_overrides_are_case_insensitive_and_typed():
    before = dict(EXP1)
    cfg = apply_overrides(EXP1, ["--lr=3e-3", "--NUM_SAMPLES=16", "--Compile=false", "--data=synthetic",
                                 "--max_steps=1e3", "--time_budget_s=60"])
    assert cfg["LR"] == 3e-3 and cfg["NUM_SAMPLES"] == 16 and cfg["COMPILE"] is False
    assert cfg["DATA"] == "synthetic" and cfg["MAX_STEPS"] == 1000 and cfg["TIME_BUDGET_S"] == 60.0
    assert EXP1 == before  # the preset itself is untouched


@pytest.mark.parametrize("arg, words", [
    ("--bogus=1", "unknown key --bogus; valid keys: .*num_samples"),
    ("--num_samples=abc", "expected int"),
    ("--num_samples=2.5", "expected int"),
    ("--compile=maybe", "expected bool"),
    ("--lr=fast", "expected float"),
    ("--num_samples=0", "must be > 0"),
    ("--lr=-1e-3", "must be > 0"),
    ("--device=tpu", "must be one of auto, cpu, cuda"),
    ("--wandb=sometimes", "must be one of"),
    ("--min_lr=1", "above --lr"),
    ("--adam_beta2=1", "must be below 1"),
    ("--train_threads=-2", "must be >= 0"),
    ("--hash_table_bits=9", "must be 2 ... 8"),
    ("--hash_finest_res=-1", "must be >= 0"),
    ("--hash_base_res=512", r"--hash_finest_res=0 \(0: the data's, 256 in a cube\) is below --hash_base_res=512"),
    ("lr=1", "use --key=value"),
    ("--lr", "use --key=value"),
])
def test_bad_overrides_name_the_problem(arg, words):
    with pytest.raises(ConfigError, match=words):
        apply_overrides(EXP1, [arg])


def test_every_preset_is_complete_and_valid():
    for preset in (EXP1, EXP2, EXP3, EXP4, EXP5, EXP6):
        assert set(preset) == set(EXP1)
        apply_overrides(preset, [])


def test_help_lists_every_key_with_the_presets_value_and_its_comment(capsys):
    from train import main

    assert set(key_docs()) == set(EXP1)  # every key has its one-line comment in configs.py
    main(EXP4, ["--lr=5", "--help"])  # prints and returns: no training, and no override is applied
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("usage: python ")
    row = {line.split()[0]: line for line in lines[2:]}
    assert len(row) == len(EXP4)
    assert "--lr=0.01" in row and "peak AdamW learning rate" in row["--lr=0.01"]
    assert "'nerf' (fp32 weights)" in row["--model=bitnerf"]
