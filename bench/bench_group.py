"""Training-step variants: images/s summed over runs, each against a reference timed in the same
process.

- cpu: the network of one group (model.Net(1)) against the one-group network it replaced (the
  old `Net`, kept below as the reference: nn.Linear layers, (B, 3, H, W) input), both in the same
  plain loop (standardise, forward, Eq. (1), backward, SGD) on the same synthetic resident data;
  then the training step (train.Step, fp32 eager) of 1 and --groups runs stacked. Rounds are
  interleaved so load from other processes hits all alike; reported: the median images/s of each
  and the ratios to the old Net and to the one-run step.
- cuda: probe.probe over every variant in probe.VARIANTS (checked against the CPU fp32 step,
  then timed); reported: images/s, ms per step, the check's largest relative differences, the
  fastest variant that passed (its train.* values are what the train stage should be given) with
  its ratio to the bf16 CUDA-graph step of 51 runs stacked along the channels (the step
  results/gpu_e16 trained with), a profiler table of that variant, and the minutes the paper
  regime's runs (presets/paper.yaml: every strategy x its seeds, all training images) would take
  per epoch of schedule at that speed.

    PYTHONPATH=. python -m bench.bench_group [--device cpu|cuda] [--seconds S] [--groups 3]
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.bench_train import cpu_name  # noqa: E402
from iqals import model, probe, train  # noqa: E402
from iqals.mixture import soft_targets  # noqa: E402
from iqals.data import SPLITS  # noqa: E402
from iqals.params import REFERENCE_STEP, load, load_preset  # noqa: E402
from iqals.seeds import derive_seed  # noqa: E402


def study(p) -> dict:
    """The paper regime's training runs and images per run (presets/paper.yaml: every strategy
    with the preset's seeds)."""
    preset = load_preset(REPO_ROOT / "presets" / "paper.yaml")
    return {"runs": len(p.strategies) * len(preset["train.seeds"]),
            "images": preset["base.train_size"] or SPLITS["train"]}  # null: all of them


class OldNet(nn.Module):
    """The one-run network before model.Net took a group count (same layers, LRN and pools)."""

    def __init__(self, m):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 64, 5, padding=2), nn.Conv2d(64, 64, 5, padding=2)
        self.lrn = model.LocalResponseNorm(m.lrn_size, m.lrn_alpha, m.lrn_beta, m.lrn_k)
        self.fc1, self.fc2, self.out = nn.Linear(4096, 384), nn.Linear(384, 192), nn.Linear(192, 10)

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.lrn(F.relu(model.pool_same(self.conv1(x))))
        x = model.pool_same(self.lrn(F.relu(self.conv2(x))))
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))

    def decayed_parameters(self):
        return [self.fc1.weight, self.fc2.weight]


def _plain_loop(net, p, data, copy, image, seconds: float) -> float:
    """Images/s of whole epochs of the plain loop (one warm-up epoch first)."""
    opt, bs = train.make_sgd(net, p.train, p.train.lr * 0.1), p.train.batch_size

    def epoch():
        for i in range(0, copy.numel(), bs):
            c, j = copy[i:i + bs], image[i:i + bs]
            logits = net(model.standardize(data.pool[c, j]))
            loss = train.run_losses(logits, soft_targets(data.labels[j], data.q_true[c, j]), p.train.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    epoch()
    epochs, t0 = 0, time.perf_counter()
    while epochs == 0 or time.perf_counter() - t0 < seconds:
        epoch()
        epochs += 1
    return copy.numel() * epochs / (time.perf_counter() - t0)


def _cpu(p, groups: tuple[int, ...], rounds: int, seconds: float) -> dict:
    cpu = torch.device("cpu")
    n = probe.IMAGES["cpu"] // p.train.batch_size * p.train.batch_size
    data, copy, image = train.synthetic(1, n, cpu, seed=2)
    vs = [{**REFERENCE_STEP, "group": g} for g in (1,) + tuple(groups)]
    checks = {f"group{v['group']}": probe.check(p, cpu, v) for v in vs}
    ips = {"old_net": [], "net1": [], **{f"group{v['group']}": [] for v in vs}}
    for _ in range(rounds):
        old = OldNet(p.model)
        old.load_state_dict(model.build(p.model, derive_seed(0, "init")).state_dict())
        ips["old_net"].append(_plain_loop(old, p, data[0], copy[0], image[0], seconds))
        ips["net1"].append(_plain_loop(model.build(p.model, derive_seed(0, "init")), p, data[0], copy[0], image[0],
                                       seconds))
        for v in vs:
            ips[f"group{v['group']}"].append(probe.time_variant(p, cpu, v, seconds)["images_per_s"])
    med = {k: statistics.median(x) for k, x in ips.items()}
    return {"images_per_s": {k: round(v, 1) for k, v in med.items()},
            "images_per_s_all": {k: [round(v, 1) for v in x] for k, x in ips.items()},
            "ratio_vs_old_net": {k: round(v / med["old_net"], 3) for k, v in med.items()},
            "ratio_vs_group1": {k: round(v / med["group1"], 2) for k, v in med.items() if k.startswith("group")},
            "checks": checks}


def _cuda(p, seconds: float) -> dict:
    results = probe.probe(p, torch.device("cuda"), seconds)
    best = probe.choose(results)

    def timed(like: dict):  # the timed result of the variant `like` (unnamed train values at their defaults)
        return next((r for r in results if "images_per_s" in r
                     and all({**probe.DEFAULTS, **r}[k] == v for k, v in {**probe.DEFAULTS, **like}.items())), None)

    ref = timed({**REFERENCE_STEP, "group": 1})
    for r in results:
        if ref and "images_per_s" in r:
            r["ratio_vs_fp32_eager_single"] = round(r["images_per_s"] / ref["images_per_s"], 2)
    base = timed(probe.BASELINE)
    out = {"variants": results, "chosen": best}
    if best:
        out["study"] = study(p)
        out["study_minutes_per_epoch"] = round(out["study"]["runs"] * out["study"]["images"]
                                               / best["images_per_s"] / 60, 3)
        out["profile"] = probe.profile(p, torch.device("cuda"), best)
        if base:
            out["baseline"], out["chosen_vs_baseline"] = base, round(best["images_per_s"] / base["images_per_s"], 3)
    return out


def main(device: str = "cpu", seconds: float | None = None, groups: tuple[int, ...] = (3,), rounds: int = 3,
         quick: bool = False) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_group: --device cuda but torch sees no CUDA device")
    p = load(REPO_ROOT / "params.yaml")
    load_before = os.getloadavg()[0]
    if dev.type == "cuda":
        result = _cuda(p, seconds or (30 if quick else 90))
    else:
        result = _cpu(p, groups, 2 if quick else rounds, seconds or (1 if quick else 3))
    result.update({"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
                   else cpu_name(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                   "batch_size": p.train.batch_size, "images_per_epoch_per_run": probe.IMAGES[dev.type],
                   "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]})
    print(f"training-step variants on {result['device_name']} ({dev}), batch {p.train.batch_size}, "
          f"{result['torch_threads']} torch threads, load average {result['load_average_before_after']}")
    if dev.type == "cuda":
        print(f"{'variant':48} {'images/s':>10} {'ms/step':>8} {'x fp32 eager 1':>14}  check")
        for r in result["variants"]:
            name = probe.name(r)
            if "images_per_s" in r:
                s = r["check"]
                print(f"{name:48} {r['images_per_s']:10.0f} {r['step_ms']:8.3f} "
                      f"{r.get('ratio_vs_fp32_eager_single', float('nan')):14.2f}  "
                      f"{'ok' if r['ok'] else 'FAILED'} (logits {s['logits_rel']:.1e}, grads {s['gradients_rel']:.1e})")
            else:
                print(f"{name:48} {r.get('skipped') or r.get('error')}")
        chosen = result["chosen"]
        print(f"fastest that passed (its train.* values for the train stage): {chosen and probe.name(chosen)}"
              f" ({result.get('chosen_vs_baseline')}x {probe.BASELINE_NAME})")
        if "study" in result:
            print(f"{result['study']['runs']} runs x {result['study']['images']:,} images: "
                  f"{result['study_minutes_per_epoch']} min per epoch")
        print(result.get("profile", ""))
    else:
        for k, v in result["images_per_s"].items():
            print(f"fp32 eager {k:8} {v:8.0f} images/s (summed over runs), "
                  f"{result['ratio_vs_old_net'][k]:.3f}x the old Net")
    return result


if __name__ == "__main__":
    from bench.cli import run
    run(main, __doc__)
