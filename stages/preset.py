"""Run a preset of params.yaml as one DVC experiment.

    python -m stages.preset presets/paper.yaml [-S key=value ...] [--name paper] [--runner dask|dvc]
                            [--workers 4] [--dry]

A preset maps dotted keys to values, as `dvc exp run -S key=value` takes them; -S here sets more
keys or changes the preset's (the value read as YAML, as DVC reads it). Before anything runs,
params.yaml with these values is validated, and a preset asking for train.device = cuda stops
unless a CUDA GPU is there. Then, with
- --runner dask (default): the values are set in params.yaml as `dvc exp run -S` sets them, the
  stale stages run on a local Dask cluster (stages.parallel: on a GPU the training stages ready
  together train in one stacked process) and `dvc exp save -n NAME` keeps the workspace as the
  experiment;
- --runner dvc: `dvc exp run -n NAME -S key=value ...`, DVC running one stage after another.
Either way dvc.lock records every stage and `dvc exp show` lists the run; --dry prints the
commands instead.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from iqals import params as params_lib
from iqals.errors import UsageError
from stages.common import run

log = logging.getLogger("preset")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", type=Path)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a params key set on top of the preset's values (repeatable), as `dvc exp run -S`")
    ap.add_argument("--name", default=None, help="the experiment's name (default: the preset's file name)")
    ap.add_argument("--runner", choices=("dask", "dvc"), default="dask")
    ap.add_argument("--workers", type=int, default=4, help="dask runner: local workers (one stage each)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--dry", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s preset %(levelname)s %(message)s", datefmt="%H:%M:%S")
    values = params_lib.load_preset(args.preset)
    for s in args.set:
        key, eq, value = s.partition("=")
        if not eq or not key:
            raise UsageError(f"-S {s!r}: expected KEY=VALUE, e.g. -S train.epochs=2000")
        values[key] = yaml.safe_load(value)
    params_lib.parse(params_lib.with_overrides(params_lib.read_raw(args.params), values, str(args.preset)))
    name, sets = args.name or args.preset.stem, [f"{k}={params_lib.yaml_value(v)}" for k, v in values.items()]
    if args.runner == "dvc":
        cmds = [["dvc", "exp", "run", "-n", name, *[a for s in sets for a in ("-S", s)]]]
    else:
        cmds = [[sys.executable, "-m", "stages.parallel", "--workers", str(args.workers)],
                ["dvc", "exp", "save", "-f", "-n", name]]
    if args.dry:  # the commands only: no device needed
        if args.runner == "dask":
            print(f"# {args.params}, as `dvc exp run -S` sets it: {' '.join(sets)}")
        return print("\n".join(shlex.join(c) for c in cmds))
    if values.get("train.device") == "cuda":  # a preset for a CUDA GPU on a machine without one stops here
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"{args.preset}: train.device = 'cuda', but this machine has no CUDA device "
                             f"(torch {torch.__version__}, torch.cuda.is_available() is False): nothing was run")
    if args.runner == "dask":
        from dvc.utils.hydra import apply_overrides  # DVC's own implementation of `exp run -S`
        apply_overrides(str(args.params), sets)
        log.info("%s: %s", args.params, " ".join(sets))
    for cmd in cmds:
        log.info("%s", shlex.join(cmd))
        if (rc := subprocess.run(cmd).returncode) != 0:
            sys.exit(rc)


if __name__ == "__main__":
    run(main)
