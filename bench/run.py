"""All speed benchmarks, each against a reference implementation timed in the same process.

    PYTHONPATH=. python -m bench.run [--quick]
        [--only ssim,distort,train_cpu,train_cuda,train_group,train_gpu,dvc,parallel]

- ssim:       iqa.score_all (the score stage) vs skimage's SSIM in a per-image loop (bench_ssim)
- distort:    our distortions vs a plain per-image loop with the same libraries (bench_distort)
- train_cpu:  iqals.train's loop vs a plain DataLoader loop with stock layers (bench_train)
- train_cuda: the same on the GPU, run when torch sees one; alone:
              `python -m bench.run --only train_cuda` (or `python -m bench.bench_train --device cuda`)
- train_group: model.Net(1) vs the old one-run Net in one plain loop; runs stepped together vs one
              run, fp32 eager (bench_group)
- train_gpu:  every training-step variant (precision, step, group) on the GPU, smoke-checked and
              timed, vs the one-run fp32 eager step; run when torch sees a GPU; alone:
              `python -m bench.run --only train_gpu` (or `python -m bench.bench_group --device cuda`)
- dvc:        a no-op `dvc repro` on a finished tiny pipeline vs its full run (bench_dvc)
- parallel:   the small profile's training and evaluation stages, sequential `dvc repro` vs
              `stages.parallel` with 2 Dask workers of one torch thread (bench_parallel; --quick:
              2 epochs)

Writes bench/results.json and bench/results.md (the committed results); each entry carries the
machine, versions and date it was measured on. With --only, the other entries already in
bench/results.json are kept, so a GPU run can add its rows to CPU results; `make readme` then
puts train_gpu's fastest step into the README (iqals/readme.py, gpu_speed). No DVC is needed
for the training benchmarks: a GPU node without it runs `--only train_gpu`.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.cli import out_path  # noqa: E402
from iqals import probe  # noqa: E402
from iqals.io import write_json, write_text  # noqa: E402

RESULTS_JSON = REPO_ROOT / "bench" / "results.json"
RESULTS_MD = REPO_ROOT / "bench" / "results.md"
ALL = ("ssim", "distort", "train_cpu", "train_cuda", "train_group", "train_gpu", "dvc", "parallel")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _version(module: str) -> str:
    """A package's version, or 'not installed' (a GPU node may have no DVC)."""
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return "not installed"


def machine() -> dict:
    import numpy as np
    import torch

    from bench.bench_train import cpu_name
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit = commit + ("+changes" if dirty else "") if commit else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    if not commit:  # a copy of the tree without git (a GPU node): the sources' hash, as offline.results reads it
        from offline.study import code_sha256
        commit = f"none; sources sha256 {code_sha256(REPO_ROOT)[:16]}"
    info = {
        "date": _now(),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "numpy": np.__version__, "opencv": _version("cv2"), "dvc": _version("dvc"),
        "commit": commit,
    }
    try:
        import skimage
        info["scikit-image"] = skimage.__version__
    except ImportError:
        pass
    return info


def cases(quick: bool) -> dict[str, tuple[str, dict]]:
    """Benchmark name -> (bench module, keyword arguments of its main)."""
    def q(short, full):
        return short if quick else full
    return {"ssim": ("bench_ssim", {"n": q(500, 2000), "loop_n": q(100, 300), "repeats": q(2, 3)}),
            "distort": ("bench_distort", {"n": q(1000, 5000)}),
            "train_cpu": ("bench_train", {"device": "cpu", "quick": quick}),
            "train_cuda": ("bench_train", {"device": "cuda", "quick": quick}),
            "train_group": ("bench_group", {"device": "cpu", "quick": quick}),
            "train_gpu": ("bench_group", {"device": "cuda", "quick": quick, "seconds": q(30, 240)}),
            "dvc": ("bench_dvc", {"repeats": q(2, 3)}),
            "parallel": ("bench_parallel", {"workers": 2, "threads": 1, "epochs": q(2, None)})}


def run_one(name: str, quick: bool) -> dict:
    if name not in ALL:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(ALL)}")
    module, kwargs = cases(quick)[name]
    if kwargs.get("device") == "cuda":
        import torch
        if not torch.cuda.is_available():
            return {"skipped": f"no CUDA device; on a GPU run: python -m bench.run --only {name}"}
    result = importlib.import_module(f"bench.{module}").main(**kwargs)
    write_json(out_path(module, kwargs), result)
    return result


def rows(name: str, r: dict) -> list[tuple]:
    """(benchmark, ours, reference, ratio, max abs diff) rows for results.md."""
    if "error" in r:
        return [(name, "failed: " + r["error"].splitlines()[-1][:120], "", "", "")]
    if "skipped" in r:
        return [(name, "not run: " + r["skipped"], "", "", "")]
    if name == "ssim":
        us, sp, md = r["us_per_image"], r["speedup"], r["max_abs_diff_vs_skimage"]
        return [(f"SSIM, score_all ({r['n']} images x 9)", f"{us['score_all']:.2f} µs/pair",
                 f"{us['skimage_loop']:.1f} µs/pair (skimage loop)", f"{sp['score_all']}x", f"{md['score_all']:.1e}"),
                ("SSIM, one call per version", f"{us['single_pair']:.2f} µs/pair",
                 f"{us['skimage_loop']:.1f} µs/pair (skimage loop)", f"{sp['single_pair']}x",
                 f"{md['single_pair']:.1e}")]
    if name == "distort":
        return [(f"distort {k}, 3 levels ({r['n']} images)", f"{t['ours_s']:.3f} s",
                 f"{t['loop_s']:.3f} s (per-image loop)",
                 f"{t['speedup']}x", str(t.get("max_abs_diff", "n/a (other random stream)")))
                for k, t in r["types"].items()]
    if name == "train_group":
        ips, one = r["images_per_s"], r["images_per_s"]["group1"]
        where = f"fp32 eager ({r['device']}, {r['device_name']})"
        net = [] if "old_net" not in ips else [  # the point of one network class: no slower at one group
            (f"model.Net(1) in a plain loop, {where}", f"{ips['net1']:.0f} img/s", f"{ips['old_net']:.0f} img/s "
             "(the old one-run Net)", f"{r['ratio_vs_old_net']['net1']}x", "")]
        return net + [(f"{g[5:]} runs stepped together, {where}", f"{v:.0f} img/s (summed)",
                       f"{one:.0f} img/s (one run)",
                       f"{r['ratio_vs_group1'][g]}x", f"grads {r['checks'][g]['gradients_rel']:.1e} rel")
                      for g, v in ips.items() if g.startswith("group") and g != "group1"]
    if name == "train_gpu":
        best, base = r.get("chosen"), r.get("baseline")
        against = (f"{base['images_per_s']:.0f} img/s" if base else "not timed") + \
            f" ({probe.BASELINE_NAME}: results/gpu_e16's step)"
        chosen = [] if not best else [  # what the train stage should be given, vs gpu_e16's step
            (f"fastest step that passed: {probe.name(best)} ({r['device_name']})", f"{best['images_per_s']:.0f} img/s",
             against, f"{r['chosen_vs_baseline']}x" if base else "", f"grads {best['check']['gradients_rel']:.1e} rel")]
        return chosen + [(f"step {probe.name(v)} ({r['device_name']})",
                 f"{v['images_per_s']:.0f} img/s, {v['step_ms']:.3f} ms/step", "fp32 eager, one run",
                 f"{v['ratio_vs_fp32_eager_single']}x" if "ratio_vs_fp32_eager_single" in v else "",
                 f"logits {v['check']['logits_rel']:.1e}, grads {v['check']['gradients_rel']:.1e} rel"
                 + ("" if v["ok"] else " FAILED"))
                for v in r["variants"] if "images_per_s" in v]
    if name.startswith("train"):
        ips, d = r["images_per_s"], r["max_abs_diff"]
        where = f"{r['device']}, {r['device_name']}"
        diff = f"logits {d['logits']:.1e}, grads {d['gradients']:.1e}"
        ref = f"{ips['reference']:.0f} img/s (DataLoader, stock layers)"
        return [(f"training step ({where}), {r['n']} img/epoch", f"{ips['ours']:.0f} img/s", ref, f"{r['ratio']}x",
                 diff),
                (f"training, whole train() call ({r['device']})", f"{ips['ours_whole_call']:.0f} img/s", ref,
                 f"{r['ratio_whole_call']}x", ""),
                (f"paper schedule, 9 x 2000 epochs x 50k ({r['device']})", f"{r['paper_schedule_hours']['ours']:,} h "
                 f"({r['epoch_s_at_50000']['ours']} s/epoch)", f"{r['paper_schedule_hours']['reference']:,} h "
                 f"({r['epoch_s_at_50000']['reference']} s/epoch)", f"{r['ratio']}x", "")]
    if name == "dvc":
        return [(f"no-op dvc repro, finished tiny pipeline ({r['stages_in_full_run']} stages)",
                 f"{r['noop_repro_s']} s, {r['stages_rerun_by_noop']} stages rerun",
                 f"{r['full_repro_s']} s (full repro)", f"{r['ratio_full_over_noop']}x", "")]
    if name == "parallel":
        setting = f"{len(r['strategies'])} strategies x {r['epochs']} epochs, {r['train_size']} images, {r['device']}"
        return [(f"training + evaluation stages ({setting})",
                 f"{r['parallel_s']} s ({r['workers']} Dask workers x {r['threads_per_worker']} thread)",
                 f"{r['sequential_s']} s (dvc repro, {r['sequential_torch_threads']} torch threads)",
                 f"{r['ratio']}x", "")]
    return [(name, json.dumps(r)[:120], "", "", "")]


def write_md(results: dict) -> str:
    lines = ["Written by `python -m bench.run` (bench/run.py); each ratio is measured in one run against the",
             "reference implementation in the same process. Other processes on the machine slow both sides;",
             "the JSON (bench/results.json) has every repeat and the load average.", "",
             "| benchmark | ours | reference | ratio | max abs diff |", "|---|---|---|---|---|"]
    for name in ALL:
        if name in results:
            lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |"
                      for row in rows(name, results[name]["result"])]
    lines += ["", "Machines:", ""]
    seen = {}
    for name in ALL:
        if name in results:
            m = results[name]["machine"]
            key = json.dumps({k: v for k, v in m.items() if k != "date"}, sort_keys=True)
            quick = ", --quick" if results[name].get("quick") else ""
            seen.setdefault(key, (m, []))[1].append(f"{name} ({m['date']}, {results[name]['seconds']:.0f} s{quick})")
    for m, names in seen.values():
        lines.append(f"- {', '.join(names)}: CPU {m['cpu']}, {m['cpu_count']} cores "
                     f"({m['torch_threads']} torch threads)"
                     f"{', GPU ' + m['gpu'] if m.get('gpu') else ', no GPU'}; {m['os']}; Python {m['python']}, "
                     f"torch {m['torch']}, numpy {m['numpy']}, OpenCV {m['opencv']}, dvc {m['dvc']}"
                     f"{', scikit-image ' + m['scikit-image'] if m.get('scikit-image') else ''}; commit {m['commit']}")
    return "\n".join(lines) + "\n"


def main(only: list[str] | None = None, quick: bool = False) -> dict:
    names = list(only or ALL)
    results = {}
    if only and RESULTS_JSON.exists():
        results = json.loads(RESULTS_JSON.read_text()).get("benchmarks", {})
    info = machine()
    failed = []
    t_all = time.perf_counter()
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        t = time.perf_counter()
        try:
            r = run_one(name, quick)
        except (Exception, SystemExit):  # noqa: BLE001 - record and go on with the others (their SystemExit too)
            traceback.print_exc()
            r = {"error": traceback.format_exc()}
            failed.append(name)
        results[name] = {"machine": dict(info, date=_now()), "quick": quick,
                         "seconds": round(time.perf_counter() - t, 1), "result": r}
    total = time.perf_counter() - t_all
    write_text(RESULTS_JSON, json.dumps({"benchmarks": {k: results[k] for k in ALL if k in results}}, indent=2) + "\n")
    write_text(RESULTS_MD, write_md(results))
    print(f"\n{write_md(results)}\nall done in {total:.0f} s; wrote {RESULTS_JSON.relative_to(REPO_ROOT)} and "
          f"{RESULTS_MD.relative_to(REPO_ROOT)} (`make readme` puts train_gpu's summary into README.md)")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images and repeats")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(ALL)}")
    args = ap.parse_args()
    main(args.only.split(",") if args.only else None, args.quick)
