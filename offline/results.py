"""A study's archives -> results/<name>/, and that run's report regenerated on a CPU.

    python -m offline.results unpack FOLDER [--results results]
    python -m offline.results report results/<name> [--cifar DIR] [--work DIR]

results/<name>/ holds what offline/study.py archived (params.yaml, run.json, stages.log, metrics/,
logs/, data/source.json, plots/) and predictions/<S>.npz: float16 probabilities whose argmax is
the stage's, and that argmax as uint8. dvc.yaml's top-level metrics read results/*/metrics.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import lzma
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import yaml

from iqals.data import LOCAL_COPY_ENV, SPLITS, sha256
from iqals.params import REFERENCE_STEP
from iqals.io import write_text
from offline.study import REPO, StudyError, code_sha256, load_config, plan, stage_env, with_python
from stages.common import run

log = logging.getLogger("results")

_VOLUME = re.compile(r"(?P<name>[A-Za-z0-9_-]+?)(\.(?P<n>\d+))?\.tar")


def archives(folder: str | Path) -> dict[str, list[Path]]:
    """{name: its volumes in order} of the archives in a folder of returned files."""
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(Path(folder).glob("*.tar")):
        if m := _VOLUME.fullmatch(path.name):
            found.setdefault(m["name"], {})[int(m["n"] or 1)] = path
    for name, vols in found.items():
        if sorted(vols) != list(range(1, len(vols) + 1)):
            raise StudyError(f"{folder}: {name} has volumes {sorted(vols)}: one is missing (expected 1..{max(vols)})")
    return {name: [vols[n] for n in sorted(vols)] for name, vols in found.items()}


def unpack_archive(volumes: list[Path], dest: Path) -> Path:
    """One run's volumes -> dest, replaced as a whole (never half old, half new); members that
    would land outside dest are refused; predictions/<S>.npz.xz become predictions/<S>.npz."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        for vol in volumes:
            with tarfile.open(vol) as tar:
                for m in tar.getmembers():
                    rel = Path(m.name)
                    if rel.is_absolute() or ".." in rel.parts:
                        raise StudyError(f"{vol}: member {m.name!r} would land outside {dest}: refused")
                    if not m.isfile():
                        continue  # our archives hold plain files only
                    data = tar.extractfile(m).read()
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    if rel.parts[0] == "predictions" and rel.name.endswith(".npz.xz"):
                        with np.load(io.BytesIO(lzma.decompress(data))) as z:
                            np.savez_compressed(tmp / rel.with_suffix(""), **{k: z[k] for k in z.files})
                    else:
                        (tmp / rel).write_bytes(data)
        if not (tmp / "params.yaml").is_file():
            raise StudyError(f"{volumes[0]}: no params.yaml in the archive (expected one written by offline.study)")
        old = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def unpack_all(folder: str | Path, results: str | Path = "results") -> dict[str, Path]:
    if not (found := archives(folder)):
        raise StudyError(f"{folder}: no <name>.tar archives (expected the files offline.study wrote to --out)")
    out = {name: unpack_archive(vols, Path(results) / name) for name, vols in found.items()}
    for name, dest in out.items():
        log.info("%s -> %s (status: %s)", name, dest, _read_json(dest / "run.json").get("status"))
    return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def regenerate(run_dir: Path, work: Path, cifar: Path, repo: Path = REPO) -> dict[str, bool]:
    """The report of results/<name> regenerated on the CPU into its plots/; returns, for each data
    file run.json has a sha256 of, whether the CPU's copy equals it."""
    run_dir, work = Path(run_dir).resolve(), Path(work).resolve()
    raw = yaml.safe_load((run_dir / "params.yaml").read_text())
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())
    reads = {d for d in dvc["stages"]["report"]["deps"] if d.startswith("data/")}
    makers = {s for s, st in dvc["stages"].items() if any(o in reads for o in st.get("outs", []) if isinstance(o, str))}
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text((run_dir / "params.yaml").read_text())
    env = stage_env(repo, **{LOCAL_COPY_ENV: str(Path(cifar).resolve())})
    want = {f: h for f, h in _read_json(run_dir / "run.json").get("data_sha256", {}).items() if h}

    def sh(argv: list[str]) -> None:
        log.info("%s", shlex.join(argv))
        r = subprocess.run(with_python(argv), cwd=work, env=env, capture_output=True, text=True)
        if r.returncode:
            raise StudyError(f"{shlex.join(argv)} failed (rc {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")

    def checks() -> dict[str, bool]:
        return {f: (work / f).is_file() and sha256(work / f) == h for f, h in want.items()}

    if not want or not all(checks().values()):  # else: made by an earlier `report` in this work folder
        for _, stage, cmd in plan(dvc, raw, load_config()):
            if stage in makers:
                sh(shlex.split(cmd))
    same = checks()
    for f in (f for f, ok in same.items() if not ok):
        log.warning("%s differs from the GPU run's: the report's inputs are not exactly the run's", f)
    sh(["python", "-m", "stages.report", "--metrics", str(run_dir / "metrics"), "--predictions",
        str(run_dir / "predictions"), "--logs", str(run_dir / "logs"), "--raw", str(work / "data/raw"),
        "--distorted", str(work / "data/distorted"), "--scores", str(work / "data/scores"),
        "--paper", str(repo / "reference"), "--out", str(run_dir / "plots"), "--missing", "skip"])
    write_text(run_dir / "RUN.md", run_markdown(run_dir, same, repo))
    return same


def run_markdown(run_dir: Path, checks: dict[str, bool] | None = None, repo: Path = REPO) -> str:
    """RUN.md: what ran where, and each stage's seconds (from a run.json of any age: a key it lacks is said so)."""
    d, info = Path(run_dir), _read_json(Path(run_dir) / "run.json")
    raw = yaml.safe_load((d / "params.yaml").read_text())
    t, strategies = raw["train"], list(raw["strategies"])
    n = raw["base"]["train_size"] or SPLITS["train"]
    trained = [s for s in strategies if all((d / f"logs/{s}/seed{k}.tsv").is_file() for k in t["seeds"])]
    evaluated = [s for s in strategies if (d / f"metrics/{s}.json").is_file()]
    test = _read_json(d / f"metrics/{evaluated[0]}.json").get("test_images") if evaluated else None
    code, absent = info.get("code_sha256"), [s for s in strategies if s not in evaluated]
    asked = {**REFERENCE_STEP, **t}  # the train.* step values, as params.yaml's defaults fill them
    rows = [("device", f"{info.get('device', 'not recorded')}, {info.get('cpus', '?')} CPU cores, "
                       f"Python {info.get('python', '?')}, torch {info.get('torch') or 'not recorded'}"),
            ("schedule", f"{t['epochs']} epochs, lr {t['lr']:g} x{t['lr_decay']:g} every {t['lr_decay_epochs']} "
                         f"epochs, batch {t['batch_size']}, {n:,} training images; step asked: "
                         f"{asked['precision']}, {asked['step']}, {asked['layout']} layout (stages.log: which ran)"),
            ("seeds", str(t["seeds"])),
            ("strategies", f"{len(trained)} of {len(strategies)} trained, {len(evaluated)} evaluated"
                           + (f"; not evaluated: {', '.join(absent)}" if absent else "")),
            ("test images", f"{test:,}" if test else "none evaluated"),
            ("status", info.get("status", "not recorded")),
            ("code", f"sha256 {code[:16]} of iqals/*.py and stages/*.py: "
                     + ("this checkout's" if code == code_sha256(repo) else "not this checkout's")
                     if code else "not recorded")]
    if checks is not None:
        same, other = ([f"`{f}`" for f, ok in checks.items() if ok is want] for want in (True, False))
        rows.append(("data", "regenerated on the CPU: " + ("; ".join(
            [f"matched: {', '.join(same)}"] * bool(same) + [f"differ: {', '.join(other)}"] * bool(other))
            or "no sha256 in run.json")))
    md = [f"**GPU run `{d.name}`**", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
          "Wall seconds of each stage on the node (`rc` other than 0: the call failed or was stopped):", "",
          "| stage | seconds | calls |", "|---|---|---|"]
    for s in info.get("stages", []):
        calls = s.get("calls", [])
        bad = [str(c.get("rc")) for c in calls if str(c.get("rc")) != "0"]
        note = f"{len(calls)}" + (f"; rc {', '.join(bad)}" if bad else "")
        if s.get("stage") == "train" and not bad and s.get("seconds"):
            images = len(t["seeds"]) * len(strategies) * t["epochs"] * n
            note += f"; {images:,} training images, {images / s['seconds']:,.0f} images/s"
        md.append(f"| {s.get('stage')} | {s.get('seconds', 0):.1f} | {note} |")
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("unpack")
    u.add_argument("folder", type=Path, help="the returned files (<name>.tar, <name>.2.tar, ...)")
    u.add_argument("--results", type=Path, default=Path("results"))
    r = sub.add_parser("report")
    r.add_argument("run_dir", type=Path, help="results/<name>")
    r.add_argument("--cifar", type=Path, default=Path(os.environ.get(LOCAL_COPY_ENV, "../shared/data/cifar10")),
                   help="the local CIFAR-10 copy (default $CIFAR10_LOCAL, else ../shared/data/cifar10)")
    r.add_argument("--work", type=Path, default=None, help="scratch folder (default gpu_work/regen/<name>)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s results %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if args.cmd == "unpack":
        unpack_all(args.folder, args.results)
    else:
        regenerate(args.run_dir, args.work or Path("gpu_work/regen") / args.run_dir.name, args.cifar)


if __name__ == "__main__":
    run(main)
