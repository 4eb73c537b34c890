"""view.py and --viewer=true: the camera conversion, the server on loopback, bad input, a real browser showing the
scene, and training that takes the same steps with the viewer on."""
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
from browser import Browser, chromium, free_port

import train
import view
from configs import EXP7
from conftest import ROOT, one_line_error, run_cli, small
from dataset import scene_of
from eval import load_field
from render import Frame, render_view
from utils import load_checkpoint


@pytest.fixture(scope="module")
def hash_run(tmp_path_factory):
    """A 150-step hash model of the synthetic scene (it shows its shapes): its run directory."""
    cfg = {**small(tmp_path_factory.mktemp("viewer") / "run"),
           **{k: EXP7[k] for k in ("ENCODING", "LR", "HASH_LR", "ADAM_EPS", "USE_VIEWDIRS")},
           "MAX_STEPS": 150, "HASH_LOG2_SIZE": 14, "CKPT_EVERY": 1000}
    train.train(cfg)
    return cfg["OUT_DIR"]


def loaded(run_dir):
    """A run's config, training views, scene and renderer, as view.py loads them."""
    ckpt = load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
    cfg = ckpt["config"]
    scene = scene_of(cfg, ("train",), Frame.of(cfg["FRAME"]))
    model, grid = load_field(ckpt, cfg, scene.frame, torch.device("cpu"), run_dir)
    return cfg, scene.splits["train"], scene, model, grid


def test_a_training_camera_seen_through_the_viewer_renders_as_eval_renders_it(hash_run):
    cfg, views, scene, model, grid = loaded(hash_run)
    render = view.field_renderer(model, scene, cfg, grid, torch.autocast("cpu", enabled=False))
    for k in (0, 5):
        c2w = views.cameras.poses[k]
        wxyz, position = view.viser_pose(c2w)  # what a browser at this camera reports
        torch.testing.assert_close(view.camera_pose(wxyz, position), c2w, rtol=0, atol=1e-6)
        H, W = views.cameras.hw(k)
        fov = 2 * math.atan(H / 2 / views.cameras.intrinsics[k, 1].item())
        seen = render(view.viewer_camera(wxyz, position, fov, view.frame_size(W / H, longest=max(H, W))))
        model.eval()
        with torch.no_grad():
            evaluated = render_view(model, views.cameras[k], scene, cfg, grid, torch.autocast("cpu", enabled=False))
        torch.testing.assert_close(seen[0], evaluated[0], rtol=0, atol=1e-5)  # the pixels
        for a, b in zip(seen[1:], evaluated[1:], strict=True):  # depth and opacity: a pose through a quaternion in
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)  # float64 moves rays by ~1e-7, an edge's depth by 1e-5
        assert evaluated[0].std() > 0.05  # a scene, not a blank


def test_view_py_listens_on_loopback_serves_its_page_and_stops_cleanly(hash_run):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "view.py", hash_run, f"--port={port}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as page:
                    assert page.status == 200 and b"<html" in page.read().lower()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
                time.sleep(0.3)
        outside = [a for a in {i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
                   if not a.startswith("127.")]
        for address in outside:  # this machine's other addresses: nobody listens there
            with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
                pass
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err[-2000:]


def test_a_bad_checkpoint_or_a_busy_port_is_one_line_and_exit_2(hash_run, tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    one_line_error(run_cli("view.py", str(bad)), "not a readable checkpoint")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        res = run_cli("view.py", hash_run, "--host=0.0.0.0", f"--port={taken.getsockname()[1]}")
    one_line_error(res, "cannot listen on 0.0.0.0")
    assert "warning: the viewer listens on 0.0.0.0" in res.stderr  # not loopback: said before anything else


def canvas_matches(shot, expected):
    """Whether a screenshot (H, W, 3 uint8) shows the expected render (h, w, 3 in [0, 1]), stretched over it as
    viser draws a background: compared at the render's size away from the panel (top right) and the axes (bottom
    left). Returns (mean absolute difference, that of a uniform image of the render's mean)."""
    from PIL import Image

    h, w = expected.shape[:2]
    small_shot = np.asarray(Image.fromarray(shot).resize((w, h), Image.BOX), dtype=np.float32) / 255
    rows, cols = slice(int(0.3 * h), int(0.9 * h)), slice(int(0.15 * w), int(0.65 * w))
    a, b = small_shot[rows, cols], expected[rows, cols]
    return float(np.abs(a - b).mean()), float(np.abs(b - b.mean()).mean())


@pytest.mark.skipif(chromium() is None, reason="chromium not installed (.ci/run installs it)")
def test_a_browser_shows_the_scene_the_viewer_renders(hash_run):
    viewer = view.open_viewer(hash_run, port=0, max_res=240)
    viewer.show_cameras(False)  # the frustums would be drawn over the picture compared
    done = threading.Event()
    thread = threading.Thread(target=lambda: [(viewer.poll(), time.sleep(0.01)) for _ in iter(done.is_set, True)])
    thread.start()
    browser = Browser(width=800, height=600)
    try:
        browser.open(f"http://127.0.0.1:{viewer.port}/")
        deadline, result = time.monotonic() + 90, None
        while time.monotonic() < deadline:  # the first sharp frame, then until the page shows it
            client = next(iter(viewer.views.values()), None)
            if viewer.sharp_frames and client is not None and client.sharp:
                wxyz, position, fov, aspect = client.camera
                expected = viewer.render(view.viewer_camera(wxyz, position, fov, viewer.sharp_size(aspect)))
                result = canvas_matches(browser.screenshot(), expected[0].numpy())
                if result[0] < 0.35 * result[1]:
                    break
            time.sleep(0.5)
        assert result is not None and result[0] < 0.35 * result[1], result
    finally:
        browser.close()
        done.set()
        thread.join()
        viewer.close()


def test_training_with_the_viewer_on_and_a_browser_watching_takes_the_same_steps(tmp_path, monkeypatch):
    frames = []
    poll = view.Viewer.poll

    def watched(self, step=None):  # a browser at a training camera: a frame of the changing model between steps
        poll(self, step)
        wxyz, position = view.viser_pose(self.cameras_seen.poses[0])
        frames.append(self.render(view.viewer_camera(wxyz, position, 0.7, (24, 24)))[0])

    def opened(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.cameras_seen = args[2]

    init = view.Viewer.__init__
    monkeypatch.setattr(view.Viewer, "poll", watched)
    monkeypatch.setattr(view.Viewer, "__init__", opened)
    runs = {}
    for on in (False, True):
        cfg = {**small(tmp_path / str(on)), "MAX_STEPS": 12, "VIEWER": on, "VIEWER_PORT": 0}
        train.train(cfg)
        runs[on] = torch.load(os.path.join(cfg["OUT_DIR"], "ckpt.pt"), weights_only=True)["model"]
    assert len(frames) == 12 and not torch.equal(frames[0], frames[-1])  # it watched the model change
    for k in runs[False]:
        assert torch.equal(runs[False][k], runs[True][k]), k


def test_an_error_while_rendering_is_shown_in_the_panel_and_the_server_stays_up(capsys):
    def broken(camera, stop=None):
        raise RuntimeError("out of memory, say")

    viewer = view.Viewer(broken, Frame(), port=0)
    try:
        watching = viewer.views[0] = view.ClientView(client=None)  # a browser that moved its camera
        watching.moved_to((np.array([1.0, 0, 0, 0]), np.array([0.0, 0, 4]), 0.7, 1.0))
        viewer.poll()
        assert "render failed: RuntimeError: out of memory, say" in viewer.error.content
        assert "Traceback" in capsys.readouterr().err  # and in the log
        viewer.poll()
        assert "Traceback" not in capsys.readouterr().err  # not retried until the camera moves again
        with urllib.request.urlopen(f"http://127.0.0.1:{viewer.port}/", timeout=10) as page:
            assert page.status == 200
    finally:
        viewer.close()
