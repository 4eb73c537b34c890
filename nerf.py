"""The NeRF MLP: positionally encoded xyz (and optionally view direction) -> RGB and density."""
import torch
import torch.nn as nn
import torch.nn.functional as F


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


def model_kwargs(cfg):
    """The NeRF constructor arguments a config selects (also what a checkpoint must match)."""
    return dict(
        pos_encode_dims=cfg["POS_ENCODE_DIMS"],
        num_layers=cfg["NUM_LAYERS"],
        emb_dim=cfg["EMB_DIM"],
        use_viewdirs=cfg["USE_VIEWDIRS"],
        dir_encode_dims=cfg["DIR_ENCODE_DIMS"],
        density_act=cfg["DENSITY_ACT"],
    )
