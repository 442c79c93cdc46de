"""Training speed: the project's training loop (iqals.train) against a plain PyTorch loop.

Both train the Table 1 network with batch size, loss (Eq. 1), SGD, lr and L2 of params.yaml on
the same number of images per epoch, in the same process, epochs interleaved (so load from other
processes hits both alike); the first epoch of each is warm-up and not counted. Reported: the
median images/s over the timed epochs, and their ratio.

- ours: `iqals.train.train` itself, one epoch per call, on `iqals.train.prepare`'s resident pool
  for strategy S3 (mix_blur, IQA-LS) of params.yaml. Its images/s are the ones it logs (the
  batch loop of the epoch, host sync included); the wall time of the whole call (network
  build, checkpoint and model writes too) is reported beside them.
- reference: the straightforward implementation: the network written with the stock layers in
  Table 1's order (nn.LocalResponseNorm, -inf padding then F.max_pool2d, relu then pool,
  NCHW), a TensorDataset of the epoch's images already standardised to float32 with their soft
  targets (that work is not timed, which favours the reference), DataLoader(batch_size,
  shuffle=True), each batch moved to the device, the same loss and optimizer.

The two networks also get one identical batch from identical weights: the largest absolute
difference of their logits and of their parameter gradients (float rounding only).

Data is synthetic: random uint8 images, labels, distorted copies (3, 3, N, 32, 32, 3) and
scores (3, 3, N) in [0.3, 1]; speed does not depend on the pixel values.

On a GPU the same code runs with --device cuda (default there: N = 50,000, one epoch of the
paper); it also reports the epoch time at 50,000 images and the projected time of the paper's
full schedule, 9 strategies x 2000 epochs x 50,000 images, at the measured speed.

    PYTHONPATH=. python -m bench.bench_train [--device cpu|cuda] [--n N] [--epochs E]
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from iqals import model as model_lib  # noqa: E402
from iqals import train as train_lib  # noqa: E402
from iqals.mixture import epoch_draw, soft_targets  # noqa: E402
from iqals.params import DISTORTIONS, NUM_CLASSES, load  # noqa: E402

STRATEGY = "S3"
PAPER = {"strategies": 9, "epochs": 2000, "images": 50_000}
DEFAULTS = {"cpu": {"n": 2000, "epochs": 7}, "cuda": {"n": 50_000, "epochs": 3}}
QUICK = {"cpu": {"n": 1000, "epochs": 3}, "cuda": {"n": 10_000, "epochs": 3}}


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class StockNet(nn.Module):
    """Table 1 the straightforward way (same parameter names as iqals.model.Net)."""

    def __init__(self, lrn_size: int, lrn_alpha: float, lrn_beta: float, lrn_k: float):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 5, padding=2)
        self.conv2 = nn.Conv2d(64, 64, 5, padding=2)
        self.lrn = nn.LocalResponseNorm(lrn_size, alpha=lrn_alpha, beta=lrn_beta, k=lrn_k)
        self.fc1 = nn.Linear(8 * 8 * 64, 384)
        self.fc2 = nn.Linear(384, 192)
        self.out = nn.Linear(192, NUM_CLASSES)

    @staticmethod
    def pool(x):
        return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), kernel_size=3, stride=2)

    def forward(self, x):
        x = self.lrn(self.pool(F.relu(self.conv1(x))))
        x = self.pool(self.lrn(F.relu(self.conv2(x))))
        x = F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))
        return self.out(x)


def synthetic(n: int, seed: int = 0):
    """images (n, 32, 32, 3) uint8, labels (n,), distorted (3, 3, n, 32, 32, 3), scores (3, 3, n)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, size=n).astype(np.int64)
    distorted = rng.integers(0, 256, size=(len(DISTORTIONS), 3, n, 32, 32, 3), dtype=np.uint8)
    scores = rng.uniform(0.3, 1.0, size=(len(DISTORTIONS), 3, n))
    return images, labels, distorted, scores


def _sgd(net: nn.Module, decayed: list, p) -> torch.optim.SGD:
    ids = {id(w) for w in decayed}
    return torch.optim.SGD([
        {"params": [w for w in net.parameters() if id(w) in ids], "weight_decay": p.train.weight_decay},
        {"params": [w for w in net.parameters() if id(w) not in ids], "weight_decay": 0.0},
    ], lr=p.train.lr)


def _equivalence(p, data, device) -> dict:
    """One batch through both networks from the same weights: max |diff| of logits and gradients."""
    ours = model_lib.build(p.model, 0).to(device)
    stock = StockNet(p.model.lrn_size, p.model.lrn_alpha, p.model.lrn_beta, p.model.lrn_k).to(device)
    stock.load_state_dict(ours.state_dict())
    bs = p.train.batch_size
    x = model_lib.standardize(data.pool[0, :bs])
    q = soft_targets(data.labels[:bs], data.q_true[1, :bs])
    out = []
    for net in (ours, stock):
        logits = net(x)
        train_lib.run_losses(logits, q, p.train.loss).backward()
        out.append((logits.detach(), [w.grad for w in net.parameters()]))
    (la, ga), (lb, gb) = out
    return {"logits": float((la - lb).abs().max()),
            "gradients": max(float((a - b).abs().max()) for a, b in zip(ga, gb)),
            "gradients_relative": max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                                      for a, b in zip(ga, gb))}


def main(device: str = "cpu", n: int | None = None, epochs: int | None = None, quick: bool = False) -> dict:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train: --device cuda but torch sees no CUDA device")
    defaults = (QUICK if quick else DEFAULTS)["cuda" if dev.type == "cuda" else "cpu"]
    n = int(n or defaults["n"])
    epochs = int(epochs or defaults["epochs"])
    p = load(REPO_ROOT / "params.yaml")
    p = dataclasses.replace(p, train=dataclasses.replace(
        p.train, epochs=1, checkpoint_every=1_000_000, device=device, step="eager"))
    strategy = p.strategies[STRATEGY]
    bs = p.train.batch_size
    # train() sets these for its precision; the reference loop runs under the same settings
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = p.train.precision == "tf32"

    images, labels, distorted, scores = synthetic(n)
    data = train_lib.prepare(strategy, images, labels, distorted, scores, p, 0, dev)
    del distorted

    # the reference's dataset: the epoch's draw of copies, standardised once, with soft targets
    copy, image = epoch_draw(n, strategy, p.mixture.shares, 0, 0)
    ref_x = torch.cat([model_lib.standardize(data.pool[copy[i:i + 1000].to(dev), image[i:i + 1000].to(dev)]).cpu()
                       for i in range(0, n, 1000)])
    ref_q = soft_targets(data.labels.cpu()[image], data.q_true.cpu()[copy, image])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ref_x, ref_q), batch_size=bs, shuffle=True)
    stock = StockNet(p.model.lrn_size, p.model.lrn_alpha, p.model.lrn_beta, p.model.lrn_k)
    stock.load_state_dict(model_lib.build(p.model, 0).state_dict())
    stock = stock.to(dev)
    stock_opt = _sgd(stock, [stock.fc1.weight, stock.fc2.weight], p)

    def reference_epoch() -> float:
        stock.train()
        loss_sum = torch.zeros((), device=dev)
        t0 = time.perf_counter()
        for xb, qb in loader:
            xb, qb = xb.to(dev), qb.to(dev)
            loss = train_lib.run_losses(stock(xb), qb, p.train.loss)
            stock_opt.zero_grad(set_to_none=True)
            loss.backward()
            stock_opt.step()
            loss_sum += loss.detach() * len(xb)
        loss_sum.item()  # waits for the device, as train() does at the end of each epoch
        return n / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        calls = 0

        def our_epoch() -> tuple[float, float]:
            nonlocal calls
            calls += 1
            d = Path(tmp) / str(calls)  # fresh paths: no checkpoint to resume from
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(io.StringIO()):  # the progress bar
                hist = train_lib.train(strategy, 0, data, p, dev, d / "model.pt", d / "log.tsv", d / "ck.pt")
            return hist[0]["images_per_s"], n / (time.perf_counter() - t0)

        load_before = os.getloadavg()[0]
        our_epoch(), reference_epoch()  # warm-up
        ours, ours_call, ref = [], [], []
        for _ in range(epochs):
            a, b = our_epoch()
            ours.append(a)
            ours_call.append(b)
            ref.append(reference_epoch())
        load_after = os.getloadavg()[0]

    diff = _equivalence(p, data, dev)
    med = {"ours": statistics.median(ours), "ours_whole_call": statistics.median(ours_call),
           "reference": statistics.median(ref)}
    schedule = PAPER["strategies"] * PAPER["epochs"] * PAPER["images"]
    result = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "strategy": STRATEGY, "n": n, "batch_size": bs, "timed_epochs": epochs, "loss": p.train.loss,
        "precision": p.train.precision,
        "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        "images_per_s": {k: round(v, 1) for k, v in med.items()},
        "images_per_s_all": {"ours": [round(v, 1) for v in ours], "ours_whole_call": [round(v, 1) for v in ours_call],
                             "reference": [round(v, 1) for v in ref]},
        "ratio": round(med["ours"] / med["reference"], 2),
        "ratio_whole_call": round(med["ours_whole_call"] / med["reference"], 2),
        "max_abs_diff": diff,
        "epoch_s_at_50000": {"ours": round(PAPER["images"] / med["ours"], 2),
                             "reference": round(PAPER["images"] / med["reference"], 2)},
        "paper_schedule_hours": {"ours": round(schedule / med["ours"] / 3600, 1),
                                 "reference": round(schedule / med["reference"] / 3600, 1)},
    }
    print(f"training, strategy {STRATEGY}, {n} images/epoch, batch {bs}, on {result['device_name']} ({dev}), "
          f"{result['torch_threads']} torch threads, load average {result['load_average_before_after']}")
    print(f"{'loop':28} {'images/s':>9} {'epoch@50k s':>12} {'paper schedule h':>17}")
    for k, label in (("ours", "ours (iqals.train, loop)"), ("ours_whole_call", "ours (whole train() call)"),
                     ("reference", "DataLoader + stock layers")):
        print(f"{label:28} {med[k]:9.0f} {PAPER['images'] / med[k]:12.2f} {schedule / med[k] / 3600:17.1f}")
    print(f"ratio ours/reference: {result['ratio']:.2f} (whole call {result['ratio_whole_call']:.2f}); "
          f"max |diff| logits {diff['logits']:.2e}, gradients {diff['gradients']:.2e}")
    return result


if __name__ == "__main__":
    from bench.cli import run
    run(main, __doc__)
