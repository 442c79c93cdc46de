"""The GPU step's candidate pieces (iqals/fused.py) against the layers they would replace, at
1, 3, 17 and 51 runs stacked: forward + backward time of each, and the largest difference of
their outputs and input gradients from the fp32 reference layer on the same input.

- lrn: iqals.model.LocalResponseNorm (grouped band-matrix product) vs fused.lrn (Triton), on
  conv1's pooled output (B, 64 G, 16, 16) in the dtype given (bf16 is the study's GPU step);
- pool: F.max_pool2d with indices vs fused.max_pool_same, on (B, 64 G, 32, 32);
- conv2: conv2d(groups=G) over runs stacked along the channels vs fused.batch_stacked_conv over
  runs stacked along the batch, (B, 64 G, 16, 16) -> 64 G channels, 5x5.

    PYTHONPATH=. python -m bench.bench_fused --device cuda [--dtype bf16] [--groups 1,3,17,51]
    TRITON_INTERPRET=1 PYTHONPATH=. python -m bench.bench_fused --device cpu --quick   (a CPU smoke run)
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from iqals import fused, model

LRN = dict(size=9, alpha=1e-3, beta=0.75, k=1.0)  # params.yaml's model.lrn_*


def _time(fn, sync, seconds: float) -> float:
    fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync()
    return (time.perf_counter() - t0) / n * 1e3  # ms per call


def _fwd_bwd(layer, x, g):
    x = x.detach().requires_grad_()
    y = layer(x)
    (dx,) = torch.autograd.grad(y, x, g)
    return y, dx


def _diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def main(device: str = "cuda", dtype: str = "bf16", groups: tuple[int, ...] = (1, 3, 17, 51), batch: int = 100,
         seconds: float = 1.0, quick: bool = False) -> dict:
    dev = torch.device(device)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if quick:
        groups, batch, seconds = (1, 3), 2, 0.05
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": dtype, "rows": []}
    for gsz in groups:
        torch.manual_seed(gsz)
        x = torch.randn(batch, 64 * gsz, 16, 16, device=dev).relu().to(dt).contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(x)
        ref = model.LocalResponseNorm(**LRN, groups=gsz)
        y0, d0 = _fwd_bwd(ref, x.float(), g.float())  # the fp32 reference
        cases = {"lrn": (lambda t: ref(t), lambda t: fused.lrn(t, **LRN, groups=gsz), x, g, y0, d0)}
        xp = torch.randn(batch, 64 * gsz, 32, 32, device=dev).to(dt).contiguous(memory_format=torch.channels_last)
        gp = torch.randn(batch, 64 * gsz, 16, 16, device=dev).to(dt)
        yp, dp = _fwd_bwd(model._pool_same, xp.float(), gp.float())
        cases["pool"] = (model._pool_same, fused.max_pool_same, xp, gp, yp, dp)
        w = (0.05 * torch.randn(64 * gsz, 64, 5, 5, device=dev)).to(dt)
        xc = torch.randn(gsz * batch, 64, 16, 16, device=dev).to(dt)
        chan = xc.view(gsz, batch, 64, 16, 16).transpose(0, 1).reshape(batch, gsz * 64, 16, 16)
        grouped = lambda t: F.conv2d(t, w, padding=2, groups=gsz)  # noqa: E731
        stacked = lambda t: fused.batch_stacked_conv(t, w, None, gsz, 2)  # noqa: E731
        for name, (old, new, xin, gin, yref, dref) in cases.items():
            y1, d1 = _fwd_bwd(new, xin, gin)
            row = {"piece": name, "runs": gsz,
                   "old_ms": round(_time(lambda: _fwd_bwd(old, xin, gin), sync, seconds), 3),
                   "new_ms": round(_time(lambda: _fwd_bwd(new, xin, gin), sync, seconds), 3),
                   "out_rel_diff": _diff(y1, yref), "grad_rel_diff": _diff(d1, dref)}
            row["speedup"] = round(row["old_ms"] / row["new_ms"], 2)
            out["rows"].append(row)
        yc = stacked(xc)
        want = grouped(chan).view(batch, gsz, 64, 16, 16).transpose(0, 1).reshape(gsz * batch, 64, 16, 16)
        out["rows"].append({"piece": "conv2 forward", "runs": gsz,
                            "old_ms": round(_time(lambda: grouped(chan), sync, seconds), 3),
                            "new_ms": round(_time(lambda: stacked(xc), sync, seconds), 3),
                            "out_rel_diff": _diff(yc, want), "grad_rel_diff": None})
        out["rows"][-1]["speedup"] = round(out["rows"][-1]["old_ms"] / out["rows"][-1]["new_ms"], 2)
        for r in out["rows"][-len(cases) - 1:]:
            print(r, flush=True)
    return out


if __name__ == "__main__":
    from bench import cli
    cli.run(main, __doc__)
