"""Stage report: metrics/ and data/predictions -> plots/ (Table 2, claims, controls, figures).

Writes plots/table2.{csv,md}, plots/report.md (everything, with the parameters that made it),
plots/paired_tests.csv, plots/controls.csv, plots/calibration.csv, plots/unseen.csv, plots/fig3.png,
plots/fig4.png. `--sync-readme` copies plots/report.md into README.md between its markers.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from iqals import report as rep  # noqa: E402
from iqals.data import CLASSES, load_npz  # noqa: E402
from iqals.io import atomic_path, read_json, write_text
from iqals.readme import replace_block  # noqa: E402
from stages.common import run, setup  # noqa: E402

log = logging.getLogger("report")


def save_fig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def save_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.5g")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--metrics", default="metrics")
    ap.add_argument("--predictions", default="data/predictions")
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--distorted", default="data/distorted")
    ap.add_argument("--scores", default="data/scores")
    ap.add_argument("--paper", default="reference")
    ap.add_argument("--out", default="plots")
    ap.add_argument("--sync-readme", metavar="README", help="only copy plots/report.md into README")
    args = ap.parse_args()
    out = Path(args.out)
    if args.sync_readme:
        return replace_block(args.sync_readme, "report", (out / "report.md").read_text())
    p = setup("report")
    names = list(p.strategies)
    missing = [n for n in names if not (Path(args.metrics) / f"{n}.json").is_file()]
    if missing:
        raise ValueError(f"{args.metrics}: no metrics for {missing} (run their evaluate stages)")
    metrics = {n: read_json(Path(args.metrics) / f"{n}.json") for n in names}
    preds = {}
    for n in names:
        with np.load(Path(args.predictions) / f"{n}.npz") as z:
            preds[n] = {"probs": z["probs"], "labels": z["labels"]}
    paper = pd.read_csv(Path(args.paper) / "paper_table2.csv")
    images, labels = load_npz(Path(args.raw) / "test.npz", "test")
    test_scores = np.load(Path(args.scores) / "test.npy")
    score_meta = read_json(Path(args.metrics) / "score.json")

    t2 = rep.table2(metrics, paper)
    save_csv(t2, out / "table2.csv")
    t2_md = rep.table2_markdown(t2, len(p.train.seeds))
    write_text(out / "table2.md", t2_md)
    tests = rep.paired_tests(p.strategies, preds)
    save_csv(tests, out / "paired_tests.csv")
    eps = rep.mix_epsilons(p.strategies, np.load(Path(args.scores) / "train.npy"), p.iqa, p.mixture.shares)
    ctrl = rep.controls(p.strategies, metrics, eps)
    save_csv(ctrl, out / "controls.csv")
    calib = rep.calibration(metrics, preds, test_scores)
    save_csv(calib, out / "calibration.csv")
    unseen = rep.unseen(p.strategies, metrics, p.corrupt.families)
    save_csv(unseen, out / "unseen.csv")

    save_fig(rep.fig3(metrics, plt), out / "fig3.png")
    blurred = np.load(Path(args.distorted) / "test.npy", mmap_mode="r")[0]
    ex = [i for i in p.report.fig4_examples if i < len(labels)]
    save_fig(rep.fig4(images, blurred, labels, ex, {n: preds[n]["probs"] for n in p.report.fig4_strategies},
                      plt, CLASSES), out / "fig4.png")

    n_test = len(labels)
    setting = (f"Parameters: training images {p.base.train_size or 50000}, test images {n_test}, "
               f"epochs {p.train.epochs} (lr decay every {p.train.lr_decay_epochs}), seeds "
               f"{list(p.train.seeds)}, quality measure {p.iqa.metric} ({p.iqa.transform}), loss "
               f"{p.train.loss}. Standard error of one accuracy on {n_test} images: about "
               f"{100 * np.sqrt(0.25 / n_test):.1f} points.")
    clipped = sum(v["clipped"] for v in score_meta["train"].values())
    sig = tests[(tests["mcnemar_p"] < 0.05)]
    md = [
        "### Table 2, regenerated", "", setting, "",
        "Each cell: our top-1 accuracy in % (the paper's, our difference).", "", t2_md,
        "### Does IQA-LS beat its one-hot twin? (paper's claim, on pristine and the levels it was trained on)",
        "", *rep.claim_lines(p.strategies, metrics, paper), "",
        "### Controls: is it the quality signal or just smoothing?", "",
        "Accuracy on pristine and averaged over the mix's own distorted test sets; ECE and NLL "
        "averaged over the ten test sets; epsilon: the mix's mean per-sample IQA-LS epsilon "
        "K(1 - T(s))/(K - 1) over an epoch, with which uniform_ls smooths every image.", "",
        rep.markdown(ctrl), "",
        f"Paired tests against the one-hot twin (McNemar exact test on per-image correctness, "
        f"pooled over seeds; paired t-test over seeds when there are two or more): "
        f"{len(sig)} of {len(tests)} cells differ at p < 0.05 (plots/paired_tests.csv).", "",
        "### Calibration and confidence vs quality", "",
        "Spearman's rho between the true-class confidence and the test image's quality score, over "
        "the nine distorted test sets; ECE/NLL per test set in plots/calibration.csv.", "",
        rep.markdown(calib[["strategy", "labels", "train_set", "spearman_conf_quality",
                            "pristine_ece", "pristine_nll"]]), "",
        f"Targets clipped to iqa.clip on the training set: {clipped}.", "",
        "### Corruptions never seen in training (CIFAR-10-C style, severities "
        f"{list(p.corrupt.severities)})", "",
        "Accuracy per family, mean over severities and seeds (plots/unseen.csv).", "",
        rep.markdown(unseen), "",
        "![Figure 3](plots/fig3.png)", "", "![Figure 4](plots/fig4.png)", "",
    ]
    write_text(out / "report.md", "\n".join(md))
    write_text(out / "summary.json", json.dumps({"test_images": n_test, "seeds": list(p.train.seeds),
                                                 "significant_cells": int(len(sig)),
                                                 "tested_cells": int(len(tests))}, indent=2) + "\n")
    log.info("wrote %s", ", ".join(sorted(x.name for x in out.iterdir())))


if __name__ == "__main__":
    run(main)
