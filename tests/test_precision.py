"""exp2 and exp3: autocast dtypes, torch.compile, fused AdamW and coarse -> fine sampling."""
import platform
from pathlib import Path

import pytest
import torch

import configs
import train
from configs import EXP1, EXP2, EXP3, ConfigError
from nerf import NeRF
from render import Frame, Rays, query_kept, render_rays, sample_along_rays, sample_pdf, volume_render


def test_bfloat16_autocast_runs_the_matmuls_in_bfloat16_and_renders_in_float32():
    model, seen = NeRF(num_layers=4), []
    for layer in model.layers:
        layer.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype) and None)
    down = torch.tensor([0.0, 0.0, -1.0]).expand(8, 3)
    rays = Rays(torch.zeros(8, 3) + torch.tensor([0.0, 0.0, 4.0]), down, down)
    with train.autocast_context(EXP2, torch.device("cpu")):
        rgb, depth, acc = render_rays(model, rays, Frame(), 16, torch.zeros(3))
    assert seen and all(dtype == torch.bfloat16 for dtype in seen), seen
    assert rgb.dtype == depth.dtype == acc.dtype == torch.float32  # compositing stays in fp32


def test_the_skip_layer_matches_a_linear_on_the_concatenation_in_fp32_and_bf16():
    torch.manual_seed(0)
    model = NeRF(num_layers=8)
    layer, x = model.layers[4], torch.rand(300, 64)
    h = torch.rand(300, 64, requires_grad=True)
    ref = layer(torch.cat([h, x], dim=-1))
    grads_ref = torch.autograd.grad(ref.square().sum(), (h, layer.weight, layer.bias))
    out = model.skip_layer(layer, h, x)
    grads = torch.autograd.grad(out.square().sum(), (h, layer.weight, layer.bias))
    torch.testing.assert_close(out, ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref)
    with train.autocast_context(EXP2, torch.device("cpu")):
        out_bf16 = model.skip_layer(layer, h, x)
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), ref, rtol=2e-2, atol=2e-2)


def test_the_model_keeps_the_batch_shape_of_its_points():
    model, pts = NeRF(), torch.rand(2, 5, 3)
    rgb, sigma = model(pts)
    assert rgb.shape == (2, 5, 3) and sigma.shape == (2, 5)
    flat_rgb, flat_sigma = model(pts.view(10, 3))
    torch.testing.assert_close(rgb.view(10, 3), flat_rgb)
    torch.testing.assert_close(sigma.view(10), flat_sigma)


def test_bench_counts_the_matmul_flops_a_training_step_does_less_the_padding():
    from torch.utils.flop_counter import FlopCounterMode

    import bench

    model, pts = NeRF(num_layers=8), torch.rand(256, 3)
    with FlopCounterMode(display=False) as counter:
        rgb, sigma = model(pts)
        (rgb.sum() + sigma.sum()).backward()
    pad_flops = 2 * 2 * (model.in_dim - 63) * 64 * 2  # forward and weight gradient of the zero column, 2 layers
    assert counter.get_total_flops() == len(pts) * (bench.mlp_flops_per_point(model) + pad_flops)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pts)
    assert counter.get_total_flops() == len(pts) * (bench.mlp_flops_per_point(model, backward=False) + pad_flops // 2)


def test_bench_quality_mode_prints_psnr_at_its_marks_and_the_runs_fraction_of_the_mm_peak():
    """On a scene named by --scenes (PATH@K): its row, and the field's table (two scenes: the next test)."""
    import json
    import subprocess
    import sys

    import bench

    out = subprocess.run([sys.executable, bench.__file__, "--quality", "--exps=exp1", "--budget_s=2",
                          "--scenes=synthetic@1", "--num_layers=2", "--emb_dim=32", "--batch_size=256"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(ln) for ln in out.stderr.splitlines() if ln.startswith("{")]
    assert [r["scene"] for r in rows] == ["synthetic"]
    row = rows[-1]
    assert row["psnr@2s"] > 5.0 and row["steps"] > 10  # the budget's end is always a mark
    assert bench.quality_marks(torch.device("cpu"), 600) == [150, 300, 600]
    assert bench.quality_marks(torch.device("cpu"), 3600) == [150, 300, 600, 1800, 3600]  # 800 px: 10 / 30 / 60 min
    assert bench.quality_marks(torch.device("cuda"), 100) == [15, 60, 100]
    assert 0.0 < row["% of samples trained"] <= 100.0
    assert row["mlp_gflops"] > 0
    share = 100 * row["mlp_gflops"] / row["mm_peak_gflops"]
    assert 0.0 < row["% of mm peak"] == pytest.approx(share, rel=0.02, abs=0.1)
    assert "| % of mm peak |" in out.stdout
    psnr = rows[0]["scores"]["psnr"]
    assert "| experiment | synthetic | mean |" in out.stdout and f"| exp1 | {psnr:.2f} | {psnr:.2f} |" in out.stdout


def test_the_scene_table_has_a_column_per_scene_their_mean_and_an_export_row():
    import bench

    run = lambda psnr, export=None: {"val_psnr": psnr, "val_ssim": psnr / 40, **({} if export is None else {  # noqa: E731
        "export_psnr": export, "export_ssim": export / 40, "export_bytes": 263_100})}
    scores = {"chair": {"exp7": bench.scene_scores(run(34.0)), "exp7-bitnerf": bench.scene_scores(run(33.0, 32.5))},
              "fern": {"exp7": bench.scene_scores(run(22.0))}}
    text = bench.scene_tables(scores)
    assert "| exp7 | 34.00 | 22.00 | 28.00 |" in text and "| exp7 | 0.850 | 0.550 | 0.700 |" in text
    assert "| exp7-bitnerf | 33.00 |  | - |" in text  # no mean over some of the scenes
    assert "| exp7-bitnerf export | 32.50 (263 kB) |  | - |" in text and "| exp7-bitnerf export | 0.812 |" in text
    assert bench.parse_scenes("a/fern@8,b/fern,c/chair_tiny.npz") == [("fern", "a/fern", 8), ("fern1", "b/fern", None),
                                                                      ("chair_tiny", "c/chair_tiny.npz", None)]
    with pytest.raises(configs.UserError, match="'a@0' is not PATH or PATH@K"):
        bench.parse_scenes("a@0")


def test_bench_applies_config_overrides_and_refuses_bad_ones_before_running():
    import argparse
    import subprocess
    import sys

    import bench

    args = argparse.Namespace(data="synthetic", compile="off")
    cfg = bench.bench_config("exp2", args, ["--batch_size=256", "--dtype=float32"])
    assert (cfg["BATCH_SIZE"], cfg["DTYPE"], cfg["AMSGRAD"], cfg["COMPILE"]) == (256, "float32", True, False)
    out = subprocess.run([sys.executable, bench.__file__, "--batch_size=many"], capture_output=True, text=True)
    assert out.returncode == 2 and "--batch_size=many: expected int" in out.stderr and not out.stdout


def test_float32_builds_no_autocast():
    model = NeRF(num_layers=2)
    with train.autocast_context(EXP1, torch.device("cpu")):
        assert model(torch.rand(4, 3))[0].dtype == torch.float32


def test_float16_without_cuda_is_refused_before_training(tmp_path):
    cfg = {**EXP1, "DTYPE": "float16", "DEVICE": "cpu", "OUT_DIR": str(tmp_path / "run")}
    with pytest.raises(ConfigError, match="float16 needs CUDA"):
        train.train(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_bf16_matmul_is_slow_exactly_where_the_cpu_lacks_avx512():
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    if platform.machine() != "x86_64" or not flags:
        pytest.skip("reads x86 CPU flags from /proc/cpuinfo")
    fast = {"avx512bw", "avx512vl", "avx512dq"} <= set(flags) or "avx_ne_convert" in flags  # oneDNN's bf16 ISAs
    assert train.bf16_matmul_is_slow(torch.device("cpu")) == (not fast)
    assert not train.bf16_matmul_is_slow(torch.device("meta"))  # only a CPU's matmuls are judged


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_bf16_run_where_bf16_is_slow_says_so_once(dtype, small_cfg, monkeypatch, capsys):
    monkeypatch.setattr(train, "bf16_matmul_is_slow", lambda device: True)
    train.train({**small_cfg, "DTYPE": dtype, "MAX_STEPS": 2})
    assert capsys.readouterr().err.count("no fast bf16 matmul") == (dtype == "bfloat16")


def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model, pts = NeRF(num_layers=4), torch.rand(512, 3) * 2 - 1
    compiled = torch.compile(model)
    for (a, b) in zip(model(pts), compiled(pts), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_rays_with_zero_or_one_kept_sample_neither_recompile_nor_change_the_render():
    """torch.compile specializes batch sizes 0 and 1: a compiled model must not see them (each cost seconds)."""
    torch.manual_seed(0)
    model, graphs = NeRF(num_layers=4), []
    compiled = torch.compile(model, dynamic=True, backend=lambda gm, _: graphs.append(gm) or gm.forward)
    dirs = torch.nn.functional.normalize(torch.rand(2, 3), dim=-1)
    rays = Rays(torch.zeros(2, 3), dirs, dirs)
    t = torch.linspace(2.0, 4.0, 8).expand(2, 8).contiguous()
    for kept in (5, 1, 0):
        keep = torch.zeros(2, 8, dtype=torch.bool)
        keep.view(-1)[:kept] = True
        rgb, sigma = query_kept(compiled, rays, t, keep)
        ref_rgb, ref_sigma = query_kept(model, rays, t, keep)
        rgb.sum().backward()  # the gradient pass works on padded calls too
        torch.testing.assert_close(sigma, ref_sigma)
        torch.testing.assert_close(rgb, ref_rgb)
        assert int((sigma != 0).sum()) <= kept and not sigma[~keep].any()
    assert len(graphs) == 1


def test_fused_adamw_takes_the_same_step_as_the_plain_one():
    cfg = {**EXP2, "LR": 1e-2}
    models = [NeRF(num_layers=2) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    pts = torch.rand(64, 3)
    for model, fused in zip(models, (False, True), strict=True):
        opt = train.build_optimizer({**cfg, "FUSED_OPTIM": fused}, model, torch.device("cpu"))
        assert opt.defaults["fused"] is (True if fused else None)
        for _ in range(3):
            opt.zero_grad()
            sum(o.sum() for o in model(pts)).backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fine_samples_gather_where_the_coarse_weights_are():
    t = sample_along_rays(Rays(torch.zeros(4, 3), torch.ones(4, 3), torch.ones(4, 3)), Frame(), 64)
    sigma = torch.where((t > 3.9) & (t < 4.1), 50.0, 0.0)  # one opaque slab at depth 4
    weights = volume_render(torch.zeros(*t.shape, 3), sigma, t, 6.0, torch.zeros(3))[3]
    fine = sample_pdf(t, weights, 6.0, 32, torch.Generator().manual_seed(0))
    assert fine.shape == (4, 32) and (fine[:, 1:] >= fine[:, :-1]).all()
    inside = ((fine > 3.85) & (fine < 4.15)).float().mean().item()
    assert inside > 0.9, inside  # uniform samples would put ~8% there


def test_empty_rays_get_evenly_spread_fine_samples():
    t = sample_along_rays(Rays(torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3)), Frame(), 16)
    fine = sample_pdf(t, torch.zeros_like(t), 6.0, 8)
    assert (fine.min() >= 2.0) and (fine.max() <= 6.0)
    assert fine[0].diff().std() < 0.05  # evenly spaced


class Slab(torch.nn.Module):
    """Opaque white slab 0.1 thick at z = 0, empty elsewhere (a known density peak)."""

    use_viewdirs = False

    def forward(self, x, d=None):
        return torch.ones_like(x), torch.where(x[:, 2].abs() < 0.05, 200.0, 0.0)


def test_coarse_to_fine_finds_the_surface_of_a_thin_slab():
    down = torch.tensor([[0.0, 0.0, -1.0]]).expand(256, 3)
    rays = Rays(torch.tensor([[0.0, 0.0, 4.0]]).expand(256, 3), down, down)
    _, coarse_depth, coarse_acc = render_rays(Slab(), rays, Frame(), 16, torch.zeros(3),
                                              torch.Generator().manual_seed(0))
    _, depth, acc = render_rays(Slab(), rays, Frame(), 16, torch.zeros(3), torch.Generator().manual_seed(0),
                                num_fine=32)  # same seed: the same coarse samples
    hit = coarse_acc > 0.5
    assert 0.2 < hit.float().mean() < 0.6  # 16 samples over 4 units land in a 0.1 slab ~40% of the time
    assert acc[hit].min() > 0.99  # the fine samples land in the slab
    err, coarse_err = (depth[hit] - 3.95).abs(), (coarse_depth[hit] - 3.95).abs()  # the front is at depth 3.95
    assert err.max() < 0.1 and err.median() < coarse_err.median() / 2, (err.median(), coarse_err.median())


@pytest.mark.parametrize("preset", [EXP2, EXP3])
def test_exp2_and_exp3_presets_train_and_learn(preset, small_cfg):
    keys = ("EXPERIMENT", "DTYPE", "AMSGRAD", "FUSED_OPTIM", "NUM_SAMPLES", "NUM_FINE", "OPACITY_REG",
            "WEIGHT_DECAY")
    cfg = {**small_cfg, **{k: preset[k] for k in keys}, "MAX_STEPS": 120, "EVAL_EVERY": 40}
    metrics = train.train(cfg)
    assert metrics["val_psnr"] > metrics["history"][0]["psnr"] + 1.0, metrics["history"]
