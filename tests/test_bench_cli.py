"""bench/: a benchmark's options from its main()'s parameters (cli.py), and the speed harness's arithmetic and
reports on stand-in timings: img/s, ratios, differences, results.md, the timings table."""
from __future__ import annotations

import json
import os
import sys

import numpy as np


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


def test_timed_records_a_successful_command_and_replaces_its_row(tmp_path, monkeypatch):
    """bench/timed.py, the README's timings block: wall minutes to one decimal from a stand-in clock, one row per
    command (a rerun replaces it, a name that extends another's does not), rows sorted; a failed command records
    nothing and its exit status is the tool's."""
    import datetime
    import subprocess
    import types

    import pytest

    from bench import timed

    out = tmp_path / "t.md"
    monkeypatch.setenv("TIMINGS", str(out))
    monkeypatch.setattr(timed, "cpu", lambda: "a CPU, 8 cores, no AVX-512")
    monkeypatch.setattr(timed, "datetime", types.SimpleNamespace(date=types.SimpleNamespace(
        today=lambda: datetime.date(2026, 12, 7))))
    readings = iter([0.0, 90.0, 100.0, 256.0, 10.0, 16.0, 0.0, 200.0, 0.0])  # each start and end, in s
    monkeypatch.setattr(timed, "time", types.SimpleNamespace(monotonic=lambda: next(readings)))

    def run(name, *cmd):
        monkeypatch.setattr(sys, "argv", ["timed", name, "--", *cmd])
        return timed.main()

    assert run("make test", "true") == 0 and run("make test-fast", "true") == 0 and run("make a", "true") == 0
    assert run("make test", "true") == 0  # rerun: 200 s
    row = "| `{}` | {} | a CPU, 8 cores, no AVX-512 | 2026-12-07 |"
    assert out.read_text().splitlines() == ["| command | wall minutes | CPU | date |", "|---|---|---|---|",
                                            row.format("make a", "0.1"), row.format("make test-fast", "2.6"),
                                            row.format("make test", "3.3")]
    before = out.read_text()
    assert run("make c", "false") == 1 and out.read_text() == before
    monkeypatch.setattr(sys, "argv", ["timed", "make d", "true"])
    with pytest.raises(SystemExit, match="Time one of the README's commands"):
        timed.main()
    env = dict(os.environ, TIMINGS=str(out))  # as run from the Makefile: the command's exit status passed on
    assert subprocess.run([sys.executable, "-m", "bench.timed", "make c", "--", "false"], env=env).returncode == 1
    assert out.read_text() == before


def test_timed_cpu_names_the_model_cores_and_avx512(tmp_path, monkeypatch):
    """The CPU column of the timings and of results.md's machines: /proc/cpuinfo's model name, and
    AVX-512 only where its flags list avx512f (avx512bw alone is not the foundation set)."""
    from bench import bench_train, timed

    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(timed, "Path", lambda _: info)
    monkeypatch.setattr(bench_train, "Path", lambda _: info)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    info.write_text("processor\t: 0\nmodel name\t: CPU model A\nflags\t\t: fpu avx2 avx512f avx512bw\n")
    assert timed.cpu() == "CPU model A, 8 cores, AVX-512"
    info.write_text("processor\t: 0\nmodel name\t: CPU model B\nflags\t\t: fpu avx2 avx512bw\n")
    assert timed.cpu() == "CPU model B, 8 cores, no AVX-512"


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
    # then every timed variant, a failed check marked, against the fp32 eager one-run step; untimed ones left out
    check_text = "logits 1.0e-03, grads 1.0e-02 rel"
    assert bench_run.rows("train_gpu", out)[1:] == [
        ("step fp32 eager x1 (a test GPU)", "20000 img/s, 1.000 ms/step", "fp32 eager, one run", "1.0x", check_text),
        ("step bf16 graph x51 (a test GPU)", "180000 img/s, 1.000 ms/step", "fp32 eager, one run", "9.0x", check_text),
        ("step bf16 graph x51, batch layout, cudnn benchmark (a test GPU)", "540000 img/s, 1.000 ms/step",
         "fp32 eager, one run", "27.0x", check_text),
        ("step bf16 graph x17 (a test GPU)", "900000 img/s, 1.000 ms/step", "fp32 eager, one run", "45.0x",
         check_text + " FAILED")]
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


# bench/run.py's results.md on canned results of every benchmark: two machines (the CPU one for all but
# train_gpu), entries given out of ALL's order, one failed benchmark (its last traceback line, a "|" in it)
# and one skipped
CPU_BOX = {"cpu": "CPU-A", "cpu_count": 4, "torch_threads": 2, "gpu": None, "os": "Linux-a", "python": "3.11.7",
           "torch": "2.14.1", "numpy": "2.4.6", "opencv": "5.0.0", "dvc": "3.67.1", "commit": "75d127c",
           "scikit-image": "0.26.0"}
GPU_BOX = {**{k: v for k, v in CPU_BOX.items() if k != "scikit-image"}, "cpu": "CPU-B", "cpu_count": 16,
           "torch_threads": 16, "gpu": "GPU-B", "os": "Linux-b", "dvc": "not installed",
           "commit": "none; sources sha256 0123456789abcdef"}
CANNED = {
    "parallel": {"strategies": ["S1", "S3"], "epochs": 10, "train_size": 2000, "device": "cpu", "parallel_s": 864.3,
                 "workers": 2, "threads_per_worker": 1, "sequential_s": 944.5, "sequential_torch_threads": 2,
                 "ratio": 1.09},
    "ssim": {"n": 2000, "us_per_image": {"skimage_loop": 263.81, "score_all": 28.224, "single_pair": 26.514},
             "speedup": {"score_all": 9.3, "single_pair": 10.0},
             "max_abs_diff_vs_skimage": {"score_all": 7.8e-14, "single_pair": 6.1e-14}},
    "distort": {"n": 5000, "types": {"blur": {"ours_s": 0.2671, "loop_s": 0.2824, "speedup": 1.06, "max_abs_diff": 0},
                                     "noise": {"ours_s": 1.1912, "loop_s": 0.9361, "speedup": 0.79},
                                     "jpeg": {"ours_s": 0.3914, "loop_s": 0.3982, "speedup": 1.02, "max_abs_diff": 1}}},
    "train_cpu": {"device": "cpu", "device_name": "CPU-A", "n": 2000,
                  "images_per_s": {"ours": 852.3, "ours_whole_call": 824.4, "reference": 426.1}, "ratio": 2.0,
                  "ratio_whole_call": 1.93, "max_abs_diff": {"logits": 1.3e-07, "gradients": 1.7e-08},
                  "epoch_s_at_50000": {"ours": 58.66, "reference": 117.34},
                  "paper_schedule_hours": {"ours": 1293.3, "reference": 2586.7}},
    "train_cuda": {"skipped": "no CUDA device; on a GPU run: python -m bench.run --only train_cuda"},
    "train_group": {"device": "cpu", "device_name": "CPU-A",
                    "images_per_s": {"old_net": 880.2, "net1": 878.4, "group1": 877.0, "group3": 704.3,
                                     "group17": 9000.0},
                    "ratio_vs_old_net": {"old_net": 1.0, "net1": 0.998, "group1": 0.996, "group3": 0.8,
                                         "group17": 10.225},
                    "ratio_vs_group1": {"group1": 1.0, "group3": 0.8, "group17": 10.26},
                    "checks": {"group1": {"gradients_rel": 0.0}, "group3": {"gradients_rel": 2.04e-06},
                               "group17": {"gradients_rel": 3e-06}}},
    "train_gpu": {"error": "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                           "RuntimeError: out of memory | 2 GiB\n"},
    "dvc": {"stages_in_full_run": 18, "noop_repro_s": 1.46, "stages_rerun_by_noop": 0, "full_repro_s": 55.53,
            "ratio_full_over_noop": 38.0},
}
RESULTS_MD_TABLE = """\
| benchmark | ours | reference | ratio | max abs diff |
|---|---|---|---|---|
| SSIM, score_all (2000 images x 9) | 28.22 µs/pair | 263.8 µs/pair (skimage loop) | 9.3x | 7.8e-14 |
| SSIM, one call per version | 26.51 µs/pair | 263.8 µs/pair (skimage loop) | 10.0x | 6.1e-14 |
| distort blur, 3 levels (5000 images) | 0.267 s | 0.282 s (per-image loop) | 1.06x | 0 |
| distort noise, 3 levels (5000 images) | 1.191 s | 0.936 s (per-image loop) | 0.79x | n/a (other random stream) |
| distort jpeg, 3 levels (5000 images) | 0.391 s | 0.398 s (per-image loop) | 1.02x | 1 |
| training step (cpu, CPU-A), 2000 img/epoch | 852 img/s | 426 img/s (DataLoader, stock layers) | 2.0x \
| logits 1.3e-07, grads 1.7e-08 |
| training, whole train() call (cpu) | 824 img/s | 426 img/s (DataLoader, stock layers) | 1.93x |  |
| paper schedule, 9 x 2000 epochs x 50k (cpu) | 1,293.3 h (58.66 s/epoch) | 2,586.7 h (117.34 s/epoch) | 2.0x |  |
| train_cuda | not run: no CUDA device; on a GPU run: python -m bench.run --only train_cuda |  |  |  |
| model.Net(1) in a plain loop, fp32 eager (cpu, CPU-A) | 878 img/s | 880 img/s (the old one-run Net) | 0.998x |  |
| 3 runs stepped together, fp32 eager (cpu, CPU-A) | 704 img/s (summed) | 877 img/s (one run) | 0.8x \
| grads 2.0e-06 rel |
| 17 runs stepped together, fp32 eager (cpu, CPU-A) | 9000 img/s (summed) | 877 img/s (one run) | 10.26x \
| grads 3.0e-06 rel |
| train_gpu | failed: RuntimeError: out of memory / 2 GiB |  |  |  |
| no-op dvc repro, finished tiny pipeline (18 stages) | 1.46 s, 0 stages rerun | 55.53 s (full repro) | 38.0x |  |
| training + evaluation stages (2 strategies x 10 epochs, 2000 images, cpu) | 864.3 s (2 Dask workers x 1 thread) \
| 944.5 s (dvc repro, 2 torch threads) | 1.09x |  |
"""


def canned_entries() -> dict:
    """CANNED as bench/results.json holds it: each with its machine, date, --quick and seconds."""
    day = {name: f"2026-12-0{i + 1} 06:0{i} UTC" for i, name in enumerate(CANNED)}
    return {name: {"machine": {**(GPU_BOX if name == "train_gpu" else CPU_BOX), "date": day[name]},
                   "quick": name == "train_gpu", "seconds": {"parallel": 1841.0, "train_gpu": 119.6}.get(name, 8.6),
                   "result": r} for name, r in CANNED.items()}


def test_results_md_has_each_benchmarks_rows_in_order_and_its_machines():
    """bench.run.write_md, the table README's speed section cites: every figure written out by hand from
    the canned results (units, rounding, which ratio and which difference in which row)."""
    from bench import run as bench_run

    text = bench_run.write_md(canned_entries())
    head, machines = text.split("\n\nMachines:\n\n")
    assert head.split("\n\n")[1] + "\n" == RESULTS_MD_TABLE
    assert machines == (
        "- ssim (2026-12-02 06:01 UTC, 9 s), distort (2026-12-03 06:02 UTC, 9 s), train_cpu (2026-12-04 06:03 UTC, 9 s"
        "), train_cuda (2026-12-05 06:04 UTC, 9 s), train_group (2026-12-06 06:05 UTC, 9 s), dvc (2026-12-08 06:07 "
        "UTC, 9 s), parallel (2026-12-01 06:00 UTC, 1841 s): CPU CPU-A, 4 cores (2 torch threads), no GPU; "
        "Linux-a; Python 3.11.7, torch 2.14.1, numpy 2.4.6, OpenCV 5.0.0, dvc 3.67.1, scikit-image 0.26.0; "
        "commit 75d127c\n"
        "- train_gpu (2026-12-07 06:06 UTC, 120 s, --quick): CPU CPU-B, 16 cores (16 torch threads), GPU GPU-B; "
        "Linux-b; Python 3.11.7, torch 2.14.1, numpy 2.4.6, OpenCV 5.0.0, dvc not installed; "
        "commit none; sources sha256 0123456789abcdef\n")


def _results_into(folder, monkeypatch) -> None:
    """bench.run's results.json, results.md and bench/out/ written under folder instead of the repository."""
    from bench import cli
    from bench import run as bench_run

    monkeypatch.setattr(bench_run, "REPO_ROOT", folder)
    monkeypatch.setattr(bench_run, "RESULTS_JSON", folder / "results.json")
    monkeypatch.setattr(bench_run, "RESULTS_MD", folder / "results.md")
    monkeypatch.setattr(cli, "OUT", folder / "out")


def test_bench_run_only_keeps_the_other_entries_and_records_a_failure(tmp_path, monkeypatch):
    """`python -m bench.run --only ...` on stand-in benchmarks: each called with cases()'s --quick
    arguments, its JSON at bench/out/<module>[_<device>].json; results.json keeps the entries not rerun,
    in ALL's order; a failing benchmark is recorded and reported, the others still run; a CUDA
    benchmark without a GPU is skipped without being called."""
    import itertools
    import types

    import pytest
    import torch

    from bench import run as bench_run

    old = canned_entries()
    (tmp_path / "results.json").write_text(json.dumps({"benchmarks": {"dvc": old["dvc"], "ssim": old["ssim"]}}))
    _results_into(tmp_path, monkeypatch)
    monkeypatch.setattr(bench_run, "machine", lambda: dict(GPU_BOX, date="then"))
    monkeypatch.setattr(bench_run, "_now", lambda: "now")
    clock = itertools.count(0.0, 2.0)  # each benchmark's start and end 2 s apart
    monkeypatch.setattr(bench_run, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    called = []

    def module(name):
        def main(**kwargs):
            called.append((name, kwargs))
            if name == "bench.bench_distort":
                raise ValueError("no images")
            return {"bench.bench_ssim": CANNED["ssim"], "bench.bench_group": CANNED["train_group"]}[name]
        return types.SimpleNamespace(main=main)

    monkeypatch.setattr(bench_run, "importlib", types.SimpleNamespace(import_module=module))
    with pytest.raises(SystemExit, match="^failed: distort$"):
        bench_run.main(["train_group", "distort", "train_cuda", "ssim"], quick=True)
    assert called == [("bench.bench_group", {"device": "cpu", "quick": True}), ("bench.bench_distort", {"n": 1000}),
                      ("bench.bench_ssim", {"n": 500, "loop_n": 100, "repeats": 2})]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench_group_cpu.json", "bench_ssim.json"]
    assert json.loads((tmp_path / "out/bench_ssim.json").read_text()) == CANNED["ssim"]
    got = json.loads((tmp_path / "results.json").read_text())["benchmarks"]
    assert list(got) == ["ssim", "distort", "train_cuda", "train_group", "dvc"]
    assert got["dvc"] == old["dvc"]  # not rerun: kept as it was
    for name in ("ssim", "distort", "train_cuda", "train_group"):
        entry = got[name]
        assert (entry["machine"], entry["quick"], entry["seconds"]) == (dict(GPU_BOX, date="now"), True, 2.0)
    assert got["ssim"]["result"] == CANNED["ssim"] and got["train_group"]["result"] == CANNED["train_group"]
    assert got["distort"]["result"]["error"].endswith("ValueError: no images\n")
    assert got["train_cuda"]["result"] == {"skipped": "no CUDA device; on a GPU run: python -m bench.run --only "
                                                      "train_cuda"}
    table = [line.split(" | ")[0] for line in (tmp_path / "results.md").read_text().splitlines()[6:12]]
    assert table == ["| SSIM, score_all (2000 images x 9)", "| SSIM, one call per version", "| distort",
                     "| train_cuda", "| model.Net(1) in a plain loop, fp32 eager (cpu, CPU-A)",
                     "| 3 runs stepped together, fp32 eager (cpu, CPU-A)"]
    with pytest.raises(ValueError, match="unknown benchmark 'ssm'"):
        bench_run.run_one("ssm", quick=True)


def test_bench_run_records_a_benchmark_that_exits(tmp_path, monkeypatch):
    """A benchmark that stops with SystemExit (bench_ssim: a local copy with fewer images than asked for) is
    recorded as failed like any other error, and the results of those before it are written."""
    import types

    import pytest

    from bench import run as bench_run

    _results_into(tmp_path, monkeypatch)
    monkeypatch.setattr(bench_run, "machine", lambda: dict(CPU_BOX, date="then"))

    def main(**kwargs):
        raise SystemExit("CIFAR10_LOCAL=/copy holds only 250 images, asked for 500")

    modules = {"bench.bench_distort": types.SimpleNamespace(main=lambda **kwargs: CANNED["distort"]),
               "bench.bench_ssim": types.SimpleNamespace(main=main)}
    monkeypatch.setattr(bench_run, "importlib", types.SimpleNamespace(import_module=modules.get))
    with pytest.raises(SystemExit, match="^failed: ssim$"):
        bench_run.main(["distort", "ssim"], quick=True)
    got = json.loads((tmp_path / "results.json").read_text())["benchmarks"]
    assert got["distort"]["result"] == CANNED["distort"]
    assert got["ssim"]["result"]["error"].endswith("SystemExit: CIFAR10_LOCAL=/copy holds only 250 images, asked for "
                                                   "500\n")


def test_bench_ssim_reports_microseconds_per_pair_and_speed_ups_from_its_timings(monkeypatch, params):
    """bench_ssim's arithmetic on stand-in timings (skimage loop, score_all, one call per version, score_all
    on one thread): µs per pair over 9 x loop_n pairs for the loop (loop_n capped at n) and 9 x n for ours,
    speed-up = loop's µs / ours; the largest difference from a stand-in skimage loop (our SSIM, two pairs
    moved by known amounts) over the loop's images only, for score_all and for the single-pair API (stood in
    for by our SSIM less 0.5 on the first image)."""
    from bench import bench_ssim
    from iqals import iqa

    def loop(ref, dists, p):
        assert ref.shape == (2, 32, 32, 3) and dists.shape == (9, 2, 32, 32, 3)  # the first loop_n images
        out = iqa.score_all(ref, dists, params.iqa)
        out[4, 1] += 0.25
        out[7, 0] -= 0.125
        return out

    monkeypatch.setattr(bench_ssim, "skimage_loop", loop)
    ssim = iqa.METRICS["ssim"]
    monkeypatch.setitem(iqa.METRICS, "ssim", lambda ref, d, cfg: ssim(ref, d, cfg) - 0.5 * (np.arange(len(ref)) == 0))
    seconds = iter([0.54, 0.027, 0.054, 0.108, 0.36, 0.018, 0.018, 0.018])
    monkeypatch.setattr(bench_ssim, "_best", lambda fn, repeats: (next(seconds), fn()))
    monkeypatch.delenv("CIFAR10_LOCAL", raising=False)
    r = bench_ssim.main(n=3, loop_n=2, repeats=1)
    assert (r["n"], r["loop_n"], r["source"]) == (3, 2, "synthetic")
    # the loop: 0.54 s over 9 x 2 pairs = 30,000 µs; ours 0.027 s (0.054, 0.108) over 9 x 3 pairs
    assert r["us_per_image"] == {"skimage_loop": 30000.0, "score_all": 1000.0, "single_pair": 2000.0,
                                 "score_all_1_thread": 4000.0}
    assert r["speedup"] == {"score_all": 30.0, "single_pair": 15.0, "score_all_1_thread": 7.5}
    # SSIM in [-1, 1]: score_all and iqa.ssim agree to float64 rounding (~1e-15); the stand-ins moved 0.125 to 0.5
    assert abs(r["max_abs_diff_vs_skimage"]["score_all"] - 0.25) < 1e-9
    assert abs(r["max_abs_diff_vs_skimage"]["single_pair"] - 0.5) < 1e-9
    monkeypatch.setattr(bench_ssim, "skimage_loop", lambda ref, dists, p: iqa.score_all(ref, dists, params.iqa))
    monkeypatch.setitem(iqa.METRICS, "ssim", ssim)
    r = bench_ssim.main(n=2, loop_n=5, repeats=1)  # a loop longer than the images: capped
    assert r["loop_n"] == 2 and r["us_per_image"]["skimage_loop"] == 20000.0 and r["speedup"]["score_all"] == 20.0


def test_bench_distort_sums_three_levels_and_their_differences(monkeypatch, params):
    """bench_distort's row of each type on stand-in timings and stand-in loops: seconds summed over the three
    levels, speed-up = loop / ours, images/s = 3 n / ours; the largest difference and the count of differing
    values over all three levels (the blur loop moved by 3 at one value of level 1, by 1 at two of level 2)."""
    from bench import bench_distort
    from iqals import distort

    d = params.distort

    def blur(images, sigma, rule, border):
        out = distort.blur(images, sigma, rule, border).astype(np.int16)
        level = list(d.blur_sigma).index(sigma)
        moved = {0: [(0, 3)], 1: [(5, 1), (9, -1)], 2: []}[level]
        for at, by in moved:  # away from the ends of uint8
            out.flat[at] += by if out.flat[at] < 128 else -by
        return out.astype(np.uint8)

    monkeypatch.setattr(bench_distort, "loop_blur", blur)
    monkeypatch.setattr(bench_distort, "loop_jpeg", lambda im, q, sub: distort.jpeg(im, q, sub))
    # (ours, loop) of each level in turn: blur, then noise, then jpeg
    seconds = iter([0.125, 0.25, 0.25, 0.5, 0.5, 1.0, 0.5, 0.25, 0.5, 0.25, 0.75, 0.5, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0])
    monkeypatch.setattr(bench_distort, "_timed", lambda fn: (next(seconds), fn()))
    monkeypatch.delenv("CIFAR10_LOCAL", raising=False)
    r = bench_distort.main(n=7)
    assert r["types"] == {
        "blur": {"ours_s": 0.875, "loop_s": 1.75, "speedup": 2.0, "images_per_s": 24, "outputs_comparable": True,
                 "max_abs_diff": 3, "n_values_differing": 3},
        "noise": {"ours_s": 1.75, "loop_s": 1.0, "speedup": 0.57, "images_per_s": 12, "outputs_comparable": False},
        "jpeg": {"ours_s": 4.0, "loop_s": 4.0, "speedup": 1.0, "images_per_s": 5, "outputs_comparable": True,
                 "max_abs_diff": 0, "n_values_differing": 0}}


def test_bench_train_reports_median_speeds_ratios_and_the_paper_schedule(monkeypatch):
    """bench_train's arithmetic on stand-in timings: the warm-up epoch of each side dropped, the median over
    the timed epochs, ratio = ours / reference, and the paper's schedule (9 strategies x 2000 epochs x 50,000
    images) and one 50,000-image epoch at those speeds."""
    import types

    import torch

    from bench import bench_train
    from iqals import train

    logged = iter([999.0, 400.0, 100.0, 200.0])  # images/s train() logs: warm-up, then 3 epochs
    monkeypatch.setattr(train, "train", lambda *args: [{"images_per_s": next(logged)}])
    monkeypatch.setattr(torch.utils.data, "DataLoader", lambda *args, **kwargs: [])  # the reference: timed only
    diff = {"logits": 1e-7, "gradients": 2e-8, "gradients_relative": 3e-6}
    monkeypatch.setattr(bench_train, "_equivalence", lambda p, data, dev: diff)
    monkeypatch.setattr(bench_train, "_sgd", lambda net, decayed, p: None)
    # the clock's readings around each epoch, ours (whole call) then the reference's, warm-up first
    durations = [1.0, 1.0, 0.125, 0.25, 0.5, 0.5, 0.25, 0.0625]
    readings = iter([t for d in durations for t in (0.0, d)])
    monkeypatch.setattr(bench_train, "time", types.SimpleNamespace(perf_counter=lambda: next(readings)))
    r = bench_train.main(device="cpu", n=20, epochs=3)
    assert r["images_per_s_all"] == {"ours": [400.0, 100.0, 200.0], "ours_whole_call": [160.0, 40.0, 80.0],
                                     "reference": [80.0, 40.0, 320.0]}
    assert r["images_per_s"] == {"ours": 200.0, "ours_whole_call": 80.0, "reference": 80.0}
    assert (r["ratio"], r["ratio_whole_call"]) == (2.5, 1.0)
    assert r["epoch_s_at_50000"] == {"ours": 250.0, "reference": 625.0}
    # 9 x 2000 x 50,000 = 9e8 images: at 200 img/s 1,250 h, at 80 img/s 3,125 h
    assert r["paper_schedule_hours"] == {"ours": 1250.0, "reference": 3125.0}
    assert (r["n"], r["timed_epochs"], r["strategy"], r["max_abs_diff"]) == (20, 3, "S3", diff)


def test_bench_group_cpu_reports_median_speeds_and_ratios(monkeypatch):
    """bench_group on the CPU with stand-in timings: the old Net, model.Net(1) and the steps of 1 and 3 runs
    interleaved over the rounds, the median of each, ratios to the old Net and to the one-run step (the rows
    of results.md); --quick: two rounds of 1 s."""
    from bench import bench_group
    from iqals import model, probe, train

    speeds = {"old_net": [800.0, 1000.0, 900.0], "net1": [1000.0, 700.0, 990.0], 1: [500.0, 900.0, 600.0],
              3: [1500.0, 1200.0, 1800.0]}
    taken, seconds = {k: 0 for k in speeds}, set()

    def next_speed(key, s):
        seconds.add(s)
        taken[key] += 1
        return speeds[key][(taken[key] - 1) % 3]

    class Net:  # stand-ins for the two networks: only timed here
        def __init__(self, *args):
            pass

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    class OldNet(Net):
        pass

    monkeypatch.setattr(model, "build", lambda m, seed: Net())
    monkeypatch.setattr(bench_group, "OldNet", OldNet)
    monkeypatch.setattr(train, "synthetic", lambda runs, n, device, seed: ([None], [None], [None]))
    monkeypatch.setattr(bench_group, "_plain_loop", lambda net, p, data, copy, image, s: next_speed(
        "old_net" if isinstance(net, OldNet) else "net1", s))
    monkeypatch.setattr(probe, "time_variant", lambda p, device, v, s: {"images_per_s": next_speed(v["group"], s)})
    monkeypatch.setattr(probe, "check", lambda p, device, v: {"gradients_rel": v["group"] * 1e-7})
    r = bench_group.main(device="cpu", seconds=0.5, groups=(3,), rounds=3)
    assert r["images_per_s_all"] == {k if k in ("old_net", "net1") else f"group{k}": v for k, v in speeds.items()}
    assert r["images_per_s"] == {"old_net": 900.0, "net1": 990.0, "group1": 600.0, "group3": 1500.0}
    assert r["ratio_vs_old_net"] == {"old_net": 1.0, "net1": 1.1, "group1": 0.667, "group3": 1.667}
    assert r["ratio_vs_group1"] == {"group1": 1.0, "group3": 2.5}
    assert r["checks"] == {"group1": {"gradients_rel": 1e-7}, "group3": {"gradients_rel": 3e-7}} and seconds == {0.5}
    seconds.clear()
    r = bench_group.main(device="cpu", groups=(3,), quick=True)
    assert all(len(v) == 2 for v in r["images_per_s_all"].values()) and seconds == {1}


def test_bench_parallel_copy_keeps_the_decay_fraction_and_the_named_strategies(tmp_path, monkeypatch, raw_params):
    """bench_parallel's pipeline copy: fewer epochs keep lr decay at the same fraction of the schedule
    (params.yaml: 8 of 10, so 7 epochs decay at round(5.6) = 6), the device and training images as given, and
    --strategies reduce params.yaml's strategies, report.fig4_strategies and dvc.yaml's stage lists alike."""
    import pytest
    import yaml

    from bench import bench_parallel

    def copy_repo(dest, root):
        dest.mkdir()
        for name in ("params.yaml", "dvc.yaml"):
            (dest / name).write_text((root / name).read_text())

    monkeypatch.setattr(bench_parallel, "copy_repo", copy_repo)
    assert (raw_params["train"]["epochs"], raw_params["train"]["lr_decay_epochs"]) == (10, 8)
    names = bench_parallel.make_copy(tmp_path / "a", 7, ["S9", "S3", "R3"], "cuda", train_size=300)
    assert names == ["S3", "S9", "R3"]  # in params.yaml's order
    raw = yaml.safe_load((tmp_path / "a/params.yaml").read_text())
    assert (raw["train"]["epochs"], raw["train"]["lr_decay_epochs"], raw["train"]["device"]) == (7, 6, "cuda")
    assert raw["base"]["train_size"] == 300 and raw["report"]["fig4_strategies"] == ["S3"]
    assert {k: v for k, v in raw.items() if k not in ("train", "base", "strategies", "report")} == \
        {k: v for k, v in raw_params.items() if k not in ("train", "base", "strategies", "report")}
    assert list(raw["strategies"]) == names and all(raw["strategies"][s] == raw_params["strategies"][s] for s in names)
    assert yaml.safe_load((tmp_path / "a/dvc.yaml").read_text())["vars"] == [{"onehot": []},
                                                                              {"scored": ["S3", "S9", "R3"]}]
    bench_parallel.make_copy(tmp_path / "b", 1, ["S4"], "cpu")  # decay at least at epoch 1; none of fig4's kept
    raw = yaml.safe_load((tmp_path / "b/params.yaml").read_text())
    assert (raw["train"]["epochs"], raw["train"]["lr_decay_epochs"]) == (1, 1)
    assert raw["report"]["fig4_strategies"] == ["S4"] and raw["base"] == raw_params["base"]
    assert yaml.safe_load((tmp_path / "b/dvc.yaml").read_text())["vars"] == [{"onehot": ["S4"]}, {"scored": []}]
    with pytest.raises(ValueError, match=r"\['S10'\] not in params.yaml strategies"):
        bench_parallel.make_copy(tmp_path / "c", None, ["S1", "S10"], "cpu")


def test_bench_parallel_and_dvc_report_their_ratios_from_stand_in_runs(tmp_path, monkeypatch, tiny_cifar):
    """bench_parallel and bench_dvc with their commands stood in for (outputs canned, a stand-in clock):
    ratio = sequential / parallel wall time, and full repro / the median no-op repro; the stages each run
    counted from its output; a `dvc status` that is not clean, or a no-op repro that runs a stage, fails."""
    import types

    import pytest

    from bench import bench_dvc, bench_parallel

    def sh(cmd, cwd, env, timeout=None):
        text = " ".join(map(str, cmd))
        if "stages.parallel" in text:
            return "S1 start  \nS1 done\nS3 start  \nevaluate@S1 start  \n"
        if "repro evaluate@" in text:
            return "Running stage 'train@S1':\nRunning stage 'evaluate@S1':\n"
        if text.endswith(" repro"):  # bench_dvc: the full run, then the no-op ones
            return next(repros)
        return status if " status" in text else ""

    def make_copy(dest, epochs, strategies, device, train_size=None):
        dest.mkdir(parents=True)
        return ["S1", "S3"]

    clock = iter([0.0, 30.0, 100.0, 190.0, 200.0, 260.0])  # set-up 30 s, sequential 90 s, parallel 60 s
    monkeypatch.setenv("CIFAR10_LOCAL", str(tiny_cifar))
    monkeypatch.setattr(bench_parallel, "make_copy", make_copy)
    monkeypatch.setattr(bench_parallel, "sh", sh)
    monkeypatch.setattr(bench_parallel, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    status = "Data and pipelines are up to date.\n"
    r = bench_parallel.main(workers=3, threads=2, epochs=4)
    assert (r["setup_s"], r["sequential_s"], r["parallel_s"], r["ratio"]) == (30.0, 90.0, 60.0, 1.5)
    assert r["stages_run"] == {"sequential": 2, "parallel": 3} and r["test_images"] == 50
    assert (r["strategies"], r["epochs"], r["workers"], r["threads_per_worker"]) == (["S1", "S3"], 4, 3, 2)
    assert r["status_clean"] == {"sequential": True, "parallel": True}

    monkeypatch.setattr(bench_dvc, "make_project", lambda dest, root: dest.mkdir(parents=True) or {})
    monkeypatch.setattr(bench_dvc, "tiny_cifar", lambda directory: directory)
    monkeypatch.setattr(bench_dvc, "sh", sh)
    full = "".join(f"Running stage 's{i}':\n" for i in range(18))
    repros = iter([full, "Stage 'a' didn't change\n", "", "nothing\n"])
    clock = iter([0.0, 40.0, 0.0, 2.0, 0.0, 0.5, 0.0, 1.0, 0.0, 0.25])  # full 40 s; no-op 2, 0.5, 1 s; status
    monkeypatch.setattr(bench_dvc, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    r = bench_dvc.main(repeats=3)
    assert (r["full_repro_s"], r["noop_repro_s"], r["noop_repro_s_all"], r["ratio_full_over_noop"]) == \
        (40.0, 1.0, [2.0, 0.5, 1.0], 40.0)
    assert (r["stages_in_full_run"], r["stages_rerun_by_noop"], r["dvc_status_s"], r["status_up_to_date"]) == \
        (18, 0, 0.25, True)
    repros = iter([full, "", "Running stage 's3':\n", ""])
    clock = iter([0.0, 1.0] * 5)
    with pytest.raises(AssertionError, match="a no-op dvc repro ran stages"):
        bench_dvc.main(repeats=3)
    status, clock = "train@S1: changed outs\n", iter([0.0, 1.0] * 3)
    with pytest.raises(AssertionError, match="changed outs"):
        bench_parallel.main()


def test_measures_summary_lines_on_canned_scores(monkeypatch):
    """bench/measures.py's bullet lines of docs/quality_measures.md on canned scores whose every figure
    is known by hand: SSIM = 1 - GMSD, FSIM = SSIM^3, VIF = SSIM^8, PSNR = 40 SSIM (so each Spearman
    correlation is exactly +-1), GMSD's pairs placed between the exp_decay floors (exp(-g / scale) < 0.1
    where g > scale ln 10: 0.345, 0.230, 0.184 and 0.115 for the four scales) and its 99th percentile 0.83 of
    the way from 0.4 to 0.5 (numpy's linear interpolation at 0.99 x 17)."""
    from bench import measures

    g = np.array([0.05] * 9 + [0.15] * 3 + [0.2] * 2 + [0.3] * 2 + [0.4, 0.5]).reshape(9, 2)
    ssim = 1 - g
    s = {"gmsd": g, "ssim": ssim, "fsim": ssim ** 3, "vif": ssim ** 8, "psnr": 40 * ssim}
    t = {m: np.full((9, 2), v) for m, v in zip(("ssim", "fsim", "gmsd", "psnr", "vif"), (0.5, 0.6, 0.7, 0.8, 0.9))}
    vif64 = s["vif"].copy()
    vif64[3, 1] += 3.6e-5
    r = {"n": 2, "clip": (0.1, 1.0), "scores": s, "targets": t, "vif_enlarged": {"bicubic": ssim, "reflect": ssim},
         "float64": {"gmsd": g - 1e-7, "fsim": s["fsim"] + 2e-6, "vif": vif64},
         "seconds": {"gmsd": 2.0, "fsim": 4.0, "vif": 10.0, "ssim": 1.0, "psnr": 1.0},
         "seconds64": {"gmsd": 5.0, "fsim": 6.0, "vif": 35.0}}
    matched = []
    monkeypatch.setattr(measures, "gmsd_scale_matching", lambda x, mean, clip: matched.append((x, mean, clip)) or 0.25)
    monkeypatch.setattr(measures, "cpu", lambda: "a CPU")
    text = measures.markdown(r)
    assert len(matched) == 1 and matched[0][0] is g and matched[0][1:] == (0.5, (0.1, 1.0))
    bullets = " ".join(line.strip() for line in text.split("```")[2].strip().splitlines()).split("- ")[1:]
    assert bullets == [
        "Mean target over the nine levels: ssim 0.500, fsim 0.600, gmsd 0.700, psnr 0.800, vif 0.900. ",
        "Range over all pairs: gmsd 0.050 to 0.500, fsim 0.125 to 0.857, vif 0.004 to 0.663, ssim 0.500 to 0.950, "
        "psnr 20.0 to 38.0. ",
        "Spearman correlation with SSIM over all pairs: vif 1.00, fsim 1.00, gmsd -1.00, psnr 1.00. ",
        "GMSD: 99th percentile 0.483 (/ ln 10 = 0.210); targets at the 0.1 floor with exp_decay scale 0.15: "
        "11.11 %, 0.1: 22.22 %, 0.08: 33.33 %, 0.05: 50.00 %; scale 0.250 gives SSIM's mean target 0.500. ",
        "VIF: 22.22 % of the targets under the 0.1 floor. ",  # 4 of 18: 0.7^8 (twice), 0.6^8 and 0.5^8
        # VIF's one moved pair: mean 3.6e-5 / 18, 99th percentile 0.83 of the way from 0 to it (numpy's linear)
        "piq in float32 against float64, largest difference: gmsd 1.0e-07, fsim 2.0e-06, vif 3.6e-05 (mean 2e-06, "
        "99th percentile 3.0e-05); float64 took 2.5x the time (gmsd), 1.5x the time (fsim), 3.5x the time (vif) "
        "(18 pairs, one process, a CPU)."]
    assert all(len(line) <= 99 for line in text.split("```")[2].splitlines())


def test_gmsd_scale_matching_finds_the_scale_of_a_mean_target():
    """The exp_decay scale whose clipped targets have a given mean, against closed forms: equal GMSD g gives
    exp(-g / scale) = mean, scale = g / ln(1 / mean); with one pair at 0 (target clipped to 1) and one at 1,
    the other target must be 2 mean - 1."""
    import math

    from bench import measures

    assert math.isclose(measures.gmsd_scale_matching(np.full(4, 0.2), 0.5, (0.1, 1.0)), 0.2 / math.log(2),
                        rel_tol=1e-9)
    assert math.isclose(measures.gmsd_scale_matching(np.array([0.0, 1.0]), 0.6, (0.1, 1.0)), 1 / math.log(5),
                        rel_tol=1e-9)


def test_results_machine_names_the_commit_its_changes_or_the_sources_hash(monkeypatch):
    """results.md's machine line says which code was measured: git's short commit, '+changes' when tracked
    files differ from it, and on a copy without git (a GPU node) the sources' sha256 as offline.study has it."""
    import subprocess
    import types

    import torch

    from bench import run as bench_run
    from offline import study

    answers = {}

    def git(cmd, **kwargs):
        if isinstance(answers.get("error"), Exception):
            raise answers["error"]
        return types.SimpleNamespace(stdout=answers["rev-parse" if "rev-parse" in cmd else "status"])

    monkeypatch.setattr(subprocess, "run", git)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(study, "code_sha256", lambda root: "0123456789abcdef" + "9" * 48)
    for rev, status, error, commit in (("75d127c\n", "", None, "75d127c"),
                                       ("75d127c\n", " M iqals/iqa.py\n", None, "75d127c+changes"),
                                       ("", "", None, "none; sources sha256 0123456789abcdef"),  # not a repository
                                       ("", "", FileNotFoundError("git"), "none; sources sha256 0123456789abcdef")):
        answers.update({"rev-parse": rev, "status": status, "error": error})
        info = bench_run.machine()
        assert info["commit"] == commit and info["gpu"] is None
