"""The whole study on a GPU node without DVC or network, sized to a time budget.

    python -m offline.study --parts transfer/cifar10 --out OUT --budget-s 540
    python -m offline.study --describe --ips 500000     (the plan and projected minutes only)

1. The CIFAR-10 copy is reassembled from its parts (offline/pack.py) and checked.
2. The training-step variants are checked and timed (iqals/probe.py); the fastest that
   passed is chosen (cached in the work folder: `--probe-only` does it in a short first command).
3. For each profile (params.yaml plus the overrides of offline/config.yaml) the pipeline's own
   stage modules run as subprocesses, in the order `dvc repro` runs them: the commands are
   expanded from dvc.yaml exactly as DVC expands them (tests/test_gpu_study.py compares both),
   the training stages becoming grouped `stages.train --run S:k ...` calls.
4. First the converged schedule, then the longest schedule of the list whose projected time fits
   what is left of the budget; or, given --epochs, --seeds or --strategies, that one profile.
5. After every stage the profile's results go into OUT/<profile>.tar (params, run.json, probe,
   logs, metrics, compact predictions, plots; no models), so a run cut short leaves what
   finished; offline/results.py turns the tar into results/<profile>/.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import io
import itertools
import json
import logging
import lzma
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np
import yaml

from iqals import params as params_lib
from iqals.data import SPLITS, sha256
from iqals.errors import ExpectedError
from iqals.io import atomic_path, write_json
from iqals.params import ParamError

from offline.pack import PackError
from stages.common import run

log = logging.getLogger("gpu_study")

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "offline/config.yaml"
ARCHIVE_CAP = 15 * 2**20  # bytes per archive file: the device returns files of at most 16 MiB


DATA_STAGES = ("download", "distort", "score", "corrupt")  # run once for profiles with the same data sections


class StudyError(ExpectedError, RuntimeError):
    """The study cannot go on: bad configuration, a stage failed, or no time left."""


# ------------------------------------------------------------------ configuration

@dataclass(frozen=True)
class Config:
    name: str
    stage_order: tuple[str, ...]
    cpu_only: tuple[str, ...]    # dvc.yaml stages the driver leaves to a CPU with DVC
    common: dict
    converged: dict
    long_epochs: tuple[int, ...]
    decay_ratio: float
    probe_seconds: float
    margin_seconds: float
    slowdown: float              # real training epochs vs the probe's synthetic ones
    after_training_seconds: float  # evaluate and report, when no measured time says otherwise


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: no such study configuration (expected a file like offline/config.yaml)")
    raw = yaml.safe_load(path.read_text())
    want = {"name", "stage_order", "cpu_only", "common", "converged", "long", "probe_seconds", "margin_seconds", "fit"}
    if not isinstance(raw, dict) or set(raw) != want:
        raise StudyError(f"{path}: expected exactly the keys {sorted(want)}, got {sorted(raw or {})}")
    long = raw["long"]
    if not isinstance(long, dict) or set(long) != {"epochs", "decay_ratio"}:
        raise StudyError(f"{path}: long: expected the keys epochs and decay_ratio, got {long!r}")
    epochs = long["epochs"]
    if not isinstance(epochs, list) or not all(isinstance(e, int) and e > 0 for e in epochs):
        raise StudyError(f"{path}: long.epochs = {epochs!r}: expected a list of positive integers")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", str(raw["name"])):
        raise StudyError(f"{path}: name = {raw['name']!r}: expected letters, digits, '_' or '-'")
    for key in ("common", "converged"):
        if not isinstance(raw[key], dict):
            raise StudyError(f"{path}: {key}: expected a mapping of dotted params keys to values")
    fit = raw["fit"]
    if (not isinstance(fit, dict) or set(fit) != {"slowdown", "after_training_seconds"}
            or not all(isinstance(v, (int, float)) and v > 0 for v in fit.values())):
        raise StudyError(f"{path}: fit: expected positive slowdown and after_training_seconds, got {fit!r}")
    return Config(name=str(raw["name"]), stage_order=tuple(raw["stage_order"]),
                  cpu_only=tuple(raw["cpu_only"] or ()), common=raw["common"],
                  converged=raw["converged"], long_epochs=tuple(sorted(epochs, reverse=True)),
                  decay_ratio=float(long["decay_ratio"]), probe_seconds=float(raw["probe_seconds"]),
                  margin_seconds=float(raw["margin_seconds"]),
                  slowdown=float(fit["slowdown"]), after_training_seconds=float(fit["after_training_seconds"]))


def with_overrides(raw_params: dict, overrides: dict) -> dict:
    """A deep copy of params.yaml's mapping with dotted-key overrides, validated as a whole."""
    out = params_lib.with_overrides(raw_params, overrides, "override")
    params_lib.parse(out)  # a bad override fails here, naming the key, before any work
    return out


def long_overrides(epochs: int, ratio: float) -> dict:
    """The paper's schedule shape: decay every ratio x epochs epochs, rounded half up (350 of 2000)."""
    decay = int(Decimal(str(ratio)) * epochs + Decimal("0.5"))  # half up, in decimal: 300 -> 53
    return {"train.epochs": epochs, "train.lr_decay_epochs": max(1, decay)}


def one_profile(cfg: Config, raw_params: dict, epochs: int | None = None, seeds: list[int] | None = None,
                strategies: list[str] | None = None) -> dict:
    """The overrides of a single profile: the converged one with another schedule (decay at the
    paper's ratio), seeds or subset of strategies (in params.yaml's order)."""
    out = dict(cfg.converged)
    if epochs is not None:
        out.update(long_overrides(epochs, cfg.decay_ratio))
    if seeds is not None:
        out["train.seeds"] = list(seeds)
    if strategies is not None:
        known = raw_params["strategies"]
        if not strategies or set(strategies) - set(known):
            raise StudyError(f"--strategies {','.join(strategies)}: expected some of {', '.join(known)}")
        if need := [s for s in raw_params["report"]["fig4_strategies"] if s not in strategies]:
            raise StudyError(f"--strategies {','.join(strategies)}: Figure 4 (report.fig4_strategies) needs {', '.join(need)}")
        out["strategies"] = {s: v for s, v in known.items() if s in strategies}
    return out


def profile_name(cfg: Config, epochs: int) -> str:
    return f"{cfg.name}_e{epochs}"


# ------------------------------------------------------------------ the plan, from dvc.yaml

_REF = re.compile(r"\$\{\s*([^}]*?)\s*\}")


def _lookup(ctx: dict, path: str):
    node = ctx
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise StudyError(f"dvc.yaml: ${{{path}}} is not defined (params.yaml, vars, item or key)")
    return node


def _interpolate(value, ctx: dict):
    """DVC's ${...}: a string that is one reference takes the value itself; others are formatted."""
    if not isinstance(value, str):
        return value
    whole = _REF.fullmatch(value)
    if whole:
        return _lookup(ctx, whole.group(1))
    return _REF.sub(lambda m: str(_lookup(ctx, m.group(1))), value)


def expand_stages(dvc: dict, raw_params: dict) -> list[tuple[str, str, str]]:
    """(instance name, stage name, command) of every stage in dvc.yaml, as DVC expands them:
    matrix as the product of its lists in key order (name@v1-v2), foreach over a mapping
    (name@key). Raises on forms this project does not use rather than guessing."""
    ctx = copy.deepcopy(raw_params)
    for entry in dvc.get("vars", []):
        if not isinstance(entry, dict):
            raise StudyError(f"dvc.yaml vars: only inline mappings are supported, got {entry!r}")
        ctx.update(entry)
    out = []
    for name, st in dvc["stages"].items():
        if "matrix" in st:
            keys = list(st["matrix"])
            lists = [_interpolate(st["matrix"][k], ctx) for k in keys]
            for combo in itertools.product(*lists):
                if not all(isinstance(v, (str, int, float)) for v in combo):
                    raise StudyError(f"dvc.yaml {name}: matrix values must be scalars")
                item = dict(zip(keys, combo))
                out.append((f"{name}@{'-'.join(str(v) for v in combo)}", name,
                            _interpolate(st["cmd"], {**ctx, "item": item})))
        elif "foreach" in st:
            over = _interpolate(st["foreach"], ctx)
            if not isinstance(over, dict):
                raise StudyError(f"dvc.yaml {name}: foreach over a mapping is supported, got {type(over).__name__}")
            for key, item in over.items():
                out.append((f"{name}@{key}", name, _interpolate(st["do"]["cmd"], {**ctx, "key": key, "item": item})))
        else:
            out.append((name, name, _interpolate(st["cmd"], ctx)))
    for _, name, cmd in out:
        if not isinstance(cmd, str):
            raise StudyError(f"dvc.yaml {name}: cmd must be one command string")
    return out


def _strategy_of(cmd: str) -> str | None:
    argv = shlex.split(cmd)
    return next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--strategy"), None)


def plan(dvc: dict, raw_params: dict, stage_order: tuple[str, ...],
         cpu_only: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """expand_stages in the order `dvc repro` runs them (stage_order, then dvc.yaml's order),
    without the stages of strategies that params' `strategies` leaves out (`one_profile`; DVC
    itself would refuse such a params.yaml), and without the `cpu_only` stages."""
    stages = [s for s in expand_stages(dvc, raw_params) if _strategy_of(s[2]) in (None, *raw_params["strategies"])
              and s[1] not in cpu_only]
    names = list(dict.fromkeys(s for _, s, _ in stages))
    if sorted(names) != sorted(stage_order):
        raise StudyError(f"stage_order {list(stage_order)} does not list exactly dvc.yaml's stages {names}: "
                         "update offline/config.yaml from `dvc repro --dry --force`")
    return sorted(stages, key=lambda s: stage_order.index(s[1]))  # sort is stable


@dataclass(frozen=True)
class Run:
    strategy: str
    seed: int
    scores: str | None


def train_runs(cmd: str, seeds) -> list[Run]:
    """The (strategy, seed, scores) runs of a `python -m stages.train` command (without --seed:
    one per seed of train.seeds, as the stage trains them); [] for other stages."""
    argv = shlex.split(cmd)
    if argv[:3] != ["python", "-m", "stages.train"]:
        return []
    opts = dict(zip(argv[3::2], argv[4::2]))
    if set(opts) - {"--strategy", "--seed", "--scores"} or "--strategy" not in opts or len(argv[3:]) % 2:
        raise StudyError(f"dvc.yaml train command {cmd!r}: expected --strategy S [--seed k] [--scores DIR]")
    ks = [int(opts["--seed"])] if "--seed" in opts else list(seeds)
    return [Run(opts["--strategy"], k, opts.get("--scores")) for k in ks]


def group_commands(runs: list[Run], group: int) -> list[list[str]]:
    """Grouped training calls: `group` runs per process, in DVC's order, --scores iff one needs it."""
    scores = {r.scores for r in runs if r.scores}
    if len(scores) > 1:
        raise StudyError(f"training stages read scores from several places {sorted(scores)}")
    out = []
    for i in range(0, len(runs), group):
        chunk = runs[i:i + group]
        argv = ["python", "-m", "stages.train"]
        for r in chunk:
            argv += ["--run", f"{r.strategy}:{r.seed}"]
        if any(r.scores for r in chunk):
            argv += ["--scores", next(iter(scores))]
        out.append(argv)
    return out


def runs_of(argv: list[str]) -> list[tuple[str, str]]:
    """(strategy, seed) of each --run S:k of a grouped training call."""
    return [tuple(argv[j + 1].split(":")) for j, a in enumerate(argv) if a == "--run"]


def evaluate_command(cmds: list[str]) -> list[str]:
    """The evaluate stages' commands (`python -m stages.evaluate --strategy S`) as one call."""
    argvs = [shlex.split(c) for c in cmds]
    if any(a[:3] != ["python", "-m", "stages.evaluate"] or a[3::2] != ["--strategy"] for a in argvs):
        raise StudyError(f"dvc.yaml evaluate commands {cmds[:2]}...: expected python -m stages.evaluate --strategy S")
    return argvs[0][:3] + [x for a in argvs for x in a[3:]]


def stage_env(repo: Path, **extra: str) -> dict:
    """The environment of a stage command run outside DVC: `repo` first on PYTHONPATH, unbuffered."""
    path = [str(repo)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1", **extra)


def with_python(argv: list[str]) -> list[str]:
    """A dvc.yaml command's argv with its leading `python` made this interpreter."""
    return [sys.executable] + argv[1:] if argv and argv[0] == "python" else argv


def data_sections(raw_params: dict) -> dict:
    """What the data stages read: everything but training, strategies, evaluation and report."""
    return {k: v for k, v in raw_params.items() if k not in ("train", "strategies", "evaluate", "report")}


# ------------------------------------------------------------------ compact predictions

def compact_predictions(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 probabilities (..., K) -> (argmax uint8, float16 probabilities whose argmax is the
    same): where rounding to float16 ties or reorders the top class, its value is raised by
    the fewest float16 steps that make it the strict maximum again."""
    pred = probs.argmax(-1).astype(np.uint8)
    p16 = probs.astype(np.float16)
    bad = np.flatnonzero((p16.argmax(-1) != pred).ravel())
    flat, fp = p16.reshape(-1, probs.shape[-1]), pred.ravel()
    for i in bad:
        top = flat[i].max()
        flat[i, fp[i]] = np.nextafter(top, np.float16(np.inf))
    return pred, p16


def pack_predictions(path: Path) -> bytes:
    """An evaluate stage's data/predictions/<S>.npz -> xz-compressed compact npz bytes."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["pred"], arrays["probs"] = compact_predictions(arrays["probs"])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return lzma.compress(buf.getvalue(), preset=6)


# ------------------------------------------------------------------ the archive in <out>

class Archive:
    """A profile's results as tar volumes <out>/<name>.tar (then <name>.2.tar ...), each under
    ARCHIVE_CAP, rewritten atomically after every stage so that a cut-off run leaves the last
    complete state."""

    def __init__(self, out: Path, name: str, cap: int = ARCHIVE_CAP):
        self.out, self.name, self.cap = Path(out), name, cap
        self.members: dict[str, bytes] = {}

    def add(self, member: str, data: bytes) -> None:
        self.members[member] = data

    def add_file(self, member: str, path: Path) -> None:
        self.members[member] = Path(path).read_bytes()

    @staticmethod
    def _tar_bytes(sizes: list[int]) -> int:
        """Upper bound of a tar's size: a header (and room for an extended one) per member, data
        in 512-byte blocks, two end blocks, all padded to tarfile's 10240-byte records."""
        body = sum(1024 + -(-n // 512) * 512 for n in sizes) + 1024
        return -(-body // tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    def volumes(self) -> list[list[str]]:
        vols, sizes = [[]], []
        for m, data in self.members.items():
            if self._tar_bytes([len(data)]) > self.cap:
                raise StudyError(f"{self.name}: {m} alone ({len(data)} bytes) exceeds an archive file")
            if self._tar_bytes(sizes + [len(data)]) > self.cap:
                vols.append([])
                sizes = []
            vols[-1].append(m)
            sizes.append(len(data))
        return vols

    def flush(self) -> list[Path]:
        paths = []
        for i, members in enumerate(self.volumes()):
            path = self.out / (f"{self.name}.tar" if i == 0 else f"{self.name}.{i + 1}.tar")
            with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                for m in members:
                    info = tarfile.TarInfo(m)
                    info.size, info.mtime = len(self.members[m]), int(time.time())
                    tar.addfile(info, io.BytesIO(self.members[m]))
            paths.append(path)
        return paths


# ------------------------------------------------------------------ budget

def choose_epochs(candidates, projected, remaining: float):
    """The largest candidate epoch count whose projected seconds fit `remaining`; None if none."""
    for e in sorted(candidates, reverse=True):
        if projected(e) <= remaining:
            return e
    return None


def fit_seeds(seeds: list, fits) -> list:
    """The longest prefix of `seeds` whose count k passes fits(k); at least the first seed."""
    k = next((k for k in range(len(seeds), 0, -1) if fits(k)), 1)
    return list(seeds[:k])


@dataclass
class Timing:
    """Measured times of one profile, from which a longer schedule is projected."""
    epochs: int
    runs: int = 1                 # training runs (strategies x seeds)
    train_s: float = 0.0          # wall time of all training calls
    train_epoch_s: float = 0.0    # of which inside epochs (sum over calls of one run's epoch seconds)
    other_s: float = 0.0          # evaluate and report

    def project(self, epochs: int, runs: int | None = None) -> float:
        """Seconds of a profile of `epochs` epochs and `runs` runs (default: this one's): the
        time inside epochs scales with both, the calls' start-up time does not."""
        fixed = max(self.train_s - self.train_epoch_s, 0.0)
        per_epoch = (self.train_s - fixed) / self.epochs * (runs or self.runs) / self.runs
        return fixed + per_epoch * epochs + self.other_s


def _sha256(path: Path) -> str | None:
    return sha256(path) if path.is_file() else None


# the modules a probe runs (iqals/probe.py and what it imports): a cached probe holds while they do
PROBE_SOURCES = ("probe", "model", "train", "mixture", "params", "seeds")


def probe_key(torch_version: str, device_name: str) -> str:
    """Identity of a probe's result: the training-step sources it ran, torch and the device."""
    h = hashlib.sha256()
    for m in PROBE_SOURCES:
        h.update((REPO / "iqals" / f"{m}.py").read_bytes())
    return f"{h.hexdigest()[:16]}-{torch_version}-{device_name}"


SOURCES = ("iqals", "stages")  # the code a run's results depend on: their top-level *.py files


def _source_hash(files) -> str:
    """sha256 over (path, contents) pairs, in path order."""
    h = hashlib.sha256()
    for name, data in sorted(files):
        h.update(name.encode() + b"\0" + data)
    return h.hexdigest()[:16]


def code_version(repo: Path) -> dict:
    """Which code ran: a sha256 of iqals/ and stages/ (any checkout can be matched against it:
    `commit_of_sources`), and the git commit where the tree is a checkout (the device's copy may
    be none, or hold older git metadata than its files)."""
    files = [(f.relative_to(repo).as_posix(), f.read_bytes()) for d in SOURCES for f in repo.glob(f"{d}/*.py")]
    git = [["git", "rev-parse", "HEAD"], ["git", "status", "--porcelain", "--", *SOURCES]]
    try:
        head, dirty = (subprocess.run(a, cwd=repo, capture_output=True, text=True, timeout=30) for a in git)
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs
        head = dirty = None
    commit = head.stdout.strip() if head is not None and head.returncode == 0 else None
    return {"source_sha256": _source_hash(files), "commit": commit,
            "uncommitted_changes": bool(dirty.stdout.strip()) if commit else None}


def commit_of_sources(repo: Path, source_sha256: str) -> str | None:
    """The newest commit of repo's history whose iqals/ and stages/ hash to source_sha256 (the
    commit that last changed them to that state); None if none does or there is no git."""
    def git(*a, **kw):
        return subprocess.run(["git", *a], cwd=repo, capture_output=True, check=True, timeout=120, **kw).stdout
    try:
        for commit in git("log", "--format=%H", "--", *SOURCES).decode().split():
            names = [n for n in git("ls-tree", "--name-only", commit, *(f"{d}/" for d in SOURCES)).decode().split("\n")
                     if n.endswith(".py")]
            out, files = git("cat-file", "--batch", input="".join(f"{commit}:{n}\n" for n in names).encode()), []
            for n in names:  # each: "<sha> blob <size>\n<contents>\n"
                header, out = out.split(b"\n", 1)
                size = int(header.split()[2])
                files.append((n, out[:size]))
                out = out[size + 1:]
            if _source_hash(files) == source_sha256:
                return commit
    except (OSError, subprocess.SubprocessError):
        return None
    return None


def _epoch_seconds(tsv: Path) -> float:
    lines = tsv.read_text().splitlines()
    col = lines[0].split("\t").index("seconds")
    return sum(float(x.split("\t")[col]) for x in lines[1:])


# ------------------------------------------------------------------ the study

class Study:
    def __init__(self, repo: Path, work: Path, out: Path, cfg: Config, budget_s: float):
        self.repo, self.work, self.out, self.cfg = repo.resolve(), work.resolve(), out.resolve(), cfg
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s - cfg.margin_seconds  # what plans may use
        self.hard_stop = self.t0 + budget_s  # a stage still running then is stopped
        self.stage_log = self.out / "stages.log"
        self.env = stage_env(self.repo, TQDM_MININTERVAL="15", CIFAR10_LOCAL=str(self.work / "cifar10"))

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # -- running stage commands
    def _run(self, argv: list[str]) -> int | str:
        """One stage command in the work folder, its output appended to stages.log; stopped (SIGTERM,
        then SIGKILL) at the end of --budget-s."""
        argv = with_python(argv)
        with open(self.stage_log, "ab") as f:
            f.write(f"\n===== {time.strftime('%H:%M:%S')} {shlex.join(argv)}\n".encode())
            f.flush()
            p = subprocess.Popen(argv, cwd=self.work / "run", env=self.env, stdout=f, stderr=subprocess.STDOUT)
            try:
                return p.wait(timeout=max(0.1, self.hard_stop - time.monotonic()))
            except subprocess.TimeoutExpired:  # leave time to write what finished
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                return "stopped at the end of --budget-s"

    def run_commands(self, label: str, cmds: list[list[str]], after=None) -> list[dict]:
        """Run commands one after another, `after(i)` as each one succeeds; stop at the first failure."""
        results = []
        for i, argv in enumerate(cmds):
            t = time.monotonic()
            rc = self._run(argv)
            r = {"cmd": shlex.join(argv), "seconds": round(time.monotonic() - t, 2), "rc": rc}
            results.append(r)
            log.info("%s %d/%d: %s  (%.1f s, rc %s; study at %.0f s, %.0f s left)", label, i + 1, len(cmds),
                     r["cmd"], r["seconds"], rc, self.elapsed(), self.left())
            if rc != 0:
                tail = self.stage_log.read_bytes()[-3000:].decode(errors="replace")
                err = StudyError(f"stage failed (rc {rc}): {r['cmd']}\n--- end of stages.log ---\n{tail}")
                err.calls = results
                raise err
            if after:
                after(i)
        return results

    # -- steps
    def unpack(self, parts: Path) -> None:
        from offline.pack import unpack
        t = time.monotonic()
        unpack(parts, self.work / "cifar10")
        log.info("data reassembled and checked from %s in %.1f s", parts, time.monotonic() - t)

    def choose_variant(self, p, probe_seconds: float) -> dict:
        """Smoke check and timing probe (cached in the work folder for the same code and device)."""
        import torch

        from iqals import model as model_lib
        try:
            from iqals import probe
        except ImportError as e:
            raise StudyError(f"the training-step probe (iqals/probe.py) is missing: {e}") from None
        device = model_lib.pick_device(p.train.device)
        key = probe_key(torch.__version__,
                        torch.cuda.get_device_name() if device.type == "cuda" else platform.processor())
        cache = self.work / "probe.json"
        cached = json.loads(cache.read_text()) if cache.is_file() else {}
        if cached.get("key") == key:
            result = cached
            log.info("variant from the earlier probe (%s): %s", cache, result["chosen"])
        else:
            t = time.monotonic()
            # what this tool trains: 51 runs in groups of 17 or 51, a layout the train stage runs
            candidates = [v for v in probe.VARIANTS if v == probe.VARIANTS[0] or (
                v["group"] >= 17 and v.get("layout", "channels") in probe.TRAINABLE_LAYOUTS)]
            results = probe.probe(p, device, probe_seconds, candidates)
            chosen = probe.choose(results)
            result = {"key": key, "device": str(device), "seconds": round(time.monotonic() - t, 1),
                      "results": results, "chosen": chosen}
            write_json(cache, result)
            for r in results:
                log.info("probe: %s", json.dumps(r, default=str))
            log.info("probe %.1f s; chosen: %s", time.monotonic() - t, chosen)
        shutil.copy(cache, self.out / "probe.json")
        if result["chosen"] is None:
            raise StudyError("no training-step variant passed the smoke check (see probe.json)")
        return result["chosen"]

    def fit_training(self, raw_params: dict, variant: dict) -> dict:
        """raw_params with the most of its seeds whose training, at the probe's images/s slowed by
        fit.slowdown, and evaluate and report (fit.after_training_seconds) fit the time left."""
        ips, seeds = variant.get("images_per_s"), raw_params["train"]["seeds"]
        if not ips:
            return raw_params
        n_images = raw_params["base"]["train_size"] or SPLITS["train"]
        per_seed = len(raw_params["strategies"]) * raw_params["train"]["epochs"] * n_images / ips * self.cfg.slowdown

        def fits(k):
            return k * per_seed + self.cfg.after_training_seconds <= self.left()
        kept = fit_seeds(seeds, fits)
        log.info("training projected at %.0f s per seed (%.0f img/s from the probe, x%.2f); %.0f s left: "
                 "seeds %s%s", per_seed, ips, self.cfg.slowdown, self.left(), kept,
                 "" if kept == list(seeds) else f" of {list(seeds)} (the others do not fit)")
        return raw_params if kept == list(seeds) else with_overrides(raw_params, {"train.seeds": kept})

    def run_profile(self, name: str, raw_params: dict, variant: dict, dvc: dict, data_done: bool,
                    fit: bool = False) -> Timing:
        """One profile: data stages (once), grouped training, evaluate, report; archived as it goes.
        With `fit`, the seeds are cut to what fits the time left when training starts."""
        p = params_lib.parse(raw_params)
        run_dir = self.work / "run"
        for d in ("models", "logs", "plots", "data/predictions"):  # nothing of another profile
            shutil.rmtree(run_dir / d, ignore_errors=True)
        for s in p.strategies:
            (run_dir / "metrics" / f"{s}.json").unlink(missing_ok=True)
        params_text = yaml.safe_dump(raw_params, sort_keys=False)
        (run_dir / "params.yaml").write_text(params_text)
        arc = Archive(self.out, name)
        arc.add("params.yaml", params_text.encode())
        info = {"profile": name, "status": "running", "epochs": p.train.epochs,
                "lr_decay_epochs": p.train.lr_decay_epochs, "seeds": list(p.train.seeds),
                "strategies": list(p.strategies), "variant": variant, "stages": [],
                "python": platform.python_version(), "cpus": os.cpu_count(), "code": code_version(self.repo)}
        try:
            import torch
            info["torch"] = torch.__version__
            info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
        except ImportError:
            pass

        def save(status=None):
            if status:
                info["status"] = status
            arc.add("run.json", (json.dumps(info, indent=2, default=str) + "\n").encode())
            for f in ("probe.json", "study.log"):  # the choice of variant and the driver's log so far
                if (self.out / f).is_file():
                    arc.add_file(f, self.out / f)
            arc.flush()

        timing = Timing(epochs=p.train.epochs)
        steps = plan(dvc, raw_params, self.cfg.stage_order, self.cfg.cpu_only)
        train_stages = {s for _, s, c in steps if train_runs(c, raw_params["train"]["seeds"])}
        if data_done:  # from an earlier profile, unchanged since: hashed once
            self._archive_data(arc, info)
        try:
            for stage in self.cfg.stage_order:
                cmds = [c for _, s, c in steps if s == stage]
                t = time.monotonic()
                if stage in train_stages:
                    if stage != next(s for s in self.cfg.stage_order if s in train_stages):
                        continue  # all training stages run together, in the first one's turn
                    if fit and (fitted := self.fit_training(raw_params, variant)) is not raw_params:
                        raw_params, steps = fitted, plan(dvc, fitted, self.cfg.stage_order, self.cfg.cpu_only)
                        params_text = yaml.safe_dump(raw_params, sort_keys=False)
                        (run_dir / "params.yaml").write_text(params_text)
                        arc.add("params.yaml", params_text.encode())
                        info["seeds_planned"], info["seeds"] = info["seeds"], raw_params["train"]["seeds"]
                    runs = [r for _, s, c in steps if s in train_stages
                            for r in train_runs(c, raw_params["train"]["seeds"])]
                    argvs = group_commands(runs, int(variant.get("group", 1)))

                    def after_train(i, argvs=argvs):
                        for s, k in runs_of(argvs[i]):
                            arc.add_file(f"logs/{s}/seed{k}.tsv", run_dir / "logs" / s / f"seed{k}.tsv")
                        save()
                    res = self.run_commands(f"{name} train", argvs, after_train)
                    timing.train_s, timing.runs = time.monotonic() - t, len(runs)
                    for argv in argvs:  # the first run of a call stands for the call's epochs
                        s, k = runs_of(argv)[0]
                        timing.train_epoch_s += _epoch_seconds(run_dir / "logs" / s / f"seed{k}.tsv")
                    label = "train"
                elif data_done and stage in DATA_STAGES:
                    continue
                elif stage == "evaluate":  # one process: one CUDA context, the models one after another
                    try:
                        res = self.run_commands(f"{name} {stage}", [evaluate_command(cmds)])
                    finally:  # what finished is kept, also when the call was stopped
                        for s in p.strategies:
                            if (run_dir / "metrics" / f"{s}.json").is_file():  # written after the predictions
                                arc.add_file(f"metrics/{s}.json", run_dir / "metrics" / f"{s}.json")
                                arc.add(f"predictions/{s}.npz.xz",
                                        pack_predictions(run_dir / "data/predictions" / f"{s}.npz"))
                    timing.other_s += time.monotonic() - t
                    label = stage
                else:
                    res = self.run_commands(f"{name} {stage}", [shlex.split(c) for c in cmds])
                    if stage == "report":
                        timing.other_s += time.monotonic() - t
                    label = stage
                info["stages"].append({"stage": label, "seconds": round(time.monotonic() - t, 2), "calls": res})
                if stage == "report":
                    for f in sorted((run_dir / "plots").iterdir()):
                        arc.add_file(f"plots/{f.name}", f)
                if stage in DATA_STAGES:
                    self._archive_data(arc, info)
                save()
        except BaseException as e:
            if getattr(e, "calls", None):  # the stage that failed, with the time of each call
                label = "train" if stage in train_stages else stage
                info["stages"].append({"stage": label, "seconds": round(time.monotonic() - t, 2), "calls": e.calls})
            save(f"failed: {str(e).splitlines()[0]}")
            raise
        save("complete")
        log.info("%s complete: train %.1f s (%.1f s in epochs), evaluate+report %.1f s", name,
                 timing.train_s, timing.train_epoch_s, timing.other_s)
        return timing

    def _archive_data(self, arc: Archive, info: dict) -> None:
        """The data stages' metrics and the checksums of what the report reads besides results."""
        run_dir = self.work / "run"
        for m in ("distort", "score", "corrupt"):
            if (run_dir / "metrics" / f"{m}.json").is_file():
                arc.add_file(f"metrics/{m}.json", run_dir / "metrics" / f"{m}.json")
        if (run_dir / "data/raw/source.json").is_file():
            arc.add_file("data/source.json", run_dir / "data/raw/source.json")
        info["data_sha256"] = {f: _sha256(run_dir / f) for f in (
            "data/raw/train.npz", "data/raw/test.npz", "data/distorted/test.npy",
            "data/scores/train.npy", "data/scores/test.npy")}


def describe(cfg: Config, ips: list[float], group: int, repo: Path = REPO) -> str:
    """The plan of a study without running it: the converged profile's commands (training
    grouped by `group`) and, for each schedule, the training images and the projected minutes
    of training at each of the given images/s (summed over runs). Stages, probe and start-up
    are not included: they are measured on the machine."""
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())
    first = with_overrides(with_overrides(raw, cfg.common), cfg.converged)
    steps = plan(dvc, first, cfg.stage_order, cfg.cpu_only)
    runs = [r for _, _, c in steps for r in train_runs(c, first["train"]["seeds"])]
    lines, train_done = [f"# {profile_name(cfg, first['train']['epochs'])}: the commands, in order"], False
    for _, stage, cmd in steps:
        if train_runs(cmd, first["train"]["seeds"]):
            if not train_done:
                lines += [shlex.join(g) for g in group_commands(runs, group)]
            train_done = True
        else:
            lines.append(cmd)
    n = first["base"]["train_size"] or SPLITS["train"]
    lines += ["", f"# training: {len(runs)} runs x epochs x {n} images; minutes at the given images/s",
              "| schedule | lr decay every | training images | " + " | ".join(f"{x:,.0f} img/s" for x in ips) + " |",
              "|---|---|---|" + "---|" * len(ips)]
    schedules = [(first["train"]["epochs"], first["train"]["lr_decay_epochs"])]
    schedules += [(e, long_overrides(e, cfg.decay_ratio)["train.lr_decay_epochs"]) for e in cfg.long_epochs]
    for e, d in schedules:
        images = len(runs) * e * n
        lines.append(f"| {e} epochs | {d} | {images:,} | " + " | ".join(f"{images / x / 60:,.1f}" for x in ips) + " |")
    return "\n".join(lines)


def run_study(parts: Path | None, work: Path, out: Path, config: Path, budget_s: float,
              probe_only: bool = False, probe_seconds: float | None = None, device: str | None = None,
              repo: Path = REPO, epochs: int | None = None, seeds: list[int] | None = None,
              strategies: list[str] | None = None) -> dict:
    """The whole study (module docstring); returns {profile: status}. Given epochs, seeds or
    strategies: that one profile only (`one_profile`), no longer schedule after it."""
    cfg = load_config(config)
    out.mkdir(parents=True, exist_ok=True)
    (work / "run").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "study.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    try:
        study = Study(repo, work, out, cfg, budget_s)
        raw = yaml.safe_load((repo / "params.yaml").read_text())
        dvc = yaml.safe_load((repo / "dvc.yaml").read_text())
        base = with_overrides(raw, {**cfg.common, **({"train.device": device} if device else {})})
        single = not (epochs is None and seeds is None and strategies is None)
        first = with_overrides(base, one_profile(cfg, base, epochs, seeds, strategies))
        plan(dvc, first, cfg.stage_order, cfg.cpu_only)  # dvc.yaml and stage_order agree, before any work
        if parts is not None and not probe_only:
            from offline.pack import check_parts
            check_parts(parts)  # every part here and intact, before the probe
        log.info("study %s: budget %.0f s (margin %.0f s), work %s, out %s", cfg.name, budget_s,
                 cfg.margin_seconds, work, out)
        variant = study.choose_variant(params_lib.parse(first),
                                       cfg.probe_seconds if probe_seconds is None else probe_seconds)
        if probe_only:
            return {"probe": "complete"}
        if parts is not None:
            study.unpack(parts)
        elif not (work / "cifar10" / "train.npz").is_file():
            raise StudyError(f"no --parts given and no reassembled copy in {work / 'cifar10'}")
        ref = work / "run" / "reference"
        if not ref.exists():
            ref.symlink_to(repo / "reference", target_is_directory=True)
        vo = {"train.precision": variant["precision"], "train.step": variant["step"]}
        status = {}
        name = profile_name(cfg, int(first["train"]["epochs"]))
        log.info("%s: %d strategies x %d seeds, %d epochs (%.0f s left)", name, len(first["strategies"]),
                 len(first["train"]["seeds"]), first["train"]["epochs"], study.left())
        timing = study.run_profile(name, with_overrides(first, vo), variant, dvc, data_done=False, fit=True)
        status[name] = "complete"
        if single:
            return status
        # the longest schedule that fits with every seed; else with fewer (at least one)
        seeds, n_strategies = list(base["train"]["seeds"]), len(base["strategies"])
        projected = {e: round(timing.project(e, n_strategies * len(seeds)), 1) for e in cfg.long_epochs}
        log.info("projected seconds per schedule, every seed (from %s): %s; %.0f s left", name, projected, study.left())
        for k in range(len(seeds), 0, -1):
            e = choose_epochs(cfg.long_epochs, lambda e: timing.project(e, n_strategies * k), study.left())
            if e is not None:
                break
        if e is None:
            log.info("no longer schedule fits the %.0f s left, even with one seed", study.left())
            return status
        long_raw = with_overrides(base, {**long_overrides(e, cfg.decay_ratio), **vo, "train.seeds": seeds[:k]})
        name = profile_name(cfg, e)
        log.info("%s: %d epochs, lr decay every %d, seeds %s (projected %.0f s)", name, e,
                 long_raw["train"]["lr_decay_epochs"], seeds[:k], timing.project(e, n_strategies * k))
        same_data = data_sections(long_raw) == data_sections(first)
        study.run_profile(name, long_raw, variant, dvc, data_done=same_data)
        status[name] = "complete"
        log.info("study done in %.0f s", study.elapsed())
        return status
    except Exception as e:
        log.error("study stopped: %s", e)
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


# ---------------------------------------------------------------- command line

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=Path, default=None,
                    help="folder of the data parts (transfer/cifar10); omit to reuse an earlier reassembly")
    ap.add_argument("--out", type=Path, help="where the archives and logs go ($OUT)")
    ap.add_argument("--budget-s", type=float, help="seconds this command may take in all")
    ap.add_argument("--work", type=Path, default=Path("gpu_work"), help="scratch folder (ignored by git)")
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--probe-only", action="store_true", help="stop after the smoke check and probe")
    ap.add_argument("--probe-s", type=float, default=None, help="override probe_seconds of the config")
    ap.add_argument("--device", default=None, help="override train.device (auto | cpu | cuda)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="one profile of this many epochs (decay at the config's long.decay_ratio)")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="one profile with these seeds (comma-separated)")
    ap.add_argument("--strategies", type=lambda s: s.split(","), default=None,
                    help="one profile with only these strategies (comma-separated, e.g. S1,S2,S3)")
    ap.add_argument("--describe", action="store_true",
                    help="only print the plan and the projected training minutes per schedule")
    ap.add_argument("--ips", type=float, action="append", help="with --describe: images/s summed over runs")
    ap.add_argument("--group", type=int, default=17, help="with --describe: runs per training call")
    args = ap.parse_args()
    if args.describe:
        return print(describe(load_config(args.config), args.ips or [500_000], args.group))
    if args.out is None or args.budget_s is None:
        ap.error("--out and --budget-s are required (unless --describe)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        status = run_study(args.parts, args.work, args.out, args.config, args.budget_s,
                           probe_only=args.probe_only, probe_seconds=args.probe_s, device=args.device,
                           epochs=args.epochs, seeds=args.seeds, strategies=args.strategies)
    except PackError as e:
        raise StudyError(f"data parts: {e}") from None
    logging.getLogger("gpu_study").info("status: %s", status)


if __name__ == "__main__":
    run(main)
