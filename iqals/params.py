"""params.yaml, read once and validated into frozen dataclasses.

Every stage calls `load()` before it computes anything, so a bad value fails at once with a
message naming the key, the value and what is allowed (nanoGPT's configurator: unknown or
mistyped overrides fail loudly).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

NUM_CLASSES = 10  # CIFAR-10
DISTORTIONS = ("blur", "noise", "jpeg")
LEVELS = 3  # distortion levels per type (level 1 mildest)
# The copies of an image set, one layout everywhere: 0 = pristine, then every type at every level
# (copy_index). Arrays of distorted images and of scores are (len(DISTORTIONS), LEVELS, N, ...).
NUM_COPIES = 1 + len(DISTORTIONS) * LEVELS


def copy_index(dtype: int, level: int) -> int:
    """Copy number of distortion type `dtype` (DISTORTIONS index) at 0-based `level`."""
    return 1 + LEVELS * dtype + level


def test_set_name(dtype: int, level: int) -> str:
    """Name of the test set of type `dtype` at 0-based `level`, e.g. blur_1 (Table 2 columns)."""
    return f"{DISTORTIONS[dtype]}_{level + 1}"


# Table 2's columns, in order: copy_index(t, lv) is the position of test_set_name(t, lv)
TEST_SETS = ("pristine",) + tuple(test_set_name(t, lv) for t in range(len(DISTORTIONS)) for lv in range(LEVELS))
TRAIN_SETS = {  # training set -> distortion types it mixes in (PROTOCOL.md, "training sets")
    "pristine": (),
    "mix_blur": ("blur",),
    "mix_noise": ("noise",),
    "mix_jpeg": ("jpeg",),
    "mix_all3": DISTORTIONS,
}
# train.step: eager = op by op; compile = torch.compile(mode="reduce-overhead"); graph = the
# whole step (forward, loss, backward, SGD update) captured once in a CUDA graph (iqals/train.py)
TRAIN_STEPS = ("eager", "compile", "graph")
LABEL_RULES = ("original", "iqa_ls", "uniform_ls", "shuffled_ls")
# Names of the quality measures and transforms implemented in iqals/iqa.py (a test checks they
# agree). Kept here so that validating params does not import the IQA code: the one-hot
# training stages must not depend on it.
IQA_METRICS = ("ssim", "gmsd", "fsim", "vif", "psnr")
IQA_TRANSFORMS = ("identity", "linear", "exp_decay")
# CIFAR-10-C style corruption families of iqals/corruptions.py (evaluation only; a test checks).
CORRUPTIONS = ("defocus_blur", "motion_blur", "shot_noise", "impulse_noise", "contrast", "fog",
               "pixelate", "elastic_transform")
SCORED_RULES = ("iqa_ls", "uniform_ls", "shuffled_ls")  # rules whose targets read the scores


class ParamError(ValueError):
    """A value in params.yaml is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class Base:
    seed: int
    train_size: int | None
    test_size: int | None


@dataclass(frozen=True)
class Distort:
    blur_sigma: tuple[float, ...]
    blur_truncate: float
    blur_border: str
    noise_var: tuple[float, ...]
    jpeg_quality: tuple[int, ...]
    jpeg_subsampling: str


@dataclass(frozen=True)
class SSIM:
    win_size: int
    sigma: float
    k1: float
    k2: float
    data_range: float


@dataclass(frozen=True)
class IQA:
    metric: str
    transform: str
    transform_scale: float
    clip: tuple[float, float]
    ssim: SSIM


@dataclass(frozen=True)
class Mixture:
    shares: tuple[float, ...]


@dataclass(frozen=True)
class Model:
    conv_std: float
    fc_std: float
    out_std: float
    conv1_bias: float
    conv2_bias: float
    fc_bias: float
    out_bias: float
    lrn_size: int
    lrn_alpha: float
    lrn_beta: float
    lrn_k: float


@dataclass(frozen=True)
class Train:
    epochs: int
    lr_decay_epochs: int
    lr: float
    lr_decay: float
    batch_size: int
    weight_decay: float
    loss: str
    seeds: tuple[int, ...]
    checkpoint_every: int
    device: str
    precision: str
    step: str


@dataclass(frozen=True)
class Strategy:
    name: str
    train_set: str
    labels: str

    @property
    def distortions(self) -> tuple[str, ...]:
        return TRAIN_SETS[self.train_set]

    @property
    def needs_scores(self) -> bool:
        return self.labels in SCORED_RULES


@dataclass(frozen=True)
class Evaluate:
    ece_bins: int
    batch_size: int


@dataclass(frozen=True)
class Report:
    fig4_examples: tuple[int, ...]
    fig4_strategies: tuple[str, ...]


@dataclass(frozen=True)
class CorruptParams:
    families: tuple[str, ...]
    severities: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class Params:
    base: Base
    distort: Distort
    iqa: IQA
    mixture: Mixture
    model: Model
    train: Train
    strategies: dict[str, Strategy]
    evaluate: Evaluate
    report: Report
    corrupt: CorruptParams

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- field checks

def _fail(key: str, value: Any, allowed: str) -> None:
    raise ParamError(f"params.yaml: {key} = {value!r}: expected {allowed}")


def _section(raw: dict, key: str, cls: type, prefix: str = "") -> dict:
    sec = raw.get(key)
    key = prefix + key
    if not isinstance(sec, dict):
        _fail(key, sec, "a mapping (section)")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(sec) - names)
    if unknown:
        _fail(f"{key}.{unknown[0]}", sec[unknown[0]], f"no such key; known keys: {sorted(names)}")
    missing = sorted(names - set(sec))
    if missing:
        _fail(f"{key}.{missing[0]}", None, "a value (key is missing)")
    return sec


def _num(key, v, lo=-math.inf, hi=math.inf, lo_open=False, integer=False):
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    what = "an integer" if integer else "a number"
    rng = f"in {'(' if lo_open else '['}{lo}, {hi}]"
    if isinstance(v, bool) or not ok_type or not math.isfinite(v):
        _fail(key, v, f"{what} {rng}")
    if v < lo or (lo_open and v == lo) or v > hi:
        _fail(key, v, f"{what} {rng}")
    return int(v) if integer else float(v)


def _list(key, v, n=None, **kw):
    if not isinstance(v, (list, tuple)) or (n is not None and len(v) != n) or len(v) == 0:
        _fail(key, v, f"a list of {n if n else 'one or more'} values")
    return tuple(_num(f"{key}[{i}]", x, **kw) for i, x in enumerate(v))


def _choice(key, v, allowed):
    if v not in allowed:
        _fail(key, v, f"one of {list(allowed)}")
    return v


def _bool(key, v):
    if not isinstance(v, bool):
        _fail(key, v, "true or false")
    return v


def _optional_size(key, v):
    return None if v is None else _num(key, v, lo=1, integer=True)


def _unique_list(key: str, v, check) -> tuple:
    if not isinstance(v, (list, tuple)) or len(v) == 0:
        _fail(key, v, "a list of one or more values")
    out = []
    for i, x in enumerate(v):
        x = check(f"{key}[{i}]", x)
        if x in out:
            _fail(f"{key}[{i}]", x, f"no repeats (already {key}[{out.index(x)}])")
        out.append(x)
    return tuple(out)


# ---------------------------------------------------------------- sections

def parse_corrupt(raw) -> CorruptParams:
    """The `corrupt` section of params.yaml, validated; ParamError names the offending key."""
    s = _section({"corrupt": raw}, "corrupt", CorruptParams)
    return CorruptParams(
        families=_unique_list("corrupt.families", s["families"],
                              lambda k, x: _choice(k, x, CORRUPTIONS)),
        severities=_unique_list("corrupt.severities", s["severities"],
                                lambda k, x: _num(k, x, lo=1, hi=5, integer=True)),
        seed=_num("corrupt.seed", s["seed"], lo=0, integer=True),
    )


def _parse(raw: dict) -> Params:
    if not isinstance(raw, dict):
        _fail("<top level>", raw, "a mapping of sections")
    known = {f.name for f in dataclasses.fields(Params)}
    unknown = sorted(set(raw) - known)
    if unknown:
        _fail(unknown[0], raw[unknown[0]], f"no such section; known sections: {sorted(known)}")

    s = _section(raw, "base", Base)
    base = Base(seed=_num("base.seed", s["seed"], lo=0, integer=True),
                train_size=_optional_size("base.train_size", s["train_size"]),
                test_size=_optional_size("base.test_size", s["test_size"]))
    if base.train_size is not None and base.train_size % NUM_CLASSES:
        _fail("base.train_size", base.train_size, f"a multiple of {NUM_CLASSES} (class-balanced subset)")

    s = _section(raw, "distort", Distort)
    distort = Distort(
        blur_sigma=_list("distort.blur_sigma", s["blur_sigma"], 3, lo=0, lo_open=True),
        blur_truncate=_num("distort.blur_truncate", s["blur_truncate"], lo=0, lo_open=True),
        blur_border=_choice("distort.blur_border", s["blur_border"], ("replicate", "reflect", "constant")),
        noise_var=_list("distort.noise_var", s["noise_var"], 3, lo=0, lo_open=True),
        jpeg_quality=_list("distort.jpeg_quality", s["jpeg_quality"], 3, lo=1, hi=100, integer=True),
        jpeg_subsampling=_choice("distort.jpeg_subsampling", str(s["jpeg_subsampling"]), ("420", "422", "444")),
    )

    s = _section(raw, "iqa", IQA)
    ss = _section(s, "ssim", SSIM, prefix="iqa.")
    ssim = SSIM(win_size=_num("iqa.ssim.win_size", ss["win_size"], lo=3, integer=True),
                sigma=_num("iqa.ssim.sigma", ss["sigma"], lo=0, lo_open=True),
                k1=_num("iqa.ssim.k1", ss["k1"], lo=0, lo_open=True),
                k2=_num("iqa.ssim.k2", ss["k2"], lo=0, lo_open=True),
                data_range=_num("iqa.ssim.data_range", ss["data_range"], lo=0, lo_open=True))
    if ssim.win_size % 2 == 0:
        _fail("iqa.ssim.win_size", ssim.win_size, "an odd integer")
    clip = _list("iqa.clip", s["clip"], 2, lo=0, hi=1)
    if clip[0] > clip[1]:
        _fail("iqa.clip", list(clip), "[low, high] with low <= high")
    iqa_ = IQA(metric=_choice("iqa.metric", s["metric"], IQA_METRICS),
               transform=_choice("iqa.transform", s["transform"], IQA_TRANSFORMS),
               transform_scale=_num("iqa.transform_scale", s["transform_scale"], lo=0, lo_open=True),
               clip=clip, ssim=ssim)

    s = _section(raw, "mixture", Mixture)
    shares = _list("mixture.shares", s["shares"], 4, lo=0, hi=1)
    if abs(sum(shares) - 1) > 1e-9:
        _fail("mixture.shares", list(shares), "4 shares (pristine, level 1, 2, 3) summing to 1")
    mixture = Mixture(shares=shares)

    s = _section(raw, "model", Model)
    model = Model(**{k: _num(f"model.{k}", v, lo=0, integer=(k == "lrn_size"),
                             lo_open=k.endswith(("std", "size", "beta")))
                     for k, v in s.items()})

    s = _section(raw, "train", Train)
    if not isinstance(s["seeds"], list) or not s["seeds"]:
        _fail("train.seeds", s["seeds"], "a non-empty list of integers >= 0")
    train = Train(
        epochs=_num("train.epochs", s["epochs"], lo=1, integer=True),
        lr_decay_epochs=_num("train.lr_decay_epochs", s["lr_decay_epochs"], lo=1, integer=True),
        lr=_num("train.lr", s["lr"], lo=0, lo_open=True),
        lr_decay=_num("train.lr_decay", s["lr_decay"], lo=0, hi=1, lo_open=True),
        batch_size=_num("train.batch_size", s["batch_size"], lo=1, integer=True),
        weight_decay=_num("train.weight_decay", s["weight_decay"], lo=0),
        loss=_choice("train.loss", s["loss"], ("squared", "cross_entropy")),
        seeds=_list("train.seeds", s["seeds"], lo=0, integer=True),
        checkpoint_every=_num("train.checkpoint_every", s["checkpoint_every"], lo=1, integer=True),
        device=_choice("train.device", s["device"], ("auto", "cpu", "cuda")),
        precision=_choice("train.precision", s["precision"], ("fp32", "tf32", "bf16")),
        step=_choice("train.step", s["step"], TRAIN_STEPS),
    )
    for key, value, plain in (("train.precision", train.precision, "fp32"), ("train.step", train.step, "eager")):
        if train.device == "cpu" and value != plain:  # with device auto, iqals.train checks at run time
            _fail(key, value, f"{plain!r} with train.device = 'cpu' (the others need a CUDA GPU)")
    if train.lr_decay_epochs > train.epochs:
        _fail("train.lr_decay_epochs", train.lr_decay_epochs, f"at most train.epochs ({train.epochs})")
    if len(set(train.seeds)) != len(train.seeds):
        _fail("train.seeds", list(train.seeds), "distinct seeds")

    raw_s = raw.get("strategies")
    if not isinstance(raw_s, dict) or not raw_s:
        _fail("strategies", raw_s, "a non-empty mapping name -> {train_set, labels}")
    strategies = {}
    for name, spec in raw_s.items():
        key = f"strategies.{name}"
        if not isinstance(spec, dict) or set(spec) != {"train_set", "labels"}:
            _fail(key, spec, "a mapping with exactly the keys train_set and labels")
        st = Strategy(name=str(name),
                      train_set=_choice(f"{key}.train_set", spec["train_set"], tuple(TRAIN_SETS)),
                      labels=_choice(f"{key}.labels", spec["labels"], LABEL_RULES))
        if st.needs_scores and st.train_set == "pristine":
            _fail(f"{key}.labels", st.labels, "original for the pristine set (it has no quality scores)")
        strategies[st.name] = st

    s = _section(raw, "evaluate", Evaluate)
    evaluate = Evaluate(ece_bins=_num("evaluate.ece_bins", s["ece_bins"], lo=1, integer=True),
                        batch_size=_num("evaluate.batch_size", s["batch_size"], lo=1, integer=True))

    s = _section(raw, "report", Report)
    ex = _list("report.fig4_examples", s["fig4_examples"], lo=0, integer=True)
    names = s["fig4_strategies"]
    if not isinstance(names, list) or not names or any(n not in strategies for n in names):
        _fail("report.fig4_strategies", names, f"a non-empty list of strategy names from {sorted(strategies)}")
    report = Report(fig4_examples=ex, fig4_strategies=tuple(names))

    return Params(base=base, distort=distort, iqa=iqa_, mixture=mixture, model=model,
                  train=train, strategies=strategies, evaluate=evaluate, report=report,
                  corrupt=parse_corrupt(raw.get("corrupt")))


def parse(raw: dict) -> Params:
    """Validate an already-loaded params mapping (tests shrink the real one and call this)."""
    return _parse(raw)


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: no such file (run from the repository root)")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ParamError(f"{path}: not valid YAML: {e}") from None
    return _parse(raw)
