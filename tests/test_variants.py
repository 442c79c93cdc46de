"""The GPU variants' smoke check, probe and choice (iqals/variants.py): on the CPU what runs there,
on a GPU every variant (skipped without one)."""
import pytest
import torch

from iqals import params as params_lib, steps as steps_lib, variants
from iqals.params import TRAIN_STEPS

CPU = torch.device("cpu")


@pytest.fixture
def p(raw_params):
    raw_params["train"].update(batch_size=20)  # small batches: the CPU here is slow and shared
    return params_lib.parse(raw_params)


def test_variants_are_valid_and_include_the_reference():
    assert variants.VARIANTS[0] == {"precision": "fp32", "step": "eager", "group": 1}
    for v in variants.VARIANTS:
        assert set(variants.TOLERANCE[v["precision"]]) == {"logits", "loss", "gradients", "updates"}
        assert v["step"] in TRAIN_STEPS and v["group"] >= 1
        assert v.get("layout", "channels") in variants.LAYOUTS and set(v) <= {"precision", "step", "group",
                                                                              "layout", "benchmark"}
    assert len({tuple(sorted(v.items())) for v in variants.VARIANTS}) == len(variants.VARIANTS)
    # every GPU candidate at 1, 3, 17 and 51 runs: what DVC trains (one seed, one strategy's three)
    # and the whole study in groups
    gpu = [v for v in variants.VARIANTS if variants.needs_gpu(v)]
    kinds = {tuple(sorted((k, x) for k, x in v.items() if k != "group")) for v in gpu}
    assert {(kind, v["group"]) for kind in kinds for v in gpu} >= {(kind, g) for kind in kinds for g in variants.GROUPS}
    assert len(kinds) * len(variants.GROUPS) == len(gpu)
    assert any(v.get("layout") == "batch" for v in gpu)


def test_choose_takes_only_what_the_train_stage_runs_unless_asked():
    rs = [{"group": 1, "ok": True, "images_per_s": 10.0},
          {"group": 17, "layout": "batch", "ok": True, "images_per_s": 99.0}]
    assert variants.choose(rs)["group"] == 1
    assert variants.choose(rs, layouts=variants.LAYOUTS)["group"] == 17
    assert variants.name(rs[1] | {"precision": "bf16", "step": "graph", "benchmark": True}) == \
        "bf16 graph x17, batch layout, cudnn benchmark"


def test_an_unknown_layout_stops_naming_the_allowed_ones(p):
    with pytest.raises(ValueError, match="layout 'rows'.*channels.*batch"):
        variants.smoke_check(p, CPU, "fp32", "eager", 1, layout="rows")


def test_profile_lists_the_steps_top_operators(p, monkeypatch):
    monkeypatch.setitem(variants.PROBE_IMAGES, "cpu", 40)
    text = variants.profile(p, CPU, {"precision": "fp32", "step": "eager", "group": 2}, epochs=1, rows=8)
    assert text.startswith("fp32 eager x2: 1 epochs of 40 images per run")
    assert "convolution" in text and "Self CPU" in text


def test_smoke_check_of_the_cpu_group_passes_with_rounding_only(p):
    r = variants.smoke_check(p, CPU, "fp32", "eager", 3)
    assert r["ok"] and r["tolerance"] == variants.TOLERANCE["fp32"]
    assert r["logits_rel"] < 1e-5 and r["loss_rel"] < 1e-5  # fp32 rounding of other kernels
    assert r["gradients_rel"] < 1e-2 and r["updates_rel"] < 1e-2  # and a max pool's near-ties, at most


def test_smoke_check_fails_a_step_that_takes_the_wrong_batch(p, monkeypatch):
    real = steps_lib.Steps.batch
    monkeypatch.setattr(steps_lib.Steps, "batch", lambda self, c, j: real(self, c, j.roll(1, dims=1)))
    r = variants.smoke_check(p, CPU, "fp32", "eager", 2)
    assert not r["ok"] and r["logits_rel"] > 0.01 and r["gradients_rel"] > variants.TOLERANCE["bf16"]["gradients"]


def test_probe_times_what_the_cpu_runs_and_choose_takes_the_fastest_passed(p, monkeypatch):
    monkeypatch.setitem(variants.PROBE_IMAGES, "cpu", 40)
    vs = ({"precision": "fp32", "step": "eager", "group": 1}, {"precision": "fp32", "step": "eager", "group": 2},
          {"precision": "bf16", "step": "graph", "group": 17})
    real = variants.smoke_check
    monkeypatch.setattr(variants, "smoke_check",
                        lambda p, d, **v: real(p, d, **v) if v["group"] == 1 else 1 / 0)  # the second fails
    results = variants.probe(p, CPU, 60, vs)
    assert [r["group"] for r in results] == [1, 2, 17]
    ok, failed, skipped = results
    assert ok["ok"] and ok["images_per_s"] > 0 and ok["smoke"]["ok"] and ok["epochs_timed"] >= 1
    assert not failed["ok"] and "ZeroDivisionError" in failed["error"]
    assert not skipped["ok"] and "needs a GPU" in skipped["skipped"]
    assert variants.choose(results) is ok


def test_choose_ignores_failed_checks_and_unmeasured():
    rs = [{"group": 1, "ok": True, "images_per_s": 10.0}, {"group": 2, "ok": False, "images_per_s": 99.0},
          {"group": 3, "ok": True, "images_per_s": 20.0}, {"group": 4, "ok": False, "skipped": "x"}]
    assert variants.choose(rs)["group"] == 3
    assert variants.choose(rs[1:2] + rs[3:]) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU variants run only there)")
@pytest.mark.parametrize("v", variants.VARIANTS, ids=lambda v: f"{v['precision']}-{v['step']}-{v['group']}")
def test_every_variant_passes_its_smoke_check_on_the_gpu(params, v):
    r = variants.smoke_check(params, torch.device("cuda"), **v)
    assert r["ok"], r
