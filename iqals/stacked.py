"""G copies of the Table 1 network (iqals/model.py) as one model, so that several runs train in one step."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import LocalResponseNorm, Net, _pool_same
from .params import NUM_CLASSES


class GroupLinear(nn.Module):
    """G independent nn.Linear layers as one batched matmul on (G, B, in) input.

    Parameters are stacked run-major like a grouped convolution's, weight (G*out, in) and bias
    (G*out,), so run g's slice of either is exactly an nn.Linear's tensor (see GroupNet.run_state).
    """

    def __init__(self, groups: int, n_in: int, n_out: int):
        super().__init__()
        self.groups, self.n_out = groups, n_out
        self.weight = nn.Parameter(torch.empty(groups * n_out, n_in))
        self.bias = nn.Parameter(torch.empty(groups * n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.groups
        w = self.weight.view(g, self.n_out, -1)
        return torch.baddbmm(self.bias.view(g, 1, self.n_out), x, w.transpose(1, 2))


class GroupNet(nn.Module):
    """G copies of Net with their own weights, computed together: grouped convolutions over
    (B, G*C, H, W), the LRN per group, batched matmuls for the fully connected layers.

    Input (G, B, 3, H, W), output (G, B, 10): run g sees only its own images and weights, so its
    values and gradients are Net's to float rounding (tests/test_group.py). Every parameter is
    stacked run-major along dim 0 and named as in Net: run_state/load_run convert.
    """

    def __init__(self, groups: int, lrn_size: int = 9, lrn_alpha: float = 1e-3, lrn_beta: float = 0.75,
                 lrn_k: float = 1.0):
        super().__init__()
        g = self.groups = groups
        self.conv1 = nn.Conv2d(3 * g, 64 * g, 5, padding=2, groups=g)
        self.conv2 = nn.Conv2d(64 * g, 64 * g, 5, padding=2, groups=g)
        self.lrn = LocalResponseNorm(lrn_size, alpha=lrn_alpha, beta=lrn_beta, k=lrn_k, groups=g)
        self.fc1 = GroupLinear(g, 8 * 8 * 64, 384)
        self.fc2 = GroupLinear(g, 384, 192)
        self.out = GroupLinear(g, 192, NUM_CLASSES)

    @classmethod
    def stack(cls, nets: list[Net]) -> "GroupNet":
        lrn = nets[0].lrn
        group = cls(len(nets), lrn.size, lrn.alpha, lrn.beta, lrn.k)
        for g, net in enumerate(nets):
            group.load_run(g, net.state_dict())
        return group.to(next(nets[0].parameters()).device)

    def run_state(self, g: int) -> dict[str, torch.Tensor]:
        """Run g's weights as a plain Net state_dict (copies, contiguous)."""
        return {k: v.detach().unflatten(0, (self.groups, -1))[g].contiguous().clone()
                for k, v in self.state_dict().items()}

    def load_run(self, g: int, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in self.state_dict().items():
                v.unflatten(0, (self.groups, -1))[g].copy_(state[k])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, b, c, h, w = x.shape
        # runs side by side in channels, channels-last (the layout Net.forward uses), in one copy
        x = x.permute(1, 3, 4, 0, 2).reshape(b, h, w, g * c).permute(0, 3, 1, 2)
        x = self.lrn(F.relu(_pool_same(self.conv1(x))))  # as Net.forward, per group
        x = _pool_same(self.lrn(F.relu(self.conv2(x))))
        x = x.unflatten(1, (g, -1)).transpose(0, 1).flatten(2)  # (G, B, 64*8*8) in Net's flatten order
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        return self.out(x)

    def decayed_parameters(self) -> list[nn.Parameter]:
        """Net's decayed weights, every run's at once (the decay acts element-wise)."""
        return [self.fc1.weight, self.fc2.weight]
