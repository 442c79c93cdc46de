"""Stage deviation: where we differ from the paper, and why -> plots/deviation.md.

From the reference run's metrics (--reference, default results/gpu_e16: the paper's regime), deviation_train's
converged S1 and the probe's rows: deviation_cells.csv (each Table 2 cell against the paper, points and SE),
deviation_conventions.csv (S1's accuracy and mean SSIM per test set under each of deviation.conventions, test sets
remade from data/raw), deviation_probe.png (the probe's curves) and deviation.md in plots/; metrics/deviation.json.
"""
import logging
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from iqals import deviation as dev_lib
from iqals import evaluate, figures
from iqals import report as rep
from iqals.data import load_npz, official_index
from iqals.errors import UsageError
from iqals.io import read_json, write_json
from iqals.model import pick_device
from stages.common import cli, run, setup


def main() -> None:
    args = cli(__doc__, reference="results/gpu_e16", raw="data/raw", model="models/deviation/converged.pt",
               probe="plots/deviation_probe.csv", paper="reference", out="plots", metrics="metrics/deviation.json")
    p = setup("deviation")
    ref, out, r, d = Path(args.reference), Path(args.out), p.report, p.deviation
    names = [n for n in r.table2 if (ref / "metrics" / f"{n}.json").is_file()]
    if not names:
        raise UsageError(f"--reference {ref}: expected a run folder with metrics/<strategy>.json of report.table2")
    metrics = {n: read_json(ref / "metrics" / f"{n}.json") for n in names}
    n_seeds, n_test = len(metrics[names[0]]["seeds"]), metrics[names[0]]["test_images"]
    paper_rows = rep.paper_by_name(pd.read_csv(Path(args.paper) / "paper_table2.csv"), r.table2)
    cells = rep.deviations(rep.table2(metrics, paper_rows), n_test, n_seeds, r.paper_test_size)
    summary = rep.deviation_summary(cells, r.within)
    device = pick_device(p.train.device)
    images, labels = load_npz(Path(args.raw) / "test.npz", "test")
    net = evaluate.load_model(Path(args.model), p, device)
    with tqdm(total=1 + len(d.conventions), desc="conventions", unit="convention") as bar:
        conv = dev_lib.evaluate_conventions(net, images, labels, official_index(Path(args.raw) / "test.npz"), p, device,
                                            progress=bar)
    gaps = dev_lib.type_gaps(conv, paper_rows[d.strategy], r.within)
    probe = pd.read_csv(args.probe)
    trend = dev_lib.probe_trend(probe, d.converged.lr_decay_epochs or 1)
    figures.save_png(figures.probe_curves(probe, paper_rows[d.strategy]), out / "deviation_probe.png")
    md = ["## Where we differ from the paper, and why", "",
          *dev_lib.where_we_differ(summary, gaps, trend, r.within, d.probe.epochs, str(ref)), "",
          f"### Every Table 2 cell of {ref} against the paper", "",
          f"Difference in points (in standard errors: binomial on our {n_test} and the paper's "
          f"{r.paper_test_size} test images" + (f", and the spread of our {n_seeds} seeds" if n_seeds > 1 else "")
          + "). Kinds of cell: " + "; ".join(rep.KINDS) + ".", "",
          rep.deviation_grid(cells), "", rep.markdown(summary, 2), "",
          "### S1 under other conventions of the distortions", "",
          f"{d.strategy} on all {d.train_size} training images ({d.converged.epochs} epochs, decay after "
          f"{d.converged.lr_decay_epochs}, seed {d.seed}), evaluated on the {len(labels)} test images distorted under "
          "each convention; cells: accuracy % (mean SSIM of the set).", "",
          dev_lib.convention_markdown(conv, paper_rows[d.strategy]), "",
          f"### The memorisation probe: {d.strategy} at constant lr {p.train.lr:g}", "",
          f"Accuracy every {d.probe.eval_every} epochs on the ten test sets, and on the first {d.train_eval_size} "
          "training images (eval mode); `train_acc_running` is the epoch's running accuracy while training.", "",
          rep.markdown(probe, 3), "", "![The memorisation probe](deviation_probe.png)", ""]
    rep.write(out, {"deviation_cells": cells, "deviation_conventions": conv}, {"deviation.md": "\n".join(md)})
    default = gaps[gaps.convention == "default"].set_index("type")
    write_json(args.metrics, {
        "reference": str(ref), "cells": int(summary.iloc[-1].cells), "within": int(summary.iloc[-1].within),
        "by_kind": summary.set_index("kind").to_dict(orient="index"),
        "s1_gap_points": {t: round(float(default.loc[t].mean_gap_points), 3) for t in default.index},
        "conventions_closing": {t: list(gaps[(gaps.type == t) & gaps.closes].convention) for t in default.index},
        "probe": trend})
    logging.info("wrote %s/deviation.md", out)


if __name__ == "__main__":
    run(main)
