"""Stage report: metrics/, data/predictions and logs/ -> plots/ (Table 2, claims, controls, figures).

plots/report.md (everything, with the regime that made it), table2.{csv,md}, comparisons.csv (every family's tests
per mix and test set), family_counts.csv, controls.csv, calibration.csv, deviations.csv, unseen.csv, summary.json,
fig3.png, fig4.png, confidence_quality.png and training.png. `--missing skip` (a GPU run cut short) leaves the
strategies without results out and names them; by default they are an error.
"""
import logging
from pathlib import Path

from iqals import figures
from iqals import report as rep
from iqals.errors import UsageError
from iqals.io import write_json
from stages.common import cli, run, setup


def main() -> None:
    args = vars(cli(__doc__, metrics="metrics", predictions="data/predictions", logs="logs", raw="data/raw",
                    distorted="data/distorted", scores="data/scores", paper="reference", out="plots", missing="error"))
    missing, a = args.pop("missing"), {k: Path(v) for k, v in args.items()}
    if missing not in ("error", "skip"):
        raise UsageError(f"--missing {missing}: expected error or skip")
    p, absent, d = rep.read_inputs(a, setup("report"), skip_missing=missing == "skip")
    r = rep.build(p, **d, not_evaluated=absent)
    rep.write(a["out"], r["tables"], r["texts"])
    write_json(a["out"] / "summary.json", r["summary"])
    figures.write_all(p, d, a)
    logging.info("wrote %s", ", ".join(sorted(x.name for x in a["out"].iterdir())))


if __name__ == "__main__":
    run(main)
