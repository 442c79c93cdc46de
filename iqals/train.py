"""Training: one strategy with one seed, or several (strategy, seed) runs stepped together.

Read top to bottom (nanoGPT's train.py). The images stay on the device as one uint8 tensor of
copies (airbench): each step indexes a batch out of it, standardises it, and builds the soft
targets from a small probability table. Runs trained together are one GroupNet (iqals/stacked.py):
G networks in one set of grouped kernels, each run with its own initial weights, per-epoch draw
and targets, as if trained alone (a single run is a group of one). The step itself comes in three
forms (train.step, iqals/steps.py): eager, compiled, or captured whole in a CUDA graph.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import mixture, seeds, stacked, steps
from . import model as model_lib
from .errors import TrainingError, UsageError
from .io import atomic_path, write_text
from .mixture import epoch_draw, true_class_probability
from .params import DISTORTIONS, LEVELS, NUM_COPIES, Params, Strategy, copy_index
from .seeds import derive_seed

log = logging.getLogger(__name__)
LOG_COLUMNS = ("epoch", "loss", "train_acc", "lr", "images_per_s", "seconds")


@dataclass
class TrainData:
    """One run's training inputs, resident on the device; runs prepared together share pool and labels."""
    pool: torch.Tensor     # uint8 (copies, N, 3, 32, 32); copies as in iqals/mixture.py
    labels: torch.Tensor   # int64 (N,)
    q_true: torch.Tensor   # float32 (copies, N): target probability of the true class
    fingerprint: str       # identifies these inputs: a checkpoint is resumed only on the same inputs


def prepare(strategy: Strategy, images: np.ndarray, labels: np.ndarray,
            distorted: np.ndarray | None, scores: np.ndarray | None, p: Params, seed: int,
            device: torch.device) -> TrainData:
    """Put the copies the strategy draws from on the device, with their targets."""
    return prepare_group([(strategy, seed)], images, labels, distorted, scores, p, device)[0]


def prepare_group(runs: list[tuple[Strategy, int]], images: np.ndarray, labels: np.ndarray,
                  distorted: np.ndarray | None, scores: np.ndarray | None, p: Params,
                  device: torch.device) -> list[TrainData]:
    """Inputs of several (strategy, seed) runs: one pool with every copy any of them draws from
    (the others stay zero), one target table per run."""
    n = len(labels)
    pool = torch.zeros((NUM_COPIES, n, 3, 32, 32), dtype=torch.uint8, device=device)
    pool[0] = torch.tensor(images).permute(0, 3, 1, 2).to(device)
    for d in sorted({d for s, _ in runs for d in s.distortions}, key=DISTORTIONS.index):
        if distorted is None:
            s = next(s for s, _ in runs if d in s.distortions)
            raise TrainingError(f"strategy {s.name} ({s.train_set}) needs the distorted set")
        t = DISTORTIONS.index(d)
        for lv in range(LEVELS):
            pool[copy_index(t, lv)] = torch.tensor(distorted[t, lv]).permute(0, 3, 1, 2).to(device)  # copy of mmap
    labels_t = torch.tensor(labels).to(device)
    copy_hash = {}  # a strided sample of each copy, hashed once for all runs
    out = []
    for s, seed in runs:
        q = true_class_probability(s, n, scores, p.iqa, p.mixture.shares, seed)
        h = hashlib.sha256(q.tobytes())
        h.update(labels.tobytes())
        for c in [0] + [copy_index(DISTORTIONS.index(d), lv) for d in s.distortions for lv in range(LEVELS)]:
            if c not in copy_hash:  # (the copies it draws from)
                copy_hash[c] = hashlib.sha256(pool[c, ::97].cpu().numpy().tobytes()).digest()
            h.update(copy_hash[c])
        out.append(TrainData(pool, labels_t, torch.from_numpy(q).float().to(device), h.hexdigest()[:16]))
    return out


def parse_runs(strategy: str | None, seed: int | str | None, run: list[str], scores: str | None,
               p: Params) -> list[tuple[Strategy, int]]:
    """The train stage's runs (--strategy S --seed k, or --run S:k ...), checked against
    params.yaml and --scores."""
    if bool(run) == (strategy is not None and seed is not None):
        raise UsageError("give either --strategy S --seed k, or one or more --run S:k")
    specs = [(strategy, str(seed))] if not run else [r.partition(":")[::2] for r in run]
    runs = []
    for name, k in specs:
        if name not in p.strategies:
            raise UsageError(f"strategy {name!r}: not in params.yaml strategies {sorted(p.strategies)}")
        if not k.isdigit() or int(k) not in p.train.seeds:
            raise UsageError(f"{name}:{k}: seed not in params.yaml train.seeds {list(p.train.seeds)}")
        if (name, int(k)) in [(s.name, j) for s, j in runs]:
            raise UsageError(f"run {name}:{k} given twice")
        runs.append((p.strategies[name], int(k)))
    needy = [s for s, _ in runs if s.needs_scores]
    if needy and scores is None:
        s = needy[0]
        raise UsageError(f"strategy {s.name} (labels {s.labels}) needs --scores: train it in dvc.yaml's "
                         "train_scored group")
    if not needy and scores is not None:
        s = runs[0][0]
        raise UsageError(f"strategy {s.name} (labels {s.labels}) must not read scores: train it in dvc.yaml's "
                         "train_onehot group" + (" (no run given needs --scores)" if len(runs) > 1 else ""))
    return runs


def lr_at(epoch: int, p: Params) -> float:
    """Staircase decay: lr * lr_decay ** floor(epoch / lr_decay_epochs) (paper 4.3)."""
    return p.train.lr * p.train.lr_decay ** (epoch // p.train.lr_decay_epochs)


# ---------------------------------------------------------------- runs: resume, loop, outputs

@dataclass
class Run:
    """One (strategy, seed) run: its inputs and where its outputs go."""
    strategy: Strategy
    seed: int
    data: TrainData
    model_out: Path
    log_out: Path
    checkpoint: Path

    @property
    def name(self) -> str:
        return f"{self.strategy.name} seed {self.seed}"


@dataclass
class _State:
    fingerprint: str
    epoch: int                 # epochs done
    history: list[dict]
    model: dict | None         # Net state_dict to resume from, or None: fresh initialisation


def _fingerprint(run: Run, p: Params, device: torch.device) -> str:
    """What a checkpoint must match to be resumed: run, inputs, parameters, the training code
    itself (so a finished checkpoint never stands in for a run of changed code), torch, device.
    Not the group a run was trained in: the stacked step is each run's own to float rounding."""
    cfg = {"run": run.name, "data": run.data.fingerprint, "train": asdict(p.train), "model": asdict(p.model),
           "mixture": asdict(p.mixture), "strategy": asdict(run.strategy), "torch": torch.__version__,
           "device": device.type}
    cfg["train"].pop("checkpoint_every")
    cfg["train"].pop("seeds")
    h = hashlib.sha256(repr(cfg).encode())
    for module in (model_lib, stacked, steps, mixture, seeds, sys.modules[__name__]):
        h.update(Path(inspect.getsourcefile(module)).read_bytes())
    return h.hexdigest()[:16]


def _resume(run: Run, p: Params, device: torch.device) -> _State:
    fingerprint = _fingerprint(run, p, device)
    if run.checkpoint.exists():
        ck = torch.load(run.checkpoint, map_location="cpu", weights_only=False)
        if ck.get("fingerprint") == fingerprint:
            log.info("%s: resuming from %s after epoch %d", run.name, run.checkpoint, ck["epoch"])
            return _State(fingerprint, ck["epoch"], ck["history"], ck["model"])
        log.info("%s: ignoring %s (its fingerprint differs: other parameters, data, training code, torch "
                 "or device)", run.name, run.checkpoint)
    return _State(fingerprint, 0, [], None)


def _write_log(path: Path, history: list[dict]) -> None:
    lines = ["\t".join(LOG_COLUMNS)]
    lines += ["\t".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]) for c in LOG_COLUMNS)
              for row in history]
    write_text(path, "\n".join(lines) + "\n")


def train(strategy: Strategy, seed: int, data: TrainData, p: Params, device: torch.device,
          model_out: Path, log_out: Path, checkpoint: Path, stop_after: int | None = None):
    """Train one run (a group of one, see train_group); its history, or None if stopped early."""
    return train_group([Run(strategy, seed, data, model_out, log_out, checkpoint)], p, device, stop_after)[0]


def train_group(runs: list[Run], p: Params, device: torch.device, stop_after: int | None = None):
    """Train the runs together, each checkpointed every train.checkpoint_every epochs and resumed
    from its own checkpoint; runs whose checkpoints stopped at different epochs are trained in
    subgroups, one after the other (a stacked step has one epoch for all).

    Returns each run's history, or None for a run that `stop_after` (tests of resumption) ended
    after that many epochs before its last.
    """
    if len({id(r.data.pool) for r in runs}) != 1:
        raise TrainingError("runs trained together must share one pool: prepare them with one prepare_group call")
    if len({r.name for r in runs}) != len(runs):
        raise TrainingError(f"the same run twice in one group: {[r.name for r in runs]}")
    states = [_resume(r, p, device) for r in runs]
    out = [None] * len(runs)
    for start in sorted({s.epoch for s in states}):
        idx = [i for i, s in enumerate(states) if s.epoch == start]
        done = _train_together([runs[i] for i in idx], [states[i] for i in idx], p, device, stop_after)
        for i, history in zip(idx, done):
            out[i] = history
    return out


def _train_together(runs: list[Run], states: list[_State], p: Params, device: torch.device,
                    stop_after: int | None):
    cfg, start = p.train, states[0].epoch
    net = stacked.GroupNet.stack([model_lib.build(p.model, derive_seed(r.seed, "init")) for r in runs])
    for g, s in enumerate(states):
        if s.model is not None:
            net.load_run(g, s.model)
    net = net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    stepper = steps.make_steps(net, [r.data for r in runs], cfg, device)

    n, n_runs = runs[0].data.labels.numel(), len(runs)
    end = cfg.epochs if stop_after is None else min(cfg.epochs, start + stop_after)
    bar = tqdm(range(start, end), desc=runs[0].name if n_runs == 1 else f"{n_runs} runs", unit="epoch",
               initial=start, total=cfg.epochs)
    def draw(epoch: int):  # each run's own (copy, image) order of the epoch, stacked: (G, n) each
        draws = [epoch_draw(n, r.strategy, p.mixture.shares, r.seed, epoch) for r in runs]
        return [torch.stack(t).to(device) for t in zip(*draws)]

    draws = draw(start)
    for epoch in bar:
        # -------- one epoch: batches cut from the resident pool by indexing with the draws
        lr = lr_at(epoch, p)
        net.train()
        t0 = time.perf_counter()
        loss_sum, correct = stepper.epoch(*draws, lr)
        if epoch + 1 < end:
            draws = draw(epoch + 1)  # on the host while a GPU still works through the epoch
        losses, correct = (loss_sum / n).tolist(), correct.tolist()
        seconds = time.perf_counter() - t0
        # -------- end of epoch: check, log, checkpoint (each run its own)
        bad = [f"strategy {r.strategy.name}, seed {r.seed}: loss is {loss}" for r, loss in zip(runs, losses)
               if not math.isfinite(loss)]
        if bad:
            raise TrainingError(f"{'; '.join(bad)} in epoch {epoch + 1} (lr {lr:g}); training stopped")
        for g, (r, s) in enumerate(zip(runs, states)):
            row = {"epoch": epoch + 1, "loss": losses[g], "train_acc": correct[g] / n, "lr": lr,
                   "images_per_s": n / seconds, "seconds": seconds}
            s.history.append(row)
            log.info("%s epoch %d/%d loss %.4f train_acc %.4f lr %g %.0f img/s", r.name, epoch + 1,
                     cfg.epochs, row["loss"], row["train_acc"], lr, n / seconds)
            _write_log(r.log_out, s.history)
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                with atomic_path(r.checkpoint) as tmp:  # SGD without momentum has no state to keep
                    torch.save({"fingerprint": s.fingerprint, "epoch": epoch + 1, "history": s.history,
                                "model": _cpu(net.run_state(g))}, tmp)
        bar.set_postfix(loss=f"{sum(losses) / n_runs:.4f}", ips=f"{n_runs * n / seconds:.0f}")
    if end < cfg.epochs:
        return [None] * n_runs
    for g, (r, s) in enumerate(zip(runs, states)):
        with atomic_path(r.model_out) as tmp:  # the resolved config travels with the weights
            torch.save({"model": _cpu(net.run_state(g)), "strategy": asdict(r.strategy), "seed": r.seed,
                        "params": p.to_dict(), "history": s.history}, tmp)
        _write_log(r.log_out, s.history)
    return [s.history for s in states]


def _cpu(state: dict) -> dict:
    return {k: v.cpu() for k, v in state.items()}
