"""exp7: the multiresolution hash encoding (indices, interpolation, gradient), the hash model against the frequency
one, BF16, torch.compile, the BitNeRF-hash export and eval.py (resume: test_train)."""
import io
import json

import pytest
import torch

import report
import train
from bitnerf import build_bitnerf, export_ternary, load_ternary, pack_bits, plain, table_codes, unpack_bits
from configs import EXP7
from conftest import run_cli, small
from nerf import HashEncoding, HashNeRF, level_resolutions


def encoding():
    """Two levels, bound 1: resolution 4 dense (5^3 = 125 rows <= 2^12) and 32 hashed (33^3 > 2^12)."""
    torch.manual_seed(0)
    enc = HashEncoding(levels=2, log2_size=12, features=2, base_res=4, finest_res=32, bound=1.0)
    with torch.no_grad():
        enc.table.normal_()
    return enc


def at_grid(level_res, i, j, k):
    """The scene point at grid coordinates (i, j, k) of a level of that resolution (bound 1)."""
    return torch.tensor([[i, j, k]], dtype=torch.float32) / level_res * 2 - 1


def spatial_hash(x, y, z, log2_size):
    """Mueller et al.'s hash, in Python integers: xor of the coordinates times the primes, mod 2^log2_size."""
    return ((x * 1) ^ (y * 2654435761) ^ (z * 805459861)) % 2 ** 32 % 2 ** log2_size


def test_level_resolutions_grow_geometrically_from_base_to_finest():
    assert level_resolutions(2, 4, 32) == [4, 32]
    assert level_resolutions(12, 16, 256)[0] == 16 and level_resolutions(12, 16, 256)[-1] == 256


def test_a_hash_encoding_refuses_an_unresolved_bound():
    """SCENE_BOUND 0 (the data's) reaching a model would map every point to one corner cell."""
    with pytest.raises(ValueError, match="bound=0.0"):
        HashEncoding(levels=2, log2_size=12, bound=0.0)


def test_dense_indices_are_the_grid_index_and_hashed_ones_the_formula():
    enc = encoding()
    assert enc.dense_levels == 1 and enc.sizes == [125, 4096]
    for i, j, k in [(0, 0, 0), (1, 2, 3), (3, 3, 3), (2, 0, 1)]:
        xyz = at_grid(4, i + 0.3, j + 0.6, k + 0.1)  # inside cell (i, j, k) of level 0, (8i+2, 8j+4, 8k+0) of level 1
        idx, _ = enc.corners(xyz)
        for c in range(8):
            a, b, d = c >> 2 & 1, c >> 1 & 1, c & 1
            assert idx[c, 0, 0] == (i + a) + (j + b) * 5 + (k + d) * 25
            x, y, z = 8 * i + 2 + a, 8 * j + 4 + b, 8 * k + d
            assert idx[c, 0, 1] == 125 + spatial_hash(x, y, z, 12), (i, j, k, c)


def test_interpolation_is_exact_at_corners_and_linear_along_an_edge():
    enc = encoding()
    vertex = at_grid(32, 8, 16, 24)  # a vertex of both levels: (1, 2, 3) of level 0
    idx, _ = enc.corners(vertex)
    with torch.no_grad():
        at_vertex = enc(vertex).view(2, 2)  # (level, feature)
        lo, hi = at_grid(32, 5, 7, 11), at_grid(32, 6, 7, 11)  # an edge of a level-1 cell, inside a level-0 cell
        t = torch.linspace(0, 1, 9)[:, None]
        ends, along = enc(torch.cat([lo, hi])), enc(lo + t * (hi - lo))
    for level in range(2):
        torch.testing.assert_close(at_vertex[level], enc.table[:, idx[0, 0, level]])  # its own entry, weight 1
    torch.testing.assert_close(along, (1 - t) * ends[0] + t * ends[1])  # every level is linear along a cell's edge


def test_a_backward_pass_writes_gradient_only_to_the_8_corners_of_each_level():
    enc = encoding()
    xyz = torch.tensor([[0.123, -0.456, 0.789], [-0.31, 0.27, -0.66]])
    idx, weights = enc.corners(xyz)
    enc(xyz[:1]).sum().backward()
    touched = set(idx[:, 0].flatten().tolist())
    assert len(touched) == 16 and set(enc.table.grad[0].nonzero().flatten().tolist()) == touched
    expected = torch.zeros(enc.table.shape[1]).index_add_(0, idx[:, 0].flatten(), weights[:, 0].flatten())
    torch.testing.assert_close(enc.table.grad[0], expected)  # each corner's gradient is its trilinear weight
    torch.testing.assert_close(enc.table.grad[1], expected)
    out = enc(xyz)  # and the forward pass is the weighted sum of the corners' entries
    naive = (enc.table[:, idx] * weights).sum(1).permute(1, 2, 0).flatten(1)  # (N, levels x features)
    torch.testing.assert_close(out, naive)


def hash_cfg(out_dir, **overrides):
    """small() with exp7's encoding and optimiser."""
    keys = ("ENCODING", "LR", "HASH_LR", "ADAM_EPS")
    return {**small(out_dir), **{k: EXP7[k] for k in keys}, "HASH_LOG2_SIZE": 14, "HASH_LEVELS": 8, **overrides}


def test_the_hash_model_beats_the_frequency_model_in_the_same_steps(tmp_path):
    steps = {"MAX_STEPS": 100, "EVAL_VIEWS": 4}
    freq = train.train({**small(tmp_path / "freq"), **steps})
    hashed = train.train(hash_cfg(tmp_path / "hash", **steps))
    assert hashed["val_psnr"] > freq["val_psnr"] + 1.0, (hashed["val_psnr"], freq["val_psnr"])  # 17.6 vs 15.4 dB


def test_the_table_and_its_gathers_stay_float32_under_bf16_autocast(tmp_path):
    torch.manual_seed(0)
    model = HashNeRF(hash_levels=4, hash_log2_size=12, use_viewdirs=True)
    xyz, d = torch.rand(64, 3) * 2 - 1, torch.nn.functional.normalize(torch.randn(64, 3), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.encoding(xyz)
        rgb, sigma = model(xyz, d)
    assert features.dtype == torch.float32 and sigma.dtype == torch.float32
    (rgb.float().sum() + sigma.sum()).backward()
    assert model.encoding.table.grad.dtype == torch.float32 and model.encoding.table.grad.abs().sum() > 0
    metrics = train.train(hash_cfg(tmp_path / "bf16", DTYPE="bfloat16", MAX_STEPS=20))
    assert metrics["val_psnr"] > 10  # it trains to a finite, rising image (it starts near 5 dB black)


def small_bitnerf_hash_model():
    """exp7-bitnerf's model (it trains compiled) with a small table, in the cube [-1, 1]^3 (SCENE_BOUND 0 is the
    data's, resolved before training builds a model), its table drawn from N(0, 1) (seed 0): values far apart, as
    after training, so the 5-bit codes round them for real."""
    cfg = {**report.experiment_config("exp7-bitnerf"), "HASH_LEVELS": 4, "HASH_LOG2_SIZE": 12, "SCENE_BOUND": 1.0}
    assert cfg["COMPILE"]
    model = train.build_model(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        model.encoding.table.normal_()
    return model


def test_the_compiled_bitnerf_hash_encoding_equals_the_eager_one():
    """exp7-bitnerf trains compiled (dynamic shapes, as train.compile_model): its hash lookup of the fake-quantized
    table computes, forward and backward, what it does eagerly. Its ternary layers are test_bitnerf's compiled QAT
    model (the whole model built by inductor here: 13 s more, cold; the next test traces it whole); test_report's
    quick report trains it eagerly (--compile=false)."""
    encoding = small_bitnerf_hash_model().encoding
    xyz, results = torch.rand(4096, 3) * 2 - 1, []
    for net in (encoding, torch.compile(encoding, dynamic=True)):
        encoding.zero_grad()
        features = net(xyz)
        features.square().sum().backward()
        results.append((features.detach(), encoding.table.grad.clone()))
    (features, grad), (features_c, grad_c) = results
    assert grad.abs().sum() > 0 and len(features.unique()) > 1000
    torch.testing.assert_close(features_c, features)  # float32's tolerances: the codes are the same codes
    torch.testing.assert_close(grad_c, grad)


def test_the_whole_bitnerf_hash_model_traces_under_dynamo_as_it_runs_eagerly():
    """The whole exp7-bitnerf model through dynamo and AOT autograd with dynamic shapes, as train.compile_model
    traces it, but without inductor's code (aot_eager: seconds, not the 30 s of a cold inductor build): its
    graphs, breaks and guards compute, forward and backward, what the model computes eagerly."""
    model = small_bitnerf_hash_model()
    xyz, d = torch.rand(4096, 3) * 2 - 1, torch.nn.functional.normalize(torch.randn(4096, 3), dim=-1)
    results = []
    for net in (model, torch.compile(model, dynamic=True, backend="aot_eager")):
        model.zero_grad()
        rgb, sigma = net(xyz, d)
        (rgb.square().sum() + sigma.sum()).backward()
        results.append((rgb.detach(), sigma.detach(), [plain(p.grad).clone() for p in model.parameters()]))
    (rgb, sigma, grads), (rgb_c, sigma_c, grads_c) = results
    assert rgb.std() > 1e-3 and grads[0].abs().sum() > 0  # points apart, and the table's gradient (its first)
    torch.testing.assert_close(rgb_c, rgb)
    torch.testing.assert_close(sigma_c, sigma)
    for g, g_c in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(g_c, g)


def bit_hash_cfg(bits):
    """A BitNeRF-hash config of a small table, bits per table entry."""
    return {**EXP7, "MODEL": "bitnerf", "HASH_LEVELS": 4, "HASH_LOG2_SIZE": 12, "HASH_TABLE_BITS": bits,
            "USE_VIEWDIRS": True, "SCENE_BOUND": 1.5}


@pytest.mark.parametrize("bits", range(2, 9))
def test_table_codes_pack_into_bytes_and_back_exactly(bits):
    top = 2 ** (bits - 1) - 1
    q = torch.randint(-top, top + 1, (2, 1001), generator=torch.Generator().manual_seed(bits), dtype=torch.int8)
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-q.numel() // (8 // bits))
    assert torch.equal(unpack_bits(packed, q.shape, bits), q)


@pytest.mark.parametrize("bits", [2, 4, 5, 8])
def test_the_bitnerf_hash_export_round_trips_with_weights_only(bits):
    cfg = bit_hash_cfg(bits)
    torch.manual_seed(0)
    model = build_bitnerf(cfg, torch.device("cpu"))
    with torch.no_grad():
        model.encoding.table.normal_(0, 0.1)
    buf = io.BytesIO()
    torch.save(export_ternary(model, cfg), buf, _use_new_zipfile_serialization=False)
    buf.seek(0)
    exported = load_ternary(torch.load(buf, weights_only=True), cfg)
    codes, scales = table_codes(model.encoding.table.detach(), model.encoding.sizes, bits)
    assert codes.abs().max() == 2 ** (bits - 1) - 1 and scales.shape == (2, 4)
    rows = torch.tensor(model.encoding.sizes)
    torch.testing.assert_close(exported.encoding.table, codes * scales.repeat_interleave(rows, 1))
    torch.testing.assert_close(exported.encoding.lookup_table(), model.encoding.lookup_table().detach())
    xyz, d = torch.rand(512, 3) * 2 - 1, torch.nn.functional.normalize(torch.randn(512, 3), dim=-1)
    with torch.no_grad():
        rgb, sigma = exported(xyz, d)
        qat_rgb, qat_sigma = model.eval()(xyz, d)
    torch.testing.assert_close(rgb, qat_rgb, atol=5e-3, rtol=0)  # the rest is stored fp16
    torch.testing.assert_close(sigma, qat_sigma, atol=0, rtol=5e-3)


def test_a_bitnerf_hash_run_exports_smaller_and_scores_as_exported(tmp_path):
    cfg = {**hash_cfg(tmp_path / "run"), "MODEL": "bitnerf", "MAX_STEPS": 30, "GRID_RES": 32}  # the export's grid
    metrics = train.train(cfg)
    entries = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["model"]["encoding.table"].numel()
    # deflate stores the codes in fewer bits than their width (they cluster at 0): the whole export, MLP included
    assert metrics["export_bytes"] < entries * cfg["HASH_TABLE_BITS"] / 8 < metrics["fp32_weights_bytes"] / 6
    assert abs(metrics["export_psnr"] - metrics["val_psnr"]) < 0.1
    res = run_cli("eval.py", f"{cfg['OUT_DIR']}/bitnerf_ternary.pt", "--data=synthetic")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["psnr"] == pytest.approx(metrics["export_psnr"], abs=1e-3)


def test_eval_scores_a_hash_run_as_training_did(tmp_path):
    cfg = hash_cfg(tmp_path / "run", MAX_STEPS=20)
    metrics = train.train(cfg)
    res = run_cli("eval.py", cfg["OUT_DIR"])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["psnr"] == pytest.approx(metrics["val_psnr"], abs=1e-3)


def test_bench_profile_splits_a_step_and_measures_the_memory_bandwidth(tmp_path, monkeypatch):
    """bench.py --profile's measurements on exp7: the parts of a step add up to it, the lookup and AdamW are in it,
    and the bandwidths are positive."""
    import bench
    import render

    for owner, name in ((render, "query_points"), (render.OccupancyGrid, "update"), (train, "export_and_evaluate")):
        monkeypatch.setattr(owner, name, getattr(owner, name))  # restored afterwards: the profile counts through them

    bandwidth = bench.stream_gb_per_s(n=1 << 22, reps=3)
    assert bandwidth["copy"] > 0 and bandwidth["triad"] > 0
    cfg = {**small(tmp_path / "run"), **{k: EXP7[k] for k in ("ENCODING", "LR", "HASH_LR", "ADAM_EPS", "USE_VIEWDIRS")},
           "HASH_LOG2_SIZE": 12, "HASH_LEVELS": 6}
    row = bench.profile_row(cfg, torch.device("cpu"), steps=3, warm_steps=2)
    parts = [row[f"{p} ms"] for p in bench.PROFILE_PARTS]
    assert all(p > 0 for p in parts) and row["rest ms"] > 0  # each part found, and together less than the step
    assert row["step ms"] > 0 and row["points/step"] > 0 and row["grid update ms/step"] > 0
    assert row["lookup GB/s"] > 0 and row["AdamW GB/s"] > 0
