"""Stage report: metrics/, data/predictions and logs/ -> plots/ (Table 2, claims, controls, figures).

Writes plots/report.md (everything, with the regime that made it), table2.{csv,md},
comparisons.csv (every family's tests per mix and test set), family_counts.csv, controls.csv,
calibration.csv, unseen.csv, summary.json and the figures fig3.png, fig4.png,
confidence_quality.png and training.png.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from iqals import figures  # noqa: E402
from iqals import report as rep  # noqa: E402
from iqals.data import CLASSES, SPLITS, DataError, load_npz, official_index  # noqa: E402
from iqals.errors import UsageError  # noqa: E402
from iqals.io import atomic_path, read_json, write_json, write_text  # noqa: E402
from stages.common import cli, run, setup  # noqa: E402

log = logging.getLogger("report")
INPUTS = {"metrics": "metrics", "predictions": "data/predictions", "logs": "logs", "raw": "data/raw",
          "distorted": "data/distorted", "scores": "data/scores", "paper": "reference", "out": "plots"}
MISSING = ("error", "skip")  # --missing: a strategy without results stops the report, or is left out


def save_fig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def save_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.5g")


def evaluated(a: dict[str, Path], p, missing: str):
    """params with the strategies that have results; those without are an error, or with
    --missing skip (a GPU run cut short) left out of every table and named in the report."""
    absent = [n for n in p.strategies if not (a["metrics"] / f"{n}.json").is_file()
              or not (a["predictions"] / f"{n}.npz").is_file()]
    if absent and missing != "skip":
        raise DataError(f"{a['metrics']}, {a['predictions']}: nothing for {absent} (run their evaluate stages)")
    if absent:
        log.warning("not evaluated, left out of the report: %s", ", ".join(absent))
        keep = {n: s for n, s in p.strategies.items() if n not in absent}
        report = replace(p.report, fig4_strategies=[n for n in p.report.fig4_strategies if n in keep])
        p = replace(p, strategies=keep, report=report)
    return p, absent


def load_inputs(a: dict[str, Path], p) -> dict:
    """Everything the report reads (for the strategies of `p`, which must have results)."""
    preds = {}
    for n in p.strategies:
        with np.load(a["predictions"] / f"{n}.npz") as z:
            preds[n] = {k: z[k] for k in ("probs", "labels", "seeds")}
    return {"metrics": {n: read_json(a["metrics"] / f"{n}.json") for n in p.strategies}, "preds": preds,
            "paper_rows": rep.paper_by_name(pd.read_csv(a["paper"] / "paper_table2.csv"), p.report.table2),
            "scores": {s: np.load(a["scores"] / f"{s}.npy") for s in SPLITS},
            "n_train": len(official_index(a["raw"] / "train.npz")), "n_full": SPLITS["train"],
            "clipped": sum(v["clipped"] for v in read_json(a["metrics"] / "score.json")["train"].values())}


def main() -> None:
    args = vars(cli(__doc__, **INPUTS, missing="error"))
    if args["missing"] not in MISSING:
        raise UsageError(f"--missing {args.pop('missing')}: expected one of {list(MISSING)}")
    missing, a = args.pop("missing"), {k: Path(v) for k, v in args.items()}
    p, absent = evaluated(a, setup("report"), missing)
    out, d = a["out"], load_inputs(a, p)
    r = rep.build(p, **d, not_evaluated=absent)
    for name, df in r["tables"].items():
        save_csv(df, out / f"{name}.csv")
    write_text(out / "table2.md", r["table2_md"])
    write_text(out / "report.md", r["report_md"])
    write_json(out / "summary.json", r["summary"])

    preds, fr = d["preds"], p.report
    images, labels = load_npz(a["raw"] / "test.npz", "test")
    blurred = np.load(a["distorted"] / "test.npy", mmap_mode="r")[0]
    conf = {n: rep.true_confidence(preds[n]).mean(0)[1:].reshape(d["scores"]["test"].shape) for n in p.strategies}
    logs = {n: pd.concat([pd.read_csv(a["logs"] / n / f"seed{k}.tsv", sep="\t") for k in p.train.seeds])
            for n in p.strategies}
    save_fig(figures.fig3(d["metrics"], d["paper_rows"], fr.fig3_panels, len(p.train.seeds), plt), out / "fig3.png")
    save_fig(figures.fig4(images, blurred, labels, [i for i in fr.fig4_examples if i < len(labels)],
                          {n: preds[n]["probs"] for n in fr.fig4_strategies}, plt, CLASSES), out / "fig4.png")
    save_fig(figures.confidence_quality(conf, p.strategies, d["scores"]["test"], fr.quality_bins, plt),
             out / "confidence_quality.png")
    save_fig(figures.training_curves(logs, plt), out / "training.png")
    log.info("wrote %s", ", ".join(sorted(x.name for x in out.iterdir())))


if __name__ == "__main__":
    run(main)
