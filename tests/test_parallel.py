"""stages.parallel on the tiny pipeline with a 2-worker LocalCluster, against a sequential dvc repro.

One scenario on one project copy (module fixture), checked by the tests below:
  run 1: train_onehot@S2 cannot write its checkpoint (checkpoints/S2 is a file): it fails, its
         independent siblings finish and are recorded, the command exits 1 naming it;
  run 2: the obstacle removed, Ctrl-C (SIGINT) once evaluate@S2 has started;
  run 3: completes, starting nothing that runs 1-2 finished.
The reference is sequential `dvc repro` on another copy with the same params, the same history
(`dvc repro --keep-going` with the same obstacle, then `dvc repro`) and one torch thread, as the
parallel stages get (training is deterministic on CPU for a given thread count).
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from tests.test_pipeline import make_project, sh

STRATEGIES = {"onehot": ["S1", "S2"], "scored": ["S3"]}
PARALLEL = [sys.executable, "-m", "stages.parallel", "--workers", "2", "--threads-per-worker", "1"]
TIMINGS = ("models", "logs")  # training outputs carry wall-clock timings (images/s) besides the weights


def tiny_project(dest: Path, repo_root: Path, tiny_cifar: Path) -> dict:
    """tests/test_pipeline.py's tiny project, cut to three strategies and without the deviation
    stages (a quarter of the tiny pipeline's time; the runner treats every stage alike, and
    test_pipeline runs them through dvc repro); a git + DVC repository."""
    env = make_project(dest, repo_root)
    env.update(CIFAR10_LOCAL=str(tiny_cifar), OMP_NUM_THREADS="1")
    raw = yaml.safe_load((dest / "params.yaml").read_text())
    keep = STRATEGIES["onehot"] + STRATEGIES["scored"]
    raw["strategies"] = {k: v for k, v in raw["strategies"].items() if k in keep}
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    dvc_yaml = yaml.safe_load((dest / "dvc.yaml").read_text())
    dvc_yaml["vars"] = [{k: v} for k, v in STRATEGIES.items()]
    dvc_yaml["stages"] = {k: v for k, v in dvc_yaml["stages"].items() if not k.startswith("deviation")}
    (dest / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], dvc + ["init", "-q"], dvc + ["config", "core.analytics", "false"],
                dvc + ["config", "core.check_update", "false"]):
        sh(cmd, dest, env)
    return env


def lock(dest: Path) -> dict:
    return yaml.safe_load((dest / "dvc.lock").read_text())["stages"]


def without_timings(stages: dict) -> dict:
    """dvc.lock entries with the hashes of the training outputs (and of deps on them, such as the
    report's on logs/) dropped."""
    def entry(e):
        timed = e["path"].split("/")[0] in TIMINGS
        return {k: v for k, v in e.items() if k not in ("md5", "size", "nfiles")} if timed else e
    return {name: {k: ([entry(e) for e in v] if k in ("deps", "outs") else v) for k, v in s.items()}
            for name, s in stages.items()}


def started(out: str) -> list[str]:
    return re.findall(r" start  (\S+) on ", out)


def finished(out: str) -> list[str]:
    return re.findall(r" done   (\S+) on ", out)


def block_s2(dest: Path) -> Path:
    """train_onehot@S2 cannot write its checkpoint (not a DVC output: the command itself fails)."""
    blocker = dest / "checkpoints" / "S2"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where train_onehot@S2 needs a directory\n")
    return blocker


@pytest.fixture(scope="module")
def reference(tmp_path_factory, repo_root, tiny_cifar):
    dest = tmp_path_factory.mktemp("sequential")
    env = tiny_project(dest, repo_root, tiny_cifar)
    blocker = block_s2(dest)
    r = subprocess.run([sys.executable, "-m", "dvc", "repro", "--keep-going"], cwd=dest, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode != 0 and "train_onehot@S2" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    lock1 = lock(dest)
    blocker.unlink()
    sh([sys.executable, "-m", "dvc", "repro"], dest, env, timeout=900)
    return dest, lock1


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, repo_root, tiny_cifar):
    dest = tmp_path_factory.mktemp("parallel")
    env = tiny_project(dest, repo_root, tiny_cifar)
    blocker = block_s2(dest)
    r1 = subprocess.run(PARALLEL, cwd=dest, env=env, capture_output=True, text=True, timeout=900)
    lock1 = lock(dest)
    blocker.unlink()

    # run 2: interrupted like Ctrl-C once evaluate@S2 has started
    proc = subprocess.Popen(PARALLEL, cwd=dest, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's Ctrl-C
                            # reaches it, also when pytest itself runs in the background (SIGINT ignored)
    lines, deadline = [], time.time() + 600
    for line in proc.stdout:
        lines.append(line)
        if " start  evaluate@S2 " in line:
            proc.send_signal(signal.SIGINT)
            break
        if time.time() > deadline:
            break
    out2 = "".join(lines) + proc.communicate(timeout=120)[0]
    left = [p.info["pid"] for p in psutil.process_iter(["pid", "cwd"]) if p.info["cwd"] == str(dest)]
    lock2 = lock(dest)

    r3 = subprocess.run(PARALLEL, cwd=dest, env=env, capture_output=True, text=True, timeout=900)
    status = sh([sys.executable, "-m", "dvc", "status"], dest, env)
    return {"dest": dest, "env": env, "r1": r1, "lock1": lock1, "rc2": proc.returncode, "out2": out2,
            "left_after_interrupt": left, "lock2": lock2, "r3": r3, "status": status}


@pytest.mark.slow
def test_failure_stops_only_its_dependants(scenario, reference):
    r1 = scenario["r1"]
    out = r1.stdout + r1.stderr
    assert r1.returncode == 1, out[-3000:]
    assert "stage train_onehot@S2 failed" in out
    assert "command: python -m stages.train --strategy S2" in out
    assert "NotADirectoryError" in out or "FileExistsError" in out  # the tail of its log
    assert "not run because an upstream stage failed: evaluate@S2, report" in out
    _, want = reference
    got = scenario["lock1"]
    assert set(got) == set(lock(scenario["dest"])) - {"train_onehot@S2", "evaluate@S2", "report"}
    assert list(got) == list(want)  # what dvc repro --keep-going records, in its order
    assert without_timings(got) == without_timings(want)
    # progress: one line per start and finish with the worker, and the live count
    assert re.search(r"start  train_onehot@S1 on tcp://\S+ \(1 threads\)  "
                     r"\[done \d+ / running \d+ / waiting \d+\]", out)
    assert re.search(r"done   evaluate@S3 on tcp://\S+ in [\d.]+s  \[done \d+ / running \d+ / waiting \d+\]", out)


@pytest.mark.slow
def test_interrupt_then_rerun_redoes_nothing_finished(scenario):
    out2, r3 = scenario["out2"], scenario["r3"]
    assert scenario["rc2"] == 130, out2[-3000:]
    assert "interrupted" in out2
    assert started(out2)[0] == "train_onehot@S2"  # only what run 1 left stale
    assert "train_onehot@S2" in scenario["lock2"]
    assert not scenario["left_after_interrupt"], "processes left running in the project after Ctrl-C"
    dest = scenario["dest"]
    half = [p for d in ("data", "models", "metrics", "plots", "logs") for p in (dest / d).rglob(".*.tmp")]
    assert not half, half
    out3 = r3.stdout + r3.stderr
    assert r3.returncode == 0, out3[-3000:]
    done_before = set(scenario["lock2"])
    assert set(started(out3)) == {"evaluate@S2", "report"} - done_before
    assert not set(started(out3)) & (set(finished(scenario["r1"].stdout)) | set(finished(out2)))


@pytest.mark.slow
def test_final_lock_is_what_sequential_repro_records(scenario, reference):
    assert "up to date" in scenario["status"]
    ref, _ = reference
    got, want = lock(scenario["dest"]), lock(ref)
    assert list(got) == list(want)
    # data/predictions, a dependency of report, holds the .gitignore that DVC appends a line to as
    # it records each evaluate stage. A sequential `dvc repro` that ends in a failure takes its
    # lines back (dvc's scm_context); stages.parallel keeps them, so after run 1 the lines stand
    # in another order (S1, S3, S2) and the directory's hash differs. Its files are compared
    # one by one instead.
    preds = "data/predictions"
    for name in ("S1.npz", "S2.npz", "S3.npz"):
        assert (scenario["dest"] / preds / name).read_bytes() == (ref / preds / name).read_bytes(), name
    # Every prediction file is git-ignored after the parallel runs, one line each, in the order the
    # runs recorded the evaluate stages: run 1's in dvc repro's order (S1, S3: S2's training
    # failed), then run 3's S2. Recording in completion order, or a stage that run 1 left unrecorded
    # and a later run redid, stands elsewhere. The sequential reference lost the lines its failed
    # `--keep-going` run added (DVC takes them back), and its later `dvc repro` left those stages
    # unchanged, adding none: what it kept, the parallel run has too.
    lines, ref_lines = ((d / preds / ".gitignore").read_text().split() for d in (scenario["dest"], ref))
    assert lines == ["/S1.npz", "/S3.npz", "/S2.npz"] and set(ref_lines) <= set(lines), (lines, ref_lines)
    drop = lambda stages: {n: {k: ([e for e in v if e["path"] != preds] if k == "deps" else v)  # noqa: E731
                               for k, v in st.items()} for n, st in without_timings(stages).items()}
    assert drop(got) == drop(want)
    for s in STRATEGIES["onehot"] + STRATEGIES["scored"]:  # the weights themselves are identical
        a = torch.load(ref / "models" / s / "seed0.pt", weights_only=False)
        b = torch.load(scenario["dest"] / "models" / s / "seed0.pt", weights_only=False)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), s


def test_stage_command_dies_with_its_worker(tmp_path):
    """A worker process killed mid-stage takes its stage command with it (PR_SET_PDEATHSIG)."""
    worker = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, threading, time\n"
         "from iqals.parallel import _die_with_worker\n"
         "def run():  # like a Dask task: the command starts from a worker thread\n"
         "    p = subprocess.Popen(['sleep', '60'], start_new_session=True, preexec_fn=_die_with_worker)\n"
         "    print(p.pid, flush=True)\n"
         "    p.wait()\n"
         "threading.Thread(target=run).start()\n"
         "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    command = psutil.Process(int(worker.stdout.readline()))
    worker.kill()
    worker.wait()
    deadline = time.time() + 10
    while time.time() < deadline and command.is_running() and command.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.05)
    alive = command.is_running() and command.status() != psutil.STATUS_ZOMBIE
    if alive:
        command.kill()
    assert not alive, "the stage command outlived its worker"


def test_stage_command_gets_the_workers_environment_without_the_nannys(tmp_path, monkeypatch):
    """A stage runs as under dvc repro: the worker's environment (a variable set before the cluster
    started reaches it) and the stage's thread count, but not what Dask's nanny sets for its worker
    processes (MALLOC_TRIM_THRESHOLD_ slowed CPU training stages about 1.4x)."""
    import dask
    from distributed import Client

    from iqals.parallel import local_cluster, run_stage_command

    nanny = dask.config.get("distributed.nanny.pre-spawn-environ")
    assert "MALLOC_TRIM_THRESHOLD_" in nanny  # what the nanny sets: the case this test is about
    monkeypatch.setenv("IQALS_TEST_MARKER", "kept")
    out = tmp_path / "env.txt"
    with local_cluster(1) as cluster, Client(cluster) as client:
        r = client.submit(run_stage_command, "probe@env", [f"env > {out}"], str(tmp_path), {},
                          str(tmp_path / "log.txt"), {None: 3}, "stop-env-test").result(timeout=60)
    assert r["rc"] == 0, r["tail"]
    env = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert "MALLOC_TRIM_THRESHOLD_" not in env
    assert env["IQALS_TEST_MARKER"] == "kept"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert env["DVC_STAGE"] == "probe@env"


def test_merge_training_stacks_training_stages_and_nothing_else():
    from iqals.parallel import merge_training
    cmds = [["python -m stages.train --strategy S1"], ["python -m stages.train --strategy S3 --scores data/scores"],
            ["python -m stages.train --strategy S5 --scores data/scores"]]
    assert merge_training(cmds) == ("python -m stages.train --strategy S1 --strategy S3 --strategy S5 "
                                    "--scores data/scores")
    assert merge_training(cmds[:1]) == "python -m stages.train --strategy S1"
    for bad in (["python -m stages.evaluate --strategy S1"], ["python -m stages.train --strategy S2 --seed 0"],
                ["python -m stages.train --strategy S2", "echo two commands"],
                ["python -m stages.train --strategy S2 --scores elsewhere"]):
        assert merge_training(cmds + [bad]) is None, bad


@pytest.mark.slow
def test_training_stages_ready_together_train_in_one_process_on_a_gpu_worker(tmp_path, repo_root, tiny_cifar,
                                                                             monkeypatch):
    """On a worker with the GPU resource, the training stages that are ready together run as one
    stacked process; each is recorded as dvc repro records it, and `dvc status` is clean after.
    (The worker only declares a GPU: train.device stays auto, so the process trains on the CPU.)"""
    from iqals import parallel
    dest = tmp_path / "project"
    env = tiny_project(dest, repo_root, tiny_cifar)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(dest)
    monkeypatch.setattr(parallel, "gpu_wanted", lambda *a: True)
    real = parallel.local_cluster
    monkeypatch.setattr(parallel, "local_cluster", lambda workers, gpus, per_gpu: real(workers, 1, per_gpu))
    lines = []
    outcome = parallel.run(dest, workers=2, threads=1, device="auto", say=lines.append)
    out = "\n".join(lines)
    assert outcome.ok, out + "\n" + parallel.failure_report(outcome)
    merged = re.findall(r"merged (.+) into one process on the GPU: (.+?)  \[done", out)
    assert merged[0] == ("train_onehot@S1 + train_onehot@S2", "python -m stages.train --strategy S1 --strategy S2")
    assert {"train_onehot@S1", "train_onehot@S2", "train_scored@S3", "report"} <= set(lock(dest))
    assert "up to date" in sh([sys.executable, "-m", "dvc", "status"], dest, env)
    log = (dest / "logs" / "S2" / "seed0.tsv").read_text()
    assert log.startswith("epoch\tloss") and (dest / "models" / "S1" / "seed0.pt").is_file()
