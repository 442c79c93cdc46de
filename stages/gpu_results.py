"""A GPU run's brought-back files -> results/<profile>/; its report regenerated on the CPU.

  python -m stages.gpu_results unpack FOLDER [--results results]
  python -m stages.gpu_results report results/<profile> [--out DIR] [--work gpu_work/regen]

`unpack` turns every <profile>.tar in FOLDER (the files brought back from the GPU node) into results/<profile>/
and lists its metrics in dvc.yaml (top-level `metrics:`), so `dvc metrics show` reads them.
`report` reruns the report stage on those results without a GPU (iqals/gpu_results.py).
Not a DVC stage.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from iqals import gpu_results
from stages.common import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("unpack")
    u.add_argument("folder", type=Path)
    u.add_argument("--results", type=Path, default=Path("results"))
    u.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"))
    r = sub.add_parser("report")
    r.add_argument("profile", type=Path, help="results/<profile>")
    r.add_argument("--out", type=Path, default=None, help="default: results/<profile>/plots")
    r.add_argument("--work", type=Path, default=Path("gpu_work/regen"))
    r.add_argument("--cifar", type=Path, default=os.environ.get("CIFAR10_LOCAL", "../shared/data/cifar10"),
                   help="the local CIFAR-10 copy (default $CIFAR10_LOCAL, else ../shared/data/cifar10)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gpu_results %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    if args.cmd == "unpack":
        gpu_results.unpack_all(args.folder, args.results, args.dvc_yaml)
    else:
        checks = gpu_results.regenerate_report(args.profile, args.work / args.profile.name, args.out, args.cifar)
        logging.getLogger("gpu_results").info("data checksums against the GPU run: %s", checks or "none recorded")


if __name__ == "__main__":
    run(main)
