"""Training: one strategy with one seed, or several (strategy, seed) runs stepped together.

Read top to bottom (nanoGPT's train.py). The images stay on the device as one uint8 tensor of
copies (airbench): each step indexes a batch out of it, standardises it, and builds the soft
targets from a small probability table. Runs trained together are one GroupNet (iqals/model.py):
G networks in one set of grouped kernels, each run with its own initial weights, per-epoch draw
and targets, as if trained alone (a single run is a group of one). The step itself comes in three
forms (train.step): eager, compiled, or captured whole in a CUDA graph (`Steps`, `GraphSteps`).
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

from . import mixture, seeds
from . import model as model_lib
from .errors import ExpectedError
from .io import atomic_path, write_text
from .mixture import epoch_draw, soft_targets, true_class_probability
from .params import DISTORTIONS, LEVELS, NUM_COPIES, Params, Strategy, Train, copy_index
from .seeds import derive_seed

log = logging.getLogger(__name__)
LOG_COLUMNS = ("epoch", "loss", "train_acc", "lr", "images_per_s", "seconds")


class TrainingError(ExpectedError, RuntimeError):
    """Training cannot go on (diverged, or inputs inconsistent with the strategy or the device)."""


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


def lr_at(epoch: int, p: Params) -> float:
    """Staircase decay: lr * lr_decay ** floor(epoch / lr_decay_epochs) (paper 4.3)."""
    return p.train.lr * p.train.lr_decay ** (epoch // p.train.lr_decay_epochs)


def run_losses(logits: torch.Tensor, q: torch.Tensor, kind: str) -> torch.Tensor:
    """Each run's mean loss over its batch, for (..., B, K) logits and targets: Eq. (1), squared
    difference of softmax and target summed over classes; or cross-entropy."""
    if kind == "squared":
        return ((logits.float().softmax(-1) - q) ** 2).sum(-1).mean(-1)
    return -(q * logits.float().log_softmax(-1)).sum(-1).mean(-1)


def loss_fn(logits: torch.Tensor, q: torch.Tensor, kind: str) -> torch.Tensor:
    """The sum of the runs' mean losses: each run's gradient is the one it would have alone."""
    return run_losses(logits, q, kind).sum()


def make_sgd(net: torch.nn.Module, cfg: Train, lr: float | torch.Tensor | None = None,
             fused: bool | None = None) -> torch.optim.SGD:
    """Plain SGD (no momentum: it keeps no state), L2 on net.decayed_parameters() only (paper 4.3)."""
    decayed = {id(w) for w in net.decayed_parameters()}
    return torch.optim.SGD([
        {"params": [w for w in net.parameters() if id(w) in decayed], "weight_decay": cfg.weight_decay},
        {"params": [w for w in net.parameters() if id(w) not in decayed], "weight_decay": 0.0},
    ], lr=cfg.lr if lr is None else lr, fused=fused)


# ---------------------------------------------------------------- the step, in three forms

class _Forward(torch.nn.Module):
    """A batch of every run -> (summed loss, per-run losses, per-run correct, logits): the part
    torch.compile captures (standardising and targets included, so they fuse)."""

    def __init__(self, net: model_lib.GroupNet, kind: str):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x: torch.Tensor, y: torch.Tensor, q_true: torch.Tensor):
        g, b = y.shape
        logits = self.net(model_lib.standardize(x.flatten(0, 1)).unflatten(0, (g, b)))
        q = soft_targets(y.flatten(), q_true.flatten()).unflatten(0, (g, b))
        losses = run_losses(logits, q, self.kind)
        return losses.sum(), losses.detach(), (logits.argmax(-1) == y).sum(-1), logits.detach()


class Steps:
    """An epoch of SGD steps of the G runs stacked in `net`, eager or compiled (train.step =
    compile: torch.compile(mode="reduce-overhead"), CUDA graphs of forward and backward).

    After each step `last_logits` and the parameters' .grad hold that step's values (smoke check).
    """

    def __init__(self, net: model_lib.GroupNet, data: list[TrainData], cfg: Train, device: torch.device,
                 lr: float | torch.Tensor | None = None, fused: bool | None = None, autocast_cache: bool = True):
        self.net, self.cfg, self.device = net, cfg, device
        self.pool, self.labels = data[0].pool, data[0].labels
        self.q_true = torch.stack([d.q_true for d in data])  # (G, copies, N)
        self.rows = torch.arange(len(data), device=device)[:, None]
        self.opt = make_sgd(net, cfg, lr, fused)
        self.forward = _Forward(net, cfg.loss)
        if cfg.step == "compile":
            self.forward = torch.compile(self.forward, mode="reduce-overhead")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16",
                                       cache_enabled=autocast_cache)
        self.last_logits = None

    def batch(self, c: torch.Tensor, j: torch.Tensor):
        """(G, b) copy and image indices -> uint8 images, labels, true-class probabilities."""
        return self.pool[c, j], self.labels[j], self.q_true[self.rows, c, j]

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def step(self, c: torch.Tensor, j: torch.Tensor):
        if self.cfg.step == "compile":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        with self.autocast:
            loss, losses, correct, self.last_logits = self.forward(*self.batch(c, j))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return losses, correct

    def epoch(self, copy: torch.Tensor, image: torch.Tensor, lr: float):
        """One epoch on the (G, n) draws at learning rate lr; returns each run's summed loss and
        number correct, on the device (no host sync inside the epoch)."""
        self.set_lr(lr)
        loss_sum = torch.zeros(copy.shape[0], device=self.device)
        correct = torch.zeros(copy.shape[0], device=self.device, dtype=torch.int64)
        for i in range(0, copy.shape[1], self.cfg.batch_size):
            c, j = copy[:, i:i + self.cfg.batch_size], image[:, i:i + self.cfg.batch_size]
            losses, right = self.step(c, j)
            loss_sum += losses * c.shape[1]
            correct += right
        return loss_sum, correct


class GraphSteps(Steps):
    """The whole step (batch indexing, forward, loss, backward, SGD update, sums) as one CUDA graph.

    The epoch's draws sit in static device buffers and a step counter inside the graph picks the
    batch, so a step is one replay and nothing else. The learning rate is a device tensor read by
    fused SGD, so the schedule needs no recapture. Capture follows PyTorch's whole-network example
    (CUDA semantics notes): warm-up on a side stream, grads set to None just before capture so the
    graph's pool owns them, and never zeroed after (each replay rewrites them). Off CUDA (tests)
    the same step runs uncaptured.
    """

    def __init__(self, net: model_lib.GroupNet, data: list[TrainData], cfg: Train, device: torch.device):
        super().__init__(net, data, cfg, device, lr=torch.tensor(cfg.lr, device=device), fused=True,
                         autocast_cache=False)  # autocast's weight cache must not outlive the capture
        n, bs, g = data[0].labels.numel(), cfg.batch_size, len(data)
        if n % bs:
            raise TrainingError(f"train.step = 'graph' needs train.batch_size ({bs}) to divide the "
                                f"training set size ({n} images): every step must have one shape")
        self.draw = torch.zeros((2, g, n), dtype=torch.int64, device=device)  # copy, image
        self.k = torch.zeros((), dtype=torch.int64, device=device)  # step within the epoch
        self.steps_per_epoch = n // bs
        self.offsets = torch.arange(bs, device=device)
        self.sums = torch.zeros(g, device=device), torch.zeros(g, dtype=torch.int64, device=device)
        self.graph = None

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"].fill_(lr)

    def _step(self) -> None:
        at = (self.k % self.steps_per_epoch) * self.cfg.batch_size + self.offsets  # warm-up may go round
        c, j = self.draw[0].index_select(1, at), self.draw[1].index_select(1, at)
        with self.autocast:
            loss, losses, correct, self.last_logits = self.forward(*self.batch(c, j))
        loss.backward()
        self.opt.step()
        self.sums[0].add_(losses * self.cfg.batch_size)
        self.sums[1].add_(correct)
        self.k.add_(1)

    def _capture(self) -> None:
        weights = [w.detach().clone() for w in self.net.parameters()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: libraries pick kernels and allocate outside the capture
            for _ in range(3):
                self.opt.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():  # the warm-up steps leave no trace in the weights
            for w, w0 in zip(self.net.parameters(), weights):
                w.copy_(w0)
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def epoch(self, copy: torch.Tensor, image: torch.Tensor, lr: float):
        if copy.shape != self.draw.shape[1:]:
            raise TrainingError(f"graph step: draws of shape {tuple(copy.shape)}, captured for {tuple(self.draw.shape[1:])}")
        self.draw[0].copy_(copy)
        self.draw[1].copy_(image)
        self.set_lr(lr)
        if self.graph is None and self.device.type == "cuda":
            self._capture()
        self.k.zero_()
        for s in self.sums:
            s.zero_()
        for _ in range(self.steps_per_epoch):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.opt.zero_grad(set_to_none=True)
                self._step()
        return self.sums[0].clone(), self.sums[1].clone()


def make_steps(net: model_lib.GroupNet, data: list[TrainData], cfg: Train, device: torch.device) -> Steps:
    """The step train.step and train.precision ask for, on `device`."""
    for key, value, plain in (("train.precision", cfg.precision, "fp32"), ("train.step", cfg.step, "eager")):
        if value != plain and device.type != "cuda":
            raise TrainingError(f"{key} = {value!r} needs a GPU (CUDA); this run is on {device}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision == "tf32"
    return (GraphSteps if cfg.step == "graph" else Steps)(net, data, cfg, device)


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
    for module in (model_lib, mixture, seeds, sys.modules[__name__]):
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
    net = model_lib.GroupNet.stack([model_lib.build(p.model, derive_seed(r.seed, "init")) for r in runs])
    for g, s in enumerate(states):
        if s.model is not None:
            net.load_run(g, s.model)
    net = net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    steps = make_steps(net, [r.data for r in runs], cfg, device)

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
        loss_sum, correct = steps.epoch(*draws, lr)
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
