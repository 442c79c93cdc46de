"""Stage report: metrics/, data/predictions and logs/ -> plots/ (Table 2, claims, controls, figures).

Writes plots/report.md (everything, with the regime that made it), table2.{csv,md},
comparisons.csv (every family's tests per mix and test set), family_counts.csv, controls.csv,
calibration.csv, unseen.csv, summary.json and the figures fig3.png, fig4.png,
confidence_quality.png and training.png.
"""
from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from iqals import figures  # noqa: E402
from iqals import report as rep  # noqa: E402
from iqals.data import CLASSES, SPLITS, DataError, load_npz, official_index  # noqa: E402
from iqals.io import atomic_path, read_json, write_json, write_text  # noqa: E402
from stages.common import cli, run, setup  # noqa: E402

log = logging.getLogger("report")
INPUTS = {"metrics": "metrics", "predictions": "data/predictions", "logs": "logs", "raw": "data/raw",
          "distorted": "data/distorted", "scores": "data/scores", "paper": "reference", "out": "plots"}


def save_fig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def save_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.5g")


def load_inputs(a: dict[str, Path], p) -> dict:
    """Everything the report reads, checked to be there before anything is computed."""
    missing = [n for n in p.strategies if not (a["metrics"] / f"{n}.json").is_file()
               or not (a["predictions"] / f"{n}.npz").is_file()]
    if missing:
        raise DataError(f"{a['metrics']}, {a['predictions']}: nothing for {missing} (run their evaluate stages)")
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
    a = {k: Path(v) for k, v in vars(cli(__doc__, **INPUTS)).items()}
    p, out = setup("report"), a["out"]
    d = load_inputs(a, p)
    r = rep.build(p, **d)
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
