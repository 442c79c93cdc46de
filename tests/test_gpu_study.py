"""The GPU study's pieces (offline/study.py, offline/results.py) without running it; the
whole command is rehearsed on the CPU in tests/test_gpu_rehearsal.py."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from offline import results as gpu_results
from offline import study as gpu_study
from iqals.params import ParamError


@pytest.fixture(scope="module")
def dvc_yaml(repo_root):
    return yaml.safe_load((repo_root / "dvc.yaml").read_text())


@pytest.fixture(scope="module")
def cfg(repo_root):
    return gpu_study.load_config(repo_root / "offline/config.yaml")


def dry_run(dest, env) -> list[tuple[str, str]]:
    """(stage, command) of every stage, in the order `dvc repro --dry --force` prints them."""
    out = subprocess.run([sys.executable, "-m", "dvc", "repro", "--dry", "--force"], cwd=dest, env=env,
                         capture_output=True, text=True, check=True).stdout
    return re.findall(r"Running stage '([^']+)':\n> (.+)", out)


def test_plan_is_what_dvc_repro_runs(tmp_path, repo_root, raw_params, cfg):
    """Every command and its place, from DVC itself, for several seeds and both training groups."""
    from test_pipeline import make_project
    env = make_project(tmp_path, repo_root)
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["train"]["seeds"] = [0, 3]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, env=env, check=True)
    want = [(n, c) for n, c in dry_run(tmp_path, env) if n not in cfg.cpu_only]
    got = gpu_study.plan(yaml.safe_load((tmp_path / "dvc.yaml").read_text()), raw, cfg.stage_order, cfg.cpu_only)
    assert [(n, c) for n, _, c in got] == want
    assert ("train_onehot@S1", "python -m stages.train --strategy S1") in want
    runs = [r for _, _, c in got for r in gpu_study.train_runs(c, raw["train"]["seeds"])]
    assert gpu_study.Run("S1", 3, None) in runs  # every seed of the stage, seed 3 included


def test_plan_leaves_out_the_strategies_params_leave_out(dvc_yaml, raw_params, cfg):
    full = gpu_study.plan(dvc_yaml, raw_params, cfg.stage_order, cfg.cpu_only)
    sub = gpu_study.with_overrides(raw_params, gpu_study.one_profile(cfg, raw_params, strategies=["S3", "S2", "S1"]))
    steps = gpu_study.plan(dvc_yaml, sub, cfg.stage_order, cfg.cpu_only)
    strategies = {gpu_study._strategy_of(c) for _, _, c in steps} - {None}
    assert strategies == {"S1", "S2", "S3"} and len(full) > len(steps)
    assert sum(1 for _, s, _ in steps if s == "train_onehot") == 2  # S1, S2: their seeds inside
    assert [c for _, s, c in steps if s == "train_scored"] == ["python -m stages.train --strategy S3 --scores data/scores"]
    assert [x for x in full if gpu_study._strategy_of(x[2]) is None] == [
        x for x in steps if gpu_study._strategy_of(x[2]) is None]  # data stages and report unchanged


def test_one_profile_overrides(cfg, raw_params):
    assert gpu_study.one_profile(cfg, raw_params) == cfg.converged
    o = gpu_study.one_profile(cfg, raw_params, epochs=60, seeds=[0], strategies=["S9", "S3", "S1", "S2"])
    assert o["train.epochs"] == 60 and o["train.lr_decay_epochs"] == 11  # 0.175 x 60 = 10.5, half up
    assert o["train.seeds"] == [0] and list(o["strategies"]) == ["S1", "S2", "S3", "S9"]
    assert o["strategies"]["S9"] == raw_params["strategies"]["S9"]
    for bad in (["S1", "S10"], []):
        with pytest.raises(gpu_study.StudyError, match="--strategies.*expected some of S1, S2"):
            gpu_study.one_profile(cfg, raw_params, strategies=bad)
    fig4 = raw_params["report"]["fig4_strategies"]
    with pytest.raises(gpu_study.StudyError, match=f"Figure 4 .* needs {fig4[-1]}"):
        gpu_study.one_profile(cfg, raw_params, strategies=fig4[:-1])


def test_probe_key_follows_the_step_sources_torch_and_device(tmp_path, monkeypatch):
    key = gpu_study.probe_key("2.11.0", "NVIDIA H100")
    assert key == gpu_study.probe_key("2.11.0", "NVIDIA H100")
    assert key != gpu_study.probe_key("2.11.1", "NVIDIA H100") != gpu_study.probe_key("2.11.0", "NVIDIA H200")
    src = gpu_study.REPO / "iqals"
    (tmp_path / "iqals").mkdir()
    for m in gpu_study.PROBE_SOURCES:
        (tmp_path / "iqals" / f"{m}.py").write_bytes((src / f"{m}.py").read_bytes())
    monkeypatch.setattr(gpu_study, "REPO", tmp_path)  # the driver itself is not hashed
    assert gpu_study.probe_key("2.11.0", "NVIDIA H100") == key
    (tmp_path / "iqals" / "train.py").write_text((src / "train.py").read_text() + "\n# changed\n")
    assert gpu_study.probe_key("2.11.0", "NVIDIA H100") != key


def test_stage_order_lists_the_repository_stages(dvc_yaml, raw_params, cfg):
    steps = gpu_study.plan(dvc_yaml, raw_params, cfg.stage_order, cfg.cpu_only)
    assert [s for s in dict.fromkeys(s for _, s, _ in steps)] == list(cfg.stage_order)
    with pytest.raises(gpu_study.StudyError, match="stage_order"):
        gpu_study.plan(dvc_yaml, raw_params, cfg.stage_order[:-1], cfg.cpu_only)


def test_train_runs_and_groups(dvc_yaml, raw_params, cfg):
    steps = gpu_study.plan(dvc_yaml, raw_params, cfg.stage_order, cfg.cpu_only)
    runs = [r for _, _, c in steps for r in gpu_study.train_runs(c, raw_params["train"]["seeds"])]
    n = len(raw_params["strategies"]) * len(raw_params["train"]["seeds"])
    assert len(runs) == n and runs[0] == gpu_study.Run("S1", 0, None)
    groups = gpu_study.group_commands(runs, 4)
    assert [len(gpu_study.runs_of(g)) for g in groups] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    for g in groups:  # --scores exactly when a run of the group reads them
        needs = any(raw_params["strategies"][s]["labels"] != "original" for s, _ in gpu_study.runs_of(g))
        assert ("--scores" in g) == needs
        assert g[:3] == ["python", "-m", "stages.train"]
    assert gpu_study.train_runs("python -m stages.evaluate --strategy S1", [0]) == []
    assert gpu_study.train_runs("python -m stages.train --strategy S2 --seed 1", [0, 1, 2]) == [gpu_study.Run("S2", 1, None)]


def test_overrides_are_validated(raw_params):
    out = gpu_study.with_overrides(raw_params, {"train.epochs": 16, "train.lr_decay_epochs": 12,
                                                "base.train_size": None})
    assert out["train"]["epochs"] == 16 and out["base"]["train_size"] is None
    assert raw_params["train"]["epochs"] != 16  # the original is untouched
    with pytest.raises(ParamError, match="train.epoch: no such key in params.yaml"):
        gpu_study.with_overrides(raw_params, {"train.epoch": 16})
    with pytest.raises(ParamError, match="train.lr_decay_epochs"):
        gpu_study.with_overrides(raw_params, {"train.epochs": 5, "train.lr_decay_epochs": 12})


def test_long_schedules_keep_the_paper_ratio(cfg):
    got = {e: gpu_study.long_overrides(e, cfg.decay_ratio)["train.lr_decay_epochs"] for e in (2000, 300, 100, 60)}
    assert got == {2000: 350, 300: 53, 100: 18, 60: 11}  # 0.175 x epochs, half up


def test_choose_epochs_takes_the_longest_that_fits():
    t = gpu_study.Timing(epochs=16, train_s=100.0, train_epoch_s=80.0, other_s=30.0)
    assert t.project(16) == pytest.approx(130.0)
    assert t.project(160) == pytest.approx(20 + 800 + 30)
    assert gpu_study.choose_epochs([300, 200, 150, 100, 60], t.project, 900) == 150
    assert gpu_study.choose_epochs([300, 60], t.project, 100) is None


def test_projection_scales_the_time_in_epochs_with_the_runs():
    t = gpu_study.Timing(epochs=16, runs=51, train_s=100.0, train_epoch_s=80.0, other_s=30.0)
    assert t.project(16, 34) == pytest.approx(20 + 80 * 34 / 51 + 30)
    assert t.project(32) == t.project(32, 51) == pytest.approx(20 + 160 + 30)


def test_fit_seeds_keeps_the_most_that_fit_and_at_least_one():
    assert gpu_study.fit_seeds([0, 1, 2], lambda k: k <= 2) == [0, 1]
    assert gpu_study.fit_seeds([0, 1, 2], lambda k: True) == [0, 1, 2]
    assert gpu_study.fit_seeds([0, 1, 2], lambda k: False) == [0]


def test_training_is_cut_to_the_seeds_that_fit(tmp_path, cfg, raw_params):
    study = gpu_study.Study(tmp_path, tmp_path / "work", tmp_path / "out", cfg, budget_s=1000.0)
    raw = gpu_study.with_overrides(raw_params, {**cfg.common, **cfg.converged})
    runs_per_seed = len(raw["strategies"]) * 16 * 50_000
    left = study.left()
    # two seeds' training (slowed by fit.slowdown) plus evaluate and report fit, three do not
    ips = 2.5 * runs_per_seed * cfg.slowdown / (left - cfg.after_training_seconds)
    fitted = study.fit_training(raw, {"images_per_s": ips})
    assert fitted["train"]["seeds"] == [0, 1] and fitted["train"]["epochs"] == 16
    assert raw["train"]["seeds"] == [0, 1, 2]  # a copy
    assert study.fit_training(raw, {"images_per_s": ips * 10}) is raw
    assert study.fit_training(raw, {}) is raw  # no measured rate: as planned


def test_a_cut_profile_trains_evaluates_and_records_the_kept_seeds(tmp_path, cfg, raw_params, dvc_yaml,
                                                                   monkeypatch):
    """run_profile with fit: the seeds are cut when training starts, and what follows (training
    calls, the params.yaml evaluate reads, the archive, run.json) has the kept seeds only. The
    stage commands are recorded, not run: each fake writes what its stage would."""
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "run").mkdir(parents=True)
    out.mkdir()
    study = gpu_study.Study(tmp_path, work, out, cfg, budget_s=1000.0)
    raw = gpu_study.with_overrides(raw_params, {**cfg.common, **cfg.converged})
    monkeypatch.setattr(study, "fit_training", lambda r, v: gpu_study.with_overrides(r, {"train.seeds": [0]}))
    calls, run_dir = [], work / "run"

    def fake_run(label, cmds, after=None):
        for i, argv in enumerate(cmds):
            calls.append(argv)
            if argv[2] == "stages.train":
                for s, k in gpu_study.runs_of(argv):
                    (run_dir / "logs" / s).mkdir(parents=True, exist_ok=True)
                    (run_dir / "logs" / s / f"seed{k}.tsv").write_text("epoch\tseconds\n1\t2.0\n")
            elif argv[2] == "stages.evaluate":
                for s in argv[4::2]:
                    (run_dir / "metrics").mkdir(exist_ok=True)
                    (run_dir / "metrics" / f"{s}.json").write_text("{}")
                    (run_dir / "data/predictions").mkdir(parents=True, exist_ok=True)
                    np.savez(run_dir / "data/predictions" / f"{s}.npz", probs=np.full((1, 2, 3, 10), 0.1, np.float32))
            elif argv[2] == "stages.report":
                (run_dir / "plots").mkdir(exist_ok=True)
            if after:
                after(i)
        return [{"cmd": " ".join(a), "seconds": 0.0, "rc": 0} for a in cmds]
    monkeypatch.setattr(study, "run_commands", fake_run)
    timing = study.run_profile("p", raw, {"group": 17, "images_per_s": 1.0}, dvc_yaml, data_done=True, fit=True)

    trained = [r for argv in calls if argv[2] == "stages.train" for r in gpu_study.runs_of(argv)]
    assert sorted(trained) == sorted((s, "0") for s in raw["strategies"]) and timing.runs == len(raw["strategies"])
    assert yaml.safe_load((run_dir / "params.yaml").read_text())["train"]["seeds"] == [0]
    evaluate = [argv for argv in calls if argv[2] == "stages.evaluate"]  # one call for every strategy
    assert len(evaluate) == 1 and evaluate[0][3::2] == ["--strategy"] * len(raw["strategies"])
    assert sorted(evaluate[0][4::2]) == sorted(raw["strategies"])
    with tarfile.open(out / "p.tar") as tar:
        assert yaml.safe_load(tar.extractfile("params.yaml"))["train"]["seeds"] == [0]
        info = json.load(tar.extractfile("run.json"))
        assert info["seeds"] == [0] and info["seeds_planned"] == [0, 1, 2] and info["status"] == "complete"
        assert "logs/S1/seed0.tsv" in tar.getnames() and "logs/S1/seed1.tsv" not in tar.getnames()
        assert {f"predictions/{s}.npz.xz" for s in raw["strategies"]} <= set(tar.getnames())


def test_an_evaluation_stopped_midway_keeps_what_finished(tmp_path, cfg, raw_params, dvc_yaml, monkeypatch):
    """The one evaluate call is stopped after two strategies: their metrics and predictions are in
    the archive, and run.json records the stopped call and the failure."""
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "run").mkdir(parents=True)
    out.mkdir()
    study = gpu_study.Study(tmp_path, work, out, cfg, budget_s=1000.0)
    raw = gpu_study.with_overrides(raw_params, {**cfg.common, **cfg.converged})
    run_dir = work / "run"

    def fake_run(label, cmds, after=None):
        if cmds[0][2] == "stages.evaluate":
            (run_dir / "metrics").mkdir(exist_ok=True)
            (run_dir / "data/predictions").mkdir(parents=True, exist_ok=True)
            for s in cmds[0][4:8:2]:
                np.savez(run_dir / "data/predictions" / f"{s}.npz", probs=np.full((1, 2, 3, 10), 0.1, np.float32))
                (run_dir / "metrics" / f"{s}.json").write_text("{}")
            err = gpu_study.StudyError("stage failed (rc stopped at the end of --budget-s)")
            err.calls = [{"cmd": " ".join(cmds[0]), "seconds": 9.0, "rc": "stopped at the end of --budget-s"}]
            raise err
        for argv in cmds:
            for s, k in gpu_study.runs_of(argv):
                (run_dir / "logs" / s).mkdir(parents=True, exist_ok=True)
                (run_dir / "logs" / s / f"seed{k}.tsv").write_text("epoch\tseconds\n1\t2.0\n")
        return [{"cmd": " ".join(a), "seconds": 0.0, "rc": 0} for a in cmds]
    monkeypatch.setattr(study, "run_commands", fake_run)
    with pytest.raises(gpu_study.StudyError, match="stopped"):
        study.run_profile("p", raw, {"group": 51}, dvc_yaml, data_done=True)
    first_two = list(raw["strategies"])[:2]
    with tarfile.open(out / "p.tar") as tar:
        names = set(tar.getnames())
        info = json.load(tar.extractfile("run.json"))
    assert {f"predictions/{s}.npz.xz" for s in first_two} | {f"metrics/{s}.json" for s in first_two} <= names
    assert not any(n.startswith("predictions/") and n.split("/")[1][:-7] not in first_two for n in names)
    assert info["status"].startswith("failed: stage failed") and info["stages"][-1]["stage"] == "evaluate"
    assert info["stages"][-1]["calls"][0]["rc"] == "stopped at the end of --budget-s"


def test_compact_predictions_keep_the_predicted_class():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), size=(2, 10, 500)).astype(np.float32)
    probs[0, 0, :50, 3] = probs[0, 0, :50, 7] + 1e-5  # near ties that float16 cannot separate
    pred, p16 = gpu_study.compact_predictions(probs)
    assert p16.dtype == np.float16 and pred.dtype == np.uint8
    assert np.array_equal(pred, probs.argmax(-1)) and np.array_equal(p16.argmax(-1), pred)
    assert np.abs(p16.astype(np.float32) - probs).max() < 2e-3


def test_archive_rolls_over_and_round_trips(tmp_path):
    out = tmp_path / "out"
    arc = gpu_study.Archive(out, "gpu_e16", cap=50_000)
    arc.add("params.yaml", b"train:\n  epochs: 16\n")
    arc.add("run.json", b'{"status": "complete"}\n')
    rng = np.random.default_rng(0)
    for s in ("S1", "S2", "S3"):
        arc.add(f"logs/{s}/seed0.tsv", rng.integers(0, 255, 15_000, dtype=np.uint8).tobytes())
    paths = arc.flush()
    assert [p.name for p in paths] == ["gpu_e16.tar", "gpu_e16.2.tar"]
    assert all(p.stat().st_size <= 50_000 for p in paths)
    assert gpu_results.archives(out) == {"gpu_e16": paths}
    dest = gpu_results.unpack_profile(paths, tmp_path / "results" / "gpu_e16")
    for m, data in arc.members.items():
        assert (dest / m).read_bytes() == data
    paths[1].unlink()
    shutil.copy(paths[0], out / "gpu_e16.3.tar")
    with pytest.raises(gpu_study.StudyError, match="one is missing"):
        gpu_results.archives(out)


def test_archive_member_outside_the_profile_is_refused(tmp_path):
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 0
        tar.addfile(info)
    with pytest.raises(gpu_study.StudyError, match="not a relative path"):
        gpu_results.unpack_profile([tmp_path / "bad.tar"], tmp_path / "results" / "bad")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "results" / "bad").exists()


def test_register_metrics_keeps_dvc_yaml_valid(tmp_path, repo_root):
    path = tmp_path / "dvc.yaml"
    shutil.copy(repo_root / "dvc.yaml", path)
    before = yaml.safe_load(path.read_text())
    assert gpu_results.register_metrics(path, "results/gpu_x1/metrics")
    assert not gpu_results.register_metrics(path, "results/gpu_x1/metrics")  # once
    assert gpu_results.register_metrics(path, "results/gpu_x2/metrics")
    after = yaml.safe_load(path.read_text())
    assert after["metrics"] == (before["metrics"] or []) + ["results/gpu_x1/metrics", "results/gpu_x2/metrics"]
    assert after["stages"] == before["stages"] and after["vars"] == before["vars"]
    assert "# Results of GPU runs" in path.read_text()  # comments stay


def test_config_errors_name_the_key(tmp_path, repo_root):
    raw = yaml.safe_load((repo_root / "offline/config.yaml").read_text())
    raw["long"]["epochs"] = [300, "100"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(gpu_study.StudyError, match="long.epochs"):
        gpu_study.load_config(tmp_path / "c.yaml")
    with pytest.raises(gpu_study.StudyError, match="no such study configuration"):
        gpu_study.load_config(tmp_path / "missing.yaml")


def test_compact_predictions_survive_the_archive(tmp_path):
    probs = np.random.default_rng(1).dirichlet(np.ones(10), size=(1, 10, 40)).astype(np.float32)
    np.savez(tmp_path / "S1.npz", probs=probs, labels=np.arange(40) % 10, seeds=np.array([0]),
             test_sets=np.array(["pristine"] * 10))
    arc = gpu_study.Archive(tmp_path / "out", "p")
    arc.add("params.yaml", b"x: 1\n")
    arc.add("predictions/S1.npz.xz", gpu_study.pack_predictions(tmp_path / "S1.npz"))
    dest = gpu_results.unpack_profile(arc.flush(), tmp_path / "results" / "p")
    with np.load(dest / "predictions" / "S1.npz") as z:
        assert z["probs"].dtype == np.float16 and np.array_equal(z["pred"], probs.argmax(-1))
        assert np.array_equal(z["labels"], np.arange(40) % 10)


def test_describe_lists_every_run_once_and_projects_minutes(cfg, raw_params):
    text = gpu_study.describe(cfg, [500_000, 1_000], group=17)
    runs = re.findall(r"--run (\S+)", text)
    want = [f"{s}:{k}" for s in raw_params["strategies"] for k in [0, 1, 2]]
    assert sorted(runs) == sorted(want) and len(runs) == len(set(runs))
    commands = text.split("\n\n")[0].splitlines()
    assert commands[1] == "python -m stages.download" and commands[-1] == "python -m stages.report"
    row = next(line for line in text.splitlines() if line.startswith("| 16 epochs"))
    images = len(want) * 16 * 50_000
    assert row == f"| 16 epochs | 12 | {images:,} | {images / 500_000 / 60:,.1f} | {images / 1_000 / 60:,.1f} |"


def test_a_stage_running_past_the_budget_is_stopped(tmp_path, cfg):
    import time
    (tmp_path / "work" / "run").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    study = gpu_study.Study(tmp_path, tmp_path / "work", tmp_path / "out", cfg, budget_s=2.0)
    t = time.monotonic()
    with pytest.raises(gpu_study.StudyError, match="stopped at the end of --budget-s"):
        study.run_commands("sleep", [["python", "-c", "import time; time.sleep(60)"]])
    assert time.monotonic() - t < 20
    assert "time.sleep(60)" in (tmp_path / "out" / "stages.log").read_text()


def test_code_version_names_the_sources_and_the_commit(tmp_path, repo_root):
    """run.json says which code ran: a hash of iqals/ and stages/, and the commit in a git checkout."""
    tree = tmp_path / "tree"
    for d in ("iqals", "stages"):
        shutil.copytree(repo_root / d, tree / d, ignore=shutil.ignore_patterns("__pycache__"))
    v = gpu_study.code_version(tree)
    assert v == {"source_sha256": gpu_study.code_version(repo_root)["source_sha256"], "commit": None,
                 "uncommitted_changes": None}  # a plain copy, as on the device
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tree)]
    for argv in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "x"]):
        subprocess.run(git + argv, check=True, capture_output=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert gpu_study.code_version(tree) == {**v, "commit": head, "uncommitted_changes": False}
    with open(tree / "stages" / "train.py", "a") as f:
        f.write("\n")
    changed = gpu_study.code_version(tree)
    assert changed["uncommitted_changes"] is True and changed["source_sha256"] != v["source_sha256"]
    assert "not in this repository's history; the machine's copy said commit " + head[:12] + \
        " with uncommitted changes" in gpu_results._code(changed, tree)
    assert "not recorded" in gpu_results._code(None, tree)
    # the CPU side finds the commit by the sources' hash, whatever git metadata the machine's copy had
    assert gpu_study.commit_of_sources(tree, v["source_sha256"]) == head
    assert f"those of commit {head[:12]} (matched" in gpu_results._code({**v, "commit": "0" * 40}, tree)
    assert gpu_study.commit_of_sources(tree, changed["source_sha256"]) is None
    for argv in (["commit", "-q", "-am", "y"], ["commit", "-q", "--allow-empty", "-m", "z"]):
        subprocess.run(git + argv, check=True, capture_output=True)
    second = subprocess.run(git + ["rev-parse", "HEAD~1"], capture_output=True, text=True).stdout.strip()
    assert gpu_study.commit_of_sources(tree, changed["source_sha256"]) == second  # the one that made them
    assert gpu_study.commit_of_sources(tree, v["source_sha256"]) == head
    assert gpu_study.commit_of_sources(tmp_path / "nowhere", v["source_sha256"]) is None


def test_run_summary_names_the_data_that_match_and_that_differ(repo_root):
    d = repo_root / "results" / "gpu_e16"
    md = gpu_results.run_markdown(d, {"data/raw/test.npz": True, "data/scores/test.npy": False,
                                      "metrics/score.json": True}, repo_root)
    assert ("| data | regenerated on the CPU: the same as the GPU run's: `data/raw/test.npz`, `metrics/score.json`; "
            "different: `data/scores/test.npy` |") in md
    assert "| data | regenerated on the CPU: the same as the GPU run's: `data/raw/test.npz` |" in \
        gpu_results.run_markdown(d, {"data/raw/test.npz": True}, repo_root)
    assert "| data |" not in gpu_results.run_markdown(d, None, repo_root)



def test_the_library_and_stages_never_import_the_offline_driver(repo_root):
    import ast
    for f in [*repo_root.glob("iqals/*.py"), *repo_root.glob("stages/*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "offline" or n.startswith("offline.") for n in names), f
