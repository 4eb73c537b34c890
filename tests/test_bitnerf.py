"""exp4: BitNeRF QAT with torchao, the 2-bit ternary export, and evaluating the export as exported."""
import io
import json
import os

import pytest
import torch

import train
from bitnerf import (
    BitNeRF,
    export_ternary,
    int8_rows,
    load_ternary,
    pack_ternary,
    plain,
    quantize_for_training,
    scaled_int8_mm,
    ternarize,
    ternary_linears,
    unpack_ternary,
)
from configs import EXP1, EXP4
from conftest import check_quick_report, one_line_error, run_cli


def qat_model(**kwargs):
    """A seeded BitNeRF with torchao BitNet training weights on its hidden layers."""
    torch.manual_seed(0)
    return quantize_for_training(BitNeRF(**kwargs))


def test_forward_uses_ternary_weights_and_int8_activations():
    model = qat_model(num_layers=4)
    x = torch.randn(256, 64)
    for _, linear in ternary_linears(model):
        q, s = ternarize(linear.weight)
        assert set(q.unique().tolist()) <= {-1, 0, 1} and s > 0
        x_i8, row_scale = int8_rows(x[:, :linear.in_features])
        expected = (x_i8.float() * row_scale[:, None]) @ (q.float() * s).T + linear.bias
        torch.testing.assert_close(linear(x[:, :linear.in_features]), expected, rtol=1e-5, atol=1e-5)


def test_fp32_gemm_gives_the_same_integers_as_int_mm():
    a = torch.randint(-127, 128, (512, 128), dtype=torch.int8)
    b = torch.randint(-1, 2, (64, 128), dtype=torch.int8)
    one, two = torch.rand(512), torch.tensor(0.3)
    assert torch.equal(scaled_int8_mm(a, b.T, one, two), torch._int_mm(a, b.T) * two.view(-1) * one.view(-1, 1))


def test_qat_uses_our_int8_matmul_which_takes_few_rows_on_the_int_mm_path(monkeypatch):
    from torchao.prototype.quantized_training import bitnet

    # as on a GPU: torchao's Triton kernel re-autotunes for every new row count (an H100 took minutes per step)
    monkeypatch.setattr(bitnet, "has_triton", lambda: True)
    monkeypatch.setattr(bitnet, "scaled_int8_mm", None)
    qat_model(num_layers=2)
    assert bitnet.scaled_int8_mm is scaled_int8_mm
    a = torch.randint(-127, 128, (5, 132_112), dtype=torch.int8)  # K * 127 >= 2^24: the torch._int_mm path
    b = torch.randint(-1, 2, (132_112, 8), dtype=torch.int8)
    assert torch.equal(scaled_int8_mm(a, b, torch.ones(5), torch.tensor(1.0)), (a.long() @ b.long()).float())


def test_the_int_mm_path_keeps_the_batch_size_symbolic_under_compile(monkeypatch):
    """On a GPU the int8 product takes torch._int_mm; compiled, one graph must serve every batch size (with len()
    each size got its own, and an H100 run of exp4 hit dynamo's limit of 8 graphs)."""
    import bitnerf

    monkeypatch.setattr(bitnerf, "fp32_gemm_is_exact", lambda a_i8: False)
    model, graphs = qat_model(num_layers=2), []
    compiled = torch.compile(model, dynamic=True, backend=lambda gm, _: graphs.append(gm) or gm.forward)
    for n in (4096, 300, 1000):
        rgb, sigma = compiled(torch.rand(n, 3))
        (rgb.sum() + sigma.sum()).backward()
    assert len(graphs) == 1


def test_the_encoded_input_is_padded_to_a_multiple_of_8():
    assert BitNeRF(pos_encode_dims=10).in_dim == 64  # 63 -> 64
    assert all(linear.in_features % 8 == 0 for _, linear in ternary_linears(BitNeRF()))


@pytest.mark.parametrize("n", [1, 4, 7, 4096 + 3])
def test_pack_unpack_round_trips_exactly(n):
    q = torch.randint(-1, 2, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.int8)
    packed = pack_ternary(q)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 4)
    assert torch.equal(unpack_ternary(packed, q.shape), q)


def export_round_trip(model, rest_dtype):
    """Export to bytes, load with weights_only=True, and build the inference model (qat_model()'s shape: EXP1's
    model keys are BitNeRF's defaults)."""
    buf = io.BytesIO()
    torch.save(export_ternary(model, {}, rest_dtype), buf, _use_new_zipfile_serialization=False)
    buf.seek(0)
    return load_ternary(torch.load(buf, weights_only=True), EXP1), len(buf.getvalue())


def test_exported_model_reproduces_the_qat_model_and_leaves_it_untouched():
    model = qat_model()
    before = {k: plain(v).clone() for k, v in model.state_dict().items()}
    pts = torch.rand(2048, 3) * 3 - 1.5
    with torch.no_grad():
        want = model.eval()(pts)
        exact, _ = export_round_trip(model, torch.float32)
        small, size = export_round_trip(model, torch.float16)
        for got in exact(pts), small(pts):
            assert type(got) is type(want)
        for a, b in zip(exact(pts), want, strict=True):
            assert torch.equal(a, b)  # ternary weights and fp32 rest: bit-identical
        for a, b in zip(small(pts), want, strict=True):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)  # the rest stored as fp16
    for k, v in model.state_dict().items():
        assert torch.equal(plain(v), before[k]), k  # export worked on copies
    assert type(model.layers[0][1].weight).__name__ == "BitNetTrainingLinearWeight"
    fp32 = io.BytesIO()
    torch.save({k: v.float() for k, v in before.items()}, fp32, _use_new_zipfile_serialization=False)
    assert size * 12 <= len(fp32.getvalue()), (size, len(fp32.getvalue()))


@pytest.fixture
def bit_cfg(small_cfg):
    """A seconds-long exp4 on the synthetic scene (a 32^3 grid: its export's grid is measured from the model)."""
    return {**small_cfg, "MODEL": EXP4["MODEL"], "EXPERIMENT": "exp4", "GRID_RES": 32}


def test_bitnerf_trains_exports_and_resumes(bit_cfg, tmp_path, monkeypatch):
    straight = {**bit_cfg, "OUT_DIR": str(tmp_path / "straight")}
    metrics = train.train({**straight, "MAX_STEPS": 60})
    assert metrics["val_psnr"] > 12.0
    assert abs(metrics["export_psnr"] - metrics["val_psnr"]) < 0.2
    export = torch.load(os.path.join(straight["OUT_DIR"], "bitnerf_ternary.pt"), weights_only=True)
    assert export["packed"].dtype == torch.uint8

    real_save = train.save_checkpoint

    def save_then_die(ckpt, path, **kwargs):
        real_save(ckpt, path, **kwargs)
        if ckpt.get("step") == 20:
            raise KeyboardInterrupt

    resumed = {**bit_cfg, "OUT_DIR": str(tmp_path / "resumed")}
    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.train({**resumed, "MAX_STEPS": 60})
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    train.train({**resumed, "MAX_STEPS": 60})
    a, b = (torch.load(os.path.join(c["OUT_DIR"], "ckpt.pt"), weights_only=True) for c in (straight, resumed))
    for k, v in a["model"].items():
        assert torch.equal(b["model"][k], v), k


def test_eval_evaluates_the_export_file_as_training_did(bitnerf_run, tmp_path):
    """The run overrode SEED, CHUNK and ERT_TRANSMITTANCE: the export keeps them, so eval.py on it gives the
    export_psnr of metrics.json (and bitnerf.py exports the same file from the checkpoint)."""
    copy, metrics = bitnerf_run
    cfg = copy(tmp_path / "run")
    path = os.path.join(cfg["OUT_DIR"], "bitnerf_ternary.pt")
    export = torch.load(path, weights_only=True)
    assert {k: export["config"][k] for k in ("SEED", "CHUNK", "ERT_TRANSMITTANCE")} == {
        "SEED": 3, "CHUNK": 700, "ERT_TRANSMITTANCE": 0.02}
    out = run_cli("eval.py", path, "--data=synthetic")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["exported"] and abs(result["psnr"] - metrics["export_psnr"]) < 1e-3
    again = os.path.join(cfg["OUT_DIR"], "again.pt")
    out = run_cli("bitnerf.py", cfg["OUT_DIR"], f"--out={again}")  # export from the checkpoint
    assert out.returncode == 0, out.stderr
    a, b = (torch.load(p, weights_only=True) for p in (again, path))
    assert torch.equal(a["packed"], b["packed"]) and torch.equal(a["rest"], b["rest"])
    old = os.path.join(cfg["OUT_DIR"], "old.pt")
    torch.save({**export, "format": "bitnerf-ternary-v1"}, old)  # an export of a version before the norms' gains
    one_line_error(run_cli("eval.py", old, "--data=synthetic"), "a bitnerf-ternary-v1 export")


def test_compiled_qat_model_matches_eager_forward_and_backward():
    """exp4 and exp6 train compiled: the fused quantization must compute what torchao's eager ops compute. Their
    model's shape: exp6's quick report finds this compiled training graph in the cache."""
    model, pts = qat_model(num_layers=EXP4["NUM_LAYERS"], emb_dim=EXP4["EMB_DIM"]), torch.rand(4096, 3) * 3 - 1.5
    results = []
    for net in (model, torch.compile(model, dynamic=True)):
        model.zero_grad()
        rgb, sigma = net(pts)
        (rgb.square().sum() + sigma.sum()).backward()
        results.append((rgb.detach(), sigma.detach(), [plain(p.grad).clone() for p in model.parameters()]))
    (rgb, sigma, grads), (rgb_c, sigma_c, grads_c) = results
    # a fused RMSNorm can round a few activations to the neighbouring int8 step: close, not bit-equal
    for a, b in ((rgb, rgb_c), (sigma, sigma_c)):
        assert (a - b).abs().max() < 1e-2 and (a - b).abs().mean() < 1e-4
    for g, g_c in zip(grads, grads_c, strict=True):
        assert (g - g_c).norm() <= 1e-2 * g.norm() + 1e-6


def test_quick_report_trains_exports_and_tabulates_a_compiled_bitnerf_under_torchrun(tmp_path):
    """exp6 through report.py --quick: compiled as its preset says (from the cache the test above wrote), under
    torchrun, exported. exp4 is its model in one process (test_bitnerf_trains_exports_and_resumes)."""
    assert [r["experiment"] for r in check_quick_report(tmp_path, ["exp6"])] == ["exp6"]
