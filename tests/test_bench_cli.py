"""bench/cli.py: a benchmark's options come from its main()'s parameters."""
from __future__ import annotations

import json
import sys


def fake_main(n: int | None = None, loop_n: int = 3, seconds: float | None = None, groups: tuple[int, ...] = (3,),
              strategies: list[str] | None = None, quick: bool = False, device: str = "cpu") -> dict:
    return {"n": n, "loop_n": loop_n, "seconds": seconds, "groups": groups, "strategies": strategies,
            "quick": quick, "device": device}


def test_options_are_typed_from_the_annotations_and_the_result_is_written(tmp_path, monkeypatch):
    from bench import cli
    monkeypatch.setattr(sys, "argv", ["bench_fake", "--n", "5", "--loop-n", "7", "--seconds", "1.5", "--groups",
                                      "1,17", "--strategies", "S1,S3", "--quick", "--out", str(tmp_path / "r.json")])
    got = cli.run(fake_main, "doc")
    assert got == {"n": 5, "loop_n": 7, "seconds": 1.5, "groups": (1, 17), "strategies": ("S1", "S3"),
                   "quick": True, "device": "cpu"}
    assert json.loads((tmp_path / "r.json").read_text())["groups"] == [1, 17]
    monkeypatch.setattr(sys, "argv", ["bench_fake", "--out", str(tmp_path / "d.json")])
    assert cli.run(fake_main, "doc") == fake_main()  # no options: main's own defaults


def test_timed_records_a_successful_command_and_replaces_its_row(tmp_path):
    import os
    import subprocess

    env = dict(os.environ, TIMINGS=str(tmp_path / "t.md"))
    run = lambda name, *cmd: subprocess.run([sys.executable, "-m", "bench.timed", name, "--", *cmd], env=env).returncode
    assert run("make a", "true") == 0 and run("make b", "sleep", "0.1") == 0 and run("make a", "true") == 0
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[0] == "| command | wall minutes | CPU | date |" and len(lines) == 4
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| `make a`", "| `make b`"]
    assert run("make c", "false") == 1 and "make c" not in (tmp_path / "t.md").read_text()


def test_the_gpu_probe_report_runs_through_on_canned_results(tmp_path, monkeypatch, capsys):
    """bench_group's CUDA branch (choice, ratios, profile, printed table), its rows in bench/results.md
    and the README's speed block, rehearsed on the CPU with the probe's results canned: a device
    call must not be lost to a slip in the reporting."""
    import torch

    from bench import bench_group
    from iqals import probe

    check = {"ok": True, "logits_rel": 1e-3, "gradients_rel": 1e-2}
    timed = {"step_ms": 1.0, "epochs_timed": 1, "images_per_epoch": 5000, "warm_up_s": 1.0}
    results = [
        {**probe.VARIANTS[0], "ok": True, "check": check, "images_per_s": 20_000.0, **timed},
        {**probe.BASELINE, "ok": True, "check": check, "images_per_s": 180_000.0, **timed},
        {**probe.BASELINE, "layout": "batch", "cudnn_benchmark": True, "ok": True, "check": check,
         "images_per_s": 540_000.0, **timed},
        {**probe.BASELINE, "group": 17, "ok": False, "check": {**check, "ok": False},
         "images_per_s": 900_000.0, **timed},  # faster, but failed its check: never chosen
        {"precision": "tf32", "step": "compile", "group": 51, "ok": False, "skipped": "the probe's 1 s were used up"},
        {"precision": "tf32", "step": "eager", "group": 3, "ok": False, "error": "RuntimeError: no kernel"},
    ]
    monkeypatch.setattr(probe, "probe", lambda p, device, seconds: results)
    monkeypatch.setattr(probe, "profile", lambda p, device, v: f"profile of {probe.name(v)}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a test GPU")
    out = bench_group.main(device="cuda", seconds=1)
    assert out["chosen"] is results[2] and out["baseline"] is results[1] and out["chosen_vs_baseline"] == 3.0
    assert out["study_minutes_per_epoch"] == round(51 * 50_000 / 540_000 / 60, 3)
    assert results[1]["ratio_vs_fp32_eager_single"] == 9.0 and out["profile"].endswith("batch layout, cudnn benchmark")
    text = capsys.readouterr().out
    assert "a test GPU" in text and "FAILED" in text and "no kernel" in text and "used up" in text
    assert "fastest that passed (its train.* values for the train stage): bf16 graph x51, batch layout" in text
    from bench import run as bench_run
    assert bench_run._version("a_module_not_installed") == "not installed"  # a GPU node without DVC
    first = bench_run.rows("train_gpu", out)[0]  # results.md: the chosen step first, against gpu_e16's
    assert first[0] == "fastest step that passed: bf16 graph x51, batch layout, cudnn benchmark (a test GPU)"
    assert first[1:4] == ("540000 img/s", "180000 img/s (bf16 graph x51, channels: results/gpu_e16's step)", "3.0x")
    from iqals import readme
    (tmp_path / "bench").mkdir()
    entry = {"machine": {"date": "2026-12-07 01:00 UTC"}, "result": json.loads(json.dumps(out))}
    (tmp_path / "bench/results.json").write_text(json.dumps({"benchmarks": {"train_gpu": entry}}))
    row = readme.gpu_speed(tmp_path).splitlines()[2]
    assert row == ("| a test GPU, 2026-12-07 01:00 UTC | bf16 graph x51, batch layout, cudnn benchmark | 540,000 | "
                   "3.0x (180,000 images/s) |")

    def speed(result: dict) -> str:
        benchmarks = {"train_gpu": {**entry, "result": result}}
        (tmp_path / "bench/results.json").write_text(json.dumps({"benchmarks": benchmarks}))
        return readme.gpu_speed(tmp_path)

    # the baseline's timing lost to the budget: the chosen step still reported, its ratio said missing
    partial = {k: v for k, v in json.loads(json.dumps(out)).items() if k not in ("baseline", "chosen_vs_baseline")}
    assert speed(partial).splitlines()[2].endswith("| 540,000 | not timed in this call |")
    assert bench_run.rows("train_gpu", partial)[0][2:4] == (
        "not timed (bf16 graph x51, channels: results/gpu_e16's step)", "")
    assert speed({**partial, "chosen": None}).startswith("The GPU probe on a test GPU, 2026-12-07 01:00 UTC timed "
                                                         "no step variant that passed its check.")
    assert speed({"skipped": "no CUDA device"}).startswith("No GPU probe in `bench/results.json` yet")
    (tmp_path / "bench/results.json").write_text(json.dumps({"benchmarks": {}}))
    assert readme.gpu_speed(tmp_path).startswith("No GPU probe in `bench/results.json` yet")


def test_measures_scores_each_level_where_the_document_names_it(tmp_path, monkeypatch, tiny_cifar):
    """bench/measures.py, behind docs/quality_measures.md's numbers: each column is that level's
    distortion scored directly; targets through the named transform and the clip; the block lands
    between the markers and nowhere else."""
    import numpy as np
    import pytest

    from bench import measures
    from iqals import distort, iqa
    from iqals.data import load_npz
    from iqals.params import load

    monkeypatch.setenv("CIFAR10_LOCAL", str(tiny_cifar))
    r = measures.compute(8, float64=False, say=lambda m: None)
    p = load(measures.REPO_ROOT / "params.yaml")
    images = load_npz(tiny_cifar / "test.npz", "test")[0][:8]
    blur_2 = distort.blur(images, p.distort.blur_sigma[1], p.distort.blur_kernel, p.distort.blur_border)
    jpeg_3 = distort.jpeg(images, p.distort.jpeg_quality[2], p.distort.jpeg_subsampling, p.distort.jpeg_encoder)
    for col, d in ((1, blur_2), (8, jpeg_3)):
        np.testing.assert_array_equal(r["scores"]["ssim"][col], iqa.ssim(images, d, p.iqa))
        np.testing.assert_array_equal(r["scores"]["psnr"][col], iqa.METRICS["psnr"](images, d, p.iqa))
    np.testing.assert_array_equal(r["targets"]["gmsd"], np.clip(np.exp(-r["scores"]["gmsd"] / 0.1), 0.1, 1.0))
    text = measures.markdown(r)
    table = text.split("```")[1].splitlines()
    assert table[1].split() == ["blur_1", "blur_2", "blur_3", "noise_1", "noise_2", "noise_3", "jpeg_1", "jpeg_2",
                                "jpeg_3"]
    assert table[10].split()[0] == "psnr" and float(table[10].split()[2]) == round(r["scores"]["psnr"][1].mean(), 2)
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- measures:begin -->\nold\n<!-- measures:end -->\nrest\n")
    measures.write_block(text, doc)
    assert doc.read_text() == f"intro\n<!-- measures:begin -->\n{text}<!-- measures:end -->\nrest\n"
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="expected one <!-- measures:begin -->"):
        measures.write_block(text, doc)
    with pytest.raises(SystemExit, match="--n 51: expected 1 to 50"):
        measures.compute(51, float64=False)
