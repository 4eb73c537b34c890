"""Scenes from a tiny-NeRF .npz, a nerf_synthetic folder, or a procedural scene, behind one interface."""
import http.client
import json
import math
import os
import sys
import urllib.request
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from configs import UserError
from utils import atomic_write, get_rays, pose_spherical, rays_for_pixels

TINY_NERF_URL = "https://cseweb.ucsd.edu/~viscomp/projects/LF/papers/ECCV20/nerf/tiny_nerf_data.npz"


class DataError(UserError):
    """Bad or missing data; the message names the problem and the fix."""


@dataclass
class Views:
    """Images (N, H, W, 3) float32 in [0, 1] with their camera-to-world poses (N, 4, 4) and focal (pixels)."""

    images: torch.Tensor
    poses: torch.Tensor
    focal: float

    @property
    def hw(self):
        return self.images.shape[1], self.images.shape[2]


@dataclass
class Scene:
    """Named splits of views plus what rendering needs: near/far bounds and the background colour."""

    splits: dict
    near: float
    far: float
    background: torch.Tensor


def cache_dir():
    """Where downloads go: $NERF_CACHE_DIR, else $XDG_CACHE_HOME/nerf-experiments, else ~/.cache/..."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "nerf-experiments")
    return os.environ.get("NERF_CACHE_DIR", default)


def download_failed(url, path, error):
    """The DataError of a download that failed on the network side: what failed, and how to do without it."""
    return DataError(f"could not download {url} ({getattr(error, 'reason', None) or error}); fetch it on a machine "
                     f"online and put it at {path}, or pass --data=PATH to a local copy, or --data=synthetic to "
                     "train offline")


def download(url, path, check):
    """Fetch url to path with a progress bar, atomically; check(tmp_path) validates the file before it is kept.

    A network failure is a DataError saying so; a failure to write the file is atomic_write's UserError.
    """
    from tqdm import tqdm

    def read(response):
        try:  # a network error is an OSError too: tell it apart from one of writing the file
            return response.read(1 << 20)
        except (OSError, http.client.HTTPException) as e:
            raise download_failed(url, path, e) from None

    def fetch(tmp):
        try:
            response = urllib.request.urlopen(url, timeout=30)
        except (OSError, http.client.HTTPException) as e:  # URLError (offline, refused) is an OSError
            raise download_failed(url, path, e) from None
        with response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {os.path.basename(path)}") as bar:
                while chunk := read(response):
                    f.write(chunk)
                    bar.update(len(chunk))
        check(tmp)

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {os.path.dirname(path)} ({e.strerror}); set NERF_CACHE_DIR to a writable "
                        "folder") from None
    atomic_write(path, fetch)


def composite(images, background):
    """RGBA images (N, H, W, 4) in [0, 1] composited over a background colour; RGB images as they are."""
    if images.shape[-1] != 4:
        return images
    return images[..., :3] * images[..., 3:] + (1 - images[..., 3:]) * np.asarray(background, dtype=images.dtype)


def check_views(images, poses, focal, where):
    """Validate shapes, dtypes and values of images/poses/focal; return them as float32 tensors."""
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise DataError(f"{where}: images must be (N, H, W, 3), got shape {images.shape}; check the file")
    if 0 in images.shape:
        raise DataError(f"{where}: no views or empty images (shape {images.shape}); check the file")
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{where}: images must be float in [0, 1] or uint8, got {images.dtype}; convert them")
    if poses.shape != (images.shape[0], 4, 4):
        raise DataError(f"{where}: poses must be ({images.shape[0]}, 4, 4) to match {images.shape[0]} images, "
                        f"got {poses.shape}; check the file")
    if not (np.isfinite(images).all() and np.isfinite(poses).all()):
        raise DataError(f"{where}: images or poses contain NaN/inf values; regenerate the data")
    if images.min() < 0 or images.max() > 1:
        raise DataError(f"{where}: image values must lie in [0, 1], got [{images.min():.3g}, {images.max():.3g}]")
    images = composite(images, np.zeros(3))  # a .npz scene's background is black
    rot = poses[:, :3, :3].astype(np.float64)
    if np.abs(rot @ rot.transpose(0, 2, 1) - np.eye(3)).max() > 1e-3 or \
            np.abs(poses[:, 3] - [0, 0, 0, 1]).max() > 1e-6:
        raise DataError(f"{where}: poses must be rigid camera-to-world transforms (rotation + translation); "
                        "check the file's layout")
    if not (np.ndim(focal) == 0 and np.isfinite(focal) and focal > 0):
        raise DataError(f"{where}: focal must be one positive number, got {focal!r}")
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)), \
        torch.from_numpy(poses.astype(np.float32)), float(focal)


def read_npz(path):
    """Images, poses and focal from a tiny-NeRF .npz, validated."""
    try:
        with np.load(path) as z:
            missing = {"images", "poses", "focal"} - set(z.files)
            if missing:
                raise DataError(f"{path}: missing arrays {sorted(missing)}; "
                                "a tiny-NeRF .npz holds images, poses, focal")
            images, poses, focal = z["images"], z["poses"], z["focal"]
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz ({e}); re-download it or pass another --data") from None
    return check_views(images, poses, focal[()] if np.ndim(focal) == 0 else focal, path)


def split_views(images, poses, focal, train_fraction=0.9):
    """The original code's split: the first 90 % of views train, the rest validate."""
    n_train = max(1, min(len(images) - 1, int(len(images) * train_fraction)))
    return {"train": Views(images[:n_train], poses[:n_train], focal),
            "val": Views(images[n_train:], poses[n_train:], focal),
            "all": Views(images, poses, focal)}


def load_npz(path):
    """A tiny-NeRF .npz scene: black background, near 2, far 6 (the tiny-NeRF notebook's bounds)."""
    images, poses, focal = read_npz(path)
    if len(images) < 2:
        raise DataError(f"{path}: needs at least 2 views to train and validate, got {len(images)}")
    return Scene(split_views(images, poses, focal), 2.0, 6.0, torch.zeros(3))


def tiny_nerf_path():
    """The cached tiny_nerf_data.npz, downloaded once and validated before it is kept."""
    path = os.path.join(cache_dir(), "tiny_nerf_data.npz")
    if not os.path.exists(path):
        download(TINY_NERF_URL, path, read_npz)
    return path


def resolve_data(data, quiet=False):
    """The data a run uses: DATA itself, or for 'auto' 'tiny_nerf' when it can be had, else 'synthetic' (with a
    notice unless quiet)."""
    if data != "auto":
        return data
    try:
        tiny_nerf_path()
        return "tiny_nerf"
    except DataError:
        if not quiet:
            print(f"notice: no tiny_nerf_data.npz (offline?), so this run trains on the built-in SYNTHETIC scene, not "
                  f"lego; for lego put {TINY_NERF_URL} into {cache_dir()}/ or pass --data=PATH", file=sys.stderr)
        return "synthetic"


def average_blocks(images, downscale, where):
    """Images (N, H, W, C) downscaled by averaging downscale x downscale blocks; a downscale that does not divide H
    and W is refused (the image centre and focal of a cropped remainder would be off)."""
    N, H, W, C = images.shape
    if H % downscale or W % downscale:
        fits = [d for d in range(1, min(H, W) + 1) if H % d == 0 and W % d == 0]
        raise DataError(f"{where}: --downscale={downscale} does not divide its {W}x{H} images; use one that does: "
                        + ", ".join(map(str, fits[:10])) + (", ..." if len(fits) > 10 else ""))
    return images.reshape(N, H // downscale, downscale, W // downscale, downscale, C).mean((2, 4))


def load_blender_split(folder, split, downscale, background):
    """One transforms_{split}.json of a nerf_synthetic scene: RGBA PNGs composited over the background."""
    import imageio.v2 as imageio

    path = os.path.join(folder, f"transforms_{split}.json")
    try:
        with open(path) as f:
            meta = json.load(f)
        frames = meta["frames"]
        files = [os.path.join(folder, fr["file_path"] + ("" if fr["file_path"].endswith(".png") else ".png"))
                 for fr in frames]
        images = np.stack([imageio.imread(p) for p in files]).astype(np.float32) / 255.0
        poses = np.array([fr["transform_matrix"] for fr in frames], dtype=np.float32)
        angle = float(meta["camera_angle_x"])
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path}: cannot read the scene ({type(e).__name__}: {e}); check the folder") from None
    images = composite(images, background.numpy())  # at full resolution, then averaged: what a camera would see
    if downscale > 1:
        images = average_blocks(images, downscale, path)
    focal = 0.5 * images.shape[2] / math.tan(0.5 * angle)
    return Views(*check_views(images, poses, focal, path))


def folder_splits(folder):
    """The splits a nerf_synthetic folder has a transforms_{split}.json for."""
    return [s for s in ("train", "val", "test") if os.path.exists(os.path.join(folder, f"transforms_{s}.json"))]


def load_blender(folder, downscale, background, splits=("train", "val")):
    """The named splits of a nerf_synthetic scene folder ('all': every split it has, and their union); near 2,
    far 6. Only those are read: scoring 10 test views needs transforms_test.json alone, not 80 training images."""
    present = folder_splits(folder)
    names = present if "all" in splits else list(splits)
    missing = [s for s in names if s not in present] or ([] if names else ["train"])
    if missing:
        raise DataError(f"{folder}: no transforms_{missing[0]}.json; pass a nerf_synthetic scene folder such as "
                        ".../lego (training reads train and val)")
    views = {s: load_blender_split(folder, s, downscale, background) for s in names}
    if "all" in splits:
        views["all"] = Views(torch.cat([v.images for v in views.values()]),
                             torch.cat([v.poses for v in views.values()]), views[names[0]].focal)
    return Scene(views, 2.0, 6.0, background)


def synthetic_scene(n_views=40, size=48, seed=0):
    """Three coloured spheres and a box, ray-traced exactly (Lambert-shaded) from cameras on a sphere."""
    rng = np.random.default_rng(seed)
    focal = 1.2 * size
    spheres = [((0.0, 0.0, 0.0), 0.6, (0.9, 0.2, 0.2)), ((0.8, 0.4, 0.2), 0.35, (0.2, 0.8, 0.3)),
               ((-0.6, -0.5, 0.4), 0.4, (0.2, 0.4, 0.9))]
    box_lo, box_hi, box_rgb = np.array([-0.9, 0.3, -0.7]), np.array([-0.3, 0.9, -0.1]), np.array([0.9, 0.8, 0.2])
    light = np.array([0.4, 0.5, 0.77])
    images, poses = [], []
    for theta, phi in zip(np.linspace(0, 360, n_views, endpoint=False), rng.uniform(-60, -10, n_views), strict=True):
        c2w = pose_spherical(float(theta), float(phi), 3.5)
        rays = get_rays(c2w, size, size, focal)
        o, d = rays.origins.double().numpy(), rays.viewdirs.double().numpy()
        best_t, img = np.full(len(o), np.inf), np.zeros((len(o), 3))
        for centre, radius, rgb in spheres:
            oc = o - centre
            b = (oc * d).sum(-1)
            disc = b * b - ((oc * oc).sum(-1) - radius ** 2)
            t = np.where(disc > 0, -b - np.sqrt(np.maximum(disc, 0)), np.inf)
            hit = (t > 0) & (t < best_t)
            normal = (o + t[:, None] * d - centre) / radius
            img[hit] = np.array(rgb) * (0.35 + 0.65 * np.clip(normal[hit] @ light, 0, 1))[:, None]
            best_t[hit] = t[hit]
        with np.errstate(divide="ignore", invalid="ignore"):  # slab test; rays parallel to a face give inf
            t0, t1 = (box_lo - o) / d, (box_hi - o) / d
        tn, tf = np.minimum(t0, t1).max(-1), np.maximum(t0, t1).min(-1)
        hit = (tn < tf) & (tn > 0) & (tn < best_t)
        face = np.argmax(np.minimum(t0, t1), axis=-1)
        shade = 0.35 + 0.65 * np.abs(light[face])
        img[hit] = box_rgb * shade[hit, None]
        images.append(img.reshape(size, size, 3))
        poses.append(c2w.numpy())
    return np.stack(images).astype(np.float32), np.stack(poses).astype(np.float32), focal


def load_synthetic():
    """The procedural scene: black background, cameras at radius 3.5, near 2, far 5."""
    return Scene(split_views(*check_views(*synthetic_scene(), "synthetic")), 2.0, 5.0, torch.zeros(3))


def load_scene(data, downscale=1, background="white", splits=("train", "val")):
    """Dispatch on DATA: 'auto', 'tiny_nerf' (download), 'synthetic', a .npz file, or a nerf_synthetic folder.

    A folder reads only the named splits, downscaled and composited over the background ('white' or 'black');
    a .npz or the synthetic scene is small and black-backed, and always holds train, val and all.
    """
    data = resolve_data(data)
    if data == "tiny_nerf":
        return load_npz(tiny_nerf_path())
    if data == "synthetic":
        return load_synthetic()
    if not os.path.exists(data):
        raise DataError(f"data not found: {data}; pass --data=PATH to a .npz or nerf_synthetic scene folder, "
                        "--data=tiny_nerf to download lego, or --data=synthetic")
    if os.path.isdir(data):
        return load_blender(data, downscale, torch.full((3,), 1.0 if background == "white" else 0.0), splits)
    return load_npz(data)


def protocol(scene, views):
    """What a score was measured on, besides the data and split: the views' resolution and background."""
    background = {1.0: "white", 0.0: "black"}.get(scene.background.mean().item(), scene.background.tolist())
    return {"resolution": "{}x{}".format(*views.hw), "background": background}


def sample_batch(views, n_rays, generator):
    """Random rays drawn uniformly across all pixels of all training images, with their target colours."""
    N, (H, W) = views.images.shape[0], views.hw
    idx = torch.randint(N * H * W, (n_rays,), generator=generator, device=views.images.device)
    img, pix = idx // (H * W), idx % (H * W)
    j, i = pix // W, pix % W
    rays = rays_for_pixels(views.poses[img], i, j, H, W, views.focal)
    return rays, views.images[img, j, i]
