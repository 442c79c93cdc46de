"""The deviation study: the distortion conventions against independent computations written
here (numpy by hand, scipy, Pillow against OpenCV), the cells' standard errors, the convention
evaluation of one model, the probe's resumable training on tiny data, the section's tables and
sentences written out by hand, and both stages on inputs made here."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import ndimage

from iqals import deviation, distort, evaluate, longrun
from iqals import report as rep
from iqals import train as train_lib
from iqals.errors import UsageError
from iqals.params import TEST_SETS
from iqals.seeds import image_streams
from tests.test_iqa import skimage_ssim

SIGMAS = (0.7, 1.0, 1.2)
VAR = 0.02  # noise level 3: clipping matters


@pytest.fixture(scope="module")
def images(tiny_arrays) -> np.ndarray:
    return tiny_arrays[0][0][:24].copy()


def draws(n: int, seed: int, shape) -> np.ndarray:
    """The standard normals each image's stream gives, drawn here in the documented order."""
    return np.stack([rng.standard_normal(shape) for rng in image_streams(seed, n, None, "test")])


# ------------------------------------------------------------------ noise conventions

def test_noise_outputs_against_numpy_by_hand(images):
    z = draws(len(images), 7, images.shape[1:])
    x = images.astype(np.float64)
    unclipped = x + 255 * math.sqrt(VAR) * z  # on the [0, 255] scale, by hand
    clipped = np.clip(unclipped, 0, 255)
    out = {o: distort.noise(images, VAR, 7, output=o) for o in ("round", "floor", "float_clipped", "float")}
    assert out["round"].dtype == out["floor"].dtype == np.uint8
    assert out["float"].dtype == out["float_clipped"].dtype == np.float32
    # float32 holds the [0, 255] values to 2**-16 at worst (ulp of 255 is 2**-16 * 2)
    np.testing.assert_allclose(out["float"], unclipped, rtol=0, atol=2 * 2.0**-16 * np.abs(unclipped).max() / 255)
    np.testing.assert_allclose(out["float_clipped"], clipped, rtol=0, atol=2.0**-15)
    assert out["float"].min() < 0 and out["float"].max() > 255  # level 3 crosses both ends
    for name, want in (("round", np.floor(clipped + 0.5)), ("floor", np.floor(clipped))):
        # one ulp of float64 may tip a value sitting on a rounding edge: allow 1 level there, rarely
        diff = np.abs(out[name].astype(np.int64) - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-4, name
    assert (out["floor"] <= out["round"]).all() and (out["round"].astype(int) - out["floor"] <= 1).all()


def test_byte_scale_reads_the_variance_on_0_255(images):
    z = draws(len(images), 3, images.shape[1:])
    got = distort.noise(images, VAR, 3, scale="byte", output="float")
    np.testing.assert_allclose(got, images + math.sqrt(VAR) * z, rtol=0, atol=1e-3)
    assert np.abs(got - images).std() < 0.2  # sd sqrt(0.02) = 0.14 grey levels: next to nothing


def test_shared_field_adds_the_same_noise_to_every_channel(images):
    z = draws(len(images), 5, images.shape[1:-1] + (1,))
    got = distort.noise(images, VAR, 5, output="float", field="shared")
    np.testing.assert_allclose(got, images + 255 * math.sqrt(VAR) * z, rtol=0, atol=1e-3)
    d = got - images
    np.testing.assert_allclose(d[..., 0], d[..., 2], atol=1e-3)
    per = distort.noise(images, VAR, 5, output="float") - images
    assert np.abs(per[..., 0] - per[..., 2]).mean() > 10  # the default draws each channel


# ------------------------------------------------------------------ JPEG conventions

@pytest.mark.parametrize("sub", ["420", "422", "444"])
def test_pillow_encoder_agrees_with_opencv(images, sub):
    """Both wrap libjpeg(-turbo) with the IJG quality tables: the round trips agree."""
    for q in (12, 4):
        a, b = distort.jpeg(images, q, sub, "opencv"), distort.jpeg(images, q, sub, "pillow")
        assert np.abs(a.astype(int) - b).max() <= 1
    assert not np.array_equal(distort.jpeg(images, 4, "420", "pillow"), distort.jpeg(images, 4, "444", "pillow"))


# ------------------------------------------------------------------ blur conventions

def test_kernel_rules_are_the_documented_sizes():
    assert [2 * distort.kernel_radius(s, "matlab") + 1 for s in SIGMAS] == [2 * math.ceil(2 * s) + 1 for s in SIGMAS]
    assert [2 * distort.kernel_radius(s, "fixed3") + 1 for s in SIGMAS] == [3, 3, 3]
    # OpenCV's GaussianBlur with ksize 0 on 8-bit images: cvRound(sigma * 3 * 2 + 1) | 1
    # (createGaussianKernels); the value test below cannot see one tap more or less
    assert [2 * distort.kernel_radius(s, "opencv") + 1 for s in SIGMAS] == [5, 7, 9]


def test_scipy_rule_is_gaussian_filters_support():
    """gaussian_filter(truncate=4) of an impulse is nonzero exactly on the kernel (float64: no tap rounds away)."""
    for s in SIGMAS:
        impulse = np.zeros(41)
        impulse[20] = 1.0
        support = np.count_nonzero(ndimage.gaussian_filter1d(impulse, s, truncate=4.0))
        assert 2 * distort.kernel_radius(s, "scipy") + 1 == support, s
    with pytest.raises(ValueError, match="blur kernel rule 'box'"):
        distort.kernel_radius(1.0, "box")


@pytest.mark.parametrize("border,mode", [("replicate", "nearest"), ("reflect", "mirror"), ("constant", "constant")])
def test_scipy_rule_and_borders_match_scipy_gaussian_filter(images, border, mode):
    for s in SIGMAS:
        got = distort.blur(images, s, "scipy", border)
        want = ndimage.gaussian_filter(images.astype(np.float64), (0, s, s, 0), mode=mode, truncate=4.0)
        # both float64 sums of at most 11 x 11 taps: equal but for values on a rounding edge
        assert np.abs(got.astype(int) - np.floor(want + 0.5)).max() <= 1


def test_opencv_rule_matches_gaussian_blur_with_ksize_zero(images):
    for s in SIGMAS:
        got = distort.blur(images, s, "opencv", "replicate")
        want = np.stack([cv2.GaussianBlur(im, (0, 0), s, borderType=cv2.BORDER_REPLICATE) for im in images])
        assert np.abs(got.astype(int) - want).max() <= 1  # OpenCV's 8-bit path rounds in fixed point


def test_fixed3_is_fspecials_default_with_zero_padding(images):
    """fspecial('gaussian', [3 3], s) then imfilter's zero padding, written out here."""
    for s in SIGMAS:
        g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * s * s))
        k = np.outer(g, g) / np.outer(g, g).sum()
        want = ndimage.correlate(images.astype(np.float64), k[None, :, :, None], mode="constant", cval=0.0)
        got = distort.blur(images, s, "fixed3", "constant")
        assert np.abs(got.astype(int) - np.floor(want + 0.5)).max() <= 1
        assert got[:, 0].mean() < distort.blur(images, s, "fixed3", "replicate")[:, 0].mean()  # dark border


# ------------------------------------------------------------------ conventions as params

def test_every_convention_changes_what_it_names(params, raw_params):
    assert deviation.changed(params.distort, params.distort) == "(the study's defaults)"
    for name, cfg in params.deviation.conventions.items():
        named = raw_params["deviation"]["conventions"][name]
        assert deviation.changed(cfg, params.distort) == ", ".join(f"{k}={v}" for k, v in named.items()), name


def test_default_convention_remakes_the_distort_stage_sets(images, params):
    """The convention study's sets (distort_all with the images' official index, as evaluate_conventions)."""
    index = np.arange(len(images))
    got = distort.distort_all(images, params.distort, params.base.seed, "test", index)
    np.testing.assert_array_equal(got, distort.distort_all(images, params.distort, params.base.seed, "test"))
    flo = distort.distort_all(images, params.deviation.conventions["noise_float"], params.base.seed, "test", index)
    assert flo.dtype == np.float32
    np.testing.assert_array_equal(flo[0], got[0])  # blur and JPEG untouched by a noise convention
    np.testing.assert_array_equal(flo[2], got[2])


def test_distort_stage_refuses_float_noise(raw_params, tmp_path, monkeypatch, repo_root):
    raw_params["distort"]["noise_output"] = "float"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    r = subprocess.run([sys.executable, "-m", "stages.distort", "--raw", str(tmp_path / "none")], cwd=tmp_path,
                       capture_output=True, text=True, env={"PYTHONPATH": str(repo_root), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1
    assert "distort.noise_output = 'float': expected round or floor" in r.stderr


def _linear_net() -> torch.nn.Module:
    """A fixed random linear classifier: unlike an untrained CNN, its predictions follow each image's content."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))


def test_evaluate_conventions_scores_one_model_on_every_variant(images, params):
    """Every (convention, test set) cell: the accuracy of the model on that set remade by distort_all under the
    convention (base.seed, the images' official index), and its mean SSIM by skimage on luminance."""
    keep = {k: params.deviation.conventions[k] for k in ("noise_float", "blur_zero")}
    p = dataclasses.replace(params, base=dataclasses.replace(params.base, seed=11),  # base.seed keys the noise
                            deviation=dataclasses.replace(params.deviation, conventions=keep))
    net, cpu, index = _linear_net(), torch.device("cpu"), 1000 + 7 * np.arange(len(images))
    labels = evaluate.predict(net, images, cpu, 100).argmax(1)  # pristine accuracy 1, distorted sets below it
    df = deviation.evaluate_conventions(net, images, labels, index, p, cpu)
    assert list(df.convention.unique()) == ["default", "noise_float", "blur_zero"]
    assert len(df) == 3 * len(TEST_SETS) and list(df.test_set[:len(TEST_SETS)]) == list(TEST_SETS)
    assert set(df[df.convention == "blur_zero"].changes) == {"blur_border=constant"}
    by, s = df.set_index(["convention", "test_set"]), p.iqa.ssim
    assert (by.xs("pristine", level=1).acc == 1).all() and (by.xs("pristine", level=1).ssim == 1).all()
    for name, cfg in {"default": p.distort, **keep}.items():
        sets = distort.distort_all(images, cfg, 11, "test", index)
        for t, test_set in enumerate(TEST_SETS[1:]):
            x = sets[t // 3, t % 3]
            assert by.loc[(name, test_set), "acc"] == np.mean(evaluate.predict(net, x, cpu, 100).argmax(1) == labels)
            want = skimage_ssim(images, x, s).mean()  # skimage on float64 luminance
            assert abs(by.loc[(name, test_set), "ssim"] - want) < 1e-10, (name, test_set)  # both float64
    assert by.loc[("blur_zero", "blur_1"), "ssim"] < by.loc[("default", "blur_1"), "ssim"]  # zero border: worse


# ------------------------------------------------------------------ the cells against the paper

def test_standard_error_of_a_cell_by_hand():
    t2 = pd.DataFrame([{"strategy": "S1", "regularization": "original", "train_set": "pristine",
                        **{t: 0.7 for t in TEST_SETS}, **{f"{t}_std": 0.01 for t in TEST_SETS},
                        **{f"{t}_paper": 0.6 for t in TEST_SETS}}])
    dev = rep.deviations(t2, n_test=1000, n_seeds=3, n_paper=10000)
    se = math.sqrt(0.7 * 0.3 / 1000 + 0.01**2 / 3 + 0.6 * 0.4 / 10000)
    assert len(dev) == len(TEST_SETS)
    np.testing.assert_allclose(dev.se_points, 100 * se, rtol=1e-12)
    np.testing.assert_allclose(dev.diff_points, 10.0, rtol=1e-12)
    np.testing.assert_allclose(dev.z, 0.1 / se, rtol=1e-12)
    one = rep.deviations(t2, n_test=1000, n_seeds=1, n_paper=10000)  # one seed: no spread term
    np.testing.assert_allclose(one.se_points, 100 * math.sqrt(0.7 * 0.3 / 1000 + 0.6 * 0.4 / 10000), rtol=1e-12)


def test_cell_kinds_and_summary():
    assert rep.cell_kind("pristine", "blur_1") == "pristine-trained"
    assert rep.cell_kind("mix_blur", "blur_2") == "mix, own type"
    assert rep.cell_kind("mix_blur", "jpeg_2") == "mix, other type"
    assert rep.cell_kind("mix_all3", "noise_3") == "mix, own type"
    assert rep.cell_kind("mix_noise", "pristine") == "mix, pristine"
    dev = pd.DataFrame({"kind": ["mix, own type"] * 3, "diff_points": [-1.0, 2.0, -3.5], "z": [-1.0, 2.0, -3.0]})
    s = rep.deviation_summary(dev, 0.02).set_index("kind")
    assert s.loc["all", "cells"] == 3 and s.loc["all", "within"] == 2 and s.loc["all", "above_paper"] == 1
    assert s.loc["mix, own type", "mean_abs_z"] == 2.0


# ------------------------------------------------------------------ the probe

def _tiny(params, **probe):
    d = dataclasses.replace(params.deviation, train_size=100, train_eval_size=20,
                            probe=dataclasses.replace(params.deviation.probe, **probe))
    return dataclasses.replace(params, deviation=d, train=dataclasses.replace(params.train, batch_size=50))


def test_probe_evaluates_every_few_epochs_and_resumes(tmp_path, tiny_arrays, params, monkeypatch):
    (xtr, ytr), (xte, yte) = tiny_arrays
    p, cpu = _tiny(params, epochs=3, eval_every=2), torch.device("cpu")
    dist = distort.distort_all(xte, p.distort, p.base.seed, "test")
    paths = tmp_path / "probe.pt", tmp_path / "probe.tsv", tmp_path / "ck" / "probe.pt"
    real = train_lib.train

    class Killed(Exception):
        pass

    def killed_after_one_epoch(*args, **kwargs):  # the job dies after epoch 1, off an evaluation epoch
        real(*args, **{**kwargs, "stop_after": 1})
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(train_lib, "train", killed_after_one_epoch)
        with pytest.raises(Killed):
            longrun.probe(p, xtr[:100], ytr[:100], xte, dist, yte, *paths, cpu)
    rows = longrun.probe(p, xtr[:100], ytr[:100], xte, dist, yte, *paths, cpu)  # resumes after epoch 1
    assert [r["epoch"] for r in rows] == [2, 3] and all(r["lr"] == p.train.lr for r in rows)  # constant lr
    net = evaluate.load_model(paths[0], p, cpu)
    sets = evaluate.test_sets(xte, dist)
    for name in TEST_SETS:  # the last row is the final model's accuracy
        assert rows[-1][name] == round(evaluate.accuracy(evaluate.predict(net, sets[name], cpu, 100), yte), 5)
    # training accuracy in eval mode on the first train_eval_size images; the loop's running one of the last epoch
    n = p.deviation.train_eval_size
    assert rows[-1]["train_acc"] == round(evaluate.accuracy(evaluate.predict(net, xtr[:n], cpu, 100), ytr[:n]), 5)
    assert rows[-1]["train_acc_running"] == round(evaluate.read_model(paths[0])["history"][-1]["train_acc"], 5)
    trained = paths[2].stat().st_mtime_ns
    assert longrun.probe(p, xtr[:100], ytr[:100], xte, dist, yte, *paths, cpu) == rows
    assert paths[2].stat().st_mtime_ns == trained  # finished: nothing trained again
    # another schedule: a fresh run whose first call reaches epoch 3, past both old rows: they are dropped
    longer = _tiny(params, epochs=4, eval_every=3)
    longer = dataclasses.replace(longer, train=dataclasses.replace(longer.train, lr=0.05))
    rows4 = longrun.probe(longer, xtr[:100], ytr[:100], xte, dist, yte, *paths, cpu)
    assert [(r["epoch"], r["lr"]) for r in rows4] == [(3, 0.05), (4, 0.05)]


def test_converged_schedule_decays_where_it_says(tmp_path, tiny_arrays, params):
    """deviation's own run: its seed (not train.seeds), its training set size, checkpoints every epoch (the probe
    resumes from any), no snapshots; the decay after lr_decay_epochs."""
    (xtr, ytr), _ = tiny_arrays
    tiny = _tiny(params)
    train = dataclasses.replace(tiny.train, seeds=(0, 1), checkpoint_every=5, snapshot_every=1)
    tiny = dataclasses.replace(tiny, train=train, deviation=dataclasses.replace(tiny.deviation, seed=3))
    p = longrun.schedule_params(tiny, 3, 2)
    assert (p.train.epochs, p.train.lr_decay_epochs, p.train.seeds) == (3, 2, (3,))
    assert (p.train.checkpoint_every, p.train.snapshot_every, p.base.train_size) == (1, 0, 100)
    assert longrun.schedule_params(tiny, 5, None).train.lr_decay_epochs == 5  # constant lr: no decay within the run
    hist = longrun.train_run(p, xtr[:100], ytr[:100], tmp_path / "m.pt", tmp_path / "m.tsv", tmp_path / "c.pt",
                             torch.device("cpu"))
    assert [h["lr"] for h in hist] == pytest.approx([0.1, 0.1, 0.01])
    saved = evaluate.read_model(tmp_path / "m.pt")
    assert saved["seed"] == 3 and saved["snapshots"] == {}


def test_a_reference_without_metrics_stops_before_any_work(tmp_path, repo_root):
    (tmp_path / "empty" / "metrics").mkdir(parents=True)
    for ref in (tmp_path / "absent", tmp_path / "empty"):
        r = subprocess.run([sys.executable, "-m", "stages.deviation", "--reference", str(ref)], cwd=repo_root,
                           env=dict(os.environ, PYTHONPATH=str(repo_root)), capture_output=True, text=True)
        assert r.returncode == 1 and f"--reference {ref}: expected a run folder with metrics/" in r.stderr, r.stderr


def test_type_gaps_by_hand():
    """Per convention and type: mean and largest |gap| in points; a type closes when every level lies within
    the bound, one exactly on it included (100 (ours - paper) rounds to -2.0000000000000018 there)."""
    paper = pd.Series({t: 0.794 for t in TEST_SETS})
    acc = {"blur": (0.774, 0.814, 0.794), "noise": (0.773, 0.794, 0.794), "jpeg": (0.794, 0.794, 0.7945)}
    conv = pd.DataFrame([{"convention": "default", "changes": "", "test_set": f"{d}_{lv + 1}", "acc": a}
                         for d, levels in acc.items() for lv, a in enumerate(levels)])
    got = deviation.type_gaps(conv, paper, 0.02).set_index("type")
    assert got.closes.to_dict() == {"blur": True, "noise": False, "jpeg": True}
    np.testing.assert_allclose(got.mean_gap_points, [0.0, -0.7, 0.05 / 3], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.max_abs_gap_points, [2.0, 2.1, 0.05], rtol=0, atol=1e-12)


def test_convention_markdown_by_hand():
    """The paper's S1 row first, then each convention in the study's order; cells 'accuracy % (mean SSIM)', the
    nine distorted sets only."""
    acc = dict(zip(TEST_SETS, (0.806, 0.702, 0.651, 0.603, 0.554, 0.452, 0.301, 0.758, 0.707, 0.656)))
    ssim = dict(zip(TEST_SETS, (1.0, 0.9312, 0.8804, 0.8101, 0.7462, 0.6223, 0.4807, 0.8607, 0.8166, 0.6816)))
    conv = pd.DataFrame([{"convention": name, "changes": changes, "test_set": t, "acc": acc[t] - shift,
                          "ssim": ssim[t] - shift / 10} for name, changes, shift in
                         (("default", "(the study's defaults)", 0.0), ("blur_zero", "blur_border=constant", 0.1))
                         for t in TEST_SETS])
    paper = pd.Series(dict(zip(TEST_SETS, (0.81, 0.689, 0.61, 0.537, 0.501, 0.359, 0.154, 0.695, 0.64, 0.587))))
    assert deviation.convention_markdown(conv, paper).splitlines() == [
        "| convention | changes | blur_1 | blur_2 | blur_3 | noise_1 | noise_2 | noise_3 | jpeg_1 | jpeg_2 | jpeg_3 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        "| paper S1 |  | 68.9 | 61.0 | 53.7 | 50.1 | 35.9 | 15.4 | 69.5 | 64.0 | 58.7 |",
        "| default | (the study's defaults) | 70.2 (0.931) | 65.1 (0.880) | 60.3 (0.810) | 55.4 (0.746) | 45.2 (0.622) "
        "| 30.1 (0.481) | 75.8 (0.861) | 70.7 (0.817) | 65.6 (0.682) |",
        "| blur_zero | blur_border=constant | 60.2 (0.921) | 55.1 (0.870) | 50.3 (0.800) | 45.4 (0.736) "
        "| 35.2 (0.612) | 20.1 (0.471) | 65.8 (0.851) | 60.7 (0.807) | 55.6 (0.672) |"]


def _probe_row(epoch: int, train_acc: float, pristine: float, levels: dict) -> dict:
    return {"epoch": epoch, "lr": 0.1, "train_acc": train_acc, "pristine": pristine,
            **{f"{d}_{lv + 1}": a for d, accs in levels.items() for lv, a in enumerate(accs)}}


def test_probe_trend_by_hand():
    """From the first evaluation at or after the start epoch (none that late: the first) to the last; each type
    the mean of its three levels, 'distorted' the mean of the three types."""
    rows = pd.DataFrame([
        _probe_row(3, 0.6, 0.65, {"blur": (0.6, 0.5, 0.4), "noise": (0.5, 0.4, 0.3), "jpeg": (0.6, 0.6, 0.3)}),
        _probe_row(6, 0.7, 0.70, {"blur": (0.7, 0.6, 0.2), "noise": (0.6, 0.5, 0.4), "jpeg": (0.7, 0.6, 0.2)}),
        _probe_row(9, 0.8, 0.72, {"blur": (0.6, 0.3, 0.3), "noise": (0.7, 0.6, 0.2), "jpeg": (0.5, 0.5, 0.5)})])
    first = {"epoch": 3, "train_acc": 0.6, "pristine": 0.65, "blur": 0.5, "noise": 0.4, "jpeg": 0.5,
             "distorted": 1.4 / 3}
    mid = {"epoch": 6, "train_acc": 0.7, "pristine": 0.7, "blur": 0.5, "noise": 0.5, "jpeg": 0.5, "distorted": 0.5}
    last = {"epoch": 9, "train_acc": 0.8, "pristine": 0.72, "blur": 0.4, "noise": 0.5, "jpeg": 0.5,
            "distorted": 1.4 / 3}
    eps = np.finfo(float).eps  # means of three: a few roundings
    for start, want in ((1, first), (4, mid), (6, mid), (10, first)):
        got = deviation.probe_trend(rows, start)
        assert got == {"from": pytest.approx(want, rel=4 * eps), "to": pytest.approx(last, rel=4 * eps)}, start
        assert isinstance(got["from"]["epoch"], int)


def _gaps() -> pd.DataFrame:
    """type_gaps' rows: default; a blur and two noise conventions. noise_float's blur gap (it leaves blur untouched,
    made small here) must not count for blur; noise_shared_field's levels cancel in the mean but not in the largest."""
    cells = {"default": ("(the study's defaults)", {"blur": (5.3, 7.1), "noise": (12.6, 18.4), "jpeg": (8.2, 8.6)}),
             "blur_zero": ("blur_border=constant", {"blur": (0.9, 1.0), "noise": (12.6, 18.4), "jpeg": (8.2, 8.6)}),
             "noise_float": ("noise_output=float", {"blur": (0.3, 0.6), "noise": (-9.5, 11.5), "jpeg": (8.2, 8.6)}),
             "noise_shared_field": ("noise_field=shared",
                                    {"blur": (5.3, 7.1), "noise": (-0.4, 14.0), "jpeg": (8.2, 8.6)})}
    return pd.DataFrame([{"convention": name, "type": d, "changes": changes, "mean_gap_points": m,
                          "max_abs_gap_points": x, "closes": x <= 2} for name, (changes, by) in cells.items()
                         for d, (m, x) in by.items()])


def _trend(**to) -> dict:
    return {"from": {"epoch": 12, "train_acc": 0.80, "pristine": 0.75, "blur": 0.60, "noise": 0.55, "jpeg": 0.50,
                     "distorted": 0.55},
            "to": {"epoch": 30, "train_acc": 0.95, "pristine": 0.76, "blur": 0.52, "noise": 0.50, "jpeg": 0.49,
                   "distorted": 0.51, **to}}


def test_where_we_differ_by_hand():
    """The section's sentences written out: counts per kind, the closest convention among those that change a type,
    and the probe's verdict (memorisation: distorted accuracy falls by more than 2 points, pristine holds within 2,
    training accuracy rises)."""
    summary = pd.DataFrame([
        {"kind": "pristine-trained", "cells": 10, "within": 2, "mean_diff_points": 6.14, "mean_abs_z": 3.6,
         "above_paper": 9},
        {"kind": "mix, own type", "cells": 36, "within": 20, "mean_diff_points": -1.93, "mean_abs_z": 1.2,
         "above_paper": 3},
        {"kind": "all", "cells": 46, "within": 22, "mean_diff_points": 1.1, "mean_abs_z": 1.44, "above_paper": 12}])
    out = deviation.where_we_differ(summary, _gaps(), _trend(), 0.02, 30, "results/x")
    assert out[:3] == [
        "In results/x, 22 of 46 Table 2 cells lie within 2 points of the paper; the mean |z| is 1.4 standard errors.",
        "- pristine-trained: 2 of 10 within 2 points, mean difference +6.1 points, 9 above the paper.",
        "- mix, own type: 20 of 36 within 2 points, mean difference -1.9 points, 3 above the paper."]
    assert out[5:8] == [
        "- blur: under the default the mean gap to the paper's S1 is +5.3 points (largest 7.1); the closest "
        "convention is blur_zero (blur_border=constant): mean +0.9, largest 1.0. Within 2 points at every level: "
        "blur_zero.",
        "- noise: under the default the mean gap to the paper's S1 is +12.6 points (largest 18.4); the closest "
        "convention is noise_float (noise_output=float): mean -9.5, largest 11.5. No convention brings all three "
        "levels within 2 points.",
        "- jpeg: under the default the mean gap to the paper's S1 is +8.2 points (largest 8.6); no other convention "
        "comes closer. No convention brings all three levels within 2 points."]
    assert len(out) == 10 and out[9] == (
        "**Does a long constant-lr schedule make S1 brittle?** Along 30 epochs at constant lr, from epoch 12 to 30: "
        "training accuracy 80.0% -> 95.0%, pristine 75.0% -> 76.0% (+1.0), mean over the nine distorted sets "
        "55.0% -> 51.0% (-4.0; blur -8.0, noise -5.0, JPEG -1.0). Robustness fell by more than 2 points while "
        "pristine accuracy held: the memorisation explanation fits within this probe.")
    no = "That is not the pattern memorisation predicts"
    for to in ({"distorted": 0.54}, {"pristine": 0.72}, {"pristine": 0.78}, {"train_acc": 0.80}):
        last = deviation.where_we_differ(summary, _gaps(), _trend(**to), 0.02, 30, "results/x")[-1]
        assert no in last and last.endswith("within 30 epochs this explanation does not hold; the paper's longer "
                                            "run at lr 0.1 (docs/protocol.md, Schedules) stays untested."), to


def test_probe_verdict_counts_a_shift_on_the_bound_as_within():
    """As report.within_points: a shift of exactly 2 points (100 (0.773 - 0.753) rounds to 2.0000000000000018) lies
    within the bound: pristine still holds, and a distorted drop of exactly 2 is no fall of more than 2."""
    on_pristine = _trend(pristine=0.773)
    on_pristine["from"]["pristine"] = 0.753
    on_drop = _trend(distorted=0.53)  # 100 (0.53 - 0.55) rounds to -2.0000000000000018
    summary = pd.DataFrame([{"kind": "all", "cells": 1, "within": 1, "mean_diff_points": 0.0, "mean_abs_z": 0.0,
                             "above_paper": 0}])
    verdict = [deviation.where_we_differ(summary, _gaps(), t, 0.02, 30, "results/x")[-1]
               for t in (on_pristine, on_drop)]
    assert "the memorisation explanation fits within this probe" in verdict[0]
    assert "That is not the pattern memorisation predicts" in verdict[1]


def test_deviation_stage_metrics_by_hand(tmp_path, monkeypatch, repo_root, raw_params, tiny_cifar):
    """stages.deviation on a two-strategy reference run, a convention table and a probe made here: its metrics
    written out (cells within 2 points, S1's mean gap per type, the conventions closing it, the probe's trend
    from the converged schedule's decay epoch)."""
    from stages import deviation as stage
    raw_params["deviation"].update(converged={"epochs": 4, "lr_decay_epochs": 3}, probe={"epochs": 4, "eval_every": 1})
    raw_params["deviation"]["conventions"] = {"blur_zero": {"blur_border": "constant"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    paper = pd.read_csv(repo_root / "reference" / "paper_table2.csv")
    s1 = paper.iloc[0]
    # S1 1.5 points above the paper but 3 below on jpeg_3; S2 5 below but on it on pristine: 10 of 20 within 2
    shifts = {"S1": {**{t: 0.015 for t in TEST_SETS}, "jpeg_3": -0.03}, "S2": {**{t: -0.05 for t in TEST_SETS},
                                                                             "pristine": 0.0}}
    (tmp_path / "ref" / "metrics").mkdir(parents=True)
    for i, (name, shift) in enumerate(shifts.items()):
        m = {"labels": "one-hot", "train_set": paper.train_set[i], "seeds": [0], "test_images": 1000,
             **{t: {"acc": float(paper[t][i]) + shift[t], "acc_std": 0.0} for t in TEST_SETS}}
        (tmp_path / "ref" / "metrics" / f"{name}.json").write_text(json.dumps(m))
    gap = {"default": {"blur": (0.01, 0.02, 0.06), "noise": (-0.01, -0.01, -0.01), "jpeg": (0.05, 0.05, 0.05)},
           "blur_zero": {"blur": (0.01, 0.0, -0.01), "noise": (-0.01, -0.01, -0.01), "jpeg": (0.05, 0.05, 0.05)}}
    conv = pd.DataFrame([{"convention": c, "changes": ch, "test_set": f"{d}_{lv + 1}", "ssim": 0.5,
                          "acc": float(s1[f"{d}_{lv + 1}"]) + g} for c, ch in
                         (("default", "(the study's defaults)"), ("blur_zero", "blur_border=constant"))
                         for d, levels in gap[c].items() for lv, g in enumerate(levels)])
    monkeypatch.setattr(stage.evaluate, "load_model", lambda *a: None)
    monkeypatch.setattr(stage.dev_lib, "evaluate_conventions", lambda *a, **k: conv)
    probe = pd.DataFrame([_probe_row(e, 0.5 + e / 10, 0.7, {d: (0.5 - e / 100,) * 3 for d in ("blur", "noise", "jpeg")})
                          for e in (1, 2, 3, 4)])
    probe.to_csv(tmp_path / "probe.csv", index=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["deviation", "--reference", "ref", "--raw", str(tiny_cifar), "--model", "none",
                                      "--probe", "probe.csv", "--paper", str(repo_root / "reference")])
    stage.main()
    got = json.loads((tmp_path / "metrics" / "deviation.json").read_text())
    assert (got["cells"], got["within"]) == (20, 10)
    assert {k: (v["cells"], v["within"]) for k, v in got["by_kind"].items()} == {
        "pristine-trained": (10, 9), "mix, own type": (3, 0), "mix, other type": (6, 0), "mix, pristine": (1, 1),
        "all": (20, 10)}
    assert got["s1_gap_points"] == {"blur": 3.0, "noise": -1.0, "jpeg": 5.0}  # rounded to 3 decimals
    assert got["conventions_closing"] == {"blur": ["blur_zero"], "noise": ["default", "blur_zero"], "jpeg": []}
    assert (got["probe"]["from"]["epoch"], got["probe"]["to"]["epoch"]) == (3, 4)
    assert (tmp_path / "plots" / "deviation_probe.png").stat().st_size > 0
    assert "| blur_zero | blur_border=constant | " in (tmp_path / "plots" / "deviation.md").read_text()


def test_deviation_train_stage_hands_each_schedule_its_run(tmp_path, monkeypatch, raw_params, tiny_arrays,
                                                           tiny_cifar):
    """stages.deviation_train: deviation.train_size images, the first tenth of each class in official order;
    converged: deviation.converged's schedule; probe: the ten test sets and its rows as a CSV; else a usage error."""
    from stages import deviation_train as stage
    raw_params["deviation"].update(train_size=50, train_eval_size=20, converged={"epochs": 3, "lr_decay_epochs": 2})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    (xtr, ytr), (xte, yte) = tiny_arrays
    keep = np.sort(np.concatenate([np.flatnonzero(ytr == k)[:5] for k in range(10)]))
    dist = np.broadcast_to(np.arange(9, dtype=np.uint8).reshape(3, 3, 1, 1, 1, 1), (3, 3) + xte.shape)
    (tmp_path / "dist").mkdir()
    np.save(tmp_path / "dist" / "test.npy", dist)
    seen, rows = {}, [{"epoch": 2, "pristine": 0.5}, {"epoch": 3, "pristine": 0.25}]
    monkeypatch.setattr(stage.longrun, "train_run", lambda q, x, y, *paths_device: seen.update(
        run=(q, x, y, paths_device[:3])))
    monkeypatch.setattr(stage.longrun, "probe", lambda p, x, y, tx, d, ty, *paths_device: seen.update(
        probe=(x, y, tx, np.asarray(d), ty, paths_device[:3])) or rows)
    monkeypatch.setenv("CIFAR10_LOCAL", str(tiny_cifar))
    monkeypatch.chdir(tmp_path)
    for schedule in ("converged", "probe", "longest"):
        monkeypatch.setattr(sys, "argv", ["deviation_train", "--schedule", schedule, "--raw", str(tiny_cifar),
                                          "--distorted", "dist"])
        if schedule == "longest":
            with pytest.raises(UsageError, match="--schedule longest: expected converged or probe"):
                stage.main()
        else:
            stage.main()
    q, x, y, paths = seen["run"]
    np.testing.assert_array_equal(x, xtr[keep])
    np.testing.assert_array_equal(y, ytr[keep])
    assert (q.train.epochs, q.train.lr_decay_epochs, q.train.seeds) == (3, 2, (0,))
    assert [str(s) for s in paths] == ["models/deviation/converged.pt", "logs/deviation/converged.tsv",
                                       "checkpoints/deviation/converged.pt"]
    x, y, tx, d, ty, paths = seen["probe"]
    np.testing.assert_array_equal(x, xtr[keep])
    np.testing.assert_array_equal(ty, yte)
    np.testing.assert_array_equal(tx, xte)
    np.testing.assert_array_equal(d, dist)
    assert str(paths[0]) == "models/deviation/probe.pt"
    assert pd.read_csv(tmp_path / "plots" / "deviation_probe.csv").to_dict(orient="records") == rows
