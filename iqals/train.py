"""Training: (strategy, seed) runs stacked in one network, read top to bottom (nanoGPT's train.py).

1. Inputs: the images stay on the device as one uint8 tensor of copies (airbench); each step
   indexes a batch out of it, standardises it and builds the soft targets from a small table.
2. The step: Eq. (1) and plain SGD, in the variant train.precision, train.step and train.layout
   ask for: eager, compiled, or the whole step captured in one CUDA graph; runs side by side in
   channels (model.Net) or along the batch (fused.BatchStackedNet).
3. Its check: a few steps of the variant, runs stacked, against each run alone in fp32 eager on
   the CPU; on a GPU a variant that fails is not used (the log says why).
4. The loop: resume each run from its checkpoint, epochs, log, checkpoint (and snapshots), model.

Runs trained together are one model.Net of G groups, each run with its own initial weights,
per-epoch draw and targets, as if trained alone (a single run is a group of one).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import model
from .errors import TrainingError
from .io import atomic_path, write_text
from .mixture import epoch_draw, soft_targets, true_class_probability
from .params import (DISTORTIONS, LEVELS, NUM_CLASSES, NUM_COPIES, REFERENCE_STEP, Params, Strategy, Train,
                     copy_index, off_reference)
from .seeds import derive_seed

log = logging.getLogger(__name__)
LOG_COLUMNS = ("epoch", "loss", "train_acc", "lr", "images_per_s", "seconds")
# The model file's history leaves the timings to the log: its bytes, hashed in dvc.lock, are then
# the same on every run of the same training, and evaluation reruns only when the weights change.
MODEL_COLUMNS = LOG_COLUMNS[:4]
# The training code, in every checkpoint's fingerprint (fused.py by its text: Triton is imported
# only for train.layout 'batch'); dvc.yaml's training stages list the same files.
SOURCES = ("train.py", "model.py", "fused.py", "mixture.py", "seeds.py")


# ---------------------------------------------------------------- 1. inputs, resident on the device

@dataclass
class TrainData:
    """One run's training inputs; runs prepared together share pool and labels."""
    pool: torch.Tensor     # uint8 (copies, N, 3, 32, 32); copies as params.copy_index numbers them
    labels: torch.Tensor   # int64 (N,)
    q_true: torch.Tensor   # float32 (copies, N): target probability of the true class
    fingerprint: str       # identifies these inputs: a checkpoint is resumed only on the same inputs


def prepare_group(runs: list[tuple[Strategy, int]], images: np.ndarray, labels: np.ndarray,
                  distorted: np.ndarray | None, scores: np.ndarray | None, p: Params,
                  device: torch.device) -> list[TrainData]:
    """Inputs of (strategy, seed) runs: one pool with every copy any of them draws from (the
    others stay zero), one target table per run."""
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
    copy_hash, out = {}, []  # a strided sample of each copy, hashed once for all runs
    for s, seed in runs:
        q = true_class_probability(s, n, scores, p.iqa, p.mixture.shares, seed)
        h = hashlib.sha256(q.tobytes())
        h.update(labels.tobytes())
        for c in [0] + [copy_index(DISTORTIONS.index(d), lv) for d in s.distortions for lv in range(LEVELS)]:
            if c not in copy_hash:
                copy_hash[c] = hashlib.sha256(pool[c, ::97].cpu().numpy().tobytes()).digest()
            h.update(copy_hash[c])
        out.append(TrainData(pool, labels_t, torch.from_numpy(q).float().to(device), h.hexdigest()[:16]))
    return out


def prepare(strategy: Strategy, images, labels, distorted, scores, p: Params, seed: int,
            device: torch.device) -> TrainData:
    return prepare_group([(strategy, seed)], images, labels, distorted, scores, p, device)[0]


def lr_at(epoch: int, cfg: Train) -> float:
    """Staircase decay: lr * lr_decay ** floor(epoch / lr_decay_epochs) (paper 4.3)."""
    return cfg.lr * cfg.lr_decay ** (epoch // cfg.lr_decay_epochs)


# ---------------------------------------------------------------- 2. the step and its variants

def run_losses(logits: torch.Tensor, q: torch.Tensor, kind: str) -> torch.Tensor:
    """Each run's mean loss over its batch, for (..., B, K) logits and targets: Eq. (1), squared
    difference of softmax and target summed over classes; or cross-entropy. Their sum is what
    a step minimises: each run's gradient is the one it would have alone."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: the loss in fp32
    if kind == "squared":
        return ((logits.softmax(-1) - q) ** 2).sum(-1).mean(-1)
    return -(q * logits.log_softmax(-1)).sum(-1).mean(-1)


def make_sgd(net: torch.nn.Module, cfg: Train, lr: float | torch.Tensor | None = None,
             fused: bool | None = None) -> torch.optim.SGD:
    """Plain SGD (no momentum: it keeps no state), L2 on net.decayed_parameters() only (paper 4.3)."""
    decayed = {id(w) for w in net.decayed_parameters()}
    return torch.optim.SGD([
        {"params": [w for w in net.parameters() if id(w) in decayed], "weight_decay": cfg.weight_decay},
        {"params": [w for w in net.parameters() if id(w) not in decayed], "weight_decay": 0.0},
    ], lr=cfg.lr if lr is None else lr, fused=fused)


class Step:
    """Epochs of SGD steps of the G runs stacked in `net`, as cfg.step asks:

    eager: op by op. compile: the forward under torch.compile(mode="reduce-overhead"). graph: the
    whole step (batch indexing, forward, loss, backward, SGD update, sums) as one CUDA graph: the
    epoch's draws sit in static buffers and a step counter inside the graph picks the batch, the
    learning rate is a device tensor read by fused SGD (no recapture for the schedule). Capture
    follows PyTorch's whole-network example: warm-up on a side stream, grads set to None just
    before capture so the graph's pool owns them. Off CUDA (tests) the graph step runs uncaptured.
    After an epoch `last_logits` and the parameters' .grad hold its last step's values (the check).
    """

    def __init__(self, net: model.Net, data: list[TrainData], cfg: Train, device: torch.device):
        if device.type == "cuda":  # process-wide switches: the step of this process sets them
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision == "tf32"
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark  # before any capture: the graph keeps its kernels
        self.net, self.cfg, self.device, self.graphed = net, cfg, device, cfg.step == "graph"
        self.pool, self.labels = data[0].pool, data[0].labels
        self.q_true = torch.stack([d.q_true for d in data])  # (G, copies, N)
        self.rows = torch.arange(len(data), device=device)[:, None]
        lr = torch.tensor(cfg.lr, device=device) if self.graphed else cfg.lr
        self.opt = make_sgd(net, cfg, lr, fused=True if self.graphed else None)
        self.forward = torch.compile(self._forward, mode="reduce-overhead") if cfg.step == "compile" else self._forward
        # autocast's weight cache must not outlive a graph's capture
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16",
                                       cache_enabled=not self.graphed)
        self.last_logits = self.graph = None
        if self.graphed:
            n, bs, g = len(self.labels), cfg.batch_size, len(data)
            if n % bs:
                raise TrainingError(f"train.step = 'graph' needs train.batch_size ({bs}) to divide the "
                                    f"training set size ({n} images): every step must have one shape")
            self.draws = torch.zeros((2, g, n), dtype=torch.int64, device=device)  # copy, image
            self.k = torch.zeros((), dtype=torch.int64, device=device)  # step within the epoch
            self.offsets = torch.arange(bs, device=device)
            self.sums = torch.zeros(g, device=device), torch.zeros(g, dtype=torch.int64, device=device)

    def batch(self, c: torch.Tensor, j: torch.Tensor):
        """(G, b) copy and image indices -> uint8 images, labels, true-class probabilities."""
        return self.pool[c, j], self.labels[j], self.q_true[self.rows, c, j]

    def _forward(self, x: torch.Tensor, y: torch.Tensor, q_true: torch.Tensor):
        g, b = y.shape
        logits = self.net(model.standardize(x.flatten(0, 1)).unflatten(0, (g, b)))
        q = soft_targets(y.flatten(), q_true.flatten()).unflatten(0, (g, b))
        losses = run_losses(logits, q, self.cfg.loss)
        return losses.sum(), losses.detach(), (logits.argmax(-1) == y).sum(-1), logits.detach()

    def _update(self, c: torch.Tensor, j: torch.Tensor):
        with self.autocast:
            loss, losses, correct, self.last_logits = self.forward(*self.batch(c, j))
        loss.backward()
        self.opt.step()
        return losses, correct

    def _graph_step(self) -> None:
        at = (self.k % (self.draws.shape[2] // self.cfg.batch_size)) * self.cfg.batch_size + self.offsets
        losses, correct = self._update(self.draws[0].index_select(1, at), self.draws[1].index_select(1, at))
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
                self._graph_step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():  # the warm-up steps leave no trace in the weights
            for w, w0 in zip(self.net.parameters(), weights):
                w.copy_(w0)
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._graph_step()

    def epoch(self, copy: torch.Tensor, image: torch.Tensor, lr: float):
        """One epoch on the (G, n) draws at learning rate lr; each run's summed loss and number
        correct, on the device (no host sync inside the epoch)."""
        for group in self.opt.param_groups:
            if self.graphed:
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        if not self.graphed:
            loss_sum = torch.zeros(copy.shape[0], device=self.device)
            correct = torch.zeros(copy.shape[0], device=self.device, dtype=torch.int64)
            for i in range(0, copy.shape[1], self.cfg.batch_size):
                if self.cfg.step == "compile":
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
                self.opt.zero_grad(set_to_none=True)
                c, j = copy[:, i:i + self.cfg.batch_size], image[:, i:i + self.cfg.batch_size]
                losses, right = self._update(c, j)
                loss_sum += losses * c.shape[1]
                correct += right
            return loss_sum, correct
        if copy.shape != self.draws.shape[1:]:
            raise TrainingError(f"graph step: draws of shape {tuple(copy.shape)}, "
                                f"captured for {tuple(self.draws.shape[1:])}")
        self.draws[0].copy_(copy)
        self.draws[1].copy_(image)
        if self.graph is None and self.device.type == "cuda":
            self._capture()
        self.k.zero_()
        for s in self.sums:
            s.zero_()
        for _ in range(len(self.labels) // self.cfg.batch_size):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.opt.zero_grad(set_to_none=True)
                self._graph_step()
        return self.sums[0].clone(), self.sums[1].clone()


# ---------------------------------------------------------------- 3. the check of a variant

# Largest relative difference ||device - cpu|| / ||cpu|| allowed after CHECK_STEPS steps, per
# precision, for the last step's logits, the summed losses, the last step's gradients and the
# weight updates. The check catches a broken step (a stale buffer, a wrong batch or target, a
# missed update): O(1) differences. Rounding gives far less, but this network's gradients are
# sensitive: a 3x3 max pool whose two largest inputs are within rounding routes the gradient to
# the other one, and the squared loss's gradient (softmax - target) cancels, so gradients and
# updates are allowed far more than logits. fp32 differs from the CPU step in summation order
# alone; each product's inputs are rounded to 8 significant bits in bf16 (autocast; unit roundoff
# 2^-8, 3.9e-3), to 11 in tf32 (tensor cores' TF32 mode; 2^-11): between. check_step returns what it
# measured, and the training log and the probe's results give it for the GPU at hand.
TOLERANCE = {
    "fp32": {"logits": 1e-4, "loss": 1e-4, "gradients": 1e-2, "updates": 1e-2},
    "tf32": {"logits": 5e-3, "loss": 1e-3, "gradients": 0.2, "updates": 0.2},
    "bf16": {"logits": 3e-2, "loss": 1e-2, "gradients": 0.4, "updates": 0.4},
}
CHECK_STEPS = 3


def synthetic(groups: int, n: int, device: torch.device, seed: int = 0):
    """Random resident data for `groups` runs: TrainData each (one shared pool of every copy,
    random labels, targets in [0.3, 1]) and (G, n) copy and image draws."""
    on_device = torch.Generator(device).manual_seed(seed)  # the pool is large: drawn where it lives
    pool = torch.randint(0, 256, (NUM_COPIES, n, 3, 32, 32), generator=on_device, dtype=torch.uint8, device=device)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g).to(device)
    data = []
    for r in range(groups):
        q = 0.3 + 0.7 * torch.rand((NUM_COPIES, n), generator=g)
        q[0] = 1.0
        data.append(TrainData(pool, labels, q.to(device), f"synthetic{r}"))
    copy = torch.randint(0, NUM_COPIES, (groups, n), generator=g)
    image = torch.stack([torch.randperm(n, generator=g) for _ in range(groups)])
    return data, copy.to(device), image.to(device)


def net_class(layout: str) -> type[model.Net]:
    """model.Net for train.layout 'channels'; fused.BatchStackedNet for 'batch' (Triton kernels:
    imported only when asked for)."""
    if layout == "batch":
        from . import fused
        return fused.BatchStackedNet
    return model.Net


def stacked(p: Params, run_seeds: list[int], device: torch.device, layout: str = "channels") -> model.Net:
    """The runs' initial networks (init seeds derived from their seeds) stacked in `layout` on device."""
    net = net_class(layout).stack([model.build(p.model, derive_seed(s, "init")) for s in run_seeds]).to(device)
    return net.to(memory_format=torch.channels_last) if device.type == "cuda" else net


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_step(p: Params, device: torch.device, cfg: Train, groups: int) -> dict:
    """CHECK_STEPS steps of cfg's variant, `groups` runs stacked on `device`, against each run
    alone in fp32 eager on the CPU from the same weights and batches (the first and last run).
    Returns the largest relative and absolute differences of the last step's logits and
    gradients, of the weight updates and of the summed losses, and `ok`: each relative one
    within TOLERANCE[cfg.precision]."""
    device, cpu = torch.device(device), torch.device("cpu")
    data, copy, image = synthetic(groups, CHECK_STEPS * cfg.batch_size, device, seed=1)
    net = stacked(p, list(range(groups)), device, cfg.layout)
    checked = sorted({0, groups - 1})
    before = {r: net.run_state(r) for r in checked}
    step = Step(net, data, cfg, device)
    loss_sum, _ = step.epoch(copy, image, cfg.lr)
    worst = dict.fromkeys(("logits", "gradients", "updates", "loss"), (0.0, 0.0))
    for r in checked:
        ref_net = stacked(p, [r], cpu)
        ref_data = [TrainData(data[r].pool.to(cpu), data[r].labels.to(cpu), data[r].q_true.to(cpu), "")]
        ref = Step(ref_net, ref_data, _plain(cfg), cpu)
        ref_loss, _ = ref.epoch(copy[r:r + 1].to(cpu), image[r:r + 1].to(cpu), cfg.lr)
        params = dict(ref_net.named_parameters())
        got = {"logits": [(step.last_logits[r], ref.last_logits[0])],
               "gradients": [(w.grad.unflatten(0, (groups, -1))[r], params[k].grad) for k, w in net.named_parameters()],
               "updates": [(v - before[r][k], ref_net.state_dict()[k] - before[r][k].cpu())
                           for k, v in net.run_state(r).items()],
               "loss": [(loss_sum[r], ref_loss[0])]}
        for what, pairs in got.items():
            rel = max(_rel(a, b) for a, b in pairs)
            diff = max(float((a.detach().double().cpu() - b.double()).abs().max()) for a, b in pairs)
            worst[what] = (max(worst[what][0], rel), max(worst[what][1], diff))
    out = {"precision": cfg.precision, "step": cfg.step, "layout": cfg.layout, "group": groups, "device": device.type,
           "tolerance": TOLERANCE[cfg.precision]}
    for what, (rel, diff) in worst.items():
        out[f"{what}_rel"], out[f"{what}_abs"] = rel, diff
    out["ok"] = all(rel <= TOLERANCE[cfg.precision][what] for what, (rel, _) in worst.items())  # NaN fails
    return out


def _plain(cfg: Train) -> Train:
    """The reference step (params.REFERENCE_STEP), cuDNN's autotuner off."""
    return dataclasses.replace(cfg, **REFERENCE_STEP, cudnn_benchmark=False)


def describe(cfg, groups: int | None = None) -> str:
    """A step variant (cfg: train's precision, step, layout, cudnn_benchmark) in words, e.g.
    'bf16 graph x17, batch layout, cudnn benchmark'."""
    words = [f"{cfg.precision} {cfg.step}" + (f" x{groups}" if groups else "")]
    words += [f"{cfg.layout} layout"] * (cfg.layout != REFERENCE_STEP["layout"])
    return ", ".join(words + ["cudnn benchmark"] * cfg.cudnn_benchmark)


def choose_step(p: Params, device: torch.device, groups: int) -> Train:
    """The step to train with: params' train.precision, train.step and train.layout if that variant
    passes its check on this GPU at this group size, else the fp32 eager reference; logged either way."""
    cfg, plain = p.train, _plain(p.train)
    if device.type != "cuda" and (off := off_reference(cfg)):
        raise TrainingError(f"train.{off[0]} = {getattr(cfg, off[0])!r} needs a GPU (CUDA); this run is on {device}")
    if device.type != "cuda" or cfg == plain:
        return cfg
    try:
        r = check_step(p, device, cfg, groups)
        why = (f"logits {r['logits_rel']:.1e}, gradients {r['gradients_rel']:.1e} relative to the CPU fp32 step, "
               f"tolerance {r['tolerance']['gradients']:g}")
    except Exception as e:  # noqa: BLE001 - a variant this GPU or torch cannot run falls back too
        r, why = {"ok": False}, f"{type(e).__name__}: {e}"
    where = torch.cuda.get_device_name(device) if torch.cuda.is_available() else str(device)
    if r["ok"]:
        log.info("step %s on %s: check passed (%s)", describe(cfg, groups), where, why)
        return cfg
    log.warning("step %s FAILED its check on %s (%s): training with fp32 eager instead",
                describe(cfg, groups), where, why)
    return plain


# ---------------------------------------------------------------- 4. runs: resume, loop, outputs

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
    model: dict | None         # one-group state_dict to resume from, or None: fresh initialisation


def _fingerprint(run: Run, p: Params, cfg: Train, device: torch.device) -> str:
    """What a checkpoint must match to be resumed: run, inputs, parameters, the step variant, the
    training code itself (a finished checkpoint never stands in for a run of changed code), torch,
    device. Not the group a run was trained in: the stacked step is each run's own to rounding."""
    c = {"run": run.name, "data": run.data.fingerprint, "train": asdict(cfg), "model": asdict(p.model),
         "mixture": asdict(p.mixture), "strategy": asdict(run.strategy), "torch": torch.__version__,
         "device": device.type}
    for key in ("checkpoint_every", "seeds", "cudnn_benchmark"):  # how often saved, which others, kernel choice
        c["train"].pop(key)
    h = hashlib.sha256(repr(c).encode())
    for name in SOURCES:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


def _resume(run: Run, p: Params, cfg: Train, device: torch.device) -> _State:
    fingerprint = _fingerprint(run, p, cfg, device)
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
    from its own checkpoint; runs whose checkpoints stopped at different epochs train in
    subgroups, one after the other (a stacked step has one epoch for all).

    Returns each run's history, or None for a run that `stop_after` (tests of resumption) ended
    after that many epochs before its last.
    """
    if len({id(r.data.pool) for r in runs}) != 1:
        raise TrainingError("runs trained together must share one pool: prepare them with one prepare_group call")
    if len({r.name for r in runs}) != len(runs):
        raise TrainingError(f"the same run twice in one group: {[r.name for r in runs]}")
    cfg = choose_step(p, device, len(runs))
    states = [_resume(r, p, cfg, device) for r in runs]
    out = [None] * len(runs)
    for start in sorted({s.epoch for s in states}):
        idx = [i for i, s in enumerate(states) if s.epoch == start]
        done = _train_together([runs[i] for i in idx], [states[i] for i in idx], p, cfg, device, stop_after)
        for i, history in zip(idx, done):
            out[i] = history
    return out


def _train_together(runs: list[Run], states: list[_State], p: Params, cfg: Train, device: torch.device,
                    stop_after: int | None):
    start, n, n_runs = states[0].epoch, runs[0].data.labels.numel(), len(runs)
    net = stacked(p, [r.seed for r in runs], torch.device("cpu"), cfg.layout)
    for g, s in enumerate(states):
        if s.model is not None:
            net.load_run(g, s.model)
    net = net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    step = Step(net, [r.data for r in runs], cfg, device)

    end = cfg.epochs if stop_after is None else min(cfg.epochs, start + stop_after)
    bar = tqdm(range(start, end), desc=runs[0].name if n_runs == 1 else f"{n_runs} runs", unit="epoch",
               initial=start, total=cfg.epochs)

    def draw(epoch: int):  # each run's own (copy, image) order of the epoch, stacked: (G, n) each
        draws = [epoch_draw(n, r.strategy, p.mixture.shares, r.seed, epoch) for r in runs]
        return [torch.stack(t).to(device) for t in zip(*draws)]

    draws = draw(start)
    for epoch in bar:
        # -------- one epoch: batches cut from the resident pool by indexing with the draws
        lr = lr_at(epoch, cfg)
        net.train()
        t0 = time.perf_counter()
        loss_sum, correct = step.epoch(*draws, lr)
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
            if cfg.snapshot_every and (epoch + 1) % cfg.snapshot_every == 0:
                with atomic_path(_snapshot(r, epoch + 1)) as tmp:
                    torch.save({"fingerprint": s.fingerprint, "model": _cpu(net.run_state(g))}, tmp)
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
                        "params": p.to_dict(), "step": describe(cfg),
                        "history": [{c: row[c] for c in MODEL_COLUMNS} for row in s.history],
                        "snapshots": _snapshots(r, s.fingerprint, cfg)}, tmp)
        _write_log(r.log_out, s.history)
    return [s.history for s in states]


def _cpu(state: dict) -> dict:
    return {k: v.cpu() for k, v in state.items()}


def _snapshot(run: Run, epoch: int) -> Path:
    return run.checkpoint.with_name(f"{run.checkpoint.stem}.epoch{epoch}.pt")


def _snapshots(run: Run, fingerprint: str, cfg: Train) -> dict[int, dict]:
    """epoch -> the run's weights after it, every train.snapshot_every epochs, from this training's
    snapshot files (kept beside the checkpoint, so a resumed run still has the earlier ones)."""
    out = {}
    for epoch in range(cfg.snapshot_every, cfg.epochs + 1, cfg.snapshot_every) if cfg.snapshot_every else ():
        path = _snapshot(run, epoch)
        ck = torch.load(path, map_location="cpu", weights_only=False) if path.exists() else {}
        if ck.get("fingerprint") != fingerprint:
            raise TrainingError(f"{run.name}: snapshot {path} is missing or from another training; "
                                "delete the run's checkpoint to train it again")
        out[epoch] = ck["model"]
    return out
