"""The probe of training-step variants (iqals/probe.py): on the CPU what runs there, on a GPU every
variant's check (skipped without one)."""
import dataclasses
import re
import types

import pytest
import torch
import yaml

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
    assert sorted(kind_group) == sorted((kind, g) for kind in kinds for g in (1, 3, 17, 51))  # 51: 17 x 3
    assert any(v.get("layout") == "batch" for v in gpu)
    # off CUDA the reference step alone, for one run and for one strategy's three seeds
    reference = {"precision": "fp32", "step": "eager", "layout": "channels"}
    assert [v for v in probe.VARIANTS if not probe.needs_gpu(v)] == [{**reference, "group": g} for g in (1, 3)]


def test_the_probed_group_sizes_are_what_the_paper_regime_trains(params, repo_root):
    """1 run, one strategy's seeds, one seed of every strategy, and every run of presets/paper.yaml."""
    from bench import bench_group

    preset = yaml.safe_load((repo_root / "presets" / "paper.yaml").read_text())
    seeds, strategies = len(preset["train.seeds"]), len(params.strategies)
    assert bench_group.study(params) == {"runs": strategies * seeds, "images": 50_000}  # CIFAR-10's training set
    assert probe.GROUPS == (1, seeds, strategies, strategies * seeds)


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
    monkeypatch.setitem(probe.IMAGES, "cpu", 50)  # whole batches of 20: 40 images
    real, profiled = probe._warm_step, []

    def counted(*args, **kwargs):  # the real step, its epochs after the warm-up counted
        n, epoch = real(*args, **kwargs)
        return n, lambda: profiled.append(n) or epoch()

    monkeypatch.setattr(probe, "_warm_step", counted)
    text = probe.profile(p, CPU, {"precision": "fp32", "step": "eager", "group": 2}, epochs=2, rows=8)
    assert text.startswith("fp32 eager x2: 2 epochs of 40 images per run") and profiled == [40, 40]
    assert "convolution" in text and "Self CPU" in text
    # the table: `rows` operators, largest CPU time with their callees first
    lines = text.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("---")]
    header = re.split(r"\s{2,}", lines[rules[0] + 1].strip())
    body = [re.split(r"\s{2,}", line.strip()) for line in lines[rules[1] + 1:rules[2]]]
    total = [float(row[header.index("CPU total %")].rstrip("%")) for row in body]
    assert len(body) == 8 and total == sorted(total, reverse=True), text


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


def test_timing_counts_every_runs_images_over_whole_epochs(p, monkeypatch):
    """time_variant's arithmetic on a clock moved by hand: a 5 s warm-up, 1 s an epoch and 2.5 s to
    time give 3 whole epochs in 3 s; 3 runs of 40 images, 2 batches of 20 an epoch; the variant's step."""
    clock, timed = [0.0], []

    def epoch():
        clock[0] += 1.0
        return torch.zeros(3), torch.zeros(3)  # each run's summed loss and number right

    def warm_step(p, device, v, cfg, seed):
        clock[0] += 5.0
        timed.append((cfg.precision, cfg.step, cfg.layout, cfg.cudnn_benchmark))
        return 40, epoch

    monkeypatch.setattr(probe, "_warm_step", warm_step)
    monkeypatch.setattr(probe, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    v = {"precision": "bf16", "step": "graph", "group": 3, "layout": "batch", "cudnn_benchmark": True}
    r = probe.time_variant(p, CPU, v, 2.5)
    assert r == {"images_per_s": 3 * 40 * 3 / 3.0, "step_ms": 1000 * 3.0 / (3 * 2), "epochs_timed": 3,
                 "images_per_epoch": 40, "warm_up_s": 5.0}
    assert timed == [("bf16", "graph", "batch", True)]  # not params' fp32 eager step


def test_probe_shares_its_time_among_what_the_device_runs_and_takes_ok_from_the_check(p, monkeypatch):
    """The probe's bookkeeping with the check and the timing stubbed: half of each runnable
    variant's share of the seconds goes to timing; one that runs but fails its check is not chosen."""
    vs = ({"precision": "fp32", "step": "eager", "group": 1}, {"precision": "fp32", "step": "eager", "group": 3},
          {"precision": "bf16", "step": "graph", "group": 17})
    monkeypatch.setattr(probe, "check", lambda p, d, v: {"ok": v["group"] != 3, "gradients_rel": 0.0})
    shares = []
    monkeypatch.setattr(probe, "time_variant",
                        lambda p, d, v, seconds: shares.append(seconds) or {"images_per_s": float(v["group"])})
    on_cpu = probe.probe(p, CPU, 3600, vs)  # the GPU variant skipped: 2 share the time
    assert shares == [900.0, 900.0] and [r["ok"] for r in on_cpu] == [True, False, False]
    assert probe.choose(on_cpu)["group"] == 1  # 3 runs are faster, but failed the check
    shares.clear()
    on_gpu = probe.probe(p, "cuda", 3600, vs)  # stubbed: no GPU touched; there every variant runs
    assert shares == [600.0] * 3 and [r["ok"] for r in on_gpu] == [True, False, True]
    assert not any("skipped" in r for r in on_gpu) and probe.choose(on_gpu)["group"] == 17


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
