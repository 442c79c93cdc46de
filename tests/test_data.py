"""iqals.data: loading a local copy, rejecting bad sources, subsets, and acquire()."""
from __future__ import annotations

import hashlib
import re
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from iqals import data
from iqals.data import CLASSES, DataError, LOCAL_COPY_ENV

from conftest import TINY_TEST_PER_CLASS, TINY_TRAIN_PER_CLASS, write_copy


def test_load_local_reads_the_tiny_copy(tiny_cifar, tiny_arrays):
    loaded = data.load_local(tiny_cifar)
    assert set(loaded) == {"train", "test"}
    for (x, y), (x0, y0) in zip((loaded["train"], loaded["test"]), tiny_arrays):
        assert x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3)
        assert y.dtype == np.int64 and y.shape == (len(x),)
        np.testing.assert_array_equal(x, x0)
        np.testing.assert_array_equal(y, y0)
    assert len(loaded["train"][1]) == 10 * TINY_TRAIN_PER_CLASS
    assert np.bincount(loaded["test"][1], minlength=10).tolist() == [TINY_TEST_PER_CLASS] * 10


def test_load_local_without_classes_and_with_int32_labels(tmp_path, tiny_arrays):
    (xtr, ytr), (xte, yte) = tiny_arrays
    d = write_copy(tmp_path / "copy", (xtr, ytr.astype(np.int32)), (xte, yte.astype(np.uint8)), classes=False)
    loaded = data.load_local(d)
    assert loaded["train"][1].dtype == np.int64 and loaded["test"][1].dtype == np.int64
    np.testing.assert_array_equal(loaded["train"][1], ytr)


# ----------------------------------------------------------------------------- bad sources

def _spoil(name):
    """Register a way of spoiling train.npz or test.npz of a good copy."""
    def deco(fn):
        SPOILERS[name] = fn
        return fn
    return deco


SPOILERS = {}


def _rewrite(path: Path, **arrays):
    with np.load(path) as z:
        kept = {k: z[k] for k in z.files}
    kept.update(arrays)
    for k in [k for k, v in kept.items() if v is None]:
        del kept[k]
    np.savez(path, **kept)


@_spoil("missing file")
def _(path):
    path.unlink()


@_spoil("truncated npz")
def _(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


@_spoil("not a zip file")
def _(path):
    path.write_text("these are not the images you are looking for\n")


@_spoil("empty file")
def _(path):
    path.write_bytes(b"")


@_spoil("bare npy array")
def _(path):
    with np.load(path) as z:
        images = z["images"]
    with open(path, "wb") as f:
        np.save(f, images)


@_spoil("float images")
def _(path):
    with np.load(path) as z:
        _rewrite(path, images=z["images"].astype(np.float32) / 255)


@_spoil("grey images 32x32x1")
def _(path):
    with np.load(path) as z:
        _rewrite(path, images=z["images"][..., :1])


@_spoil("28x28 images")
def _(path):
    with np.load(path) as z:
        _rewrite(path, images=np.ascontiguousarray(z["images"][:, :28, :28]))


@_spoil("label 10")
def _(path):
    with np.load(path) as z:
        y = z["labels"].copy()
    y[3] = 10
    _rewrite(path, labels=y)


@_spoil("label -1")
def _(path):
    with np.load(path) as z:
        y = z["labels"].copy()
    y[0] = -1
    _rewrite(path, labels=y)


@_spoil("float labels")
def _(path):
    with np.load(path) as z:
        _rewrite(path, labels=z["labels"].astype(np.float64))


@_spoil("label length mismatch")
def _(path):
    with np.load(path) as z:
        _rewrite(path, labels=z["labels"][:-1])


@_spoil("missing labels array")
def _(path):
    _rewrite(path, labels=None)


@_spoil("missing images array")
def _(path):
    _rewrite(path, images=None)


@_spoil("wrong class names")
def _(path):
    names = list(CLASSES)
    names[0], names[1] = names[1], names[0]  # automobile, airplane, ...
    _rewrite(path, classes=np.array(names))


@_spoil("too many test images")
def _(path):
    with np.load(path) as z:
        reps = 10_001 // len(z["labels"]) + 1
        _rewrite(path, images=np.tile(z["images"], (reps, 1, 1, 1)), labels=np.tile(z["labels"], reps))


# spoiler -> words the message must contain (beside the file's path)
PROBLEM = {
    "missing file": r"missing",
    "truncated npz": r"unreadable or truncated",
    "not a zip file": r"unreadable or truncated",
    "empty file": r"unreadable or truncated",
    "bare npy array": r"not an npz archive",
    "float images": r"images must be uint8, got float32",
    "grey images 32x32x1": r"images must have shape \(N, 32, 32, 3\).*\(\d+, 32, 32, 1\)",
    "28x28 images": r"images must have shape \(N, 32, 32, 3\).*\(\d+, 28, 28, 3\)",
    "label 10": r"labels must lie in 0\.\.9, got 0\.\.10",
    "label -1": r"labels must lie in 0\.\.9, got -1\.\.9",
    "float labels": r"labels must be integers",
    "label length mismatch": r"labels must have shape \(\d+,\), got \(\d+,\)",
    "missing labels array": r"lacks arrays \['labels'\]",
    "missing images array": r"lacks arrays \['images'\]",
    "wrong class names": r"class names/order .*'automobile', 'airplane'",
    "too many test images": r"expected 1\.\.10000 test images",
}


# (a training file may hold up to 50,000 images, so "too many" is a test-split case only)
CASES = [(s, split) for s in sorted(PROBLEM) for split in ("train", "test")
         if not (s == "too many test images" and split == "train")]


@pytest.mark.parametrize("spoiler, split", CASES)
def test_bad_local_copy_is_rejected(tmp_path, tiny_cifar, spoiler, split):
    d = tmp_path / "copy"
    shutil.copytree(tiny_cifar, d)
    bad = d / f"{split}.npz"
    SPOILERS[spoiler](bad)
    with pytest.raises(DataError) as err:
        data.load_local(d)
    msg = str(err.value)
    assert str(bad) in msg, msg  # names the file ...
    assert re.search(PROBLEM[spoiler], msg), msg  # ... and the problem
    assert ("unreadable" in msg) == ("unreadable" in PROBLEM[spoiler]), msg  # ... and no other


def test_missing_directory_is_rejected(tmp_path):
    d = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"{LOCAL_COPY_ENV}={re.escape(str(d))}: not a directory"):
        data.load_local(d)
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        data.load_local(f)


def test_load_raw_rejects_like_load_local(tmp_path, tiny_cifar):
    d = tmp_path / "raw"
    shutil.copytree(tiny_cifar, d)
    assert set(data.load_raw(d)) == {"train", "test"}
    (d / "test.npz").unlink()
    with pytest.raises(DataError, match=re.escape(str(d / "test.npz")) + ": missing"):
        data.load_raw(d)


# ---------------------------------------------------------------------------------- subset

def subset(full, train_size, test_size):
    """What the download stage keeps: the (images, labels) at data.subset_indices of each split."""
    keep = data.subset_indices(full, train_size, test_size)
    return {split: (x[keep[split]], y[keep[split]]) for split, (x, y) in full.items()}


def test_subset_is_class_balanced_head(tiny_cifar):
    full = data.load_local(tiny_cifar)
    (xtr, ytr), (xte, yte) = full["train"], full["test"]
    sub = subset(full, train_size=60, test_size=17)
    x, y = sub["train"]
    assert np.bincount(y, minlength=10).tolist() == [6] * 10
    # The first 6 of each class, in official order.
    keep = np.sort(np.concatenate([np.flatnonzero(ytr == k)[:6] for k in range(10)]))
    np.testing.assert_array_equal(y, ytr[keep])
    np.testing.assert_array_equal(x, xtr[keep])
    np.testing.assert_array_equal(sub["test"][0], xte[:17])
    np.testing.assert_array_equal(sub["test"][1], yte[:17])


def test_subset_none_keeps_everything(tiny_cifar):
    full = data.load_local(tiny_cifar)
    sub = subset(full, None, None)
    for split in ("train", "test"):
        np.testing.assert_array_equal(sub[split][0], full[split][0])
        np.testing.assert_array_equal(sub[split][1], full[split][1])


def test_subset_sizes_beyond_the_source_are_rejected(tiny_cifar):
    full = data.load_local(tiny_cifar)
    n_train, n_test = len(full["train"][1]), len(full["test"][1])
    with pytest.raises(DataError, match=rf"base\.train_size={n_train + 10} exceeds the {n_train} training"):
        subset(full, n_train + 10, None)
    with pytest.raises(DataError, match=rf"base\.test_size={n_test + 1} exceeds the {n_test} test"):
        subset(full, None, n_test + 1)
    assert len(subset(full, n_train, n_test)["train"][1]) == n_train  # the edge is allowed


def test_subset_rejects_a_class_too_small_for_the_balance(tiny_cifar):
    full = data.load_local(tiny_cifar)
    x, y = full["train"]
    drop = np.flatnonzero(y == 3)[:15]  # leave 5 cats
    keep = np.setdiff1d(np.arange(len(y)), drop)
    short = {"train": (x[keep], y[keep]), "test": full["test"]}
    assert len(subset(short, 50, None)["train"][1]) == 50
    with pytest.raises(DataError, match=r"base\.train_size=60: the source has fewer than 6 images of some class"):
        subset(short, 60, None)


# --------------------------------------------------------------------------------- acquire

def test_acquire_uses_the_local_copy(monkeypatch, tmp_path, tiny_cifar, tiny_arrays):
    monkeypatch.setenv(LOCAL_COPY_ENV, str(tiny_cifar))

    def no_download(*a, **k):
        raise AssertionError("acquire() must not download when a local copy is set")

    import torchvision.datasets
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_download)
    loaded, meta = data.acquire(tmp_path / "cache")
    np.testing.assert_array_equal(loaded["train"][0], tiny_arrays[0][0])
    np.testing.assert_array_equal(loaded["test"][1], tiny_arrays[1][1])
    assert "local" in meta["source"]
    assert not (tmp_path / "cache").exists()


def test_acquire_with_a_bad_local_copy_names_it(monkeypatch, tmp_path):
    monkeypatch.setenv(LOCAL_COPY_ENV, str(tmp_path / "missing"))
    with pytest.raises(DataError, match=LOCAL_COPY_ENV):
        data.acquire(tmp_path / "cache")


def test_acquire_offline_names_the_env_var(monkeypatch, tmp_path):
    """No $CIFAR10_LOCAL and no network: a DataError that tells the user what to set."""
    import torchvision.datasets

    monkeypatch.delenv(LOCAL_COPY_ENV, raising=False)
    calls = []

    def offline(root, train, download, **kw):
        calls.append((root, train, download))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError) as err:
        data.acquire(tmp_path / "cache")
    msg = str(err.value)
    assert LOCAL_COPY_ENV in msg
    assert "URLError" in msg and "name resolution" in msg
    assert str(tmp_path / "cache") in msg
    assert calls == [(str(tmp_path / "cache"), True, True)]


def fake_archive(monkeypatch, train_split, test_split, classes=CLASSES):
    """Stand in for torchvision's CIFAR10 (data uint8 (N, 32, 32, 3), targets a list of ints, classes)."""
    import torchvision.datasets

    class Fake:
        def __init__(self, root, train, download, **kw):
            (self.data, targets) = train_split if train else test_split
            self.targets, self.classes = targets.tolist(), list(classes)

    monkeypatch.delenv(LOCAL_COPY_ENV, raising=False)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Fake)


def official_sized(n):
    """n images whose every value is the image's position mod 251, and labels position mod 10: cheap views
    that make a swapped, reversed or misplaced array visible."""
    pos = np.arange(n)
    images = np.broadcast_to((pos % 251).astype(np.uint8)[:, None, None, None], (n, 32, 32, 3))
    return images, pos % 10


def test_official_archive_is_loaded_validated_and_named(monkeypatch, tmp_path):
    """The official 50,000/10,000 split comes back as given, labels int64, the source named."""
    train, test = official_sized(50_000), official_sized(10_000)
    fake_archive(monkeypatch, train, test)
    loaded, meta = data.acquire(tmp_path / "cache")
    assert meta == {"source": "official archive"}
    for split, (x0, y0) in (("train", train), ("test", test)):
        x, y = loaded[split]
        assert x.shape == x0.shape and x.dtype == np.uint8 and y.dtype == np.int64
        np.testing.assert_array_equal(x[:, 31, 31, 2], x0[:, 0, 0, 0])
        np.testing.assert_array_equal(y, y0)
    names = list(CLASSES)
    names[8], names[9] = names[9], names[8]  # ..., truck, ship
    fake_archive(monkeypatch, train, test, classes=names)
    with pytest.raises(DataError, match=r"torchvision CIFAR10\(train\): class names/order .*'truck', 'ship'"):
        data.acquire(tmp_path / "cache")


def test_official_archive_of_the_wrong_size_is_rejected(monkeypatch, tmp_path, tiny_arrays):
    """A torchvision dataset that validates but is not the official 50,000/10,000 split."""
    fake_archive(monkeypatch, *tiny_arrays)
    with pytest.raises(DataError, match=r"official train set has 200 images, expected 50000"):
        data.acquire(tmp_path / "cache")


@pytest.mark.parametrize("split, n, ok", [("train", 50_000, True), ("train", 50_001, False)])
def test_split_sizes_are_bounded_by_the_official_ones(split, n, ok):
    """A training file may hold up to the official 50,000 images, no more (the test split: see below)."""
    images, labels = official_sized(n)
    if ok:
        data.validate(images, labels, "here", split)
    else:
        with pytest.raises(DataError, match=rf"here: expected 1\.\.{n - 1} {split} images, got {n}"):
            data.validate(images, labels, "here", split)


def test_sha256_hashes_every_chunk(tmp_path):
    """The file's SHA-256 as hashlib gives it for the whole content at once (3.5 MiB: four reads)."""
    raw = np.random.default_rng(0).integers(0, 256, (7 << 19), dtype=np.uint8).tobytes()
    (tmp_path / "f.bin").write_bytes(raw)
    assert data.sha256(tmp_path / "f.bin") == hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize("n", [0, 1, 10_000])
def test_test_split_sizes_at_the_limits(tmp_path, n):
    """The official test split (10,000) and a single image load; an empty split is refused."""
    path = tmp_path / "test.npz"
    np.savez(path, images=np.zeros((n, 32, 32, 3), np.uint8), labels=np.arange(n) % 10)
    if n == 0:
        with pytest.raises(DataError, match="expected 1..10000 test images, got 0"):
            data.load_npz(path, "test")
    else:
        images, labels = data.load_npz(path, "test")
        assert len(images) == n and labels.tolist() == (np.arange(n) % 10).tolist()


def test_official_index_reads_the_stored_positions(tmp_path):
    """The download stage stores each image's official position (it keys the noise and corruption
    streams); a file without one counts from 0."""
    stored = np.array([7, 3, 12], np.int64)
    np.savez(tmp_path / "a.npz", images=np.zeros((3, 32, 32, 3), np.uint8), labels=np.zeros(3, np.int64), index=stored)
    np.savez(tmp_path / "b.npz", images=np.zeros((3, 32, 32, 3), np.uint8), labels=np.zeros(3, np.int64))
    assert data.official_index(tmp_path / "a.npz").tolist() == [7, 3, 12]
    assert data.official_index(tmp_path / "b.npz").tolist() == [0, 1, 2]
