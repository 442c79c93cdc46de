"""The GPU study rehearsed on the CPU: the same command (python -m offline.study) on a clean
copy of the repository, tiny profile, the data sent in parts, without dvc and piq (the GPU
machine has neither); then its archives unpacked into results/ and the report regenerated."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from offline import pack
from offline import results as gpu_results
from offline import study as gpu_study
from test_pipeline import COPY, copy_repo

ONEHOT, SCORED = ["S1", "S2"], ["S3"]
SEEDS = [0, 1]


def clean_copy(dest: Path, repo_root: Path) -> None:
    """The repository as it travels, shrunk to the tiny data (as tests/test_pipeline.py does)."""
    copy_repo(dest, repo_root, COPY + ["offline"])
    raw = yaml.safe_load((dest / "params.yaml").read_text())
    raw["train"].update(batch_size=50)
    raw["strategies"] = {k: v for k, v in raw["strategies"].items() if k in ONEHOT + SCORED}
    raw["report"].update(fig4_examples=[0, 1], fig4_strategies=["S1", "S2", "S3"])
    raw["corrupt"].update(families=["contrast"], severities=[1, 5])
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    text = (dest / "dvc.yaml").read_text()
    text = text.replace("  - onehot: [S1, S2, S4, S6, S8]", f"  - onehot: [{', '.join(ONEHOT)}]")
    text = text.replace("  - scored: [S3, S5, S7, S9, U3, U5, U7, U9, R3, R5, R7, R9]",
                        f"  - scored: [{', '.join(SCORED)}]")
    assert yaml.safe_load(text)["vars"] == [{"onehot": ONEHOT}, {"scored": SCORED}]
    (dest / "dvc.yaml").write_text(text)
    cfg = yaml.safe_load((dest / "offline/config.yaml").read_text())
    cfg.update(common={"base.train_size": 100, "train.seeds": SEEDS},
               converged={"train.epochs": 1, "train.lr_decay_epochs": 1},
               long={"epochs": [3, 2], "decay_ratio": 0.5}, probe_seconds=0.5, margin_seconds=5)
    (dest / "offline/config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def device_env(dest: Path, tmp: Path) -> dict:
    """PYTHONPATH as on the GPU machine: the copy, and no dvc or piq (blocked on purpose)."""
    block = tmp / "absent"
    for name in ("dvc", "piq"):
        (block / name).mkdir(parents=True, exist_ok=True)
        (block / name / "__init__.py").write_text(f"raise ImportError('{name} is absent on the GPU machine')\n")
    return dict(os.environ, PYTHONPATH=f"{block}{os.pathsep}{dest}", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, repo_root, tiny_cifar):
    tmp = tmp_path_factory.mktemp("rehearsal")
    dest = tmp / "repo"
    clean_copy(dest, repo_root)
    m = pack.pack(tiny_cifar, dest / "transfer" / "cifar10", max_part_bytes=250_000)
    assert len(m["parts"]) == 2  # sent in two parts, as the training set is
    env = device_env(dest, tmp)
    for name in ("dvc", "piq"):
        r = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert r.returncode != 0 and "absent on the GPU machine" in r.stderr
    out = tmp / "OUT"
    r = subprocess.run([sys.executable, "-m", "offline.study", "--parts", "transfer/cifar10", "--out",
                        str(out), "--budget-s", "600", "--work", str(tmp / "work")],
                       cwd=dest, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:] + (
        (out / "stages.log").read_text()[-4000:] if (out / "stages.log").exists() else "")
    return tmp, dest, out, r.stdout + r.stderr


@pytest.mark.slow
def test_the_command_returns_one_archive_per_profile(rehearsal):
    tmp, dest, out, log = rehearsal
    names = sorted(p.name for p in out.iterdir())
    # converged (1 epoch), then the longest of [3, 2] that fits a generous budget
    assert names == ["gpu_e1.tar", "gpu_e3.tar", "probe.json", "stages.log", "study.log"]
    assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())
    assert "projected seconds per schedule" in (out / "study.log").read_text()
    probe = json.loads((out / "probe.json").read_text())
    assert probe["chosen"] and probe["results"]
    with tarfile.open(out / "gpu_e3.tar") as tar:
        members = set(tar.getnames())
        run = json.loads(tar.extractfile("run.json").read())
        params = yaml.safe_load(tar.extractfile("params.yaml").read())
    assert run["status"] == "complete" and run["epochs"] == 3 and run["seeds"] == SEEDS
    assert run["code"] == {"source_sha256": gpu_study.code_version(dest)["source_sha256"], "commit": None,
                           "uncommitted_changes": None}  # the copy is no git checkout, as on the device
    assert params["train"]["epochs"] == 3 and params["train"]["lr_decay_epochs"] == 2  # 0.5 x 3, half up
    assert params["train"]["precision"] == probe["chosen"]["precision"]
    want = {"params.yaml", "run.json", "probe.json", "study.log", "metrics/score.json", "plots/report.md",
            "plots/fig3.png"}
    want |= {f"logs/{s}/seed{k}.tsv" for s in ONEHOT + SCORED for k in SEEDS}
    want |= {f"metrics/{s}.json" for s in ONEHOT + SCORED} | {f"predictions/{s}.npz.xz" for s in ONEHOT + SCORED}
    assert want <= members
    assert not any(m.endswith(".pt") for m in members)  # no models
    stages = [s["stage"] for s in run["stages"]]
    assert stages == ["train", "evaluate", "report"]  # the data stages ran once, in gpu_e1
    assert all(c["rc"] == 0 for s in run["stages"] for c in s["calls"])


@pytest.mark.slow
def test_results_layout_metrics_and_regenerated_report(rehearsal, tiny_cifar):
    tmp, dest, out, _ = rehearsal
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True)
    got = gpu_results.unpack_all(out, dest / "results", dest / "dvc.yaml", root=dest)
    assert sorted(got) == ["gpu_e1", "gpu_e3"]
    for name in got:  # each profile keeps the call's whole log, the choice of the longer schedule included
        assert (dest / "results" / name / "study.log").read_text() == (out / "study.log").read_text()
    assert "projected seconds per schedule" in (out / "study.log").read_text()
    r1 = dest / "results" / "gpu_e1"
    assert yaml.safe_load((r1 / "params.yaml").read_text())["train"]["epochs"] == 1
    assert len((r1 / "logs" / "S3" / "seed1.tsv").read_text().splitlines()) == 2  # header + 1 epoch
    with np.load(r1 / "predictions" / "S3.npz") as z:
        assert z["probs"].dtype == np.float16 and z["pred"].shape == (len(SEEDS), 10, 50)
        assert np.array_equal(z["probs"].argmax(-1), z["pred"])
    # dvc metrics show reads the results (DVC runs here, on the CPU side)
    shown = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], cwd=dest,
                           capture_output=True, text=True, check=True).stdout
    assert "results/gpu_e3/metrics/S3.json" in shown and "results/gpu_e1/metrics/S1.json" in shown
    # the report regenerates on the CPU from the brought-back results alone
    checks = gpu_results.regenerate_report(r1, tmp / "regen", tmp / "regen_plots", cifar=tiny_cifar, repo=dest)
    assert checks and all(checks.values())  # the report's other inputs equal the run's
    assert {"data/scores/train.npy", "metrics/score.json"} <= set(checks)  # bytes, and the per-level summaries
    for f in ("table2.csv", "controls.csv", "unseen.csv"):  # from metrics: identical
        assert (tmp / "regen_plots" / f).read_text() == (r1 / "plots" / f).read_text(), f
    a = pd.read_csv(tmp / "regen_plots" / "calibration.csv")  # from float16 probabilities: close
    b = pd.read_csv(r1 / "plots" / "calibration.csv")
    assert np.allclose(a.select_dtypes("number"), b.select_dtypes("number"), atol=0.02)
    assert pd.read_csv(tmp / "regen_plots" / "comparisons.csv").equals(pd.read_csv(r1 / "plots" / "comparisons.csv"))
    run_md = (r1 / "RUN.md").read_text()  # the run's summary, written beside the results
    for row in ("| smoke checks and timing probe |", "| train |", "| evaluate |", "| report |", "| status | complete |",
                "| code | sources sha256 "):
        assert row in run_md, row
    # a run cut short: a strategy without results is left out of the regenerated report, and named
    cut = tmp / "cut"
    shutil.copytree(r1, cut)
    (cut / "metrics" / "S3.json").unlink()
    (cut / "predictions" / "S3.npz").unlink()
    gpu_results.regenerate_report(cut, tmp / "regen_cut", cifar=tiny_cifar, repo=dest)
    md = (cut / "plots" / "report.md").read_text()
    assert "**Not evaluated:** S3" in md and "| S3 |" not in md and "| S2 |" in md
    assert "not evaluated: S3" in (cut / "RUN.md").read_text()


@pytest.mark.slow
def test_one_profile_of_some_strategies_and_seeds(rehearsal):
    """--epochs/--seeds/--strategies: that profile alone, reusing the reassembled data and the probe."""
    tmp, dest, _, _ = rehearsal
    out = tmp / "OUT_one"
    r = subprocess.run([sys.executable, "-m", "offline.study", "--out", str(out), "--budget-s", "600",
                        "--work", str(tmp / "work"), "--epochs", "2", "--seeds", "1", "--strategies", "S3,S1,S2"],
                       cwd=dest, env=device_env(dest, tmp), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_e2.tar", "probe.json", "stages.log", "study.log"]
    assert "variant from the earlier probe" in (out / "study.log").read_text()
    with tarfile.open(out / "gpu_e2.tar") as tar:
        members = set(tar.getnames())
        run = json.loads(tar.extractfile("run.json").read())
        params = yaml.safe_load(tar.extractfile("params.yaml").read())
    assert run["status"] == "complete" and run["seeds"] == [1] and run["strategies"] == ["S1", "S2", "S3"]
    assert params["train"]["epochs"] == 2 and params["train"]["lr_decay_epochs"] == 1  # 0.5 x 2
    assert list(params["strategies"]) == ["S1", "S2", "S3"]  # params.yaml's order
    assert {m for m in members if m.startswith(("metrics/S", "logs/"))} == {
        f"{d}/{s}{f}" for s in ("S1", "S2", "S3") for d, f in (("metrics", ".json"), ("logs", "/seed1.tsv"))}
    assert [s["stage"] for s in run["stages"]][-3:] == ["train", "evaluate", "report"]


@pytest.mark.slow
def test_a_missing_part_stops_the_command_at_once(tmp_path, repo_root, tiny_cifar):
    dest = tmp_path / "repo"
    clean_copy(dest, repo_root)
    pack.pack(tiny_cifar, dest / "transfer" / "cifar10", max_part_bytes=250_000)
    shutil.rmtree(dest / "transfer" / "cifar10" / "part2")
    r = subprocess.run([sys.executable, "-m", "offline.study", "--parts", "transfer/cifar10", "--out",
                        str(tmp_path / "OUT"), "--budget-s", "60", "--work", str(tmp_path / "work")],
                       cwd=dest, env=device_env(dest, tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "part 2 of 2" in r.stderr and "is missing" in r.stderr
    assert "probe" not in (tmp_path / "OUT" / "study.log").read_text()  # before any long work
