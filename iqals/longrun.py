"""S1 on the full training set at a schedule of its own (params.yaml, `deviation`): converged, for the convention
study, and at constant lr evaluated every few epochs, the memorisation probe; both through iqals.train's loop."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from . import evaluate
from . import train as train_lib
from .io import read_json, write_json
from .params import TEST_SETS, Params

log = logging.getLogger(__name__)


def schedule_params(p: Params, epochs: int, lr_decay_epochs: int | None) -> Params:
    """p with deviation's run: its seed, and `epochs` with the decay every `lr_decay_epochs`
    (None: constant lr, the decay falls after the last epoch)."""
    d = p.deviation
    train = dataclasses.replace(p.train, epochs=epochs, lr_decay_epochs=lr_decay_epochs or epochs,
                                seeds=(d.seed,), checkpoint_every=1, snapshot_every=0)
    return dataclasses.replace(p, train=train, base=dataclasses.replace(p.base, train_size=d.train_size))


def train_run(p: Params, images: np.ndarray, labels: np.ndarray, out: Path, log_out: Path, checkpoint: Path,
              device: torch.device) -> list[dict]:
    """Train deviation.strategy (a pristine-set strategy: no distorted copies, no scores) under p."""
    s = p.strategies[p.deviation.strategy]
    data = train_lib.prepare(s, images, labels, None, None, p, p.deviation.seed, device)
    return train_lib.train(s, p.deviation.seed, data, p, device, out, log_out, checkpoint)


def probe(p: Params, images: np.ndarray, labels: np.ndarray, test_images: np.ndarray, distorted: np.ndarray,
          test_labels: np.ndarray, out: Path, log_out: Path, checkpoint: Path, device: torch.device) -> list[dict]:
    """deviation.probe.epochs at constant lr, a row per evaluation every deviation.probe.eval_every epochs (and the
    last) on the ten test sets and the first deviation.train_eval_size training images. Each call of the train loop
    runs to the next evaluation and resumes from its checkpoint; the rows are kept beside it under its
    fingerprint, so an interrupted probe resumes and a restarted run (other code or parameters) drops the old rows."""
    cfg, q, n = p.deviation.probe, schedule_params(p, p.deviation.probe.epochs, None), p.deviation.train_eval_size
    s = q.strategies[p.deviation.strategy]
    data = train_lib.prepare(s, images, labels, None, None, q, p.deviation.seed, device)
    sets = evaluate.test_sets(test_images, distorted)

    def acc(net, x: np.ndarray, y: np.ndarray) -> float:
        return round(evaluate.accuracy(evaluate.predict(net, x, device, q.evaluate.batch_size), y), 5)

    rows_path = checkpoint.with_name(checkpoint.stem + ".rows.json")
    saved = read_json(rows_path) if rows_path.exists() else {"fingerprint": None, "rows": []}
    fingerprint, rows = saved["fingerprint"], saved["rows"]
    done = torch.load(checkpoint, map_location="cpu", weights_only=False)["epoch"] if checkpoint.exists() else 0
    while True:  # (a stale checkpoint's epoch only shortens the first call: the next one stops at an evaluation)
        train_lib.train(s, p.deviation.seed, data, q, device, out, log_out, checkpoint,
                        stop_after=cfg.eval_every - done % cfg.eval_every)
        ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
        done = ck["epoch"]
        if ck["fingerprint"] != fingerprint:  # the loop started afresh: the old rows are another run's
            fingerprint, rows = ck["fingerprint"], []
        rows = [r for r in rows if r["epoch"] <= ck["epoch"]]
        due = ck["epoch"] % cfg.eval_every == 0 or ck["epoch"] == cfg.epochs
        if due and (not rows or rows[-1]["epoch"] < ck["epoch"]):
            net, last = evaluate.as_net(ck["model"], q, device), ck["history"][-1]
            rows.append({"epoch": ck["epoch"], "lr": last["lr"], "train_acc_running": round(last["train_acc"], 5),
                         "train_acc": acc(net, images[:n], labels[:n]),
                         **{t: acc(net, sets[t], test_labels) for t in TEST_SETS}})
            r = rows[-1]
            log.info("probe epoch %d: train acc %.4f, pristine %.4f, blur_3 %.4f, noise_3 %.4f, jpeg_3 %.4f",
                     r["epoch"], r["train_acc"], r["pristine"], r["blur_3"], r["noise_3"], r["jpeg_3"])
            write_json(rows_path, {"fingerprint": fingerprint, "rows": rows})
        if ck["epoch"] == cfg.epochs:
            return rows
