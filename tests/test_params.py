"""iqals.params: the committed params.yaml, and bad values failing with the key and the problem."""
from __future__ import annotations

import csv

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
    "shares sum 0.9": (_set("mixture.shares", [0.6, 0.15, 0.05, 0.1]), "mixture.shares", "summing to 1"),
    "shares length 3": (_set("mixture.shares", [0.6, 0.2, 0.2]), "mixture.shares", "a list of 4 values"),
    "blur sigma 0": (_blur_level(0, 0), "distort.blur_sigma[0]", "a number in (0, inf]"),
    "blur sigma negative": (_blur_level(2, -1.2), "distort.blur_sigma[2]", "a number in (0, inf]"),
    "blur 2 levels": (_set("distort.blur_sigma", [0.7, 1.0]), "distort.blur_sigma", "a list of 3 values"),
    "noise var 0": (_noise_level(1, 0.0), "distort.noise_var[1]", "a number in (0, inf]"),
    "noise var negative": (_noise_level(0, -0.005), "distort.noise_var[0]", "a number in (0, inf]"),
    "jpeg quality 0": (_jpeg_level(2, 0), "distort.jpeg_quality[2]", "an integer in [1, 100]"),
    "jpeg quality 101": (_jpeg_level(0, 101), "distort.jpeg_quality[0]", "an integer in [1, 100]"),
    "jpeg quality float": (_jpeg_level(1, 8.5), "distort.jpeg_quality[1]", "an integer"),
    "jpeg subsampling": (_set("distort.jpeg_subsampling", "411"), "distort.jpeg_subsampling", "one of"),
    "unknown metric": (_set("iqa.metric", "no_such_metric"), "iqa.metric", "one of ['ssim'"),
    "unknown transform": (_set("iqa.transform", "sigmoid"), "iqa.transform", "one of ['identity'"),
    "epochs 0": (_set("train.epochs", 0), "train.epochs", "an integer in [1, inf]"),
    "epochs bool": (_set("train.epochs", True), "train.epochs", "an integer"),
    "batch_size 0": (_set("train.batch_size", 0), "train.batch_size", "an integer in [1, inf]"),
    "lr_decay_epochs > epochs": (lambda raw: raw["train"].update(epochs=6, lr_decay_epochs=7),
                                 "train.lr_decay_epochs", "at most train.epochs (6)"),
    "seeds empty": (_set("train.seeds", []), "train.seeds", "a non-empty list"),
    "seeds duplicate": (_set("train.seeds", [0, 1, 0]), "train.seeds", "distinct seeds"),
    "train_size 2005": (_set("base.train_size", 2005), "base.train_size", "a multiple of 10"),
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
    """Each case must fail because of its value: the same mutation with a good value parses."""
    _set("train.lr_decay_epochs", 6)(raw_params)
    _set("train.seeds", [0, 1, 2])(raw_params)
    _set("base.train_size", 2010)(raw_params)
    _jpeg_level(0, 100)(raw_params)
    _jpeg_level(2, 1)(raw_params)
    _set("mixture.shares", [0.7, 0.1, 0.1, 0.1])(raw_params)
    _set("strategies.S1.labels", "original")(raw_params)
    p = params_lib.parse(raw_params)
    assert p.train.lr_decay_epochs == 6 and p.train.seeds == (0, 1, 2)
    assert p.base.train_size == 2010 and p.distort.jpeg_quality == (100, 8, 1)
    assert p.mixture.shares == (0.7, 0.1, 0.1, 0.1)


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
    assert (d.blur_kernel, d.blur_border, d.jpeg_encoder, d.jpeg_subsampling) == ("matlab", "replicate", "opencv", "420")
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
    import copy
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
    import dataclasses

    from iqals.params import REFERENCE_STEP, off_reference

    assert off_reference(params.train) == () and off_reference(dict(REFERENCE_STEP)) == ()
    bf16_batch = dataclasses.replace(params.train, precision="bf16", layout="batch")
    assert off_reference(bf16_batch) == ("precision", "layout")
    assert off_reference({**REFERENCE_STEP, "step": "graph"}) == ("step",)
