"""Stage deviation: where we differ from the paper, and why -> plots/deviation.md.

Reads the reference run's metrics (--reference, default results/gpu_e16: the paper's regime),
the converged S1 of deviation_train and the probe's rows, and writes
- plots/deviation_cells.csv: every Table 2 cell of the reference run against the paper (points, SE);
- plots/deviation_conventions.csv: S1's accuracy and the mean SSIM per test set under each
  convention of params.yaml's deviation.conventions (test sets remade from data/raw);
- plots/deviation_probe.png: the memorisation probe's curves;
- plots/deviation.md: the tables and the section "Where we differ from the paper, and why";
- metrics/deviation.json: the counts and gaps, for `dvc metrics diff`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import yaml
from tqdm import tqdm

from iqals import deviation as dev_lib
from iqals import evaluate, figures
from iqals import report as rep
from iqals.data import load_npz, official_index
from iqals.errors import UsageError
from iqals.io import atomic_path, read_json, write_json, write_text
from iqals.model import pick_device
from stages.common import cli, run, setup

log = logging.getLogger("deviation")


def main() -> None:
    args = cli(__doc__, reference="results/gpu_e16", raw="data/raw", model="models/deviation/converged.pt",
               probe="plots/deviation_probe.csv", paper="reference", out="plots", metrics="metrics/deviation.json")
    p = setup("deviation")
    ref, out = Path(args.reference), Path(args.out)
    ref_params = ref / "params.yaml"
    if not (ref / "metrics").is_dir() or not ref_params.is_file():
        raise UsageError(f"--reference {ref}: expected a run folder with metrics/ and params.yaml")
    ref_raw = yaml.safe_load(ref_params.read_text())
    names = [n for n in p.report.table2 if (ref / "metrics" / f"{n}.json").is_file()]
    metrics = {n: read_json(ref / "metrics" / f"{n}.json") for n in names}
    paper_rows = rep.paper_by_name(pd.read_csv(Path(args.paper) / "paper_table2.csv"), p.report.table2)
    n_test, n_seeds = metrics[names[0]]["test_images"], len(ref_raw["train"]["seeds"])
    cells = rep.deviations(rep.table2(metrics, {n: paper_rows[n] for n in names}), n_test, n_seeds,
                               p.report.paper_test_size)
    summary = rep.deviation_summary(cells, p.report.within)

    device = pick_device(p.train.device)
    images, labels = load_npz(Path(args.raw) / "test.npz", "test")
    index = official_index(Path(args.raw) / "test.npz")
    net = evaluate.load_model(Path(args.model), p, device)
    with tqdm(total=1 + len(p.deviation.conventions), desc="conventions", unit="convention") as bar:
        conv = dev_lib.evaluate_conventions(net, images, labels, index, p, device, progress=bar)
    s1 = p.deviation.strategy
    ct = dev_lib.convention_table(conv, paper_rows[s1])
    gaps = dev_lib.type_gaps(ct, p.report.within)
    probe = pd.read_csv(args.probe)
    trend = dev_lib.probe_trend(probe, p.deviation.converged.lr_decay_epochs or 1)
    figures.save_png(figures.probe_curves(probe, paper_rows[s1]), out / "deviation_probe.png")

    for name, df in (("deviation_cells", cells), ("deviation_conventions", conv)):
        with atomic_path(out / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False, float_format="%.5g")
    conv_epochs = f"{p.deviation.converged.epochs} epochs, decay after {p.deviation.converged.lr_decay_epochs}"
    md = ["## Where we differ from the paper, and why", "",
          *dev_lib.where_we_differ(cells, summary, gaps, trend, p.report.within, p.deviation.probe.epochs, str(ref)), "",
          f"### Every Table 2 cell of {ref} against the paper", "",
          f"Difference in points (in standard errors: binomial on our {n_test} and the paper's "
          f"{p.report.paper_test_size} test images" + (f", and the spread of our {n_seeds} seeds" if n_seeds > 1 else "")
          + "). Kinds of cell: " + "; ".join(rep.KINDS) + ".", "",
          rep.deviation_grid(cells), "", rep.markdown(summary, 2), "",
          f"### S1 under other conventions of the distortions", "",
          f"{s1} on all {p.deviation.train_size} training images ({conv_epochs}, seed {p.deviation.seed}), evaluated on "
          f"the {len(labels)} test images distorted under each convention; cells: accuracy % (mean SSIM of the set).", "",
          dev_lib.convention_markdown(ct), "",
          f"### The memorisation probe: {s1} at constant lr {p.train.lr:g}", "",
          f"Accuracy every {p.deviation.probe.eval_every} epochs on the ten test sets, and on the first "
          f"{p.deviation.train_eval_size} training images (eval mode); `train_acc_running` is the epoch's running "
          "accuracy while training.", "",
          rep.markdown(probe, 3), "", "![The memorisation probe](deviation_probe.png)", ""]
    write_text(out / "deviation.md", "\n".join(md))
    default = gaps[gaps.convention == "default"].set_index("type")
    write_json(args.metrics, {
        "reference": str(ref), "cells": int(summary.iloc[-1].cells), "within": int(summary.iloc[-1].within),
        "by_kind": summary.set_index("kind").to_dict(orient="index"),
        "s1_gap_points": {d: round(float(default.loc[d].mean_gap_points), 3) for d in default.index},
        "conventions_closing": {d: list(gaps[(gaps.type == d) & gaps.closes].convention) for d in default.index},
        "probe": trend})
    log.info("wrote %s/deviation.md", out)


if __name__ == "__main__":
    run(main)
