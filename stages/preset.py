"""Run a preset of params.yaml as one DVC experiment.

    python -m stages.preset presets/paper.yaml [--name paper] [--dry]

A preset maps dotted keys to values, as `dvc exp run -S key=value` takes them. Before anything
runs, params.yaml with the preset's values is validated, and a preset asking for
train.device = cuda stops unless a CUDA GPU is there. Then `dvc exp run -n NAME -S ...` runs
the whole pipeline under DVC (dvc.lock, `dvc exp show`, `dvc metrics diff` as usual); --dry
prints that command instead.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
from pathlib import Path

from iqals import params as params_lib
from iqals.errors import UsageError
from stages.common import run

log = logging.getLogger("preset")


def check_device(values: dict, preset: Path) -> None:
    """A preset for a CUDA GPU on a machine without one stops here, naming train.device."""
    if values.get("train.device") == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"{preset}: train.device = 'cuda', but this machine has no CUDA device "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False): nothing was run")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", type=Path)
    ap.add_argument("--name", default=None, help="the experiment's name (default: the preset's file name)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--dry", action="store_true", help="print the dvc command, run nothing")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s preset %(levelname)s %(message)s", datefmt="%H:%M:%S")
    values = params_lib.load_preset(args.preset)
    params_lib.parse(params_lib.with_overrides(params_lib.read_raw(args.params), values, str(args.preset)))
    cmd = ["dvc", "exp", "run", "-n", args.name or args.preset.stem]
    for key, value in values.items():
        cmd += ["-S", f"{key}={params_lib.yaml_value(value)}"]
    if args.dry:  # the command only: no device needed
        print(shlex.join(cmd))
        return
    check_device(values, args.preset)
    log.info("%s", shlex.join(cmd))
    sys.exit(subprocess.run(cmd).returncode)


if __name__ == "__main__":
    run(main)
