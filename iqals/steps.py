"""The training step of G runs stacked in one GroupNet, in the three forms of train.step.

eager: op by op; compile: torch.compile(mode="reduce-overhead"); graph: the whole step (batch
indexing, forward, loss, backward, SGD update) captured once in a CUDA graph and replayed. Each
gives the fp32 eager step's results within the tolerances of iqals/variants.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import model as model_lib
from .errors import TrainingError
from .mixture import soft_targets
from .params import Train
from .stacked import GroupNet

if TYPE_CHECKING:
    from .train import TrainData


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


class _Forward(torch.nn.Module):
    """A batch of every run -> (summed loss, per-run losses, per-run correct, logits): the part
    torch.compile captures (standardising and targets included, so they fuse)."""

    def __init__(self, net: GroupNet, kind: str):
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

    def __init__(self, net: GroupNet, data: list[TrainData], cfg: Train, device: torch.device,
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

    def __init__(self, net: GroupNet, data: list[TrainData], cfg: Train, device: torch.device):
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


def make_steps(net: GroupNet, data: list[TrainData], cfg: Train, device: torch.device) -> Steps:
    """The step train.step and train.precision ask for, on `device`."""
    for key, value, plain in (("train.precision", cfg.precision, "fp32"), ("train.step", cfg.step, "eager")):
        if value != plain and device.type != "cuda":
            raise TrainingError(f"{key} = {value!r} needs a GPU (CUDA); this run is on {device}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision == "tf32"
    return (GraphSteps if cfg.step == "graph" else Steps)(net, data, cfg, device)
