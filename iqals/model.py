"""The Table 1 network, G independent copies of it computed together (docs/protocol.md, "What the paper fixes").

`Net(groups=1)` is the network evaluation loads. With groups = G it holds G runs' weights, each
parameter stacked run-major along dim 0 (run g's slice is exactly a one-group tensor): grouped
convolutions over the runs side by side in channels, the LRN per group, batched matmuls for the
fully connected layers. Run g sees only its own images and weights, so its values and gradients
are the one-group network's to float rounding (tests/test_group.py). The class knows nothing of
params.yaml: `build(cfg, seed)` turns its model section into a network and initial weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .params import NUM_CLASSES, Model, ParamError


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-image standardisation of uint8 (B, 3, H, W): TF's per_image_standardization."""
    x = x.float()
    std, mean = torch.std_mean(x, dim=(1, 2, 3), keepdim=True, correction=0)  # one pass
    return (x - mean).div_(std.clamp_min_(x[0].numel() ** -0.5))


def pool_same(x: torch.Tensor) -> torch.Tensor:
    """3x3/2 max pool with TF 'SAME' padding (32 -> 16 -> 8): ceil_mode clips the last window at
    the edge, exactly the max over an input padded with one -inf row and column at the end."""
    return F.max_pool2d(x, kernel_size=3, stride=2, ceil_mode=True)


def _over_channels(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y[:, i] = sum_j m[i, j] x[:, j] within each block of c = len(m) channels of (B, G*c, H, W)
    x, in x's memory format, as one (batched) matmul."""
    c = m.shape[0]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return (x.permute(0, 2, 3, 1).unflatten(3, (-1, c)) @ m.T).flatten(3).permute(0, 3, 1, 2)
    b, _, h, w = x.shape
    return torch.matmul(m, x.reshape(b, -1, c, h * w)).view(x.shape)


class _LRNFunction(torch.autograd.Function):
    """y = x s^-beta, s = k + m @ x^2 over channels; dx = g s^-beta - 2 beta x (m^T @ (g y / s)).
    Written out: nn.LocalResponseNorm's avg_pool3d over a padded copy dominated the CPU step."""

    @staticmethod
    def forward(ctx, x, m, beta, k):
        s = _over_channels(m, x * x).add_(k)
        r = s.pow(-beta)
        y = x * r
        ctx.save_for_backward(x, m, s, r, y)
        ctx.beta = beta
        return y

    @staticmethod
    def backward(ctx, g):
        x, m, s, r, y = ctx.saved_tensors
        t = _over_channels(m.T, (g * y).div_(s))
        return (g * r).addcmul_(x, t, value=-2 * ctx.beta), None, None, None


class LocalResponseNorm(nn.LocalResponseNorm):
    """nn.LocalResponseNorm's values (to float rounding), its window over channels
    [i - size//2, i + (size-1)//2] as a product with a band matrix; with `groups` = G the channels
    are G independent blocks, each normalised alone."""

    def __init__(self, size: int, alpha: float, beta: float, k: float, groups: int = 1):
        super().__init__(size, alpha, beta, k)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # in fp32: autocast would run pow in fp32 and the
            with torch.autocast(x.device.type, enabled=False):  # product in bf16, mixing dtypes in backward
                return self.forward(x.float())
        # made on every call, not cached: a kept tensor would be overwritten by a CUDA graph's replay
        i = torch.arange(x.shape[1] // self.groups, device=x.device)
        d = i[:, None] - i[None, :]
        m = ((d <= self.size // 2) & (d >= -((self.size - 1) // 2))).to(x.dtype) * (self.alpha / self.size)
        return _LRNFunction.apply(x, m, self.beta, self.k)


class Linear(nn.Module):
    """G independent nn.Linear layers on (G, B, in): weight (G*out, in), bias (G*out,)."""

    def __init__(self, groups: int, n_in: int, n_out: int):
        super().__init__()
        self.groups, self.n_out = groups, n_out
        self.weight = nn.Parameter(torch.empty(groups * n_out, n_in))
        self.bias = nn.Parameter(torch.empty(groups * n_out))
        nn.Linear.reset_parameters(self)  # its draws, though build overwrites them: a seed's weights stay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return F.linear(x, self.weight, self.bias)
        w = self.weight.view(self.groups, self.n_out, -1)
        return torch.baddbmm(self.bias.view(self.groups, 1, self.n_out), x, w.transpose(1, 2))


class Net(nn.Module):
    """conv1-relu-pool1-lrn1-conv2-relu-lrn2-pool2-fc384-relu-fc192-relu-linear10 (Table 1), G times.

    Input uint8-standardised images (G, B, 3, H, W), output logits (G, B, 10); a one-group network
    also takes (B, 3, H, W) and returns (B, 10).
    """

    def __init__(self, groups: int = 1, lrn_size: int = 9, lrn_alpha: float = 1e-3, lrn_beta: float = 0.75,
                 lrn_k: float = 1.0):
        super().__init__()
        g = self.groups = groups
        self.conv1 = nn.Conv2d(3 * g, 64 * g, 5, padding=2, groups=g)
        self.conv2 = nn.Conv2d(64 * g, 64 * g, 5, padding=2, groups=g)
        self.lrn = LocalResponseNorm(lrn_size, lrn_alpha, lrn_beta, lrn_k, groups=g)
        self.fc1 = Linear(g, 8 * 8 * 64, 384)
        self.fc2 = Linear(g, 384, 192)
        self.out = Linear(g, 192, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = x.dim() == 4
        g, b, c, h, w = (1, *x.shape) if one else x.shape
        # runs side by side in channels, channels-last (oneDNN's convolutions, the pools and the
        # LRN's product are faster on it), in one copy: contiguous(), as reshape would make none at G = 1
        x = x.reshape(g, b, c, h, w).permute(1, 3, 4, 0, 2).contiguous().view(b, h, w, g * c).permute(0, 3, 1, 2)
        # relu and max pool commute (values and gradients): pooling first makes relu 4x cheaper
        x = self.lrn(F.relu(pool_same(self.conv1(x))))
        x = pool_same(self.lrn(F.relu(self.conv2(x))))
        x = x.unflatten(1, (g, -1)).transpose(0, 1).flatten(2)  # (G, B, 64*8*8), (channel, row, column)
        x = self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))
        return x[0] if one else x  # logits; the softmax is in the loss and in evaluation

    def decayed_parameters(self) -> list[nn.Parameter]:
        """The weights that get L2 decay: the two hidden fully connected layers (paper 4.3), every
        run's at once (the decay acts element-wise)."""
        return [self.fc1.weight, self.fc2.weight]

    @classmethod
    def stack(cls, nets: list[Net]) -> Net:
        """One network of len(nets) groups holding the one-group networks' weights, in order."""
        lrn = nets[0].lrn
        net = cls(len(nets), lrn.size, lrn.alpha, lrn.beta, lrn.k).to(next(nets[0].parameters()))  # dtype, device
        for g, one in enumerate(nets):
            net.load_run(g, one.state_dict())
        return net

    def run_state(self, g: int) -> dict[str, torch.Tensor]:
        """Run g's weights as a one-group state_dict (contiguous copies)."""
        return {k: v.detach().unflatten(0, (self.groups, -1))[g].contiguous().clone()
                for k, v in self.state_dict().items()}

    def load_run(self, g: int, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.state_dict().items():
                v.unflatten(0, (self.groups, -1))[g].copy_(state[k])


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamError(f"train.device = 'cuda' but no CUDA device is available (torch {torch.__version__})")
    return torch.device(name)


def build(cfg: Model, seed: int) -> Net:
    """The one-group network with the TF CIFAR-10 model's initialisation, drawn from `seed`."""
    torch.manual_seed(seed)
    net = Net(1, cfg.lrn_size, cfg.lrn_alpha, cfg.lrn_beta, cfg.lrn_k)
    for layer, std, bias in [(net.conv1, cfg.conv_std, cfg.conv1_bias), (net.conv2, cfg.conv_std, cfg.conv2_bias),
                             (net.fc1, cfg.fc_std, cfg.fc_bias), (net.fc2, cfg.fc_std, cfg.fc_bias),
                             (net.out, cfg.out_std, cfg.out_bias)]:
        with torch.no_grad():
            nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)  # TF truncates at 2 std
            layer.bias.fill_(bias)
    return net
