"""The house rules a reader relies on: imports run one way, and behaviour follows config keys, not names."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import configs
from conftest import ROOT

MODULES = {p.stem for p in Path(ROOT).glob("*.py")}
# what each module may import of the project; the loop (train) sits on the models and utilities, the tools on top
ALLOWED = {
    "configs": set(),
    "nerf": {"configs"},  # what a hash key at 0 means (hash_data_defaults) lives beside the keys
    "bitnerf_ddp": set(),
    "utils": {"configs"},
    "render": {"configs", "utils"},
    "dataset": {"configs", "render", "utils"},
    "bitnerf": {"configs", "nerf", "utils"},
    "train": {"bitnerf", "bitnerf_ddp", "configs", "dataset", "nerf", "render", "utils", "view"},
    **{f"exp{i}": {"configs", "train"} for i in range(1, 7)},
}


def project_imports(path):
    """The project modules a file imports anywhere in it (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & MODULES


def test_imports_run_one_way():
    found = {m: project_imports(Path(ROOT) / f"{m}.py") for m in ALLOWED}
    assert {m: found[m] - ALLOWED[m] for m in ALLOWED if found[m] - ALLOWED[m]} == {}
    # view: the viewer's server, which the loop opens with VIEWER on, and a tool (its command line loads runs through
    # eval and train). Both imports of that cycle sit in functions: view loads with the loop blocked (below)
    assert project_imports(Path(ROOT) / "view.py") <= {"configs", "dataset", "eval", "render", "train", "utils"}
    for tool in ("eval", "bench", "report"):  # the tools sit on top: nothing imports them but each other
        assert all(tool not in project_imports(Path(ROOT) / f"{m}.py") for m in ALLOWED), tool


def test_the_models_and_utilities_load_with_the_loop_blocked():
    code = ("import sys; sys.modules['train'] = None\n"  # any import of train now raises ImportError
            "import configs, nerf, utils, render, dataset, bitnerf, bitnerf_ddp, view\n"
            "bitnerf.main(['--help'])")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr[-2000:]


def test_behaviour_follows_config_keys_not_experiment_names():
    sources = {p.name: p.read_text() for p in Path(ROOT).glob("*.py") if p.name != "configs.py"}
    named = {name for name, text in sources.items() for exp in configs.PRESETS if f'"{exp}"' in text}
    assert named == set(), named
    assert {e for e, c in configs.PRESETS.items() if c["LAUNCH"] == "torchrun"} == {"exp5", "exp6"}
    def shape(i):
        return re.sub(r"(exp|EXP|Experiment )\d", r"\1N", (Path(ROOT) / f"exp{i}.py").read_text())
    assert all(shape(i) == shape(1) for i in range(2, len(configs.PRESETS) + 1))  # scripts differing in their preset


def test_no_function_is_longer_than_80_lines():
    long = [f"{p.name}:{n.name}" for p in Path(ROOT).glob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 80]
    assert long == []
