"""The stage entry points in one process on a tiny project: what each writes, checked against the raw copy by hand."""
from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
import torch
import yaml

from iqals import distort
from iqals.data import DataError
from iqals.errors import UsageError
from iqals.params import TEST_SETS
from tests.test_distort import psnr

SEEDS = [2, 5]  # not 0..n-1: a seed mixed up with its position shows


def stage_main(module, argv: list[str]) -> None:
    """The stage `module` with command-line options argv, run in the current directory and in this process."""
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(sys, "argv", [module.__name__] + argv)
        module.main()
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_cifar, _raw_params_pristine):
    """download, distort and train (S1, both seeds, one epoch) on 2 training images per class and 5 test images."""
    from stages import distort as distort_stage
    from stages import download, train
    dest = tmp_path_factory.mktemp("stages")
    raw = yaml.safe_load(yaml.safe_dump(_raw_params_pristine))
    raw["base"].update(train_size=20, test_size=5)
    raw["train"].update(epochs=1, lr_decay_epochs=1, batch_size=10, seeds=SEEDS)
    raw["corrupt"].update(families=["contrast", "pixelate"], severities=[1, 5])
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(dest)
        mp.setenv("CIFAR10_LOCAL", str(tiny_cifar))
        stage_main(download, [])
        stage_main(distort_stage, [])
        stage_main(train, ["--strategy", "S1"])  # one-hot on pristine images: reads neither distorted nor scores
    return dest


def test_download_keeps_the_first_images_of_each_class_with_their_official_positions(project, tiny_arrays):
    """train: the first 2 of each class in official order, sorted; test: the first 5; index = the position kept."""
    (xtr, ytr), (xte, yte) = tiny_arrays
    want = {"train": sorted(i for k in range(10) for i in np.flatnonzero(ytr == k)[:2]), "test": list(range(5))}
    source = json.loads((project / "data/raw/source.json").read_text())
    for split, (x, y) in (("train", (xtr, ytr)), ("test", (xte, yte))):
        path = project / "data/raw" / f"{split}.npz"
        with np.load(path) as z:
            assert z["index"].tolist() == want[split], split
            np.testing.assert_array_equal(z["images"], x[want[split]])
            np.testing.assert_array_equal(z["labels"], y[want[split]])
        assert source[f"{split}_images"] == len(want[split])
        assert source[f"{split}_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["source"] == "local copy"


def test_distort_keys_each_image_by_split_and_official_position(project, tiny_arrays, params):
    """An image draws the same noise in the subset as at its position in the whole split (image_streams), so the
    stage's sets are the whole split's at the kept positions; the two splits draw otherwise. The metrics: the
    mean over test images of 10 log10(255^2 / MSE) per type and level."""
    cfg, seed = params.distort, params.base.seed
    for split, (x, _) in zip(("train", "test"), tiny_arrays):
        with np.load(project / "data/raw" / f"{split}.npz") as z:
            index = z["index"]
        got = np.load(project / "data/distorted" / f"{split}.npy")
        np.testing.assert_array_equal(got, distort.distort_all(x, cfg, seed, split)[:, :, index], err_msg=split)
        other = "test" if split == "train" else "train"
        assert not np.array_equal(got[1], distort.distort_all(x, cfg, seed, other)[1][:, index]), split
    x = tiny_arrays[1][0][:5]
    d = np.load(project / "data/distorted/test.npy")
    m = json.loads((project / "metrics/distort.json").read_text())
    assert m["test_images"] == 5
    for t, name in enumerate(("blur", "noise", "jpeg")):
        for lv in range(3):
            want = psnr(x, d[t, lv]).mean()
            assert abs(m["levels"][f"{name}_{lv + 1}"]["psnr_db"] - want) <= 5e-5 + 1e-12 * want, (name, lv)


def test_score_scores_each_type_level_and_image_against_its_source(project, tmp_path, monkeypatch):
    """With iqa.metric psnr: s[type, level, i] = 10 log10(255^2 / MSE) of image i's distorted copy, float64; the
    metrics: per type and level, the mean of s and how many targets s / 50 the clip to [0.1, 1] changed."""
    from stages import score
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["iqa"].update(metric="psnr", transform="linear", transform_scale=50.0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    args = ["--raw", str(project / "data/raw"), "--distorted", str(project / "data/distorted")]
    stage_main(score, args)
    m = json.loads((tmp_path / "metrics/score.json").read_text())
    assert (m["metric"], m["transform"]) == ("psnr", "linear")
    for split in ("train", "test"):
        with np.load(project / "data/raw" / f"{split}.npz") as z:
            x = z["images"].astype(np.float64)
        d = np.load(project / "data/distorted" / f"{split}.npy").astype(np.float64)
        s = np.load(tmp_path / "data/scores" / f"{split}.npy")
        assert s.dtype == np.float64 and s.shape == (3, 3, len(x)), split
        mse = ((d - x) ** 2).mean(axis=(3, 4, 5))
        want = np.minimum(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10)), 100.0)
        np.testing.assert_allclose(s, want, rtol=1e-12, atol=0, err_msg=split)
        for t, name in enumerate(("blur", "noise", "jpeg")):
            for lv in range(3):
                level = m[split][f"{name}_{lv + 1}"]
                assert abs(level["mean"] - want[t, lv].mean()) <= 5e-6 + 1e-12 * want[t, lv].mean(), (split, name)
                assert level["clipped"] == int(np.sum((want[t, lv] / 50 < 0.1) | (want[t, lv] / 50 > 1)))
    # distorted sets of another raw copy: refused before anything is scored
    (tmp_path / "dist").mkdir()
    for split in ("train", "test"):
        np.save(tmp_path / "dist" / f"{split}.npy", np.load(project / "data/distorted/test.npy")[:, :, :4])
    with pytest.raises(DataError, match=r"has shape \(3, 3, 4, 32, 32, 3\), expected \(3, 3, 20, 32, 32, 3\)"):
        stage_main(score, ["--raw", str(project / "data/raw"), "--distorted", str(tmp_path / "dist"),
                           "--out", "again"])
    for split in ("train", "test"):  # another number of distortion types: the images alone would pass
        np.save(tmp_path / "dist" / f"{split}.npy", np.load(project / "data/distorted" / f"{split}.npy")[:2])
    with pytest.raises(DataError, match=r"train.npy has shape \(2, 3, 20, 32, 32, 3\), expected \(3, 3, 20, 32, 32"):
        stage_main(score, ["--raw", str(project / "data/raw"), "--distorted", str(tmp_path / "dist"),
                           "--out", "again"])
    assert not (tmp_path / "again").exists()


def test_train_writes_each_seeds_model_and_log_under_its_strategy(project):
    """--strategy S1 trains every seed of train.seeds; each file says which run it holds; no distorted set read."""
    for k in SEEDS:
        m = torch.load(project / "models/S1" / f"seed{k}.pt", weights_only=False)
        assert m["seed"] == k and m["strategy"]["name"] == "S1", k
        assert len((project / "logs/S1" / f"seed{k}.tsv").read_text().splitlines()) == 2  # header + one epoch
    assert sorted(f.name for f in (project / "models/S1").iterdir()) == [f"seed{k}.pt" for k in SEEDS]


def test_train_a_grouped_runs_checkpoint_is_resumed_by_its_one_run_call(project, tmp_path, monkeypatch, caplog):
    """--run S1:5 --run S2:5 (pristine beside mix_blur: the distorted set is read) stopped after epoch 1 leaves a
    checkpoint per run and no model; each run's checkpoint holds its own inputs, so `--strategy S2 --seed 5`
    resumes it (the fingerprint leaves out the group) and finishes epoch 2 alone."""
    from stages import train
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"].update(epochs=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    data = ["--raw", str(project / "data/raw"), "--distorted", str(project / "data/distorted")]
    stage_main(train, ["--run", "S1:5", "--run", "S2:5", "--stop-after", "1"] + data)
    assert not (tmp_path / "models").exists()
    for name in ("S1", "S2"):
        assert (tmp_path / "checkpoints" / name / "seed5.pt").is_file(), name
        assert len((tmp_path / "logs" / name / "seed5.tsv").read_text().splitlines()) == 2  # header + epoch 1
    with caplog.at_level("INFO"):
        stage_main(train, ["--strategy", "S2", "--seed", "5"] + data)
    assert "S2 seed 5: resuming from checkpoints/S2/seed5.pt after epoch 1" in caplog.text
    assert len((tmp_path / "logs/S2/seed5.tsv").read_text().splitlines()) == 3
    assert torch.load(tmp_path / "models/S2/seed5.pt", weights_only=False)["seed"] == 5


def test_evaluate_writes_predictions_labelled_by_seed_and_test_set(project, tmp_path, monkeypatch):
    """Any uint8 sets of the documented shapes serve: the stage's wiring is checked, not the accuracy."""
    from stages import evaluate
    monkeypatch.chdir(project)
    rng = np.random.default_rng(0)
    for d, shape in (("dist_any", (3, 3)), ("corr_any", (2, 2))):
        (tmp_path / d).mkdir()
        np.save(tmp_path / d / "test.npy", rng.integers(0, 256, shape + (5, 32, 32, 3), dtype=np.uint8))
    out = ["--distorted", str(tmp_path / "dist_any"), "--corrupted", str(tmp_path / "corr_any"),
           "--metrics", str(tmp_path / "m"), "--predictions", str(tmp_path / "p")]
    with pytest.raises(UsageError, match=r"--strategy Q9: not in params.yaml"):
        stage_main(evaluate, ["--strategy", "S1", "--strategy", "Q9"] + out)
    assert not (tmp_path / "m").exists()  # checked before any strategy is evaluated
    stage_main(evaluate, ["--strategy", "S1"] + out)
    with np.load(tmp_path / "p/S1.npz") as z, np.load(project / "data/raw/test.npz") as raw:
        assert z["probs"].shape == (2, 10, 5, 10) and z["probs"].dtype == np.float32
        assert z["seeds"].tolist() == SEEDS and z["test_sets"].tolist() == list(TEST_SETS)
        np.testing.assert_array_equal(z["labels"], raw["labels"])
    m = json.loads((tmp_path / "m/S1.json").read_text())
    assert m["seeds"] == SEEDS and sorted(m["per_seed_acc"]) == [f"seed{k}" for k in SEEDS]


def test_report_without_results_names_them_and_checks_missing(project, tmp_path, monkeypatch):
    """By default a strategy with no metrics is an error naming it; --missing takes error or skip only."""
    from stages import report
    monkeypatch.chdir(project)
    base = ["--metrics", str(tmp_path / "none"), "--predictions", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    with pytest.raises(DataError, match=r"nothing for \[.*'S1', 'S2', 'S3'.*\] \(run their evaluate"):
        stage_main(report, base)
    with pytest.raises(UsageError, match="--missing yes: expected error or skip"):
        stage_main(report, base + ["--missing", "yes"])
    assert not (tmp_path / "o").exists()
