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

# Candidates, the reference first, then the likeliest winners on an H100 (the probe may run out
# of time), each at 1 run (DVC's path with one seed), 3 (one strategy's seeds), 17 and 51 (the
# whole 17 x 3 study in groups). layout "batch" is iqals/fused.py's step: runs stacked along the
# batch, fused LRN, pooling without indices, with cuDNN's benchmark on; the train stage cannot run
# it yet, so `choose` leaves it out (TRAINABLE_LAYOUTS). compile is last: its compilation takes
# tens of seconds per group size.
GROUPS = (1, 3, 17, 51)
_CANDIDATES = (
    {"precision": "bf16", "step": "graph", "layout": "batch", "benchmark": True},
    {"precision": "bf16", "step": "graph"},
    {"precision": "bf16", "step": "graph", "benchmark": True},
    {"precision": "tf32", "step": "graph"},
    {"precision": "tf32", "step": "graph", "layout": "batch", "benchmark": True},
    {"precision": "fp32", "step": "graph"},
    {"precision": "tf32", "step": "eager"},
    {"precision": "tf32", "step": "compile"},
)
VARIANTS = ({"precision": "fp32", "step": "eager", "group": 1},   # the reference step, and the fallback
            {"precision": "fp32", "step": "eager", "group": 3},   # what the CPU can run besides
            *({**c, "group": g} for c in _CANDIDATES for g in GROUPS))
LAYOUTS = ("channels", "batch")  # runs stacked along the channels (GroupNet) or the batch (fused)
TRAINABLE_LAYOUTS = ("channels",)

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
    """Off CUDA only the fp32 eager step of GroupNet runs (the fused kernels need a GPU or
    Triton's interpreter, which the tests use)."""
    return (variant["precision"] != "fp32" or variant["step"] != "eager"
            or variant.get("layout", "channels") != "channels")


def _check_variant(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"variant layout {layout!r}: expected one of {LAYOUTS}")


class _cudnn_benchmark:
    """cuDNN's autotuner on or off for one variant, restored after (it is process-wide)."""

    def __init__(self, on: bool):
        self.on, self.old = on, None

    def __enter__(self):
        self.old = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.on

    def __exit__(self, *exc):
        torch.backends.cudnn.benchmark = self.old


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


def _stacked(p: Params, groups: int, device: torch.device, layout: str = "channels") -> stacked.GroupNet:
    _check_variant(layout)
    nets = [model_lib.build(p.model, derive_seed(r, "init")) for r in range(groups)]
    if layout == "batch":
        from . import fused  # imports Triton: only where the variant is asked for
        net = fused.BatchStackedNet.stack(nets)
    else:
        net = stacked.GroupNet.stack(nets)
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


def smoke_check(p: Params, device: torch.device, precision: str, step: str, group: int,
                layout: str = "channels", benchmark: bool = False) -> dict:
    """SMOKE_STEPS steps of the variant on `device` against the same steps in fp32 on the CPU
    (reference_epoch, one Net per run) from the same weights and batches. Returns the largest
    relative and absolute differences of the last step's logits and gradients, of the weight
    updates and of the summed losses, and `ok` = each relative one within TOLERANCE[precision]."""
    device = torch.device(device)
    cfg = dataclasses.replace(p.train, precision=precision, step=step)
    n = SMOKE_STEPS * cfg.batch_size
    data, copy, image = synthetic(group, n, device, seed=1)
    net = _stacked(p, group, device, layout)
    checked = sorted({0, group - 1})  # first and last run against the CPU (its reference is slow for G = 51)
    before = {r: net.run_state(r) for r in checked}
    with _cudnn_benchmark(benchmark):
        steps = steps_lib.make_steps(net, data, cfg, device)
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
    out = {"precision": precision, "step": step, "group": group, "layout": layout, "benchmark": benchmark,
           "device": device.type, "tolerance": TOLERANCE[precision]}
    for what, (rel, diff) in worst.items():
        out[f"{what}_rel"], out[f"{what}_abs"] = rel, diff
    out["ok"] = all(rel <= TOLERANCE[precision][what] for what, (rel, _) in worst.items())  # NaN fails
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(p: Params, device: torch.device, precision: str, step: str, group: int,
                 seconds: float, layout: str = "channels", benchmark: bool = False) -> dict:
    """Images/s summed over the group's runs: whole epochs on synthetic resident data, after one
    warm-up epoch (compilation, capture), until `seconds` have passed (at least one epoch)."""
    cfg = dataclasses.replace(p.train, precision=precision, step=step)
    n = PROBE_IMAGES[device.type] // cfg.batch_size * cfg.batch_size
    data, copy, image = synthetic(group, n, device, seed=2)
    net = _stacked(p, group, device, layout)
    with _cudnn_benchmark(benchmark):
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
        log.info("variant %s: %s", name(v),
                 r.get("skipped") or r.get("error") or f"{r['images_per_s']:.0f} img/s, check "
                 f"{'passed' if r['ok'] else 'FAILED'} (grad rel diff {r['smoke']['gradients_rel']:.1e})")
        results.append(r)
    return results


def name(v: dict) -> str:
    """e.g. 'bf16 graph x17, batch layout, cudnn benchmark'."""
    extra = ([f"{v['layout']} layout"] if v.get("layout", "channels") != "channels" else []) + \
        (["cudnn benchmark"] if v.get("benchmark") else [])
    return ", ".join([f"{v['precision']} {v['step']} x{v['group']}", *extra])


def choose(results: list[dict], layouts: tuple[str, ...] = TRAINABLE_LAYOUTS) -> dict | None:
    """The fastest variant whose smoke check passed (images/s summed over runs) among those of
    `layouts` (by default what the train stage can run), or None."""
    passed = [r for r in results if r.get("ok") and "images_per_s" in r and r.get("layout", "channels") in layouts]
    return max(passed, key=lambda r: r["images_per_s"], default=None)


def profile(p: Params, device: torch.device, variant: dict, epochs: int = 2, rows: int = 15) -> str:
    """torch.profiler's table of the variant's top kernels by device time (CPU time off CUDA), over
    `epochs` epochs of the probe's synthetic data after one warm-up epoch."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    device = torch.device(device)
    v = {k: variant[k] for k in ("precision", "step", "group", "layout", "benchmark") if k in variant}
    layout = v.get("layout", "channels")
    cfg = dataclasses.replace(p.train, precision=v["precision"], step=v["step"])
    n = PROBE_IMAGES[device.type] // cfg.batch_size * cfg.batch_size
    data, copy, image = synthetic(v["group"], n, device, seed=3)
    net = _stacked(p, v["group"], device, layout)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _cudnn_benchmark(v.get("benchmark", False)):
        steps = steps_lib.make_steps(net, data, cfg, device)
        steps.epoch(copy, image, cfg.lr)
        _sync(device)
        with torch_profile(activities=activities) as prof:
            for _ in range(epochs):
                steps.epoch(copy, image, cfg.lr * 0.1)
            _sync(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return f"{name(v)}: {epochs} epochs of {n} images per run\n" + \
        prof.key_averages().table(sort_by=sort, row_limit=rows)
