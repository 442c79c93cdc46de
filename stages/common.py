"""What every stage entry point shares: logging set-up and the one params validation."""
from __future__ import annotations

import logging
import sys

from iqals import params as params_lib
from iqals.data import DataError
from iqals.params import ParamError

PARAMS_FILE = "params.yaml"


def setup(name: str) -> params_lib.Params:
    """Configure logging and load + validate params.yaml before any work starts."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    return params_lib.load(PARAMS_FILE)


def run(main) -> None:
    """Call main(); expected failures print one clear line and exit 1 (no traceback)."""
    try:
        main()
    except (ParamError, DataError, ValueError, RuntimeError) as e:
        logging.getLogger("stage").error("%s", e)
        sys.exit(1)
