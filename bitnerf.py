"""BitNeRF: an RMSNorm (with a learned gain) before each hidden Linear, BitNet b1.58 QAT (torchao), and a 2-bit
ternary export.

Hidden layers train with torchao's `bitnet_training`: weights are ternary {-s, 0, +s} (s = mean |w| of the
tensor) and activations int8 per row in the forward pass, full-precision latent weights in the optimizer.
The output head (EMB_DIM -> 4) stays full precision: under 1% of the weights, and its 4 outputs are too narrow
for int8 matmul kernels. The encoded input is zero-padded to a multiple of 8 (63 -> 64) by nerf.py.
Under ENCODING=hash (BitHashNeRF) the hash table trains fake-quantized to HASH_TABLE_BITS-bit integers (a scale
per feature and level, straight-through gradient) and is exported as those integers, packed.
"""
import io
import os
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from nerf import HashEncoding, HashNeRF, NeRF, model_kwargs
from utils import save_checkpoint

EXPORT_FORMAT = "bitnerf-ternary-v2"  # v2: the RMSNorms' gains in "rest"
# the config keys an export keeps: what eval.py needs to render and score it as training did
EXPORT_KEYS = ("DATA", "DOWNSCALE", "BACKGROUND", "HOLDOUT", "FRAME", "SPACE", "NEAR", "FAR", "NUM_SAMPLES", "NUM_FINE",
               "OCC_GRID", "SCENE_BOUND", "GRID_RES", "SEED", "CHUNK", "ERT_TRANSMITTANCE", "DTYPE")


def norm_linear(in_dim, out_dim):
    """RMSNorm then Linear: BitNet normalises what it quantizes to int8. The norm's learned per-channel gain scales
    the ternary weight's columns, which its one tensor scale cannot (docs/hash.md)."""
    return nn.Sequential(nn.RMSNorm(in_dim), nn.Linear(in_dim, out_dim))


class BitNeRF(NeRF):
    """NeRF whose hidden layers are RMSNorm -> Linear blocks."""

    def hidden_layer(self, in_dim, out_dim):
        """An RMSNorm -> Linear block."""
        return norm_linear(in_dim, out_dim)

    def skip_layer(self, layer, h, x):
        """layer([h, x]): the RMSNorm needs the whole concatenated row."""
        return layer(torch.cat([h, x], dim=-1))


def table_codes(table, sizes, bits):
    """Symmetric integer codes (F, rows) in [-(2^(bits-1) - 1), 2^(bits-1) - 1] of a hash table, and their scales
    (F, levels): each level's absmax per feature over the largest code, so no entry is clipped."""
    top = 2 ** (bits - 1) - 1
    scales = torch.stack([level.abs().amax(1) for level in table.split(sizes, 1)], 1) / top
    per_row = scales.clamp_min(1e-12).repeat_interleave(torch.tensor(sizes, device=table.device), 1)
    return (table / per_row).round().clamp(-top, top), scales


class FakeQuantTable(torch.autograd.Function):
    """The table as its dequantized integer codes; the gradient passes straight through (STE)."""

    @staticmethod
    def forward(ctx, table, sizes, bits):
        codes, scales = table_codes(table, sizes, bits)
        return codes * scales.repeat_interleave(torch.tensor(sizes, device=table.device), 1)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class QuantizedHashEncoding(HashEncoding):
    """A HashEncoding whose lookups read the table fake-quantized to `bits`-bit integers."""

    def __init__(self, *args, bits=5):
        super().__init__(*args)
        self.bits = bits

    def lookup_table(self):
        """The dequantized codes: what the export stores, so the exported model renders as training did."""
        return FakeQuantTable.apply(self.table, self.sizes, self.bits)


class BitHashNeRF(HashNeRF):
    """HashNeRF with RMSNorm -> Linear hidden blocks (ternary under QAT) and a low-bit table."""

    def __init__(self, hash_table_bits=5, **kwargs):
        self.table_bits = hash_table_bits  # before nn.Module's init: make_encoding reads it; a plain int is allowed
        super().__init__(**kwargs)

    def make_encoding(self, *args):
        """A QuantizedHashEncoding of HASH_TABLE_BITS bits."""
        return QuantizedHashEncoding(*args, bits=self.table_bits)

    def hidden_layer(self, in_dim, out_dim):
        """An RMSNorm -> Linear block."""
        return norm_linear(in_dim, out_dim)


def bitnerf_model(cfg):
    """The (not yet quantized) BitNeRF or BitHashNeRF a config describes."""
    if cfg["ENCODING"] == "hash":
        return BitHashNeRF(hash_table_bits=cfg["HASH_TABLE_BITS"], **model_kwargs(cfg))
    return BitNeRF(**model_kwargs(cfg))


def ternary_linears(model):
    """(name, Linear) of every hidden Linear that is trained and exported ternary: the Linear of each
    RMSNorm -> Linear block, in the model's order."""
    return [(f"{name}.1", block[1]) for name, block in model.named_modules()
            if isinstance(block, nn.Sequential) and len(block) == 2 and isinstance(block[0], nn.RMSNorm)]


def fp32_gemm_is_exact(a_i8):
    """Whether the integer product with int8 a_i8 takes fp32 GEMM: on CPU, where its K * 127 < 2^24."""
    return a_i8.device.type == "cpu" and a_i8.shape[1] * 127 < 2 ** 24


def scaled_int8_mm(a_i8, b_i8, row_scale, col_scale):
    """torchao's scaled int8 matmul, bit-identical, with the integer product done by fp32 GEMM on CPU.

    CPUs without int8 dot-product instructions run torch._int_mm far slower than fp32 GEMM (docs/bitnerf.md).
    Products of int8 activations and ternary weights summed over K terms stay below 2^24 while
    K * 127 < 2^24, so fp32 holds them exactly and fp32 GEMM gives the same integers.
    """
    if fp32_gemm_is_exact(a_i8):
        product = a_i8.float() @ b_i8.float()
    else:  # CUDA's int8 GEMM wants more than 16 rows; pad only then (F.pad copies even when it adds nothing)
        rows = a_i8.shape[0]  # not len(a_i8): under torch.compile that fixed the row count, one graph per batch size
        product = torch._int_mm(F.pad(a_i8, (0, 0, 0, 17 - rows)) if rows < 17 else a_i8, b_i8)[:rows]
    return product * col_scale.view(-1) * row_scale.view(-1, 1)


def quantize_for_training(model):
    """Swap the hidden Linears' weights for torchao's BitNet training weights (in place, before the optimizer)."""
    from torchao import quantize_
    from torchao.prototype.quantized_training import bitnet, bitnet_training

    # torchao's Triton kernel autotunes per row count, which the occupancy grid changes every step (docs/bitnerf.md);
    # its fallback is torch._int_mm, and ours is also exact and fast on CPU
    bitnet.scaled_int8_mm = scaled_int8_mm
    names = {name for name, _ in ternary_linears(model)}
    quantize_(model, bitnet_training(), filter_fn=lambda module, fqn: fqn in names)
    return model


def plain(tensor):
    """The plain tensor inside a torchao training weight (what weights_only=True can load), else itself."""
    return tensor._data if hasattr(tensor, "_data") else tensor


def plain_state(obj):
    """A state dict (model or optimizer, nested) with every torchao tensor subclass unwrapped."""
    if isinstance(obj, dict):
        return {k: plain_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain_state(v) for v in obj]
    return plain(obj) if isinstance(obj, torch.Tensor) else obj


def ternarize(weight):
    """BitNet b1.58 weight quantization: int8 values in {-1, 0, 1} and the fp32 tensor scale mean |w|."""
    w = plain(weight).detach().float()
    scale = w.abs().mean()
    return (w / scale.clamp_min(1e-5)).round().clamp(-1, 1).to(torch.int8), scale


def pack_bits(q, bits):
    """Integers in [-(2^(bits-1) - 1), 2^(bits-1) - 1] (any shape; bits 2 ... 8) -> uint8, 8 // bits codes
    (value + 2^(bits-1) - 1) per byte, the first in the low bits (one per byte for 5 ... 8 bits)."""
    per_byte = 8 // bits
    codes = (q.reshape(-1) + 2 ** (bits - 1) - 1).to(torch.uint8)
    codes = F.pad(codes, (0, -len(codes) % per_byte)).view(-1, per_byte)
    packed = codes[:, 0].clone()
    for i in range(1, per_byte):
        packed |= codes[:, i] << i * bits
    return packed


def unpack_bits(packed, shape, bits):
    """Inverse of pack_bits: int8 values of the given shape."""
    shifts = range(0, 8 // bits * bits, bits)
    codes = torch.stack([packed >> s & 2 ** bits - 1 for s in shifts], dim=-1).reshape(-1)
    return (codes[: torch.Size(shape).numel()].to(torch.int16) - (2 ** (bits - 1) - 1)).to(torch.int8).view(shape)


def deflate(packed):
    """uint8 bytes zlib-compressed, as a uint8 tensor: a trained table's codes are mostly near 0 (empty space), so
    their entropy is well under their bits."""
    return torch.frombuffer(bytearray(zlib.compress(packed.numpy().tobytes(), 9)), dtype=torch.uint8)


def inflate(compressed):
    """Inverse of deflate."""
    return torch.frombuffer(bytearray(zlib.decompress(compressed.numpy().tobytes())), dtype=torch.uint8)


def pack_ternary(q):
    """int8 values in {-1, 0, 1} (any shape) -> uint8, four 2-bit codes (value + 1) per byte."""
    return pack_bits(q, 2)


def unpack_ternary(packed, shape):
    """Inverse of pack_ternary: int8 values in {-1, 0, 1} of the given shape."""
    return unpack_bits(packed, shape, 2)


def int8_rows(x):
    """Per-row absmax int8 quantization of activations, exactly as torchao's bitnet_training forward."""
    from torchao.prototype.quantized_training.int8 import quantize_int8_rowwise

    return quantize_int8_rowwise(x, eps=1e-5)


class TernaryLinear(nn.Module):
    """Inference Linear from an export: ternary weight, tensor scale, int8 activations (as in training)."""

    def __init__(self, packed, scale, shape):
        super().__init__()
        self.out_features, self.in_features = shape
        # unpacked once to int8 for the matmul; not saved (the export keeps the 2-bit copy)
        self.register_buffer("weight_i8", unpack_ternary(packed, shape), persistent=False)
        self.register_buffer("scale", scale.float(), persistent=False)
        self.register_buffer("bias", torch.zeros(shape[0]))

    def forward(self, x):
        """int8 x ternary matmul, rescaled by the activation row scales and the weight scale."""
        batch = x.shape[:-1]
        x_i8, row_scale = int8_rows(x.reshape(-1, self.in_features).float())
        out = scaled_int8_mm(x_i8, self.weight_i8.T, row_scale, self.scale)
        return (out + self.bias).view(*batch, self.out_features)


def export_ternary(model, config, rest_dtype=torch.float16):
    """The export dict (loads with weights_only=True): the ternary weights 2-bit packed in one buffer, their
    fp32 scales, every other parameter (biases, output head) in one rest_dtype buffer, and the config; a hash
    table as its integer codes, packed and deflated, and their fp32 scales (F, levels).

    Tensor names and shapes follow from the config, so they are not stored (each stored tensor or string costs
    bytes in a file of a few kB). Works on copies: the model and its training are left untouched.
    """
    ternary = {f"{name}.weight" for name, _ in ternary_linears(model)}
    packed, scales, rest, table = [], [], [], {}
    for key, value in model.state_dict().items():
        value = plain(value).detach().float().cpu()
        if key in ternary:
            q, scale = ternarize(value)
            packed.append(pack_ternary(q)), scales.append(scale)
        elif key == "encoding.table":
            codes, table_scales = table_codes(value, model.encoding.sizes, model.encoding.bits)
            table = {"table": deflate(pack_bits(codes, model.encoding.bits)), "table_scales": table_scales}
        else:
            rest.append(value.reshape(-1))
    return {"format": EXPORT_FORMAT, "config": config, "packed": torch.cat(packed), "scales": torch.stack(scales),
            "rest": torch.cat(rest).to(rest_dtype), **table}


def load_ternary(export, cfg):
    """A BitNeRF (BitHashNeRF) inference model (eval mode, CPU) running from an export dict of the model cfg
    describes."""
    model = bitnerf_model(cfg)
    layers = ternary_linears(model)
    sizes = [-(-linear.weight.numel() // 4) for _, linear in layers]
    for (name, linear), packed, scale in zip(layers, export["packed"].split(sizes), export["scales"], strict=True):
        model.get_submodule(name.rsplit(".", 1)[0])[1] = TernaryLinear(packed, scale, tuple(linear.weight.shape))
    state = {k: v for k, v in model.state_dict().items() if k != "encoding.table"}  # in export order
    values = export["rest"].float().split([v.numel() for v in state.values()])
    weights = {k: v.view_as(state[k]) for k, v in zip(state, values, strict=True)}
    if "table" in export:  # the codes dequantized: fake-quant gives them back as they are
        encoding = model.encoding
        codes = unpack_bits(inflate(export["table"]), encoding.table.shape, encoding.bits).float()
        weights["encoding.table"] = codes * export["table_scales"].repeat_interleave(torch.tensor(encoding.sizes), 1)
    model.load_state_dict(weights)
    return model.eval()


def build_bitnerf(cfg, device):
    """The BitNeRF a config describes, on device, its hidden Linears quantized for QAT."""
    return quantize_for_training(bitnerf_model(cfg).to(device))


def export_bitnerf(model, cfg, path):
    """Write the ternary export of a BitNeRF to path; returns its size and that of the fp32 weights, in bytes."""
    legacy = dict(_use_new_zipfile_serialization=False)  # the zip format costs ~1.4 kB more in a file of a few kB
    keep = (*EXPORT_KEYS, "ENCODING", "HASH_TABLE_BITS", *(k.upper() for k in model_kwargs(cfg)))
    save_checkpoint(export_ternary(model, {k: cfg[k] for k in keep}), path, **legacy)
    fp32 = io.BytesIO()
    torch.save({k: v.float() for k, v in plain_state(model.state_dict()).items()}, fp32, **legacy)
    return os.path.getsize(path), len(fp32.getvalue())


def main(argv=None):
    """`python bitnerf.py RUN_DIR_OR_CKPT [--out=PATH]`: export a BitNeRF training checkpoint (default next to it)."""
    import argparse
    import sys

    from configs import UserError
    from utils import checkpoint_path, load_checkpoint, load_weights

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("ckpt", help="run directory holding ckpt.pt, or a checkpoint file")
    p.add_argument("--out", default=None, help="export path (default: bitnerf_ternary.pt beside the checkpoint)")
    args = p.parse_args(argv)
    try:
        path = checkpoint_path(args.ckpt)
        ckpt = load_checkpoint(path)
        cfg = ckpt["config"]
        if cfg["MODEL"] != "bitnerf":
            raise UserError(f"{path} is a {cfg['MODEL']} checkpoint; only MODEL=bitnerf runs (exp4, exp6) export")
        model = build_bitnerf(cfg, torch.device("cpu"))
        load_weights(model, ckpt["model"], path)
        out = args.out or os.path.join(os.path.dirname(path), "bitnerf_ternary.pt")
        size, fp32_size = export_bitnerf(model, cfg, out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{out}: {size} bytes, {fp32_size / size:.1f}x smaller than the fp32 weights")


if __name__ == "__main__":
    main()
