"""A benchmark module's command line, made from its main()'s keyword parameters.

    PYTHONPATH=. python -m bench.bench_train --device cuda --epochs 3

Each parameter of main() is an option (`loop_n` -> `--loop-n`) of the type its annotation names: int,
float, a comma-separated list (tuple[int, ...], list[str]), a flag for a bool, else a string.
The result goes to `--out` (default bench/out/<module>[_<device>].json, as bench.run names it).
"""
from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from iqals.io import write_json

OUT = Path(__file__).resolve().parent / "out"


def _convert(annotation: str):
    items = int if "[int" in annotation else str
    if annotation.startswith(("tuple[", "list[")):
        return lambda s: tuple(items(x) for x in s.split(","))
    return int if annotation.startswith("int") else float if annotation.startswith("float") else str


def out_path(module: str, kwargs: dict) -> Path:
    """bench/out/<module>[_<device>].json: where a benchmark's result goes by default."""
    return OUT / f"{module}{'_' + str(kwargs['device']) if kwargs.get('device') else ''}.json"


def run(main, doc: str) -> dict:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, p in inspect.signature(main).parameters.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(p.default, bool):
            ap.add_argument(flag, action="store_true")
        else:
            ap.add_argument(flag, type=_convert(str(p.annotation)), default=p.default, help=f"default {p.default}")
    ap.add_argument("--out", type=Path, default=None, help="default bench/out/<module>[_<device>].json")
    args = vars(ap.parse_args())
    out = args.pop("out") or out_path(Path(inspect.getsourcefile(main)).stem, args)  # run as __main__ too
    result = main(**args)
    write_json(out, result)
    return result
