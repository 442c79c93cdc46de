"""Training and evaluation stages: sequential `dvc repro` vs `python -m stages.parallel` (Dask workers).

Set-up, not timed: a copy of the pipeline (the real stages, dvc.yaml and params.yaml: the small
profile, optionally reduced by --epochs / --train-size / --strategies) over the local CIFAR-10 copy
($CIFAR10_LOCAL, else ../shared/data/cifar10; else the tests' tiny synthetic copy), with
`dvc repro download distort score corrupt` run once; then the copy is duplicated, so that the two
timed runs start from the same state with their own DVC caches (no run-cache hits).

Timed, on the two copies in turn: `dvc repro evaluate@S1 ... evaluate@R9` (every training stage
and every evaluation; torch's default threads, as a user runs it) and
`python -m stages.parallel --workers W --threads-per-worker T` with the same targets. Reported:
both wall times, their ratio, and that `dvc status` is clean after each. With --device cuda the
training stages ask for the GPU, --stages-per-gpu of them at a time.

    PYTHONPATH=. python -m bench.bench_parallel [--workers 2] [--threads 1] [--epochs 10]
        [--strategies S1,S2,...] [--device cpu|cuda] [--stages-per-gpu 1] [--keep DIR]
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.bench_dvc import tiny_cifar  # noqa: E402
from bench.bench_train import cpu_name  # noqa: E402
from tests.test_pipeline import copy_repo, sh  # noqa: E402

UPSTREAM = ["download", "distort", "score", "corrupt"]


def cifar_source(tmp: Path) -> tuple[Path, str]:
    for c in (os.environ.get("CIFAR10_LOCAL"), REPO_ROOT.parent / "shared" / "data" / "cifar10",
              Path("/work/shared/data/cifar10")):
        if c and (Path(c) / "train.npz").is_file():
            return Path(c), f"local copy {c}"
    return tiny_cifar(tmp / "cifar10"), "tiny synthetic copy (no CIFAR-10 copy found)"


def make_copy(dest: Path, epochs: int | None, strategies: list[str] | None, device: str,
              train_size: int | None = None) -> list[str]:
    """The pipeline with the committed params (small profile), optionally fewer epochs/images/strategies."""
    copy_repo(dest, REPO_ROOT)
    raw = yaml.safe_load((dest / "params.yaml").read_text())
    if epochs is not None:  # keep the decay at the same fraction of the schedule
        frac = raw["train"]["lr_decay_epochs"] / raw["train"]["epochs"]
        raw["train"].update(epochs=epochs, lr_decay_epochs=max(1, min(epochs, round(frac * epochs))))
    raw["train"]["device"] = device
    if train_size is not None:
        raw["base"]["train_size"] = train_size
    if strategies:
        unknown = set(strategies) - set(raw["strategies"])
        if unknown:
            raise ValueError(f"--strategies: {sorted(unknown)} not in params.yaml strategies")
        raw["strategies"] = {k: v for k, v in raw["strategies"].items() if k in strategies}
        raw["report"]["fig4_strategies"] = ([s for s in raw["report"]["fig4_strategies"] if s in strategies]
                                            or strategies[:1])
        dvc_yaml = yaml.safe_load((dest / "dvc.yaml").read_text())
        dvc_yaml["vars"] = [{k: [s for s in v if s in strategies]} for d in dvc_yaml["vars"] for k, v in d.items()]
        (dest / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return list(raw["strategies"])


def main(workers: int = 2, threads: int = 1, epochs: int | None = None, strategies: list[str] | None = None,
         device: str = "cpu", stages_per_gpu: int = 1, keep: str | Path | None = None,
         train_size: int | None = None) -> dict:
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="bench_parallel_"))
    try:
        cifar, source = cifar_source(tmp)
        with np.load(cifar / "test.npz") as z:
            test_images = int(z["labels"].shape[0])
        seq, par = tmp / "sequential", tmp / "parallel"
        names = make_copy(seq, epochs, strategies, device, train_size)
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                   PYTHONPATH=str(seq), PYTHONUNBUFFERED="1", CIFAR10_LOCAL=str(cifar))
        dvc = [sys.executable, "-m", "dvc"]
        for cmd in (["git", "init", "-q"], dvc + ["init", "-q"], dvc + ["config", "core.analytics", "false"],
                    dvc + ["config", "core.check_update", "false"]):
            sh(cmd, seq, env)
        t = time.perf_counter()
        sh(dvc + ["repro", *UPSTREAM], seq, env, timeout=3600)
        setup_s = time.perf_counter() - t
        shutil.copytree(seq, par, symlinks=True)
        targets = [f"evaluate@{s}" for s in names]

        t = time.perf_counter()
        seq_out = sh(dvc + ["repro", *targets], seq, env, timeout=7200)
        seq_s = time.perf_counter() - t
        penv = dict(env, PYTHONPATH=str(par))
        cmd = [sys.executable, "-m", "stages.parallel", "--workers", str(workers), "--threads-per-worker",
               str(threads), "--stages-per-gpu", str(stages_per_gpu), *targets]
        t = time.perf_counter()
        par_out = sh(cmd, par, penv, timeout=7200)
        par_s = time.perf_counter() - t
        status = {name: sh(dvc + ["status", *targets], d, e)
                  for name, d, e in (("sequential", seq, env), ("parallel", par, penv))}
        if keep is not None:
            shutil.copytree(tmp, Path(keep), dirs_exist_ok=True, symlinks=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    p = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    result = {
        "data": source, "train_size": train_size or p["base"]["train_size"],
        "test_images": test_images, "epochs": epochs or p["train"]["epochs"],
        "strategies": names, "device": device, "workers": workers, "threads_per_worker": threads,
        "stages_per_gpu": stages_per_gpu, "sequential_torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
        "stages_run": {"sequential": seq_out.count("Running stage '"), "parallel": par_out.count(" start  ")},
        "setup_s": round(setup_s, 1), "sequential_s": round(seq_s, 1), "parallel_s": round(par_s, 1),
        "ratio": round(seq_s / par_s, 2),
        "status_clean": {k: "up to date" in v for k, v in status.items()},
    }
    print(json.dumps(result, indent=2))
    assert all(result["status_clean"].values()), status
    return result


if __name__ == "__main__":
    from bench.cli import run
    run(main, __doc__)
