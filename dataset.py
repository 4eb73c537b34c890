"""Every data source behind one interface: a tiny-NeRF .npz, a nerf_synthetic folder, the procedural scene, an LLFF
capture (poses_bounds.npy) and an Instant-NGP / nerfstudio capture (transforms.json); each view a camera of its own
(render.Cameras), each scene a frame chosen from its training views (render.Frame)."""
import http.client
import json
import math
import os
import sys
import urllib.request
import zipfile
from dataclasses import dataclass, replace

import numpy as np
import torch

from configs import UserError
from render import Cameras, Frame, get_rays, ndc_rays, pose_spherical, rays_for_pixels
from utils import atomic_write

TINY_NERF_URL = "https://cseweb.ucsd.edu/~viscomp/projects/LF/papers/ECCV20/nerf/tiny_nerf_data.npz"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")


class DataError(UserError):
    """Bad or missing data; the message names the problem and the fix."""


class Views:
    """A split's pixels, flat and view after view (P, 3) float32 in [0, 1] (views may differ in size), and their
    cameras (render.Cameras)."""

    def __init__(self, pixels, cameras):
        self.pixels, self.cameras = pixels, cameras
        counts = cameras.sizes[:, 0].long() * cameras.sizes[:, 1].long()
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(pixels.device)

    @classmethod
    def of_images(cls, images, cameras):
        """Views of a list (or a stacked tensor) of images (H, W, 3)."""
        return cls(torch.cat([torch.as_tensor(im).reshape(-1, 3) for im in images]), cameras)

    def __len__(self):
        return len(self.cameras)

    def image(self, k):
        """View k's image (H, W, 3)."""
        return self.pixels[self.offsets[k]: self.offsets[k + 1]].view(*self.cameras.hw(k), 3)

    def subset(self, indices):
        """The views at indices, in that order."""
        return Views.of_images([self.image(k) for k in indices], self.cameras[torch.as_tensor(indices)])

    def to(self, device):
        return Views(self.pixels.to(device), self.cameras.to(device))


@dataclass
class Scene:
    """Named splits of views, the scene's frame (render.Frame: its normalisation, near/far bounds and sampling
    space) and the background colour; val_is_train: no view was held out (a capture's --holdout=0)."""

    splits: dict
    frame: Frame
    background: torch.Tensor
    val_is_train: bool = False


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


def pinhole_views(images, poses, focal):
    """Views of stacked images (N, H, W, 3), their poses and one focal length (a centred principal point)."""
    return Views.of_images(images, Cameras.pinhole(poses, focal, images.shape[1:3]))


def split_views(images, poses, focal, train_fraction=0.9):
    """The original code's split: the first 90 % of views train, the rest validate."""
    n_train = max(1, min(len(images) - 1, int(len(images) * train_fraction)))
    return {"train": pinhole_views(images[:n_train], poses[:n_train], focal),
            "val": pinhole_views(images[n_train:], poses[n_train:], focal),
            "all": pinhole_views(images, poses, focal)}


def load_npz(path):
    """A tiny-NeRF .npz scene: black background, near 2, far 6 (the tiny-NeRF notebook's bounds), cube 1.5."""
    images, poses, focal = read_npz(path)
    if len(images) < 2:
        raise DataError(f"{path}: needs at least 2 views to train and validate, got {len(images)}")
    return Scene(split_views(images, poses, focal), Frame(), torch.zeros(3))


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
    return pinhole_views(*check_views(images, poses, focal, path))


def folder_splits(folder):
    """The splits a nerf_synthetic folder has a transforms_{split}.json for."""
    return [s for s in ("train", "val", "test") if os.path.exists(os.path.join(folder, f"transforms_{s}.json"))]


def load_blender(folder, downscale, background, splits=("train", "val")):
    """The named splits of a nerf_synthetic scene folder ('all': every split it has, and their union); near 2,
    far 6, cube 1.5. Only those are read: scoring 10 test views needs transforms_test.json alone, not 80 training
    images."""
    present = folder_splits(folder)
    names = present if "all" in splits else list(splits)
    missing = [s for s in names if s not in present] or ([] if names else ["train"])
    if missing:
        raise DataError(f"{folder}: no transforms_{missing[0]}.json; pass a nerf_synthetic scene folder such as "
                        ".../lego (training reads train and val)")
    views = {s: load_blender_split(folder, s, downscale, background) for s in names}
    if "all" in splits:
        parts = list(views.values())
        views["all"] = Views(torch.cat([v.pixels for v in parts]), Cameras(
            *(torch.cat([getattr(v.cameras, k) for v in parts]) for k in ("poses", "intrinsics", "sizes"))))
    return Scene(views, Frame(), background)


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
        rays = get_rays(Cameras.pinhole(c2w[None], focal, (size, size)))
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
    return Scene(split_views(*check_views(*synthetic_scene(), "synthetic")), Frame(far=5.0), torch.zeros(3))


def read_image(path, background):
    """An image file as float32 (H, W, 3) in [0, 1], an alpha channel composited over the background."""
    import imageio.v2 as imageio

    try:
        image = imageio.imread(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the image ({type(e).__name__}: {e}); check the file") from None
    image = np.stack([image] * 3, -1) if image.ndim == 2 else image
    image = image.astype(np.float32) / (65535.0 if image.dtype == np.uint16 else 255.0)
    return composite(image, np.asarray(background, dtype=np.float32))


def downscaled(image, factor, where):
    """An image (H, W, 3) averaged down by an integer factor (average_blocks)."""
    return image if factor == 1 else average_blocks(image[None], factor, where)[0]


def llff_images(folder, downscale):
    """The folder an LLFF capture's images come from at this downscale, and the factor left to average them by:
    images_K itself, else the finest images_J (or full-size images/) with J dividing K."""
    found = {1 if name == "images" else int(name.split("_")[1]): name for name in os.listdir(folder)
             if os.path.isdir(os.path.join(folder, name)) and (name == "images" or name.split("_")[-1].isdigit())
             and name.startswith("images")}
    usable = [j for j in found if downscale % j == 0]
    if not usable:
        have = ", ".join(f"{found[j]}/" for j in sorted(found)) or "no image folder"
        raise DataError(f"{folder}: --downscale={downscale} needs images_{downscale}/ or a finer images_J/ with J "
                        f"dividing {downscale}; this capture has {have}")
    return os.path.join(folder, found[max(usable)]), downscale // max(usable)


def read_llff(folder, downscale, background):
    """An LLFF capture: its images, world poses (OpenGL axes: LLFF's [down, right, back] reordered to [right, up,
    back]), intrinsics (the full-size focal scaled to the images'; centred) and each view's depth bounds."""
    path = os.path.join(folder, "poses_bounds.npy")
    try:
        table = np.load(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npy ({type(e).__name__}); check the capture") from None
    if table.ndim != 2 or table.shape[1] != 17 or not len(table) or not np.isfinite(table).all():
        raise DataError(f"{path}: expected an (N, 17) array of finite numbers (a 3x5 pose and 2 depth bounds per "
                        f"view, as LLFF writes it), got shape {table.shape}")
    poses, bounds = table[:, :15].reshape(-1, 3, 5), table[:, 15:]
    source, factor = llff_images(folder, downscale)
    files = sorted(f for f in os.listdir(source) if f.endswith(IMAGE_EXTENSIONS))
    if len(files) != len(table):
        raise DataError(f"{source}: {len(files)} images for {len(table)} views in poses_bounds.npy; a view per "
                        "image, in the images' sorted order")
    images = [downscaled(read_image(os.path.join(source, f), background), factor, source) for f in files]
    if len({im.shape for im in images}) > 1:
        raise DataError(f"{source}: the images differ in size; an LLFF capture's share one camera")
    (h, w), (H, W, focal) = images[0].shape[:2], poses[0, :, 4]
    c2w = np.concatenate([poses[:, :, 1:2], -poses[:, :, 0:1], poses[:, :, 2:4]], 2)
    c2w = np.concatenate([c2w, np.tile([[[0.0, 0.0, 0.0, 1.0]]], (len(c2w), 1, 1))], 1)
    intrinsics = np.tile([focal * w / W, focal * h / H, w / 2, h / 2], (len(c2w), 1))
    return images, c2w, intrinsics, None, bounds


def transforms_image(folder, file_path, downscale):
    """The image file a frame of transforms.json names, at this downscale, and the factor left to average it by:
    the same name in a sibling folder images_K/ (nerfstudio's layout), else the named file itself."""
    path = os.path.join(folder, file_path)
    if not os.path.splitext(path)[1]:  # Blender-style names leave out the extension
        path = next((path + ext for ext in IMAGE_EXTENSIONS if os.path.exists(path + ext)), path)
    smaller = os.path.join(os.path.dirname(path) + f"_{downscale}", os.path.basename(path))
    if downscale > 1 and os.path.exists(smaller):
        return smaller, 1
    return path, downscale


def frame_intrinsics(get, w, h, factor):
    """fx, fy, cx, cy of a frame (get reads the frame's key, else the file's) for its image of w x h pixels, which
    factor times larger is the size the file's intrinsics are for (unless it says its own w and h)."""
    W, H = get("w") or w * factor, get("h") or h * factor
    fx, fy = get("fl_x"), get("fl_y")
    if fx is None:
        fx = 0.5 * W / math.tan(0.5 * get("camera_angle_x"))
    if fy is None:
        fy = 0.5 * H / math.tan(0.5 * get("camera_angle_y")) if get("camera_angle_y") is not None else fx
    sx, sy = w / W, h / H
    return [fx * sx, fy * sy, get("cx", W / 2) * sx, get("cy", H / 2) * sy]


def read_transforms(folder, downscale, background):
    """An Instant-NGP / nerfstudio capture (transforms.json): shared or per-frame intrinsics (fl_x, fl_y, cx, cy,
    w, h, or camera_angle_x alone), OpenCV distortion (k1 k2 k3 k4 p1 p2), frames in any order (sorted by file) and
    images of any size; returns the images, world poses (OpenGL axes, as the file), intrinsics, distortion (None
    when there is none) and aabb_scale (as the `bounds` of read_llff)."""
    path = os.path.join(folder, "transforms.json")
    try:
        with open(path) as f:
            meta = json.load(f)
        frames = sorted(meta["frames"], key=lambda fr: fr["file_path"])
        if meta.get("camera_model", "OPENCV") not in ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL",
                                                      "RADIAL"):
            raise DataError(f"{path}: camera_model {meta['camera_model']} is not supported (pinhole and OpenCV "
                            "lenses are); undistort the images first (COLMAP's image_undistorter)")
        images, poses, intrinsics, distortion = [], [], [], []
        for fr in frames:
            get = lambda key, default=None, fr=fr: fr.get(key, meta.get(key, default))  # noqa: E731
            image_path, factor = transforms_image(folder, fr["file_path"], downscale)
            images.append(downscaled(read_image(image_path, background), factor, image_path))
            intrinsics.append(frame_intrinsics(get, images[-1].shape[1], images[-1].shape[0], downscale))
            distortion.append([float(get(k, 0.0)) for k in ("k1", "k2", "k3", "k4", "p1", "p2")])
            poses.append(fr["transform_matrix"])
        poses = np.asarray(poses, dtype=np.float64)
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path}: cannot read the capture ({type(e).__name__}: {e}); check the file") from None
    if not len(frames) or poses.shape[1:] != (4, 4) or not np.isfinite(poses).all():
        raise DataError(f"{path}: expected frames with a 4x4 transform_matrix each, got {len(frames)} frames")
    return images, poses, np.asarray(intrinsics), np.asarray(distortion) if np.any(distortion) else None, \
        float(meta.get("aabb_scale", 1.0))


def normalize(v):
    """v / |v| along the last axis."""
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def similarity(rotation, center, scale):
    """The 4x4 world-to-scene transform x -> scale * rotation (x - center)."""
    transform = np.eye(4)
    transform[:3, :3] = scale * rotation
    transform[:3, 3] = -scale * rotation @ center
    return transform


def to_frame(poses, transform):
    """Camera-to-world poses (N, 4, 4) moved into a frame: rotated, shifted and scaled, their axes kept unit."""
    transform = torch.as_tensor(transform, dtype=poses.dtype)
    out = transform @ poses
    out[:, :3, :3] /= torch.linalg.det(transform[:3, :3]).abs() ** (1 / 3)
    return out


def forward_frame(c2w, intrinsics, sizes, bounds):
    """The frame NeRF gives an LLFF capture: scaled so the nearest depth bound is 1 / 0.75, centred on the mean
    pose (its axes the scene's); NDC of the first camera (load_capture then fits it: fit_ndc), depths 0..1 (near
    plane to infinity), its spiral focused at NeRF's depth (the harmonic mean of 0.9 x the nearest and 5 x the
    farthest bound, weighted 1 : 3)."""
    scale = 1 / (bounds.min() * 0.75)
    center = c2w[:, :3, 3].mean(0)
    back = normalize(c2w[:, :3, 2].sum(0))
    right = normalize(np.cross(c2w[:, :3, 1].sum(0), back))
    rotation = np.stack([right, np.cross(back, right), back])  # the mean pose's axes, as rows: world -> scene
    focus = 1 / (0.25 / (0.9 * bounds.min() * scale) + 0.75 / (5 * bounds.max() * scale))
    fx, fy = intrinsics[0, :2]
    H, W = sizes[0]
    return Frame("ndc", 0.0, 1.0, 1.0, similarity(rotation, center, scale).tolist(),
                 [float(2 * fx / W), float(2 * fy / H)], "spiral", float(focus))


def focus_point(c2w):
    """The point nearest to every camera's optical axis, in the least-squares sense (where the capture looks)."""
    dirs = normalize(-c2w[:, :3, 2])
    projectors = np.eye(3) - dirs[:, :, None] * dirs[:, None, :]  # onto each axis' normal plane
    return np.linalg.lstsq(projectors.sum(0), (projectors @ c2w[:, :3, 3, None]).sum(0), rcond=None)[0][:, 0]


def rotation_to_z(up):
    """A rotation taking the unit vector up to +z (Rodrigues; the identity when it is +z already)."""
    z = np.array([0.0, 0.0, 1.0])
    axis, cos = np.cross(up, z), float(up @ z)
    if np.linalg.norm(axis) < 1e-9:
        return np.eye(3) if cos > 0 else np.diag([1.0, -1.0, -1.0])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + k + k @ k / (1 + cos)


def inward_frame(c2w, space, aabb_scale, center):
    """The frame of a capture that looks in at something (nerfstudio's and Instant-NGP's idea): centred on center,
    the cameras' mean up turned to +z, scaled so the farthest camera is at distance 1; 'contract' (disparity
    0.02 .. 1000, the unbounded rest contracted) or 'cube' (the half-width Instant-NGP's aabb_scale gives,
    relative to the cameras' mean distance: aabb_scale / 2 at its 1.32)."""
    rotation = rotation_to_z(normalize(c2w[:, :3, 1].sum(0)))
    distances = np.linalg.norm(c2w[:, :3, 3] - center, axis=-1)
    transform = similarity(rotation, center, 1 / distances.max()).tolist()
    if space == "contract":
        return Frame("contract", 0.02, 1000.0, 2.0, transform)
    bound = float(aabb_scale / 2 * distances.mean() / distances.max() / 1.32)
    return Frame("cube", 0.02, float(2 * math.sqrt(3) * max(bound, 1.0)), max(bound, 1.0), transform)


def is_forward_facing(c2w):
    """Whether a capture's cameras all look about one way (LLFF's forward-facing scenes), not in at an object."""
    dirs = normalize(-c2w[:, :3, 2])
    return float((dirs @ normalize(dirs.mean(0))).mean()) > 0.9


def capture_frame(c2w, intrinsics, sizes, bounds, space):
    """A capture's frame from its training views: 'auto' is 'ndc' for a forward-facing capture, 'cube' (Instant-NGP's
    aabb) for one that looks in (in contracted space fox trained far worse: docs/captures.md); bounds are an LLFF
    capture's depth bounds (N, 2), or a transforms.json's aabb_scale."""
    forward = is_forward_facing(c2w)
    space = space if space != "auto" else "ndc" if forward else "cube"
    if np.ndim(bounds) == 2:  # depth bounds: the cameras look at their middle depth
        center = c2w[:, :3, 3].mean(0) + normalize(-c2w[:, :3, 2].mean(0)) * bounds.mean()
    else:  # their axes' nearest point (far off, for parallel axes: then a depth range around it)
        center = focus_point(c2w)
    if space != "ndc":
        return inward_frame(c2w, space, bounds if np.ndim(bounds) == 0 else 4.0, center)
    if np.ndim(bounds) == 0:
        depth = float(np.linalg.norm(c2w[:, :3, 3].mean(0) - center))
        bounds = np.array([[0.5 * depth, 4 * depth]])
    return forward_frame(c2w, intrinsics, sizes, bounds)


def border_pixels(hw):
    """Column and row indices (i, j) of the pixels on an image's border."""
    H, W = hw
    i = torch.cat([torch.arange(W), torch.arange(W), torch.zeros(H), torch.full((H,), W - 1)])
    j = torch.cat([torch.zeros(W), torch.full((W,), H - 1), torch.arange(H), torch.arange(H)])
    return i.long(), j.long()


def fit_ndc(frame, cameras):
    """The NDC frame widened (or narrowed) so the training views' rays span exactly [-1, 1] in x and y, as DVGO
    bounds its NDC grid by the cameras' frusta: the hash grid clamps points outside its cube to its faces, and
    the reference camera's frustum alone left a tenth of an LLFF capture's samples there (docs/captures.md)."""
    reach = torch.zeros(2)
    for k in range(len(cameras)):
        rays = rays_for_pixels(cameras, k, *border_pixels(cameras.hw(k)))
        if rays.dirs[:, 2].max() >= 0:
            raise DataError(f"training view {k} looks sideways or back from the mean pose, and NDC holds only views "
                            "that face forward: use --space=cube (an object) or --space=contract (unbounded)")
        rays = ndc_rays(rays.origins, rays.dirs, frame.ndc)
        for end in (rays.origins, rays.origins + rays.dirs):  # a ray's NDC x and y move linearly from t = 0 to 1
            reach = torch.maximum(reach, end[:, :2].abs().amax(0))
    return replace(frame, ndc=[frame.ndc[0] / float(reach[0]), frame.ndc[1] / float(reach[1])])


def holdout_split(n, holdout):
    """Indices of the training and validation views of a capture: every holdout-th from the first validates (LLFF's
    llffhold); 0 holds none out, and validation uses the training views."""
    val = list(range(0, n, holdout)) if holdout and n > 1 else list(range(n))
    train = [k for k in range(n) if k not in val] if holdout and n > 1 else val
    return train, val


def load_capture(folder, reader, downscale, background, frame, space, holdout):
    """An LLFF or transforms.json capture as a Scene: its splits (holdout_split; 'all' too) in the given frame, or in
    the one capture_frame chooses from its training views."""
    images, c2w, intrinsics, distortion, bounds = reader(folder, downscale, background)
    sizes = np.array([im.shape[:2] for im in images])
    train, val = holdout_split(len(images), holdout)
    chosen_here = frame is None
    if chosen_here:
        frame = capture_frame(c2w[train], intrinsics[train], sizes[train],
                              bounds[train] if np.ndim(bounds) else bounds, space)
    as_tensor = lambda x: None if x is None else torch.as_tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
    cameras = Cameras(to_frame(as_tensor(c2w), frame.transform), as_tensor(intrinsics), torch.as_tensor(sizes),
                      as_tensor(distortion))
    if chosen_here and frame.space == "ndc":
        frame = fit_ndc(frame, cameras[train])
    views = Views.of_images([torch.from_numpy(np.ascontiguousarray(im)) for im in images], cameras)
    return Scene({"train": views.subset(train), "val": views.subset(val), "all": views}, frame,
                 torch.as_tensor(background, dtype=torch.float32), val_is_train=train == val)


def scene_kind(data):
    """Which loader a --data path takes, by what it holds: 'llff', 'transforms', 'blender' or 'npz'."""
    if os.path.isdir(data):
        for name, kind in (("poses_bounds.npy", "llff"), ("transforms.json", "transforms")):
            if os.path.exists(os.path.join(data, name)):
                return kind
        if folder_splits(data):
            return "blender"
        raise DataError(f"{data}: not a scene folder: expected poses_bounds.npy with images_K/ (LLFF), "
                        "transforms.json (Instant-NGP, nerfstudio) or transforms_train.json (nerf_synthetic)")
    if not data.endswith(".npz"):
        raise DataError(f"{data}: not a scene: pass a .npz (images, poses, focal), a capture or nerf_synthetic folder, "
                        "tiny_nerf or synthetic")
    return "npz"


def load_scene(data, downscale=1, background="white", splits=("train", "val"), frame=None, space="auto",
               holdout=8):
    """The scene DATA names: 'auto', 'tiny_nerf' (download), 'synthetic', a .npz file, or a folder (scene_kind).

    A folder is downscaled (and composited over the background, 'white' or 'black'; a nerf_synthetic folder reads
    only the named splits); a capture holds out every holdout-th view to validate. The scene's frame is the one
    given (another run's: its views land where that run's did), else the data's own, `space` choosing a capture's
    ('auto': from its cameras); a .npz, nerf_synthetic or synthetic scene is an object in the cube of 1.5.
    """
    data = resolve_data(data)
    color = [1.0] * 3 if background == "white" else [0.0] * 3
    if data == "tiny_nerf":
        scene = load_npz(tiny_nerf_path())
    elif data == "synthetic":
        scene = load_synthetic()
    elif not os.path.exists(data):
        raise DataError(f"data not found: {data}; pass --data=PATH to a .npz, a nerf_synthetic scene folder, an "
                        "LLFF or transforms.json capture folder, --data=tiny_nerf to download lego, or "
                        "--data=synthetic")
    elif scene_kind(data) in ("llff", "transforms"):
        reader = read_llff if scene_kind(data) == "llff" else read_transforms
        return load_capture(data, reader, downscale, color, frame, space, holdout)
    elif scene_kind(data) == "blender":
        scene = load_blender(data, downscale, torch.tensor(color), splits)
    else:
        scene = load_npz(data)
    if frame is not None:  # an object scene's own frame is the identity: another's moves its views
        for views in scene.splits.values():
            views.cameras.poses = to_frame(views.cameras.poses, frame.transform)
        scene.frame = frame
    return scene


def scene_of(cfg, splits, frame=None):
    """The scene a config names (DATA, DOWNSCALE, BACKGROUND, SPACE, HOLDOUT): in the given frame, else in the data's
    own with the config's SPACE, NEAR, FAR and SCENE_BOUND over it where they are set."""
    scene = load_scene(cfg["DATA"], cfg["DOWNSCALE"], cfg["BACKGROUND"], splits, frame, cfg["SPACE"], cfg["HOLDOUT"])
    if frame is None:
        space = None if cfg["SPACE"] == "auto" else cfg["SPACE"]
        scene.frame = scene.frame.with_overrides(space, cfg["NEAR"], cfg["FAR"], cfg["SCENE_BOUND"])
    return scene


def score_name(scene):
    """What validation scores are called: 'val', or 'training-view' where no view was held out (--holdout=0)."""
    return "training-view" if scene.val_is_train else "val"


def scored_on(scene):
    """What the validation split's scores were taken on, for metrics: 'val views' or (--holdout=0) 'training views'."""
    return "training views" if scene.val_is_train else "val views"


def protocol(scene, views):
    """What a score was measured on, besides the data and split: the views' resolution (W x H) and background."""
    sizes = {tuple(int(x) for x in hw) for hw in views.cameras.sizes}
    resolution = ", ".join(f"{w}x{h}" for h, w in sorted(sizes)) if len(sizes) <= 3 else f"{len(sizes)} sizes"
    background = {1.0: "white", 0.0: "black"}.get(scene.background.mean().item(), scene.background.tolist())
    return {"resolution": resolution, "background": background}


def sample_batch(views, n_rays, generator, frame=None):
    """Random rays drawn uniformly across all pixels of all training images, with their target colours."""
    idx = torch.randint(len(views.pixels), (n_rays,), generator=generator, device=views.pixels.device)
    view = torch.searchsorted(views.offsets[1:], idx, right=True)
    pixel = idx - views.offsets[view]
    width = views.cameras.sizes[view, 1].to(pixel)
    return rays_for_pixels(views.cameras, view, pixel % width, pixel // width, frame), views.pixels[idx]

