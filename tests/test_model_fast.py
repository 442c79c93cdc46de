"""The network's fast layers against the stock PyTorch ops they replace, in value and gradient.

iqals/model.py computes the LRN with a band matrix over channels and a hand-written backward,
pools with ceil_mode instead of padding with -inf, pools before the first relu, and runs on
channels-last memory. None of it may change the numbers beyond float rounding.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from iqals import model
from tests.conftest import close

CL = torch.channels_last


def _value_and_grad(f, x, g):
    x = x.detach().requires_grad_()
    y = f(x)
    (dx,) = torch.autograd.grad(y, x, g)
    return y.detach(), dx


def _reference_pool(x):
    """The definition: TF SAME 3x3/2, one -inf row and column padded at the end."""
    return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), kernel_size=3, stride=2)


@pytest.mark.parametrize("size,alpha,beta,k", [(9, 1e-3, 0.75, 1.0), (4, 0.3, 0.5, 2.0),
                                               (5, 2.0, 0.9, 0.5), (1, 0.1, 0.75, 1.0)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_lrn_equals_stock_in_value_and_gradient_float64(size, alpha, beta, k, layout):
    torch.manual_seed(size)
    x = torch.relu(torch.randn(3, 16, 5, 6, dtype=torch.float64)) * 3
    x[0, :, 0, 0] = 0  # a zero column: the relu'd inputs the network feeds it
    g = torch.randn_like(x)
    if layout == "channels_last":
        x, g = x.contiguous(memory_format=CL), g.contiguous(memory_format=CL)
    ours = model.LocalResponseNorm(size, alpha, beta, k)
    stock = nn.LocalResponseNorm(size, alpha, beta, k)
    y, dx = _value_and_grad(ours, x, g)
    y_ref, dx_ref = _value_and_grad(stock, x, g)
    close(y, y_ref, size)  # sums over the window of `size` channels
    close(dx, dx_ref, size)
    assert y.is_contiguous(memory_format=CL if layout == "channels_last" else torch.contiguous_format)


def test_lrn_gradcheck():
    x = (torch.rand(2, 12, 3, 3, dtype=torch.float64) * 4).requires_grad_()
    lrn = model.LocalResponseNorm(9, 0.5, 0.75, 1.0)
    assert torch.autograd.gradcheck(lrn, (x,))
    assert torch.autograd.gradcheck(lrn, (x.detach().contiguous(memory_format=CL).requires_grad_(),))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_lrn_equals_stock_float32_at_network_scale(params, layout):
    """The network's LRN on conv-like activations (64 channels, 16 x 16), float32."""
    m = params.model
    torch.manual_seed(1)
    x = torch.relu(torch.randn(8, 64, 16, 16)) * 4
    g = torch.randn_like(x)
    if layout == "channels_last":
        x, g = x.contiguous(memory_format=CL), g.contiguous(memory_format=CL)
    y, dx = _value_and_grad(model.LocalResponseNorm(m.lrn_size, m.lrn_alpha, m.lrn_beta, m.lrn_k), x, g)
    y_ref, dx_ref = _value_and_grad(nn.LocalResponseNorm(m.lrn_size, m.lrn_alpha, m.lrn_beta, m.lrn_k), x, g)
    close(y, y_ref, m.lrn_size)
    close(dx, dx_ref, m.lrn_size)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_grouped_lrn_normalises_each_group_alone_float64(layout):
    """groups=3 over 3 x 8 channels == the stock LRN on each block of 8 (model.Net's runs)."""
    torch.manual_seed(2)
    x = torch.relu(torch.randn(2, 24, 5, 6, dtype=torch.float64)) * 3
    g = torch.randn_like(x)
    if layout == "channels_last":
        x, g = x.contiguous(memory_format=CL), g.contiguous(memory_format=CL)
    y, dx = _value_and_grad(model.LocalResponseNorm(5, 0.3, 0.75, 1.0, groups=3), x, g)
    stock = nn.LocalResponseNorm(5, 0.3, 0.75, 1.0)
    for k in range(3):
        blk = slice(8 * k, 8 * k + 8)
        y_ref, dx_ref = _value_and_grad(stock, x[:, blk], g[:, blk])
        close(y[:, blk], y_ref, 5)
        close(dx[:, blk], dx_ref, 5)


def test_lrn_under_bf16_autocast_runs_in_float32():
    """Under autocast the LRN takes its bf16 input to fp32 and runs there, forward and backward
    (CUDA's autocast ran pow in fp32 and the band product in bf16, then the backward mixed them)."""
    torch.manual_seed(3)
    x = (torch.relu(torch.randn(4, 16, 6, 6)) * 3).bfloat16().contiguous(memory_format=CL)
    g = torch.randn(4, 16, 6, 6)
    lrn = model.LocalResponseNorm(9, 1e-3, 0.75, 1.0, groups=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, dx = _value_and_grad(lrn, x, g)
    y_ref, dx_ref = _value_and_grad(lrn, x.float(), g)
    assert y.dtype == torch.float32 and dx.dtype == torch.bfloat16  # the gradient of a bf16 input
    close(y, y_ref, 9)
    # the gradient rounded to bf16: within one bf16 unit (a value near a rounding midpoint may
    # go either way after fp32 rounding), plus that fp32 rounding for values near zero
    close(dx.float(), dx_ref, 9, rtol=torch.finfo(torch.bfloat16).eps)


@pytest.mark.parametrize("hw", [(32, 32), (16, 16), (8, 8), (7, 9), (5, 4)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_pool_same_equals_minus_inf_padding_in_value_and_gradient(hw, layout):
    torch.manual_seed(0)
    x = torch.randn(2, 4, *hw, dtype=torch.float64)
    x[:, :, :3, :3] = 5.0  # a window tied at its maximum (randn stays below 5 here): both must
    x[:, :, -2:, -2:] = 5.0  # route the gradient to the same (first) one; and the last, clipped window
    assert _near_tie(x, 1)  # the premise: ties in windows
    g = torch.randn_like(_reference_pool(x))
    if layout == "channels_last":
        x, g = x.contiguous(memory_format=CL), g.contiguous(memory_format=CL)
    y, dx = _value_and_grad(model.pool_same, x, g)
    y_ref, dx_ref = _value_and_grad(_reference_pool, x, g)
    assert torch.equal(y, y_ref)
    assert torch.equal(dx, dx_ref)


def test_standardize_equals_two_pass_formula():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    x[3] = 200
    f = x.float()
    n = f[0].numel()
    want = (f - f.mean((1, 2, 3), keepdim=True)) / f.std((1, 2, 3), keepdim=True, correction=0).clamp_min(n ** -0.5)
    close(model.standardize(x), want, n)  # mean and variance: sums over the image's n values
    before = f.clone()
    model.standardize(f)  # a float input is not modified in place
    assert torch.equal(f, before)


class StockNet(model.Net):
    """Table 1 written with the stock ops in the stock order: the definition the fast path must meet."""

    def __init__(self, *a):
        super().__init__(1, *a)
        self.lrn = nn.LocalResponseNorm(*a)

    def forward(self, x):
        self.pooled = [F.relu(self.conv1(x))]  # the two pools' inputs
        x = self.lrn(_reference_pool(self.pooled[0]))
        self.pooled.append(self.lrn(F.relu(self.conv2(x))))
        x = _reference_pool(self.pooled[1])
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def _near_tie(t: torch.Tensor, terms: int) -> bool:
    """Does a pool window with a positive maximum hold its two largest values within fp32 rounding
    of `terms`-term sums (close()'s bound, for each of the two)? There two paths may route the
    gradient apart (in windows of ReLU zeros too, harmlessly: the ReLU's backward zeroes both)."""
    w = F.unfold(F.pad(t, (0, 1, 0, 1), value=float("-inf")).flatten(0, 1)[:, None], 3, stride=2)
    top = w.topk(2, dim=1).values
    bound = 2 * 8 * torch.finfo(torch.float32).eps * terms ** 0.5 * t.abs().max()
    return bool(((top[:, 0] > 0) & (top[:, 0] - top[:, 1] <= bound)).any())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_network_equals_stock_network_in_logits_and_every_gradient(params, dtype):
    m = params.model
    ours = model.build(m, seed=3).to(dtype)
    stock = StockNet(m.lrn_size, m.lrn_alpha, m.lrn_beta, m.lrn_k).to(dtype)
    stock.load_state_dict(ours.state_dict())
    x = model.standardize(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)).to(dtype)
    q = torch.softmax(torch.randn(6, 10, dtype=dtype), 1)
    losses = []
    for net in (ours, stock):
        logits = net(x)
        loss = ((logits.softmax(1) - q) ** 2).sum(1).mean()
        loss.backward()
        losses.append((logits.detach(), loss.detach()))
    close(losses[0][0], losses[1][0], 5 * 5 * 64)  # conv2's sums
    close(losses[0][1], losses[1][1], 5 * 5 * 64)
    # In fp32 the two paths' pool inputs differ by rounding, and nearly every batch has a window
    # whose two largest inputs lie that close (_near_tie: 198 of 200 seeded one-image batches, all
    # 200 of two or more): the pools may route the gradient to different ones, changing every
    # gradient below them. So the convolutions' gradients are compared in float64 (where the pools
    # agree), the layers after the last pool in both precisions.
    below_pools = ("conv1", "conv2")
    for (name, a), b in zip(ours.named_parameters(), stock.parameters()):
        if dtype == torch.float64 or not name.startswith(below_pools):
            close(a.grad, b.grad, 6 * 32 * 32, name)  # conv1's weight gradient: batch x 32 x 32


def test_state_dict_is_unchanged_by_the_fast_layers(params):
    """Checkpoints and saved models keep their keys: the band matrix is not a buffer."""
    keys = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias",
            "fc2.weight", "fc2.bias", "out.weight", "out.bias"]
    net = model.build(params.model, seed=0)
    net(torch.zeros(1, 3, 32, 32))
    assert list(net.state_dict()) == keys
    assert isinstance(net.lrn, nn.LocalResponseNorm)
