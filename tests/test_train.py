"""Training: determinism, exact resumption, divergence, the lr schedule (CPU, tiny data)."""
import numpy as np
import pytest
import torch
import yaml

from iqals import distort, params as params_lib, train as train_lib
from iqals.mixture import epoch_draw
from iqals.params import DISTORTIONS

CPU = torch.device("cpu")
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def tiny(tiny_arrays, params):
    (x, y), _ = tiny_arrays
    x, y = x[:100], y[:100]
    d = distort.distort_all(x, params.distort, 0, "train")
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.3, 1.0, size=(len(DISTORTIONS), 3, len(y)))
    return x, y, d, scores


def small_params(raw_params, **train):
    raw_params["train"].update({"epochs": 3, "lr_decay_epochs": 2, "batch_size": 25, **train})
    return params_lib.parse(raw_params)


def run(tmp_path, tiny, p, name="S3", tag="a", stop_after=None):
    x, y, d, scores = tiny
    s = p.strategies[name]
    data = train_lib.prepare(s, x, y, d, scores if s.needs_scores else None, p, 0, torch.device("cpu"))
    hist = train_lib.train(s, 0, data, p, torch.device("cpu"), tmp_path / tag / "model.pt",
                           tmp_path / tag / "log.tsv", tmp_path / tag / "ck.pt", stop_after=stop_after)
    return hist


def weights(path):
    return torch.load(path, weights_only=False)["model"]


def test_same_seed_same_weights(tmp_path, tiny, raw_params):
    p = small_params(raw_params)
    h1 = run(tmp_path, tiny, p, tag="a")
    h2 = run(tmp_path, tiny, p, tag="b")
    for k, v in weights(tmp_path / "a" / "model.pt").items():
        assert torch.equal(v, weights(tmp_path / "b" / "model.pt")[k]), k
    assert [r["loss"] for r in h1] == [r["loss"] for r in h2]
    assert len(h1) == 3 and h1[-1]["lr"] == pytest.approx(0.01) and h1[0]["lr"] == pytest.approx(0.1)


def test_resume_gives_identical_result(tmp_path, tiny, raw_params):
    p = small_params(raw_params)
    full = run(tmp_path, tiny, p, tag="full")
    assert run(tmp_path, tiny, p, tag="cut", stop_after=1) is None  # interrupted after epoch 1
    assert not (tmp_path / "cut" / "model.pt").exists()
    resumed = run(tmp_path, tiny, p, tag="cut")
    for k, v in weights(tmp_path / "full" / "model.pt").items():
        assert torch.equal(v, weights(tmp_path / "cut" / "model.pt")[k]), k
    assert [r["loss"] for r in full] == [r["loss"] for r in resumed]
    lines = (tmp_path / "cut" / "log.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:3] == ["epoch", "loss", "train_acc"] and len(lines) == 4


def test_a_resumed_runs_model_file_is_an_uninterrupted_ones_byte_for_byte(tmp_path, tiny, raw_params):
    """dvc.lock hashes the model file: its bytes must tell neither whether the run was resumed nor how
    fast it ran (the timings stay in the log), or every rerun would re-evaluate unchanged weights."""
    p = small_params(raw_params)
    run(tmp_path, tiny, p, tag="full")
    run(tmp_path, tiny, p, tag="cut", stop_after=2)
    run(tmp_path, tiny, p, tag="cut")
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=False)
    assert [list(r) for r in full["history"]] == [["epoch", "loss", "train_acc", "lr"]] * 3
    assert (tmp_path / "full" / "model.pt").read_bytes() == (tmp_path / "cut" / "model.pt").read_bytes()
    assert (tmp_path / "full" / "log.tsv").read_text().splitlines()[0].endswith("images_per_s\tseconds")


def test_checkpoint_of_other_params_is_not_resumed(tmp_path, tiny, raw_params):
    p1 = small_params(raw_params)
    run(tmp_path, tiny, p1, tag="x", stop_after=1)
    p2 = small_params(raw_params, lr=0.05)
    hist = run(tmp_path, tiny, p2, tag="x")
    assert len(hist) == 3 and hist[0]["lr"] == pytest.approx(0.05)  # started over


def test_labels_change_the_result(tmp_path, tiny, raw_params):
    p = small_params(raw_params, epochs=1, lr_decay_epochs=1)
    a = run(tmp_path, tiny, p, name="S2", tag="a")
    b = run(tmp_path, tiny, p, name="S3", tag="b")
    assert a[0]["loss"] != b[0]["loss"]


def test_nan_loss_stops_with_strategy_and_epoch(tmp_path, tiny, raw_params):
    p = small_params(raw_params)
    x, y, d, scores = tiny
    s = p.strategies["S3"]
    data = train_lib.prepare(s, x, y, d, scores, p, 0, torch.device("cpu"))
    data.q_true[1:] = float("nan")
    with pytest.raises(train_lib.TrainingError, match=r"strategy S3, seed 0: loss is nan in epoch 1"):
        train_lib.train(s, 0, data, p, torch.device("cpu"), tmp_path / "m.pt", tmp_path / "l.tsv", tmp_path / "c.pt")
    assert not (tmp_path / "m.pt").exists()


def test_lr_schedule_is_staircase(raw_params):
    """A decay at every multiple of lr_decay_epochs, not once (factor 0.5: exact in binary)."""
    p = small_params(raw_params, epochs=7, lr_decay_epochs=3, lr_decay=0.5)
    assert [train_lib.lr_at(e, p.train) for e in range(7)] == [0.1] * 3 + [0.05] * 3 + [0.025]


def test_losses():
    """Eq. (1) and cross-entropy summed over classes, averaged over the batch (of two here), per run."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, -1.0]], [[0.5, 0.5, 0.0], [1.0, 1.0, 1.0]]])  # (runs, B, K)
    q = torch.tensor([[0.8, 0.1, 0.1], [0.05, 0.9, 0.05]]).expand(2, 2, 3)
    p = torch.softmax(logits, -1)
    sq = [((p[r] - q[r]) ** 2).sum().item() / 2 for r in range(2)]
    ce = [-(q[r] * p[r].log()).sum().item() / 2 for r in range(2)]
    assert train_lib.run_losses(logits, q, "squared").tolist() == pytest.approx(sq, rel=1e-6)
    assert train_lib.run_losses(logits, q, "cross_entropy").tolist() == pytest.approx(ce, rel=1e-6)


@pytest.mark.parametrize("key, value", [("precision", "bf16"), ("step", "graph"), ("layout", "batch")])
def test_a_gpu_variant_on_the_cpu_stops_naming_its_key(tmp_path, tiny, raw_params, key, value):
    p = small_params(raw_params, **{key: value})  # train.device auto: the train loop checks
    with pytest.raises(train_lib.TrainingError, match=f"train.{key} = '{value}' needs a GPU"):
        run(tmp_path, tiny, p)
    raw_params["train"]["device"] = "cpu"  # cpu named: params validation stops first
    with pytest.raises(params_lib.ParamError, match=f"train.{key}"):
        small_params(raw_params, **{key: value})


def test_snapshots_are_the_weights_along_training_and_survive_a_resume(tmp_path, tiny, raw_params):
    p = small_params(raw_params, epochs=4, snapshot_every=2)
    run(tmp_path, tiny, p, tag="full")
    cut = small_params(raw_params, epochs=2, snapshot_every=2, lr_decay_epochs=2)
    run(tmp_path, tiny, cut, tag="two")  # the same run's first two epochs, alone
    assert run(tmp_path, tiny, p, tag="cut", stop_after=3) is None  # snapshot 2 written, then a new process
    run(tmp_path, tiny, p, tag="cut")
    for tag in ("full", "cut"):
        saved = torch.load(tmp_path / tag / "model.pt", weights_only=False)
        assert list(saved["snapshots"]) == [2, 4]
        for k, v in saved["model"].items():
            assert torch.equal(saved["snapshots"][4][k], v), k
            assert torch.equal(saved["snapshots"][2][k], weights(tmp_path / "two" / "model.pt")[k]), k
    (tmp_path / "cut" / "ck.epoch2.pt").unlink()  # a lost snapshot is named, not skipped
    (tmp_path / "cut" / "model.pt").unlink()
    with pytest.raises(train_lib.TrainingError, match="ck.epoch2.pt is missing"):
        run(tmp_path, tiny, p, tag="cut")


def test_checkpoint_of_other_code_is_not_resumed(tmp_path, tiny, raw_params, monkeypatch):
    """A finished checkpoint must not stand in for a run of changed training code."""
    p = small_params(raw_params)
    run(tmp_path, tiny, p, tag="x")
    real = train_lib.Path.read_bytes
    monkeypatch.setattr(train_lib.Path, "read_bytes",
                        lambda self: real(self) + (b"# edited" if self.name == "model.py" else b""))
    x, y, d, scores = tiny
    s = p.strategies["S3"]
    data = train_lib.prepare(s, x, y, d, scores, p, 0, torch.device("cpu"))
    calls = []
    monkeypatch.setattr(train_lib.log, "info", lambda msg, *a: calls.append(msg % a))
    train_lib.train(s, 0, data, p, torch.device("cpu"), tmp_path / "x" / "model.pt", tmp_path / "x" / "log.tsv",
                    tmp_path / "x" / "ck.pt")
    assert any("ignoring" in c for c in calls) and not any("resuming" in c for c in calls)


def test_every_training_source_is_in_the_fingerprint_and_in_dvc_yaml(tiny, raw_params, monkeypatch, repo_root):
    """An edit to any file of train.SOURCES (fused.py too, which the CPU never imports) gives a new
    fingerprint, and every training stage of dvc.yaml depends on each of them."""
    p = small_params(raw_params)
    x, y, d, scores = tiny
    s = p.strategies["S3"]
    r = train_lib.Run(s, 0, train_lib.prepare(s, x, y, d, scores, p, 0, torch.device("cpu")), *[None] * 3)
    base = train_lib._fingerprint(r, p, p.train, torch.device("cpu"))
    real = train_lib.Path.read_bytes
    for name in train_lib.SOURCES:
        monkeypatch.setattr(train_lib.Path, "read_bytes", lambda self, n=name: real(self) + b"#" * (self.name == n))
        assert train_lib._fingerprint(r, p, p.train, torch.device("cpu")) != base, name
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    for stage in ("train_onehot", "train_scored", "deviation_converged", "deviation_probe"):
        missing = {f"iqals/{n}" for n in train_lib.SOURCES} - set(stages[stage]["deps"])
        assert not missing, (stage, missing)


def test_loop_gives_each_epoch_its_draw_and_lr_and_logs_what_the_step_returned(tmp_path, tiny, raw_params, monkeypatch):
    """The loop around the step (a stub here, recording its inputs): epoch e gets epoch_draw(seed, e)
    and lr 0.1 x 0.5 ** (e // 2), resumed or not; a log row per epoch, numbered from 1, with the
    lr used and the step's sums over n (one fp32 division); the last epoch is checkpointed though
    checkpoint_every = 2 does not divide 5, so a finished run trains nothing when called again."""
    p = small_params(raw_params, epochs=5, lr_decay_epochs=2, lr_decay=0.5, checkpoint_every=2)
    seen = []

    def stub(self, copy, image, lr):
        seen.append((copy, image, lr))
        return image[:, 0].float(), image[:, 1]  # "loss sum" and "correct" that tell the draws apart
    monkeypatch.setattr(train_lib.Step, "epoch", stub)
    assert run(tmp_path, tiny, p, stop_after=3) is None  # epochs 1-3 trained, checkpoint after 2
    hist = run(tmp_path, tiny, p)  # resumes after epoch 2: trains epochs 3-5
    assert run(tmp_path, tiny, p) == hist and len(seen) == 6
    n, lrs = len(tiny[1]), [0.1, 0.1, 0.05, 0.05, 0.025]
    for e, (copy, image, lr) in zip([0, 1, 2, 2, 3, 4], seen):
        want = epoch_draw(n, p.strategies["S3"], p.mixture.shares, 0, e)
        assert torch.equal(copy[0], want[0]) and torch.equal(image[0], want[1]) and lr == lrs[e], e
    for e, row in enumerate(hist):
        i0, i1 = epoch_draw(n, p.strategies["S3"], p.mixture.shares, 0, e)[1][:2].tolist()
        assert (row["epoch"], row["lr"], row["train_acc"]) == (e + 1, lrs[e], i1 / n)
        assert row["loss"] == pytest.approx(i0 / n, rel=EPS32, abs=0)  # fp32 division vs float64
    log_rows = [line.split("\t") for line in (tmp_path / "a" / "log.tsv").read_text().splitlines()[1:]]
    assert [(r[0], r[3]) for r in log_rows] == [("1", "0.1"), ("2", "0.1"), ("3", "0.05"), ("4", "0.05"),
                                                 ("5", "0.025")]


def test_each_step_is_plain_sgd_at_the_epochs_lr_with_l2_on_the_hidden_fc_weights(raw_params):
    """Epochs of one step (batch = n): every weight moves by -lr (grad + wd w), wd on fc1 and fc2's
    weights only (paper 4.3), at the epoch's lr in every layer, no momentum (the second step keeps no
    trace of the first). .grad holds the step's gradient. Bound: fp32 rounding of g + wd w, of its
    product with lr (lr itself rounded to fp32) and of the sum with w, a few eps of |w| + lr |g + wd w|."""
    p = small_params(raw_params, batch_size=8)
    data, copy, image = train_lib.synthetic(1, 8, CPU)
    net = train_lib.stacked(p, [0], CPU)
    step = train_lib.Step(net, data, p.train, CPU)
    for lr in (0.1, 0.01):
        before = {k: w.detach().double() for k, w in net.named_parameters()}
        step.epoch(copy, image, lr)
        for k, w in net.named_parameters():
            d = w.grad.double() + (p.train.weight_decay * before[k] if k in ("fc1.weight", "fc2.weight") else 0)
            err = (w.detach().double() - (before[k] - lr * d)).abs()
            assert torch.all(err <= 4 * EPS32 * (before[k].abs() + lr * d.abs())), (k, lr)


def test_an_epoch_takes_every_image_once_in_draw_order_short_last_batch_included(raw_params):
    """n = 40, batch 16: batches of 16, 16 and 8 cut from the draws in order (none dropped), each
    one's images, labels and targets those of its draws; the epoch's loss sums each batch's mean
    loss times its size (exact products, two fp32 additions of positive terms: within one eps of
    the float64 sum), and correct counts all 40 images."""
    p = small_params(raw_params, batch_size=16)
    data, copy, image = train_lib.synthetic(1, 40, CPU)
    step = train_lib.Step(train_lib.stacked(p, [0], CPU), data, p.train, CPU)
    batches, real = [], step.forward
    step.forward = lambda x, y, q: batches.append((x, y, q, real(x, y, q))) or batches[-1][3]
    loss_sum, correct = step.epoch(copy, image, 0.1)
    assert [y.shape[1] for _, y, _, _ in batches] == [16, 16, 8]
    x, y, q = (torch.cat([b[i] for b in batches], 1) for i in range(3))
    d = data[0]
    assert torch.equal(x, d.pool[copy, image]) and torch.equal(y, d.labels[image])
    assert torch.equal(q, d.q_true[copy, image])
    want = sum(out[1].double() * y.shape[1] for _, y, _, out in batches)
    assert loss_sum.item() == pytest.approx(want.item(), rel=EPS32, abs=0)
    assert correct.tolist() == [sum(int((out[3].argmax(-1) == y).sum()) for _, y, _, out in batches)]
