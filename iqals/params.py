"""params.yaml, read once and validated into frozen dataclasses.

Every stage calls `load()` first, so a bad value fails at once naming the key, the value and what is allowed.
Each field carries its check (`param(...)`); rules between fields sit in the class's `problems()`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ExpectedError

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
# training set -> distortion types it mixes in (docs/protocol.md, "training sets")
TRAIN_SETS = {"pristine": (), "mix_blur": ("blur",), "mix_noise": ("noise",), "mix_jpeg": ("jpeg",),
              "mix_all3": DISTORTIONS}
# train.step: op by op | torch.compile(mode="reduce-overhead") | the whole step in one CUDA graph (iqals/train.py)
TRAIN_STEPS = ("eager", "compile", "graph")
# train.layout: runs stacked side by side in channels (model.Net) or along the batch (iqals/fused.py)
TRAIN_LAYOUTS = ("channels", "batch")
# The reference step: what a CPU runs, what iqals/train.py checks every other variant against on a
# GPU, and what it falls back to when a variant fails its check
REFERENCE_STEP = {"precision": "fp32", "step": "eager", "layout": "channels"}


def off_reference(step) -> tuple[str, ...]:
    """The REFERENCE_STEP keys on which `step` (a Train, or a mapping of its values) differs from
    the reference step: a step differing in any of them needs a CUDA GPU."""
    value = step.get if isinstance(step, dict) else lambda key: getattr(step, key)
    return tuple(key for key, plain in REFERENCE_STEP.items() if value(key) != plain)

LABEL_RULES = ("original", "iqa_ls", "uniform_ls", "shuffled_ls")
# The measures and transforms of iqals/iqa.py (a test checks they agree), named here so that validating
# params does not import the IQA code: the one-hot training stages must not depend on it.
IQA_METRICS = ("ssim", "gmsd", "fsim", "vif", "psnr")
IQA_TRANSFORMS = ("identity", "linear", "exp_decay")
# CIFAR-10-C style corruption families of iqals/corruptions.py (evaluation only; a test checks).
CORRUPTIONS = ("defocus_blur", "motion_blur", "shot_noise", "impulse_noise", "contrast", "fog",
               "pixelate", "elastic_transform")


class ParamError(ExpectedError, ValueError):
    """A value in params.yaml is missing, of the wrong type or out of range."""


def _fail(key: str, value: Any, allowed: str) -> None:
    value = list(value) if isinstance(value, tuple) else value
    raise ParamError(f"params.yaml: {key} = {value!r}: expected {allowed}")


# ---------------------------------------------------------------- checks
# check(key, raw value, ctx) -> the parsed value, or ParamError; ctx: full key -> value, of all parsed so far.

def Check(allowed: str, ok, convert=lambda v: v):
    """A value that `ok` accepts, returned through `convert`; `allowed` says what is accepted."""
    def check(key, v, ctx):
        return convert(v) if ok(v) else _fail(key, v, allowed)
    check.allowed = allowed  # for the message of a Seq of these
    return check


def Num(lo=-math.inf, hi=math.inf, open_lo=False, integer=False, null=False):
    """A number in [lo, hi] ((lo, hi] with open_lo); an integer with integer=True; null too with null=True."""
    def ok(v):
        return null if v is None else (not isinstance(v, bool) and isinstance(v, int if integer else (int, float))
                                       and math.isfinite(v) and lo <= v <= hi and not (open_lo and v == lo))
    allowed = (f"{'null or ' if null else ''}{'an integer' if integer else 'a number'} in "
               f"{'(' if open_lo or lo == -math.inf else '['}{lo}, {hi}{']' if math.isfinite(hi) else ')'}")
    return Check(allowed, ok, lambda v: v if v is None else (int if integer else float)(v))


def Int(lo=-math.inf, hi=math.inf, null=False):
    return Num(lo, hi, integer=True, null=null)


def Choice(*options: str):
    """One of the given strings (an unquoted YAML number such as 420 counts as "420")."""
    return Check(f"one of {list(options)}",
                 lambda v: not isinstance(v, bool) and isinstance(v, (str, int)) and str(v) in options, str)


def Seq(item, n: int | None = None, unique: bool = False, noun: str = "values"):
    """A list of n items (any number but zero when n is None), each passing `item`; a tuple."""
    allowed = (f"a list of {n} {noun}" if n else f"a non-empty list of {noun}") + f", each {item.allowed}"

    def check(key, v, ctx):
        if not isinstance(v, (list, tuple)) or not v or (n is not None and len(v) != n):
            _fail(key, v, allowed)
        out = tuple(item(f"{key}[{i}]", x, ctx) for i, x in enumerate(v))
        for i, x in enumerate(out):
            if unique and out.index(x) < i:
                _fail(key, v, f"distinct {noun} ({key}[{i}] repeats {key}[{out.index(x)}])")
        return out
    return check


Flag = Check("true or false", lambda v: isinstance(v, bool))
NAMES = Seq(Check("a name", lambda v: isinstance(v, str)), unique=True, noun="names")  # may name absent strategies


def Names(source: str, noun: str):
    """A non-empty list of names defined by the mapping at `source` (parsed before this key)."""
    def check(key, v, ctx):
        if not isinstance(v, list) or not v or any(not isinstance(n, str) or n not in ctx[source] for n in v):
            _fail(key, v, f"a non-empty list of {noun} names from {sorted(ctx[source])}")
        return tuple(v)
    return check


def Mapping(item, what: str):
    """A non-empty mapping name -> value passing `item`; a dict."""
    def check(key, v, ctx):
        if not isinstance(v, dict) or not v:
            _fail(key, v, f"a non-empty mapping {what}")
        return {str(k): item(f"{key}.{k}", x, ctx) for k, x in v.items()}
    return check


def Section(cls):
    """A mapping read into dataclass `cls` by `_build`."""
    return lambda key, v, ctx: _build(cls, key, v, ctx)


def param(check) -> Any:
    """A dataclass field read from params.yaml through `check`."""
    return field(metadata={"check": check})


def _checks(cls) -> dict:
    return {f.name: f.metadata["check"] for f in dataclasses.fields(cls) if "check" in f.metadata}


def _build(cls, key: str, raw, ctx: dict):
    """Dataclass `cls` from the mapping `raw` at `key` ("" = top level): each key a checked field, each checked
    field there (an unchecked one is the record's name: its key); then cls.problems() yields (field, allowed)."""
    checks, kind = _checks(cls), ("key" if key else "section")
    join = (lambda name: f"{key}.{name}") if key else str
    if not isinstance(raw, dict):
        _fail(key or "<top level>", raw, "a mapping (section)" if key else "a mapping of sections")
    for name in raw:
        if name not in checks:
            _fail(join(name), raw[name], f"no such {kind}; known {kind}s: {sorted(checks)}")
    for name in checks:
        if name not in raw:
            _fail(join(name), None, "a value (key is missing)")
    values = {f.name: key.rsplit(".", 1)[-1] for f in dataclasses.fields(cls) if f.name not in checks}
    for name, check in checks.items():
        values[name] = ctx[join(name)] = check(join(name), raw[name], ctx)
    obj = cls(**values)
    for name, allowed in getattr(obj, "problems", tuple)():
        _fail(join(name), getattr(obj, name), allowed)
    return obj


# ---------------------------------------------------------------- sections

@dataclass(frozen=True)
class Base:
    seed: int = param(Int(0))
    train_size: int | None = param(Int(1, null=True))
    test_size: int | None = param(Int(1, null=True))

    def problems(self):
        if self.train_size is not None and self.train_size % NUM_CLASSES:
            yield "train_size", f"a multiple of {NUM_CLASSES} (class-balanced subset)"


# Conventions where the paper is silent (iqals/distort.py, docs/protocol.md): each first choice is the default.
@dataclass(frozen=True)
class Distort:
    blur_sigma: tuple[float, ...] = param(Seq(Num(0, open_lo=True), LEVELS))
    blur_kernel: str = param(Choice("matlab", "scipy", "opencv", "fixed3"))
    blur_border: str = param(Choice("replicate", "reflect", "constant"))
    noise_var: tuple[float, ...] = param(Seq(Num(0, open_lo=True), LEVELS))
    noise_scale: str = param(Choice("unit", "byte"))
    noise_output: str = param(Choice("round", "floor", "float_clipped", "float"))  # the float ones: test sets only
    noise_field: str = param(Choice("per_channel", "shared"))
    jpeg_quality: tuple[int, ...] = param(Seq(Int(1, 100), LEVELS))
    jpeg_encoder: str = param(Choice("opencv", "pillow"))
    jpeg_subsampling: str = param(Choice("420", "422", "444"))

    @property
    def uint8(self) -> bool:  # whether the distorted images are uint8 (the float noise outputs are not)
        return self.noise_output in ("round", "floor")


@dataclass(frozen=True)
class SSIM:
    win_size: int = param(Int(3))
    sigma: float = param(Num(0, open_lo=True))
    k1: float = param(Num(0, open_lo=True))
    k2: float = param(Num(0, open_lo=True))
    data_range: float = param(Num(0, open_lo=True))

    def problems(self):
        if self.win_size % 2 == 0:
            yield "win_size", "an odd integer"


@dataclass(frozen=True)
class IQA:
    metric: str = param(Choice(*IQA_METRICS))
    transform: str = param(Choice(*IQA_TRANSFORMS))
    transform_scale: float = param(Num(0, open_lo=True))
    clip: tuple[float, float] = param(Seq(Num(0, 1), 2))
    ssim: SSIM = param(Section(SSIM))

    def problems(self):
        if self.clip[0] > self.clip[1]:
            yield "clip", "[low, high] with low <= high"


@dataclass(frozen=True)
class Mixture:
    shares: tuple[float, ...] = param(Seq(Num(0, 1), 1 + LEVELS))

    def problems(self):
        if abs(sum(self.shares) - 1) > 1e-9:
            yield "shares", f"{1 + LEVELS} shares (pristine, then levels 1..{LEVELS}) summing to 1"


@dataclass(frozen=True)
class Model:
    conv_std: float = param(Num(0, open_lo=True))
    fc_std: float = param(Num(0, open_lo=True))
    out_std: float = param(Num(0, open_lo=True))
    conv1_bias: float = param(Num(0))
    conv2_bias: float = param(Num(0))
    fc_bias: float = param(Num(0))
    out_bias: float = param(Num(0))
    lrn_size: int = param(Int(1))
    lrn_alpha: float = param(Num(0))
    lrn_beta: float = param(Num(0, open_lo=True))
    lrn_k: float = param(Num(0))


@dataclass(frozen=True)
class Train:
    epochs: int = param(Int(1))
    lr_decay_epochs: int = param(Int(1))
    lr: float = param(Num(0, open_lo=True))
    lr_decay: float = param(Num(0, 1, open_lo=True))
    batch_size: int = param(Int(1))
    weight_decay: float = param(Num(0))
    loss: str = param(Choice("squared", "cross_entropy"))
    seeds: tuple[int, ...] = param(Seq(Int(0), unique=True, noun="seeds"))
    checkpoint_every: int = param(Int(1))
    device: str = param(Choice("auto", "cpu", "cuda"))
    precision: str = param(Choice("fp32", "tf32", "bf16"))
    step: str = param(Choice(*TRAIN_STEPS))
    layout: str = param(Choice(*TRAIN_LAYOUTS))
    cudnn_benchmark: bool = param(Flag)
    snapshot_every: int = param(Int(0))

    def problems(self):
        for name in ("lr_decay_epochs", "snapshot_every"):
            if getattr(self, name) > self.epochs:
                yield name, f"at most train.epochs ({self.epochs})"
        for name in off_reference(self) if self.device == "cpu" else ():  # device auto: iqals.train checks
            yield name, f"{REFERENCE_STEP[name]!r} with train.device = 'cpu' (the others need a CUDA GPU)"


@dataclass(frozen=True)
class Strategy:
    name: str  # its key under strategies
    train_set: str = param(Choice(*TRAIN_SETS))
    labels: str = param(Choice(*LABEL_RULES))

    @property
    def distortions(self) -> tuple[str, ...]:
        return TRAIN_SETS[self.train_set]

    @property
    def needs_scores(self) -> bool:
        return self.labels != "original"  # the other rules' targets read the scores

    def problems(self):
        if self.needs_scores and self.train_set == "pristine":
            yield "labels", "original for the pristine set (it has no quality scores)"


@dataclass(frozen=True)
class Evaluate:
    ece_bins: int = param(Int(1))
    batch_size: int = param(Int(1))


@dataclass(frozen=True)
class Report:
    table2: tuple[str, ...] = param(NAMES)
    fig3_panels: dict[str, tuple[str, ...]] = param(Mapping(NAMES, "panel (a distortion or all3) -> strategy names"))
    fig4_examples: tuple[int, ...] = param(Seq(Int(0)))
    fig4_strategies: tuple[str, ...] = param(Names("strategies", "strategy"))
    claim_levels: tuple[int, ...] = param(Seq(Int(1, LEVELS), unique=True, noun="levels"))
    alpha: float = param(Num(0, 1, open_lo=True))
    bootstrap: int = param(Int(100))
    quality_bins: int = param(Int(2))
    s1_tolerance: float = param(Num(0, 1))
    paper_test_size: int = param(Int(1))  # test images behind each of the paper's cells (its standard error)
    within: float = param(Num(0, 1, open_lo=True))  # a cell within this of the paper counts as reproduced

    def problems(self):
        if set(self.fig3_panels) - set(DISTORTIONS + ("all3",)):
            yield "fig3_panels", f"panels named from {list(DISTORTIONS) + ['all3']}"


@dataclass(frozen=True)
class CorruptParams:
    families: tuple[str, ...] = param(Seq(Choice(*CORRUPTIONS), unique=True, noun="families"))
    severities: tuple[int, ...] = param(Seq(Int(1, 5), unique=True, noun="severities"))
    seed: int = param(Int(0))


@dataclass(frozen=True)
class Schedule:
    epochs: int = param(Int(1))
    lr_decay_epochs: int | None = param(Int(1, null=True))  # null: constant lr

    def problems(self):
        if self.lr_decay_epochs is not None and self.lr_decay_epochs > self.epochs:
            yield "lr_decay_epochs", f"null or at most epochs ({self.epochs})"


@dataclass(frozen=True)
class Probe:
    epochs: int = param(Int(1))
    eval_every: int = param(Int(1))


def Conventions(key, v, ctx):
    """name -> {distort key: value}: the default `distort` with those keys changed, a Distort."""
    checks = _checks(Distort)
    unknown = Check(f"a distort key; known keys: {sorted(checks)}", lambda x: False)

    def convention(where, changes, ctx):
        if where == f"{key}.default":
            _fail(where, changes, "another name: 'default' is the distort section itself")
        if not isinstance(changes, dict) or not changes:
            _fail(where, changes, f"a non-empty mapping of distort keys from {sorted(checks)}")
        parsed = {k: checks.get(k, unknown)(f"{where}.{k}", x, ctx) for k, x in changes.items()}
        return dataclasses.replace(ctx["distort"], **parsed)
    return Mapping(convention, "name -> {distort key: value}")(key, v, ctx)


def PristineStrategy(key, v, ctx):
    """The name of a one-hot strategy trained on the pristine set (needs neither copies nor scores)."""
    ok = [n for n, s in ctx["strategies"].items() if s.train_set == "pristine" and s.labels == "original"]
    return v if v in ok else _fail(key, v, f"a one-hot strategy on the pristine set, one of {ok}")


@dataclass(frozen=True)
class Deviation:
    strategy: str = param(PristineStrategy)
    seed: int = param(Int(0))
    train_size: int = param(Int(NUM_CLASSES))
    converged: Schedule = param(Section(Schedule))
    probe: Probe = param(Section(Probe))
    train_eval_size: int = param(Int(1))
    conventions: dict[str, Distort] = param(Conventions)

    def problems(self):
        if self.train_size % NUM_CLASSES:
            yield "train_size", f"a multiple of {NUM_CLASSES} (class-balanced subset)"
        if self.train_eval_size > self.train_size:
            yield "train_eval_size", f"at most train_size ({self.train_size})"


@dataclass(frozen=True)
class Params:  # sections in this order: a key may name what an earlier section defines
    base: Base = param(Section(Base))
    distort: Distort = param(Section(Distort))
    iqa: IQA = param(Section(IQA))
    mixture: Mixture = param(Section(Mixture))
    model: Model = param(Section(Model))
    train: Train = param(Section(Train))
    strategies: dict[str, Strategy] = param(Mapping(Section(Strategy), "name -> {train_set, labels}"))
    evaluate: Evaluate = param(Section(Evaluate))
    report: Report = param(Section(Report))
    corrupt: CorruptParams = param(Section(CorruptParams))
    deviation: Deviation = param(Section(Deviation))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse(raw: dict) -> Params:
    """Validate an already-loaded params mapping (tests shrink the real one and call this)."""
    return _build(Params, "", raw, {})


def read_raw(path: str | Path = "params.yaml"):
    """The YAML mapping of a params (or preset) file, unvalidated."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: no such file (run from the repository root)")
    with open(path) as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ParamError(f"{path}: not valid YAML: {e}") from None


def load(path: str | Path = "params.yaml") -> Params:
    return parse(read_raw(path))


# ---------------------------------------------------------------- presets: dotted keys -> values

def load_preset(path: str | Path) -> dict[str, Any]:
    """A preset file: a flat mapping of dotted params keys (`train.epochs`) to values."""
    raw = read_raw(path)
    if not isinstance(raw, dict) or not raw or any(not isinstance(k, str) or "." not in k for k in raw):
        raise ParamError(f"{path}: expected a mapping of dotted params keys (e.g. train.epochs: 16) to values")
    return raw


def with_overrides(raw: dict, values: dict[str, Any], where: str = "preset") -> dict:
    """A copy of `raw` with each dotted key set, as `dvc exp run -S` sets it; a key it lacks (a typo) is an error."""
    out = copy.deepcopy(raw)  # in params.yaml's order (strategies, say)
    for key, value in values.items():
        *parents, leaf = key.split(".")
        d = out
        for k in parents:
            if not isinstance(d, dict) or k not in d:
                raise ParamError(f"{where}: {key}: params.yaml has no {k!r} here")
            d = d[k]
        if not isinstance(d, dict) or leaf not in d:
            raise ParamError(f"{where}: {key}: no such key in params.yaml")
        d[leaf] = value
    return out


def yaml_value(value: Any) -> str:
    """A value as `-S key=value` writes it (YAML flow style: null, 16, [0, 1, 2], cuda)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()
