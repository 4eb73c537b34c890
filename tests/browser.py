"""Headless Chromium driven over the DevTools protocol: open a page, take screenshots (the viewer's tests, and
media/viewer.png: docs/viewer.md). Chromium is the Debian package `chromium` (.ci/run installs it)."""
import base64
import io
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import imageio.v2 as imageio
import numpy as np


def chromium():
    """The Chromium executable, or None."""
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def free_port():
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium with one page, software WebGL (swiftshader), no network beyond this machine."""

    def __init__(self, width=960, height=640, timeout=30.0):
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        port = free_port()
        self.proc = subprocess.Popen(
            [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
             "--use-angle=swiftshader", "--no-first-run", "--disable-extensions", f"--window-size={width},{height}",
             f"--remote-debugging-port={port}", f"--user-data-dir={self.profile}",
             "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ws, self.next_id = None, 0
        deadline = time.monotonic() + timeout
        while True:  # DevTools answers once the browser is up
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start")
            time.sleep(0.2)
        from websockets.sync.client import connect

        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None)

    def call(self, method, **params):
        """Send one DevTools command; its result (events that arrive meanwhile are dropped)."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def open(self, url):
        """Load url in the page."""
        self.call("Page.navigate", url=url)

    def screenshot(self):
        """The page as an (H, W, 3) uint8 array."""
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return np.asarray(imageio.imread(io.BytesIO(data)))[..., :3]

    def close(self):
        """Quit Chromium and remove its profile."""
        if self.ws is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)
