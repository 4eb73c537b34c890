"""Look inside a trained field in a web browser: fly the camera anywhere, RGB or depth, the training cameras as
frustums. The same viewer watches a run while it trains (--viewer=true on any experiment).

    python view.py RUN_DIR|ckpt.pt|export.pt [--port=8080] [--host=127.0.0.1] [--max_res=400] [--frame_s=2]

It listens on 127.0.0.1: this machine only. From another machine, forward the port (ssh -L 8080:localhost:8080 HOST)
and open http://localhost:8080. Frames come from the project's own renderer (occupancy grid, early termination,
chunks), in the run's frame: a small one while the camera moves; once it stops, a sharp one, --max_res pixels on its
longer side or fewer, so that it renders in about --frame_s seconds. Built on viser alone (not nerfview): why, in
docs/viewer.md.
"""
import argparse
import ipaddress
import math
import signal
import socket
import sys
import time
import traceback

import numpy as np
import torch

from configs import UserError
from render import Cameras, render_view
from utils import depth_image, to_uint8

OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])  # viser's cameras look down +z with +y down; ours down -z, +y up
PREVIEW_SECONDS = 0.1  # a frame while the camera moves takes about this long (its size follows the measured speed)
SETTLE_SECONDS = 0.25  # once the camera has stood still this long, the sharp frame
WATCH_SHARE = 0.2  # training: fresh frames of the changing model take at most this share of the wall clock
MAX_FRUSTUMS = 200  # training cameras drawn (evenly picked beyond this)


def is_loopback(host):
    """Whether host names this machine only (127.0.0.0/8, ::1, localhost)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host, port):
    """Stop with one line if host:port cannot be listened on (viser would quietly move to the next port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: a closed port's TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from None


def check_settings(host, port, max_res, frame_s):
    """Stop with one line on a viewer setting out of range or a port that cannot be listened on; warn (one line)
    when host is not this machine only."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port={port}: pick 0 to 65535 (0: any free port)")
    if not (64 <= max_res <= 2048 and 0.2 <= frame_s <= 60):
        raise UserError(f"a sharp frame of {max_res} px and {frame_s} s: pick 64 to 2048 px (--max_res, "
                        f"VIEWER_RES) and 0.2 to 60 s (--frame_s, VIEWER_FRAME_S)")
    if not is_loopback(host):
        print(f"warning: the viewer listens on {host}: anyone who can reach this machine on port {port} sees it "
              f"(it has no password); the default 127.0.0.1 with ssh -L is safer", file=sys.stderr)
    if port:
        check_port(host, port)


def camera_pose(wxyz, position):
    """A viser camera (quaternion wxyz, position; OpenCV axes) as a camera-to-world matrix in OpenGL axes (4, 4)."""
    import viser.transforms as vt

    c2w = np.eye(4)
    c2w[:3, :3] = vt.SO3(np.asarray(wxyz, dtype=np.float64)).as_matrix()
    c2w[:3, 3] = position
    return torch.tensor(c2w @ OPENCV_TO_OPENGL, dtype=torch.float32)


def viser_pose(c2w):
    """The inverse of camera_pose: (wxyz, position) of a camera-to-world matrix in OpenGL axes."""
    import viser.transforms as vt

    m = np.asarray(c2w, dtype=np.float64) @ OPENCV_TO_OPENGL
    return vt.SO3.from_matrix(m[:3, :3]).wxyz, m[:3, 3]


def frame_size(aspect, pixels=None, longest=None):
    """(H, W) of a frame of the given aspect (W / H): about `pixels` pixels, or `longest` on its longer side."""
    if longest is not None:
        return (longest, max(1, round(longest * aspect))) if aspect <= 1 else (max(1, round(longest / aspect)), longest)
    H = max(8, round(math.sqrt(pixels / aspect)))
    return H, max(8, round(H * aspect))


def viewer_camera(wxyz, position, fov, hw):
    """One camera of the project (render.Cameras) for a viser view: vertical fov in radians, hw = (H, W) pixels."""
    H, W = hw
    f = H / 2 / math.tan(fov / 2)
    return Cameras(camera_pose(wxyz, position)[None], torch.tensor([[f, f, W / 2, H / 2]], dtype=torch.float32),
                   torch.tensor([[H, W]]))


def field_renderer(model, scene, cfg, grid, amp):
    """render(camera, stop) -> (rgb, depth, opacity), or None when stop() said so: the config's sampling, the
    model in eval mode (as validation renders it) and back."""
    def render(camera, stop=None):
        was_training = model.training
        model.eval()
        try:
            return render_view(model, camera.to(scene.background.device), scene, cfg, grid, amp, stop)
        finally:
            model.train(was_training)
    return render


def scene_up(cameras, frame):
    """The scene's up: the mean of the cameras' up axes (+z for an object without cameras, +y in NDC)."""
    if cameras is None or len(cameras) == 0:
        return np.array([0.0, 1.0, 0.0] if frame.space == "ndc" else [0.0, 0.0, 1.0])
    up = cameras.poses[:, :3, 1].double().mean(0).cpu().numpy()
    return up / max(np.linalg.norm(up), 1e-9)


class ClientView:
    """What one browser shows: its camera (changed by its thread), and what was last rendered for it."""

    def __init__(self, client):
        self.client, self.version, self.moved = client, 0, 0.0
        self.camera = None  # (wxyz, position, fov, aspect)
        self.shown_version, self.shown_settings, self.sharp, self.shown_step = -1, -1, False, None

    def moved_to(self, camera):
        """The browser's camera (wxyz, position, fov, aspect) changed; one without a finite size is ignored."""
        if not (camera[3] > 0 and math.isfinite(camera[3]) and 0 < camera[2] < math.pi):
            return
        self.camera, self.moved = camera, time.monotonic()
        self.version += 1


class Viewer:
    """A viser server that renders a field for every browser connected. Frames are rendered by whoever calls
    poll(): view.py's loop, or the training loop between steps (so a frame never runs beside a training step and
    training takes the same steps with the viewer as without). render(camera, stop) is field_renderer's. Callers
    check the settings first (check_settings), before the slow work of loading a run."""

    def __init__(self, render, frame, cameras=None, images=None, host="127.0.0.1", port=8080, max_res=400,
                 frame_s=2.0, training=False, title="nerf-experiments"):
        import viser

        self.render, self.frame, self.views = render, frame, {}
        self.pixels_per_s = 20000.0  # until measured: the preview's size follows it
        self.paused, self.sharp_frames, self.next_refresh, self.next_status = False, 0, 0.0, 0.0
        self.settings = 0  # counts changes of how frames are drawn (what to show, sizes): each redraws every view
        self.frustums = []
        self.server = viser.ViserServer(host=host, port=port, label=title, verbose=False)
        try:
            if port and self.server.get_port() != port:  # taken between the check and the bind
                raise UserError(f"cannot listen on {host}:{port} (in use); pick another --port")
            self.seal()
            self.up = scene_up(cameras, frame)
            self.server.scene.set_up_direction(tuple(self.up))
            self.add_controls(max_res, frame_s, training)
            if cameras is not None and len(cameras):
                self.add_cameras(cameras, images)
                self.start_at(cameras[0])
        except BaseException:
            self.server.stop()
            raise
        # async: viser runs these on its event loop in order (before the first camera message is handed out), not on
        # a thread pool where a camera update could overtake the connect or another update
        self.server.on_client_connect(self.connect)
        self.server.on_client_disconnect(self.disconnect)

    @property
    def port(self):
        """The port the server listens on (the one asked for, or the free one chosen for 0)."""
        return self.server.get_port()

    def seal(self):
        """No way out of this machine: the share button hidden, and the share request it sends (which opens a tunnel
        through viser's outside server; any page can send it) answered with nothing."""
        self.server.gui.configure_theme(show_share_button=False, dark_mode=True)
        self.server.request_share_url = lambda *args, **kwargs: None

    def add_controls(self, max_res, frame_s, training):
        """The panel: what to show, the sharp frame's size and time, errors; in training the run's progress and a
        pause."""
        gui = self.server.gui
        self.show = gui.add_dropdown("show", ("rgb", "depth"), initial_value="rgb")
        self.max_res = gui.add_slider("sharp frame px", min=64, max=2048, step=1, initial_value=max_res,
                                      hint="the longer side of the frame rendered once the camera stops")
        self.frame_s = gui.add_slider("sharp frame s", min=0.2, max=60.0, step=0.1, initial_value=frame_s,
                                      hint="a sharp frame renders fewer pixels where it would take longer than this")
        for control in (self.show, self.max_res, self.frame_s):
            control.on_update(lambda _: self.rerender())
        self.status = gui.add_markdown("")
        self.error = gui.add_markdown("")
        if training:
            self.pause = gui.add_button("pause training")
            self.pause.on_click(lambda _: self.toggle_pause())

    def toggle_pause(self):
        """The pause button: training holds between steps until it is pressed again."""
        self.paused, self.next_status = not self.paused, 0.0
        self.pause.label = "resume training" if self.paused else "pause training"

    def add_cameras(self, cameras, images=None):
        """The training cameras as frustums, each with a thumbnail of its image where there is one."""
        keep = np.linspace(0, len(cameras) - 1, min(len(cameras), MAX_FRUSTUMS)).round().astype(int)
        positions = cameras.poses[:, :3, 3].double().cpu()
        extent = (positions - positions.mean(0)).norm(dim=-1).median().item()
        for k in keep.tolist():
            H, W = cameras.hw(k)
            wxyz, position = viser_pose(cameras.poses[k].cpu())
            thumb = None
            if images is not None:
                step = max(1, max(H, W) // 64)
                thumb = to_uint8(images.image(k)[::step, ::step])
            self.frustums.append(self.server.scene.add_camera_frustum(
                f"/cameras/{k}", fov=2 * math.atan(H / 2 / cameras.intrinsics[k, 1].item()), aspect=W / H,
                scale=0.05 * max(extent, 0.5), thickness=1.5, thickness_units="screen", wxyz=wxyz, position=position,
                image=thumb, color=(255, 211, 105)))
        shown = self.server.gui.add_checkbox("training cameras", initial_value=True)
        shown.on_update(lambda _: self.show_cameras(shown.value))

    def show_cameras(self, visible):
        """Show or hide the training cameras' frustums."""
        for frustum in self.frustums:
            frustum.visible = visible

    def start_at(self, camera):
        """Browsers start behind a training camera, looking the same way at what it looks at (the centre of the
        scene in front of it, or the focus in NDC), with the scene's up as up, and see it as from half as far again:
        the cameras beside it are in view, not in the way. In the cube, rays are sampled from near to far of the
        camera, so it moves back no further than (near + far) / 2 from that centre and widens its view instead."""
        c2w = camera.poses[0].double().cpu()
        position, forward = c2w[:3, 3], -c2w[:3, 2]
        depth = self.frame.focus if self.frame.space == "ndc" else max(-(position @ forward).item(), 0.1)
        back = 0.5 * depth
        if self.frame.space == "cube":
            back = max(0.0, min(back, (self.frame.near + self.frame.far) / 2 - depth))
        initial = self.server.initial_camera
        initial.position = (position - back * forward).numpy()
        initial.look_at = (position + depth * forward).numpy()
        initial.up = self.up
        half_height = camera.hw()[0] / 2 / camera.intrinsics[0, 1].item() * 1.5 * depth / (depth + back)
        initial.fov = min(2 * math.atan(half_height), math.radians(120))

    async def connect(self, client):
        """A browser connected (its first camera is known): follow its camera."""
        view = self.views[client.client_id] = ClientView(client)

        async def moved(cam):
            if cam.image_height > 0:  # a canvas not yet laid out reports no size
                view.moved_to((cam.wxyz.copy(), cam.position.copy(), cam.fov, cam.image_width / cam.image_height))
        client.camera.on_update(moved)
        await moved(client.camera)

    async def disconnect(self, client):
        """A browser left: nothing more to draw for it."""
        self.views.pop(client.client_id, None)

    def rerender(self):
        """Render every browser's view anew (the setting it is drawn with changed)."""
        self.settings += 1

    def update(self, step, rays_per_s, train_seconds):
        """Training: the run's progress in the panel (twice a second at most: each change is a message)."""
        if time.monotonic() < self.next_status:
            return
        self.next_status = time.monotonic() + 0.5
        self.status.content = (f"**step {step}** · {rays_per_s:,.0f} rays/s · {train_seconds:.0f} s trained"
                               + (" · paused" if self.paused else ""))

    def poll(self, step=None):
        """Render what the browsers wait for: a small frame for a camera that moved, the sharp one once it has
        stood still, and (training: step given) a fresh sharp one of the changing model now and then."""
        for view in list(self.views.values()):
            if view.camera is None:
                continue
            now = time.monotonic()
            if (view.version, self.settings) != (view.shown_version, view.shown_settings):
                self.draw(view, sharp=False)
            elif not view.sharp and now - view.moved >= SETTLE_SECONDS:
                self.draw(view, sharp=True)
            elif step is not None and step != view.shown_step and now >= self.next_refresh:
                self.draw(view, sharp=True, step=step)

    def sharp_size(self, aspect):
        """(H, W) of a sharp frame: max_res on its longer side, or as many pixels as the measured speed renders in
        frame_s seconds where that is fewer."""
        H, W = frame_size(aspect, longest=int(self.max_res.value))
        budget = self.pixels_per_s * self.frame_s.value
        return (H, W) if H * W <= budget else frame_size(aspect, pixels=budget)

    def preview_size(self, aspect):
        """(H, W) of a frame while the camera moves: what the measured speed renders in PREVIEW_SECONDS, at most a
        quarter of the sharp frame."""
        H, W = self.sharp_size(aspect)
        return frame_size(aspect, pixels=min(self.pixels_per_s * PREVIEW_SECONDS, H * W / 4))

    def draw(self, view, sharp, step=None):
        """Render view's camera (sharp: at the set size; else small) and send it; a camera that moves meanwhile
        abandons a sharp frame; an error goes to the panel and the log (once: not again until the camera moves or, in
        training, until the next refresh), and the server stays up."""
        version, settings, (wxyz, position, fov, aspect) = view.version, self.settings, view.camera
        t0 = time.perf_counter()
        try:
            hw = self.sharp_size(aspect) if sharp else self.preview_size(aspect)
            out = self.render(viewer_camera(wxyz, position, fov, hw), (lambda: view.version != version) if sharp
                              else None)
            if out is None:
                return
            rgb, depth, acc = out
            image = depth_image(depth, acc, *self.frame.depth_range()) if self.show.value == "depth" else to_uint8(rgb)
            view.client.scene.set_background_image(image, format="jpeg", jpeg_quality=90 if sharp else 60)
        except Exception as e:  # noqa: BLE001 - the viewer outlives a bad frame
            traceback.print_exc()
            self.error.content = f"render failed: {type(e).__name__}: {e}"
            view.shown_version, view.shown_settings, view.sharp, view.shown_step = version, settings, True, step
            self.next_refresh = time.monotonic() + 10.0
            return
        seconds = time.perf_counter() - t0
        if self.error.content:
            self.error.content = ""
        self.pixels_per_s = hw[0] * hw[1] / max(seconds, 1e-3)
        view.shown_version, view.shown_settings, view.sharp, view.shown_step = version, settings, sharp, step
        self.sharp_frames += sharp
        if step is not None:  # so that fresh frames take WATCH_SHARE of the wall clock
            self.next_refresh = time.monotonic() + seconds * (1 / WATCH_SHARE - 1)

    def close(self):
        """Stop the server."""
        self.server.stop()


def saved_background(ckpt):
    """The background a run trained over, as its checkpoint recorded it (a .npz's is black whatever BACKGROUND says);
    an export, which records none, its config's."""
    color = ckpt.get("scene", {}).get("background", ckpt["config"]["BACKGROUND"])
    return torch.full((3,), float(color == "white")) if isinstance(color, str) else torch.tensor(color)


def open_viewer(path, host="127.0.0.1", port=8080, max_res=400, frame_s=2.0, device="auto"):
    """A Viewer of a run directory, checkpoint or BitNeRF export; its training cameras when its data is at hand."""
    from dataset import Scene, scene_of
    from eval import load_field, load_run
    from train import autocast_context

    check_settings(host, port, max_res, frame_s)
    path, ckpt, cfg, device, frame = load_run(path, device)
    try:
        scene = scene_of(cfg, ("train",), frame)
        views = scene.splits["train"]
    except UserError as e:
        if frame is None:  # a run from before frames were saved: its frame comes from its data
            raise
        print(f"notice: {e}; showing the field without its training cameras", file=sys.stderr)
        scene, views = Scene({}, frame, saved_background(ckpt)), None
    scene.background = scene.background.to(device)
    model, grid = load_field(ckpt, cfg, scene.frame, device, path)
    render = field_renderer(model, scene, cfg, grid, autocast_context(cfg, device))
    title = f"{cfg['EXPERIMENT']} · step {ckpt.get('step', '?')}"
    return Viewer(render, scene.frame, views and views.cameras, views, host, port, max_res, frame_s, title=title)


def main(argv=None):
    """Parse arguments and serve until Ctrl-C; bad input is one line on stderr and exit 2."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", help="run directory holding ckpt.pt, a checkpoint file, or a BitNeRF export")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    p.add_argument("--max_res", type=int, default=400, help="pixels on the longer side of the sharp frame")
    p.add_argument("--frame_s", type=float, default=2.0, help="a sharp frame renders fewer pixels where it would "
                   "take longer than this many seconds")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    args = p.parse_args(argv)
    # Ctrl-C stops it even where the parent ignored SIGINT (Python then keeps SIG_IGN): the viewer test saw that
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        viewer = open_viewer(args.ckpt, args.host, args.port, args.max_res, args.frame_s, args.device)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # while loading: nothing to stop yet
        sys.exit(130)
    print(f"viewer of {args.ckpt} at http://{args.host}:{viewer.port} (Ctrl-C stops it)", file=sys.stderr, flush=True)
    try:
        while True:
            viewer.poll()
            time.sleep(0.01)
    except KeyboardInterrupt:
        pass
    finally:
        viewer.close()


if __name__ == "__main__":
    main()
