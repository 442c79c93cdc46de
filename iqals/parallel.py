"""DVC's out-of-date stages run side by side on a Dask cluster; DVC keeps the books (docs/parallel.md).

The plan and stale check are `dvc repro`'s; each stage to run is a Dask task running its command
(training stages ready together on a GPU: one stacked process, `merge_training`). This process records
each finished stage as `dvc repro` does, in its order (which also fixes the order of the .gitignore lines
DVC writes beside outputs); workers and this process must share the repository's filesystem.
"""
from __future__ import annotations

import contextlib
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

from .errors import ExpectedError

TOPIC = "iqals-parallel"  # Dask event topic: workers report "start" on it
GPU_MODULES = ("stages.train",)  # stages whose command runs these modules ask for a GPU
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
INTERRUPT_GRACE_S = 20.0  # after SIGINT, a stage command gets this long before SIGKILL
RESOLVED = ("done", "unchanged", "failed", "blocked", "interrupted")


class ParallelError(ExpectedError, RuntimeError):
    """Bad arguments or a cluster that cannot run the plan (raised before any stage runs)."""


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_worker() -> None:  # preexec_fn: loaded libc only, nothing that takes a lock
    # when the worker process dies (killed, OOM, node lost) its command gets SIGINT and exits
    # through its `finally` blocks instead of running on beside the retry; SIGINT back to its
    # default first: a worker started in the background ignores it, and exec would pass that on
    if _LIBC is not None:
        _LIBC.signal(signal.SIGINT, 0)  # SIG_DFL
        _LIBC.prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to the command's process group (atomic writes clean up), then SIGKILL."""
    for sig, wait in ((signal.SIGINT, INTERRUPT_GRACE_S), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):  # no group: SIGKILL finds none
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return


def _without_nanny_environ(env: dict) -> dict:
    """env less what Dask's nanny set for its worker process (distributed.nanny.pre-spawn-environ,
    where the value is still the config's), so that a stage command runs as under dvc repro: the
    nanny's MALLOC_TRIM_THRESHOLD_=65536 (glibc hands freed memory back at once) slowed CPU
    training stages. The thread counts are set per stage anyway."""
    import dask

    nanny = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    return {k: v for k, v in env.items() if k not in nanny or nanny[k] is None or v != str(nanny[k])}


def _tail(path: Path, n: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(no log: {e})"


def run_stage_command(name: str, commands: list[str], cwd: str, env: dict, log_path: str,
                      threads: dict, stop_event: str) -> dict:
    """Run one stage's commands (or one command for stages named "A + B") in a subprocess on this
    Dask worker, output to log_path; returns rc, seconds, log tail, or cancelled when the Dask
    Event stop_event is set. threads: worker address -> CPU threads (key None: the default)."""
    from distributed import Event, get_worker
    from dvc.env import DVC_ROOT, DVC_STAGE
    from dvc.utils import fix_env

    worker = get_worker()
    n = int(threads.get(worker.address) or threads.get(None) or 1)
    full_env = {DVC_ROOT: cwd, **_without_nanny_environ(fix_env(None)), **env, **{v: str(n) for v in THREAD_VARS},
                DVC_STAGE: name}
    shell = os.environ.get("SHELL") or "/bin/sh"
    opts = ["--noprofile", "--norc"] if os.path.basename(shell) == "bash" else []  # as dvc does
    stop = Event(stop_event)
    result = {"stage": name, "rc": 0, "cancelled": False, "worker": worker.address, "log": log_path}
    if stop.is_set():  # a retry after the run was interrupted
        return {**result, "rc": None, "cancelled": True, "seconds": 0.0, "tail": ""}
    worker.log_event(TOPIC, {"event": "start", "stage": name, "worker": worker.address, "threads": n})
    t0 = time.perf_counter()
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:  # appended: a retry after a lost worker keeps the first attempt's lines
        out.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} on {worker.address}, {n} threads\n".encode())
        for cmd in commands:
            out.write(f"> {cmd}\n".encode())
            out.flush()
            proc = subprocess.Popen([shell, *opts, "-c", cmd], cwd=cwd, env=full_env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=_die_with_worker)
            while (rc := _poll(proc)) is None:
                if stop.is_set():
                    _stop(proc)
                    rc, result["cancelled"] = proc.wait(), True
            result["rc"] = rc
            if rc != 0 or result["cancelled"]:  # after a stop, the next command does not start
                break
    return {**result, "seconds": time.perf_counter() - t0, "tail": _tail(Path(log_path))}


def _poll(proc: subprocess.Popen, every: float = 1.0) -> int | None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        return proc.wait(timeout=every)
    return None


def merge_training(cmds: list[list[str]]) -> str | None:
    """One `python -m stages.train` command for several training stages, their strategies (each with its seeds)
    stacked in one process on the GPU; it writes what each stage's own command writes. None unless every
    stage is one `python -m stages.train --strategy S [--scores DIR]` with one DIR."""
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
    downstream: set[str] = field(default_factory=set)
    gpu: bool = False         # asks for the GPU resource
    state: str = "waiting"    # waiting, submitted, running, finishing (its task is done), ended (exit 0,
    #                           to record in plan order), or one of RESOLVED
    worker: str | None = None
    result: dict | None = None


def make_plan(repo, targets: list[str] | None = None, gpu_training: bool = False) -> dict[str, Step]:
    """dvc repro's plan for targets (default: dvc.yaml): stages in its order with their upstream."""
    import networkx as nx
    from dvc.dvcfile import PROJECT_FILE
    from dvc.repo import lock_repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    with lock_repo(repo):
        graph = get_active_graph(repo.index.graph)  # edges point from a stage to its upstream
        order = [s for s in plan_repro(graph, collect_stages(repo, targets or [PROJECT_FILE])) if s.cmd]
        names = {s.addressing for s in order}  # (a stage without cmd is a data source: nothing to run)
        steps = {}
        for s in order:
            cmds = s.cmd if isinstance(s.cmd, list) else s.cmd.splitlines()
            steps[s.addressing] = Step(
                s.addressing, cmds, s.wdir, sorted(u.addressing for u in graph.successors(s) if u.addressing in names),
                {d.addressing for d in nx.ancestors(graph, s)} & names,
                gpu_training and any(f"-m {m}" in c for c in cmds for m in GPU_MODULES))
    return steps


def gpu_wanted(device: str, workers_have_gpu: bool) -> bool:
    """Does train.device resolve to cuda on the workers? auto: when the workers have GPUs."""
    return workers_have_gpu if device == "auto" else device == "cuda"


def local_cluster(workers: int, gpus: int = 0, stages_per_gpu: int = 1):
    """Workers with one task slot each; the first gpus*stages_per_gpu hold GPU=1, pinned round robin."""
    from distributed import Nanny, Scheduler, SpecCluster

    specs = {}
    for i in range(workers):
        opts = {"nthreads": 1, "memory_limit": 0, "silence_logs": logging.WARNING}  # the work is in subprocesses
        if i < gpus * stages_per_gpu:
            opts.update(resources={"GPU": 1}, env={"CUDA_VISIBLE_DEVICES": str(i % gpus)})
        specs[f"w{i}"] = {"cls": Nanny, "options": opts}
    return SpecCluster(workers=specs, silence_logs=logging.WARNING, scheduler={
        "cls": Scheduler, "options": {"dashboard": False, "dashboard_address": ":0", "host": "127.0.0.1"}})


def threads_per_worker(client, fixed: int | None) -> dict:
    """Worker address -> CPU threads for one of its stages: its host's cores over the task slots there."""
    if fixed:
        return {None: fixed}
    info = client.scheduler_info(n_workers=-1)["workers"]
    cores = client.run(lambda: len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    slots: dict[str, int] = {}
    for w in info.values():
        slots[w["host"]] = slots.get(w["host"], 0) + w["nthreads"]
    return {a: max(1, (cores.get(a) or 1) // max(1, slots[w["host"]])) for a, w in info.items()}


@dataclass
class Outcome:
    ran: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    failed: list[Step] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.failed or self.blocked or self.interrupted)


class _Coordinator:
    """The bookkeeping of one run: start what is ready, record what ended, in dvc repro's order."""

    def __init__(self, repo, plan: dict[str, Step], client, threads: dict, say: Callable[[str], None]):
        self.repo, self.plan, self.client, self.threads, self.say = repo, plan, client, threads, say
        self.out, self.futures = Outcome(), {}
        self.lock, self.t0 = threading.Lock(), time.perf_counter()
        self.stop_name = f"iqals-parallel-stop-{uuid.uuid4().hex}"
        self.logs = Path(repo.root_dir) / ".dvc" / "tmp" / "parallel"

    # -- progress: one line per start and finish, with the live count (called from two threads)
    def line(self, text: str) -> None:
        with self.lock:
            st = [s.state for s in self.plan.values()]
            done, running = sum(s in RESOLVED + ("ended", "finishing") for s in st), st.count("running")
            self.say(f"{time.perf_counter() - self.t0:7.1f}s {text}  "
                     f"[done {done} / running {running} / waiting {len(st) - done - running}]")

    def on_event(self, event) -> None:
        _, msg = event
        for name in msg.get("stage", "").split(" + ") if isinstance(msg, dict) and msg.get("event") == "start" else []:
            step = self.plan.get(name)
            if step is not None and step.state in ("submitted", "running"):
                again = " (again: its worker was lost)" if step.state == "running" else ""
                step.state, step.worker = "running", msg["worker"]
                self.line(f"start  {step.name} on {msg['worker']} ({msg['threads']} threads){again}")

    def finishing(self, step: Step) -> None:  # Dask's callback thread: the command ended
        with self.lock:
            if step.state in ("submitted", "running"):
                step.state = "finishing"

    def fail(self, step: Step, r: dict, why: str) -> None:
        step.result, step.state = r, "failed"
        self.out.failed.append(step)
        for d in sorted(step.downstream, key=list(self.plan).index):
            if self.plan[d].state == "waiting":
                self.plan[d].state = "blocked"
                self.out.blocked.append(d)
        self.line(f"FAILED {step.name}: {why}")

    def on_result(self, step: Step, r: dict) -> None:
        step.result, step.worker, secs = r, r["worker"], r["seconds"]
        if r["cancelled"]:
            step.state = "interrupted"
            self.out.interrupted.append(step.name)
            self.line(f"stopped {step.name} on {step.worker} after {secs:.1f}s")
        elif r["rc"] != 0:
            self.fail(step, r, f"exit {r['rc']} on {step.worker} after {secs:.1f}s (log {r['log']})")
        else:
            step.state = "ended"
            self.line(f"done   {step.name} on {step.worker} in {secs:.1f}s")

    def record_in_order(self, stages: dict, gaps: bool = False) -> None:
        """Record ended stages in dvc repro's order, up to the first one not resolved yet (all
        ended ones with gaps: after an interrupt)."""
        for step in self.plan.values():
            if step.state == "ended":
                r = step.result
                try:
                    if bad := [u for u in step.upstream if self.plan[u].state == "failed"]:
                        raise RuntimeError(f"upstream stage(s) {', '.join(bad)} could not be recorded")
                    stage = stages[step.name]  # what Stage.run does after the command, then dvc repro (dvc 3.x)
                    stage.save(run_cache=all(o.use_cache for o in stage.outs if not (o.is_metric or o.is_plot)))
                    stage.commit()
                    stage.dump(update_pipeline=False)
                except Exception as e:  # noqa: BLE001 - e.g. an output the command did not write
                    r["tail"] = (r.get("tail") or "") + f"\nrecording it in dvc.lock: {type(e).__name__}: {e}"
                    self.fail(step, r, f"its command exited 0 but DVC could not record it: {e}")
                    continue
                step.state = "done"
                (self.out.cached if r.get("cached") else self.out.ran).append(step.name)
            elif step.state not in RESOLVED and not gaps:
                return

    def must_run(self, step: Step, stage) -> bool:
        """dvc repro's decision for a stage whose upstream is done: skip, restore or run."""
        from dvc.stage.cache import RunCacheNotFoundError
        if not stage.changed():
            step.state = "unchanged"
            self.out.unchanged.append(step.name)
            return False
        stage.remove_outs(ignore_remove=False, force=False)  # as Stage.run does
        try:
            self.repo.stage_cache.restore(stage)
        except RunCacheNotFoundError:
            return True
        step.state, step.result = "ended", {"rc": 0, "cached": True, "worker": None, "seconds": 0.0}
        self.line(f"cached {step.name}: outputs restored from DVC's run-cache")
        return False

    def submit(self, steps: list[Step], cmd: list[str]) -> None:
        """One Dask task running cmd for the steps (one stage, or training stages merged)."""
        name = " + ".join(s.name for s in steps)
        log_path = self.logs / (steps[0].name.replace("/", "_").replace(":", "_")
                                + (f"_and_{len(steps) - 1}_more" if len(steps) > 1 else "") + ".log")
        log_path.unlink(missing_ok=True)  # the log of this run only
        env = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}
        fut = self.client.submit(run_stage_command, name, cmd, steps[0].wdir, env, str(log_path), self.threads,
                                 self.stop_name, key=f"stage-{steps[0].name}-{uuid.uuid4().hex[:8]}", pure=False,
                                 resources={"GPU": 1} if steps[0].gpu else None)
        self.futures[fut] = steps
        for s in steps:
            s.state = "submitted"
            fut.add_done_callback(lambda f, s=s: self.finishing(s))
        if len(steps) > 1:
            self.line(f"merged {name} into one process on the GPU: {cmd[0]}")

    def start_ready(self, stages: dict) -> None:
        """Start what is ready; on a GPU, the training stages ready together as one command."""
        run_now = []
        for step in self.plan.values():
            if step.state == "waiting" and all(self.plan[u].state in ("done", "unchanged", "ended")
                                               for u in step.upstream):
                try:
                    if self.must_run(step, stages[step.name]):
                        run_now.append(step)
                except Exception as e:  # noqa: BLE001 - DVC could not check or prepare it
                    self.fail(step, {"rc": None, "tail": f"{type(e).__name__}: {e}"}, f"DVC could not prepare it: {e}")
        gpu = [s for s in run_now if s.gpu]
        merged = merge_training([s.cmd for s in gpu]) if len(gpu) > 1 else None
        for steps in ([gpu] if merged else [[s] for s in gpu]) + [[s] for s in run_now if not s.gpu]:
            self.submit(steps, [merged] if len(steps) > 1 else steps[0].cmd)

    def collect(self, done) -> None:
        for fut in sorted(done, key=lambda f: list(self.plan).index(self.futures[f][0].name)):
            steps = self.futures.pop(fut)
            try:
                r = fut.result()
            except Exception as e:  # noqa: BLE001 - e.g. KilledWorker: the task's workers kept dying
                r = {"rc": -1, "cancelled": False, "worker": steps[0].worker, "seconds": 0.0, "log": None,
                     "tail": f"{type(e).__name__}: {e}"}
            for step in steps:
                self.on_result(step, dict(r))

    def stages(self) -> dict:
        return {s.addressing: s for s in self.repo.index.stages}

    def loop(self, heartbeat_s: float) -> None:
        from distributed import wait
        from dvc.repo import lock_repo

        while True:
            with lock_repo(self.repo):  # one bookkeeping pass: record what ended, start what is ready
                stages, before = self.stages(), None
                while before != [s.state for s in self.plan.values()]:
                    before = [s.state for s in self.plan.values()]
                    self.record_in_order(stages)
                    self.start_ready(stages)
            if not self.futures:
                return
            try:
                done, _ = wait(list(self.futures), timeout=heartbeat_s, return_when="FIRST_COMPLETED")
            except TimeoutError:
                self.line("still running: " + ", ".join(s.name for s in self.plan.values() if s.state == "running"))
                continue
            self.collect(done)

    def interrupt(self) -> None:
        from distributed import Event, wait
        from dvc.repo import lock_repo

        self.say("interrupted: stopping the running stage commands (SIGINT, then SIGKILL) ...")
        Event(self.stop_name, client=self.client).set()
        with contextlib.suppress(TimeoutError, KeyboardInterrupt):
            wait(list(self.futures), timeout=INTERRUPT_GRACE_S + 15)
        self.collect([f for f in self.futures if f.status in ("finished", "error")])
        with lock_repo(self.repo):  # stages that ended before the stop are kept
            self.record_in_order(self.stages(), gaps=True)
        for step in self.plan.values():
            if step.state in ("submitted", "running", "finishing"):
                step.state = "interrupted"
                self.out.interrupted.append(step.name)
        self.futures.clear()


def run(root: str | Path = ".", targets: list[str] | None = None, workers: int = 2,
        scheduler: str | None = None, threads: int | None = None, stages_per_gpu: int = 1,
        device: str | None = None, say: Callable[[str], None] = print, heartbeat_s: float = 60.0) -> Outcome:
    """Run the stale stages of root's pipeline on Dask; dvc.lock records them as dvc repro would.

    workers: size of the local cluster (ignored with scheduler, the address of a running one);
    threads: CPU threads per stage (default: the host's cores over its task slots); device:
    params' train.device; stages_per_gpu: training stages sharing one GPU on a local cluster.
    """
    from distributed import Client
    from dvc.repo import Repo

    for name, value, ok in (("--workers", workers, scheduler is not None or workers >= 1),
                            ("--threads-per-worker", threads, threads is None or threads >= 1),
                            ("--stages-per-gpu", stages_per_gpu, stages_per_gpu >= 1)):
        if not ok:
            raise ParallelError(f"{name} {value}: expected at least 1")
    repo, cluster, client = Repo(str(Path(root).resolve())), None, None
    try:
        gpus_here = 0
        if scheduler is None and device in ("auto", "cuda"):
            import torch
            gpus_here = torch.cuda.device_count()
            if device == "cuda" and not gpus_here:
                raise ParallelError("train.device is cuda but torch sees no GPU here; use a cluster "
                                    "whose workers declare a GPU resource (--scheduler)")
        if scheduler is None:  # gpus_here: 0 unless train.device may want them
            cluster = local_cluster(workers, gpus_here, stages_per_gpu)
        client = Client(cluster or scheduler, timeout="30s")
        info = client.scheduler_info(n_workers=-1)["workers"]
        has_gpu = any((w.get("resources") or {}).get("GPU") for w in info.values())
        use_gpu = gpu_wanted(device or "cpu", has_gpu if scheduler else gpus_here > 0)
        if use_gpu and not has_gpu:
            raise ParallelError("train.device resolves to cuda but no Dask worker declares a GPU "
                                "resource; start workers with --resources GPU=1")
        plan = make_plan(repo, targets, gpu_training=use_gpu)
        c = _Coordinator(repo, plan, client, threads_per_worker(client, threads), say)
        client.subscribe_topic(TOPIC, c.on_event)
        say(f"plan: {len(plan)} stages in dvc repro's order; {len(info)} Dask workers ({', '.join(sorted(info))}); "
            f"threads per stage: {sorted(set(c.threads.values()))}; GPU for training: {'yes' if use_gpu else 'no'}")
        try:
            c.loop(heartbeat_s)
        except KeyboardInterrupt:
            c.interrupt()
        o = c.out
        say(f"finished: {len(o.ran)} ran, {len(o.cached)} restored from the run-cache, {len(o.unchanged)} "
            f"unchanged, {len(o.failed)} failed, {len(o.blocked)} blocked, {len(o.interrupted)} interrupted")
        return o
    finally:
        for thing in (client, cluster, repo):
            if thing is not None:
                thing.close()


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
