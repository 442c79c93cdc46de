"""Stage report: metrics/, data/predictions and logs/ -> plots/ (Table 2, claims, controls, figures).

Writes plots/report.md (everything, with the regime that made it), table2.{csv,md},
comparisons.csv (every family's tests per mix and test set), family_counts.csv, controls.csv,
calibration.csv, unseen.csv, summary.json and the figures fig3.png, fig4.png,
confidence_quality.png and training.png. `--missing skip` (a GPU run cut short) leaves the
strategies without results out and names them; by default they are an error.
"""
from __future__ import annotations

import logging
from pathlib import Path

from iqals import figures
from iqals import report as rep
from iqals.errors import UsageError
from stages.common import cli, run, setup

INPUTS = {"metrics": "metrics", "predictions": "data/predictions", "logs": "logs", "raw": "data/raw",
          "distorted": "data/distorted", "scores": "data/scores", "paper": "reference", "out": "plots"}


def main() -> None:
    args = vars(cli(__doc__, **INPUTS, missing="error"))
    missing, a = args.pop("missing"), {k: Path(v) for k, v in args.items()}
    if missing not in ("error", "skip"):
        raise UsageError(f"--missing {missing}: expected error or skip")
    p, absent = rep.evaluated(a, setup("report"), skip_missing=missing == "skip")
    d = rep.read_inputs(a, p)
    rep.write(rep.build(p, **d, not_evaluated=absent), a["out"])
    figures.write_all(p, d, a)
    logging.getLogger("report").info("wrote %s", ", ".join(sorted(x.name for x in a["out"].iterdir())))


if __name__ == "__main__":
    run(main)
