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

import contextlib
import re
import signal
import subprocess
import sys
import threading
import time
import types
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
    processes (its MALLOC_TRIM_THRESHOLD_ slowed CPU training stages)."""
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
                ["python -m stages.train --strategy S2 --scores elsewhere"],
                ["python -m stages.train --strategy S2 --scores"]):  # a flag without its value
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


# ---------------------------------------------------------------- the bookkeeping, on stand-ins for Dask

ECHO_PIPELINE = """\
stages:
  prep:
    cmd: printf a > a.txt
    outs: [a.txt]
  left:
    cmd: cat a.txt a.txt > l.txt
    deps: [a.txt]
    outs: [l.txt]
  right:
    cmd: cat a.txt > r.txt && exit ${code}
    deps: [a.txt]
    outs: [r.txt]
  join:
    cmd: cat l.txt r.txt > j.txt
    deps: [l.txt, r.txt]
    outs: [j.txt]
  solo:
    cmd: printf s > s.txt
    outs: [s.txt]
"""


class StandInWorker:
    address = "tcp://stand-in:1"

    def __init__(self):
        self.events = []

    def log_event(self, topic, msg):
        self.events.append((topic, msg))


class StandInEvent:
    """The stop Event: set by set(), or once the file `ready` exists (a command that wrote it is ready for it)."""
    stopped, ready = False, None

    def __init__(self, name, client=None):
        pass

    def is_set(self):
        return StandInEvent.stopped or (self.ready is not None and self.ready.exists())

    def set(self):
        StandInEvent.stopped = True


class StandInClient:
    """The Dask client: a submitted stage command runs at once (run_stage_command on a stand-in worker);
    `wait` hands back the unfinished task that ends first on a clock where each stage lasts durations[name],
    so stages end in another order than dvc repro's. The tasks of stages in `lost` raise (their workers kept
    dying)."""

    def __init__(self, durations: dict, interrupt_at: float = float("inf"), lost: tuple = ()):
        self.durations, self.clock, self.ends, self.submitted, self.on_event = durations, 0, {}, [], None
        self.interrupt_at, self.lost = interrupt_at, lost  # Ctrl-C then: what ends 1 later still is stopped

    def submit(self, fn, *args, key, pure, resources):
        from distributed.scheduler import KilledWorker
        name = args[0]
        died = KilledWorker(key, types.SimpleNamespace(address="tcp://gone:1"), 3)
        fut = StandInFuture(died if name in self.lost else fn(*args))
        self.ends[fut] = self.clock + max(self.durations.get(s, 1) for s in name.split(" + "))
        self.submitted.append((name, args[1], resources))
        return fut

    def wait(self, futures, timeout, return_when="ALL_COMPLETED"):
        import distributed
        if return_when == "ALL_COMPLETED":  # after the stop Event: the commands still running exit cancelled
            assert StandInEvent.stopped
            for fut in futures:
                if self.ends[fut] > self.interrupt_at + 1:
                    fut._result = {**fut._result, "rc": -2, "cancelled": True}
                fut.status = "finished"
            return set(futures), set()
        events = distributed.get_worker().events  # the "start" events reach the subscriber after submit
        while events:
            topic, msg = events.pop(0)
            assert topic == "iqals-parallel"
            self.on_event((0.0, msg))
        fut = min(futures, key=self.ends.__getitem__)
        if self.ends[fut] > self.interrupt_at:
            raise KeyboardInterrupt
        self.clock, fut.status = self.ends[fut], "finished"
        for cb in fut.callbacks:
            cb(fut)
        return {fut}, set(futures) - {fut}


class StandInFuture:
    def __init__(self, result):
        self._result, self.callbacks, self.status = result, [], "pending"

    def add_done_callback(self, cb):
        self.callbacks.append(cb)

    def result(self):
        if isinstance(self._result, Exception):
            raise self._result
        return self._result


@pytest.fixture
def stand_in_dask(monkeypatch):
    import distributed
    worker = StandInWorker()
    monkeypatch.setattr(distributed, "get_worker", lambda: worker)
    monkeypatch.setattr(distributed, "Event", StandInEvent)
    monkeypatch.setattr(StandInEvent, "stopped", False)
    monkeypatch.setattr(StandInEvent, "ready", None)
    return worker


def echo_project(dest: Path, pipeline: str = ECHO_PIPELINE, code: int = 3) -> None:
    from dvc.repo import Repo
    dest.mkdir(exist_ok=True)
    Repo.init(str(dest), no_scm=True).close()
    (dest / "dvc.yaml").write_text(pipeline)
    (dest / "params.yaml").write_text(f"code: {code}\n")


def run_plan(dest: Path, monkeypatch, durations: dict, **kw):
    """What parallel.run does once the cluster is up, on the stand-in client."""
    import distributed
    from dvc.repo import Repo

    from iqals import parallel
    monkeypatch.chdir(dest)
    client, lines = StandInClient(durations, **kw), []
    monkeypatch.setattr(distributed, "wait", client.wait)
    repo = Repo(str(dest))
    try:
        c = parallel._Coordinator(repo, parallel.make_plan(repo), client, {None: 1},
                                  lines.append)
        client.on_event = c.on_event
        try:
            c.loop(heartbeat_s=60)
        except KeyboardInterrupt:
            c.interrupt()
    finally:
        repo.close()
    return c.out, client, lines


def out_md5(dest: Path) -> dict:
    return {n: [(o["path"], o["md5"]) for o in s["outs"]] for n, s in lock(dest).items()}


def test_stages_are_recorded_in_dvc_repro_order_whatever_order_they_end(tmp_path, monkeypatch, stand_in_dask):
    """dvc repro runs prep, left, right, join, solo (dvc.yaml order, upstream first) and with right failing
    (--keep-going) records prep, left, solo and skips join; here solo ends first and right before left."""
    import hashlib
    md5 = lambda s: hashlib.md5(s.encode()).hexdigest()  # noqa: E731 - DVC's hash of a small file
    dest = tmp_path / "p"
    echo_project(dest, code=3)
    durations = {"prep": 2, "left": 5, "right": 1, "join": 1, "solo": 1}
    out, client, lines = run_plan(dest, monkeypatch, durations)
    assert [s.name for s in out.failed] == ["right"] and out.blocked == ["join"] and not out.interrupted
    assert out.ran == ["prep", "left", "solo"] and not out.ok
    assert [n for n, *_ in client.submitted] == ["prep", "solo", "left", "right"]  # join never started
    assert out_md5(dest) == {"prep": [("a.txt", md5("a"))], "left": [("l.txt", md5("aa"))],
                             "solo": [("s.txt", md5("s"))]}  # in this order in dvc.lock
    assert list(out_md5(dest)) == ["prep", "left", "solo"]
    assert out.failed[0].result["rc"] == 3 and "> cat a.txt > r.txt && exit 3" in out.failed[0].result["tail"]
    assert any(re.search(r"FAILED right: exit 3 on tcp://stand-in:1 .*\[done 4 / running 1 / waiting 0\]", ln)
               for ln in lines), lines

    (dest / "params.yaml").write_text("code: 0\n")  # the rerun: only what is still out of date runs
    out, client, _ = run_plan(dest, monkeypatch, durations)
    assert out.ok and out.unchanged == ["prep", "left", "solo"] and out.ran == ["right", "join"]
    assert [n for n, *_ in client.submitted] == ["right", "join"]
    log = (dest / ".dvc/tmp/parallel/right.log").read_text()
    assert log.count("=== ") == 1 and "exit 3" not in log  # the log of this run only
    # as dvc repro, a run-cache entry for each recorded stage with dependencies: left, right, join
    assert len(list((dest / ".dvc/cache/runs").glob("*/*/*"))) == 3
    assert list(lock(dest)) == ["prep", "left", "solo", "right", "join"]
    assert (dest / "j.txt").read_text() == "aaa" and lock(dest)["join"]["outs"][0]["md5"] == md5("aaa")

    (dest / "l.txt").unlink()  # an output lost, its stage unchanged: DVC restores it from its cache, nothing runs
    out, client, _ = run_plan(dest, monkeypatch, durations)
    assert out.ok and out.cached == ["left"] and not out.ran and not client.submitted
    assert out.unchanged == ["prep", "right", "join", "solo"] and (dest / "l.txt").read_text() == "aa"


def test_the_plan_is_dvc_repros_with_training_on_the_gpu_only_when_asked(tmp_path, monkeypatch):
    """dvc repro's order (upstream first, dvc.yaml order otherwise), each stage's upstream in the plan and all
    that depends on it, directly or not; a target cuts the plan to what it needs."""
    from dvc.repo import Repo

    from iqals.parallel import make_plan
    dest = tmp_path / "p"
    echo_project(dest, ECHO_PIPELINE.replace("cat a.txt a.txt > l.txt", "python -m stages.train --strategy S1"))
    monkeypatch.chdir(dest)
    with Repo(str(dest)) as repo:
        for gpu in (False, True):
            plan = make_plan(repo, gpu_training=gpu)
            assert list(plan) == ["prep", "left", "right", "join", "solo"]
            assert {n: (s.upstream, s.downstream, s.gpu) for n, s in plan.items()} == {
                "prep": ([], {"left", "right", "join"}, False), "left": (["prep"], {"join"}, gpu),
                "right": (["prep"], {"join"}, False), "join": (["left", "right"], set(), False),
                "solo": ([], set(), False)}
            assert plan["right"].cmd == ["cat a.txt > r.txt && exit 3"] and plan["prep"].wdir == str(dest)
        assert list(make_plan(repo, ["left"])) == ["prep", "left"]


def test_a_stage_is_not_recorded_on_top_of_one_dvc_could_not_record(tmp_path, monkeypatch, stand_in_dask):
    """lost exits 0 without writing one of its outputs (what an earlier attempt left of it was removed before
    it ran, as dvc repro removes it): DVC cannot record it once slow (before it in dvc repro's order) is
    recorded, and after, which started on lost's other output as soon as lost ended, must not be recorded
    either (dvc repro would not have run it). A task whose workers kept dying is a failure too, and so is a
    stage DVC cannot check (its dependency is nowhere): the stages it blocks are named in dvc repro's order."""
    dest = tmp_path / "p"
    echo_project(dest, "stages:\n  slow:\n    cmd: printf s > s.txt\n    outs: [s.txt]\n"
                       "  lost:\n    cmd: printf k > kept.txt\n    outs: [kept.txt, lost.txt]\n"
                       "  after:\n    cmd: printf x > x.txt\n    deps: [kept.txt]\n    outs: [x.txt]\n"
                       "  died:\n    cmd: printf d > d.txt\n    outs: [d.txt]\n"
                       "  orphan:\n    cmd: printf o > o.txt\n    deps: [nowhere.txt]\n    outs: [o.txt]\n"
                       + "".join(f"  use{i}:\n    cmd: cat o.txt > u{i}.txt\n    deps: [o.txt]\n    outs: [u{i}.txt]\n"
                                 for i in (3, 1, 2)))
    (dest / "lost.txt").write_text("from an earlier attempt")
    out, client, lines = run_plan(dest, monkeypatch, {"slow": 5, "lost": 1, "after": 1}, lost=("died",))
    assert [n for n, *_ in client.submitted] == ["slow", "lost", "died", "after"]
    assert [s.name for s in out.failed] == ["orphan", "died", "lost", "after"] and out.ran == ["slow"]
    assert list(lock(dest)) == ["slow"] and not (dest / "lost.txt").exists() and out.blocked == ["use3", "use1", "use2"]
    assert "upstream stage(s) lost could not be recorded" in out.failed[3].result["tail"]
    assert out.failed[0].result["rc"] is None and "nowhere.txt" in out.failed[0].result["tail"]
    died = out.failed[1].result
    assert died["rc"] == -1 and died["tail"].startswith("KilledWorker: ") and not (dest / "d.txt").exists()


def test_an_interrupt_records_every_stage_that_ended_before_it(tmp_path, monkeypatch, stand_in_dask):
    """Ctrl-C while right and solo run: left ended before it, solo exits 0 just after, before it sees the stop;
    both are recorded although right, before solo in dvc repro's order, never is; right is reported
    interrupted, join never started."""
    dest = tmp_path / "p"
    echo_project(dest, code=0)
    out, client, lines = run_plan(dest, monkeypatch, {"prep": 1, "solo": 5.5, "left": 2, "right": 10}, interrupt_at=5)
    assert out.ran == ["prep", "left", "solo"] and out.interrupted == ["right"] and not out.failed
    assert list(lock(dest)) == ["prep", "left", "solo"] and not out.ok
    assert [n for n, *_ in client.submitted] == ["prep", "solo", "left", "right"]


def test_training_stages_ready_together_are_one_gpu_task_and_the_rest_cpu_tasks(tmp_path, monkeypatch):
    """On the GPU, the training stages ready in one pass go as one merge_training command asking for the GPU
    resource; an evaluation ready with them goes alone, without it; a lone training stage keeps its command."""
    from dvc.stage.cache import RunCacheNotFoundError

    from iqals import parallel
    train = lambda s: ["python -m stages.train --strategy " + s]  # noqa: E731

    class Stage:  # out of date, not in the run-cache
        addressing = "stage"

        def changed(self):
            return True

        def remove_outs(self, **kw):
            pass

    class Cache:
        def restore(self, stage):
            raise RunCacheNotFoundError(stage)

    class Client:
        def __init__(self):
            self.submitted = []

        def submit(self, fn, name, cmd, *args, key, pure, resources):
            self.submitted.append((name, cmd, resources))
            return StandInFuture(None)

    repo = type("Repo", (), {"root_dir": str(tmp_path), "stage_cache": Cache()})()
    plan = {"t1": parallel.Step("t1", train("S1"), ".", [], gpu=True),
            "ev": parallel.Step("ev", ["python -m stages.evaluate --strategy S0"], ".", []),
            "t2": parallel.Step("t2", train("S2"), ".", [], gpu=True),
            "t3": parallel.Step("t3", train("S3"), ".", ["t1"], gpu=True)}
    client = Client()
    c = parallel._Coordinator(repo, plan, client, {None: 1}, lambda s: None)
    c.start_ready({n: Stage() for n in plan})
    assert client.submitted == [("t1 + t2", ["python -m stages.train --strategy S1 --strategy S2"], {"GPU": 1}),
                                ("ev", ["python -m stages.evaluate --strategy S0"], None)]
    assert [s.state for s in plan.values()] == ["submitted", "submitted", "submitted", "waiting"] and not c.out.failed
    lines = []
    c.say = lines.append
    c.on_event((0.0, {"event": "start", "stage": "t1 + t2", "worker": "tcp://gpu:1", "threads": 4}))
    assert [(s.state, s.worker) for s in plan.values()] == [("running", "tcp://gpu:1"), ("submitted", None),
                                                           ("running", "tcp://gpu:1"), ("waiting", None)]
    c.on_event((0.0, {"event": "start", "stage": "t1 + t2", "worker": "tcp://gpu:2", "threads": 4}))  # a retry
    assert plan["t2"].worker == "tcp://gpu:2" and lines[-1].split("  [")[0].endswith(
        "start  t2 on tcp://gpu:2 (4 threads) (again: its worker was lost)") and len(lines) == 4
    plan["t1"].state = "done"
    c.start_ready({n: Stage() for n in plan})
    assert client.submitted[2:] == [("t3", train("S3"), {"GPU": 1})]


def test_stage_commands_run_in_turn_until_one_fails(tmp_path, stand_in_dask):
    """A stage's commands run in order, as `dvc repro` runs them, and stop at the first that fails; the log
    is appended to (a retry keeps the first attempt's lines); the worker's own thread count wins."""
    from iqals.parallel import run_stage_command
    log = tmp_path / "logs" / "s.log"
    log.parent.mkdir()
    log.write_text("".join(f"first attempt {i}\n" for i in range(30)))
    r = run_stage_command("s", ["echo one $OMP_NUM_THREADS", "exit 4", "echo three"], str(tmp_path), {}, str(log),
                          {"tcp://stand-in:1": 3, None: 7}, "stop")
    assert r["rc"] == 4 and not r["cancelled"] and r["log"] == str(log) and r["worker"] == "tcp://stand-in:1"
    text = log.read_text()
    assert text.startswith("first attempt 0\n") and "first attempt 29\n=== " in text
    assert ", 3 threads\n> echo one $OMP_NUM_THREADS\none 3\n> exit 4\n" in text
    assert "three" not in text and r["tail"] == "\n".join(text.splitlines()[-25:])  # its last 25 lines
    assert r["tail"].startswith("first attempt 9\n")
    assert stand_in_dask.events == [("iqals-parallel", {"event": "start", "stage": "s", "worker": "tcp://stand-in:1",
                                                        "threads": 3})]
    r = run_stage_command("s", ["echo $OMP_NUM_THREADS > n.txt"], str(tmp_path), {}, str(log), {None: 7}, "stop")
    assert r["rc"] == 0 and (tmp_path / "n.txt").read_text() == "7\n"


def test_a_stopped_run_starts_nothing_and_stops_what_runs(tmp_path, monkeypatch, stand_in_dask):
    """The stop Event: a task started after it runs nothing; a running command's process group gets SIGINT
    (its trap runs, as atomic writes clean up), and SIGKILL when it ignores SIGINT past the grace period."""
    from iqals import parallel
    poll = parallel._poll
    monkeypatch.setattr(parallel, "_poll", lambda proc: poll(proc, 0.05))
    monkeypatch.setattr(parallel, "INTERRUPT_GRACE_S", 0.3)
    monkeypatch.setattr(StandInEvent, "stopped", True)
    r = parallel.run_stage_command("s", ["echo ran > ran.txt"], str(tmp_path), {}, str(tmp_path / "a.log"), {}, "x")
    assert r["cancelled"] and r["rc"] is None and not (tmp_path / "ran.txt").exists() and not stand_in_dask.events
    monkeypatch.setattr(StandInEvent, "stopped", False)
    monkeypatch.setattr(StandInEvent, "ready", tmp_path / "ready")  # the stop comes once the trap is set
    loop = "touch ready; while :; do sleep 0.05; done"
    r = parallel.run_stage_command("s", [f"trap 'echo stopped > trap.txt; exit 5' INT; {loop}", "echo next > n.txt"],
                                   str(tmp_path), {}, str(tmp_path / "b.log"), {}, "x")
    assert r["cancelled"] and r["rc"] == 5 and (tmp_path / "trap.txt").read_text() == "stopped\n"
    assert not (tmp_path / "n.txt").exists()
    (tmp_path / "ready").unlink()  # a command that exits 0 on SIGINT: the stage's next command does not start
    r = parallel.run_stage_command("s", [f"trap 'exit 0' INT; {loop}", "echo next > n.txt"], str(tmp_path), {},
                                   str(tmp_path / "d.log"), {}, "x")
    assert r["cancelled"] and not (tmp_path / "n.txt").exists()
    (tmp_path / "ready").unlink()
    rescued = []  # without the SIGKILL the command would never end: a guard ends it, and the test fails

    def guard():
        for p in psutil.process_iter(["cwd"]):
            if p.info["cwd"] == str(tmp_path):
                rescued.append(p.pid)
                p.kill()
    timer = threading.Timer(60, guard)
    timer.start()
    try:
        r = parallel.run_stage_command("s", [f"trap '' INT; {loop}"], str(tmp_path), {}, str(tmp_path / "c.log"),
                                       {}, "x")
    finally:
        timer.cancel()
    assert not rescued and r["cancelled"] and r["rc"] == -signal.SIGKILL
    left = [p for p in psutil.process_iter(["cwd"]) if p.info["cwd"] == str(tmp_path)]
    assert not left, left  # the sleep of the loop went with its shell: the whole group was stopped


def test_threads_per_stage_are_the_hosts_cores_over_its_task_slots():
    from iqals.parallel import threads_per_worker

    class Client:
        def scheduler_info(self, n_workers):
            assert n_workers == -1  # all workers, not the first few
            return {"workers": {"tcp://a:1": {"host": "a", "nthreads": 1}, "tcp://a:2": {"host": "a", "nthreads": 2},
                                "tcp://b:1": {"host": "b", "nthreads": 1},
                                "tcp://c:1": {"host": "c", "nthreads": 4}}}

        def run(self, fn):
            return {"tcp://a:1": 8, "tcp://a:2": 8, "tcp://b:1": 3, "tcp://c:1": 2}

    # a: 8 cores over 3 slots -> 2 each; b: 3 cores, one slot; c: 2 cores, 4 slots -> still 1 thread
    assert threads_per_worker(Client(), None) == {"tcp://a:1": 2, "tcp://a:2": 2, "tcp://b:1": 3, "tcp://c:1": 1}
    assert threads_per_worker(Client(), 5) == {None: 5}


def test_local_cluster_gives_stages_per_gpu_workers_each_gpu_in_turn(monkeypatch):
    import distributed

    from iqals.parallel import gpu_wanted, local_cluster
    monkeypatch.setattr(distributed, "SpecCluster", lambda **kw: kw)
    workers = local_cluster(5, gpus=2, stages_per_gpu=2)["workers"]
    assert list(workers) == ["w0", "w1", "w2", "w3", "w4"]
    opts = [w["options"] for w in workers.values()]
    assert all(o["nthreads"] == 1 for o in opts)  # one stage per worker
    assert [o.get("env", {}).get("CUDA_VISIBLE_DEVICES") for o in opts] == ["0", "1", "0", "1", None]
    assert [o.get("resources") for o in opts] == [{"GPU": 1}] * 4 + [None]
    assert not any("resources" in w["options"] for w in local_cluster(2)["workers"].values())
    # train.device: auto follows the workers, cuda and cpu are what they say
    assert [gpu_wanted(d, g) for d in ("auto", "cuda", "cpu") for g in (True, False)] == [True, False, True, True,
                                                                                          False, False]


def test_a_value_the_user_set_is_not_taken_for_the_nannys():
    """Only a variable whose value is still the nanny's config value is dropped; a user's own setting stays."""
    import dask

    from iqals.parallel import _without_nanny_environ
    env = {"MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "2", "PATH": "/bin", "UNSET": "x"}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": 65536,
                                                                  "OMP_NUM_THREADS": 1, "UNSET": None}}):
        assert _without_nanny_environ(env) == env
        assert _without_nanny_environ({**env, "MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}) == \
            {"PATH": "/bin", "UNSET": "x"}


def test_bad_arguments_are_refused_before_anything_starts(tmp_path, monkeypatch):
    import distributed
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    from iqals import parallel
    for kw, msg in (({"workers": 0}, "--workers 0"), ({"threads": 0}, "--threads-per-worker 0"),
                    ({"stages_per_gpu": 0}, "--stages-per-gpu 0")):
        with pytest.raises(parallel.ParallelError, match=f"^{msg}: expected at least 1$"):
            parallel.run(tmp_path, **kw)
    with pytest.raises(NotDvcRepoError):  # with a scheduler, --workers is not looked at
        parallel.run(tmp_path, workers=0, scheduler="tcp://127.0.0.1:1")
    Repo.init(str(tmp_path), no_scm=True).close()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(parallel.ParallelError, match="train.device is cuda but torch sees no GPU here"):
        parallel.run(tmp_path, device="cuda")

    class Client:  # a running cluster whose workers declare no GPU
        def __init__(self, address, timeout):
            assert address == "tcp://127.0.0.1:1"

        def scheduler_info(self, n_workers):
            return {"workers": {"tcp://w:1": {"host": "w", "nthreads": 1, "resources": {}}}}

        def close(self):
            pass
    monkeypatch.setattr(distributed, "Client", Client)
    with pytest.raises(parallel.ParallelError, match="train.device resolves to cuda but no Dask worker declares"):
        parallel.run(tmp_path, scheduler="tcp://127.0.0.1:1", device="cuda")


def test_failure_report_names_command_log_tail_and_what_was_blocked():
    from iqals.parallel import Outcome, Step, failure_report
    ran = Step("train@S2", ["python -m stages.train --strategy S2", "echo x"], ".", [],
               result={"rc": 2, "worker": "tcp://w:1", "log": "/l/train.log", "tail": "a\nNotADirectoryError"})
    before = Step("evaluate@S2", ["python -m stages.evaluate --strategy S2"], ".", [],
                  result={"rc": None, "tail": "FileNotFoundError: x"})
    o = Outcome(failed=[ran, before], blocked=["report"], interrupted=["evaluate@S3"])
    assert not o.ok and Outcome(ran=["a"], unchanged=["b"], cached=["c"]).ok
    assert failure_report(o) == (
        "stage train@S2 failed (exit 2, worker tcp://w:1)\n"
        "  command: python -m stages.train --strategy S2 && echo x\n  log: /l/train.log\n"
        "  | a\n  | NotADirectoryError\n"
        "stage evaluate@S2 failed (before it ran)\n  command: python -m stages.evaluate --strategy S2\n"
        "  | FileNotFoundError: x\n"
        "not run because an upstream stage failed: report\n"
        "interrupted (outputs removed, rerun to finish): evaluate@S3")


@pytest.mark.parametrize("failed, interrupted, code", [(False, False, None), (False, True, 130), (True, True, 1),
                                                        (True, False, 1)])
def test_the_command_exits_1_on_a_failure_and_130_on_an_interrupt_alone(repo_root, monkeypatch, failed, interrupted,
                                                                         code):
    from iqals import parallel
    from stages import parallel as cli
    seen = {}

    def run(root, targets, **kw):
        seen.update(root=root, targets=targets, **kw)
        return parallel.Outcome(failed=[parallel.Step("a", ["x"], ".", [])] if failed else [],
                                interrupted=["b"] if interrupted else [])
    monkeypatch.setattr(parallel, "run", run)
    monkeypatch.chdir(repo_root)  # its params.yaml: train.device auto
    monkeypatch.setattr(sys, "argv", ["stages.parallel", "evaluate@S3", "--workers", "3", "--threads-per-worker", "2",
                                      "--stages-per-gpu", "4"])
    with pytest.raises(SystemExit) if code else contextlib.nullcontext() as e:
        cli.main()
    assert code is None or e.value.code == code
    assert {k: v for k, v in seen.items() if k != "say"} == {
        "root": ".", "targets": ["evaluate@S3"], "workers": 3, "scheduler": None, "threads": 2, "stages_per_gpu": 4,
        "device": "auto"}
