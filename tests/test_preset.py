"""stages.preset: a preset of params.yaml becomes one `dvc exp run -S ...`, checked before it runs."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
import torch
import yaml

from iqals import params as params_lib


def preset(tmp_path, repo_root, *args, values=None, path_dvc=None):
    file = repo_root / "presets/paper.yaml"
    if values is not None:
        file = tmp_path / "mine.yaml"
        file.write_text(yaml.safe_dump(values))
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    if path_dvc is not None:
        env["PATH"] = f"{path_dvc}{os.pathsep}{env['PATH']}"
    return subprocess.run([sys.executable, "-m", "stages.preset", str(file), *args], cwd=repo_root, env=env,
                          capture_output=True, text=True)


def test_the_paper_preset_is_the_converged_regime_and_valid(repo_root):
    values = params_lib.load_preset(repo_root / "presets/paper.yaml")
    p = params_lib.parse(params_lib.with_overrides(params_lib.read_raw(repo_root / "params.yaml"), values))
    assert p.base.train_size is None and (p.train.epochs, p.train.lr_decay_epochs) == (16, 12)
    assert p.train.seeds == (0, 1, 2) and p.train.device == "cuda"


def test_dry_prints_the_dvc_command_whose_values_parse_back(tmp_path, repo_root):
    r = preset(tmp_path, repo_root, "--dry", "--runner", "dvc")
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout.strip())
    assert cmd[:5] == ["dvc", "exp", "run", "-n", "paper"]
    sets = dict(a.split("=", 1) for a in cmd[6::2])
    assert cmd[5::2] == ["-S"] * len(sets)
    back = {k: yaml.safe_load(v) for k, v in sets.items()}  # as DVC reads -S values: YAML
    assert back == params_lib.load_preset(repo_root / "presets/paper.yaml")
    r = preset(tmp_path, repo_root, "--dry", "--name", "p2")  # the dask runner: the same values, then
    lines = r.stdout.strip().splitlines()  # the stale stages on Dask, then the workspace as the experiment
    assert lines[0].split(": ", 1)[1].split() == [" ".join(cmd[6::2])][0].split()
    assert lines[1].endswith("-m stages.parallel --workers 4") and lines[2] == "dvc exp save -f -n p2"
    r = preset(tmp_path, repo_root, "--dry", "--workers", "3")
    assert r.stdout.strip().splitlines()[1].endswith("-m stages.parallel --workers 3"), r.stdout


def test_set_on_the_command_line_changes_and_adds_keys_before_validation(tmp_path, repo_root):
    r = preset(tmp_path, repo_root, "--dry", "--runner", "dvc", "-S", "train.epochs=2000",
               "-S", "train.lr_decay_epochs=350", "--set", "report.bootstrap=200")
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout.strip())
    back = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in cmd[6::2])}
    want = params_lib.load_preset(repo_root / "presets/paper.yaml")
    want.update({"train.epochs": 2000, "train.lr_decay_epochs": 350, "report.bootstrap": 200})
    assert back == want and list(back)[-1] == "report.bootstrap"  # the preset's order, then the new key
    bad = preset(tmp_path, repo_root, "--dry", "-S", "train.lr_decay_epochs=20")  # past the preset's 16 epochs
    assert bad.returncode == 1 and "train.lr_decay_epochs = 20: expected at most train.epochs (16)" in bad.stderr
    bad = preset(tmp_path, repo_root, "--dry", "-S", "train.epochs")
    assert bad.returncode == 1 and "-S 'train.epochs': expected KEY=VALUE" in bad.stderr
    bad = preset(tmp_path, repo_root, "--dry", "-S", "=16")
    assert bad.returncode == 1 and "-S '=16': expected KEY=VALUE" in bad.stderr


@pytest.mark.slow
def test_the_dask_runner_makes_one_dvc_experiment(tmp_path, repo_root, tiny_cifar):
    """A preset run through stages.parallel on the tiny pipeline: every stage in dvc.lock, the
    preset's values in params.yaml, `dvc exp show` lists the experiment, `dvc status` clean."""
    from tests.test_parallel import tiny_project
    from tests.test_pipeline import sh
    dest = tmp_path / "project"
    env = tiny_project(dest, repo_root, tiny_cifar)
    sh(["git", "add", "-A"], dest, env)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], dest, env)
    (dest / "mini.yaml").write_text("train.epochs: 1\ntrain.lr_decay_epochs: 1\n")
    out = sh([sys.executable, "-m", "stages.preset", "mini.yaml", "--workers", "2"], dest, env, timeout=900)
    assert "finished:" in out and " 0 failed" in out, out[-2000:]
    assert yaml.safe_load((dest / "params.yaml").read_text())["train"]["epochs"] == 1
    lock = yaml.safe_load((dest / "dvc.lock").read_text())["stages"]
    assert {"train_onehot@S1", "train_scored@S3", "evaluate@S2", "report"} <= set(lock)
    assert "up to date" in sh([sys.executable, "-m", "dvc", "status"], dest, env)
    assert "mini" in sh([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], dest, env).split()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_preset_without_cuda_stops_before_dvc_runs(tmp_path, repo_root):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "dvc").write_text(f"#!/bin/sh\ntouch {tmp_path}/dvc_ran\n")
    (fake / "dvc").chmod(0o755)
    r = preset(tmp_path, repo_root, "--runner", "dvc", path_dvc=fake)  # a failed check runs only the fake dvc
    assert r.returncode == 1
    assert "train.device = 'cuda', but this machine has no CUDA device" in r.stderr
    assert not (tmp_path / "dvc_ran").exists()


@pytest.mark.parametrize("values,message", [
    ({"train.epochs": 0}, "params.yaml: train.epochs = 0: expected an integer in [1, inf)"),
    ({"train.epoch": 16}, "train.epoch: no such key in params.yaml"),
    ({"trian.epochs": 16}, "trian.epochs: params.yaml has no 'trian' here"),
    ({"epochs": 16}, "expected a mapping of dotted params keys"),
])
def test_a_bad_preset_is_named_before_anything_runs(tmp_path, repo_root, values, message):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "dvc").write_text(f"#!/bin/sh\ntouch {tmp_path}/dvc_ran\n")
    (fake / "dvc").chmod(0o755)
    r = preset(tmp_path, repo_root, values=values, path_dvc=fake)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "dvc_ran").exists()


def test_the_dvc_runner_runs_the_printed_command_and_passes_its_failure_on(tmp_path, repo_root):
    """The command run is the one --dry prints, and a failing `dvc exp run` fails the preset with its code."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "dvc").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/dvc_args\nexit 3\n')
    (fake / "dvc").chmod(0o755)
    values = {"train.epochs": 3, "train.lr_decay_epochs": 2}
    r = preset(tmp_path, repo_root, "--runner", "dvc", values=values, path_dvc=fake)
    assert r.returncode == 3, r.stderr
    want = ["exp", "run", "-n", "mine", "-S", "train.epochs=3", "-S", "train.lr_decay_epochs=2"]
    assert (tmp_path / "dvc_args").read_text().splitlines() == want


def test_the_dask_runner_sets_params_then_runs_parallel_then_saves(tmp_path, repo_root, monkeypatch):
    """--runner dask: the preset's values written into params.yaml (the rest of it unchanged), then
    stages.parallel, then `dvc exp save`; a failing stages.parallel saves nothing and passes its code on;
    --dry changes and runs nothing."""
    from types import SimpleNamespace

    from stages import preset as stage
    params, pristine = tmp_path / "params.yaml", (repo_root / "params.yaml").read_text()
    (tmp_path / "mine.yaml").write_text("train.epochs: 3\ntrain.lr_decay_epochs: 2\ntrain.seeds: [4, 5]\n")
    want = yaml.safe_load(pristine)
    want["train"].update(epochs=3, lr_decay_epochs=2, seeds=[4, 5])  # the three keys changed by hand
    monkeypatch.setattr(stage.logging, "basicConfig", lambda **kw: None)  # leave the test run's logging alone

    def main(*extra, codes=()):
        """main() on a fresh params.yaml, the commands' exit codes taken in turn: (commands run, exit code)."""
        params.write_text(pristine)
        ran, rcs = [], iter(codes)
        monkeypatch.setattr(stage, "subprocess", SimpleNamespace(
            run=lambda cmd: ran.append(cmd) or SimpleNamespace(returncode=next(rcs))))
        monkeypatch.setattr(sys, "argv", ["preset", str(tmp_path / "mine.yaml"), "--params", str(params),
                                          "--workers", "2", *extra])
        try:
            stage.main()
        except SystemExit as e:
            return ran, e.code
        return ran, 0

    cmds = [[sys.executable, "-m", "stages.parallel", "--workers", "2"], ["dvc", "exp", "save", "-f", "-n", "mine"]]
    assert main(codes=(0, 0)) == (cmds, 0) and yaml.safe_load(params.read_text()) == want
    assert main(codes=(5,)) == (cmds[:1], 5) and yaml.safe_load(params.read_text()) == want
    assert main("--dry") == ([], 0) and params.read_text() == pristine
