"""What every stage entry point shares: its options, logging set-up, the one params validation, how it exits."""
from __future__ import annotations

import argparse
import logging
import sys

from iqals import params as params_lib
from iqals.errors import ExpectedError


def setup(name: str) -> params_lib.Params:
    """Configure logging (each line names the stage) and load + validate params.yaml before any work starts."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s", datefmt="%H:%M:%S")
    return params_lib.load()


def cli(doc: str, **defaults: str | list | None) -> argparse.Namespace:
    """Options --name (underscores as dashes) per keyword, with that default (None: not given; a list: repeatable)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in defaults.items():
        ap.add_argument(f"--{name.replace('_', '-')}", default=default,
                        action="append" if isinstance(default, list) else "store")
    return ap.parse_args()


def run(main) -> None:
    """Call main(); errors raised on purpose (ExpectedError) print one line and exit 1, others keep their traceback."""
    try:
        main()
    except ExpectedError as e:
        logging.getLogger("stage").error("%s", e)
        sys.exit(1)
