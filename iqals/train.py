"""Training one strategy with one seed: read top to bottom (nanoGPT's train.py).

The images stay on the device as one uint8 tensor of copies (airbench): each step indexes a
batch out of it, standardises it, and builds the soft targets from a small probability table.
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
import torch.nn.functional as F
from tqdm import tqdm

from . import mixture, seeds
from . import model as model_lib
from .io import atomic_path, write_text
from .mixture import epoch_draw, soft_targets, true_class_probability
from .params import DISTORTIONS, LEVELS, Params, Strategy, copy_index
from .seeds import derive_seed

log = logging.getLogger(__name__)
LOG_COLUMNS = ("epoch", "loss", "train_acc", "lr", "images_per_s", "seconds")


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, or inputs inconsistent with the strategy)."""


@dataclass
class TrainData:
    """One strategy's training inputs, resident on the device."""
    pool: torch.Tensor     # uint8 (copies, N, 3, 32, 32); copies as in iqals/mixture.py
    labels: torch.Tensor   # int64 (N,)
    q_true: torch.Tensor   # float32 (copies, N): target probability of the true class
    fingerprint: str       # identifies the inputs, so a checkpoint is resumed only on the same


def prepare(strategy: Strategy, images: np.ndarray, labels: np.ndarray,
            distorted: np.ndarray | None, scores: np.ndarray | None, p: Params, seed: int,
            device: torch.device) -> TrainData:
    """Put the copies the strategy draws from on the device, with their targets."""
    n = len(labels)
    q = true_class_probability(strategy, n, scores, p.iqa, p.mixture.shares, seed)
    pool = torch.zeros((q.shape[0], n, 3, 32, 32), dtype=torch.uint8, device=device)
    pool[0] = torch.tensor(images).permute(0, 3, 1, 2).to(device)
    for d in strategy.distortions:  # only the copies this strategy can draw
        if distorted is None:
            raise TrainingError(f"strategy {strategy.name} ({strategy.train_set}) needs the distorted set")
        t = DISTORTIONS.index(d)
        for lv in range(LEVELS):
            pool[copy_index(t, lv)] = torch.tensor(distorted[t, lv]).permute(0, 3, 1, 2).to(device)  # copy of mmap
    h = hashlib.sha256(q.tobytes())
    h.update(labels.tobytes())
    h.update(pool[:, ::97].cpu().numpy().tobytes())  # a strided sample of every copy
    return TrainData(pool, torch.tensor(labels).to(device),
                     torch.from_numpy(q).float().to(device), h.hexdigest()[:16])


def lr_at(epoch: int, p: Params) -> float:
    """Staircase decay: lr * lr_decay ** floor(epoch / lr_decay_epochs) (paper 4.3)."""
    return p.train.lr * p.train.lr_decay ** (epoch // p.train.lr_decay_epochs)


def loss_fn(logits: torch.Tensor, q: torch.Tensor, kind: str) -> torch.Tensor:
    """Eq. (1), squared difference of softmax and target summed over classes; or cross-entropy."""
    if kind == "squared":
        return ((logits.float().softmax(1) - q) ** 2).sum(1).mean()
    return -(q * logits.float().log_softmax(1)).sum(1).mean()


def _fingerprint(run: str, data: TrainData, p: Params, strategy: Strategy, device: torch.device) -> str:
    """What a checkpoint must match to be resumed: run, inputs, parameters, the training code
    itself (so a finished checkpoint never stands in for a run of changed code), torch, device."""
    cfg = {"run": run, "data": data.fingerprint, "train": asdict(p.train), "model": asdict(p.model),
           "mixture": asdict(p.mixture), "strategy": asdict(strategy), "torch": torch.__version__,
           "device": device.type}
    cfg["train"].pop("checkpoint_every")
    cfg["train"].pop("seeds")
    h = hashlib.sha256(repr(cfg).encode())
    for module in (model_lib, mixture, seeds, sys.modules[__name__]):
        h.update(Path(inspect.getsourcefile(module)).read_bytes())
    return h.hexdigest()[:16]


def _write_log(path: Path, history: list[dict]) -> None:
    lines = ["\t".join(LOG_COLUMNS)]
    lines += ["\t".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]) for c in LOG_COLUMNS)
              for row in history]
    write_text(path, "\n".join(lines) + "\n")


def train(strategy: Strategy, seed: int, data: TrainData, p: Params, device: torch.device,
          model_out: Path, log_out: Path, checkpoint: Path, stop_after: int | None = None):
    """Train, checkpointing every train.checkpoint_every epochs; resume from `checkpoint`.

    `stop_after` ends the run early after that many epochs (tests of resumption).
    """
    cfg = p.train
    run = f"{strategy.name} seed {seed}"
    if cfg.precision != "fp32" and device.type != "cuda":
        raise TrainingError(f"train.precision = {cfg.precision!r} needs a GPU; this run is on {device}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision == "tf32"
    net = model_lib.build(p.model, derive_seed(seed, "init")).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    decayed = {id(w) for w in net.decayed_parameters()}
    opt = torch.optim.SGD([
        {"params": [w for w in net.parameters() if id(w) in decayed], "weight_decay": cfg.weight_decay},
        {"params": [w for w in net.parameters() if id(w) not in decayed], "weight_decay": 0.0},
    ], lr=cfg.lr)
    step_net = torch.compile(net) if cfg.compile else net

    fingerprint = _fingerprint(run, data, p, strategy, device)
    start, history = 0, []
    if checkpoint.exists():
        ck = torch.load(checkpoint, map_location=device, weights_only=False)
        if ck.get("fingerprint") == fingerprint:
            net.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            start, history = ck["epoch"], ck["history"]
            log.info("%s: resuming from %s after epoch %d", run, checkpoint, start)
        else:
            log.info("%s: ignoring %s (made with other parameters or data)", run, checkpoint)

    n, bs = data.labels.numel(), cfg.batch_size
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    end = cfg.epochs if stop_after is None else min(cfg.epochs, start + stop_after)
    bar = tqdm(range(start, end), desc=run, unit="epoch", initial=start, total=cfg.epochs)
    for epoch in bar:
        # -------- one epoch: the draw, then batches cut from the resident pool by indexing
        lr = lr_at(epoch, p)
        for group in opt.param_groups:
            group["lr"] = lr
        copy, image = (t.to(device) for t in epoch_draw(n, strategy, p.mixture.shares, seed, epoch))
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        net.train()
        t0 = time.perf_counter()
        for i in range(0, n, bs):
            c, j = copy[i:i + bs], image[i:i + bs]
            x = model_lib.standardize(data.pool[c, j])
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            y = data.labels[j]
            with autocast:
                logits = step_net(x)
            loss = loss_fn(logits, soft_targets(y, data.q_true[c, j]), cfg.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(j)  # no host sync inside the epoch
            correct += (logits.argmax(1) == y).sum()
        mean_loss = loss_sum.item() / n
        seconds = time.perf_counter() - t0
        # -------- end of epoch: check, log, checkpoint
        if not math.isfinite(mean_loss):
            raise TrainingError(f"strategy {strategy.name}, seed {seed}: loss is {mean_loss} in epoch "
                                f"{epoch + 1} (lr {lr:g}); training stopped")
        row = {"epoch": epoch + 1, "loss": mean_loss, "train_acc": correct.item() / n, "lr": lr,
               "images_per_s": n / seconds, "seconds": seconds}
        history.append(row)
        bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{row['train_acc']:.3f}", ips=f"{n / seconds:.0f}")
        log.info("%s epoch %d/%d loss %.4f train_acc %.4f lr %g %.0f img/s", run, epoch + 1,
                 cfg.epochs, mean_loss, row["train_acc"], lr, n / seconds)
        _write_log(log_out, history)
        if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
            with atomic_path(checkpoint) as tmp:
                torch.save({"fingerprint": fingerprint, "epoch": epoch + 1, "history": history,
                            "model": net.state_dict(), "optimizer": opt.state_dict()}, tmp)
    if end < cfg.epochs:
        return None
    with atomic_path(model_out) as tmp:  # the resolved config travels with the weights
        torch.save({"model": net.state_dict(), "strategy": asdict(strategy), "seed": seed,
                    "params": p.to_dict(), "history": history}, tmp)
    _write_log(log_out, history)
    return history
