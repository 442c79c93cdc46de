"""iqals.params: the committed params.yaml, and bad values failing with the key and the problem."""
from __future__ import annotations

import copy
import csv
import dataclasses

import pytest

from iqals import params as params_lib
from iqals.params import ParamError


def _set(path: str, value):
    """A mutator that sets raw[a][b]... = value for path "a.b..."."""
    def mutate(raw):
        *parents, leaf = path.split(".")
        d = raw
        for k in parents:
            d = d[k]
        d[leaf] = value
    return mutate


def _delete(path: str):
    def mutate(raw):
        *parents, leaf = path.split(".")
        d = raw
        for k in parents:
            d = d[k]
        del d[leaf]
    return mutate


def _blur_level(i, v):
    def mutate(raw):
        raw["distort"]["blur_sigma"][i] = v
    return mutate


def _noise_level(i, v):
    def mutate(raw):
        raw["distort"]["noise_var"][i] = v
    return mutate


def _jpeg_level(i, v):
    def mutate(raw):
        raw["distort"]["jpeg_quality"][i] = v
    return mutate


# id -> (mutator, key the message must name, words of the problem)
BAD = {
    "unknown section": (_set("augment", {"flip": True}), "augment", "no such section"),
    "unknown train key": (_set("train.momentum", 0.9), "train.momentum", "no such key"),
    "missing train key": (_delete("train.lr"), "train.lr", "key is missing"),
    "unknown strategy field": (_set("strategies.S3.epsilon", 0.1), "strategies.S3.epsilon",
                               "no such key; known keys: ['labels', 'train_set']"),
    "missing strategy field": (_delete("strategies.S3.labels"), "strategies.S3.labels", "key is missing"),
    "unknown train_set": (_set("strategies.S2.train_set", "mix_rain"), "strategies.S2.train_set",
                          "one of ['pristine', 'mix_blur'"),
    "unknown label rule": (_set("strategies.S3.labels", "focal"), "strategies.S3.labels",
                           "one of ['original', 'iqa_ls'"),
    "iqa_ls on pristine": (_set("strategies.S1.labels", "iqa_ls"), "strategies.S1.labels",
                           "original for the pristine set"),
    "shares sum 0.9": (_set("mixture.shares", [0.6, 0.15, 0.05, 0.1]), "mixture.shares",  # the value as written
                       "= [0.6, 0.15, 0.05, 0.1]: expected 4 shares (pristine, then levels 1..3) summing to 1"),
    "shares sum 1.0001": (_set("mixture.shares", [0.6, 0.15, 0.15, 0.1001]), "mixture.shares", "summing to 1"),
    "shares length 3": (_set("mixture.shares", [0.6, 0.2, 0.2]), "mixture.shares", "a list of 4 values"),
    "blur sigma 0": (_blur_level(0, 0), "distort.blur_sigma[0]", "a number in (0, inf)"),
    "blur sigma negative": (_blur_level(2, -1.2), "distort.blur_sigma[2]", "a number in (0, inf)"),
    "blur sigma inf": (_blur_level(1, float("inf")), "distort.blur_sigma[1]", "a number in (0, inf)"),
    "blur 2 levels": (_set("distort.blur_sigma", [0.7, 1.0]), "distort.blur_sigma", "a list of 3 values"),
    "noise var 0": (_noise_level(1, 0.0), "distort.noise_var[1]", "a number in (0, inf)"),
    "noise var negative": (_noise_level(0, -0.005), "distort.noise_var[0]", "a number in (0, inf)"),
    "jpeg quality 0": (_jpeg_level(2, 0), "distort.jpeg_quality[2]", "an integer in [1, 100]"),
    "jpeg quality 101": (_jpeg_level(0, 101), "distort.jpeg_quality[0]", "an integer in [1, 100]"),
    "jpeg quality float": (_jpeg_level(1, 8.5), "distort.jpeg_quality[1]", "an integer"),
    "jpeg subsampling": (_set("distort.jpeg_subsampling", "411"), "distort.jpeg_subsampling", "one of"),
    "unknown metric": (_set("iqa.metric", "no_such_metric"), "iqa.metric", "one of ['ssim'"),
    "unknown transform": (_set("iqa.transform", "sigmoid"), "iqa.transform", "one of ['identity'"),
    "epochs 0": (_set("train.epochs", 0), "train.epochs", "an integer in [1, inf)"),
    "epochs bool": (_set("train.epochs", True), "train.epochs", "an integer"),
    "epochs null": (_set("train.epochs", None), "train.epochs", "= None: expected an integer in [1, inf)"),
    "lr_decay 1.5": (_set("train.lr_decay", 1.5), "train.lr_decay", "a number in (0, 1]"),
    "cudnn_benchmark 1": (_set("train.cudnn_benchmark", 1), "train.cudnn_benchmark", "true or false"),
    "batch_size 0": (_set("train.batch_size", 0), "train.batch_size", "an integer in [1, inf)"),
    "lr_decay_epochs > epochs": (lambda raw: raw["train"].update(epochs=6, lr_decay_epochs=7),
                                 "train.lr_decay_epochs", "at most train.epochs (6)"),
    "snapshot_every > epochs": (_set("train.snapshot_every", 11), "train.snapshot_every", "at most train.epochs (10)"),
    "seeds empty": (_set("train.seeds", []), "train.seeds", "a non-empty list"),
    "seeds duplicate": (_set("train.seeds", [0, 1, 0]), "train.seeds", "distinct seeds"),
    "seed negative": (_set("train.seeds", [0, -1]), "train.seeds[1]", "an integer in [0, inf)"),
    "train_size 2004": (_set("base.train_size", 2004), "base.train_size", "a multiple of 10"),  # even, not of 5
    "ssim even window": (_set("iqa.ssim.win_size", 10), "iqa.ssim.win_size", "an odd integer"),
    "clip low > high": (_set("iqa.clip", [0.6, 0.5]), "iqa.clip",
                        "= [0.6, 0.5]: expected [low, high] with low <= high"),
    "uniform_ls on pristine": (_set("strategies.S1.labels", "uniform_ls"), "strategies.S1.labels",
                               "original for the pristine set"),
    "shuffled_ls on pristine": (_set("strategies.S1.labels", "shuffled_ls"), "strategies.S1.labels",
                                "original for the pristine set"),
    "table2 duplicate": (_set("report.table2", ["S1", "S2", "S1"]), "report.table2",
                         "distinct names (report.table2[2] repeats report.table2[0])"),
    "fig3 unknown panel": (_set("report.fig3_panels.rain", ["S1"]), "report.fig3_panels",
                           "panels named from ['blur', 'noise', 'jpeg', 'all3']"),
    "fig4 no strategies": (_set("report.fig4_strategies", []), "report.fig4_strategies",
                           "a non-empty list of strategy names"),
    "claim level 4": (_set("report.claim_levels", [1, 4]), "report.claim_levels[1]", "an integer in [1, 3]"),
    "fig4 unknown strategy": (_set("report.fig4_strategies", ["S1", "S2", "S42"]), "report.fig4_strategies",
                              "strategy names from"),
    "blur kernel rule": (_set("distort.blur_kernel", "gauss5"), "distort.blur_kernel",
                         "one of ['matlab', 'scipy', 'opencv', 'fixed3']"),
    "noise output": (_set("distort.noise_output", "ceil"), "distort.noise_output",
                     "one of ['round', 'floor', 'float_clipped', 'float']"),
    "convention value": (_set("deviation.conventions.noise_floor.noise_output", "ceil"),
                         "deviation.conventions.noise_floor.noise_output",
                         "one of ['round', 'floor', 'float_clipped', 'float']"),
    "convention key": (_set("deviation.conventions.jpeg_pillow", {"jpeg_coder": "pillow"}),
                       "deviation.conventions.jpeg_pillow.jpeg_coder", "a distort key; known keys: ['blur_border'"),
    "convention encoder": (_set("deviation.conventions.jpeg_pillow.jpeg_encoder", "matlab"),
                           "deviation.conventions.jpeg_pillow.jpeg_encoder", "one of ['opencv', 'pillow']"),
    "convention named default": (_set("deviation.conventions.default", {"blur_border": "reflect"}),
                                 "deviation.conventions.default", "another name"),
    "deviation strategy mixed": (_set("deviation.strategy", "S2"), "deviation.strategy",
                                 "a one-hot strategy on the pristine set, one of ['S1']"),
    "deviation decay > epochs": (_set("deviation.converged.lr_decay_epochs", 17), "deviation.converged.lr_decay_epochs",
                                 "null or at most epochs (16)"),
    "deviation train eval": (_set("deviation.train_eval_size", 60000), "deviation.train_eval_size",
                             "at most train_size (50000)"),
    "deviation train_size": (_set("deviation.train_size", 49995), "deviation.train_size", "a multiple of 10"),
    "convention empty": (_set("deviation.conventions.noise_floor", {}), "deviation.conventions.noise_floor",
                         "a non-empty mapping of distort keys"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_params_name_key_and_problem(raw_params, case):
    mutate, key, problem = BAD[case]
    mutate(raw_params)
    with pytest.raises(ParamError) as err:
        params_lib.parse(raw_params)
    msg = str(err.value)
    assert msg.startswith(f"params.yaml: {key} = "), msg  # the key, exactly
    assert problem in msg, msg


def test_the_mutators_alone_do_not_break_good_params(raw_params):
    """Each case must fail because of its value: the same mutation with a good value parses, bounds included."""
    raw_params["train"].update(epochs=6, lr_decay_epochs=6, snapshot_every=6, lr_decay=1)  # "at most", (0, 1]
    raw_params["train"].update(precision="bf16", step="graph")  # device auto: iqals.train checks, not params
    _set("train.seeds", [0, 1, 2])(raw_params)
    _set("base.train_size", 2010)(raw_params)
    _jpeg_level(0, 100)(raw_params)
    _jpeg_level(2, 1)(raw_params)
    _set("mixture.shares", [0.7, 0.1, 0.1, 0.1])(raw_params)
    _set("strategies.S1.labels", "original")(raw_params)
    _set("iqa.clip", [0.5, 0.5])(raw_params)  # low <= high
    _set("report.claim_levels", [3])(raw_params)
    _set("deviation.train_eval_size", 50000)(raw_params)  # at most train_size
    _set("deviation.converged.lr_decay_epochs", None)(raw_params)  # null: constant lr
    p = params_lib.parse(raw_params)
    assert (p.train.epochs, p.train.lr_decay_epochs, p.train.snapshot_every, p.train.lr_decay) == (6, 6, 6, 1.0)
    assert p.train.seeds == (0, 1, 2) and (p.train.precision, p.train.step) == ("bf16", "graph")
    assert p.base.train_size == 2010 and p.distort.jpeg_quality == (100, 8, 1)
    assert p.mixture.shares == (0.7, 0.1, 0.1, 0.1) and p.iqa.clip == (0.5, 0.5) and p.report.claim_levels == (3,)
    assert p.deviation.train_eval_size == 50000 and p.deviation.converged.lr_decay_epochs is None


def test_values_take_the_declared_type(raw_params):
    """Float keys hold floats and choices strings, as written in YAML or not (an unquoted 444, as `-S key=444`
    writes it, is the string "444"); derived fields follow the documented tables."""
    raw_params["iqa"]["ssim"]["data_range"] = 255
    raw_params["distort"]["jpeg_subsampling"] = 444
    raw_params["deviation"]["conventions"]["jpeg_444"] = {"jpeg_subsampling": 422}
    p = params_lib.parse(raw_params)
    assert type(p.iqa.ssim.data_range) is float and p.iqa.ssim.data_range == 255.0
    assert type(p.model.conv1_bias) is float and type(p.train.epochs) is int
    assert p.distort.jpeg_subsampling == "444" and p.deviation.conventions["jpeg_444"].jpeg_subsampling == "422"
    for name, s in p.strategies.items():  # an entry's name is its key; iqa_ls and both controls read scores
        assert s.name == name and s.needs_scores == (s.labels in ("iqa_ls", "uniform_ls", "shuffled_ls")), name
    mixes = {"pristine": (), "mix_blur": ("blur",), "mix_noise": ("noise",), "mix_jpeg": ("jpeg",),
             "mix_all3": ("blur", "noise", "jpeg")}
    assert {s.train_set: s.distortions for s in p.strategies.values()} == mixes
    conv = p.deviation.conventions  # round and floor give uint8 images, the float outputs do not
    assert [conv[n].uint8 for n in ("noise_floor", "noise_float_clipped", "noise_float")] == [True, False, False]
    assert p.distort.uint8 and conv["blur_zero"] == dataclasses.replace(p.distort, blur_border="constant")


def test_a_mapping_of_strategy_lists_is_one_check():
    """What a report key such as fig3_panels (panel -> strategy names) would use."""
    panels = params_lib.Mapping(params_lib.Names("strategies", "strategy"), "panel -> strategy names")
    ctx = {"strategies": {"S1": None, "S2": None}}
    assert panels("report.fig3_panels", {"blur": ["S1", "S2"]}, ctx) == {"blur": ("S1", "S2")}
    with pytest.raises(ParamError, match=r"^params\.yaml: report\.fig3_panels\.blur = \['S1', 'S9'\]: "
                                         r"expected a non-empty list of strategy names from \['S1', 'S2'\]$"):
        panels("report.fig3_panels", {"blur": ["S1", "S9"]}, ctx)
    with pytest.raises(ParamError, match=r"report\.fig3_panels = \{\}: expected a non-empty mapping"):
        panels("report.fig3_panels", {}, ctx)


def test_load_rejects_missing_and_invalid_files(tmp_path):
    with pytest.raises(ParamError, match="no such file"):
        params_lib.load(tmp_path / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamError, match="not valid YAML"):
        params_lib.load(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ParamError, match="a mapping of sections"):
        params_lib.load(top)


# --------------------------------------------------------------------- committed params.yaml

def test_committed_params_load_with_the_protocol_values(params):
    d = params.distort
    assert d.blur_sigma == (0.7, 1.0, 1.2)
    assert d.noise_var == (0.005, 0.01, 0.02)
    assert d.jpeg_quality == (12, 8, 4)
    assert (d.blur_kernel, d.blur_border, d.jpeg_encoder, d.jpeg_subsampling) == ("matlab", "replicate", "opencv",
                                                                                   "420")
    assert (d.noise_scale, d.noise_output, d.noise_field) == ("unit", "round", "per_channel")
    assert params.mixture.shares == (0.60, 0.15, 0.15, 0.10)
    assert (params.iqa.metric, params.iqa.transform) == ("ssim", "identity")
    s = params.iqa.ssim
    assert (s.win_size, s.sigma, s.k1, s.k2, s.data_range) == (11, 1.5, 0.01, 0.03, 255)
    t = params.train
    assert (t.lr, t.lr_decay, t.batch_size, t.weight_decay) == (0.1, 0.1, 100, 0.004)
    assert set(params.report.fig4_strategies) <= set(params.strategies)


def _table2(repo_root) -> list[dict]:
    with open(repo_root / "reference" / "paper_table2.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_strategies_s1_to_s9_match_paper_table2(params, repo_root):
    rows = _table2(repo_root)
    assert [r["strategy"] for r in rows] == [str(i) for i in range(1, 10)]
    for r in rows:
        st = params.strategies[f"S{r['strategy']}"]
        assert (st.labels, st.train_set) == (r["regularization"], r["train_set"]), r["strategy"]
    # Table 2 reports the pristine set and 3 types x 3 levels: the evaluation's 10 test sets.
    cols = list(rows[0])[3:]
    assert cols == ["pristine"] + [f"{k}_{lv}" for k in params_lib.DISTORTIONS for lv in (1, 2, 3)]
    assert all(0 < float(r[c]) < 1 for r in rows for c in cols)


def test_reference_copies_match_the_shared_paper_files(repo_root):
    shared = repo_root.parent / "shared" / "paper"
    pairs = {"paper_table2.csv": "table2.csv", "paper_fig4_confidence.csv": "fig4_confidence.csv"}
    for mine in pairs:
        assert (repo_root / "reference" / mine).is_file(), mine
    if not shared.is_dir():
        pytest.skip(f"{shared} is not here to compare against")
    for mine, theirs in pairs.items():
        assert (repo_root / "reference" / mine).read_bytes() == (shared / theirs).read_bytes(), mine


def test_parse_does_not_mutate_its_input(raw_params):
    before = copy.deepcopy(raw_params)
    params_lib.parse(raw_params)
    assert raw_params == before


def test_copy_layout_names_each_test_set_once():
    """copy_index and test_set_name agree: copy c of an image is test set TEST_SETS[c]."""
    from iqals.params import DISTORTIONS, LEVELS, NUM_COPIES, TEST_SETS, copy_index, test_set_name

    pairs = [(t, lv) for t in range(len(DISTORTIONS)) for lv in range(LEVELS)]
    assert sorted(copy_index(t, lv) for t, lv in pairs) == list(range(1, NUM_COPIES))
    assert all(TEST_SETS[copy_index(t, lv)] == test_set_name(t, lv) for t, lv in pairs)
    assert TEST_SETS[0] == "pristine" and test_set_name(2, 0) == "jpeg_1" and len(set(TEST_SETS)) == NUM_COPIES


def test_off_reference_names_the_keys_that_need_a_gpu(params):
    """One comparison with the reference step, for a Train and for a probe's mapping of values."""
    from iqals.params import REFERENCE_STEP, off_reference

    assert off_reference(params.train) == () and off_reference(dict(REFERENCE_STEP)) == ()
    bf16_batch = dataclasses.replace(params.train, precision="bf16", layout="batch")
    assert off_reference(bf16_batch) == ("precision", "layout")
    assert off_reference({**REFERENCE_STEP, "step": "graph"}) == ("step",)


def test_overrides_copy_params_and_name_what_it_lacks(raw_params, tmp_path):
    """with_overrides sets dotted keys in a deep copy; a path through a value or a missing key is an error."""
    before = copy.deepcopy(raw_params)
    out = params_lib.with_overrides(raw_params, {"train.epochs": 3, "deviation.converged.epochs": 20})
    assert raw_params == before
    assert out["train"]["epochs"] == 3 and out["deviation"]["converged"] == {"epochs": 20, "lr_decay_epochs": 12}
    with pytest.raises(ParamError, match=r"^preset: train\.epochs\.x\.y: params\.yaml has no 'x' here$"):
        params_lib.with_overrides(raw_params, {"train.epochs.x.y": 1})
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    with pytest.raises(ParamError, match="expected a mapping of dotted params keys"):
        params_lib.load_preset(empty)


def test_yaml_value_is_what_dvc_reads_back():
    """The `-S key=value` text, written by hand: flow style on one line, a numeric string kept a string."""
    cases = {None: "null", 16: "16", 0.1: "0.1", True: "true", "cuda": "cuda", "420": "'420'"}
    for value, text in cases.items():
        assert params_lib.yaml_value(value) == text, value
    assert params_lib.yaml_value([0, 1, 2]) == "[0, 1, 2]"
    assert params_lib.yaml_value(list(range(40))) == "[" + ", ".join(str(i) for i in range(40)) + "]"
