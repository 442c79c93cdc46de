"""Training-step variants: images/s summed over runs, each against the one-run fp32 eager step
timed in the same process (iqals/variants.py).

- cpu: runs stepped together as one GroupNet (fp32 eager, groups of 1 and --groups) on synthetic
  resident data, and the plain one-Net loop (variants.reference_epoch) on the same data, rounds
  interleaved so load from other processes hits all alike; reported: the median images/s of each
  and its ratio to the plain Net (what training cost before it went through GroupNet).
- cuda: variants.probe over every variant in variants.VARIANTS (smoke check against the CPU
  fp32 step, then timing); reported: images/s, ms per step, the check's largest relative
  differences, the variant the train stage would choose, the fastest of any layout with its ratio
  to the bf16 CUDA-graph step of 51 runs stacked along the channels (the step gpu_e16 trained
  with), a profiler table of that fastest variant, and the minutes 51 runs (17 strategies x 3
  seeds) of 50,000 images would take per epoch of schedule at that speed.

    PYTHONPATH=. python -m bench.bench_group [--device cpu|cuda] [--seconds S] [--groups 3]
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.bench_train import cpu_name  # noqa: E402
from iqals import model as model_lib, variants  # noqa: E402
from iqals.params import load  # noqa: E402

STUDY = {"runs": 51, "images": 50_000}  # 17 strategies x 3 seeds on the full training set
BASELINE = {"precision": "bf16", "step": "graph", "group": 51}  # the step results/gpu_e16 trained with


def _time_net(p, seconds: float) -> float:
    """Images/s of the plain one-Net loop (variants.reference_epoch) on the probe's data."""
    n = variants.PROBE_IMAGES["cpu"] // p.train.batch_size * p.train.batch_size
    data, copy, image = variants.synthetic(1, n, torch.device("cpu"), seed=2)
    net = model_lib.build(p.model, 0)
    variants.reference_epoch(net, p.train, data[0], copy[0], image[0], p.train.lr)  # warm-up
    epochs, t0 = 0, time.perf_counter()
    while epochs == 0 or time.perf_counter() - t0 < seconds:
        variants.reference_epoch(net, p.train, data[0], copy[0], image[0], p.train.lr * 0.1)
        epochs += 1
    return n * epochs / (time.perf_counter() - t0)


def _cpu(p, groups: tuple[int, ...], rounds: int, seconds: float) -> dict:
    vs = [{"precision": "fp32", "step": "eager", "group": g} for g in (1,) + tuple(groups)]
    checks = {f"group{v['group']}": variants.smoke_check(p, torch.device("cpu"), **v) for v in vs}
    ips = {"net": [], **{f"group{v['group']}": [] for v in vs}}
    for _ in range(rounds):
        ips["net"].append(_time_net(p, seconds))
        for v in vs:
            ips[f"group{v['group']}"].append(
                variants.time_variant(p, torch.device("cpu"), **v, seconds=seconds)["images_per_s"])
    med = {k: statistics.median(x) for k, x in ips.items()}
    return {"images_per_s": {k: round(v, 1) for k, v in med.items()},
            "images_per_s_all": {k: [round(v, 1) for v in x] for k, x in ips.items()},
            "ratio_vs_net": {k: round(v / med["net"], 3) for k, v in med.items()},
            "ratio_vs_group1": {k: round(v / med["group1"], 2) for k, v in med.items() if k != "net"},
            "smoke": checks}


def _cuda(p, seconds: float) -> dict:
    results = variants.probe(p, torch.device("cuda"), seconds)
    best = variants.choose(results)
    ref = next((r for r in results if r["group"] == 1 and r["step"] == "eager" and r["precision"] == "fp32"
                and "images_per_s" in r), None)
    for r in results:
        if ref and "images_per_s" in r:
            r["ratio_vs_fp32_eager_single"] = round(r["images_per_s"] / ref["images_per_s"], 2)
    fastest = variants.choose(results, layouts=variants.LAYOUTS)
    base = next((r for r in results if "images_per_s" in r and r.get("layout", "channels") == "channels"
                 and not r.get("benchmark") and all(r[k] == v for k, v in BASELINE.items())), None)
    out = {"variants": results, "chosen": best, "fastest": fastest}
    if fastest:
        out["study_minutes_per_epoch"] = round(STUDY["runs"] * STUDY["images"] / fastest["images_per_s"] / 60, 3)
        out["profile"] = variants.profile(p, torch.device("cuda"), fastest)
        if base:
            out["fastest_vs_baseline"] = round(fastest["images_per_s"] / base["images_per_s"], 3)
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
                   "batch_size": p.train.batch_size, "images_per_epoch_per_run": variants.PROBE_IMAGES[dev.type],
                   "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]})
    print(f"training-step variants on {result['device_name']} ({dev}), batch {p.train.batch_size}, "
          f"{result['torch_threads']} torch threads, load average {result['load_average_before_after']}")
    if dev.type == "cuda":
        print(f"{'variant':48} {'images/s':>10} {'ms/step':>8} {'x fp32 eager 1':>14}  check")
        for r in result["variants"]:
            name = variants.name(r)
            if "images_per_s" in r:
                s = r["smoke"]
                print(f"{name:48} {r['images_per_s']:10.0f} {r['step_ms']:8.3f} "
                      f"{r.get('ratio_vs_fp32_eager_single', float('nan')):14.2f}  "
                      f"{'ok' if r['ok'] else 'FAILED'} (logits {s['logits_rel']:.1e}, grads {s['gradients_rel']:.1e})")
            else:
                print(f"{name:48} {r.get('skipped') or r.get('error')}")
        chosen, fastest = result["chosen"], result["fastest"]
        print(f"train stage would choose: {chosen and variants.name(chosen)}; fastest: {fastest and variants.name(fastest)}"
              f" ({result.get('fastest_vs_baseline')}x bf16 graph x51 channels); 51 runs x 50,000 images: "
              f"{result.get('study_minutes_per_epoch')} min per epoch")
        print(result.get("profile", ""))
    else:
        for k, v in result["images_per_s"].items():
            print(f"fp32 eager {k:8} {v:8.0f} images/s (summed over runs), {result['ratio_vs_net'][k]:.3f}x the plain Net")
    return result


if __name__ == "__main__":
    from bench.cli import run
    run(main, __doc__)
