"""Stage report: metrics/, data/predictions and logs/ -> plots/ (Table 2, claims, controls, figures).

Writes plots/report.md (everything, with the regime that made it), table2.{csv,md},
comparisons.csv (every family's tests per mix and test set), controls.csv, calibration.csv,
unseen.csv, summary.json and the figures fig3.png, fig4.png, confidence_quality.png, training.png.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from iqals import figures, stats  # noqa: E402
from iqals import report as rep  # noqa: E402
from iqals.data import CLASSES, SPLITS, load_npz, official_index  # noqa: E402
from iqals.io import atomic_path, read_json, write_json, write_text  # noqa: E402
from iqals.seeds import derive_seed  # noqa: E402
from stages.common import run, setup  # noqa: E402

log = logging.getLogger("report")


def save_fig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def save_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.5g")


def load_inputs(args, p) -> dict:
    """Everything the report reads, checked to be there before anything is computed."""
    m_dir, p_dir = Path(args.metrics), Path(args.predictions)
    missing = [n for n in p.strategies if not (m_dir / f"{n}.json").is_file() or not (p_dir / f"{n}.npz").is_file()]
    if missing:
        raise ValueError(f"{m_dir} / {p_dir}: no metrics or predictions for {missing} (run their evaluate stages)")
    preds = {}
    for n in p.strategies:
        with np.load(p_dir / f"{n}.npz") as z:
            preds[n] = {k: z[k] for k in ("probs", "labels", "seeds")}
    logs = {n: pd.concat([pd.read_csv(Path(args.logs) / n / f"seed{k}.tsv", sep="\t") for k in p.train.seeds])
            for n in p.strategies}
    images, labels = load_npz(Path(args.raw) / "test.npz", "test")
    return {"metrics": {n: read_json(m_dir / f"{n}.json") for n in p.strategies}, "preds": preds, "logs": logs,
            "images": images, "labels": labels, "n_train": len(official_index(Path(args.raw) / "train.npz")),
            "paper": rep.paper_by_name(pd.read_csv(Path(args.paper) / "paper_table2.csv"), p.report.table2),
            "scores": {s: np.load(Path(args.scores) / f"{s}.npy") for s in SPLITS},
            "clipped": sum(v["clipped"] for v in read_json(m_dir / "score.json")["train"].values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    for name, default in (("metrics", "metrics"), ("predictions", "data/predictions"), ("logs", "logs"),
                          ("raw", "data/raw"), ("distorted", "data/distorted"), ("scores", "data/scores"),
                          ("paper", "reference"), ("out", "plots")):
        ap.add_argument(f"--{name}", default=default)
    args = ap.parse_args()
    p, out = setup("report"), Path(args.out)
    d = load_inputs(args, p)
    metrics, preds, r = d["metrics"], d["preds"], p.report
    n_seeds, n_test = len(p.train.seeds), len(d["labels"])

    t2 = rep.table2(metrics, d["paper"])
    t2_md = rep.table2_markdown(t2, n_seeds)
    boot = stats.Bootstrap(n_test, n_seeds, r.bootstrap, derive_seed(p.base.seed, "report bootstrap"))
    comps = rep.comparisons(p.strategies, preds, r.claim_levels, boot, r.alpha)
    counts = rep.family_counts(comps)
    eps = rep.mix_epsilons(p.strategies, d["scores"]["train"], p.iqa, p.mixture.shares)
    ctrl = rep.controls(p.strategies, metrics, eps, r.claim_levels)
    calib = rep.calibration(metrics, preds, d["scores"]["test"])
    unseen = rep.unseen(p.strategies, metrics, p.corrupt.families)
    s1 = r.table2[0]
    regime = rep.regime(p, d["n_train"], SPLITS["train"], n_test, metrics[s1]["pristine"]["acc"],
                        float(d["paper"][s1]["pristine"]))
    for df, name in ((t2, "table2"), (comps, "comparisons"), (ctrl, "controls"), (calib, "calibration"),
                     (unseen, "unseen")):
        save_csv(df, out / f"{name}.csv")
    write_text(out / "table2.md", t2_md)

    save_fig(figures.fig3(metrics, d["paper"], r.fig3_panels, n_seeds, plt), out / "fig3.png")
    blurred = np.load(Path(args.distorted) / "test.npy", mmap_mode="r")[0]
    ex = [i for i in r.fig4_examples if i < n_test]
    save_fig(figures.fig4(d["images"], blurred, d["labels"], ex, {n: preds[n]["probs"] for n in r.fig4_strategies},
                          plt, CLASSES), out / "fig4.png")
    conf = {n: rep.true_confidence(preds[n]).mean(0)[1:].reshape(d["scores"]["test"].shape) for n in p.strategies}
    save_fig(figures.confidence_quality(conf, p.strategies, d["scores"]["test"], r.quality_bins, plt),
             out / "confidence_quality.png")
    save_fig(figures.training_curves(d["logs"], plt), out / "training.png")

    write_text(out / "report.md", rep.report_markdown(
        p, regime_text=regime, t2_md=t2_md, claims=rep.claim_lines(p.strategies, comps, d["paper"], r.claim_levels),
        conclusions=rep.conclusion_lines(comps, r.alpha), counts=counts, ctrl=ctrl, calib=calib,
        unseen_df=unseen, clipped=d["clipped"], n_boot=r.bootstrap))
    write_json(out / "summary.json", {"test_images": n_test, "seeds": list(p.train.seeds),
                                      "families": counts.set_index("family").to_dict(orient="index"),
                                      "conclusions": rep.conclusion_lines(comps, r.alpha)})
    log.info("wrote %s", ", ".join(sorted(x.name for x in out.iterdir())))


if __name__ == "__main__":
    run(main)
