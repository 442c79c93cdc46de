"""A no-op `dvc repro` on a finished pipeline: how long it takes, and that no stage reran.

Builds the tiny copy of the pipeline that tests/test_pipeline.py runs (its `make_project`: the
real stages and dvc.yaml, params shrunk to 100 training images, 2 epochs, 5 strategies) in a
temporary directory, over the tiny synthetic CIFAR-10 copy of tests/conftest.py; runs `dvc repro`
once to finish it (the reference time), then `dvc repro` again --repeats times and `dvc status`
once. Reported: the median no-op time, its ratio to the full run, and whether any no-op output
contains "Running stage" (it must not; that is asserted).

    PYTHONPATH=. python -m bench.bench_dvc [--repeats 3] [--keep DIR]
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.conftest import (TINY_SEED, TINY_TEST_PER_CLASS, TINY_TRAIN_PER_CLASS,  # noqa: E402
                            balanced_labels, natural_images, write_copy)
from tests.test_pipeline import make_project, sh  # noqa: E402


def tiny_cifar(directory: Path) -> Path:
    """The tests' tiny copy: 200 training and 50 test images (tests/conftest.py, tiny_arrays)."""
    rng = np.random.default_rng(TINY_SEED)
    ytr = balanced_labels(TINY_TRAIN_PER_CLASS, rng)
    yte = balanced_labels(TINY_TEST_PER_CLASS, rng)
    return write_copy(directory, (natural_images(len(ytr), TINY_SEED + 1), ytr),
                      (natural_images(len(yte), TINY_SEED + 2), yte))


def _timed(cmd, cwd, env) -> tuple[float, str]:
    t = time.perf_counter()
    out = sh(cmd, cwd, env, timeout=1800)
    return time.perf_counter() - t, out


def main(repeats: int = 3, keep: str | Path | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_dvc_"))
    try:
        dest = tmp / "project"
        env = make_project(dest, REPO_ROOT)
        env["CIFAR10_LOCAL"] = str(tiny_cifar(tmp / "cifar10"))
        dvc = [sys.executable, "-m", "dvc"]
        sh(["git", "init", "-q"], dest, env)
        sh(dvc + ["init", "-q"], dest, env)
        sh(dvc + ["config", "core.analytics", "false"], dest, env)
        sh(dvc + ["config", "core.check_update", "false"], dest, env)
        t_full, first = _timed(dvc + ["repro"], dest, env)
        stages = first.count("Running stage '")
        noop, reran = [], []
        for _ in range(repeats):
            t, again = _timed(dvc + ["repro"], dest, env)
            noop.append(t)
            reran += [line for line in again.splitlines() if "Running stage" in line]
        t_status, status = _timed(dvc + ["status"], dest, env)
        if keep is not None:
            shutil.copytree(dest, Path(keep), dirs_exist_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    import dvc as dvc_pkg
    result = {
        "dvc": dvc_pkg.__version__, "cpu_count": os.cpu_count(), "repeats": repeats,
        "stages_in_full_run": stages,
        "full_repro_s": round(t_full, 2),
        "noop_repro_s": round(statistics.median(noop), 2),
        "noop_repro_s_all": [round(t, 2) for t in noop],
        "ratio_full_over_noop": round(t_full / statistics.median(noop), 1),
        "dvc_status_s": round(t_status, 2),
        "stages_rerun_by_noop": len(reran),
        "status_up_to_date": "up to date" in status,
    }
    print(f"dvc {result['dvc']}: full repro of the tiny pipeline ({stages} stages) {t_full:.1f} s; "
          f"no-op repro {result['noop_repro_s']:.2f} s (median of {repeats}: {result['noop_repro_s_all']}), "
          f"stages rerun: {len(reran)}; dvc status {t_status:.2f} s "
          f"({'up to date' if result['status_up_to_date'] else 'CHANGED'})")
    assert not reran, f"a no-op dvc repro ran stages: {reran}"
    assert result["status_up_to_date"], status
    return result


if __name__ == "__main__":
    from bench.cli import run
    run(main, __doc__)
