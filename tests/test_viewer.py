"""view.py and --viewer=true: the camera conversion, the server on loopback, bad input, a real browser showing the
scene, and training that takes the same steps with the viewer on."""
import functools
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace

import numpy as np
import pytest
import torch
from browser import Browser, chromium, free_port

import train
import view
from configs import EXP1, EXP7
from conftest import ROOT, main_error, one_line_error, run_cli, small
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


def as_viser_reports(c2w):
    """A camera-to-world pose (OpenGL axes) as a browser's viser camera reports it: the quaternion of the rotation
    whose columns are the camera's right, down and forward (viser's OpenCV convention), and its position."""
    import viser.transforms as vt

    right, up, back = (c2w[:3, i].double().numpy() for i in range(3))
    return vt.SO3.from_matrix(np.stack([right, -up, -back], 1)).wxyz, c2w[:3, 3].double().numpy()


def test_a_training_camera_seen_through_the_viewer_renders_as_eval_renders_it(hash_run):
    """Two training views, one cropped to 40x64 (not square: the vertical field of view and the aspect are told
    apart), as a browser at that camera reports it: the viewer's render equals eval's."""
    cfg, views, scene, model, grid = loaded(hash_run)
    render = view.field_renderer(model, scene, cfg, grid, torch.autocast("cpu", enabled=False))
    wide = replace(views.cameras[3], sizes=torch.tensor([[40, 64]]), intrinsics=views.cameras.intrinsics[3:4] *
                   torch.tensor([1.0, 1.0, 64 / 48, 40 / 48]))
    for camera in (views.cameras[0], wide):
        c2w = camera.poses[0]
        wxyz, position = as_viser_reports(c2w)
        torch.testing.assert_close(view.camera_pose(wxyz, position), c2w, rtol=0, atol=1e-6)
        H, W = camera.hw()
        fov = 2 * math.atan(H / 2 / camera.intrinsics[0, 1].item())
        seen = render(view.viewer_camera(wxyz, position, fov, view.frame_size(W / H, longest=max(H, W))))
        model.eval()
        with torch.no_grad():
            evaluated = render_view(model, camera, scene, cfg, grid, torch.autocast("cpu", enabled=False))
        torch.testing.assert_close(seen[0], evaluated[0], rtol=0, atol=1e-5)  # the pixels
        for a, b in zip(seen[1:], evaluated[1:], strict=True):  # depth and opacity: a pose through a quaternion in
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)  # float64 moves rays by ~1e-7, an edge's depth by 1e-5
        assert evaluated[0].std() > 0.05  # a scene, not a blank


def listening_addresses(port):
    """The local addresses of the TCP sockets listening on port (Linux's /proc/net/tcp; IPv6 ones as hex)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                (address, hex_port), state = line.split()[1].split(":"), line.split()[3]
                if state == "0A" and int(hex_port, 16) == port:  # 0A: listening
                    found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]) if len(address) == 8 else address)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net/tcp")
def test_view_py_listens_on_loopback_serves_its_page_and_stops_cleanly(hash_run):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "view.py", hash_run, f"--port={port}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        said = []
        reader = threading.Thread(target=lambda: said.extend(iter(proc.stderr.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while not any("viewer of" in line for line in said):  # serving
            assert proc.poll() is None and time.monotonic() < deadline, "".join(said)[-2000:]
            time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)  # generous under the suite's load
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack: where it hangs
            proc.wait(timeout=30)
            reader.join(timeout=10)
            raise AssertionError("view.py did not stop within 60 s of Ctrl-C:\n" + "".join(said)[-6000:]) from None
        reader.join(timeout=10)
    assert proc.returncode == 0 and "Traceback" not in "".join(said), "".join(said)[-2000:]


def test_a_bad_checkpoint_port_or_size_is_one_line_and_exit_2(hash_run, tmp_path, capsys):
    """At the command line once; the other cases through the mains the scripts call, in this process."""
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    one_line_error(run_cli("view.py", str(bad)), "not a readable checkpoint")
    main_error(capsys, view.main, [hash_run, "--port=70000"], "pick 0 to 65535")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        err = main_error(capsys, view.main, [hash_run, "--host=0.0.0.0", f"--port={taken.getsockname()[1]}"],
                         "cannot listen on 0.0.0.0")
    assert "warning: the viewer listens on 0.0.0.0" in err  # not loopback: said before anything else
    main_error(capsys, functools.partial(train.main, EXP1),
               ["--data=synthetic", "--viewer=true", "--viewer_res=4000", f"--out_dir={tmp_path / 'run'}"],
               "pick 64 to 2048 px")
    assert not (tmp_path / "run").exists()  # said before anything was written


def canvas_matches(shot, expected):
    """Whether a screenshot (H, W, 3 uint8) shows the expected render (h, w, 3 in [0, 1]), stretched over it as
    viser draws a background: compared at the render's size everywhere but under the panel (top right), viser's
    notice of software WebGL (top left) and the axes (bottom left). Returns (mean absolute difference, that of a
    uniform image of the render's mean there)."""
    from PIL import Image

    h, w = expected.shape[:2]
    small_shot = np.asarray(Image.fromarray(shot).resize((w, h), Image.BOX), dtype=np.float32) / 255
    seen = np.ones((h, w), dtype=bool)
    seen[: int(0.45 * h), int(0.5 * w):] = False  # the panel
    seen[: int(0.35 * h), : int(0.4 * w)] = False  # the notice
    seen[int(0.8 * h):, : int(0.15 * w)] = False  # the axes
    a, b = small_shot[seen], expected[seen]
    return float(np.abs(a - b).mean()), float(np.abs(b - b.mean(0)).mean())


def serve(viewer, until):
    """Poll the viewer in a daemon thread until the event `until` is set; the thread."""
    def loop():
        while not until.is_set():
            viewer.poll()
            time.sleep(0.01)
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


@pytest.mark.skipif(chromium() is None, reason="chromium not installed (.ci/run installs it)")
def test_a_browser_shows_the_scene_the_viewer_renders(hash_run):
    viewer, browser = view.open_viewer(hash_run, port=0, max_res=240), None
    viewer.show_cameras(False)  # the frustums would be drawn over the picture compared
    sent, render = [], viewer.render  # the frames sent, in order: the page ends on the last one, whatever the camera

    def recorded(camera, stop=None):
        out = render(camera, stop)
        if out is not None:  # rendered to the end: draw() sends it
            sent.append(out[0].numpy())
        return out
    viewer.render = recorded
    done = threading.Event()
    thread = serve(viewer, done)
    try:
        browser = Browser(width=800, height=600)
        browser.open(f"http://127.0.0.1:{viewer.port}/")
        deadline = time.monotonic() + 90
        while not (viewer.sharp_frames and all(v.sharp for v in viewer.views.values())):  # the first sharp frame
            assert time.monotonic() < deadline, "no sharp frame was sent"
            time.sleep(0.2)
        done.set()  # no more frames: the page keeps the last one sent (a camera that moves after it is not drawn)
        thread.join()
        expected = sent[-1]
        while True:  # until the page has drawn it
            result = canvas_matches(browser.screenshot(), expected)
            if result[0] < 0.2 * result[1] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert result[0] < 0.2 * result[1], result
    finally:
        if browser is not None:
            browser.close()
        done.set()
        viewer.close()


class FakeClient:
    """A browser's handle as the viewer uses it: the frames it was sent."""

    def __init__(self):
        self.frames = []
        self.scene = self

    def set_background_image(self, image, **kwargs):
        self.frames.append(image)


def watching():
    """A Viewer.__init__ that also connects a browser at the first training camera, which moves a little before
    every poll (so that every step draws a frame, as a browser in use causes); the browser's handle, whose
    `fixed` list also gets a 24x24 render at that camera each time."""
    client, init, poll = FakeClient(), view.Viewer.__init__, view.Viewer.poll
    client.fixed = []

    def opened(self, render, frame, cameras, *args, **kwargs):
        init(self, render, frame, cameras, *args, **kwargs)
        self.views[0], self.seen = view.ClientView(client), as_viser_reports(cameras.poses[0])

    def moved(self, step=None):
        wxyz, position = self.seen
        self.views[0].moved_to((wxyz, position + 1e-3 * len(client.frames), 0.7, 1.0))
        poll(self, step)
        client.fixed.append(self.render(view.viewer_camera(wxyz, position, 0.7, (24, 24)))[0])
    return client, opened, moved


def test_training_with_the_viewer_on_and_a_browser_watching_takes_the_same_steps(tmp_path, monkeypatch):
    client, opened, moved = watching()
    monkeypatch.setattr(view.Viewer, "__init__", opened)
    monkeypatch.setattr(view.Viewer, "poll", moved)
    runs = {}
    for on in (False, True):
        cfg = {**small(tmp_path / str(on)), "MAX_STEPS": 12, "VIEWER": on, "VIEWER_PORT": 0}
        train.train(cfg)
        runs[on] = torch.load(os.path.join(cfg["OUT_DIR"], "ckpt.pt"), weights_only=True)
    assert len(client.frames) == 12 and not torch.equal(client.fixed[0], client.fixed[-1])  # it watched it change
    for part in ("model", "grid"):
        for k in runs[False][part]:
            assert torch.equal(runs[False][part][k], runs[True][part][k]), (part, k)
    assert runs[False]["optimizer"]["state"][0]["exp_avg"].equal(runs[True]["optimizer"]["state"][0]["exp_avg"])


def test_a_paused_run_holds_between_steps_and_ctrl_c_stops_it_there(tmp_path, monkeypatch):
    polls = []
    poll = view.Viewer.poll

    def paused_at_5(self, step=None):  # the pause button pressed at step 5; Ctrl-C after 20 polls in the pause
        poll(self, step)
        polls.append(step)
        self.paused = 5 <= step and len(polls) < 200  # (released after 200 polls: a broken Ctrl-C fails, not hangs)
        if len(polls) == 25:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(view.Viewer, "poll", paused_at_5)
    cfg = {**small(tmp_path / "run"), "MAX_STEPS": 12, "VIEWER": True, "VIEWER_PORT": 0}
    with pytest.raises(train.Interrupted):
        train.train(cfg)
    assert polls[:6] == [0, 1, 2, 3, 4, 5] and set(polls[5:]) == {5} and len(polls) == 25  # held at step 5
    assert torch.load(os.path.join(cfg["OUT_DIR"], "ckpt.pt"), weights_only=True)["step"] == 5  # no step after


def test_an_error_while_rendering_is_shown_once_and_the_server_stays_up(capsys):
    def broken(camera, stop=None):
        raise RuntimeError("out of memory, say")

    viewer = view.Viewer(broken, Frame(), port=0)
    try:
        assert viewer.server.request_share_url() is None  # no tunnel through viser's outside server
        watching_view = viewer.views[0] = view.ClientView(client=FakeClient())  # a browser that moved its camera
        watching_view.moved_to((np.array([1.0, 0, 0, 0]), np.array([0.0, 0, 4]), 0.7, 1.0))
        viewer.poll(step=3)
        assert "render failed: RuntimeError: out of memory, say" in viewer.error.content
        assert "Traceback" in capsys.readouterr().err  # and in the log
        viewer.poll(step=4)  # training goes on: not retried at every step
        assert "Traceback" not in capsys.readouterr().err
        with urllib.request.urlopen(f"http://127.0.0.1:{viewer.port}/", timeout=10) as page:
            assert page.status == 200
    finally:
        viewer.close()


def test_a_viewer_without_the_data_shows_the_background_the_run_trained_over():
    """A .npz scene trains over black whatever BACKGROUND says; the checkpoint's record, not the config, tells."""
    npz_run = {"config": {"BACKGROUND": "white"}, "scene": {"background": "black"}}
    export = {"config": {"BACKGROUND": "white"}}
    assert view.saved_background(npz_run).tolist() == [0.0] * 3 and view.saved_background(export).tolist() == [1.0] * 3
