"""The probe of training-step variants (iqals/probe.py): on the CPU what runs there, on a GPU every
variant's check (skipped without one)."""
import dataclasses

import pytest
import torch

from iqals import params as params_lib, probe, train as train_lib
from iqals.params import TRAIN_LAYOUTS, TRAIN_STEPS

CPU = torch.device("cpu")


@pytest.fixture
def p(raw_params):
    raw_params["train"].update(batch_size=20)  # small batches: the CPU here is slow and shared
    return params_lib.parse(raw_params)


def test_variants_are_valid_and_include_the_reference():
    assert probe.VARIANTS[0] == {"precision": "fp32", "step": "eager", "layout": "channels", "group": 1}
    for v in probe.VARIANTS:
        assert v["precision"] in train_lib.TOLERANCE and v["step"] in TRAIN_STEPS and v["group"] >= 1
        assert v.get("layout", "channels") in TRAIN_LAYOUTS and set(v) <= {"group", *probe.TRAIN_KEYS}
    assert len({tuple(sorted(v.items())) for v in probe.VARIANTS}) == len(probe.VARIANTS)
    # every GPU candidate at 1, 3, 17 and 51 runs: what DVC trains (one seed, one strategy's three)
    # and the whole study in groups
    gpu = [v for v in probe.VARIANTS if probe.needs_gpu(v)]
    kinds = {tuple(sorted((k, x) for k, x in v.items() if k != "group")) for v in gpu}
    kind_group = [(tuple(sorted((k, x) for k, x in v.items() if k != "group")), v["group"]) for v in gpu]
    assert sorted(kind_group) == sorted((kind, g) for kind in kinds for g in probe.GROUPS)
    assert any(v.get("layout") == "batch" for v in gpu)


def test_choose_takes_the_fastest_that_passed_in_any_layout():
    rs = [{"group": 1, "ok": True, "images_per_s": 10.0}, {"group": 2, "ok": False, "images_per_s": 99.0},
          {"group": 3, "ok": True, "images_per_s": 20.0}, {"group": 4, "ok": False, "skipped": "x"},
          {"group": 17, "layout": "batch", "ok": True, "images_per_s": 50.0}]
    assert probe.choose(rs)["group"] == 17
    assert probe.choose(rs[:4])["group"] == 3
    assert probe.choose(rs[1:2] + rs[3:4]) is None
    assert probe.name(rs[4] | {"precision": "bf16", "step": "graph", "cudnn_benchmark": True}) == \
        "bf16 graph x17, batch layout, cudnn benchmark"
    assert probe.name({"precision": "fp32", "step": "eager", "group": 1}) == "fp32 eager x1"


def test_a_variant_is_the_train_values_the_stage_would_be_given(p):
    cfg = probe.config(p, {"precision": "bf16", "step": "graph", "group": 3, "layout": "batch",
                           "cudnn_benchmark": True})
    assert (cfg.precision, cfg.step, cfg.layout, cfg.cudnn_benchmark) == ("bf16", "graph", "batch", True)
    assert cfg.epochs == p.train.epochs and cfg.batch_size == p.train.batch_size
    p = dataclasses.replace(p, train=dataclasses.replace(p.train, layout="batch", cudnn_benchmark=True))
    plain = probe.config(p, {"precision": "fp32", "step": "eager", "group": 1})  # the variant's values, not params
    assert (plain.layout, plain.cudnn_benchmark) == ("channels", False)


def test_an_unknown_layout_stops_naming_the_allowed_ones(p):
    with pytest.raises(ValueError, match="layout 'rows'.*channels.*batch"):
        probe.check(p, CPU, {"precision": "fp32", "step": "eager", "group": 1, "layout": "rows"})


def test_profile_lists_the_steps_top_operators(p, monkeypatch):
    monkeypatch.setitem(probe.IMAGES, "cpu", 40)
    text = probe.profile(p, CPU, {"precision": "fp32", "step": "eager", "group": 2}, epochs=1, rows=8)
    assert text.startswith("fp32 eager x2: 1 epochs of 40 images per run")
    assert "convolution" in text and "Self CPU" in text


def test_probe_checks_and_times_what_the_cpu_runs(p, monkeypatch):
    monkeypatch.setitem(probe.IMAGES, "cpu", 40)
    vs = ({"precision": "fp32", "step": "eager", "group": 1}, {"precision": "fp32", "step": "eager", "group": 2},
          {"precision": "bf16", "step": "graph", "group": 17})
    real = probe.check
    monkeypatch.setattr(probe, "check", lambda p, d, v: real(p, d, v) if v["group"] == 1 else 1 / 0)
    real_time = probe.time_variant  # one timed epoch, and a budget no load can use up: no clock in the test
    monkeypatch.setattr(probe, "time_variant", lambda p, d, v, seconds: real_time(p, d, v, 0.0))
    results = probe.probe(p, CPU, 3600, vs)
    assert [r["group"] for r in results] == [1, 2, 17]
    ok, failed, skipped = results
    assert ok["ok"] and ok["images_per_s"] > 0 and ok["check"]["ok"] and ok["epochs_timed"] >= 1
    assert not failed["ok"] and "ZeroDivisionError" in failed["error"]
    assert not skipped["ok"] and "needs a GPU" in skipped["skipped"]
    assert probe.choose(results) is ok


def test_variants_after_the_probes_time_are_skipped_not_run(p, monkeypatch):
    monkeypatch.setattr(probe, "check", lambda *a: pytest.fail("ran a variant after the time was up"))
    vs = ({"precision": "fp32", "step": "eager", "group": 1}, {"precision": "bf16", "step": "graph", "group": 17})
    first, gpu = probe.probe(p, CPU, 0, vs)
    assert "0 s were used up" in first["skipped"] and "needs a GPU" in gpu["skipped"] and probe.choose([first]) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU variants run only there)")
@pytest.mark.parametrize("v", probe.VARIANTS, ids=probe.name)
def test_every_variant_passes_its_check_on_the_gpu(params, v):
    r = probe.check(params, torch.device("cuda"), v)
    assert r["ok"], r
