"""Training-step variants for a GPU: which (precision, step, group size) to run, checked and timed.

- `smoke_check`: a few steps of a variant on the device against the same steps in fp32 on the
  CPU, from the same weights and batches; the reference is the plain one-network loop
  (`reference_epoch`: Net, not GroupNet), so stacking is checked too.
- `probe`: images/s summed over runs for each variant on synthetic resident data, with its check.
- `choose`: the fastest variant that passed.

A variant is a dict {"precision": fp32|tf32|bf16, "step": eager|compile|graph, "group": G}: G
runs stepped together as one GroupNet (iqals/stacked.py), each with batch train.batch_size.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch

from . import model as model_lib
from . import stacked
from . import steps as steps_lib
from . import train as train_lib
from .mixture import soft_targets
from .params import NUM_CLASSES, NUM_COPIES, Params
from .seeds import derive_seed

log = logging.getLogger(__name__)

# Candidates, the likeliest winners on an H100 first (the probe may run out of time). A study of
# 17 strategies x 3 seeds is 51 runs: groups of 3, 17 or 51 divide it. compile is last: its
# compilation alone takes tens of seconds per group size.
VARIANTS = (
    {"precision": "fp32", "step": "eager", "group": 1},   # the reference step, and the fallback
    {"precision": "fp32", "step": "eager", "group": 3},   # what the CPU can run besides
    {"precision": "tf32", "step": "graph", "group": 17},
    {"precision": "bf16", "step": "graph", "group": 17},
    {"precision": "tf32", "step": "graph", "group": 51},
    {"precision": "bf16", "step": "graph", "group": 51},
    {"precision": "fp32", "step": "graph", "group": 17},
    {"precision": "tf32", "step": "eager", "group": 17},
    {"precision": "tf32", "step": "graph", "group": 3},
    {"precision": "tf32", "step": "compile", "group": 17},
)

# Largest relative difference ||device - cpu|| / ||cpu|| allowed after SMOKE_STEPS steps, per
# precision, for the last step's logits, the summed losses, the last step's gradients and the
# weight updates (weights after - before). The smoke check is there to catch a broken GPU step (a
# stale buffer, a wrong batch or target, a missed update): that gives O(1) differences (a batch
# off by one: ~1.4). Rounding gives far less, but gradients of this network are sensitive: a
# 3x3 max pool whose two largest inputs are within rounding routes the gradient to the other
# one, and the squared loss's gradient (softmax - target) cancels. Measured on the CPU
# (random images, 3 steps): fp32 grouped vs single kernels, logits 5e-7, gradients and updates
# up to 4e-3 after such flips; bf16 autocast vs fp32, logits 4.5e-3, loss 7e-6, gradients up to
# 0.14 (conv1) and 0.04-0.08 elsewhere. tf32 keeps 3 mantissa bits more than bf16 (about 8x
# less rounding): set between the two, not measured (no GPU here).
TOLERANCE = {
    "fp32": {"logits": 1e-4, "loss": 1e-4, "gradients": 1e-2, "updates": 1e-2},
    "tf32": {"logits": 5e-3, "loss": 1e-3, "gradients": 0.2, "updates": 0.2},
    "bf16": {"logits": 3e-2, "loss": 1e-2, "gradients": 0.4, "updates": 0.4},
}
SMOKE_STEPS = 3
PROBE_IMAGES = {"cuda": 5_000, "cpu": 400}  # synthetic training set per run in the probe (50 or 4 steps)


def needs_gpu(variant: dict) -> bool:
    return variant["precision"] != "fp32" or variant["step"] != "eager"


def synthetic(groups: int, n: int, device: torch.device, seed: int = 0):
    """Random resident data for `groups` runs: list of TrainData (one shared pool of every copy,
    random labels, each run its own targets in [0.3, 1]) and (G, n) copy and image draws."""
    on_device = torch.Generator(device).manual_seed(seed)  # the pool is large: drawn where it lives
    pool = torch.randint(0, 256, (NUM_COPIES, n, 3, 32, 32), generator=on_device, dtype=torch.uint8, device=device)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g).to(device)
    data = []
    for r in range(groups):
        q = 0.3 + 0.7 * torch.rand((NUM_COPIES, n), generator=g)
        q[0] = 1.0
        data.append(train_lib.TrainData(pool, labels, q.to(device), f"synthetic{r}"))
    copy = torch.randint(0, NUM_COPIES, (groups, n), generator=g)
    image = torch.stack([torch.randperm(n, generator=g) for _ in range(groups)])
    return data, copy.to(device), image.to(device)


def _stacked(p: Params, groups: int, device: torch.device) -> stacked.GroupNet:
    net = stacked.GroupNet.stack([model_lib.build(p.model, derive_seed(r, "init")) for r in range(groups)])
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if device.type == "cuda" else net


def reference_epoch(net: model_lib.Net, cfg, data: train_lib.TrainData, copy: torch.Tensor,
                    image: torch.Tensor, lr: float):
    """One run's epoch the plain way, in the precision of `net` (fp32 on the CPU): Net, the
    loss, make_sgd, one batch after another. Returns the last step's logits and gradients and the
    summed loss; `net` holds the weights after."""
    opt = steps_lib.make_sgd(net, cfg, lr)
    loss_sum = 0.0
    for i in range(0, copy.numel(), cfg.batch_size):
        c, j = copy[i:i + cfg.batch_size], image[i:i + cfg.batch_size]
        logits = net(model_lib.standardize(data.pool[c, j]))
        loss = steps_lib.loss_fn(logits, soft_targets(data.labels[j], data.q_true[c, j]), cfg.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(j)
    return logits.detach(), {k: w.grad.clone() for k, w in net.named_parameters()}, loss_sum


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def smoke_check(p: Params, device: torch.device, precision: str, step: str, group: int) -> dict:
    """SMOKE_STEPS steps of the variant on `device` against the same steps in fp32 on the CPU
    (reference_epoch, one Net per run) from the same weights and batches. Returns the largest
    relative and absolute differences of the last step's logits and gradients, of the weight
    updates and of the summed losses, and `ok` = each relative one within TOLERANCE[precision]."""
    device = torch.device(device)
    cfg = dataclasses.replace(p.train, precision=precision, step=step)
    n = SMOKE_STEPS * cfg.batch_size
    data, copy, image = synthetic(group, n, device, seed=1)
    net = _stacked(p, group, device)
    steps = steps_lib.make_steps(net, data, cfg, device)
    checked = sorted({0, group - 1})  # first and last run against the CPU (its reference is slow for G = 51)
    before = {r: net.run_state(r) for r in checked}
    loss_sum, _ = steps.epoch(copy, image, cfg.lr)
    cpu = torch.device("cpu")
    ref_cfg = dataclasses.replace(cfg, precision="fp32", step="eager")
    worst = {"logits": (0.0, 0.0), "gradients": (0.0, 0.0), "updates": (0.0, 0.0), "loss": (0.0, 0.0)}
    for r in checked:
        ref_net = model_lib.build(p.model, derive_seed(r, "init"))
        ref_before = {k: v.clone() for k, v in ref_net.state_dict().items()}
        ref_data = train_lib.TrainData(data[r].pool.to(cpu), data[r].labels.to(cpu), data[r].q_true.to(cpu), "")
        logits, grads, ref_loss = reference_epoch(ref_net, ref_cfg, ref_data, copy[r].to(cpu), image[r].to(cpu), cfg.lr)
        got = {"logits": [(steps.last_logits[r], logits)],
               "gradients": [(w.grad.unflatten(0, (group, -1))[r], grads[k]) for k, w in net.named_parameters()],
               "updates": [(v - before[r][k], ref_net.state_dict()[k] - ref_before[k])
                           for k, v in net.run_state(r).items()],
               "loss": [(loss_sum[r], torch.tensor(ref_loss))]}
        for what, pairs in got.items():
            rel = max(_rel(a, b) for a, b in pairs)
            diff = max(float((a.detach().double().cpu() - b.double()).abs().max()) for a, b in pairs)
            worst[what] = (max(worst[what][0], rel), max(worst[what][1], diff))
    out = {"precision": precision, "step": step, "group": group, "device": device.type,
           "tolerance": TOLERANCE[precision]}
    for what, (rel, diff) in worst.items():
        out[f"{what}_rel"], out[f"{what}_abs"] = rel, diff
    out["ok"] = all(rel <= TOLERANCE[precision][what] for what, (rel, _) in worst.items())  # NaN fails
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(p: Params, device: torch.device, precision: str, step: str, group: int,
                 seconds: float) -> dict:
    """Images/s summed over the group's runs: whole epochs on synthetic resident data, after one
    warm-up epoch (compilation, capture), until `seconds` have passed (at least one epoch)."""
    cfg = dataclasses.replace(p.train, precision=precision, step=step)
    n = PROBE_IMAGES[device.type] // cfg.batch_size * cfg.batch_size
    data, copy, image = synthetic(group, n, device, seed=2)
    net = _stacked(p, group, device)
    t0 = time.perf_counter()
    steps = steps_lib.make_steps(net, data, cfg, device)
    steps.epoch(copy, image, cfg.lr)
    _sync(device)
    warm_up = time.perf_counter() - t0
    epochs, t0 = 0, time.perf_counter()
    while epochs == 0 or time.perf_counter() - t0 < seconds:
        loss, _ = steps.epoch(copy, image, cfg.lr * 0.1)  # smaller lr: weights stay sane over many epochs
        loss.sum().item()  # the host sync a real epoch makes
        epochs += 1
    elapsed = time.perf_counter() - t0
    return {"images_per_s": group * n * epochs / elapsed, "step_ms": 1000 * elapsed / (epochs * n // cfg.batch_size),
            "epochs_timed": epochs, "images_per_epoch": n, "warm_up_s": warm_up}


def probe(p: Params, device: torch.device, seconds: float, variants=VARIANTS) -> list[dict]:
    """Check and time each variant within about `seconds` in all: each runnable variant gets an
    equal share of timing after its smoke check and warm-up; variants the device cannot run, or
    reached after the time is up, are reported with "skipped", failures with "error". Each result
    is the variant with ok, images_per_s and the smoke check."""
    device = torch.device(device)
    runnable = [v for v in variants if device.type == "cuda" or not needs_gpu(v)]
    share = seconds / max(1, len(runnable)) / 2  # half for timing, half for checks and warm-up
    deadline = time.perf_counter() + seconds
    results = []
    for v in variants:
        r = dict(v, ok=False)
        if v not in runnable:
            r["skipped"] = f"needs a GPU (CUDA); the probe runs on {device}"
        elif time.perf_counter() > deadline:
            r["skipped"] = f"the probe's {seconds:g} s were used up"
        else:
            try:
                r["smoke"] = smoke_check(p, device, **v)
                r.update(time_variant(p, device, **v, seconds=share), ok=r["smoke"]["ok"])
            except Exception as e:  # noqa: BLE001 - a variant that fails is reported, not fatal
                r["error"] = f"{type(e).__name__}: {e}"
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        log.info("variant %s %s x%d: %s", v["precision"], v["step"], v["group"],
                 r.get("skipped") or r.get("error") or f"{r['images_per_s']:.0f} img/s, check "
                 f"{'passed' if r['ok'] else 'FAILED'} (grad rel diff {r['smoke']['gradients_rel']:.1e})")
        results.append(r)
    return results


def choose(results: list[dict]) -> dict | None:
    """The fastest variant whose smoke check passed (images/s summed over runs), or None."""
    passed = [r for r in results if r.get("ok") and "images_per_s" in r]
    return max(passed, key=lambda r: r["images_per_s"], default=None)
