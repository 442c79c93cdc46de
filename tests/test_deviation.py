"""The deviation study: the distortion conventions against independent computations written
here (numpy by hand, scipy, Pillow against OpenCV), the cells' standard errors, the convention
evaluation of one model, and the probe's resumable training on tiny data."""
from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from iqals import deviation, distort, evaluate, longrun
from iqals import model as model_lib
from iqals import report as rep
from iqals.params import TEST_SETS
from iqals.seeds import image_streams

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
    import subprocess
    import sys

    import yaml
    raw_params["distort"]["noise_output"] = "float"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    r = subprocess.run([sys.executable, "-m", "stages.distort", "--raw", str(tmp_path / "none")], cwd=tmp_path,
                       capture_output=True, text=True, env={"PYTHONPATH": str(repo_root), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1
    assert "distort.noise_output = 'float': expected round or floor" in r.stderr


def test_evaluate_conventions_scores_one_model_on_every_variant(images, tiny_arrays, params):
    labels = tiny_arrays[0][1][:len(images)]
    keep = {k: params.deviation.conventions[k] for k in ("noise_float", "blur_zero")}
    p = dataclasses.replace(params, deviation=dataclasses.replace(params.deviation, conventions=keep))
    net = model_lib.build(p.model, 3)
    df = deviation.evaluate_conventions(net, images, labels, np.arange(len(images)), p, torch.device("cpu"))
    assert list(df.convention.unique()) == ["default", "noise_float", "blur_zero"]
    assert len(df) == 3 * len(TEST_SETS)
    sets = distort.distort_all(images, p.distort, p.base.seed, "test")
    by = df.set_index(["convention", "test_set"])
    for t, name in enumerate(TEST_SETS[1:]):
        pr = evaluate.predict(net, sets[t // 3, t % 3], torch.device("cpu"), 100)
        assert by.loc[("default", name), "acc"] == evaluate.accuracy(pr, labels)
    assert (by.xs("pristine", level=1).ssim == 1).all() and (df.ssim <= 1).all()
    assert by.loc[("blur_zero", "blur_1"), "ssim"] < by.loc[("default", "blur_1"), "ssim"]  # zero border: worse
    assert by.loc[("noise_float", "jpeg_1"), "acc"] == by.loc[("default", "jpeg_1"), "acc"]


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


def test_probe_evaluates_every_few_epochs_and_resumes(tmp_path, tiny_arrays, params):
    (xtr, ytr), (xte, yte) = tiny_arrays
    p = _tiny(params, epochs=3, eval_every=2)
    dist = distort.distort_all(xte, p.distort, p.base.seed, "test")
    paths = tmp_path / "probe.pt", tmp_path / "probe.tsv", tmp_path / "ck" / "probe.pt"
    rows = longrun.probe(p, xtr[:100], ytr[:100], xte, dist, yte, *paths, torch.device("cpu"))
    assert [r["epoch"] for r in rows] == [2, 3] and all(r["lr"] == p.train.lr for r in rows)  # constant lr
    net = evaluate.load_model(paths[0], p, torch.device("cpu"))
    sets = evaluate.test_sets(xte, dist)
    for name in TEST_SETS:  # the last row is the final model's accuracy
        assert rows[-1][name] == round(evaluate.accuracy(evaluate.predict(net, sets[name], torch.device("cpu"), 100),
                                                         yte), 5)
    trained = paths[2].stat().st_mtime_ns
    assert longrun.probe(p, xtr[:100], ytr[:100], xte, dist, yte, *paths, torch.device("cpu")) == rows
    assert paths[2].stat().st_mtime_ns == trained  # finished: nothing trained again
    longer = _tiny(params, epochs=4, eval_every=2)  # another schedule: a fresh run, old rows dropped
    rows4 = longrun.probe(longer, xtr[:100], ytr[:100], xte, dist, yte, *paths, torch.device("cpu"))
    assert [r["epoch"] for r in rows4] == [2, 4]


def test_converged_schedule_decays_where_it_says(tmp_path, tiny_arrays, params):
    (xtr, ytr), _ = tiny_arrays
    p = longrun.schedule_params(_tiny(params), 3, 2)
    hist = longrun.train_run(p, xtr[:100], ytr[:100], tmp_path / "m.pt", tmp_path / "m.tsv", tmp_path / "c.pt",
                             torch.device("cpu"))
    assert [h["lr"] for h in hist] == pytest.approx([0.1, 0.1, 0.01])
    assert p.train.seeds == (p.deviation.seed,) and p.base.train_size == 100


def test_a_reference_without_metrics_stops_before_any_work(tmp_path, repo_root):
    import os
    import subprocess
    import sys
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
