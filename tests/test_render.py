"""Rays, sampling and volume rendering against cases with known answers."""
import math

import pytest
import torch

import render
from nerf import NeRF
from render import (
    Cameras,
    Frame,
    OccupancyGrid,
    Rays,
    chunks_in_parallel,
    get_rays,
    pose_spherical,
    render_image,
    render_rays,
    render_rays_still,
    sample_along_rays,
    volume_render,
)


def pinhole(c2w, H, W, focal):
    """One centred pinhole camera at c2w."""
    return Cameras.pinhole(c2w[None], focal, (H, W))


def rays_of(origins, dirs):
    """Rays whose sampling directions are their (unit) view directions."""
    return Rays(origins, dirs, dirs)


def test_rays_hit_the_pixels_known_points_project_to():
    """A 3D point projected by the pinhole model lies on the ray through its pixel."""
    H, W, focal = 30, 40, 35.0
    c2w = pose_spherical(30.0, -20.0, 4.0)
    w2c = torch.linalg.inv(c2w)
    rays = get_rays(pinhole(c2w, H, W, focal))
    for p in torch.tensor([[0.1, 0.2, -0.3], [0.5, -0.4, 0.2], [-0.2, 0.0, 0.6]]):
        cam = w2c[:3, :3] @ p + w2c[:3, 3]
        assert cam[2] < 0  # in front of an OpenGL camera
        u, v = W / 2 + focal * cam[0] / -cam[2], H / 2 - focal * cam[1] / -cam[2]
        k = int(v) * W + int(u)
        o, d = rays.origins[k], rays.viewdirs[k]
        to_p = (p - o) / (p - o).norm()
        # the ray through the pixel centre passes within half a pixel of p's direction
        assert torch.acos(torch.clamp(to_p @ d, -1, 1)) < 0.75 / focal
    assert torch.allclose(rays.viewdirs.norm(dim=-1), torch.ones(H * W), atol=1e-6)


def test_camera_looks_at_origin():
    c2w = pose_spherical(123.0, -30.0, 4.0)
    centre = get_rays(pinhole(c2w, 2, 2, 10.0))
    mid = centre.viewdirs.mean(0)
    assert torch.allclose(mid / mid.norm(), -c2w[:3, 3] / 4.0, atol=1e-5)


def test_homogeneous_slab_matches_analytic_transmittance_and_depth():
    """Density s on [a, b], zero elsewhere: opacity 1 - exp(-s(b-a)), depth and colour known in closed form."""
    a, b, s, near, far, n = 3.0, 4.0, 2.0, 2.0, 6.0, 4000
    t = (near + (far - near) * (torch.arange(n, dtype=torch.float64) + 0.5) / n)[None]
    sigma = torch.where((t >= a) & (t < b), s, 0.0)
    rgb = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64).expand(1, n, 3)
    bg = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    out, depth, acc, _ = volume_render(rgb, sigma, t, far, bg)
    opacity = 1 - math.exp(-s * (b - a))
    exp_depth = a + 1 / s - (b + 1 / s) * math.exp(-s * (b - a))  # integral of t s exp(-s (t - a)) over [a, b]
    assert abs(acc.item() - opacity) < 1e-3
    assert abs(depth.item() - exp_depth) < 2e-3
    assert torch.allclose(out[0], opacity * rgb[0, 0] + (1 - opacity) * bg, atol=1e-3)


def test_transmittance_is_exclusive():
    """A single opaque-ish sample gets weight alpha, not alpha * (1 - alpha) as an inclusive cumprod gives."""
    t = torch.tensor([[2.0, 3.0]])
    sigma = torch.tensor([[1.0, 0.0]])
    _, _, acc, _ = volume_render(torch.ones(1, 2, 3), sigma, t, 4.0, torch.zeros(3))
    assert abs(acc.item() - (1 - math.exp(-1.0))) < 1e-6


@pytest.mark.parametrize("density", [1e6, 1e8, float("inf")])
def test_a_surface_of_huge_density_behind_faint_fog_is_opaque_in_float32(density):
    """The hash model's exp density can grow very large; the fog before the surface must still attenuate it and
    the ray end fully opaque (a running sum minus each term lost the fog in fp32: 0.92 or 1.004 opaque, NaN at inf)."""
    t = torch.linspace(2.0, 6.0, 65)[None, :-1]
    sigma = torch.where(torch.arange(64) < 20, 0.3, density)[None]
    rgb, _, acc, weights = volume_render(torch.ones(1, 64, 3), sigma, t, 6.0, torch.zeros(3))
    fog = 1 - math.exp(-0.3 * (t[0, 20] - t[0, 0]).item())  # the fog's opacity before the surface at sample 20
    assert acc.item() == pytest.approx(1.0, abs=1e-6) and rgb[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert weights[0, :20].sum().item() == pytest.approx(fog, abs=1e-5)


def test_stratified_samples_stay_in_their_bins():
    rays = rays_of(torch.zeros(5, 3), torch.tensor([[0.0, 0.0, -1.0]]).expand(5, 3))
    g = torch.Generator().manual_seed(0)
    t = sample_along_rays(rays, Frame(), 8, g)
    lo = 2.0 + 4.0 * torch.arange(8) / 8
    assert ((t >= lo) & (t <= lo + 0.5)).all() and not torch.allclose(t[0], t[1])
    assert torch.allclose(sample_along_rays(rays, Frame(), 8)[0], lo + 0.25)


def test_render_image_does_not_depend_on_chunk_size():
    torch.manual_seed(0)
    model = NeRF(pos_encode_dims=4, num_layers=2, emb_dim=16)
    c2w = pose_spherical(10.0, -30.0, 4.0)
    a = render_image(model, pinhole(c2w, 9, 11, 12.0), Frame(), 16, torch.zeros(3), chunk=7)
    b = render_image(model, pinhole(c2w, 9, 11, 12.0), Frame(), 16, torch.zeros(3), chunk=1000)
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(x, y, atol=1e-6)
    assert a[0].shape == (9, 11, 3) and a[1].shape == (9, 11)


def test_view_directions_change_colour_only():
    torch.manual_seed(0)
    model = NeRF(pos_encode_dims=4, num_layers=4, emb_dim=16, use_viewdirs=True)
    x = torch.randn(10, 3)
    d1, d2 = torch.nn.functional.normalize(torch.randn(2, 10, 3), dim=-1)
    (rgb1, s1), (rgb2, s2) = model(x, d1), model(x, d2)
    assert torch.equal(s1, s2) and not torch.allclose(rgb1, rgb2)


class Ball(torch.nn.Module):
    """A stand-in model: density 50 inside a ball of radius 0.6 at the origin, zero outside."""

    use_viewdirs = False

    def forward(self, x, d=None):
        return torch.full_like(x, 0.5), torch.where(x.norm(dim=-1) < 0.6, 50.0, 0.0)


def occupied_at(grid, pts):
    """The grid's verdict on points (N, 3), each as a ray of one sample at depth 0."""
    return grid.occupied(pts, torch.zeros_like(pts), torch.zeros(len(pts), 1))[:, 0]


def test_occupancy_grid_keeps_dense_cells_and_culls_empty_ones():
    grid = OccupancyGrid(bound=1.5, resolution=16, sigma_threshold=1.0)
    grid.update(Ball(), generator=torch.Generator().manual_seed(0))
    axis = (torch.arange(16) + 0.5) / 16 * 3.0 - 1.5
    centres = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    half_diag = 3.0 / 16 * math.sqrt(3) / 2
    occupied = occupied_at(grid, centres)
    assert occupied[centres.norm(dim=-1) + half_diag < 0.6].all()  # wholly dense cells are never culled
    assert not occupied[centres.norm(dim=-1) - half_diag > 0.6].any()  # wholly empty cells are culled
    assert not occupied_at(grid, torch.tensor([[2.0, 0.0, 0.0]])).any()  # outside the cube: nothing to query


def test_grid_update_measures_the_same_density_whatever_its_call_size():
    sizes = []

    class Sized(Blob):  # a smooth field, so that a point misplaced between calls would change the result
        def forward(self, x, d=None):
            sizes.append(len(x))
            return super().forward(x, d)

    densities = {}
    for chunk in (None, 1000, 4096, 10 ** 6):  # None: the CPU's default, 4,096
        grid = OccupancyGrid(bound=1.5, resolution=24, sigma_threshold=1.0)
        sizes.clear()
        measured = grid.update(Sized(), 0.5, generator=torch.Generator().manual_seed(3), chunk=chunk)
        assert max(sizes) == min(chunk or 4096, 24 ** 3 // 2) and sum(sizes) == measured == 24 ** 3 // 2
        densities[chunk] = grid.density
    for d in densities.values():  # the same points and cells; only the last bit of a vectorised op may differ
        torch.testing.assert_close(d, densities[None], rtol=1e-6, atol=0.0)


def test_the_grid_lookup_reads_the_cell_a_point_lies_in_and_nothing_outside_the_cube():
    grid = OccupancyGrid(bound=1.5, resolution=4, sigma_threshold=1.0)
    grid.density.fill_(0.0)
    grid.density[3, 0, 2] = 2.0  # the cell x in [0.75, 1.5), y in [-1.5, -0.75), z in [0, 0.75)
    grid.refresh()
    inside = torch.tensor([[0.75, -1.5, 0.0], [1.499, -0.751, 0.749], [1.0, -1.0, 0.5]])
    outside = torch.tensor([[1.5, -1.0, 0.5], [1.0, -1.501, 0.5], [0.749, -1.0, 0.5], [1.0, -1.0, -0.001],
                            [9.0, -1.0, 0.5], [-9.0, -9.0, -9.0]])
    assert occupied_at(grid, inside).all() and not occupied_at(grid, outside).any()
    # along a ray the sample positions are origin + t * direction
    origin, direction = torch.tensor([[1.0, -1.0, -3.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    ray = grid.occupied(origin, direction, torch.tensor([[2.0, 3.2, 3.8]]))
    assert ray.tolist() == [[False, True, False]]


class Blob(Ball):
    """A solid object with a soft surface, as a trained NeRF of lego is: density 50 fading over ~0.05."""

    def forward(self, x, d=None):
        return torch.sigmoid(x * 3), 50.0 * torch.sigmoid((0.6 - x.norm(dim=-1)) / 0.02)


def test_grid_skipping_leaves_the_render_of_a_smooth_scene_unchanged():
    c2w = pose_spherical(40.0, -30.0, 4.0)
    grid = OccupancyGrid(bound=1.5, resolution=32, sigma_threshold=-math.log(0.99) / (4.0 / 128))
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):  # training updates every 16 steps; each visit probes a new random point per cell
        grid.update(Blob(), generator=gen)
    (rgb, depth, acc) = render_image(Blob(), pinhole(c2w, 24, 24, 30.0), Frame(), 128, torch.zeros(3), chunk=256)
    skipped = render_image(Blob(), pinhole(c2w, 24, 24, 30.0), Frame(), 128, torch.zeros(3), chunk=256, grid=grid)
    assert acc.max() > 0.99 and occupied_at(grid, torch.rand(1000, 3) * 3 - 1.5).float().mean() < 0.1
    # what is skipped is haze below alpha 0.01 per sample: only grazing rays through it change, a little
    assert (rgb - skipped[0]).abs().max() < 0.05 and (rgb - skipped[0]).abs().mean() < 1e-3
    assert (acc - skipped[2]).abs().max() < 0.05 and (depth - skipped[1]).abs().mean() < 0.01


def test_a_fresh_grid_culls_nothing_inside_the_cube():
    grid = OccupancyGrid(bound=1.5, resolution=8, sigma_threshold=1.0)
    assert occupied_at(grid, torch.rand(100, 3) * 2.8 - 1.4).all()


def test_density_is_alive_at_initialisation():
    """A ReLU density that starts at zero everywhere never gets a gradient (it did for seed 0 with viewdirs)."""
    x = torch.rand(20000, 3) * 3 - 1.5
    d = torch.nn.functional.normalize(torch.randn(20000, 3), dim=-1)
    for use_viewdirs in (False, True):
        for seed in range(4):
            torch.manual_seed(seed)
            model = NeRF(pos_encode_dims=10, num_layers=8, emb_dim=64, use_viewdirs=use_viewdirs)
            sigma = model(x, d if use_viewdirs else None)[1]
            assert (sigma > 0).float().mean() > 0.9, (use_viewdirs, seed)


def test_early_ray_termination_stops_querying_behind_surfaces_and_keeps_the_render():
    c2w = pose_spherical(40.0, -30.0, 4.0)
    queried = []

    class Counting(Blob):
        def forward(self, x, d=None):
            queried.append(x.shape[0])
            return super().forward(x, d)

    # a 12 x 12 view that the solid blob fills: every ray hits it about half-way along
    (rgb, depth, acc) = render_image(Counting(), pinhole(c2w, 12, 12, 60.0), Frame(), 128, torch.zeros(3), chunk=50)
    n_full, queried[:] = sum(queried), []
    ert = render_image(Counting(), pinhole(c2w, 12, 12, 60.0), Frame(), 128, torch.zeros(3), chunk=50,
                       min_transmittance=1e-4)
    assert acc.min() > 0.999 and sum(queried) < 0.7 * n_full  # samples inside the blob are never queried
    # what is skipped lies behind transmittance < 1e-4: colour and opacity move by less than that
    assert (rgb - ert[0]).abs().max() < 1e-4 and (acc - ert[2]).abs().max() < 1e-4
    assert (depth - ert[1]).abs().max() < 6.0 * 1e-4


def test_skipping_zero_density_samples_leaves_loss_and_gradients_unchanged():
    torch.manual_seed(0)
    model = NeRF(pos_encode_dims=6, num_layers=4, emb_dim=32)
    with torch.no_grad():
        model.out.bias[3] = 0.0  # about half of the samples get zero density: the case the skip is for
    trained = []

    class Counting(torch.nn.Module):
        use_viewdirs = False

        def forward(self, x, d=None):
            if torch.is_grad_enabled():
                trained.append(x.shape[0])
            return model(x, d)

    rays = get_rays(pinhole(pose_spherical(30.0, -20.0, 4.0), 8, 8, 10.0))
    target = torch.rand(64, 3)
    grads, losses = [], []
    for skip in (False, True):
        rgb, _, acc = render_rays(Counting(), rays, Frame(), 32, torch.zeros(3), torch.Generator().manual_seed(3),
                                  skip_zero_density=skip)
        loss = torch.nn.functional.mse_loss(rgb, target) + 0.01 * (acc * (1 - acc)).mean()
        model.zero_grad()
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert 0.2 * trained[0] < trained[1] < 0.8 * trained[0]  # the gradient pass really saw fewer samples
    assert abs(losses[0] - losses[1]) < 1e-6 and grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_fixed_shapes_render_equals_the_compacted_one_with_every_call_the_same_size():
    """A CUDA graph's render (every sample queried, the culled ones zeroed) gives the compacted render's loss and
    gradients, through a grid that culls, a coarse -> fine pass and view directions."""
    torch.manual_seed(0)
    model = NeRF(pos_encode_dims=6, num_layers=4, emb_dim=32, use_viewdirs=True)
    grid = OccupancyGrid(bound=1.5, resolution=16, sigma_threshold=1.0)
    grid.update(Ball(), decay=1.0)
    sizes = []

    class Sizes(torch.nn.Module):
        use_viewdirs = True

        def forward(self, x, d=None):
            sizes.append(x.shape[0])
            return model(x, d)

    rays = get_rays(pinhole(pose_spherical(30.0, -20.0, 4.0), 8, 8, 10.0))
    target = torch.rand(64, 3)
    grads, losses, counts = [], [], []
    for fixed in (False, True):
        sizes.clear()
        rgb, _, acc = render_rays(Sizes(), rays, Frame(), 32, torch.zeros(3), torch.Generator().manual_seed(3),
                                  grid, num_fine=16, fixed_shapes=fixed)
        loss = torch.nn.functional.mse_loss(rgb, target) + 0.01 * (acc * (1 - acc)).mean()
        model.zero_grad()
        loss.backward()
        losses.append(loss.item())
        counts.append(list(sizes))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert sum(counts[0]) < 0.5 * sum(counts[1])  # the grid culled: compaction sent far fewer samples
    assert counts[1] == [64 * 32, 64 * 48]  # fixed: every sample of the coarse, then of the fine pass
    assert abs(losses[0] - losses[1]) < 1e-6 and grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_gif_keeps_every_frame_in_order_and_its_colours(tmp_path):
    """The shared-palette GIF holds all frames, in order, within a few levels of their colours."""
    import imageio.v2 as imageio
    import numpy as np

    from utils import write_video

    x = np.linspace(0, 1, 40)
    base = (np.stack([x, x[::-1], 0.5 + 0.5 * np.sin(6 * x)], -1)[None].repeat(12, 0) * 255).astype(np.uint8)
    frames = [np.roll(base, 2 * k, axis=1) for k in range(20)]  # an orbit: the same colours, moving
    write_video(frames, str(tmp_path / "v.gif"))
    back = np.stack(imageio.mimread(tmp_path / "v.gif"))[..., :3].astype(int)
    assert back.shape == (20, 12, 40, 3)
    err = np.abs(back[:, None] - np.stack(frames)[None].astype(int)).mean(axis=(2, 3, 4))  # read k vs written j
    assert err.diagonal().max() < 3 and (err.argmin(axis=1) == np.arange(20)).all()


def test_depth_pictures_show_the_surface_depth_and_the_background_as_far():
    from utils import depth_image

    depth, acc = torch.tensor([[1.5, 2.0, 4.0]]), torch.tensor([[0.5, 0.5, 1.0]])  # rays: half-hit, hazy, solid
    img = depth_image(depth, acc, near=2.0, far=6.0)
    assert img.shape == (1, 3, 3) and img.dtype.name == "uint8"
    far = depth_image(torch.tensor([[6.0]]), torch.ones(1, 1), 2.0, 6.0)[0, 0]
    assert (img[0, 0] == far).all() and (img[0, 1] == far).all()  # opacity <= 0.5: background
    assert (img[0, 2] == depth_image(torch.tensor([[4.0]]), torch.ones(1, 1), 2.0, 6.0)[0, 0]).all()
    # depth is divided by opacity: a ray 0.6 opaque whose expected depth is 0.6 * 4 shows depth 4
    assert (depth_image(torch.tensor([[2.4]]), torch.tensor([[0.6]]), 2.0, 6.0) == img[0, 2]).all()


def measured_grid(model):
    """A 32^3 occupancy grid over the cube, from one full pass over the model's density (64 samples over depths 2-6)."""
    grid = OccupancyGrid(bound=1.5, resolution=32, sigma_threshold=-math.log(0.99) / (4.0 / 64))
    grid.update(model, decay=1.0, generator=torch.Generator().manual_seed(0))
    return grid


@pytest.mark.parametrize("min_transmittance", [0.0, 1e-4])
def test_rendering_reuses_the_coarse_samples_and_skips_empty_rays_with_the_two_pass_render(min_transmittance):
    """render_image queries the fine pass's new samples only, and no ray that meets no occupied cell: the render of
    render_rays' two passes (which query the coarse samples again), within early termination's tolerance."""
    c2w = pose_spherical(40.0, -30.0, 4.0)
    grid = measured_grid(Blob())
    queried = []

    class Counting(Blob):
        def forward(self, x, d=None):
            queried.append(x.shape[0])
            return super().forward(x, d)

    camera = pinhole(c2w, 16, 16, 40.0)  # the blob fills the middle of the view; its corners see nothing
    with torch.no_grad():
        two_pass = render_rays(Counting(), get_rays(camera), Frame(), 64, torch.ones(3), grid=grid, num_fine=16,
                               min_transmittance=min_transmittance)
    n_two_pass, queried[:] = sum(queried), []
    rgb, depth, acc = render_image(Counting(), camera, Frame(), 64, torch.ones(3), chunk=100, grid=grid, num_fine=16,
                                   min_transmittance=min_transmittance)
    assert 0.1 < (two_pass[2] > 0.5).float().mean() < 0.9  # hits and misses
    assert sum(queried) < 0.8 * n_two_pass
    # the coarse samples' values are the same; a skipped ray may only have grazed an occupied cell between two of
    # its coarse samples, and early termination leaves out less than its threshold
    changed = (rgb.reshape(-1, 3) - two_pass[0]).abs().amax(-1)
    assert changed.max() < 5e-3 and (changed > 1e-5 + 10 * min_transmittance).float().mean() < 0.02
    assert (acc.reshape(-1) - two_pass[2]).abs().max() < 5e-3 and (depth.reshape(-1) - two_pass[1]).abs().mean() < 1e-3


class ShellAndWall(torch.nn.Module):
    """A dense shell thinner than the fine samples' spacing around coarse sample 10 of 64 (from depth 2, along -z
    from z = 4), and a red wall behind it."""

    use_viewdirs = False

    def forward(self, x, d=None):
        shell = (x[:, 2] - (4 - 2.65625)).abs() < 0.002
        wall = x[:, 2] < 0
        rgb = torch.stack([wall.float(), shell.float(), torch.zeros_like(x[:, 0])], -1)
        return rgb, 500.0 * shell + 50.0 * wall


def test_rendering_sees_past_a_thin_shell_the_coarse_pass_stopped_at():
    """A dense shell thinner than the fine samples' spacing, on one coarse sample: the coarse pass's early
    termination stops there, but the joined samples let light through to the wall behind, as render_rays shows."""
    origins = torch.tensor([[0.0, 0.0, 4.0], [0.3, -0.2, 4.0]])
    rays = rays_of(origins, torch.tensor([[0.0, 0.0, -1.0]]).expand(2, 3))
    with torch.no_grad():
        two_pass = render_rays(ShellAndWall(), rays, Frame(), 64, torch.zeros(3), num_fine=16, min_transmittance=1e-4)
    rgb, _, acc = render_rays_still(ShellAndWall(), rays, Frame(), 64, torch.zeros(3), num_fine=16,
                                    min_transmittance=1e-4)
    assert (two_pass[0][:, 0] > 0.01).all()  # the wall shows through the shell
    assert (rgb - two_pass[0]).abs().max() < 1e-3 and (acc - two_pass[2]).abs().max() < 1e-3


def test_rays_are_float32_under_a_bf16_autocast():
    """Rendering runs under the run's autocast: rotating the directions by a bf16 matmul moved an 800-px view's rays
    by up to 0.0045 rad (5 pixels at its edge), while training drew its rays in float32."""
    camera = pinhole(pose_spherical(30.0, -30.0, 4.0), 800, 800, 1111.0)
    exact = get_rays(camera)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lowered = get_rays(camera)
    for a, b in zip(exact, lowered, strict=True):
        assert b.dtype == torch.float32 and torch.equal(a, b)


class HardBlob(Blob):
    """A blob whose surface is opaque within 0.01, as a well-trained NeRF's is: density 1000 fading over ~0.004."""

    def forward(self, x, d=None):
        return torch.sigmoid(x * 3), 1000.0 * torch.sigmoid((0.6 - x.norm(dim=-1)) / 0.002)


def count_queried_points(monkeypatch):
    """Record the number of points of every model query the renderer makes (before any padding)."""
    sizes, query = [], render.query_points
    monkeypatch.setattr(render, "query_points", lambda model, points, dirs: sizes.append(len(points)) or query(
        model, points, dirs))
    return sizes


def test_rendering_queries_fine_samples_front_to_back_and_never_an_empty_batch(monkeypatch):
    """The fine pass's samples go to the model a few per ray at a time: those behind the surface the first ones find
    are not queried. No query is made of zero points (one costs a model call)."""
    camera = pinhole(pose_spherical(40.0, -30.0, 4.0), 16, 16, 40.0)
    grid = measured_grid(HardBlob())
    with torch.no_grad():
        two_pass = render_rays(HardBlob(), get_rays(camera), Frame(), 64, torch.ones(3), grid=grid, num_fine=16,
                               min_transmittance=1e-4)
    sizes, renders = count_queried_points(monkeypatch), {}
    for block in (16, render.FINE_BLOCK):  # all of a ray's fine samples at once, then the renderer's blocks
        monkeypatch.setattr(render, "FINE_BLOCK", block)
        image = render_image(HardBlob(), camera, Frame(), 64, torch.ones(3), chunk=100, grid=grid, num_fine=16,
                             min_transmittance=1e-4)
        renders[block], sizes[:] = (image, sum(sizes), min(sizes)), []
    (all_at_once, n_all, _), (blocked, n_blocked, smallest) = renders[16], renders[render.FINE_BLOCK]
    assert (blocked[2] > 0.5).float().mean() > 0.3 and n_blocked < 0.7 * n_all and smallest > 0
    for a, b, c in zip(blocked, all_at_once, two_pass, strict=True):
        assert (a - b).abs().max() < 1e-4 and (a.reshape(c.shape) - c).abs().max() < 1e-3


def test_chunks_rendered_on_threads_are_those_rendered_one_at_a_time():
    """eval.py renders a view's chunks on several single-threaded Python threads: the same image, in order, each chunk
    under the run's autocast (which a new thread does not inherit); the process's thread count is restored
    afterwards, and a stop still abandons the image."""
    seen = []

    class Recording(Blob):
        def forward(self, x, d=None):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_num_threads()))
            return super().forward(x, d)

    camera = pinhole(pose_spherical(40.0, -30.0, 4.0), 24, 20, 30.0)
    grid = measured_grid(Blob())
    args, amp = (Recording(), camera, Frame(), 64, torch.ones(3), 37, grid, 16, 1e-4), torch.autocast(
        "cpu", dtype=torch.bfloat16)
    before = torch.get_num_threads()
    one_at_a_time = render_image(*args, amp=amp)
    assert set(seen) == {(True, before)}
    seen[:], asked = [], []
    with chunks_in_parallel(2) as chunk_map:
        threaded = render_image(*args, amp=amp, chunk_map=chunk_map)
        assert set(seen) == {(True, 1)}
        stopped = render_image(*args, stop=lambda: asked.append(1) or len(asked) > 3, amp=amp, chunk_map=chunk_map)
    assert torch.get_num_threads() == before and stopped is None
    for a, b in zip(threaded, one_at_a_time, strict=True):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-5
    assert (one_at_a_time[2] > 0.5).any() and (one_at_a_time[2] < 0.5).any()


def test_training_stops_each_ray_where_the_coarse_pass_found_it_opaque(monkeypatch):
    """With min_transmittance, training's gradient pass leaves out the samples behind the depth where the coarse pass
    found a ray's transmittance below it: far fewer points, the same colours and gradients within that tolerance.
    Not behind a layer that only one coarse sample sees: it may be thinner than their spacing (a thin shell)."""
    t, tau = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 3), torch.tensor([[1, 20, 20, 0], [0, 30, 0, 0.5], [0.1] * 4])
    # opaque without its densest sample from sample 2's segment's end; a shell alone, or never opaque: no stop
    assert render.stop_depths(t, tau, 1e-4).tolist() == [4.0, math.inf, math.inf]

    class Scaled(HardBlob):
        def __init__(self):
            super().__init__()
            self.colour, self.density = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(()))

        def forward(self, x, d=None):
            rgb, sigma = super().forward(x, d)
            return rgb * self.colour, sigma * self.density

    rays = get_rays(pinhole(pose_spherical(40.0, -30.0, 4.0), 16, 16, 80.0))  # the blob fills most of the view
    target, sizes, runs = torch.rand(256, 3), count_queried_points(monkeypatch), []
    for min_transmittance in (0.0, 1e-4):
        model = Scaled()
        rgb, _, acc = render_rays(model, rays, Frame(), 64, torch.ones(3), torch.Generator().manual_seed(0),
                                  num_fine=16, min_transmittance=min_transmittance)
        torch.nn.functional.mse_loss(rgb, target).backward()
        runs.append((rgb.detach(), acc.detach(), sizes[-1], model.colour.grad, model.density.grad))
    (rgb, acc, n_all, colour, density), (rgb_cut, acc_cut, n_cut, colour_cut, density_cut) = runs
    assert (acc > 0.999).float().mean() > 0.7 and n_cut < 0.7 * n_all  # the gradient pass is the last query
    assert (rgb - rgb_cut).abs().max() < 1e-3 and (acc - acc_cut).abs().max() < 1e-3
    assert torch.allclose(colour, colour_cut, rtol=1e-3) and torch.allclose(density, density_cut, rtol=1e-2, atol=1e-6)
    shell = [render_rays(ShellAndWall(), rays_of(torch.tensor([[0.0, 0.0, 4.0]]), torch.tensor([[0.0, 0.0, -1.0]])),
                         Frame(), 64, torch.zeros(3), num_fine=16, min_transmittance=m)[0] for m in (0.0, 1e-4)]
    assert shell[0][0, 0] > 0.01 and (shell[0] - shell[1]).abs().max() < 1e-4  # the wall still shows through


@pytest.mark.parametrize("space", ["cube", "ndc", "contract"])
def test_the_distortion_loss_is_its_sum_over_pairs_and_smallest_for_one_thin_segment(space):
    """mip-NeRF 360's definition summed over every pair of segments (in the frame's normalised depths), against the
    running sums; a ray's weight in one segment costs a third of that segment's width."""
    frame = render.Frame(space=space, near=0.0, far=1.0) if space == "ndc" else render.Frame(space=space)
    g = torch.Generator().manual_seed(0)
    t = render.sample_along_rays(render.Rays(*torch.zeros(3, 5, 3)), frame, 12, g).double()
    weights = torch.rand(5, 12, generator=g, dtype=torch.float64)
    weights = weights / weights.sum(-1, keepdim=True) * 0.9
    s = frame.normalized(torch.cat([t, torch.full_like(t[:, :1], frame.far)], -1))
    mid, width = (s[:, 1:] + s[:, :-1]) / 2, s[:, 1:] - s[:, :-1]
    pairs = (weights[:, :, None] * weights[:, None, :] * (mid[:, :, None] - mid[:, None, :]).abs()).sum((1, 2))
    assert torch.allclose(render.distortion(weights, t, frame), pairs + (weights ** 2 * width).sum(-1) / 3)
    one = torch.zeros(1, 12, dtype=torch.float64)
    one[0, 4] = 1.0
    assert render.distortion(one, t[:1], frame).item() == pytest.approx(width[0, 4].item() / 3)
    spread = torch.full((1, 12), 1 / 12, dtype=torch.float64)
    assert render.distortion(spread, t[:1], frame) > 5 * render.distortion(one, t[:1], frame)
