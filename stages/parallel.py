"""Run the stale DVC stages in parallel on Dask: a local cluster of --workers, or --scheduler ADDRESS.

    python -m stages.parallel --workers 2                  # this machine
    python -m stages.parallel --scheduler tcp://host:8786  # a running Dask cluster (README)

Same plan, stale check and dvc.lock as `dvc repro` (iqals/parallel.py); exits 1 naming each
failed stage with its command and log tail, 130 when interrupted. Not a DVC stage itself.
"""
from __future__ import annotations

import argparse
import logging
import sys

from iqals import parallel
from stages.common import run, setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", help="stages or dvc.yaml files, as for dvc repro (default: dvc.yaml)")
    ap.add_argument("--workers", type=int, default=2, help="local cluster: number of workers (one stage each)")
    ap.add_argument("--scheduler", default=None, help="address of a running Dask scheduler (then --workers is unused)")
    ap.add_argument("--threads-per-worker", type=int, default=None,
                    help="CPU threads of each stage command (default: the host's cores over its task slots)")
    ap.add_argument("--stages-per-gpu", type=int, default=1,
                    help="local cluster on a GPU machine: training stages sharing one GPU at a time")
    args = ap.parse_args()
    p = setup("parallel")  # params.yaml validated before any stage starts
    for name in ("distributed", "dvc"):  # their INFO lines would drown the progress lines
        __import__(name)  # it sets its loggers' levels on import: import, then quiet them
        logging.getLogger(name).setLevel(logging.WARNING)
    outcome = parallel.run(".", args.targets or None, workers=args.workers, scheduler=args.scheduler,
                           threads=args.threads_per_worker, stages_per_gpu=args.stages_per_gpu,
                           device=p.train.device, say=lambda s: print(s, flush=True))
    if not outcome.ok:
        logging.getLogger("parallel").error("%s", parallel.failure_report(outcome))
        sys.exit(130 if outcome.interrupted and not outcome.failed else 1)


if __name__ == "__main__":
    run(main)
