"""iqals.fused, the GPU step's candidate pieces, against the layers they would replace: on CPU,
the Triton kernels under Triton's interpreter."""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from iqals import model
from tests.conftest import close


@pytest.fixture(scope="module")
def fused():
    """iqals.fused with its kernels built for Triton's interpreter (read when they are defined and
    when they run: set for this module's tests only)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import iqals.fused as mod
        yield importlib.reload(mod)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old


LRN = dict(size=9, alpha=1e-3, beta=0.75, k=1.0)  # params.yaml's model.lrn_*


@pytest.mark.parametrize("groups", [1, 2])
def test_fused_lrn_values_and_gradients_match_the_current_lrn(fused, groups):
    torch.manual_seed(0)
    x = (3 * torch.randn(2, 64 * groups, 3, 5)).relu().requires_grad_()  # ReLU outputs, as in the network
    g = torch.randn(2, 64 * groups, 3, 5)
    ref = model.LocalResponseNorm(LRN["size"], LRN["alpha"], LRN["beta"], LRN["k"], groups=groups)
    want = ref(x)
    (want_dx,) = torch.autograd.grad(want, x, g)
    got = fused.lrn(x, **LRN, groups=groups)
    (got_dx,) = torch.autograd.grad(got, x, g)
    # fp32 both: a window sum of 9 squares and one pow; the gradient sums 9 more terms
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(got, want, rtol=16 * eps, atol=16 * eps * want.abs().max().item())
    torch.testing.assert_close(got_dx, want_dx, rtol=0, atol=64 * eps * want_dx.abs().max().item())
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_fused_lrn_gradcheck_float64(fused):
    torch.manual_seed(1)
    x = torch.rand(1, 32, 2, 2, dtype=torch.float64, requires_grad=True) * 4
    assert torch.autograd.gradcheck(lambda t: fused.lrn(t, 5, 0.5, 0.75, 1.0), (x,), eps=1e-6, atol=1e-8)


def test_fused_lrn_even_window_matches_torchs_local_response_norm_per_group(fused):
    """An even size has an asymmetric window [i - size//2, i + (size-1)//2] and a band matrix that is
    not symmetric (the backward needs its transpose); a strong alpha makes the window's terms count,
    beta and k other than the network's. Reference: torch.nn.LocalResponseNorm on each group alone."""
    torch.manual_seed(7)
    size, alpha, beta, k = 4, 0.5, 0.6, 2.0
    x = (4 * torch.rand(2, 2 * 16, 3, 5, dtype=torch.float64)).requires_grad_()
    g = torch.randn(2, 2 * 16, 3, 5, dtype=torch.float64)
    ref = torch.nn.LocalResponseNorm(size, alpha, beta, k)
    want = torch.cat([ref(half) for half in x.split(16, dim=1)], dim=1)
    (want_dx,) = torch.autograd.grad(want, x, g)
    got = fused.lrn(x, size, alpha, beta, k, groups=2)
    (got_dx,) = torch.autograd.grad(got, x, g)
    close(got, want, size)  # float64 both: a window sum of `size` squares and one power
    close(got_dx, want_dx, 2 * size)  # and the backward's sum over the windows holding each channel


def test_fused_lrn_keeps_bf16_in_and_out(fused):
    x = torch.randn(1, 64, 2, 2).relu().bfloat16().requires_grad_()
    y = fused.lrn(x, **LRN)
    y.sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16
    xf = x.detach().float().requires_grad_()  # the same values: bf16 -> fp32 is exact
    want = model.LocalResponseNorm(LRN["size"], LRN["alpha"], LRN["beta"], LRN["k"])(xf)
    want.sum().backward()
    # fp32 arithmetic inside, one rounding to bf16 at the end: within bf16's half ulp (2^-8, doubled
    # for the fp32 sums' order), of each value or, where the backward's two terms cancel, of the largest
    for got, ref in ((y, want), (x.grad, xf.grad)):
        torch.testing.assert_close(got.float(), ref.detach(), rtol=2**-7, atol=2**-7 * ref.abs().max().item())


def test_fused_lrn_rejects_channel_counts_it_cannot_tile(fused):
    with pytest.raises(ValueError, match="power of two >= 16 channels per group, got 24"):
        fused.lrn(torch.rand(1, 48, 2, 2), **LRN, groups=2)
    with pytest.raises(ValueError, match="power of two >= 16 channels per group, got 8"):  # tl.dot's 16 rows
        fused.lrn(torch.rand(1, 16, 2, 2), **LRN, groups=2)
    with pytest.raises(ValueError, match="48 channels do not split into 5 groups"):
        fused.lrn(torch.rand(1, 48, 2, 2), **LRN, groups=5)


def close_sums(got, want):
    """Equal but for the order of summing: a position takes the gradient of at most 4 windows."""
    torch.testing.assert_close(got, want, rtol=0, atol=4 * torch.finfo(want.dtype).eps * want.abs().max().item())


def test_max_pool_without_indices_matches_max_pool2d(fused):
    torch.manual_seed(2)
    for h in (32, 16, 8):  # the network's sizes: the last window clipped at the edge
        x = torch.randn(2, 3, h, h, dtype=torch.float64, requires_grad=True)  # no ties
        g = torch.randn(2, 3, h // 2, h // 2, dtype=torch.float64)
        want = model.pool_same(x)
        (want_dx,) = torch.autograd.grad(want, x, g)
        got = fused.max_pool_same(x)
        (got_dx,) = torch.autograd.grad(got, x, g)
        assert torch.equal(got, want)
        close_sums(got_dx, want_dx)


def test_max_pool_ties_at_relu_zeros_give_the_same_gradient_after_the_relu(fused):
    torch.manual_seed(3)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    z.data[:, :, :4, :4] = -1.0  # whole windows of zeros after the ReLU
    g = torch.randn(2, 4, 4, 4)
    (want,) = torch.autograd.grad(model.pool_same(z.relu()), z, g)
    (got,) = torch.autograd.grad(fused.max_pool_same(z.relu()), z, g)
    close_sums(got, want)
    u = z.relu().detach().requires_grad_()  # the premise: the tied zeros do get a gradient from the pool,
    (du,) = torch.autograd.grad(model.pool_same(u), u, g)  # and only the ReLU's backward removes it
    assert du[:, :, :4, :4].abs().sum() > 0


def test_batch_stacked_convolution_equals_grouped_conv2d(fused):
    torch.manual_seed(4)
    runs, b = 3, 4
    x = torch.randn(runs, b, 8, 6, 6)  # each run's own batch
    w = torch.randn(runs * 5, 8, 5, 5)
    for bias, pad in ((torch.randn(runs * 5), 2), (None, 1)):  # the network's convolutions; no bias, other padding
        size = 6 + 2 * pad - 4
        channels = F.conv2d(x.permute(1, 0, 2, 3, 4).reshape(b, runs * 8, 6, 6), w, bias, padding=pad, groups=runs)
        got = fused.batch_stacked_conv(x.reshape(runs * b, 8, 6, 6), w, bias, runs, padding=pad)
        want = channels.view(b, runs, 5, size, size).transpose(0, 1).reshape(runs * b, 5, size, size)
        # the same dot products, in whatever order each kernel sums 8 x 25 terms
        eps = torch.finfo(torch.float32).eps
        torch.testing.assert_close(got, want, rtol=0, atol=200 * eps * want.abs().max().item())


class _Ops(TorchDispatchMode):
    """The aten operators run inside the block, with their outputs' shapes."""

    def __enter__(self):
        self.ops = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.__name__, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


def test_linear_in_the_weights_layout_gives_model_linears_values_and_no_transposed_gradient_copy(fused):
    torch.manual_seed(6)
    runs, b, n_in, n_out = 3, 5, 7, 4
    lin = model.Linear(runs, n_in, n_out)
    x = torch.randn(runs, b, n_in)
    g = torch.randn(runs, b, n_out)
    copies = {}
    for name, f in (("model", lin), ("fused", lambda t: fused.linear_weight_layout(t, lin.weight, lin.bias, runs))):
        lin.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = f(xi)
        with _Ops() as ops:
            y.backward(g)
        copies[name] = [op for op, shape in ops.ops
                        if op.startswith(("clone", "copy")) and shape == (runs, n_out, n_in)]
        if name == "model":
            want, want_dx, want_dw, want_db = y.detach(), xi.grad, lin.weight.grad, lin.bias.grad
    eps = torch.finfo(torch.float32).eps  # the same dot products of n_in (or b) terms, maybe in another order
    torch.testing.assert_close(y, want, rtol=0, atol=4 * n_in * eps * want.abs().max().item())
    torch.testing.assert_close(xi.grad, want_dx, rtol=0, atol=4 * n_out * eps * want_dx.abs().max().item())
    torch.testing.assert_close(lin.weight.grad, want_dw, rtol=0, atol=4 * b * eps * want_dw.abs().max().item())
    torch.testing.assert_close(lin.bias.grad, want_db, rtol=0, atol=4 * b * eps * want_db.abs().max().item())
    # model.Linear copies its (G, in, out) gradient transposed
    assert copies == {"model": ["clone.default"], "fused": []}


def test_batch_stacked_net_gives_the_grouped_nets_logits_and_gradients(fused, params):
    from iqals.seeds import derive_seed
    from iqals.train import run_losses
    torch.manual_seed(5)
    runs, b = 2, 6
    nets = [model.build(params.model, derive_seed(s, "init")) for s in range(runs)]
    ref, got = model.Net.stack(nets), fused.BatchStackedNet.stack(nets)
    assert [k for k, _ in got.named_parameters()] == [k for k, _ in ref.named_parameters()]
    x = model.standardize(torch.randint(0, 256, (runs * b, 3, 32, 32), dtype=torch.uint8)).unflatten(0, (runs, b))
    q = torch.softmax(torch.randn(runs, b, 10), -1)
    want, out = ref(x), got(x)
    run_losses(want, q, "squared").sum().backward()
    run_losses(out, q, "squared").sum().backward()
    terms = b * 32 * 32  # the same sums in other kernels and orders; the longest: conv1's weight gradients
    close(out, want, terms)
    for (k, w), (_, v) in zip(ref.named_parameters(), got.named_parameters()):
        close(v.grad, w.grad, terms, k)
    # each run's slice is its own: run 1's gradients do not move when run 0's images change
    got.zero_grad()
    x2 = x.clone()
    x2[0] = x2[0].flip(-1)
    run_losses(got(x2), q, "squared").sum().backward()
    close(got.conv2.weight.grad.unflatten(0, (runs, -1))[1],
          dict(ref.named_parameters())["conv2.weight"].grad.unflatten(0, (runs, -1))[1], terms)


def test_check_of_the_batch_layout_passes_against_the_cpu_reference(fused, raw_params):
    from iqals import params as params_lib, probe
    raw_params["train"].update(batch_size=10)  # the interpreter runs each Triton program in Python
    p = params_lib.parse(raw_params)
    r = probe.check(p, torch.device("cpu"), {"precision": "fp32", "step": "eager", "group": 2, "layout": "batch"})
    assert r["ok"] and r["group"] == 2 and r["layout"] == "batch", r  # the variant's layout was the one checked
    assert r["logits_rel"] < 1e-5 and r["loss_rel"] < 1e-5
