"""The NeRF models: xyz (and optionally view direction) -> RGB and density, through NeRF's frequency encoding and
8-layer MLP or through Instant-NGP's multiresolution hash encoding and a small MLP."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs import hash_data_defaults


def positional_encoding(x, num_freqs):
    """[x, sin(2^k x), cos(2^k x)] for k < num_freqs, as in the Keras NeRF tutorial."""
    freqs = 2.0 ** torch.arange(num_freqs, device=x.device, dtype=x.dtype)
    xf = (x[..., None, :] * freqs[:, None]).flatten(-2)
    return torch.cat([x, torch.sin(xf), torch.cos(xf)], dim=-1)


def encoded_dim(num_freqs):
    """Width of positional_encoding's output for a 3-vector."""
    return 3 + 3 * 2 * num_freqs


class NeRF(nn.Module):
    """NUM_LAYERS x EMB_DIM ReLU MLP with the encoded input concatenated back every 4 layers.

    Density goes through ReLU (the original code's) or softplus: a ReLU density pushed below zero everywhere early in
    training (an easy minimum on a black background) gets no gradient again and the run is lost.
    """

    def __init__(self, pos_encode_dims=10, num_layers=8, emb_dim=64, use_viewdirs=False, dir_encode_dims=4,
                 density_act="relu"):
        super().__init__()
        self.density_act = {"relu": F.relu, "softplus": F.softplus}[density_act]
        self.pos_encode_dims, self.dir_encode_dims = pos_encode_dims, dir_encode_dims
        self.use_viewdirs = use_viewdirs
        # zero-padded to a multiple of 8 (63 -> 64): GEMMs with an odd K or N take slower paths, and int8 kernels
        # (BitNeRF) need it
        self.in_dim = in_dim = -(-encoded_dim(pos_encode_dims) // 8) * 8
        self.skips = {i for i in range(4, num_layers, 4)}
        self.layers = nn.ModuleList(
            self.hidden_layer(emb_dim + (in_dim if i in self.skips else 0) if i else in_dim, emb_dim)
            for i in range(num_layers)
        )
        if use_viewdirs:
            self.sigma_out = nn.Linear(emb_dim, 1)
            self.feature = nn.Linear(emb_dim, emb_dim)
            self.dir_layer = nn.Linear(emb_dim + encoded_dim(dir_encode_dims), emb_dim // 2)
            self.rgb_out = nn.Linear(emb_dim // 2, 3)
        else:
            self.out = nn.Linear(emb_dim, 4)
        with torch.no_grad():  # density starts positive everywhere: a ReLU that starts at 0 gets no gradient
            (self.sigma_out.bias if use_viewdirs else self.out.bias[3:]).fill_(0.1)

    def hidden_layer(self, in_dim, out_dim):
        """One hidden Linear (a subclass may put a norm before it or quantize it)."""
        return nn.Linear(in_dim, out_dim)

    def skip_layer(self, layer, h, x):
        """layer([h, x]) without building the concatenation: its weight split in two, one GEMM each.

        Saves the copy forward and, as x needs no gradient, its share of the input-gradient GEMM backward.
        """
        d = h.shape[-1]
        return torch.addmm(F.linear(x, layer.weight[:, d:], layer.bias), h, layer.weight[:, :d].t())

    def forward(self, xyz, viewdirs=None):
        """Points (..., 3) [+ unit view directions (..., 3)] -> rgb (..., 3) in [0, 1], sigma (...) >= 0."""
        batch = xyz.shape[:-1]
        x = positional_encoding(xyz.reshape(-1, 3), self.pos_encode_dims)
        if self.in_dim > x.shape[-1]:  # F.pad by 0 columns would still copy
            x = F.pad(x, (0, self.in_dim - x.shape[-1]))
        h = x
        for i, layer in enumerate(self.layers):
            # in place: no Linear needs its output for the gradient, so this saves a pass and a buffer per layer
            h = F.relu(self.skip_layer(layer, h, x) if i in self.skips else layer(h), inplace=True)
        if self.use_viewdirs:
            d = positional_encoding(viewdirs.reshape(-1, 3), self.dir_encode_dims)
            rgb = self.rgb_out(F.relu(self.dir_layer(torch.cat([self.feature(h), d], dim=-1))))
            sigma = self.sigma_out(h)[:, 0]
        else:
            out = self.out(h)
            rgb, sigma = out[:, :3], out[:, 3]
        return torch.sigmoid(rgb).view(*batch, 3), self.density_act(sigma).view(batch)


# the config keys a HashNeRF is built from (its constructor's arguments, in lower case)
HASH_KEYS = ("HASH_LEVELS", "HASH_LOG2_SIZE", "HASH_FEATURES", "HASH_BASE_RES", "HASH_FINEST_RES", "SCENE_BOUND",
             "DENSITY_LAYERS", "COLOR_LAYERS", "EMB_DIM", "USE_VIEWDIRS")


# The spatial hash of Mueller et al. 2022 (Instant-NGP), as int32: a product wraps modulo 2^32 as the paper's
# uint32 one does, and the table index keeps only the low bits, so the two agree bit for bit.
HASH_PRIMES = (1, 2654435761 - 2 ** 32, 805459861)


def level_resolutions(levels, base_res, finest_res):
    """Grid resolution of each level: base_res to finest_res in geometric steps (floor, as in the paper)."""
    growth = (finest_res / base_res) ** (1 / (levels - 1)) if levels > 1 else 1.0
    return [int(base_res * growth ** level + 1e-6) for level in range(levels)]


class HashLookup(torch.autograd.Function):
    """Trilinear lookup in the feature-major table (F, rows): per feature, the 8 corners' entries weighted and
    summed, (N, L, F).

    Feature-major, each feature is one 1-D gather forward and one 1-D scatter_add_ backward, torch's fast paths
    on CPU; autograd's own backward of table[idx] (an index_put that accumulates) measured 4x slower (docs/hash.md).
    """

    @staticmethod
    def forward(ctx, table, idx, weights):
        ctx.save_for_backward(idx, weights)
        ctx.table_shape = table.shape
        flat = idx.view(-1)
        return torch.stack([(t.index_select(0, flat).view_as(weights) * weights).sum(0) for t in table], -1)

    @staticmethod
    def backward(ctx, grad_out):
        idx, weights = ctx.saved_tensors
        grad = torch.zeros(ctx.table_shape, device=grad_out.device)
        flat = idx.view(-1)
        for f in range(ctx.table_shape[0]):
            grad[f].scatter_add_(0, flat, (weights * grad_out[..., f].float()).view(-1))
        return grad, None, None


class HashEncoding(nn.Module):
    """Multiresolution hash encoding (Mueller et al. 2022): points in [-bound, bound]^3 -> (N, levels * features).

    Level l is a grid of resolution N_l whose corners index a table of min(2^log2_size, (N_l + 1)^3) entries of
    `features` learned values: densely (x + y (N_l+1) + z (N_l+1)^2) where the grid fits, by the spatial hash
    (x * 1 ^ y * 2654435761 ^ z * 805459861) mod 2^log2_size otherwise. A point reads its 8 corners' entries,
    trilinearly weighted. All levels live in one fp32 table (features, rows), so one gather serves them all.
    """

    def __init__(self, levels=12, log2_size=15, features=2, base_res=16, finest_res=256, bound=1.5):
        super().__init__()
        if not bound > 0:  # a config's SCENE_BOUND 0 is the data's: train.data_config resolves it first
            raise ValueError(f"hash encoding bound={bound}: the cube's half-width must be > 0")
        self.bound, self.log2_size, self.features = bound, log2_size, features
        self.resolutions = level_resolutions(levels, base_res, finest_res)
        self.sizes = [min(2 ** log2_size, (r + 1) ** 3) for r in self.resolutions]
        self.dense_levels = sum((r + 1) ** 3 <= 2 ** log2_size for r in self.resolutions)  # coarse levels first
        self.table = nn.Parameter(torch.empty(features, sum(self.sizes)).uniform_(-1e-4, 1e-4))  # as in the paper
        offsets = torch.tensor([0, *self.sizes[:-1]]).cumsum(0)
        dense = torch.tensor([[1, r + 1, (r + 1) ** 2] for r in self.resolutions])
        strides = torch.where(torch.arange(levels)[:, None] < self.dense_levels, dense, torch.tensor(HASH_PRIMES))
        self.register_buffer("res", torch.tensor(self.resolutions, dtype=torch.float32), persistent=False)
        self.register_buffer("offsets", offsets.int(), persistent=False)
        self.register_buffer("strides", strides.t().int(), persistent=False)  # (3, L): per axis, per level

    @property
    def out_dim(self):
        """Width of the encoding: levels x features."""
        return len(self.resolutions) * self.features

    def corners(self, xyz):
        """Table rows (8, N, L) int64 and trilinear weights (8, N, L) of each point's 8 corners at every level.

        Corner c = 4 i + 2 j + k is offset (i, j, k) from the cell's low corner. Index terms and weights are built
        per axis, (2, N, L), and combined by broadcasting over the leading corner axes: every elementwise op then
        runs over N x L contiguous values (a corner axis last, of size 2 or 8, measured 2x slower: docs/hash.md).
        """
        u = (xyz.float() / (2 * self.bound) + 0.5).clamp(0, 1)
        pos = u.t()[:, :, None] * self.res  # (3, N, L)
        low = torch.minimum(pos.floor(), self.res - 1)  # a point on the far face uses the last cell
        frac = pos - low
        low = low.int()
        w, t = [], []
        for axis in range(3):
            w.append(torch.stack([1 - frac[axis], frac[axis]]))
            term = low[axis] * self.strides[axis]  # int32: a hashed product wraps as the paper's uint32 one
            t.append(torch.stack([term, term + self.strides[axis]]))
        shape = (8, *frac.shape[1:])
        weights = (w[0][:, None, None] * w[1][None, :, None] * w[2][None, None, :]).view(shape)
        d = self.dense_levels
        dense = t[0][:, None, None, :, :d] + t[1][None, :, None, :, :d] + t[2][None, None, :, :, :d]
        hashed = (t[0][:, None, None, :, d:] ^ t[1][None, :, None, :, d:] ^ t[2][None, None, :, :, d:]) \
            & (2 ** self.log2_size - 1)
        return (torch.cat([dense, hashed], -1) + self.offsets).view(shape).long(), weights

    def lookup_table(self):
        """The table the lookup reads (a subclass may quantize it)."""
        return self.table

    def forward(self, xyz):
        """Points (N, 3) -> features (N, levels * features), fp32 whatever the autocast (see docs/hash.md)."""
        idx, weights = self.corners(xyz)
        return HashLookup.apply(self.lookup_table(), idx, weights).flatten(1)


class TruncExp(torch.autograd.Function):
    """exp(x), its gradient computed from x clamped at 15: the density's exp cannot blow a step up (torch-ngp)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(-15, 15))


def spherical_harmonics(d):
    """The 16 real spherical harmonics of degree < 4 at unit directions d (N, 3), as Instant-NGP encodes views."""
    x, y, z = d.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    return torch.stack([
        torch.full_like(x, 0.28209479177387814),
        -0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x,
        1.0925484305920792 * x * y, -1.0925484305920792 * y * z, 0.94617469575755997 * zz - 0.31539156525251999,
        -1.0925484305920792 * x * z, 0.54627421529603959 * (xx - yy),
        0.59004358992664352 * y * (-3 * xx + yy), 2.8906114426405538 * x * y * z,
        0.45704579946446572 * y * (1 - 5 * zz), 0.3731763325901154 * z * (5 * zz - 3),
        0.45704579946446572 * x * (1 - 5 * zz), 1.4453057213202769 * z * (xx - yy),
        0.59004358992664352 * x * (-xx + 3 * yy),
    ], -1)


class HashNeRF(nn.Module):
    """Hash encoding -> density MLP (16 outputs, the first the log-density) -> colour MLP (those 16 [+ the view's
    spherical harmonics]) -> rgb; the Instant-NGP model, with ReLU hidden layers of width emb_dim."""

    def __init__(self, hash_levels=12, hash_log2_size=15, hash_features=2, hash_base_res=16, hash_finest_res=256,
                 scene_bound=1.5, density_layers=1, color_layers=2, emb_dim=64, use_viewdirs=False):
        super().__init__()
        self.use_viewdirs = use_viewdirs
        self.encoding = self.make_encoding(hash_levels, hash_log2_size, hash_features, hash_base_res, hash_finest_res,
                                           scene_bound)
        self.density_net = self.mlp(self.encoding.out_dim, emb_dim, density_layers, 16)
        self.color_net = self.mlp(16 + 16 * use_viewdirs, emb_dim, color_layers, 3)
        with torch.no_grad():  # density starts near 0.1, as NeRF's: rays start clear, not fogged (docs/hash.md)
            self.density_net[-1].bias[0] = math.log(0.1)

    def make_encoding(self, *args):
        """The HashEncoding (a subclass may quantize its table)."""
        return HashEncoding(*args)

    def hidden_layer(self, in_dim, out_dim):
        """One hidden Linear (a subclass may put a norm before it or quantize it)."""
        return nn.Linear(in_dim, out_dim)

    def mlp(self, in_dim, width, depth, out_dim):
        """depth hidden ReLU layers of width, then a Linear output."""
        layers = []
        for i in range(depth):
            layers += [self.hidden_layer(width if i else in_dim, width), nn.ReLU(inplace=True)]
        return nn.Sequential(*layers, nn.Linear(width if depth else in_dim, out_dim))

    def forward(self, xyz, viewdirs=None):
        """Points (..., 3) [+ unit view directions (..., 3)] -> rgb (..., 3) in [0, 1], sigma (...) >= 0."""
        batch = xyz.shape[:-1]
        h = self.density_net(self.encoding(xyz.reshape(-1, 3)))
        sigma = TruncExp.apply(h[:, 0].float())
        if self.use_viewdirs:
            h = torch.cat([h, spherical_harmonics(viewdirs.reshape(-1, 3)).to(h.dtype)], -1)
        rgb = torch.sigmoid(self.color_net(h))
        return rgb.view(*batch, 3), sigma.view(batch)


def model_kwargs(cfg):
    """The constructor arguments of the model a config selects (also what a checkpoint must match), named as the
    config's keys in lower case."""
    if cfg["ENCODING"] == "hash":  # a key at 0: the data's, by its space (train.load_data saves it resolved)
        return {**{k.lower(): cfg[k] for k in HASH_KEYS},
                **{k.lower(): cfg[k] or v for k, v in hash_data_defaults(cfg["SPACE"]).items()}}
    return dict(
        pos_encode_dims=cfg["POS_ENCODE_DIMS"],
        num_layers=cfg["NUM_LAYERS"],
        emb_dim=cfg["EMB_DIM"],
        use_viewdirs=cfg["USE_VIEWDIRS"],
        dir_encode_dims=cfg["DIR_ENCODE_DIMS"],
        density_act=cfg["DENSITY_ACT"],
    )


def model_class(cfg):
    """NeRF (frequency encoding) or HashNeRF, as the config's ENCODING says."""
    return HashNeRF if cfg["ENCODING"] == "hash" else NeRF
