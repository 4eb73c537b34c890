"""No credentials in the repository, and every torch.load restricted to weights_only=True."""
import re
import subprocess

from conftest import ROOT

KEY_SHAPES = [
    re.compile(r"\b[0-9a-f]{40}\b"),  # a W&B API key: 40 hex characters
    re.compile(r"wandb_v1_[A-Za-z0-9_]{20,}"),  # the newer W&B key format
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),  # GitHub token
    re.compile(r"\bsk-[A-Za-z0-9]{20,}\b"),  # OpenAI-style secret key
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def tracked_text_files():
    """(path, text) of every file git tracks, binary files skipped."""
    paths = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for path in paths:
        try:
            yield path, open(f"{ROOT}/{path}", encoding="utf-8").read()
        except (UnicodeDecodeError, FileNotFoundError):
            continue


def test_the_key_patterns_catch_keys():
    assert KEY_SHAPES[0].search("WANDB_API_KEY=" + "0123456789abcdef" * 2 + "01234567")
    assert KEY_SHAPES[3].search("token ghp_" + "a1B2" * 9)


def test_no_api_key_shaped_strings_are_tracked():
    found = [(path, m.group()[:8] + "…") for path, text in tracked_text_files()
             for pattern in KEY_SHAPES for m in pattern.finditer(text)]
    assert not found, found


def test_every_torch_load_uses_weights_only():
    calls = [(path, line.strip()) for path, text in tracked_text_files() if path.endswith(".py")
             for line in text.splitlines() if "torch.load(" in line and "weights_only=True" not in line]
    assert not calls, calls
