"""Training: determinism, exact resumption, divergence, the lr schedule (CPU, tiny data)."""
import numpy as np
import pytest
import torch
import yaml

from iqals import distort, params as params_lib, train as train_lib
from iqals.params import DISTORTIONS


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


def test_lr_schedule_is_staircase(params):
    lrs = [train_lib.lr_at(e, params.train) for e in range(params.train.epochs)]
    k = params.train.lr_decay_epochs
    assert lrs == [params.train.lr * params.train.lr_decay ** (e // k) for e in range(params.train.epochs)]


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
