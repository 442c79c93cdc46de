"""The study on a GPU node that has neither DVC nor network (offline/README.md).

    python -m offline.study --out OUT [--parts transfer/cifar10] [--preset presets/paper.yaml] [--set KEY=VALUE ...]
        [--strategies S1,S2,...] [--name NAME] [--budget-s SECONDS] [--group RUNS] [--work gpu_work] [--dry]

The run's params: params.yaml, the preset's values, each --set (dotted keys, YAML values, as
`dvc exp run -S` takes them), cut to --strategies; validated before any work. The commands:
dvc.yaml's, expanded and ordered as `dvc repro` runs them, training stacked in calls of at most
--group runs, evaluation in one call. After each stage OUT/<name>.tar (<name>.2.tar, ...) is
rewritten with what exists so far: a run cut short leaves its last complete state.
"""
from __future__ import annotations

import argparse
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
from collections import namedtuple
from pathlib import Path

import numpy as np
import yaml

from iqals import params as params_lib
from iqals.data import LOCAL_COPY_ENV, SPLITS, sha256
from iqals.errors import ExpectedError
from iqals.io import atomic_path
from iqals.parallel import merge_training
from offline.pack import check_parts, unpack
from stages.common import run

log = logging.getLogger("study")

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "offline/config.yaml"
# what the report reads besides the results: their sha256 let `offline.results report` check its copies
DATA_FILES = ("data/raw/train.npz", "data/raw/test.npz", "data/distorted/test.npy",
              "data/scores/train.npy", "data/scores/test.npy")
STOPPED = "stopped at --budget-s"


class StudyError(ExpectedError, RuntimeError):
    """The study cannot go on: bad input or configuration, or a stage failed."""


class Stopped(StudyError):
    """A command was still running at the end of --budget-s."""


CONFIG_KEYS = {  # key: (what is expected, its check)
    "stage_order": ("a non-empty list of dvc.yaml stage names",
                    lambda v: isinstance(v, list) and v and all(isinstance(x, str) for x in v)),
    "cpu_only": ("a list of dvc.yaml stage names",
                 lambda v: v is None or isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "group": ("a positive integer", lambda v: type(v) is int and v > 0),
    "archive_cap_mib": ("a positive number of MiB", lambda v: type(v) in (int, float) and v > 0)}


def load_config(path: str | Path = CONFIG) -> dict:
    """offline/config.yaml, checked: each key of CONFIG_KEYS, no other."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise StudyError(f"{path}: unreadable study configuration ({e})") from None
    raw = raw if isinstance(raw, dict) else {}
    for key in sorted(set(CONFIG_KEYS) ^ set(raw)):
        raise StudyError(f"{path}: {key}: " + (f"missing (expected {CONFIG_KEYS[key][0]})" if key in CONFIG_KEYS
                                               else f"no such key (known: {', '.join(CONFIG_KEYS)})"))
    for key, (what, ok) in CONFIG_KEYS.items():
        if not ok(raw[key]):
            raise StudyError(f"{path}: {key} = {raw[key]!r}: expected {what}")
    return {**raw, "cpu_only": raw["cpu_only"] or []}


def parse_sets(sets: list[str]) -> dict:
    """--set KEY=VALUE ... -> {dotted key: value parsed as YAML}."""
    out = {}
    for s in sets:
        key, eq, value = s.partition("=")
        if not eq or not key.strip():
            raise StudyError(f"--set {s}: expected KEY=VALUE with a dotted params key (train.epochs=16)")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise StudyError(f"--set {s}: the value is not YAML ({e})") from None
    return out


def run_params(repo: Path, preset: Path | None = None, sets: list[str] = (),
               strategies: list[str] | None = None) -> dict:
    """params.yaml + the preset's values + each --set, cut to `strategies` (in params' order), validated."""
    raw = params_lib.read_raw(repo / "params.yaml")
    if preset is not None:
        raw = params_lib.with_overrides(raw, params_lib.load_preset(preset), str(preset))
    raw = params_lib.with_overrides(raw, parse_sets(sets), "--set")
    if strategies is not None:
        unknown = [s for s in strategies if s not in raw["strategies"]]
        if unknown or not strategies:
            raise StudyError(f"--strategies {','.join(strategies)}: {', '.join(unknown) or 'none given'}: expected "
                             f"some of params.yaml's strategies {', '.join(raw['strategies'])}")
        raw["strategies"] = {k: v for k, v in raw["strategies"].items() if k in strategies}
    params_lib.parse(raw)  # a bad value stops here, naming its key
    return raw


# ------------------------------------------------------------------ the commands, from dvc.yaml

_REF = re.compile(r"\$\{\s*([^}]*?)\s*\}")


def _lookup(ctx: dict, path: str):
    node = ctx
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise StudyError(f"dvc.yaml: ${{{path}}} is not defined (params.yaml, vars, item or key)")
    return node


def _interpolate(value, ctx: dict):
    """DVC's ${...}: a string that is one reference takes the value itself; others are formatted."""
    if not isinstance(value, str):
        return value
    if whole := _REF.fullmatch(value):
        return _lookup(ctx, whole.group(1))
    return _REF.sub(lambda m: str(_lookup(ctx, m.group(1))), value)


def expand(dvc: dict, raw: dict) -> list[tuple[str, str, str]]:
    """(instance, stage, command) of every stage of dvc.yaml as DVC expands them: vars and params
    for ${...}, matrix as the product of its lists in key order (name@v1-v2), foreach over a
    mapping (name@key). Forms this project does not use are refused rather than guessed."""
    ctx = dict(raw)  # vars added at the top level; nothing nested is changed
    for entry in dvc.get("vars", []):
        if not isinstance(entry, dict):
            raise StudyError(f"dvc.yaml vars: only inline mappings are supported, got {entry!r}")
        ctx.update(entry)
    out = []
    for name, st in dvc["stages"].items():
        if "matrix" in st:
            keys = list(st["matrix"])
            for combo in itertools.product(*(_interpolate(st["matrix"][k], ctx) for k in keys)):
                out.append((f"{name}@{'-'.join(map(str, combo))}", name,
                            _interpolate(st["cmd"], {**ctx, "item": dict(zip(keys, combo))})))
        elif "foreach" in st:
            over = _interpolate(st["foreach"], ctx)
            if not isinstance(over, dict):
                raise StudyError(f"dvc.yaml {name}: foreach over a mapping is supported, got {type(over).__name__}")
            out += [(f"{name}@{k}", name, _interpolate(st["do"]["cmd"], {**ctx, "key": k, "item": v}))
                    for k, v in over.items()]
        else:
            out.append((name, name, _interpolate(st["cmd"], ctx)))
    if bad := [n for _, n, c in out if not isinstance(c, str)]:
        raise StudyError(f"dvc.yaml {bad[0]}: cmd must be one command string")
    return out


def _strategy_of(cmd: str) -> str | None:
    argv = shlex.split(cmd)
    return next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--strategy"), None)


def plan(dvc: dict, raw: dict, cfg: dict) -> list[tuple[str, str, str]]:
    """`expand` in the order `dvc repro` runs the stages (stage_order, then dvc.yaml's order),
    without the stages of strategies the params leave out and without the cpu_only stages."""
    order = cfg["stage_order"]
    stages = [s for s in expand(dvc, raw) if s[1] not in cfg["cpu_only"]]
    names = list(dict.fromkeys(s for _, s, _ in stages))  # before the strategies: one may leave a stage empty
    stages = [s for s in stages if _strategy_of(s[2]) in (None, *raw["strategies"])]
    if sorted(names) != sorted(order):
        raise StudyError(f"offline/config.yaml: stage_order {order} does not list exactly dvc.yaml's stages "
                         f"{names} (less cpu_only): update it from `dvc repro --dry --force`")
    return sorted(stages, key=lambda s: order.index(s[1]))  # sort is stable


# a dvc.yaml stage ("train": every training stage together) and its calls, one after another
Step = namedtuple("Step", "stage argvs")


def steps(planned: list[tuple[str, str, str]], raw: dict, group: int) -> list[Step]:
    """The plan as calls: training stages merged into `stages.train` calls of at most `group`
    runs (a strategy's seeds always in one call), in the first training stage's turn; the
    evaluate stages in one call (one process loads the data once)."""
    per_call = group // len(raw["train"]["seeds"])
    if per_call < 1:
        raise StudyError(f"--group {group}: expected at least {len(raw['train']['seeds'])} runs, the seeds of "
                         "train.seeds (a strategy's seeds train in one process)")
    cmds: dict[str, list[str]] = {}
    kinds = {"python -m stages.train": "train", "python -m stages.evaluate": "evaluate"}
    for _, stage, cmd in planned:
        cmds.setdefault(kinds.get(" ".join(shlex.split(cmd)[:3]), stage), []).append(cmd)
    out = []
    for key, cs in cmds.items():
        argvs = [shlex.split(c) for c in cs]
        if key == "train":  # --scores in a call iff one of its strategies reads them
            merged = [merge_training([[c] for c in cs[i:i + per_call]]) for i in range(0, len(cs), per_call)]
            if None in merged:
                raise StudyError(f"dvc.yaml training commands {cs[:2]}...: merge_training cannot stack them")
            argvs = [shlex.split(m) for m in merged]
        elif key == "evaluate":
            if any(a[3::2] != ["--strategy"] for a in argvs):
                raise StudyError(f"dvc.yaml evaluate commands {cs[:2]}...: expected --strategy S only")
            argvs = [argvs[0][:3] + [x for a in argvs for x in a[3:]]]
        out.append(Step(key, argvs))
    return out


def training_images(raw: dict) -> str:
    runs, epochs = len(raw["strategies"]) * len(raw["train"]["seeds"]), raw["train"]["epochs"]
    n = raw["base"]["train_size"] or SPLITS["train"]
    return f"{runs} runs x {epochs} epochs x {n:,} images = {runs * epochs * n:,} training images"


# ------------------------------------------------------------------ what is returned

def compact_predictions(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 probabilities (..., K) -> (argmax uint8, float16 probabilities whose argmax is the
    same): where rounding to float16 ties or reorders the top class, its value is raised by the
    fewest float16 steps that make it the strict maximum again."""
    pred = probs.argmax(-1).astype(np.uint8)
    p16 = probs.astype(np.float16)
    flat, fp = p16.reshape(-1, probs.shape[-1]), pred.ravel()
    for i in np.flatnonzero((p16.argmax(-1) != pred).ravel()):
        flat[i, fp[i]] = np.nextafter(flat[i].max(), np.float16(np.inf))
    return pred, p16


def pack_predictions(path: Path) -> bytes:
    """An evaluate stage's data/predictions/<S>.npz -> xz-compressed compact npz bytes."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["pred"], arrays["probs"] = compact_predictions(arrays["probs"])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return lzma.compress(buf.getvalue(), preset=6)


def tar_bytes(sizes: list[int]) -> int:
    """Upper bound of a tar's size: 3 header blocks a member (its header, and the pax header and record that a name
    over 100 characters or not ASCII takes), its data, 2 end blocks, in 10240-byte records."""
    body = sum(1536 + -(-n // 512) * 512 for n in sizes) + 1024
    return -(-body // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def write_archive(out: Path, name: str, members: dict[str, bytes], cap: int) -> list[Path]:
    """members as OUT/<name>.tar, <name>.2.tar, ..., each file at most `cap` bytes and rewritten
    atomically, so that a reader never finds a half-written one."""
    vols, sizes = [[]], []
    for m, data in members.items():
        if tar_bytes([len(data)]) > cap:
            raise StudyError(f"{name}: {m} alone ({len(data):,} bytes) exceeds archive_cap_mib")
        if tar_bytes(sizes + [len(data)]) > cap:
            vols, sizes = vols + [[]], []
        vols[-1].append(m)
        sizes.append(len(data))
    paths = [out / (f"{name}.tar" if i == 0 else f"{name}.{i + 1}.tar") for i in range(len(vols))]
    for path, names in zip(paths, vols):
        with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for m in names:
                info = tarfile.TarInfo(m)
                info.size, info.mtime = len(members[m]), int(time.time())
                tar.addfile(info, io.BytesIO(members[m]))
    for old in set(out.glob(f"{name}.*.tar")) - set(paths):  # volumes of an earlier run of this name
        old.unlink()
    return paths


def code_sha256(repo: Path) -> str:
    """Which code ran: sha256 over iqals/*.py and stages/*.py in path order, each as its path, NUL, its size,
    NUL and its bytes (run.json keeps it, results compares it with a checkout's: the format must stay)."""
    h = hashlib.sha256()
    for name in sorted(f.relative_to(repo).as_posix() for d in ("iqals", "stages") for f in (repo / d).glob("*.py")):
        data = (repo / name).read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def machine() -> dict:
    info = {"device": platform.processor() or platform.machine(), "torch": None,
            "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch
        info["torch"] = torch.__version__
        info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else info["device"]
    except Exception as e:  # the run goes on; its stages will say more
        log.warning("torch: %s", e)
    return info


# ------------------------------------------------------------------ running

def with_python(argv: list[str]) -> list[str]:  # a dvc.yaml command's `python`: this interpreter
    return [sys.executable, *argv[1:]] if argv[:1] == ["python"] else argv


def stage_env(repo: Path, **extra: str) -> dict:
    """A stage command's environment outside DVC: `repo` first on PYTHONPATH, unbuffered output."""
    path = [str(repo)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1", **extra)


class Study:
    """One run: its commands in <work>/run, their output in OUT/stages.log, the archive after each step."""

    def __init__(self, repo: Path, out: Path, run_dir: Path, name: str, cfg: dict, cifar: Path,
                 deadline: float | None):
        self.run_dir, self.log_path, self.deadline = run_dir, out / "stages.log", deadline
        self.env = stage_env(repo, **{LOCAL_COPY_ENV: str(cifar), "TQDM_MININTERVAL": "15"})
        self.out, self.name, self.cap = out, name, int(cfg["archive_cap_mib"] * 2**20)
        self.members = {"params.yaml": (run_dir / "params.yaml").read_bytes()}
        self.info = {"name": name, "status": "running", **machine(), "code_sha256": code_sha256(repo),
                     "stages": [], "data_sha256": {}}

    def call(self, argv: list[str]) -> dict:
        """One command, its output appended to stages.log; stopped (terminate, then kill) at --budget-s."""
        argv, t = with_python(argv), time.monotonic()
        with open(self.log_path, "ab") as f:
            f.write(f"\n===== {time.strftime('%H:%M:%S')} {shlex.join(argv)}\n".encode())
            f.flush()
            p = subprocess.Popen(argv, cwd=self.run_dir, env=self.env, stdout=f, stderr=subprocess.STDOUT)
            try:
                rc = p.wait(timeout=None if self.deadline is None else max(0.1, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                rc = STOPPED
            f.write(f"===== rc {rc}, {time.monotonic() - t:.1f} s\n".encode())
        r = {"cmd": shlex.join(argv), "rc": rc, "seconds": round(time.monotonic() - t, 2)}
        log.info("%s: rc %s, %.1f s", r["cmd"], rc, r["seconds"])
        return r

    def run_step(self, step: Step) -> None:
        rec, t = {"stage": step.stage, "seconds": 0.0, "calls": []}, time.monotonic()
        self.info["stages"].append(rec)
        try:
            for argv in step.argvs:
                rec["calls"].append(r := self.call(argv))
                if r["rc"] == STOPPED:
                    raise Stopped(f"{r['cmd']}: {STOPPED}")
                if r["rc"] != 0:
                    tail = self.log_path.read_bytes()[-3000:].decode(errors="replace")
                    raise StudyError(f"{r['cmd']} failed (rc {r['rc']}); the end of {self.log_path}:\n{tail}")
        finally:  # what finished is kept, also when a call failed or was stopped
            rec["seconds"] = round(time.monotonic() - t, 2)
            self.save()

    def collect(self) -> None:
        """What exists so far in the run folder, into the archive (no models: too big, not needed)."""
        r = self.run_dir
        for f in [*r.glob("logs/*/*.tsv"), *r.glob("metrics/*.json"), *r.glob("plots/*")]:
            if f.is_file():
                self.members[f.relative_to(r).as_posix()] = f.read_bytes()
        if (r / "data/raw/source.json").is_file():
            self.members["data/source.json"] = (r / "data/raw/source.json").read_bytes()
        for m in r.glob("metrics/*.json"):  # an evaluate call writes the metrics after the predictions
            pred, member = r / "data/predictions" / f"{m.stem}.npz", f"predictions/{m.stem}.npz.xz"
            if pred.is_file() and member not in self.members:
                self.members[member] = pack_predictions(pred)
        for f in DATA_FILES:  # each written once in a fresh run folder: hashed once
            if not self.info["data_sha256"].get(f) and (r / f).is_file():
                self.info["data_sha256"][f] = sha256(r / f)

    def save(self, status: str | None = None) -> None:
        self.info["status"] = status or self.info["status"]
        self.collect()
        self.members["run.json"] = (json.dumps(self.info, indent=2) + "\n").encode()
        if self.log_path.is_file():  # its end, if it ever grew past half an archive file
            self.members["stages.log"] = self.log_path.read_bytes()[-self.cap // 2:]
        paths = write_archive(self.out, self.name, self.members, self.cap)
        last = self.info["stages"][-1]["stage"] if self.info["stages"] else "start"
        log.info("%s: %s after %s", ", ".join(p.name for p in paths), self.info["status"], last)

    def run(self, todo: list[Step]) -> None:
        try:
            for step in todo:
                self.run_step(step)
        except BaseException as e:
            kind = "stopped" if isinstance(e, Stopped) else "failed"
            self.save(f"{kind}: {(str(e) or type(e).__name__).splitlines()[0]}")
            raise
        self.save("complete")


def prepare(repo: Path, work: Path, raw: dict, parts: Path | None) -> Path:
    """A fresh <work>/run with the run's params.yaml and reference/; returns the CIFAR-10 copy to use."""
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # nothing of an earlier run: no stale results or checkpoints
    run_dir.mkdir(parents=True)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (run_dir / "reference").symlink_to(repo / "reference", target_is_directory=True)
    if parts is None:
        return Path(os.environ[LOCAL_COPY_ENV]).resolve()
    unpack(parts, work / "cifar10")
    return work / "cifar10"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="where the archives and stages.log go")
    ap.add_argument("--parts", type=Path, help="the CIFAR-10 copy in parts (offline/pack.py); else $CIFAR10_LOCAL")
    ap.add_argument("--preset", type=Path, help="a flat mapping of dotted params keys (presets/paper.yaml)")
    ap.add_argument("--set", action="append", default=[], nargs="+", metavar="KEY=VALUE", help="a params value")
    ap.add_argument("--strategies", type=lambda s: s.split(","), help="only these (comma-separated)")
    ap.add_argument("--name", help="the archive's name (default gpu_e<epochs>)")
    ap.add_argument("--budget-s", type=float, help="seconds the whole command may take; then stopped")
    ap.add_argument("--group", type=int, help="training runs stacked per call (default: offline/config.yaml)")
    ap.add_argument("--work", type=Path, default=Path("gpu_work"), help="scratch folder")
    ap.add_argument("--dry", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s study %(levelname)s %(message)s", datefmt="%H:%M:%S")
    t0, cfg = time.monotonic(), load_config()
    raw = run_params(REPO, args.preset, [s for group in args.set for s in group], args.strategies)
    name = args.name or f"gpu_e{raw['train']['epochs']}"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise StudyError(f"--name {name}: expected letters, digits, '_' or '-'")
    todo = steps(plan(yaml.safe_load((REPO / "dvc.yaml").read_text()), raw, cfg), raw, args.group or cfg["group"])
    if args.dry:
        return print("\n".join([shlex.join(a) for s in todo for a in s.argvs] + [f"# {training_images(raw)}"]))
    if args.parts is not None:
        check_parts(args.parts)  # every part here and intact, before anything runs
    elif not (cifar := os.environ.get(LOCAL_COPY_ENV)) or not (Path(cifar) / "train.npz").is_file():
        raise StudyError(f"no --parts and no train.npz in ${LOCAL_COPY_ENV}: expected one (the node has no network)")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work.resolve()
    cifar = prepare(REPO, work, raw, args.parts)
    log.info("%s: %s; %d calls", name, training_images(raw), sum(len(s.argvs) for s in todo))
    deadline = t0 + args.budget_s if args.budget_s else None
    Study(REPO, args.out.resolve(), work / "run", name, cfg, cifar, deadline).run(todo)


if __name__ == "__main__":
    run(main)
