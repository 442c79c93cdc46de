"""Candidate GPU step pieces, each checked against the plain layers it would replace: the LRN as
two Triton kernels (`lrn`), the 'SAME' max pool without int64 indices (`max_pool_same`), dense
convolutions of runs stacked along the batch (`batch_stacked_conv`), fully connected layers whose
weight gradients arrive in the weights' own layout (`linear_weight_layout`), and model.Net in
that layout (`BatchStackedNet`): train.layout = batch trains with it (after the step's check),
the probe (iqals/probe.py) times it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .model import Net

BLOCK_P = 16  # pixels per program (tl.dot wants at least 16 rows)


@triton.jit
def _band(C: tl.constexpr, SIZE: tl.constexpr, ALPHA: tl.constexpr, ACC: tl.constexpr):
    """(C, C) matrix w[j, i] = alpha/size where channel j is in channel i's window
    [i - SIZE//2, i + (SIZE-1)//2] (nn.LocalResponseNorm's), else 0; s = k + x^2 @ w."""
    j = tl.arange(0, C)[:, None]
    i = tl.arange(0, C)[None, :]
    inside = (j >= i - SIZE // 2) & (j <= i + (SIZE - 1) // 2)
    return tl.where(inside, ALPHA / SIZE, 0.0).to(ACC)


@triton.jit
def _lrn(x_ptr, g_ptr, out_ptr, rows, C: tl.constexpr, SIZE: tl.constexpr, ALPHA: tl.constexpr, BETA: tl.constexpr,
         K: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, BACKWARD: tl.constexpr):
    """y = x s^-beta, or (BACKWARD) dx = g s^-beta - 2 beta x ((g y / s) @ w^T) for the gradient g of y."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)[:, None]
    c = tl.arange(0, C)[None, :]
    mask = r < rows
    x = tl.load(x_ptr + r * C + c, mask=mask, other=0.0).to(ACC)
    w = _band(C, SIZE, ALPHA, ACC)
    s = K + tl.dot(x * x, w, input_precision=PRECISION)
    rs = tl.exp2(-BETA * tl.log2(s))
    if BACKWARD:
        g = tl.load(g_ptr + r * C + c, mask=mask, other=0.0).to(ACC)
        out = g * rs - 2.0 * BETA * x * tl.dot(g * x * rs / s, tl.trans(w), input_precision=PRECISION)
    else:
        out = x * rs
    tl.store(out_ptr + r * C + c, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, int]:
    """(B, G*c, H, W) as a (B*H*W*G, c) row-major view of its channels-last copy."""
    b, ch, h, w = x.shape
    if ch % groups:
        raise ValueError(f"{ch} channels do not split into {groups} groups")
    c = ch // groups
    if c < 16 or c & (c - 1):
        raise ValueError(f"the fused LRN needs a power of two >= 16 channels per group, got {c}")
    return x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, c), c


def _run(x: torch.Tensor, size, alpha, beta, k, groups, g: torch.Tensor | None = None) -> torch.Tensor:
    """_lrn over x's rows (backward: and the gradient g's): NCHW shape, channels-last strides."""
    rows, c = _rows(x, groups)
    out = torch.empty_like(rows)
    acc = tl.float64 if rows.dtype == torch.float64 else tl.float32  # float64 for gradcheck only
    _lrn[(triton.cdiv(rows.shape[0], BLOCK_P),)](  # ieee: fp32 products, the band matrix's sums as in fp32
        rows, rows if g is None else _rows(g.to(x.dtype), groups)[0], out, rows.shape[0], C=c, SIZE=size,
        ALPHA=float(alpha), BETA=float(beta), K=float(k), BLOCK=BLOCK_P, PRECISION="ieee", ACC=acc,
        BACKWARD=g is not None)
    b, ch, h, w = x.shape
    return out.view(b, h, w, ch).permute(0, 3, 1, 2)


class _FusedLRN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *cfg):  # cfg: size, alpha, beta, k, groups
        ctx.save_for_backward(x)  # only the input: the backward recomputes the rest
        ctx.cfg = cfg
        return _run(x, *cfg)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _run(x, *ctx.cfg, g=g), None, None, None, None, None


def lrn(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int = 1) -> torch.Tensor:
    """nn.LocalResponseNorm(size, alpha, beta, k) of (B, G*c, H, W) x, each group of c channels
    alone; output in x's dtype, channels-last. Two Triton kernels: the forward, and a backward
    recomputing everything from the input (the only tensor saved); fp32 arithmetic for fp32, bf16
    and fp16 in and out (float64 for float64); the window sum over channels is a product with a band matrix
    built in registers. Runs on CPU under Triton's interpreter (TRITON_INTERPRET=1): the tests."""
    return _FusedLRN.apply(x, size, alpha, beta, k, groups)


# ---------------------------------------------------------------- max pool without indices

class _MaxPoolSame(torch.autograd.Function):
    """3x3/2 max pool, TF 'SAME' (the last window clipped at the edge), saving input and output
    instead of int64 indices. The backward sends each window's gradient to every position equal to
    the window's maximum: the same as PyTorch's (first maximum) wherever the maximum is unique, and
    in the network, where ties are the zeros of a ReLU, the same after the ReLU's backward."""

    @staticmethod
    def forward(ctx, x):
        y = F.max_pool2d(x, 3, 2, ceil_mode=True)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        h, w = x.shape[-2:]
        # each input position (i, j) lies in the windows (a, b) with 2a <= i <= 2a + 2: pad the
        # input to the windows' extent, then visit the 9 offsets of a window
        xp = F.pad(x, (0, 2 * y.shape[-1] + 1 - w, 0, 2 * y.shape[-2] + 1 - h), value=float("-inf"))
        dx = torch.zeros_like(xp)
        for di in range(3):
            for dj in range(3):
                sl = (..., slice(di, di + 2 * y.shape[-2], 2), slice(dj, dj + 2 * y.shape[-1], 2))
                dx[sl] += g * (xp[sl] == y)
        return dx[..., :h, :w]


def max_pool_same(x: torch.Tensor) -> torch.Tensor:
    return _MaxPoolSame.apply(x)


# ---------------------------------------------------------------- runs stacked along the batch

def batch_stacked_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int,
                       padding: int) -> torch.Tensor:
    """G runs stacked along the batch: x (G*B, C, H, W), weight (G*O, C, k, k) as conv2d(groups=G)
    holds it; each run's slice of the batch convolved with its own dense weights (on a GPU, one
    dense kernel per run, e.g. on its own stream). Returns (G*B, O, H', W')."""
    xs, ws = x.chunk(groups), weight.chunk(groups)
    bs = bias.chunk(groups) if bias is not None else [None] * groups
    return torch.cat([F.conv2d(a, w, b, padding=padding) for a, w, b in zip(xs, ws, bs)])


def linear_weight_layout(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor:
    """G linear layers on (G, B, in), weight (G*out, in) and bias (G*out,) as model.Linear holds
    them, computed as (w @ x^T)^T: autograd then forms each weight's gradient as g^T @ x, (G, out,
    in), the weight's own layout, where model.Linear's x @ w^T forms x^T @ g, (G, in, out), and
    copies it transposed into .grad every step. The output is a transposed view (G, B, out)."""
    w = weight.view(groups, -1, x.shape[-1])
    return torch.baddbmm(bias.view(groups, -1, 1), w, x.transpose(1, 2)).transpose(1, 2)


# ---------------------------------------------------------------- the network in this layout

class BatchStackedNet(Net):
    """model.Net with its G runs stacked along the batch: input (G, B, 3, H, W) as (G*B, 3, H, W),
    each run's slice convolved with its own dense kernels, then the fused LRN, the index-free pool
    and ReLU over the whole batch without groups, the fully connected layers by
    linear_weight_layout. Same parameters (run-major, named as Net's), run_state, load_run and
    decayed parameters as model.Net; output (G, B, 10)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, b = x.shape[:2]
        lrn_args = dict(size=self.lrn.size, alpha=self.lrn.alpha, beta=self.lrn.beta, k=self.lrn.k)
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        x = batch_stacked_conv(x, self.conv1.weight, self.conv1.bias, g, padding=2)
        x = lrn(F.relu(max_pool_same(x)), **lrn_args)  # Net.forward's order: pool, relu, LRN
        x = batch_stacked_conv(x, self.conv2.weight, self.conv2.bias, g, padding=2)
        x = max_pool_same(lrn(F.relu(x), **lrn_args))
        x = x.unflatten(0, (g, b)).flatten(2)  # (G, B, 64*8*8) in Net's (channel, row, column) order
        for fc in (self.fc1, self.fc2):
            x = F.relu(linear_weight_layout(x, fc.weight, fc.bias, g))
        return linear_weight_layout(x, self.out.weight, self.out.bias, g)
