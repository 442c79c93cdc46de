"""The probe of training-step variants on a GPU: each checked (iqals.train.check_step) and timed.

A variant is {"group": G} and the train.* values it sets: "precision" (fp32|tf32|bf16), "step"
(eager|compile|graph), optionally "layout" ("batch": runs stacked along the batch, the kernels of
iqals/fused.py) and "cudnn_benchmark" (True: cuDNN's autotuner on). It times the training step
itself (iqals.train.Step) on synthetic resident data: there is no second training path here.
`make bench` on a GPU runs it (bench/bench_group.py) and reports the fastest variant that passed:
the values to give train.precision, train.step, train.layout and train.cudnn_benchmark.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import types

import torch

from . import train
from .params import REFERENCE_STEP, TRAIN_LAYOUTS, Params, off_reference

log = logging.getLogger(__name__)

# The reference first, then the likeliest winners on an H100 (the probe may run out of time),
# each at 1 run (DVC's path with one seed), 3 (one strategy's seeds), 17 and 51 (the 17 x 3 study
# in groups). compile is last: its compilation takes tens of seconds per group size.
GROUPS = (1, 3, 17, 51)
_CANDIDATES = (
    {"precision": "bf16", "step": "graph", "layout": "batch", "cudnn_benchmark": True},
    {"precision": "bf16", "step": "graph"},
    {"precision": "bf16", "step": "graph", "cudnn_benchmark": True},
    {"precision": "tf32", "step": "graph"},
    {"precision": "tf32", "step": "graph", "layout": "batch", "cudnn_benchmark": True},
    {"precision": "fp32", "step": "graph"},
    {"precision": "tf32", "step": "eager"},
    {"precision": "tf32", "step": "compile"},
)
VARIANTS = ({**REFERENCE_STEP, "group": 1},   # the reference step, and the fallback
            {**REFERENCE_STEP, "group": 3},   # what the CPU can run besides
            *({**c, "group": g} for c in _CANDIDATES for g in GROUPS))
TRAIN_KEYS = ("precision", "step", "layout", "cudnn_benchmark")  # what a variant sets in train.*
DEFAULTS = {"layout": REFERENCE_STEP["layout"], "cudnn_benchmark": False}  # a variant's values where it names none
BASELINE = {"precision": "bf16", "step": "graph", "group": 51}  # the step results/gpu_e16 trained with
IMAGES = {"cuda": 5_000, "cpu": 400}  # synthetic training set per run (50 or 4 steps an epoch)


def config(p: Params, v: dict):
    """params' train section with the variant's values."""
    if {**DEFAULTS, **v}["layout"] not in TRAIN_LAYOUTS:
        raise ValueError(f"variant layout {v['layout']!r}: expected one of {TRAIN_LAYOUTS}")
    return dataclasses.replace(p.train, **{**DEFAULTS, **{k: v[k] for k in TRAIN_KEYS if k in v}})


def name(v: dict) -> str:
    """e.g. 'bf16 graph x17, batch layout, cudnn benchmark'."""
    return train.describe(types.SimpleNamespace(**{**DEFAULTS, **v}), v["group"])


BASELINE_NAME = f"{name(BASELINE)}, {DEFAULTS['layout']}"  # name() leaves the default layout unsaid


def needs_gpu(v: dict) -> bool:
    """Off CUDA only the fp32 eager step of model.Net runs (the fused kernels need a GPU, or
    Triton's interpreter, which the tests use)."""
    return bool(off_reference({**DEFAULTS, **v}))


def _warm_step(p: Params, device: torch.device, v: dict, cfg, seed: int):
    """Images per run and a function running one epoch of the variant's step on synthetic data
    (smaller lr: sane weights), after one warm-up epoch (compilation, capture)."""
    n = IMAGES[device.type] // cfg.batch_size * cfg.batch_size
    data, copy, image = train.synthetic(v["group"], n, device, seed=seed)
    step = train.Step(train.stacked(p, list(range(v["group"])), device, cfg.layout), data, cfg, device)
    step.epoch(copy, image, cfg.lr)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n, lambda: step.epoch(copy, image, cfg.lr * 0.1)


def check(p: Params, device: torch.device, v: dict) -> dict:
    return train.check_step(p, device, config(p, v), v["group"])


def time_variant(p: Params, device: torch.device, v: dict, seconds: float) -> dict:
    """Images/s summed over the group's runs: whole epochs after one warm-up epoch (compilation,
    capture), until `seconds` have passed (at least one epoch)."""
    cfg, t0 = config(p, v), time.perf_counter()
    n, epoch = _warm_step(p, device, v, cfg, seed=2)
    warm_up, epochs, t0 = time.perf_counter() - t0, 0, time.perf_counter()
    while epochs == 0 or time.perf_counter() - t0 < seconds:
        epoch()[0].sum().item()  # a real epoch's sync
        epochs += 1
    elapsed = time.perf_counter() - t0
    return {"images_per_s": v["group"] * n * epochs / elapsed,
            "step_ms": 1000 * elapsed / (epochs * n // cfg.batch_size),
            "epochs_timed": epochs, "images_per_epoch": n, "warm_up_s": warm_up}


def probe(p: Params, device: torch.device, seconds: float, variants=VARIANTS) -> list[dict]:
    """Check and time each variant within about `seconds` in all (half of each share timing);
    variants the device cannot run, or reached after the time is up, are "skipped", failures
    "error". Each result is the variant with ok, images_per_s and its check."""
    device = torch.device(device)
    runnable = [v for v in variants if device.type == "cuda" or not needs_gpu(v)]
    share, deadline = seconds / max(1, len(runnable)) / 2, time.perf_counter() + seconds
    results = []
    for v in variants:
        r = dict(v, ok=False)
        if v not in runnable:
            r["skipped"] = f"needs a GPU (CUDA); the probe runs on {device}"
        elif time.perf_counter() > deadline:
            r["skipped"] = f"the probe's {seconds:g} s were used up"
        else:
            try:
                r["check"] = check(p, device, v)
                r.update(time_variant(p, device, v, share), ok=r["check"]["ok"])
            except Exception as e:  # noqa: BLE001 - a variant that fails is reported, not fatal
                r["error"] = f"{type(e).__name__}: {e}"
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        log.info("variant %s: %s", name(v), r.get("skipped") or r.get("error") or f"{r['images_per_s']:.0f} img/s, "
                 f"check {'passed' if r['ok'] else 'FAILED'} (grad rel diff {r['check']['gradients_rel']:.1e})")
        results.append(r)
    return results


def choose(results: list[dict]) -> dict | None:
    """The fastest variant whose check passed (images/s summed over runs), or None."""
    passed = [r for r in results if r.get("ok") and "images_per_s" in r]
    return max(passed, key=lambda r: r["images_per_s"], default=None)


def profile(p: Params, device: torch.device, v: dict, epochs: int = 2, rows: int = 15) -> str:
    """torch.profiler's table of the variant's top kernels by device time (CPU time off CUDA), over
    `epochs` epochs of synthetic data after one warm-up epoch."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    device = torch.device(device)
    cuda = device.type == "cuda"
    n, epoch = _warm_step(p, device, v, config(p, v), seed=3)
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(epochs):
            epoch()
        if cuda:
            torch.cuda.synchronize(device)
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=rows)
    return f"{name(v)}: {epochs} epochs of {n} images per run\n" + table

