"""Run the stale stages of the DVC pipeline side by side on a Dask cluster; DVC keeps the books.

What is DVC's and what is Dask's:
- The plan is `dvc repro`'s: `plan_repro` over DVC's stage graph (`repo.index.graph`), the same
  `Stage.changed()` check when a stage's upstream stages are done, the same run-cache lookup.
- Each stage that must run is one Dask task: its resolved command (`stage.cmd`) in a subprocess
  on a worker, with OMP/MKL threads set so that the workers do not oversubscribe the cores, and a
  `GPU` resource asked for by training stages when `train.device` resolves to cuda. Training
  stages ready at the same time on a GPU become one task, one `stages.train` process that stacks
  all their runs on the GPU (`merge_training`); each stage is still recorded on its own.
- This process (the coordinator) records each finished stage as `Stage.run` + `dvc repro` do
  (save deps and outs, commit outs to the cache, run-cache entry, `dump` into dvc.lock), under
  DVC's repo lock, in dvc repro's order (which also fixes the order of the .gitignore lines DVC
  writes beside outputs, hashed by directory dependencies); a stage's dependants start as soon
  as its command ends. So dvc.lock ends up as `dvc repro` leaves it and `dvc status` is clean.
  The cluster needs the repository (and its DVC cache) on a filesystem that the workers and the
  coordinator share.
- A failed stage blocks only the stages downstream of it; Ctrl-C interrupts the running commands
  (SIGINT, so their atomic writes clean up) and records nothing half done.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger("parallel")

TOPIC = "iqals-parallel"  # Dask event topic: workers report "start" on it
GPU_MODULES = ("stages.train",)  # stages whose command runs these modules ask for a GPU
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
TAIL_LINES = 25
RESOLVED = ("done", "unchanged", "failed", "blocked", "interrupted")
INTERRUPT_GRACE_S = 20.0  # after SIGINT, a stage command gets this long before SIGKILL


class ParallelError(RuntimeError):
    """Bad arguments or a cluster that cannot run the plan (raised before any stage runs)."""


# ---------------------------------------------------------------- on the worker

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_worker() -> None:  # preexec_fn: loaded libc only, nothing that takes a lock
    # if the worker process dies (killed, OOM, node lost) its stage command gets SIGINT and
    # exits through its `finally` blocks instead of running on beside the task's retry; SIGINT
    # back to its default first: a worker started in the background (`cmd &`, nohup) ignores it,
    # and an ignored disposition would pass to the command through exec
    if _LIBC is not None:
        _LIBC.signal(signal.SIGINT, 0)  # SIG_DFL
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGINT)


def _tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(no log: {e})"


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to the command's process group (KeyboardInterrupt: atomic writes clean up), then SIGKILL."""
    for sig, wait in ((signal.SIGINT, INTERRUPT_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            pass


def run_stage_command(name: str, commands: list[str], cwd: str, env: dict, log_path: str,
                      threads: dict, stop_event: str | None = None) -> dict:
    """Run one stage's commands (or one command for several stages: names joined by " + ") in a
    subprocess on this Dask worker; returns rc, time, log tail.

    threads maps worker address -> CPU threads for its stages (key None: the default). The
    command's output goes to log_path. When the Dask Event stop_event is set, the command is
    interrupted and the result says cancelled.
    """
    from distributed import Event, get_worker
    from dvc.env import DVC_ROOT, DVC_STAGE
    from dvc.utils import fix_env

    worker = get_worker()
    n = int(threads.get(worker.address) or threads.get(None) or 1)
    full_env = fix_env(None)
    full_env.update(env)
    full_env.update({v: str(n) for v in THREAD_VARS})
    full_env.setdefault(DVC_ROOT, cwd)
    full_env[DVC_STAGE] = name
    shell = os.environ.get("SHELL") or "/bin/sh"
    opts = ["--noprofile", "--norc"] if os.path.basename(shell) == "bash" else []  # as dvc does
    stop = Event(stop_event) if stop_event else None
    if stop is not None and stop.is_set():  # a retry after the run was interrupted
        return {"stage": name, "rc": None, "cancelled": True, "worker": worker.address, "seconds": 0.0,
                "log": None, "tail": ""}
    worker.log_event(TOPIC, {"event": "start", "stage": name, "worker": worker.address,
                             "host": worker.ip, "threads": n})
    t0 = time.perf_counter()
    rc, cancelled = 0, False
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:  # appended: a retry after a lost worker keeps the first attempt's lines
        out.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} on {worker.address}, {n} threads\n".encode())
        for cmd in commands:
            out.write(f"> {cmd}\n".encode())
            out.flush()
            proc = subprocess.Popen([shell, *opts, "-c", cmd], cwd=cwd, env=full_env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=_die_with_worker)
            while True:
                try:
                    rc = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    if stop is not None and stop.is_set():
                        _stop(proc)
                        rc, cancelled = proc.wait(), True
                        break
            if rc != 0:
                break
    return {"stage": name, "rc": rc, "cancelled": cancelled, "worker": worker.address,
            "seconds": time.perf_counter() - t0, "log": str(log_path), "tail": _tail(Path(log_path))}


# ---------------------------------------------------------------- the plan (DVC's)

def merge_training(cmds: list[list[str]]) -> str | None:
    """One `python -m stages.train` command for several training stages, their strategies (each
    with its seeds) stacked in one process on the GPU; it writes what each stage's own command
    writes. None unless every stage is one `python -m stages.train --strategy S [--scores DIR]`
    with one DIR."""
    strategies, scores = [], set()
    for cmd in cmds:
        argv = shlex.split(cmd[0]) if len(cmd) == 1 else []
        opts = dict(zip(argv[3::2], argv[4::2]))
        if argv[:3] != ["python", "-m", "stages.train"] or len(argv) % 2 != 1 or "--strategy" not in opts \
                or set(opts) - {"--strategy", "--scores"}:
            return None
        strategies.append(opts["--strategy"])
        scores |= {opts["--scores"]} if "--scores" in opts else set()
    if len(scores) > 1:
        return None
    return shlex.join(["python", "-m", "stages.train", *[a for s in strategies for a in ("--strategy", s)],
                       *(["--scores", *scores] if scores else [])])


@dataclass
class Step:
    name: str                 # DVC addressing, e.g. train_scored@S3
    cmd: list[str]            # the resolved command(s)
    wdir: str
    upstream: list[str]       # stages of the plan it depends on
    gpu: bool = False         # asks for the GPU resource
    state: str = "waiting"    # waiting, submitted, running, finishing (its future is done), ended (exit 0,
    #                           to record in plan order), or one of RESOLVED
    worker: str | None = None
    seconds: float | None = None
    result: dict | None = None


@dataclass
class Plan:
    root: Path
    steps: dict[str, Step]    # in dvc repro's order
    downstream: dict[str, set[str]] = field(default_factory=dict)

    @property
    def order(self) -> list[str]:
        return list(self.steps)


def _commands(stage) -> list[str]:
    return stage.cmd if isinstance(stage.cmd, list) else stage.cmd.splitlines()


def make_plan(repo, targets: list[str] | None = None, gpu_training: bool = False) -> Plan:
    """dvc repro's plan for targets (default: dvc.yaml): stages in its order with their upstream."""
    import networkx as nx
    from dvc.dvcfile import PROJECT_FILE
    from dvc.repo import lock_repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    with lock_repo(repo):
        graph = get_active_graph(repo.index.graph)  # edges point from a stage to its upstream
        stages = collect_stages(repo, targets or [PROJECT_FILE])
        order = plan_repro(graph, stages)
        names = {s.addressing for s in order}
        steps = {}
        for s in order:
            if not s.cmd:
                continue  # a data source (`dvc add`): nothing to run
            cmds = _commands(s)
            gpu = gpu_training and any(f"-m {m}" in c for c in cmds for m in GPU_MODULES)
            up = sorted(u.addressing for u in graph.successors(s) if u.addressing in names and u.cmd)
            steps[s.addressing] = Step(s.addressing, cmds, s.wdir, up, gpu)
        down = {n: {d.addressing for d in nx.ancestors(graph, s)} & set(steps)
                for s in order if (n := s.addressing) in steps}
    return Plan(Path(repo.root_dir), steps, down)


def _stage_map(repo) -> dict:
    return {s.addressing: s for s in repo.index.stages}


def _record(stage) -> None:
    """What Stage.run does after the command, and dvc repro after Stage.run (dvc 3.x)."""
    no_cache_outs = any(not o.use_cache for o in stage.outs if not (o.is_metric or o.is_plot))
    stage.save(run_cache=not no_cache_outs)
    stage.commit()
    stage.dump(update_pipeline=False)


def _restore_from_run_cache(repo, stage) -> bool:
    from dvc.stage.cache import RunCacheNotFoundError

    try:
        repo.stage_cache.restore(stage)
    except RunCacheNotFoundError:
        return False
    return True


# ---------------------------------------------------------------- the cluster

def gpu_wanted(device: str, gpus_here: int, cluster_has_gpu: bool | None) -> bool:
    """Does train.device resolve to cuda on the workers? auto: when the workers have GPUs."""
    if device == "cuda":
        return True
    if device == "auto":
        return cluster_has_gpu if cluster_has_gpu is not None else gpus_here > 0
    return False


def local_cluster(workers: int, gpus: int = 0, stages_per_gpu: int = 1):
    """Workers with one task slot each; the first gpus*stages_per_gpu hold GPU=1, pinned round robin."""
    from distributed import Nanny, Scheduler, SpecCluster

    specs = {}
    for i in range(workers):
        opts = {"nthreads": 1, "memory_limit": 0,  # the work is in subprocesses, not the worker
                "silence_logs": logging.WARNING}
        if i < gpus * stages_per_gpu:
            opts.update(resources={"GPU": 1}, env={"CUDA_VISIBLE_DEVICES": str(i % gpus)})
        specs[f"w{i}"] = {"cls": Nanny, "options": opts}
    return SpecCluster(workers=specs, silence_logs=logging.WARNING,
                       scheduler={"cls": Scheduler, "options": {"dashboard": False, "dashboard_address": ":0",
                                                                 "host": "127.0.0.1"}})


def threads_per_worker(client, fixed: int | None) -> dict:
    """Worker address -> CPU threads for one of its stages: its host's cores over the task slots there."""
    if fixed:
        return {None: fixed}

    def cores() -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    info = client.scheduler_info(n_workers=-1)["workers"]
    per_worker = client.run(cores)
    slots: dict[str, int] = {}
    for w in info.values():
        slots[w["host"]] = slots.get(w["host"], 0) + w["nthreads"]
    return {a: max(1, per_worker.get(a, 1) // max(1, slots[w["host"]])) for a, w in info.items()}


# ---------------------------------------------------------------- the coordinator

@dataclass
class Outcome:
    ran: list[str]
    unchanged: list[str]
    cached: list[str]
    failed: list[Step]
    blocked: list[str]
    interrupted: list[str]

    @property
    def ok(self) -> bool:
        return not (self.failed or self.blocked or self.interrupted)


class _Progress:
    """One line per start/finish with the live count; called from two threads."""

    def __init__(self, plan: Plan, say: Callable[[str], None]):
        self.plan, self.say, self.lock, self.t0 = plan, say, threading.Lock(), time.perf_counter()

    def counts(self) -> str:
        st = [s.state for s in self.plan.steps.values()]
        done = sum(s in RESOLVED + ("ended", "finishing") for s in st)
        running = st.count("running")
        return f"[done {done} / running {running} / waiting {len(st) - done - running}]"

    def line(self, text: str) -> None:
        with self.lock:
            self.say(f"{time.perf_counter() - self.t0:7.1f}s {text}  {self.counts()}")

    def finished(self, step: Step) -> None:
        """The command ended (Dask's callback thread); the coordinator records it next."""
        with self.lock:
            if step.state in ("submitted", "running"):
                step.state = "finishing"

    def on_event(self, event) -> None:
        _, msg = event
        if not isinstance(msg, dict) or msg.get("event") != "start":
            return
        for name in msg["stage"].split(" + "):  # several training stages in one command
            step = self.plan.steps.get(name)
            if step is None or step.state not in ("submitted", "running"):
                continue
            again = " (again: its worker was lost)" if step.state == "running" else ""
            step.state, step.worker = "running", msg["worker"]
            self.line(f"start  {step.name} on {msg['worker']} ({msg['threads']} threads){again}")


def run(root: str | Path = ".", targets: list[str] | None = None, workers: int = 2,
        scheduler: str | None = None, threads: int | None = None, stages_per_gpu: int = 1,
        device: str | None = None, say: Callable[[str], None] = print,
        heartbeat_s: float = 60.0) -> Outcome:
    """Run the stale stages of root's pipeline on Dask; dvc.lock records them as dvc repro would.

    workers: size of the local cluster (ignored with scheduler, the address of a running one);
    threads: CPU threads per stage (default: the host's cores over its task slots); device: the
    params' train.device (read from params.yaml by the caller); stages_per_gpu: training stages
    that share one GPU on a local cluster.
    """
    from distributed import Client, Event, wait
    from dvc.repo import Repo, lock_repo

    root = Path(root).resolve()
    if scheduler is None and workers < 1:
        raise ParallelError(f"--workers {workers}: expected at least 1")
    if threads is not None and threads < 1:
        raise ParallelError(f"--threads-per-worker {threads}: expected at least 1")
    if stages_per_gpu < 1:
        raise ParallelError(f"--stages-per-gpu {stages_per_gpu}: expected at least 1")
    repo = Repo(str(root))
    cluster = client = None
    try:
        gpus_here = 0
        if scheduler is None and device in ("auto", "cuda"):
            import torch
            gpus_here = torch.cuda.device_count()
            if device == "cuda" and not gpus_here:
                raise ParallelError("train.device is cuda but torch sees no GPU here; use a cluster "
                                    "whose workers declare a GPU resource (--scheduler)")
        if scheduler is None:
            cluster = local_cluster(workers, gpus_here if gpu_wanted(device or "cpu", gpus_here, None) else 0,
                                    stages_per_gpu)
            client = Client(cluster)
        else:
            client = Client(scheduler, timeout="30s")
        info = client.scheduler_info(n_workers=-1)["workers"]
        has_gpu = any((w.get("resources") or {}).get("GPU") for w in info.values())
        use_gpu = gpu_wanted(device or "cpu", gpus_here, has_gpu if scheduler else None)
        if use_gpu and not has_gpu:
            raise ParallelError("train.device resolves to cuda but no Dask worker declares a GPU "
                                "resource; start workers with --resources GPU=1")
        plan = make_plan(repo, targets, gpu_training=use_gpu)
        thread_map = threads_per_worker(client, threads)
        progress = _Progress(plan, say)
        client.subscribe_topic(TOPIC, progress.on_event)
        stop_name = f"iqals-parallel-stop-{uuid.uuid4().hex}"
        stop = Event(stop_name, client=client)
        say(f"plan: {len(plan.steps)} stages in dvc repro's order; {len(info)} Dask workers "
            f"({', '.join(sorted(info))}); threads per stage: "
            f"{sorted(set(thread_map.values()))}; GPU for training: {'yes' if use_gpu else 'no'}")
        logs = root / ".dvc" / "tmp" / "parallel"
        futures: dict = {}
        ended: dict[str, dict] = {}  # stage -> result of its command (exit 0), not recorded yet
        outcome = Outcome([], [], [], [], [], [])

        def block_downstream(name: str) -> None:
            for d in sorted(plan.downstream[name], key=plan.order.index):
                if plan.steps[d].state == "waiting":
                    plan.steps[d].state = "blocked"
                    outcome.blocked.append(d)

        def fail(step: Step, r: dict, why: str) -> None:
            step.result, step.state = r, "failed"
            outcome.failed.append(step)
            block_downstream(step.name)
            progress.line(f"FAILED {step.name}: {why}")

        def on_result(step: Step, r: dict) -> None:
            step.result, step.seconds, step.worker = r, r["seconds"], r["worker"]
            if r["cancelled"]:
                step.state = "interrupted"
                outcome.interrupted.append(step.name)
                return progress.line(f"stopped {step.name} on {step.worker} after {step.seconds:.1f}s")
            if r["rc"] != 0:
                return fail(step, r, f"exit {r['rc']} on {step.worker} after {step.seconds:.1f}s (log {r['log']})")
            step.state = "ended"
            ended[step.name] = r
            progress.line(f"done   {step.name} on {step.worker} in {step.seconds:.1f}s")

        def record_in_order(stages: dict, gaps: bool = False) -> None:
            """Record ended stages in dvc repro's order, stopping at the first one not resolved yet.

            The order fixes that of dvc.lock and of the .gitignore lines DVC writes beside the
            outputs (a directory dependency such as data/predictions hashes its .gitignore).
            """
            for step in plan.steps.values():
                if step.name in ended:
                    r = ended.pop(step.name)
                    try:
                        bad = [u for u in step.upstream if plan.steps[u].state == "failed"]
                        if bad:
                            raise RuntimeError(f"upstream stage(s) {', '.join(bad)} could not be recorded")
                        _record(stages[step.name])
                    except Exception as e:  # noqa: BLE001 - e.g. an output the command did not write
                        r["tail"] = (r.get("tail") or "") + f"\nrecording it in dvc.lock: {type(e).__name__}: {e}"
                        fail(step, r, f"its command exited 0 but DVC could not record it: {e}")
                        continue
                    step.state = "done"
                    (outcome.cached if r.get("cached") else outcome.ran).append(step.name)
                elif step.state not in RESOLVED and not gaps:
                    return

        def must_run(step: Step, stages: dict) -> bool:
            """dvc repro's decision for a stage whose upstream is done: skip, restore or run."""
            stage = stages[step.name]
            if not stage.changed():
                step.state = "unchanged"
                outcome.unchanged.append(step.name)
                return False
            stage.remove_outs(ignore_remove=False, force=False)  # as Stage.run does
            if _restore_from_run_cache(repo, stage):
                step.state = "ended"
                ended[step.name] = {"rc": 0, "cached": True, "worker": None, "seconds": 0.0, "log": None}
                progress.line(f"cached {step.name}: outputs restored from DVC's run-cache")
                return False
            return True

        def submit(steps: list[Step], cmd: list[str]) -> None:
            """One Dask task running cmd for the steps (one stage, or training stages merged)."""
            name = " + ".join(s.name for s in steps)
            log_path = logs / (steps[0].name.replace("/", "_").replace(":", "_")
                               + (f"_and_{len(steps) - 1}_more" if len(steps) > 1 else "") + ".log")
            log_path.unlink(missing_ok=True)  # the log of this run only
            env = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}
            fut = client.submit(run_stage_command, name, cmd, steps[0].wdir, env, str(log_path),
                                thread_map, stop_name, key=f"stage-{steps[0].name}-{uuid.uuid4().hex[:8]}",
                                pure=False, resources={"GPU": 1} if steps[0].gpu else None)
            futures[fut] = steps
            for s in steps:
                s.state = "submitted"
                fut.add_done_callback(lambda f, s=s: progress.finished(s))
            if len(steps) > 1:
                progress.line(f"merged {name} into one process on the GPU: {cmd[0]}")

        def start_ready(stages: dict) -> None:
            """Start what is ready; on a GPU, the training stages ready together as one command."""
            run_now = []
            for step in plan.steps.values():
                if ready(step):
                    try:
                        if must_run(step, stages):
                            run_now.append(step)
                    except Exception as e:  # noqa: BLE001 - DVC could not check or prepare it
                        fail(step, {"rc": None, "tail": f"{type(e).__name__}: {e}"}, f"DVC could not prepare it: {e}")
            gpu = [s for s in run_now if s.gpu]
            merged = merge_training([s.cmd for s in gpu]) if len(gpu) > 1 else None
            for steps in ([gpu] if merged else [[s] for s in gpu]) + [[s] for s in run_now if not s.gpu]:
                submit(steps, [merged] if len(steps) > 1 else steps[0].cmd)

        def ready(step: Step) -> bool:
            return step.state == "waiting" and all(
                plan.steps[u].state in ("done", "unchanged") or u in ended for u in step.upstream)

        def collect(done) -> None:
            for fut in sorted(done, key=lambda f: plan.order.index(futures[f][0].name)):
                steps = futures.pop(fut)
                try:
                    r = fut.result()
                except Exception as e:  # noqa: BLE001 - e.g. KilledWorker: the task's workers kept dying
                    r = {"stage": steps[0].name, "rc": -1, "cancelled": False, "worker": steps[0].worker,
                         "seconds": 0.0, "log": None, "tail": f"{type(e).__name__}: {e}"}
                for step in steps:
                    on_result(step, dict(r))

        try:
            while True:
                with lock_repo(repo):  # one bookkeeping pass: record what ended, start what is ready
                    stages = _stage_map(repo)
                    before = None
                    while before != [s.state for s in plan.steps.values()]:
                        before = [s.state for s in plan.steps.values()]
                        record_in_order(stages)
                        start_ready(stages)
                if not futures:
                    break
                try:
                    done, _ = wait(list(futures), timeout=heartbeat_s, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    progress.line("still running: " + ", ".join(
                        s.name for s in plan.steps.values() if s.state == "running"))
                    continue
                collect(done)
        except KeyboardInterrupt:
            say("interrupted: stopping the running stage commands (SIGINT, then SIGKILL) ...")
            stop.set()
            try:
                wait(list(futures), timeout=INTERRUPT_GRACE_S + 15)
            except (TimeoutError, KeyboardInterrupt):
                pass
            collect([f for f in futures if f.status in ("finished", "error")])
            with lock_repo(repo):  # stages that ended before the stop are kept
                record_in_order(_stage_map(repo), gaps=True)
            for step in plan.steps.values():
                if step.state in ("submitted", "running", "finishing"):
                    step.state = "interrupted"
                    outcome.interrupted.append(step.name)
            futures.clear()
        say(f"finished: {len(outcome.ran)} ran, {len(outcome.cached)} restored from the run-cache, "
            f"{len(outcome.unchanged)} unchanged, {len(outcome.failed)} failed, {len(outcome.blocked)} "
            f"blocked, {len(outcome.interrupted)} interrupted")
        return outcome
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        repo.close()


def failure_report(outcome: Outcome) -> str:
    """The failed stages with their command and the tail of their log; then what they blocked."""
    parts = []
    for s in outcome.failed:
        r = s.result or {}
        where = f" (exit {r['rc']}, worker {r.get('worker')})" if r.get("rc") is not None else " (before it ran)"
        parts.append(f"stage {s.name} failed{where}\n  command: {' && '.join(s.cmd)}\n"
                     + (f"  log: {r['log']}\n" if r.get("log") else "")
                     + "\n".join("  | " + line for line in (r.get("tail") or "").splitlines()))
    if outcome.blocked:
        parts.append("not run because an upstream stage failed: " + ", ".join(outcome.blocked))
    if outcome.interrupted:
        parts.append("interrupted (outputs removed, rerun to finish): " + ", ".join(outcome.interrupted))
    return "\n".join(parts)
