"""From a model and cameras to pixels: the scene's frame, cameras and their rays (lens distortion, NDC), sampling,
contraction, volume rendering, the occupancy grid, camera paths, and rendering, scoring and filming views."""
import copy
import math
import os
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import all_reduce, depth_image, psnr, ssim, to_uint8, write_video

# origins and dirs place the samples (origin + t * dir; dir is not unit in NDC); viewdirs, unit, are what the model
# sees of the direction (in the scene's frame, as the poses)
Rays = namedtuple("Rays", ["origins", "dirs", "viewdirs"])
# One rank's rows [lo, lo + rows) of a global batch of `total` rays: random draws are made for the whole batch
# from a generator every rank holds in the same state, then sliced, so a step does not depend on the world size.
Shard = namedtuple("Shard", ["generator", "lo", "total"])
ERT_BLOCK = 8  # samples per ray queried at a time under early ray termination (fewer: more, smaller model calls)
FINE_BLOCK = 4  # the same for the fine pass's samples, which lie where the coarse pass found the surface
SPACES = ("cube", "ndc", "contract")


@dataclass
class Frame:
    """The scene's frame, chosen from a capture's training views and saved with the run: `transform` (4x4, world to
    scene: rotation, translation, uniform scale) applied to every pose, and how rays are sampled there.

    space 'cube': depths near..far along rays in the scene, the model's cube [-bound, bound]^3 (objects).
    'ndc': rays in normalised device coordinates of the reference camera (ndc = (2 fx / W, 2 fy / H), widened so
    the training views' rays span x and y in [-1, 1]), depths 0..1 (forward-facing captures, as NeRF).
    'contract': depths near..far spaced evenly in disparity, points beyond the unit cube contracted into [-2, 2]^3
    (mip-NeRF 360's, in the L-inf norm as nerfacto; unbounded captures).
    video 'orbit' (around the scene's z axis, radius and height of the cameras) or 'spiral' (around the mean pose,
    as LLFF's render path, focused at `focus`).
    """

    space: str = "cube"
    near: float = 2.0
    far: float = 6.0
    bound: float = 1.5
    transform: list = field(default_factory=lambda: torch.eye(4).tolist())
    ndc: list = None
    video: str = "orbit"
    focus: float = 0.0

    @classmethod
    def of(cls, record):
        """A Frame from its saved dict (ckpt.pt, config.json, an export)."""
        return cls(**record)

    def record(self):
        """The frame as a plain dict (JSON, weights_only checkpoints)."""
        return asdict(self)

    def with_overrides(self, space=None, near=0.0, far=0.0, bound=0.0):
        """This frame with the config's settings where they are set (0 / None: the data's)."""
        return replace(self, space=space or self.space, near=near or self.near, far=far or self.far,
                       bound=bound or self.bound)

    def warp(self, points):
        """Points of the scene as the model sees them: contracted into [-2, 2]^3 under 'contract', else as they are."""
        return contract(points) if self.space == "contract" else points

    def sample_step(self, num_samples):
        """A typical distance between samples (the occupancy grid's density threshold follows from it)."""
        if self.space == "contract":
            return 2 * self.bound / num_samples
        return (self.far - self.near) / num_samples

    def end(self):
        """Where the last sample's segment ends: far for an object (the background shows behind it), beyond reach
        (1e10, as NeRF) in NDC and contracted space, which reach to infinity: there the last sample takes whatever
        light is left, and a transparent scene cannot stand in for colours over the background."""
        return self.far if self.space == "cube" else 1e10

    def normalized(self, t):
        """Depths t as shares 0..1 of the sampled range: in depth, or in disparity under 'contract' (as sampled)."""
        if self.space == "contract":
            return (1 / t - 1 / self.near) / (1 / self.far - 1 / self.near)
        return (t - self.near) / (self.far - self.near)

    def depth_range(self):
        """Depths a depth picture spans: near..far, or under 'contract' the inner part of the scene."""
        return (self.near, min(self.far, 2 * self.bound)) if self.space == "contract" else (self.near, self.far)


@dataclass
class Cameras:
    """N pinhole cameras in the scene's frame (OpenGL axes: -z forward, +y up): camera-to-world poses (N, 4, 4),
    intrinsics (N, 4) fx, fy, cx, cy in pixels from the image's top-left corner, sizes (N, 2) H, W, and the OpenCV
    lens distortion (N, 6) k1, k2, k3, k4, p1, p2 (None: none), as nerfstudio and Instant-NGP write them."""

    poses: torch.Tensor
    intrinsics: torch.Tensor
    sizes: torch.Tensor
    distortion: torch.Tensor = None

    def __len__(self):
        return len(self.poses)

    def __getitem__(self, index):
        """The cameras at index (an int keeps a batch of one)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        return Cameras(self.poses[index], self.intrinsics[index], self.sizes[index],
                       None if self.distortion is None else self.distortion[index])

    def to(self, device):
        return Cameras(*(None if x is None else x.to(device) for x in (self.poses, self.intrinsics, self.sizes,
                                                                       self.distortion)))

    def scaled(self, factor):
        """The same cameras with images factor times smaller (integer sizes, intrinsics scaled to match)."""
        return replace(self, intrinsics=self.intrinsics / factor, sizes=self.sizes // factor)

    def hw(self, k=0):
        """(H, W) of view k."""
        return tuple(int(x) for x in self.sizes[k])

    @classmethod
    def pinhole(cls, poses, focal, hw):
        """Cameras of one focal length, image size and centred principal point (a Blender or tiny-NeRF scene)."""
        H, W = hw
        intrinsics = torch.tensor([focal, focal, W / 2, H / 2], dtype=torch.float32).expand(len(poses), 4)
        return cls(poses, intrinsics.clone(), torch.tensor([H, W]).expand(len(poses), 2).clone())


def uniform(generator, rows, cols, like):
    """U[0, 1) of shape (rows, cols) like `like`; with a Shard, this rank's rows of the global draw."""
    if isinstance(generator, Shard):
        u = torch.rand(generator.total, cols, generator=generator.generator, device=like.device, dtype=like.dtype)
        return u[generator.lo: generator.lo + rows]
    return torch.rand(rows, cols, generator=generator, device=like.device, dtype=like.dtype)


def undistort(xd, yd, k, iterations=10):
    """The normalised image coordinates (x, y) that the OpenCV model with coefficients k (..., 6: k1 k2 k3 k4 p1 p2)
    distorts to (xd, yd): Newton's method from (xd, yd), as nerfstudio and MultiNeRF invert it."""
    k1, k2, k3, k4, p1, p2 = k.unbind(-1)
    x, y = xd, yd
    for _ in range(iterations):
        r = x * x + y * y
        d = 1 + r * (k1 + r * (k2 + r * (k3 + r * k4)))
        fx = d * x + 2 * p1 * x * y + p2 * (r + 2 * x * x) - xd
        fy = d * y + 2 * p2 * x * y + p1 * (r + 2 * y * y) - yd
        d_r = k1 + r * (2 * k2 + r * (3 * k3 + r * 4 * k4))
        d_x, d_y = 2 * x * d_r, 2 * y * d_r
        fx_x = d + d_x * x + 2 * p1 * y + 6 * p2 * x
        fx_y = d_y * x + 2 * p1 * x + 2 * p2 * y
        fy_x = d_x * y + 2 * p2 * y + 2 * p1 * x
        fy_y = d + d_y * y + 2 * p2 * x + 6 * p1 * y
        det = fy_x * fx_y - fx_x * fy_y
        det = torch.where(det.abs() > 1e-12, det, torch.full_like(det, -1e-12))
        x, y = x + (fx * fy_y - fy * fx_y) / det, y + (fy * fx_x - fx * fy_x) / det
    return x, y


def distort(x, y, k):
    """The OpenCV lens model: normalised image coordinates (x, y) to where the lens puts them (the inverse of
    undistort)."""
    k1, k2, k3, k4, p1, p2 = k.unbind(-1)
    r = x * x + y * y
    d = 1 + r * (k1 + r * (k2 + r * (k3 + r * k4)))
    return d * x + 2 * p1 * x * y + p2 * (r + 2 * x * x), d * y + 2 * p2 * x * y + p1 * (r + 2 * y * y)


def camera_directions(cameras, idx, i, j):
    """Camera-frame unit directions through the centres of pixels (column i, row j) of views idx (broadcast)."""
    fx, fy, cx, cy = cameras.intrinsics[idx].unbind(-1)
    x, y = (i + 0.5 - cx) / fx, (j + 0.5 - cy) / fy
    if cameras.distortion is not None:
        x, y = undistort(x, y, cameras.distortion[idx])
    d = torch.stack([x, -y, -torch.ones_like(x)], dim=-1)
    return d / d.norm(dim=-1, keepdim=True)


def ndc_rays(origins, dirs, ndc):
    """Rays of a forward-facing scene in normalised device coordinates (NeRF's ndc_rays, near plane z = -1): the
    points origin + t * dir, t in [0, 1), span the reference camera's frustum from that plane to infinity."""
    t = -(1.0 + origins[..., 2]) / dirs[..., 2]
    o = origins + t[..., None] * dirs
    ax, ay = ndc
    ndc_o = torch.stack([-ax * o[..., 0] / o[..., 2], -ay * o[..., 1] / o[..., 2], 1 + 2 / o[..., 2]], -1)
    ndc_d = torch.stack([-ax * (dirs[..., 0] / dirs[..., 2] - o[..., 0] / o[..., 2]),
                         -ay * (dirs[..., 1] / dirs[..., 2] - o[..., 1] / o[..., 2]), -2 / o[..., 2]], -1)
    return Rays(ndc_o, ndc_d, dirs)


def rays_for_pixels(cameras, idx, i, j, frame=None):
    """Rays through pixels (i, j) of views idx of cameras (broadcast), in the frame's space (NDC or the scene's)."""
    d = camera_directions(cameras, idx, i.to(cameras.poses.dtype), j.to(cameras.poses.dtype))
    c2w = cameras.poses[idx]
    dirs = (c2w[..., :3, :3] * d[..., None, :]).sum(-1)  # not a matmul: autocast would make it bf16
    origins = c2w[..., :3, 3].expand_as(dirs)
    if frame is not None and frame.space == "ndc":
        return ndc_rays(origins, dirs, frame.ndc)
    return Rays(origins, dirs, dirs)


def get_rays(cameras, k=0, frame=None):
    """All H*W rays of view k, row-major."""
    H, W = cameras.hw(k)
    dev = cameras.poses.device
    j, i = torch.meshgrid(torch.arange(H, device=dev), torch.arange(W, device=dev), indexing="ij")
    return rays_for_pixels(cameras, k, i.reshape(-1), j.reshape(-1), frame)


def contract(x):
    """mip-NeRF 360's contraction in the L-inf norm (nerfacto's for grids): the unit cube as it is, the rest of space
    into the shell up to 2."""
    n = x.abs().amax(-1, keepdim=True).clamp_min(1e-9)
    return torch.where(n <= 1, x, (2 - 1 / n) * x / n)


def sample_along_rays(rays, frame, num_samples, generator=None):
    """Stratified depths (R, S) from near to far: one uniform sample per bin with a generator, bin centres without;
    evenly spaced in depth, or in disparity under 'contract'."""
    R = rays.origins.shape[0]
    bins = torch.arange(num_samples, device=rays.origins.device, dtype=rays.origins.dtype).expand(R, num_samples)
    u = torch.full_like(bins, 0.5) if generator is None else uniform(generator, R, num_samples, bins)
    s = (bins + u) / num_samples
    if frame.space == "contract":
        return 1 / (1 / frame.near + (1 / frame.far - 1 / frame.near) * s)
    return frame.near + (frame.far - frame.near) * s


def segment_lengths(t, far):
    """The depth interval each sample (R, S) stands for: up to the next sample, the last one up to far."""
    return torch.diff(t, dim=-1, append=torch.full_like(t[..., :1], far))


def volume_render(rgb, sigma, t, far, background, scale=None):
    """Composite samples (R, S) front to back; returns rgb (R, 3), depth (R,), opacity (R,), weights (R, S).

    Each sample stands for the segment up to the next one (the last one up to `far`), its length times `scale` (R, 1;
    the length of a ray's direction, where it is not unit: NDC). Transmittance is the *exclusive* product: a sample is
    attenuated by what lies before it, not by itself.
    """
    deltas = segment_lengths(t, far) if scale is None else segment_lengths(t, far) * scale
    tau = sigma * deltas
    alpha = 1.0 - torch.exp(-tau)
    # the sum of the optical depth before each sample, summed as such: a running sum minus the sample's own term
    # loses the terms before a large one in fp32 (and gives inf - inf = NaN at an infinite density)
    trans = torch.exp(-torch.cumsum(F.pad(tau[..., :-1], (1, 0)), dim=-1))
    weights = alpha * trans
    acc = weights.sum(-1)
    out_rgb = (weights[..., None] * rgb).sum(-2) + (1.0 - acc)[..., None] * background
    depth = (weights * t).sum(-1)
    return out_rgb, depth, acc, weights


def distortion(weights, t, frame):
    """mip-NeRF 360's distortion loss per ray (R,) over samples t (R, S) and their weights, in the frame's normalised
    depths (each sample's segment runs to the next, the last to far): the weights' spread along the ray, smallest
    when a ray's weight sits in one thin segment. Sorted samples turn its sum over pairs into running sums. The
    last segment stops at far (NDC's 1, contraction's far) where rendering runs it to infinity: depths are bounded."""
    s = frame.normalized(torch.cat([t, torch.full_like(t[:, :1], frame.far)], -1)).clamp(0, 1)
    mid, width = (s[:, 1:] + s[:, :-1]) / 2, s[:, 1:] - s[:, :-1]
    before = torch.cumsum(weights, -1) - weights  # the weight in front of each sample
    moment_before = torch.cumsum(weights * mid, -1) - weights * mid
    return 2 * (weights * (mid * before - moment_before)).sum(-1) + (weights.square() * width).sum(-1) / 3


def sample_pdf(t, weights, far, num, generator=None):
    """num sorted depths (R, num) drawn by inverse CDF from the piecewise-constant pdf of weights.

    Sample i's weight is spread over the bin between the midpoints to its neighbours (the first bin starts
    at t[0], the last ends at far): density seen at a sample may begin before it. Strata of u keep the
    draws spread out; without a generator u is the strata centres (deterministic).
    """
    R, S = weights.shape
    edges = torch.cat([t[:, :1], (t[:, 1:] + t[:, :-1]) / 2, torch.full_like(t[:, :1], far)], dim=-1)
    pdf = weights + 1e-5  # a ray the first pass found empty still gets evenly spread samples
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf / pdf.sum(-1, keepdim=True), dim=-1)], -1)
    jitter = 0.5 if generator is None else uniform(generator, R, num, t)
    u = ((torch.arange(num, device=t.device, dtype=t.dtype) + jitter) / num).expand(R, num).contiguous()
    hi = torch.searchsorted(cdf.contiguous(), u, right=True).clamp(1, S)
    c0, c1 = cdf.gather(-1, hi - 1), cdf.gather(-1, hi)
    e0, e1 = edges.gather(-1, hi - 1), edges.gather(-1, hi)
    return e0 + (u - c0) / (c1 - c0).clamp_min(1e-12) * (e1 - e0)


class OccupancyGrid(nn.Module):
    """Which cells of the cube [-bound, bound]^3 of the model's space may hold density (as in nerfacc / instant-ngp).

    Samples in empty cells, or outside the cube, get zero density without querying the model. Every cell starts
    occupied; `update` replaces the cells it visits with max(decay * old, measured density). With `contracted`, the
    cube is that of contracted space ([-2, 2]^3) and samples are contracted before their cell is looked up.
    """

    def __init__(self, bound, resolution, sigma_threshold, contracted=False):
        super().__init__()
        self.bound, self.resolution, self.sigma_threshold = bound, resolution, sigma_threshold
        self.contracted = contracted
        self.register_buffer("density", torch.full((resolution,) * 3, float("inf")))
        # The occupied cells, padded by one empty cell on every side: a point outside the cube, clamped onto
        # the padding, reads False, so the lookup needs no separate inside test.
        self.register_buffer("mask", torch.zeros((resolution + 2,) * 3, dtype=torch.bool), persistent=False)
        self.refresh()

    def threshold(self):
        """Cells above this are occupied; the mean caps it so a young, faint model is not culled away."""
        finite = self.density[torch.isfinite(self.density)]
        return min(self.sigma_threshold, finite.mean().item()) if finite.numel() else self.sigma_threshold

    def refresh(self):
        """Recompute the occupied cells; density changes only in update and load_state_dict."""
        self.mask[1:-1, 1:-1, 1:-1] = self.density > self.threshold()

    def load_state_dict(self, state_dict, strict=True):
        """Load the density, then derive the occupied cells from it."""
        result = super().load_state_dict(state_dict, strict)
        self.refresh()
        return result

    def occupied(self, origins, dirs, t):
        """Which samples origins + t * dirs (rays (R, 3), depths (R, S)) must be sent to the model: bool (R, S).

        Works in padded-cell units from the start, so the points themselves are never materialised (faster than
        computing them, then their cells: docs/performance.md); contracted space needs the points.
        """
        scale = self.resolution / (2 * self.bound)
        if self.contracted:
            u = (contract(torch.addcmul(origins[:, None, :], dirs[:, None, :], t[..., None])) + self.bound) * scale + 1
        else:
            u = torch.addcmul(((origins + self.bound) * scale + 1)[:, None, :], (dirs * scale)[:, None, :],
                              t[..., None])
        return self.mask[u.clamp_(0, self.resolution + 1).long().unbind(-1)]  # u >= 0: long() is floor()

    @torch.no_grad()
    def update(self, model, fraction=1.0, decay=0.95, generator=None, chunk=None):
        """Measure the model's density at a jittered point in a random `fraction` of the cells; returns their count.

        On a CPU 4,096 points per model call keep the activations in cache; a GPU takes 65,536 per call, as there
        a call costs its kernel launches, not its arithmetic (docs/performance.md).
        """
        n = self.resolution ** 3
        dev = self.density.device
        chunk = chunk or (65536 if dev.type == "cuda" else 4096)
        cells = torch.randperm(n, generator=generator, device=dev)[: max(1, int(n * fraction))]
        ijk = torch.stack([cells // self.resolution ** 2, cells // self.resolution % self.resolution,
                           cells % self.resolution], -1)
        jitter = torch.rand(ijk.shape, generator=generator, device=dev)
        pts = (ijk + jitter) / self.resolution * 2 * self.bound - self.bound
        measured = torch.cat([model(p, torch.zeros_like(p) if model.use_viewdirs else None)[1].float()
                              for p in pts.split(chunk)])
        flat = self.density.view(-1)
        old = flat[cells]
        flat[cells] = torch.maximum(torch.where(torch.isfinite(old), old * decay, 0.0), measured)
        self.refresh()
        return len(cells)


def query_points(model, points, dirs):
    """model(points, dirs), called on at least 2 rows: torch.compile specializes batch sizes 0 and 1, and each
    would recompile the model (seconds apiece for a compiled BitNeRF with gradients)."""
    n = len(points)
    if n >= 2:
        return model(points, dirs)
    pad = lambda x: None if x is None else torch.cat([x, x.new_zeros(2 - n, x.shape[-1])])  # noqa: E731
    rgb, sigma = model(pad(points), pad(dirs))
    return rgb[:n], sigma[:n]


def query_kept(model, rays, t, keep, skip_zero_density=False, frame=None, out=None):
    """The model's rgb (R, S, 3) and density (R, S) at depths t along rays; zero where keep is False (not queried),
    or, with out (rgb, sigma), written into those tensors where keep is True (rendering: no skip_zero_density).

    With skip_zero_density and gradients on, a no-grad pass first finds the samples of zero density and the
    gradient pass leaves them out: such a sample has zero weight and, under a ReLU density, zero gradient, so it
    changes neither the loss nor its gradient, and finding it takes a forward pass alone (no backward).
    """
    rows, cols = keep.nonzero(as_tuple=True)
    points = torch.addcmul(rays.origins[rows], rays.dirs[rows], t[rows, cols, None])
    points = points if frame is None else frame.warp(points)
    inner = getattr(model, "module", model)  # under DDP the no-grad pass needs no gradient sync
    dirs = rays.viewdirs[rows] if inner.use_viewdirs else None
    if skip_zero_density and torch.is_grad_enabled():
        with torch.no_grad():
            live = (query_points(inner, points, dirs)[1] > 0).nonzero()[:, 0]
        rows, cols, points = rows[live], cols[live], points[live]
        dirs = dirs[live] if dirs is not None else None
    rgb_kept, sigma_kept = query_points(model, points, dirs)
    rgb, sigma = out or (torch.zeros(*keep.shape, 3, device=t.device), torch.zeros(keep.shape, device=t.device))
    return rgb.index_put_((rows, cols), rgb_kept.float()), sigma.index_put_((rows, cols), sigma_kept.float())


def query_all(model, rays, t, keep, frame=None):
    """The model's rgb (R, S, 3) and density (R, S) at every depth t along rays, then zero where keep is False.

    The same as query_kept, but no sample is left out: every call has the same shapes, as a CUDA graph needs.
    """
    points = torch.addcmul(rays.origins[:, None], rays.dirs[:, None], t[..., None]).reshape(-1, 3)
    points = points if frame is None else frame.warp(points)
    use_viewdirs = getattr(model, "module", model).use_viewdirs
    dirs = rays.viewdirs[:, None].expand(*t.shape, 3).reshape(-1, 3) if use_viewdirs else None
    rgb, sigma = query_points(model, points, dirs)
    return (torch.where(keep[..., None], rgb.float().view(*t.shape, 3), 0.0),
            torch.where(keep, sigma.float().view(t.shape), 0.0))


def direction_scale(rays, frame):
    """The lengths (R, 1) of the rays' sampling directions where they are not unit (NDC), else None."""
    return rays.dirs.norm(dim=-1, keepdim=True) if frame.space == "ndc" else None


def occupancy(grid, rays, t):
    """Which samples at depths t (R, S) the occupancy grid sends to the model; all of them without a grid."""
    return grid.occupied(rays.origins, rays.dirs, t) if grid is not None else torch.ones_like(t, dtype=torch.bool)


def sample_lengths(rays, t, frame):
    """The length each sample stands for along its ray (segment_lengths, times the direction's length in NDC)."""
    scale = direction_scale(rays, frame)
    return segment_lengths(t, frame.end()) * (1 if scale is None else scale)


def query_marching(model, rays, t, keep, frame, min_transmittance):
    """Rendering's query (no gradients): the model's rgb (R, S, 3) and density (R, S) at the kept depths, front to
    back in blocks of ERT_BLOCK samples; a ray whose transmittance fell below min_transmittance is no longer queried
    (early ray termination: the skipped samples could change its colour and opacity by less than that). Unqueried
    samples are zero; also returns which samples were queried."""
    deltas = sample_lengths(rays, t, frame)
    rgb, sigma = torch.zeros(*t.shape, 3, device=t.device), torch.zeros(t.shape, device=t.device)
    queried = torch.zeros_like(keep)
    optical_depth = torch.zeros(t.shape[0], device=t.device)  # -log transmittance before the current block
    for lo in range(0, t.shape[1], ERT_BLOCK):
        block = slice(lo, lo + ERT_BLOCK)
        queried[:, block] = keep[:, block] & (optical_depth < -math.log(min_transmittance))[:, None]
        if queried[:, block].any():  # else no model call: one on no rows costs as much as a small one
            rgb[:, block], sigma[:, block] = query_kept(model, rays, t[:, block], queried[:, block], frame=frame)
            optical_depth += (sigma[:, block] * deltas[:, block]).sum(-1)
    return rgb, sigma, queried


def shade(model, rays, t, frame, background, grid=None, min_transmittance=0.0, skip_zero_density=False,
          fixed_shapes=False, until=None):
    """Query the model at depths t (only where the occupancy grid says there may be density, and short of `until`
    (R,) where given) and composite: volume_render's rgb, depth, opacity and weights, then the densities (R, S).

    With min_transmittance > 0 and no gradients (rendering), early ray termination (see query_marching).
    With fixed_shapes (training under a CUDA graph) every sample is queried and the culled ones zeroed instead
    (query_all): the same result, with shapes that do not depend on the grid.
    """
    keep = occupancy(grid, rays, t) if until is None else occupancy(grid, rays, t) & (t < until[:, None])
    if fixed_shapes:
        rgb, sigma = query_all(model, rays, t, keep, frame)
    elif not min_transmittance or torch.is_grad_enabled():
        rgb, sigma = query_kept(model, rays, t, keep, skip_zero_density, frame)
    else:
        rgb, sigma, _ = query_marching(model, rays, t, keep, frame, min_transmittance)
    return *volume_render(rgb, sigma, t, frame.end(), background, direction_scale(rays, frame)), sigma


def render_rays(model, rays, frame, num_samples, background, generator=None, grid=None, num_fine=0,
                min_transmittance=0.0, skip_zero_density=False, fixed_shapes=False, with_distortion=False):
    """Render rays: stratified samples, and with num_fine a coarse -> fine pass as in the NeRF paper.

    The coarse pass runs without gradients through the same model; its weights place num_fine more
    samples, and the loss sees the union of both sets (so empty space is still supervised). With min_transmittance,
    training (gradients on) queries the union only up to where the coarse pass found a ray's transmittance below it
    (stop_depths; Instant-NGP and nerfacc stop a training ray likewise, on its own samples), and rendering terminates
    rays early on the samples themselves in both passes (see shade). skip_zero_density leaves the samples of zero
    density out of the gradient pass when training (see query_kept); fixed_shapes queries every sample instead of
    compacting the kept ones (see shade), for a CUDA graph.
    Returns rgb (R, 3), depth (R,), opacity (R,), and with_distortion each ray's distortion loss (R,).
    """
    t, until, training = sample_along_rays(rays, frame, num_samples, generator), None, torch.is_grad_enabled()
    if num_fine:
        with torch.no_grad():  # training's coarse pass in one call: marching it in blocks measured slower
            *_, weights, sigma = shade(model, rays, t, frame, background, grid,
                                       0.0 if training else min_transmittance, fixed_shapes=fixed_shapes)
        if min_transmittance and training:
            until = stop_depths(t, sigma * sample_lengths(rays, t, frame), min_transmittance)
        t = torch.sort(torch.cat([t, sample_pdf(t, weights, frame.far, num_fine, generator)], dim=-1), dim=-1).values
    rgb, depth, acc, weights, _ = shade(model, rays, t, frame, background, grid, min_transmittance, skip_zero_density,
                                        fixed_shapes, until)
    return (rgb, depth, acc, distortion(weights, t, frame)) if with_distortion else (rgb, depth, acc)


def stop_depths(t, tau, min_transmittance):
    """The depth (R,) by which each ray's transmittance has fallen below min_transmittance even without its densest
    sample so far, from the samples' optical depths tau (R, S): the end of the first segment past which it has (the
    next sample's depth); inf where none has, or where that segment is the last one (it runs to far).

    Leaving the densest sample out keeps a layer thinner than the samples' spacing, which one coarse sample sees as
    opaque over its whole segment while the joined samples see through it, from cutting the ray short.
    """
    optical_depth = torch.cumsum(tau, -1) - torch.cummax(tau, -1).values  # never decreasing
    seen = (optical_depth <= -math.log(min_transmittance)).sum(-1, keepdim=True)  # the samples before that one
    return torch.where(seen + 1 < t.shape[1], t.gather(-1, (seen + 1).clamp_max(t.shape[1] - 1)), math.inf)[:, 0]


def by_depth(order, coarse, fine):
    """Per-sample values of the coarse (R, S, ...) and fine (R, F, ...) samples, joined in the order of their depths."""
    both = torch.cat([coarse, fine], 1)
    return both.gather(1, order.view(*order.shape, *[1] * (both.dim() - 2)).expand_as(both))


def query_unknown(model, rays, t, deltas, ask, frame, limit, rgb, sigma, known):
    """Query the asked samples whose values are not yet known and that may still be seen: the optical depth before
    them (sigma times the samples' lengths, deltas), summed over the known samples alone (the others count 0: a
    lower bound), is below limit. Samples whose bound reaches it are behind transmittance exp(-limit) whatever the
    unknown values are. rgb and sigma are updated in place."""
    tau = sigma * deltas
    ask = ask & ~known & (torch.cumsum(F.pad(tau[:, :-1], (1, 0)), dim=-1) < limit)
    if not ask.any():
        return rgb, sigma, known
    return (*query_kept(model, rays, t, ask, frame=frame, out=(rgb, sigma)), known | ask)


@torch.no_grad()
def render_rays_still(model, rays, frame, num_samples, background, grid=None, num_fine=0, min_transmittance=0.0):
    """render_rays for rendering (no gradients, samples at the strata's centres), with the work of two passes cut.

    A ray none of whose stratified samples meets an occupied cell of the grid shows the background: it skips the
    per-sample work of both passes (sampling, sorting, compositing), though the grid had culled its queries already.
    The fine pass keeps the coarse pass's values and queries what is new: first its own samples, then any coarse
    sample that early termination skipped but that the joined samples may still see (query_unknown), so that the
    render is render_rays' within early termination's tolerance, but for a ray whose coarse samples all fall in
    empty cells and whose uniform fine ones would reach one. Measured against render_rays: docs/fullres.md.
    """
    t = sample_along_rays(rays, frame, num_samples)
    keep = occupancy(grid, rays, t)
    R = t.shape[0]
    rgb_out, depth_out, acc_out = background.to(t.dtype).expand(R, 3).clone(), t.new_zeros(R), t.new_zeros(R)
    live = keep.any(-1).nonzero()[:, 0]
    if len(live) == 0:
        return rgb_out, depth_out, acc_out
    if len(live) < R:
        rays, t, keep = Rays(*(x[live] for x in rays)), t[live], keep[live]
    scale = direction_scale(rays, frame)
    if min_transmittance:
        rgb, sigma, known = query_marching(model, rays, t, keep, frame, min_transmittance)
    else:
        (rgb, sigma), known = query_kept(model, rays, t, keep, frame=frame), keep
    if num_fine:
        weights = volume_render(rgb, sigma, t, frame.end(), background, scale)[3]
        t_fine = sample_pdf(t, weights, frame.far, num_fine)
        keep_fine = occupancy(grid, rays, t_fine)
        t, order = torch.sort(torch.cat([t, t_fine], dim=-1), dim=-1)
        fine = order >= num_samples  # the joined order's indices past the coarse ones are the new samples
        keep, known = by_depth(order, keep, keep_fine), by_depth(order, known, torch.zeros_like(keep_fine))
        rgb, sigma = by_depth(order, rgb, rgb.new_zeros(*t_fine.shape, 3)), by_depth(order, sigma, t_fine.new_zeros(
            t_fine.shape))
        limit = -math.log(min_transmittance) if min_transmittance else math.inf
        deltas = sample_lengths(rays, t, frame)
        # the new samples front to back, FINE_BLOCK of each ray's at a time (those behind a surface found by the
        # first ones are not queried; without early termination, all at once), then any coarse sample still unknown
        # and maybe seen
        rank = torch.cumsum(fine, -1)
        groups = range(FINE_BLOCK if min_transmittance else num_fine, num_fine + FINE_BLOCK, FINE_BLOCK)
        for ask in [keep & fine & (rank <= k) for k in groups] + [keep]:
            rgb, sigma, known = query_unknown(model, rays, t, deltas, ask, frame, limit, rgb, sigma, known)
    rgb_out[live], depth_out[live], acc_out[live] = volume_render(rgb, sigma, t, frame.end(), background, scale)[:3]
    return rgb_out, depth_out, acc_out


@torch.no_grad()
def render_image(model, camera, frame, num_samples, background, chunk, grid=None, num_fine=0,
                 min_transmittance=0.0, stop=None, amp=None, chunk_map=map):
    """Render view 0 of camera CHUNK rays at a time (memory independent of image size); rgb (H,W,3), depth,
    opacity. `stop` is asked before each chunk: any True abandons the image (None is returned). Each chunk
    renders under the `amp` context (autocast is per thread) and chunk_map maps over them (chunks_in_parallel's
    renders several at once)."""
    H, W = camera.hw()
    rays = get_rays(camera, 0, frame)

    def render_chunk(r):
        """One chunk's rgb, depth and opacity; None once stop answers True."""
        if stop is not None and stop():
            return None
        with copy.copy(amp) if amp is not None else nullcontext():  # a context object is entered once at a time
            return render_rays_still(model, Rays(*r), frame, num_samples, background, grid, num_fine,
                                     min_transmittance)

    outs = list(chunk_map(render_chunk, zip(*(x.split(chunk) for x in rays), strict=True)))
    if any(out is None for out in outs):
        return None
    rgb, depth, acc = (torch.cat(x) for x in zip(*outs, strict=True))
    return rgb.reshape(H, W, 3), depth.reshape(H, W), acc.reshape(H, W)


def pose_spherical(theta, phi, radius):
    """Camera-to-world matrix on a sphere looking at the origin (degrees), z up, as in the NeRF authors' code."""
    th, ph = math.radians(theta), math.radians(phi)
    trans = torch.eye(4)
    trans[2, 3] = radius
    rot_phi = torch.tensor([[1, 0, 0, 0], [0, math.cos(ph), -math.sin(ph), 0],
                            [0, math.sin(ph), math.cos(ph), 0], [0, 0, 0, 1]], dtype=torch.float32)
    rot_theta = torch.tensor([[math.cos(th), 0, -math.sin(th), 0], [0, 1, 0, 0],
                              [math.sin(th), 0, math.cos(th), 0], [0, 0, 0, 1]], dtype=torch.float32)
    swap = torch.tensor([[-1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float32)
    return swap @ rot_theta @ rot_phi @ trans


def look_at(position, target, up):
    """Camera-to-world (4, 4) at position looking at target, its y axis toward up (OpenGL axes)."""
    back = F.normalize(position - target, dim=0)
    right = F.normalize(torch.linalg.cross(up, back), dim=0)
    c2w = torch.eye(4)
    c2w[:3, :3] = torch.stack([right, torch.linalg.cross(back, right), back], 1)
    c2w[:3, 3] = position
    return c2w


def orbit_path(poses, n):
    """n poses around the scene's z axis at the cameras' mean distance and height, looking at the origin: a whole
    orbit, or where the cameras leave a gap of over 60 degrees (a capture from one side) back and forth over the arc
    they cover."""
    radius = poses[:, :3, 3].norm(dim=-1).mean().item()
    elevation = math.asin(max(-1.0, min(1.0, (poses[:, 2, 3] / poses[:, :3, 3].norm(dim=-1)).mean().item())))
    azimuths = torch.atan2(poses[:, 1, 3], poses[:, 0, 3]).sort().values
    gaps = torch.diff(azimuths, append=azimuths[:1] + 2 * math.pi)
    widest = int(gaps.argmax())
    if gaps[widest] > math.radians(60):  # the arc from just after the widest gap round to just before it
        start, span = azimuths[(widest + 1) % len(azimuths)].item(), 2 * math.pi - gaps[widest].item()
        steps = (1 - torch.cos(torch.linspace(0, 2 * math.pi, n + 1)[:-1])) / 2  # there and back, easing at the ends
        angles = (start + span * steps).tolist()
    else:
        angles = torch.linspace(0, 2 * math.pi, n + 1)[:-1].tolist()
    up, origin = torch.tensor([0.0, 0.0, 1.0]), torch.zeros(3)
    return [look_at(radius * torch.tensor([math.cos(elevation) * math.cos(a), math.cos(elevation) * math.sin(a),
                                           math.sin(elevation)]), origin, up) for a in angles]


def spiral_path(poses, focus, n, rotations=2):
    """n poses on LLFF's spiral around the mean pose (the scene's frame is centred on it: the identity), looking at
    the point `focus` in front of it; its radii the 90th percentile of the cameras' offsets."""
    radii = poses[:, :3, 3].abs().quantile(0.9, dim=0).tolist() + [1.0]
    path = []
    for theta in torch.linspace(0.0, 2 * math.pi * rotations, n + 1)[:-1].tolist():
        c = torch.tensor([math.cos(theta) * radii[0], -math.sin(theta) * radii[1], -math.sin(0.5 * theta) * radii[2]])
        path.append(look_at(c, torch.tensor([0.0, 0.0, -focus]), torch.tensor([0.0, 1.0, 0.0])))
    return path


def video_path(frame, cameras, n):
    """The video's camera poses: the frame's orbit or spiral over the cameras' poses."""
    poses = cameras.poses.float().cpu()
    return spiral_path(poses, frame.focus, n) if frame.video == "spiral" else orbit_path(poses, n)


def build_grid(cfg, frame, device):
    """The occupancy grid a config asks for (or None), over the frame's cube; a cell counts as empty below alpha
    0.01 per sample. None in NDC: a forward-facing scene fills its frustum, and culling there cost more quality than its
    extra steps bought (docs/captures.md)."""
    if not cfg["OCC_GRID"] or frame.space == "ndc":
        return None
    threshold = -math.log(1 - 0.01) / frame.sample_step(cfg["NUM_SAMPLES"])
    return OccupancyGrid(frame.bound, cfg["GRID_RES"], threshold, frame.space == "contract").to(device)


def rebuild_grid(model, cfg, frame, device, passes=16):
    """An occupancy grid measured from a model alone (for an export, which carries no grid): max of passes.

    Each pass measures one jittered point per cell; a hash model's thin structures need many passes to be found
    (what 4 and 16 passes cost an export: docs/hash.md)."""
    grid = build_grid(cfg, frame, device)
    if grid is not None:
        generator = torch.Generator(device=device).manual_seed(cfg["SEED"])
        for _ in range(passes):
            grid.update(model, 1.0, decay=1.0, generator=generator)
    return grid


def render_view(model, camera, scene, cfg, grid, amp, stop=None, chunk_map=map):
    """Render view 0 of camera with the config's sampling, under amp (stop, chunk_map: see render_image)."""
    return render_image(model, camera, scene.frame, cfg["NUM_SAMPLES"], scene.background, cfg["CHUNK"], grid,
                        cfg["NUM_FINE"], cfg["ERT_TRANSMITTANCE"], stop, amp, chunk_map)


@contextmanager
def chunks_in_parallel(threads):
    """A map over independent chunks of rays (a view's; a training batch's slices): on `threads` Python threads, with
    torch's intra-op threads shared out among them while it is open (threads > 1), else the built-in map.

    On a CPU a chunk's many small ops scale poorly over intra-op threads, while chunks are independent: two threads
    of one chunk each beat one chunk on two threads (docs/fullres.md, docs/captures.md). torch's ops release the GIL.
    The setting is the process's: not for nested use, nor while other work runs."""
    if threads <= 1:
        yield map
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // threads))
    try:
        with ThreadPoolExecutor(threads) as pool:
            yield pool.map
    finally:
        torch.set_num_threads(before)


def evaluate_views(model, views, scene, cfg, grid, amp, n_views=None, save_dir=None, rank=0, world=1, threads=1):
    """Mean per-view PSNR and SSIM over the first n_views of a split (all by default), plus view 0's renders.

    The scores also list each view's ("per_view", of this rank's views). Under DDP each rank renders every
    world-th view and the sums are all-reduced. With save_dir, each render and its depth picture are also written
    there as PNG. threads > 1 renders that many chunks of a view at once (chunks_in_parallel; not for a compiled
    model).
    """
    import imageio.v2 as imageio

    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
    model.eval()
    per_view, first = [], None
    for k in range(rank, len(views) if n_views is None else min(n_views, len(views)), world):
        with chunks_in_parallel(threads) as chunk_map:  # the scores below keep torch's threads
            rgb, depth, acc = render_view(model, views.cameras[k], scene, cfg, grid, amp, chunk_map=chunk_map)
        target = views.image(k)
        per_view.append({"view": k, "psnr": psnr(rgb, target), "ssim": ssim(rgb, target)})
        if first is None or save_dir:  # the depth picture only where it is shown or saved
            depth = depth_image(depth, acc, *scene.frame.depth_range())
            first = first or (rgb, target, depth)
        if save_dir:
            imageio.imwrite(os.path.join(save_dir, f"{k:03d}.png"), to_uint8(rgb))
            imageio.imwrite(os.path.join(save_dir, f"{k:03d}_depth.png"), depth)
    model.train()
    sums = [sum(v["psnr"] for v in per_view), sum(v["ssim"] for v in per_view), len(per_view)]
    total_psnr, total_ssim, count = all_reduce(sums) if world > 1 else sums
    return {"psnr": total_psnr / count, "ssim": total_ssim / count, "views": int(count), "per_view": per_view}, first


def render_videos(model, views, scene, cfg, grid, amp, out_dir, tag=""):
    """The scene's video path (an orbit, or a spiral for a forward-facing capture; rgb and depth) through the first
    view's camera at its resolution / VIDEO_DOWNSCALE, written as mp4 and gif (named video{tag}, depth{tag});
    returns the rgb mp4 path."""
    camera = replace(views.cameras[0].scaled(cfg["VIDEO_DOWNSCALE"]), distortion=None)  # an ideal lens
    rgb_frames, depth_frames = [], []
    model.eval()
    for c2w in video_path(scene.frame, views.cameras, cfg["VIDEO_FRAMES"]):
        rgb, depth, acc = render_view(model, replace(camera, poses=c2w[None].to(camera.poses)), scene, cfg, grid, amp)
        rgb_frames.append(to_uint8(rgb))
        depth_frames.append(depth_image(depth, acc, *scene.frame.depth_range()))
    model.train()
    for name, frames in (("video", rgb_frames), ("depth", depth_frames)):
        for ext in ("mp4", "gif"):
            write_video(frames, os.path.join(out_dir, f"{name}{tag}.{ext}"))
    return os.path.join(out_dir, f"video{tag}.mp4")
