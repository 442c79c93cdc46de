"""iqals.distort against independent computations written here (docs/protocol.md, the distortions)."""
from __future__ import annotations

import io
import math

import cv2
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from iqals import distort
from iqals.params import DISTORTIONS
from iqals.seeds import derive_seed

SIGMAS = (0.7, 1.0, 1.2)      # blur levels 1-3 (paper)
VARIANCES = (0.005, 0.01, 0.02)  # noise levels 1-3 (paper)
QUALITIES = (12, 8, 4)        # JPEG levels 1-3 (paper)
RULE = "matlab"               # kernel size 2*ceil(2*sigma)+1 (MATLAB imgaussfilt)


def round_half_up(x: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def psnr(ref: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB over all RGB values."""
    mse = ((ref.astype(np.float64) - dist.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def images(tiny_arrays) -> np.ndarray:
    """64 natural-looking uint8 RGB images."""
    return tiny_arrays[0][0][:64].copy()


# ------------------------------------------------------------------------------------ blur

def test_kernel_size_rule():
    # 2*ceil(2*sigma)+1: 5, 5, 7 taps for the paper's sigmas; normalised and symmetric.
    for sigma, taps in zip(SIGMAS, (5, 5, 7)):
        k = distort.gaussian_kernel(sigma, RULE)
        assert len(k) == taps
        assert k.sum() == pytest.approx(1.0, abs=1e-15)
        np.testing.assert_allclose(k, k[::-1], rtol=0, atol=0)
        assert np.argmax(k) == taps // 2
    assert len(distort.gaussian_kernel(0.3, RULE)) == 2 * math.ceil(0.6) + 1


@pytest.mark.parametrize("dtype, max_tie_fraction", [(np.float64, 1e-5), (np.float32, 1e-4)])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_blur_matches_opencv(images, sigma, dtype, max_tie_fraction):
    """cv2.GaussianBlur on float input, BORDER_REPLICATE, same kernel size, rounded half up."""
    got = distort.blur(images, sigma, RULE, "replicate")
    ksize = 2 * math.ceil(2 * sigma) + 1
    want = np.stack([
        round_half_up(cv2.GaussianBlur(im.astype(dtype), (ksize, ksize), sigmaX=sigma, sigmaY=sigma,
                                       borderType=cv2.BORDER_REPLICATE).astype(np.float64))
        for im in images])
    assert got.shape == images.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1
    # Only values that sit on an exact .5 tie (up to the float rounding of either side) may differ.
    assert np.count_nonzero(diff) <= max_tie_fraction * diff.size
    assert not np.array_equal(got, images)  # the blur did something


def _numpy_separable_blur(images: np.ndarray, sigma: float, mode: str) -> np.ndarray:
    """Separable Gaussian in plain numpy, float64 and unrounded: np.pad, then a weighted sum of shifted slices."""
    r = math.ceil(2 * sigma)
    taps = np.exp(-np.arange(-r, r + 1) ** 2 / (2.0 * sigma * sigma))
    taps /= taps.sum()
    h, w = images.shape[1:3]
    x = np.pad(images.astype(np.float64), ((0, 0), (r, r), (r, r), (0, 0)), mode=mode)
    rows = sum(t * x[:, :, j:j + w] for j, t in enumerate(taps))
    return sum(t * rows[:, j:j + h] for j, t in enumerate(taps))


def assert_rounds_like(got: np.ndarray, exact: np.ndarray, taps: int, what: str = "") -> None:
    """got is the float64 blur `exact` rounded half up: only a value within float64 rounding of a .5 tie may round
    the other way. Each side sums 2 x taps products of at most 255 (weights sum to 1): error at most
    2 * taps * eps * 255 per side; a float32 blur (error ~1e-5) would flip near-ties far outside that."""
    near_tie = np.abs(exact - np.floor(exact) - 0.5) <= 2 * (2 * taps * np.finfo(np.float64).eps * 255)
    diff = np.abs(got.astype(np.int16) - round_half_up(exact).astype(np.int16))
    assert diff.max() <= 1, what
    np.testing.assert_array_equal(diff[~near_tie], 0, err_msg=what)


@pytest.mark.parametrize("border, np_mode", [("replicate", "edge"), ("reflect", "reflect"),
                                             ("constant", "constant")])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_blur_matches_numpy_separable(images, sigma, border, np_mode):
    """The blur is computed in float64, then rounded half up."""
    got = distort.blur(images, sigma, RULE, border)
    assert_rounds_like(got, _numpy_separable_blur(images, sigma, np_mode), 2 * math.ceil(2 * sigma) + 1)


def test_blur_border_modes_differ_only_at_the_border(images):
    rep = distort.blur(images, 1.2, RULE, "replicate")
    zero = distort.blur(images, 1.2, RULE, "constant")
    r = 3  # radius of the 7-tap kernel
    np.testing.assert_array_equal(rep[:, r:-r, r:-r], zero[:, r:-r, r:-r])
    assert (zero[:, 0, 0] < rep[:, 0, 0]).mean() > 0.9  # zero padding darkens the corners


def test_blur_keeps_flat_images():
    flat = np.full((3, 32, 32, 3), 77, np.uint8)
    np.testing.assert_array_equal(distort.blur(flat, 1.2, RULE, "replicate"), flat)


# ----------------------------------------------------------------------------------- noise

MID_GREY = np.full((64, 32, 32, 3), 128, np.uint8)  # 196,608 values; level-3 clip at 3.5 sd


@pytest.mark.parametrize("level, var", list(enumerate(VARIANCES)))
def test_noise_mean_and_variance(level, var):
    out = distort.noise(MID_GREY, var, seed=1000 + level)
    d = out.astype(np.float64) / 255.0 - MID_GREY / 255.0
    n = d.size
    # The noise is N(0, v) up to rounding to 1/255 (variance +1/(12*255^2), ~1e-6). Standard errors:
    # mean sqrt(v/n) <= 3.2e-4, variance v*sqrt(2/n) (0.32% relative). Tolerances are ~10 SE.
    assert abs(d.mean()) < 10 * math.sqrt(var / n)
    assert d.var() == pytest.approx(var + 1 / (12 * 255.0**2), rel=10 * math.sqrt(2 / n))
    # White: neighbouring pixels and channels uncorrelated.
    for a, b in ((d[:, :, 1:], d[:, :, :-1]), (d[..., 0], d[..., 1])):
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.02


def test_noise_variance_increases_with_level():
    vs = [(distort.noise(MID_GREY, v, seed=7) / 255.0).var() for v in VARIANCES]
    assert vs[0] < vs[1] < vs[2]


def test_noise_follows_imnoise_formula_exactly(images):
    """x/255 + sqrt(v)*N(0,1) from a Philox stream keyed by (seed, image index), clip [0,1], x255,
    round half up."""
    var, seed = 0.01, 12345
    index = np.arange(len(images)) * 7 + 3
    z = np.stack([np.random.Generator(np.random.Philox(key=[seed, j])).standard_normal(images.shape[1:])
                  for j in index])
    want = round_half_up(np.clip(images / 255.0 + z * math.sqrt(var), 0.0, 1.0) * 255.0)
    np.testing.assert_array_equal(distort.noise(images, var, seed, index), want)


def test_noise_of_an_image_does_not_depend_on_the_subset(images):
    """docs/protocol.md: a fixed seed per image and level; the same image in a subset gets the same noise."""
    full = distort.noise(images, 0.01, 5, np.arange(len(images)))
    part = distort.noise(images[3:6], 0.01, 5, np.arange(3, 6))
    np.testing.assert_array_equal(part, full[3:6])


def test_noise_seeding(images):
    a = distort.noise(images, 0.01, seed=3)
    np.testing.assert_array_equal(a, distort.noise(images, 0.01, seed=3))
    b = distort.noise(images, 0.01, seed=4)
    assert np.mean(a != b) > 0.9
    # Identical inputs at different stack positions get different realisations.
    c = distort.noise(MID_GREY[:2], 0.01, seed=3)
    assert np.mean(c[0] != c[1]) > 0.9


def test_noise_clips_black_and_white():
    var = 0.02
    sd = math.sqrt(var)
    black = np.zeros((16, 32, 32, 3), np.uint8)
    white = np.full((16, 32, 32, 3), 255, np.uint8)
    ob, ow = distort.noise(black, var, seed=1), distort.noise(white, var, seed=2)
    # Clipped, not wrapped: about half the values stay at the bound, the rest move inwards and
    # the mean shift is that of a rectified Gaussian, sd/sqrt(2*pi) (0.0564 for v = 0.02).
    for out, bound in ((ob, 0), (ow, 255)):
        at_bound = np.mean(out == bound)
        assert 0.47 < at_bound < 0.53
        shift = np.abs(out.astype(np.float64) - bound) / 255.0
        assert shift.mean() == pytest.approx(sd / math.sqrt(2 * math.pi), rel=0.03)
        assert shift.max() < 6 * sd  # a wrapped uint8 would jump to the far end
    assert ob.dtype == ow.dtype == np.uint8


# ------------------------------------------------------------------------------------ JPEG

def cv2_jpeg(image: np.ndarray, quality: int, sampling: int) -> tuple[np.ndarray, bytes]:
    """A direct OpenCV round trip of one RGB image; returns (decoded RGB, encoded bytes)."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality,
                                         cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling])
    assert ok
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB), buf.tobytes()


SAMPLING = {"420": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, "422": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
            "444": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444}


@pytest.mark.parametrize("quality", QUALITIES)
def test_jpeg_matches_direct_opencv(images, quality):
    got = distort.jpeg(images, quality, "420")
    want = np.stack([cv2_jpeg(im, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420)[0] for im in images])
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.uint8 and got.shape == images.shape


@pytest.mark.parametrize("sub", ["422", "444"])
def test_jpeg_other_subsampling_matches_direct_opencv(images, sub):
    got = distort.jpeg(images[:8], 8, sub)
    want = np.stack([cv2_jpeg(im, 8, SAMPLING[sub])[0] for im in images[:8]])
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, distort.jpeg(images[:8], 8, "420"))


def test_jpeg_of_a_stack_is_each_image_alone(images):
    one = distort.jpeg(images[:13], 4, "420")
    np.testing.assert_array_equal(distort.jpeg(images[:1], 4, "420")[0], one[0])
    np.testing.assert_array_equal(distort.jpeg(images[12:13], 4, "420")[0], one[12])


def jpeg_segments(data: bytes) -> dict[int, list[bytes]]:
    """Marker -> payloads of the JPEG header segments up to start of scan."""
    assert data[:2] == b"\xff\xd8", "no SOI marker"
    segs: dict[int, list[bytes]] = {}
    i = 2
    while i < len(data):
        assert data[i] == 0xFF, f"expected a marker at byte {i}"
        marker = data[i + 1]
        length = int.from_bytes(data[i + 2:i + 4], "big")
        segs.setdefault(marker, []).append(data[i + 4:i + 2 + length])
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        i += 2 + length
    return segs


def quant_tables(data: bytes) -> dict[int, np.ndarray]:
    """Table id -> 8x8 quantisation table in natural order, from the DQT segments."""
    tables = {}
    for seg in jpeg_segments(data)[0xDB]:
        j = 0
        while j < len(seg):
            precision, tid = seg[j] >> 4, seg[j] & 15
            assert precision == 0  # 8-bit (baseline) tables
            zz = np.frombuffer(seg[j + 1:j + 65], np.uint8).astype(int)
            nat = np.empty(64, int)
            nat[ZIGZAG] = zz
            tables[tid] = nat.reshape(8, 8)
            j += 65
    return tables


# Natural-order index of each zigzag position: anti-diagonals, alternating direction.
ZIGZAG = np.array([i * 8 + j for i, j in sorted(((i, j) for i in range(8) for j in range(8)),
                                                key=lambda p: (p[0] + p[1], p[0] if (p[0] + p[1]) % 2 else -p[0]))])

# ITU-T T.81 Annex K tables (libjpeg's std_luminance/chrominance_quant_tbl), natural order.
LUMA = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
                 14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
                 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]).reshape(8, 8)
CHROMA = np.full((8, 8), 99)
CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def ijg_table(base: np.ndarray, quality: int) -> np.ndarray:
    """IJG quality scaling (jpeg_quality_scaling + jpeg_add_quant_table, baseline limit)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((base * scale + 50) // 100, 1, 255)


def test_zigzag_order():
    assert list(ZIGZAG[:10]) == [0, 1, 8, 16, 9, 2, 3, 10, 17, 24]
    assert sorted(ZIGZAG) == list(range(64)) and ZIGZAG[-1] == 63


@pytest.mark.parametrize("quality", QUALITIES + (50, 90))
def test_jpeg_quantisation_tables_follow_quality(images, quality):
    _, data = cv2_jpeg(images[0], quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420)
    tables = quant_tables(data)
    np.testing.assert_array_equal(tables[0], ijg_table(LUMA, quality))
    np.testing.assert_array_equal(tables[1], ijg_table(CHROMA, quality))


def test_jpeg_coarser_tables_and_fewer_bytes_at_lower_quality(images):
    sizes, luma = [], []
    for q in QUALITIES:
        encoded = [cv2_jpeg(im, q, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420)[1] for im in images]
        sizes.append(np.array([len(b) for b in encoded]))
        luma.append(quant_tables(encoded[0])[0])
    assert np.all(sizes[0] > sizes[1]) and np.all(sizes[1] > sizes[2])
    assert np.all(luma[0] <= luma[1]) and np.all(luma[1] <= luma[2])
    assert luma[0].sum() < luma[1].sum() < luma[2].sum()


@pytest.mark.parametrize("sub, factors", [("420", (0x22, 0x11, 0x11)), ("422", (0x21, 0x11, 0x11)),
                                          ("444", (0x11, 0x11, 0x11))])
def test_jpeg_sof0_sampling_factors(images, sub, factors):
    _, data = cv2_jpeg(images[0], 8, SAMPLING[sub])
    segs = jpeg_segments(data)
    assert 0xC0 in segs, "not a baseline (SOF0) JPEG"
    sof = segs[0xC0][0]
    height, width, ncomp = int.from_bytes(sof[1:3], "big"), int.from_bytes(sof[3:5], "big"), sof[5]
    assert (sof[0], height, width, ncomp) == (8, 32, 32, 3)
    assert tuple(sof[6 + 3 * c + 1] for c in range(3)) == factors


def test_jpeg_psnr_decreases_with_level(images):
    p = [psnr(images, distort.jpeg(images, q, "420")) for q in QUALITIES]
    assert p[0].mean() > p[1].mean() + 0.5 > p[2].mean() + 1.0
    assert np.mean((p[0] > p[1]) & (p[1] > p[2])) >= 0.9


# ----------------------------------------------------------------------------- distort_all

def test_distort_all_shape_order_and_levels(images, params):
    x = images[:12]
    cfg = params.distort
    calls = []

    class Progress:
        def update(self, k):
            calls.append(k)

    out = distort.distort_all(x, cfg, seed=5, split="train", progress=Progress())
    assert DISTORTIONS == ("blur", "noise", "jpeg")
    assert out.shape == (3, 3) + x.shape and out.dtype == np.uint8
    assert calls == [1] * 9
    for lv in range(3):
        np.testing.assert_array_equal(out[0, lv], distort.blur(x, cfg.blur_sigma[lv], cfg.blur_kernel,
                                                               cfg.blur_border))
        np.testing.assert_array_equal(out[1, lv], distort.noise(x, cfg.noise_var[lv],
                                                                derive_seed(5, "noise", "train", lv)))
        np.testing.assert_array_equal(out[2, lv], distort.jpeg(x, cfg.jpeg_quality[lv], cfg.jpeg_subsampling))
    # Every type degrades more at each level.
    for t in range(3):
        p = [psnr(x, out[t, lv]).mean() for lv in range(3)]
        assert p[0] > p[1] > p[2], (DISTORTIONS[t], p)
    # The split and the seed change only the noise.
    other = distort.distort_all(x, cfg, seed=5, split="test")
    np.testing.assert_array_equal(other[[0, 2]], out[[0, 2]])
    assert np.mean(other[1] != out[1]) > 0.9
    assert np.mean(distort.distort_all(x, cfg, seed=6, split="train")[1] != out[1]) > 0.9


# The documented conventions (params.yaml, distort) written out with scipy, numpy, OpenCV and Pillow.
KERNEL_RADIUS = {"matlab": lambda s: math.ceil(2 * s), "scipy": lambda s: int(4 * s + 0.5),
                 "opencv": lambda s: (round(6 * s + 1) | 1) // 2, "fixed3": lambda s: 1}
SCIPY_MODE = {"replicate": "nearest", "reflect": "mirror", "constant": "constant"}


def reference_set(x: np.ndarray, kind: str, lv: int, cfg, seed: int, split: str, index: np.ndarray) -> np.ndarray:
    """One distorted set as params.yaml's distort section describes it, unrounded where the blur is concerned."""
    if kind == "blur":
        s, r = cfg.blur_sigma[lv], KERNEL_RADIUS[cfg.blur_kernel](cfg.blur_sigma[lv])
        return ndimage.gaussian_filter(x.astype(np.float64), (0, s, s, 0), mode=SCIPY_MODE[cfg.blur_border],
                                       radius=(0, r, r, 0))
    if kind == "noise":
        key = derive_seed(seed, "noise", split, lv)
        shape = x.shape[1:] if cfg.noise_field == "per_channel" else x.shape[1:-1] + (1,)
        z = np.stack([np.random.Generator(np.random.Philox(key=[key, j])).standard_normal(shape) for j in index])
        y = x / 255.0 + math.sqrt(cfg.noise_var[lv]) / (255.0 if cfg.noise_scale == "byte" else 1.0) * z
        y = (y if cfg.noise_output == "float" else np.clip(y, 0.0, 1.0)) * 255.0
        return {"round": np.floor(y + 0.5), "floor": np.floor(y)}.get(cfg.noise_output, y)
    q, sub = cfg.jpeg_quality[lv], cfg.jpeg_subsampling
    if cfg.jpeg_encoder == "opencv":
        return np.stack([cv2_jpeg(im, q, SAMPLING[sub])[0] for im in x])
    out = []
    for im in x:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=q, subsampling={"444": 0, "422": 1, "420": 2}[sub])
        out.append(np.asarray(Image.open(buf)))
    return np.stack(out)


def test_distort_all_follows_every_convention(images, params):
    """The deviation study's sets: each convention reaches the distortion it names, and the noise is keyed by the
    images' official positions (a subset gets the noise its images get in the full split)."""
    x, index = images[:6], np.array([4, 17, 2, 40, 41, 9])
    for name, cfg in {"default": params.distort, **params.deviation.conventions}.items():
        out = distort.distort_all(x, cfg, seed=11, split="test", index=index)
        uint8 = cfg.noise_output in ("round", "floor")
        assert out.dtype == (np.uint8 if uint8 else np.float32), name
        for t, kind in enumerate(DISTORTIONS):
            for lv in range(3):
                want, got = reference_set(x, kind, lv, cfg, 11, "test", index), out[t, lv].astype(np.float64)
                what = f"{name}: {kind} level {lv + 1}"
                if kind == "blur":
                    r = KERNEL_RADIUS[cfg.blur_kernel](cfg.blur_sigma[lv])
                    assert_rounds_like(out[t, lv], want, 2 * r + 1, what)
                elif kind == "noise" and not uint8:  # float32 rounds each value to 2**-24 relative
                    np.testing.assert_allclose(got, want, rtol=2.0**-23, atol=0, err_msg=what)
                else:  # the same float64 operations, or the same encoder's round trip
                    np.testing.assert_array_equal(got, want, err_msg=what)


def test_jpeg_encoder_convention_picks_the_library(images, params, monkeypatch):
    """OpenCV and Pillow may bundle the same libjpeg-turbo and give identical round trips, so the sets alone cannot
    tell which encoder ran: with the other library's encoder unavailable, each convention must still work."""
    x, conv = images[:2], params.deviation.conventions

    def unavailable(*args, **kwargs):
        raise AssertionError("the other encoder was called")

    with monkeypatch.context() as m:
        m.setattr(cv2, "imencode", unavailable)
        for name in ("jpeg_pillow", "jpeg_pillow_444"):
            distort.distort_all(x, conv[name], seed=1, split="test")
    monkeypatch.setattr(Image.Image, "save", unavailable)
    for cfg in (params.distort, conv["jpeg_444"]):
        distort.distort_all(x, cfg, seed=1, split="test")


def test_bench_blur_and_jpeg_baselines_agree(monkeypatch):
    """bench/bench_distort.py runs and its per-image baselines reproduce our outputs."""
    from bench import bench_distort

    monkeypatch.delenv("CIFAR10_LOCAL", raising=False)
    r = bench_distort.main(n=24)
    assert r["n"] == 24 and r["source"] == "synthetic"
    assert set(r["types"]) == {"blur", "noise", "jpeg"}
    assert r["types"]["jpeg"]["max_abs_diff"] == 0
    assert r["types"]["blur"]["max_abs_diff"] <= 1
    assert r["types"]["blur"]["n_values_differing"] <= 1e-4 * 3 * 24 * 32 * 32 * 3
    assert all(v["ours_s"] > 0 and v["loop_s"] > 0 for v in r["types"].values())


def test_round_uint8_rounds_half_up_and_saturates():
    """MATLAB's uint8(): halves go up (not to even, as np.rint would), out-of-range values saturate."""
    x = np.array([0.5, 1.5, 2.5, 2.4999, 253.5, 254.5, 255.4, -0.4, -3.0, 300.0])
    assert distort._round_uint8(x).tolist() == [1, 2, 3, 2, 254, 255, 255, 0, 0, 255]
