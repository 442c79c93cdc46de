"""CIFAR-10-C style corruptions (iqals/corruptions.py) and their params section."""
from __future__ import annotations

import math
from types import SimpleNamespace

import cv2
import numpy as np
from PIL import Image
import pytest
from scipy import stats as scipy_stats

from iqals import corruptions
from iqals import params as params_lib
from iqals.params import ParamError
from tests.conftest import natural_images

RANDOM = ("motion_blur", "shot_noise", "impulse_noise", "fog", "elastic_transform")


@pytest.fixture(scope="module")
def images():
    return natural_images(16, 0)


@pytest.fixture(scope="module")
def every(images):
    """family -> uint8 (5, 16, 32, 32, 3), seed 0."""
    return {f: corruptions.corrupt_all(images, [f], corruptions.SEVERITIES, seed=0)[0] for f in corruptions.FAMILIES}


def mad(a, b):
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_families_table():
    assert set(RANDOM) < set(corruptions.FAMILIES) and len(corruptions.FAMILIES) == 8
    for name, (fn, consts) in corruptions.FAMILIES.items():
        assert callable(fn) and len(consts) == 5, name


def test_constants_are_make_cifar_c():
    """The CIFAR-10 constants of make_cifar_c.py (hendrycks/robustness), written out again."""
    expected = {
        "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
        "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
        "shot_noise": [500, 250, 100, 75, 50],
        "impulse_noise": [.01, .02, .03, .05, .07],
        "contrast": [.75, .5, .4, .3, 0.15],
        "fog": [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
        "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
        "elastic_transform": [(0, 0, 2.56), (1.6, 6.4, 2.24), (2.56, 1.92, 1.92), (3.2, 1.28, 1.6),
                              (3.2, 0.96, 0.96)],
    }
    assert list(corruptions.FAMILIES) == list(expected)
    for f, consts in expected.items():
        np.testing.assert_allclose(np.array(corruptions.FAMILIES[f][1], float), np.array(consts, float), err_msg=f)


def test_shape_dtype_and_all_stack(images, every):
    for f, out in every.items():
        assert out.dtype == np.uint8 and out.shape == (5,) + images.shape, f
        assert all(mad(o, images) > 0 for o in out), f
    ticks = []
    stack = corruptions.corrupt_all(images[:3], ["fog", "contrast"], [2, 5], seed=0,
                                    progress=SimpleNamespace(update=ticks.append))
    assert stack.shape == (2, 2, 3, 32, 32, 3) and ticks == [1] * 4  # one tick per family x severity
    np.testing.assert_array_equal(stack[0, 1], every["fog"][4, :3])  # prefix of the stack: same images
    part = corruptions.corrupt_all(images[5:9], ["shot_noise", "fog"], [3], seed=0, index=np.arange(5, 9))
    for f, family in enumerate(["shot_noise", "fog"]):  # a slice at its official positions: same images
        np.testing.assert_array_equal(part[f, 0], every[family][2, 5:9], err_msg=family)


def test_deterministic_and_seeded(images, every):
    for f in corruptions.FAMILIES:
        for s in (1, 5):
            again = corruptions.corrupt(images, f, s, seed=0)
            np.testing.assert_array_equal(again, every[f][s - 1], err_msg=f)
            other = corruptions.corrupt(images, f, s, seed=1)
            if f in RANDOM:
                assert not np.array_equal(other, again), f
            else:
                np.testing.assert_array_equal(other, again, err_msg=f)


def test_index_keys_the_stream(images):
    """Image i's draws depend on its official position, not on its place in the stack."""
    full = corruptions.corrupt(images, "shot_noise", 3, seed=7)
    part = corruptions.corrupt(images[5:9], "shot_noise", 3, seed=7, index=np.arange(5, 9))
    np.testing.assert_array_equal(part, full[5:9])
    assert not np.array_equal(corruptions.corrupt(images[5:9], "shot_noise", 3, seed=7), part)


def test_shot_noise_by_hand_from_its_stream(images):
    """round(255 min(K / c, 1)), K ~ Poisson(c x) drawn from Philox keyed by (derive_seed(seed, "corrupt", family,
    severity), official position): the documented key, so another family, severity or position draws otherwise."""
    from iqals.seeds import derive_seed
    index = np.arange(100, 104)
    for s in (1, 5):
        c = corruptions.FAMILIES["shot_noise"][1][s - 1]
        key = derive_seed(7, "corrupt", "shot_noise", s)
        want = [np.floor(np.clip(np.random.Generator(np.random.Philox(key=[key, int(j)])).poisson(img / 255.0 * c) / c,
                                 0, 1) * 255 + 0.5) for img, j in zip(images[:4], index)]
        np.testing.assert_array_equal(corruptions.corrupt(images[:4], "shot_noise", s, seed=7, index=index),
                                      np.array(want, np.uint8), err_msg=str(s))


def test_distortion_grows_with_severity(images, every):
    for f, out in every.items():
        if f == "elastic_transform":
            continue  # pixel distortion falls with severity there: see test_elastic_...
        d = [mad(o, images) for o in out]
        for s in range(4):
            if f == "motion_blur" and s == 2:
                # make_cifar_c.py's (6, 2) and (8, 2) differ only in the kernel length; taps
                # beyond the 13th weigh exp(-13^2 / 8) ~ 7e-10: the same blur, other angles
                assert abs(d[3] - d[2]) < 0.06 * d[2], d
                continue
            assert d[s + 1] > d[s], (f, d)


def test_elastic_local_warp_grows_affine_part_shrinks():
    """Warp a coordinate ramp; the corrupted R, G values give each pixel's source position.
    make_cifar_c.py's constants shrink the random affine part (2.56 -> 0.96 px corner shifts)
    while the elastic (non-affine) displacement grows from none at severity 1."""
    yy, xx = np.mgrid[0:32, 0:32]
    ramp = np.stack([xx * 7 + 20, yy * 7 + 20, np.full_like(xx, 128)], -1).astype(np.uint8)
    m = slice(5, 27)  # interior: away from the reflected borders
    a = np.stack([xx[m, m].ravel(), yy[m, m].ravel(), np.ones(22 * 22)], 1)
    local, affine = [], []
    for s in corruptions.SEVERITIES:
        y = corruptions.corrupt(np.repeat(ramp[None], 12, 0), "elastic_transform", s, seed=0).astype(float)
        res, aff = [], []
        for n in range(12):
            for src, base in (((y[n, ..., 0] - 20) / 7, xx), ((y[n, ..., 1] - 20) / 7, yy)):
                b = src[m, m].ravel()
                fit = a @ np.linalg.lstsq(a, b, rcond=None)[0]
                res.append(np.sqrt(np.mean((b - fit) ** 2)))
                aff.append(np.sqrt(np.mean((fit - base[m, m].ravel()) ** 2)))
        local.append(np.mean(res))
        affine.append(np.mean(aff))
    assert local[0] < 0.1  # severity 1 is a pure affine map (residual: 8-bit rounding)
    assert local[1] < local[0] + 0.05 < local[2] < local[3] < local[4], local
    assert affine[0] > affine[1] > affine[2] > affine[3] > affine[4], affine


def test_elastic_as_the_original(images):
    """make_cifar_c.py elastic_transform, written as the original writes it (float32 image, corner shifts, then dx
    and dy smoothed by skimage's gaussian, indices of a 3-d meshgrid), each image drawing from its own stream in the
    original's order: the same calls on the same values, so equal."""
    from scipy.ndimage import map_coordinates
    from skimage.filters import gaussian
    x = images[:3]
    streams = lambda: [np.random.Generator(np.random.Philox(key=[7, i])) for i in range(len(x))]  # noqa: E731
    for s, c in enumerate(corruptions.FAMILIES["elastic_transform"][1], 1):
        got = corruptions.elastic_transform(x / 255.0, c, streams())
        for img, g, rng in zip(x, got, streams()):
            image = np.array(img, dtype=np.float32) / 255.
            shape = image.shape
            shape_size = shape[:2]
            center_square = np.float32(shape_size) // 2
            square_size = min(shape_size) // 3
            pts1 = np.float32([center_square + square_size,
                               [center_square[0] + square_size, center_square[1] - square_size],
                               center_square - square_size])
            pts2 = pts1 + rng.uniform(-c[2], c[2], size=pts1.shape).astype(np.float32)
            image = cv2.warpAffine(image, cv2.getAffineTransform(pts1, pts2), shape_size[::-1],
                                   borderMode=cv2.BORDER_REFLECT_101)
            dx = (gaussian(rng.uniform(-1, 1, size=shape[:2]), c[1], mode="reflect", truncate=3) * c[0]).astype(
                np.float32)
            dy = (gaussian(rng.uniform(-1, 1, size=shape[:2]), c[1], mode="reflect", truncate=3) * c[0]).astype(
                np.float32)
            dx, dy = dx[..., np.newaxis], dy[..., np.newaxis]
            xx, yy, zz = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
            indices = np.reshape(yy + dy, (-1, 1)), np.reshape(xx + dx, (-1, 1)), np.reshape(zz, (-1, 1))
            want = np.clip(map_coordinates(image, indices, order=1, mode="reflect").reshape(shape), 0, 1) * 255
            np.testing.assert_array_equal(g, want, err_msg=f"severity {s}")


def test_contrast_by_hand(images):
    for s, c in enumerate(corruptions.FAMILIES["contrast"][1], 1):
        x = images / 255.0
        mean = x.mean(axis=(1, 2), keepdims=True)
        ref = np.floor(np.clip((x - mean) * c + mean, 0, 1) * 255 + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(corruptions.corrupt(images, "contrast", s, seed=0), ref)


def test_pixelate_by_hand(images):
    """Pillow BOX down: average of the pixels whose centres lie in the output pixel's window;
    BOX up: nearest neighbour, OpenCV's INTER_NEAREST_EXACT."""
    def box_down(img, n):  # one axis (axis 0) at a time, rounded to 8 bits after each, as Pillow
        scale = img.shape[0] / n
        out = np.empty((n,) + img.shape[1:])
        for k in range(n):
            centres = np.arange(img.shape[0]) + 0.5
            pick = (centres > k * scale) & (centres <= (k + 1) * scale)
            out[k] = img[pick].mean(axis=0)
        return np.floor(out + 0.5)

    for s, c in enumerate(corruptions.FAMILIES["pixelate"][1], 1):
        n = int(32 * c)
        got = corruptions.corrupt(images, "pixelate", s, seed=0)
        for img, g in zip(images, got):
            small = box_down(box_down(img.astype(float).transpose(1, 0, 2), n).transpose(1, 0, 2), n)
            ref = cv2.resize(small.astype(np.uint8), (32, 32), interpolation=cv2.INTER_NEAREST_EXACT)
            np.testing.assert_array_equal(g, ref)


def test_pixelate_matches_pillow(images):
    """The original's calls on the uint8 image (the hand-made reference is test_pixelate_by_hand)."""
    for s, c in enumerate(corruptions.FAMILIES["pixelate"][1], 1):
        n = int(32 * c)
        ref = np.stack([np.asarray(Image.fromarray(im).resize((n, n), Image.BOX).resize((32, 32), Image.BOX))
                        for im in images])
        np.testing.assert_array_equal(corruptions.corrupt(images, "pixelate", s, seed=0), ref)


def test_defocus_as_the_original(images):
    """make_cifar_c.py: 17x17 disk kernel, 3x3 Gaussian anti-alias, cv2.filter2D per channel."""
    for s, (radius, alias) in enumerate(corruptions.FAMILIES["defocus_blur"][1], 1):
        L = np.arange(-8, 9)
        X, Y = np.meshgrid(L, L)
        disk = ((X**2 + Y**2) <= radius**2).astype(np.float32)
        kernel = cv2.GaussianBlur(disk / disk.sum(), (3, 3), alias)
        got = corruptions.corrupt(images, "defocus_blur", s, seed=0)
        for img, g in zip(images, got):
            ref = np.stack([cv2.filter2D(img[..., d] / 255.0, -1, kernel) for d in range(3)], -1)
            ref = np.clip(ref, 0, 1) * 255
            assert np.abs(g - ref).max() <= 0.5 + 1e-6


def test_motion_kernel_as_imagemagick():
    w, offs = corruptions._motion_kernel(6, 2, 0.0)
    assert len(w) == 13 and offs == [(i, 0) for i in range(13)]  # one-sided, along +x
    np.testing.assert_allclose(w, np.exp(-np.arange(13) ** 2 / 8) / np.exp(-np.arange(13) ** 2 / 8).sum())
    _, offs = corruptions._motion_kernel(6, 2, 45.0)
    assert offs[1] == (1, 1) and offs[12] == (math.ceil(12 / math.sqrt(2) - 0.5),) * 2


def test_impulse_fraction(images):
    x = images[None].repeat(4, 0).reshape(-1, 32, 32, 3)  # 64 images
    x = np.clip(x, 1, 254)  # no value is already salt or pepper
    for s, amount in enumerate(corruptions.FAMILIES["impulse_noise"][1], 1):
        got = corruptions.corrupt(x, "impulse_noise", s, seed=3, index=np.arange(len(x)))
        changed = got != x
        assert abs(changed.mean() - amount) < 4 * math.sqrt(amount / changed.size) + 1e-3
        assert set(np.unique(got[changed])) <= {0, 255}
        assert abs((got[changed] == 255).mean() - 0.5) < 0.05
        # each value flips on its own: a pixel has exactly one of its three values changed w.p. 3 a (1 - a)^2
        one = changed.sum(-1) == 1
        p = 3 * amount * (1 - amount) ** 2
        assert abs(one.mean() - p) < 4 * math.sqrt(p / one.size) + 1e-3, (s, one.mean(), p)


def test_shot_noise_is_rounded_poisson():
    """Each value of a flat grey image is round(255 min(K / c, 1)), K ~ Poisson(c x): the sample's mean
    and variance against that law's exact moments (rounding 255 K / c moves the variance off x / c
    by up to a few %), within 5 standard errors of the sample (196,608 values)."""
    x = np.full((64, 32, 32, 3), 128, np.uint8)
    for s, c in enumerate(corruptions.FAMILIES["shot_noise"][1], 1):
        got = corruptions.corrupt(x, "shot_noise", s, seed=0).astype(np.float64)
        k = np.arange(4 * c + 100)  # the pmf beyond is below 1e-30
        pmf = scipy_stats.poisson.pmf(k, 128 / 255 * c)
        v = np.floor(np.clip(k / c, 0, 1) * 255 + 0.5)
        mean = (pmf * v).sum()
        var = (pmf * (v - mean) ** 2).sum()
        m4 = (pmf * (v - mean) ** 4).sum()
        assert abs(got.mean() - mean) < 5 * math.sqrt(var / got.size), s
        assert abs(got.var() - var) < 5 * math.sqrt((m4 - var**2) / got.size), s


def test_motion_blur_applies_its_kernel_with_replicated_borders(images):
    """Each output pixel is the kernel's weighted sum of the pixels its taps read, coordinates clamped
    to the image (ImageMagick's edge pixels): a per-pixel loop, the angle drawn from the same stream
    as make_cifar_c draws it. The same products summed in the same order: equal."""
    from iqals.seeds import image_streams
    x, c = images[:2] / 255.0, corruptions.FAMILIES["motion_blur"][1][3]
    got = corruptions.motion_blur(x, c, image_streams(7, len(x)))
    want = np.zeros_like(x)
    for n, rng in enumerate(image_streams(7, len(x))):
        w, offs = corruptions._motion_kernel(*c, rng.uniform(-45, 45))
        for y in range(32):
            for col in range(32):
                for wi, (dx, dy) in zip(w, offs):
                    want[n, y, col] += wi * x[n, min(max(y + dy, 0), 31), min(max(col + dx, 0), 31)]
    np.testing.assert_array_equal(got, np.floor(np.clip(want, 0, 1) * 255 + 0.5))


def plasma_by_hand(rng, decay, size=32):
    """make_cifar_c.py plasma_fractal, point by point, on a torus: per level (step 32, 16, ..., 2; h = step / 2)
    the square centres, then the diamond points (between two corners along a row, then along a column), each
    the mean of its 4 neighbours + wibble U(-wibble, wibble), one block of draws per kind in row order; then
    wibble /= decay. The map before its rescaling to [0, 1]."""
    m = np.zeros((size, size))
    at = lambda i, j: m[i % size, j % size]
    step, wibble = size, 100.0
    while step >= 2:
        h, n = step // 2, size // step
        sq, row, col = (wibble * rng.uniform(-wibble, wibble, (n, n)) for _ in range(3))
        for a, b in np.ndindex(n, n):
            i, j = a * step, b * step
            m[i + h, j + h] = (at(i, j) + at(i + step, j) + at(i, j + step) + at(i + step, j + step)) / 4 + sq[a, b]
        for a, b in np.ndindex(n, n):  # corners either side, centres above and below (left and right)
            i, j = a * step, b * step
            m[i, j + h] = (at(i, j) + at(i, j + step) + at(i - h, j + h) + at(i + h, j + h)) / 4 + row[a, b]
            m[i + h, j] = (at(i, j) + at(i + step, j) + at(i + h, j - h) + at(i + h, j + h)) / 4 + col[a, b]
        step, wibble = h, wibble / decay
    return m


def test_fog_by_hand(images):
    """fog: clip((x + c0 fractal) max(x) / (max(x) + c0), 0, 1) 255, max(x) the image's own (image 1
    peaks at 198, not 255), the fractal drawn from the image's stream and rescaled to [0, 1]."""
    x, eps = images[:3] / 255.0, np.finfo(np.float64).eps
    streams = lambda: [np.random.Generator(np.random.Philox(key=[7, i])) for i in range(3)]
    for c0, decay in corruptions.FAMILIES["fog"][1]:
        got = corruptions.fog(x, (c0, decay), streams())
        for xi, g, rng in zip(x, got, streams()):
            raw = plasma_by_hand(rng, decay)
            want = np.clip((xi + c0 * ((raw - raw.min()) / np.ptp(raw))[..., None]) * xi.max() / (xi.max() + c0), 0, 1)
            # float64 sums in other orders: 5 levels of 4 roundings of values up to max|raw| on each
            # side, relative to the range the map is divided by; then scaled by 255 (1 + c0)
            tol = 64 * eps * 255 * (1 + c0) * np.abs(raw).max() / np.ptp(raw)
            np.testing.assert_allclose(g, want * 255, rtol=0, atol=tol, err_msg=f"fog {c0, decay}")
        fractal = corruptions._plasma_fractal(streams()[0], decay)
        assert fractal.shape == (32, 32) and fractal.min() == 0 and fractal.max() == 1


def test_bad_input():
    x = natural_images(2, 0)
    with pytest.raises(ValueError, match="uint8"):
        corruptions.corrupt(x.astype(np.float32), "fog", 1, 0)
    for bad in (x[:, :16], x[..., :1], np.concatenate([x, x[..., :1]], -1), x[..., 0]):
        with pytest.raises(ValueError, match="shape"):
            corruptions.corrupt(bad, "fog", 1, 0)
    with pytest.raises(ValueError, match="frost"):
        corruptions.corrupt(x, "frost", 1, 0)
    for severity in (0, 6):  # 0 is not the last level
        with pytest.raises(ValueError, match="severity"):
            corruptions.corrupt(x, "fog", severity, 0)


GOOD = {"families": ["fog", "contrast"], "severities": [1, 2, 3, 4, 5], "seed": 0}


def test_each_family_params_names_gets_its_own_function():
    assert tuple(corruptions.FAMILIES) == params_lib.CORRUPTIONS  # the names are params.py's
    assert all(fn.__name__ == name for name, (fn, _) in corruptions.FAMILIES.items())  # paired in order


def parse_corrupt(raw_params, section):
    """params.yaml with its corrupt section replaced, validated: the corrupt section."""
    return params_lib.parse({**raw_params, "corrupt": section}).corrupt


def test_parse_corrupt_good(raw_params):
    p = parse_corrupt(raw_params, GOOD)
    assert p == params_lib.CorruptParams(("fog", "contrast"), (1, 2, 3, 4, 5), 0)
    families = parse_corrupt(raw_params, {**GOOD, "families": list(corruptions.FAMILIES)}).families
    assert families == tuple(corruptions.FAMILIES)


@pytest.mark.parametrize("change, message", [
    ({"families": ["fog", "contrast", "frost"]}, r"corrupt\.families\[2\] = 'frost': expected one of \["),
    ({"families": []}, r"corrupt\.families = \[\]: expected a non-empty list of families, each one of \["),
    ({"families": "fog"}, r"corrupt\.families = 'fog': expected a non-empty list"),
    ({"families": ["fog", "contrast", "fog"]}, r"corrupt\.families = \['fog', 'contrast', 'fog'\]: expected "
     r"distinct families \(corrupt\.families\[2\] repeats corrupt\.families\[0\]\)"),
    ({"severities": [0, 1]}, r"corrupt\.severities\[0\] = 0: expected an integer in \[1, 5\]"),
    ({"severities": [1, 6]}, r"corrupt\.severities\[1\] = 6: expected an integer in \[1, 5\]"),
    ({"severities": [2.5]}, r"corrupt\.severities\[0\] = 2\.5: expected an integer"),
    ({"severities": []}, r"corrupt\.severities = \[\]: expected a non-empty list"),
    ({"severities": [1, 2, 2]}, r"corrupt\.severities = \[1, 2, 2\]: expected distinct severities"),
    ({"seed": -1}, r"corrupt\.seed = -1: expected an integer"),
    ({"seed": True}, r"corrupt\.seed = True"),
    ({"extra": 1}, r"corrupt\.extra = 1: expected no such key"),
])
def test_parse_corrupt_rejects(raw_params, change, message):
    with pytest.raises(ParamError, match=message):
        parse_corrupt(raw_params, {**GOOD, **change})


def test_parse_corrupt_missing(raw_params):
    with pytest.raises(ParamError, match=r"corrupt\.seed = None: expected a value \(key is missing\)"):
        parse_corrupt(raw_params, {"families": ["fog"], "severities": [1]})
    with pytest.raises(ParamError, match=r"params\.yaml: corrupt = None: expected a mapping"):
        parse_corrupt(raw_params, None)


def test_stage_end_to_end(tmp_path, monkeypatch, raw_params):
    """stages/corrupt.py on 6 images: outputs, shapes and the PSNR summary per family and severity; fog draws from
    corrupt.seed and each image's official position (the raw copy's index), as corrupt() documents."""
    import json
    import sys

    import yaml

    from stages import corrupt as stage

    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    x = natural_images(6, 2)
    index = np.array([40, 7, 12, 3, 25, 31])  # a subset's positions in the official split
    np.savez(raw / "test.npz", images=x, labels=np.arange(6) % 10, index=index)
    raw_params["corrupt"] = {**GOOD, "severities": [1, 5], "seed": 3}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["corrupt"])
    stage.main()
    out = np.load(tmp_path / "data" / "corrupted" / "test.npy")
    assert out.shape == (2, 2, 6, 32, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[1, 1], corruptions.corrupt(x, "contrast", 5, seed=0))
    np.testing.assert_array_equal(out[0, 1], corruptions.corrupt(x, "fog", 5, seed=3, index=index))
    assert not np.array_equal(out[0, 1], corruptions.corrupt(x, "fog", 5, seed=3))  # the index matters
    m = json.loads((tmp_path / "metrics" / "corrupt.json").read_text())
    assert m["families"] == ["fog", "contrast"] and m["severities"] == [1, 5] and m["test_images"] == 6
    assert m["seed"] == 3
    assert list(m["levels"]) == ["fog_1", "fog_5", "contrast_1", "contrast_5"]
    assert m["levels"]["fog_1"]["psnr_db"] > m["levels"]["fog_5"]["psnr_db"] > 0
