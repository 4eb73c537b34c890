"""Shared fixtures: the repo on sys.path, the real data beside the repo, small fast configs."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
sys.path.insert(0, ROOT)

from configs import EXP1  # noqa: E402


@pytest.fixture
def lego_tiny():
    """Path of ../shared/data/lego_tiny.npz; the test is skipped where it is absent."""
    path = os.path.join(SHARED_DATA, "lego_tiny.npz")
    if not os.path.exists(path):
        pytest.skip("../shared/data/lego_tiny.npz not present")
    return path


@pytest.fixture
def small_cfg(tmp_path):
    """A seconds-long exp1 on the synthetic scene: small MLP, no compile, no wandb, no video."""
    return {**EXP1, "DATA": "synthetic", "OUT_DIR": str(tmp_path / "run"), "NUM_LAYERS": 4,
            "NUM_SAMPLES": 32, "BATCH_SIZE": 512, "MAX_STEPS": 40, "WARMUP_STEPS": 5, "EVAL_EVERY": 0,
            "CKPT_EVERY": 10, "LOG_EVERY": 10, "VIDEO_FRAMES": 0, "COMPILE": False, "WANDB": "disabled",
            "CHUNK": 1024}
