"""More than one machine: two torchrun nodes (c10d rendezvous on localhost, gloo) take the same steps as one
process, and a checkpoint resumes when the world size changes (2 -> 1 and 1 -> 2 processes)."""
import shutil
import socket

import pytest
import torch

from conftest import run_cli
from test_ddp import ENV, TINY, final_model, finish, torchrun

# constant LR (no warm-up, no decay): a run stopped at step 6 and resumed to 12 follows the same schedule as one
# run of 12, whatever MAX_STEPS each part had
ARGS = ["exp5.py", *TINY, "--eval_every=0", "--ckpt_every=1000", "--compile=false", "--warmup_steps=0",
        "--min_lr=2e-3", "--lr=2e-3"]


def free_port():
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process(out_dir, steps):
    """Train (or resume) exp5 as one process to the given step."""
    res = run_cli(*ARGS, f"--max_steps={steps}", f"--out_dir={out_dir}", env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]


def launch_two_nodes(out_dirs, steps, tmp_path):
    """Run exp5 on two torchrun 'nodes' of one process each (node K writing to out_dirs[K]), rendezvousing over
    c10d on localhost; each node's (exit code, output)."""
    port = free_port()
    procs = [torchrun(*ARGS, f"--max_steps={steps}", f"--out_dir={out_dir}", log=tmp_path / f"node{node}.log", nproc=1,
                      rendezvous=("--nnodes=2", f"--node_rank={node}", "--rdzv-backend=c10d",
                                  f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test"))
             for node, out_dir in enumerate(out_dirs)]
    return [finish(proc, tmp_path / f"node{node}.log", timeout=240) for node, proc in enumerate(procs)]


def two_nodes(out_dir, steps, tmp_path):
    """Train exp5 on two torchrun 'nodes' sharing out_dir."""
    for node, (code, out) in enumerate(launch_two_nodes([out_dir, out_dir], steps, tmp_path)):
        assert code == 0, (node, out[-3000:])


def assert_same(a, b, atol):
    """Two model states agree to atol in every tensor (each atol: 10x or more the difference in docs/scale.md)."""
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process: its checkpoint after 6 steps (a copy) and its model after 12 (resumed from the 6)."""
    base = tmp_path_factory.mktemp("reference")
    one_process(base / "run", 6)
    shutil.copytree(base / "run", base / "at6")
    one_process(base / "run", 12)
    return base / "at6", final_model(base / "run")


def test_two_nodes_equal_one_process_and_resume_on_one(reference, tmp_path):
    at6, at12 = reference
    two_nodes(tmp_path / "run", 6, tmp_path)
    assert_same(final_model(tmp_path / "run"), final_model(at6), atol=1e-5)
    one_process(tmp_path / "run", 12)  # a node is lost: the 2-process checkpoint resumes on 1
    assert_same(final_model(tmp_path / "run"), at12, atol=5e-4)


def test_one_process_checkpoint_resumes_on_two(reference, tmp_path):
    at6, at12 = reference
    shutil.copytree(at6, tmp_path / "run")
    log = tmp_path / "log"
    code, out = finish(torchrun(*ARGS, "--max_steps=12", f"--out_dir={tmp_path / 'run'}", log=log), log)
    assert code == 0, out[-3000:]
    assert "resuming" in out
    assert_same(final_model(tmp_path / "run"), at12, atol=1e-5)


def test_a_node_that_cannot_see_the_checkpoint_stops_the_run(reference, tmp_path):
    at6, _ = reference
    shutil.copytree(at6, tmp_path / "shared")  # node 0 sees the checkpoint, node 1 an empty folder of its own
    results = launch_two_nodes([tmp_path / "shared", tmp_path / "local"], 12, tmp_path)
    assert all(code != 0 for code, _ in results)
    assert any("some cannot see" in out and "storage every node sees" in out for _, out in results)
    assert torch.load(tmp_path / "shared" / "ckpt.pt", weights_only=True)["step"] == 6  # left as it was
