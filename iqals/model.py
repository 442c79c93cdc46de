"""The Table 1 network: the TensorFlow CIFAR-10 model the paper follows (PROTOCOL.md).

It knows nothing about params.yaml: `build(cfg)` turns the model section into constructor
arguments.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .params import NUM_CLASSES, Model


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-image standardisation of uint8 (B, 3, H, W): TF's per_image_standardization."""
    x = x.float()
    n = x[0].numel()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True, correction=0).clamp_min(n ** -0.5)
    return (x - mean) / std


def _pool_same(x: torch.Tensor) -> torch.Tensor:
    """3x3/2 max pool with TF 'SAME' padding: 32 -> 16 -> 8, the extra pad row/col at the end."""
    return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), kernel_size=3, stride=2)


class Net(nn.Module):
    """conv1-relu-pool1-lrn1-conv2-relu-lrn2-pool2-fc384-relu-fc192-relu-linear10 (Table 1)."""

    def __init__(self, lrn_size: int = 9, lrn_alpha: float = 1e-3, lrn_beta: float = 0.75,
                 lrn_k: float = 1.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 5, padding=2)
        self.conv2 = nn.Conv2d(64, 64, 5, padding=2)
        self.lrn = nn.LocalResponseNorm(lrn_size, alpha=lrn_alpha, beta=lrn_beta, k=lrn_k)
        self.fc1 = nn.Linear(8 * 8 * 64, 384)
        self.fc2 = nn.Linear(384, 192)
        self.out = nn.Linear(192, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every layer's output, named as in Table 1 (the shape test reads these)."""
        f = {}
        f["conv1"] = x = F.relu(self.conv1(x))
        f["pool1"] = x = _pool_same(x)
        f["lrn1"] = x = self.lrn(x)
        f["conv2"] = x = F.relu(self.conv2(x))
        f["lrn2"] = x = self.lrn(x)
        f["pool2"] = x = _pool_same(x)
        f["fc1"] = x = F.relu(self.fc1(x.flatten(1)))
        f["fc2"] = x = F.relu(self.fc2(x))
        f["logits"] = self.out(x)
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lrn(_pool_same(F.relu(self.conv1(x))))
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
        raise ValueError("train.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def _trunc_normal_(w: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)  # TF truncates at 2 std


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
            _trunc_normal_(layer.weight, std)
            layer.bias.fill_(bias)
    return net
