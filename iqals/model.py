"""The Table 1 network: the TensorFlow CIFAR-10 model the paper follows (PROTOCOL.md).

It knows nothing about params.yaml beyond its model section: `build(cfg, seed)` turns that
section into constructor arguments and draws the initial weights from `seed`. iqals/stacked.py
stacks G such networks into one set of grouped kernels, so that several runs train in one step.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .params import NUM_CLASSES, Model, ParamError


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-image standardisation of uint8 (B, 3, H, W): TF's per_image_standardization."""
    x = x.float()
    n = x[0].numel()
    std, mean = torch.std_mean(x, dim=(1, 2, 3), keepdim=True, correction=0)  # one pass
    return (x - mean).div_(std.clamp_min_(n ** -0.5))


def _pool_same(x: torch.Tensor) -> torch.Tensor:
    """3x3/2 max pool with TF 'SAME' padding: 32 -> 16 -> 8, the extra pad row/col at the end.

    ceil_mode clips the last window at the image edge, which is exactly the max over an input
    padded with one -inf row and column at the end, without making that padded copy.
    """
    return F.max_pool2d(x, kernel_size=3, stride=2, ceil_mode=True)


def _channel_window(c: int, size: int, alpha: float, dtype, device) -> torch.Tensor:
    """(c, c) matrix m with m[i, j] = alpha/size where j is in i's LRN window, else 0.

    nn.LocalResponseNorm's window over channels is [i - size//2, i + (size-1)//2].
    """
    i = torch.arange(c, device=device)
    d = i[:, None] - i[None, :]
    return ((d <= size // 2) & (d >= -((size - 1) // 2))).to(dtype) * (alpha / size)


def _over_channels(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y[:, i] = sum_j m[i, j] x[:, j] within each group of c = len(m) channels of (B, G*c, H, W) x,
    in x's memory format, as one (batched) matmul."""
    c = m.shape[0]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return (x.permute(0, 2, 3, 1).unflatten(3, (-1, c)) @ m.T).flatten(3).permute(0, 3, 1, 2)
    b, _, h, w = x.shape
    return torch.matmul(m, x.reshape(b, -1, c, h * w)).view(x.shape)


class _LRNFunction(torch.autograd.Function):
    """y = x * s^-beta, s = k + m @ x^2 over channels, with its gradient written out.

    dx = g * s^-beta - 2 beta x * (m^T @ (g y / s)). Replaces nn.LocalResponseNorm's avg_pool3d
    over a padded copy (and autograd through it), which dominated the CPU training step.
    """

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
    """nn.LocalResponseNorm, same parameters and values (to float rounding), faster on 4-d input.

    The window sum of squares over channels is a product with a fixed band matrix. With
    `groups` = G the channels are G independent blocks (GroupNet's runs), each normalised alone.
    """

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, groups: int = 1):
        super().__init__(size, alpha, beta, k)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            if self.groups != 1:
                raise ValueError(f"grouped LocalResponseNorm needs (B, C, H, W) input, got {tuple(x.shape)}")
            return super().forward(x)
        if torch.is_autocast_enabled(x.device.type):  # in fp32: autocast would run pow in fp32 and the
            with torch.autocast(x.device.type, enabled=False):  # product in bf16, mixing dtypes in backward
                return self.forward(x.float())
        # the band matrix is made on every call, not cached: a tensor kept from a compiled call
        # would be overwritten by the next replay of its CUDA graph
        m = _channel_window(x.shape[1] // self.groups, self.size, self.alpha, x.dtype, x.device)
        return _LRNFunction.apply(x, m, self.beta, self.k)


class Net(nn.Module):
    """conv1-relu-pool1-lrn1-conv2-relu-lrn2-pool2-fc384-relu-fc192-relu-linear10 (Table 1)."""

    def __init__(self, lrn_size: int = 9, lrn_alpha: float = 1e-3, lrn_beta: float = 0.75,
                 lrn_k: float = 1.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 5, padding=2)
        self.conv2 = nn.Conv2d(64, 64, 5, padding=2)
        self.lrn = LocalResponseNorm(lrn_size, alpha=lrn_alpha, beta=lrn_beta, k=lrn_k)
        self.fc1 = nn.Linear(8 * 8 * 64, 384)
        self.fc2 = nn.Linear(384, 192)
        self.out = nn.Linear(192, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last: oneDNN's convolutions, the max pools and the LRN's product over
        # channels are all faster on it (CPU; on GPU train.py passes channels-last already)
        x = x.contiguous(memory_format=torch.channels_last)
        # relu and max pool commute (values and gradients): pooling first makes relu 4x cheaper
        x = self.lrn(F.relu(_pool_same(self.conv1(x))))
        x = _pool_same(self.lrn(F.relu(self.conv2(x))))
        x = F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))
        return self.out(x)  # logits; the softmax is in the loss and in evaluation

    def decayed_parameters(self) -> list[nn.Parameter]:
        """The weights that get L2 decay: the two hidden fully connected layers only (paper 4.3)."""
        return [self.fc1.weight, self.fc2.weight]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamError("train.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def build(cfg: Model, seed: int) -> Net:
    """The network with the TF CIFAR-10 model's initialisation, drawn from `seed`."""
    torch.manual_seed(seed)
    net = Net(cfg.lrn_size, cfg.lrn_alpha, cfg.lrn_beta, cfg.lrn_k)
    for layer, std, bias in [(net.conv1, cfg.conv_std, cfg.conv1_bias),
                             (net.conv2, cfg.conv_std, cfg.conv2_bias),
                             (net.fc1, cfg.fc_std, cfg.fc_bias),
                             (net.fc2, cfg.fc_std, cfg.fc_bias),
                             (net.out, cfg.out_std, cfg.out_bias)]:
        with torch.no_grad():
            nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)  # TF truncates at 2 std
            layer.bias.fill_(bias)
    return net
