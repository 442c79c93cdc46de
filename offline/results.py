"""A GPU run's archives -> results/<profile>/, and its report regenerated on the CPU.

Layout of results/<profile>/ (committed):
  params.yaml                  the exact params.yaml the stages ran with
  run.json                     variant, device, per-stage times, status, data checksums
  probe.json, study.log        the smoke checks and timings of the variants; the driver's log
  metrics/<S>.json, metrics/{distort,score,corrupt}.json   as the stages wrote them
  logs/<S>/seed<k>.tsv         per-epoch training logs
  predictions/<S>.npz          probs float16 (seeds, test sets, N, 10) whose argmax is the
                               stage's, pred uint8 (its argmax), labels, seeds, test_sets
  plots/                       the report as the GPU run made it (or as regenerated)
dvc.yaml's top-level `metrics:` lists results/<profile>/metrics, so `dvc metrics show` reads it.

The report regenerates from these on the CPU: the data stages it also reads (test images,
their distorted copies, the scores) are rerun from the local copy with the profile's params and
checked against the checksums in run.json; then the report stage runs on the results.

    python -m offline.results unpack FOLDER [--results results]
    python -m offline.results report results/<profile> [--out DIR] [--work gpu_work/regen]
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

from iqals.data import SPLITS
from iqals.io import write_text
from offline.study import REPO, StudyError, _sha256, commit_of_sources, load_config, plan, stage_env, with_python
from stages.common import run

log = logging.getLogger("gpu_results")

_VOLUME = re.compile(r"(?P<name>[A-Za-z0-9_-]+?)(\.(?P<n>\d+))?\.tar")


def archives(folder: str | Path) -> dict[str, list[Path]]:
    """{profile: its tar volumes in order} found in a folder of brought-back files."""
    found: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(Path(folder).glob("*.tar")):
        m = _VOLUME.fullmatch(path.name)
        if m:
            found.setdefault(m["name"], []).append((int(m["n"] or 1), path))
    out = {}
    for name, vols in found.items():
        vols.sort()
        if [n for n, _ in vols] != list(range(1, len(vols) + 1)):
            raise StudyError(f"{folder}: {name} has volumes {[n for n, _ in vols]}; one is missing")
        out[name] = [p for _, p in vols]
    return out


def _member_path(name: str) -> Path:
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise StudyError(f"archive member {name!r}: not a relative path inside the profile")
    return p


def unpack_profile(volumes: list[Path], dest: Path) -> Path:
    """Extract one profile's volumes into dest (replaced as a whole: never half old, half new)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        for vol in volumes:
            with tarfile.open(vol) as tar:
                for m in tar.getmembers():
                    if not m.isfile():
                        continue
                    rel = _member_path(m.name)
                    data = tar.extractfile(m).read()
                    if rel.parts[0] == "predictions" and rel.name.endswith(".npz.xz"):
                        with np.load(io.BytesIO(lzma.decompress(data))) as z:
                            arrays = {k: z[k] for k in z.files}
                        rel = rel.with_name(rel.name[:-3])
                        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                        np.savez_compressed(tmp / rel, **arrays)
                        continue
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / rel).write_bytes(data)
        if not (tmp / "params.yaml").is_file():
            raise StudyError(f"{volumes[0]}: no params.yaml in the archive")
        old = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def register_metrics(dvc_yaml: str | Path, entry: str) -> bool:
    """Add `entry` to dvc.yaml's top-level metrics list (a block at column 0) unless listed.
    Edits the text so that comments stay; returns whether it changed anything."""
    path = Path(dvc_yaml)
    text = path.read_text()
    listed = yaml.safe_load(text).get("metrics") or []
    if entry in listed:
        return False
    lines = text.splitlines()
    try:
        i = lines.index("metrics:") if "metrics:" in lines else lines.index("metrics: []")
    except ValueError:
        raise StudyError(f"{path}: no top-level `metrics:` block to add {entry} to") from None
    lines[i] = "metrics:"
    j = i + 1
    while j < len(lines) and lines[j].startswith("  - "):
        j += 1
    lines.insert(j, f"  - {entry}")
    path.write_text("\n".join(lines) + "\n")
    if entry not in (yaml.safe_load(path.read_text()).get("metrics") or []):
        path.write_text(text)
        raise StudyError(f"{path}: could not add {entry} to the top-level metrics")
    return True


def unpack_all(folder: str | Path, results: str | Path = "results", dvc_yaml: str | Path | None = "dvc.yaml",
               root: str | Path = ".") -> dict[str, Path]:
    """Every profile archive in `folder` -> results/<profile>/; registered in dvc.yaml's metrics."""
    found = archives(folder)
    if not found:
        raise StudyError(f"{folder}: no <profile>.tar archives (expected the files a GPU run wrote to $OUT)")
    out = {}
    whole = Path(folder) / "study.log"  # the call's whole log: also what came after the last archive write
    whole = whole.read_text() if whole.is_file() else None
    for name, vols in found.items():
        dest = unpack_profile(vols, Path(results) / name)
        if whole is not None and (dest / "study.log").is_file() and whole.startswith((dest / "study.log").read_text()):
            write_text(dest / "study.log", whole)
        status = json.loads((dest / "run.json").read_text()).get("status") if (dest / "run.json").is_file() else None
        log.info("%s -> %s (status: %s)", ", ".join(v.name for v in vols), dest, status)
        if dvc_yaml and (dest / "metrics").is_dir():
            rel = os.path.relpath(dest / "metrics", root)
            if register_metrics(dvc_yaml, rel):
                log.info("added %s to %s's metrics", rel, dvc_yaml)
        out[name] = dest
    return out


_CALL = re.compile(r"^\S+ (?P<profile>\S+) (?P<stage>\S+) (?P<i>\d+)/(?P<n>\d+): (?P<cmd>.+?)  "
                   r"\((?P<s>[\d.]+) s, rc (?P<rc>[^;]+); study at (?P<at>[\d.]+) s")


def logged_calls(study_log: str, profile: str) -> dict[str, list[dict]]:
    """Stage -> its calls as the driver logged them (seconds, rc), failed stages included."""
    out: dict[str, list[dict]] = {}
    for line in study_log.splitlines():
        m = _CALL.match(line)
        if m and m["profile"] == profile:
            out.setdefault(m["stage"], []).append({"cmd": m["cmd"], "seconds": float(m["s"]), "rc": m["rc"],
                                                   "at": float(m["at"])})
    return out


def _code(c: dict | None, repo: Path = REPO) -> str:
    """run.json's code entry in words (offline.study.code_version): the commit of this
    repository with those sources, else what the machine's copy said of itself."""
    if c is None:
        return "not recorded (run.json had no code entry before 2026-11-27)"
    found = commit_of_sources(repo, c["source_sha256"])
    if found:
        where = f"those of commit {found[:12]} (matched in this repository's history)"
    elif c["commit"]:
        where = (f"not in this repository's history; the machine's copy said commit {c['commit'][:12]}"
                 + (" with uncommitted changes" if c["uncommitted_changes"] else ""))
    else:
        where = "not in this repository's history; no git checkout where it ran"
    return f"sources sha256 {c['source_sha256']} (iqals/ and stages/: `offline.study.code_version`): {where}"


def run_markdown(profile_dir: str | Path, checks: dict[str, bool] | None = None, repo: Path = REPO) -> str:
    """RUN.md of a GPU profile: machine, training step, schedule, status, the time of every stage
    and the probe, all from run.json, probe.json, study.log and the training logs."""
    d = Path(profile_dir)
    info = json.loads((d / "run.json").read_text())
    raw = yaml.safe_load((d / "params.yaml").read_text())
    v, t = info["variant"], raw["train"]
    n_train = raw["base"]["train_size"] or SPLITS["train"]
    evaluated = sorted(f.stem for f in (d / "metrics").glob("*.json") if f.stem in info["strategies"])
    absent = [s for s in info["strategies"] if s not in evaluated]
    test = json.loads((d / "metrics" / f"{evaluated[0]}.json").read_text())["test_images"] if evaluated else None
    rows = [("device", f"{info.get('device')}, torch {info.get('torch')}, Python {info.get('python')}, "
                       f"{info.get('cpus')} CPU cores"),
            ("training step", f"{v['precision']}, {v['step']}, up to {v['group']} runs stacked per call (the probe's "
                              f"fastest that passed its check: {v['images_per_s']:,.0f} images/s at {v['group']})"),
            ("schedule", f"{info['epochs']} epochs, lr {t['lr']:g} x{t['lr_decay']:g} every "
                         f"{info['lr_decay_epochs']} epochs, batch {t['batch_size']}, {n_train:,} training images"),
            ("seeds", str(info["seeds"]) + (f" (planned {info['seeds_planned']}: the others did not fit)"
                                            if info.get("seeds_planned") else "")),
            ("strategies", f"{len(info['strategies'])} trained; {len(evaluated)} evaluated"
                           + (f"; not evaluated: {', '.join(absent)}" if absent else "")),
            ("test set", f"{test:,} images" if test else "none evaluated"),
            ("status", info["status"]),
            ("code", _code(info.get("code"), repo))]
    if checks:
        same, other = ([f"`{f}`" for f, ok in checks.items() if ok is want] for want in (True, False))
        rows.append(("data", "regenerated on the CPU: " + (f"the same as the GPU run's: {', '.join(same)}" if same else "")
                     + ("; " if same and other else "") + (f"different: {', '.join(other)}" if other else "")))
    md = [f"**GPU run `{d.name}`**", "", "| | |", "|---|---|", *[f"| {k} | {x} |" for k, x in rows], "",
          "Time of each part on the device (wall seconds; a call stopped at the end of `--budget-s` counts "
          "as not finished):", "", "| part | seconds | calls |", "|---|---|---|"]
    probe = json.loads((d / "probe.json").read_text()) if (d / "probe.json").is_file() else None
    if probe:
        md.append(f"| smoke checks and timing probe | {probe['seconds']:.1f} | 1 |")
    logged = logged_calls((d / "study.log").read_text(), d.name) if (d / "study.log").is_file() else {}
    recorded = {s["stage"].split()[0]: s for s in info["stages"]}  # "train (grouped)": older runs
    ends = [max(c["at"] for c in calls) for calls in logged.values()]
    for stage in dict.fromkeys([*recorded, *logged]):
        calls = recorded[stage]["calls"] if stage in recorded else logged[stage]
        done = [c for c in calls if str(c["rc"]) == "0"]
        note = f"{len(done)} of {len(calls)} finished" if len(done) < len(calls) else f"{len(calls)}"
        if stage in recorded:
            secs = recorded[stage]["seconds"]
        else:  # from the end of the stage before it to the end of its last call
            end = max(c["at"] for c in calls)
            secs = end - max([e for e in ends if e < end], default=0.0)
        if stage.startswith("train") and stage in recorded:
            images = len(info["seeds"]) * len(info["strategies"]) * info["epochs"] * n_train
            note += f"; {images:,} training images, {images / secs:,.0f} images/s over the calls"
        md.append(f"| {stage} | {secs:.1f}{'' if stage in recorded else ' (stopped)'} | {note} |")
    if "report" not in recorded:
        md.append("| report | not run on the device | regenerated on the CPU |")
    if probe:
        md += ["", "The probe: each variant's steps against the CPU fp32 step from the same weights and batches "
               "(largest relative difference of the gradients), then images/s summed over its runs on synthetic "
               "resident data:", "", "| precision | step | runs stacked | images/s | check | gradients rel. diff |",
               "|---|---|---|---|---|---|"]
        for r in probe["results"]:
            rate = f"{r['images_per_s']:,.0f}" if "images_per_s" in r else "-"
            why = r.get("error") or r.get("skipped") or "failed"
            check = "passed" if r.get("ok") else why[:70] + ("..." if len(why) > 70 else "")
            grad = f"{r['check']['gradients_rel']:.1e}" if "check" in r else "-"
            md.append(f"| {r['precision']} | {r['step']} | {r['group']} | {rate} | {check} | {grad} |")
    return "\n".join(md) + "\n"


def regenerate_report(profile_dir: str | Path, work: str | Path, out: str | Path | None = None,
                      cifar: str | Path | None = None, repo: Path = REPO,
                      config: str | Path | None = None) -> dict:
    """Rerun the report stage on results/<profile>/ on the CPU; returns data checksum matches."""
    profile_dir, work = Path(profile_dir).resolve(), Path(work).resolve()
    out = Path(out).resolve() if out else profile_dir / "plots"
    cfg = load_config(config or repo / "offline/config.yaml")
    raw = yaml.safe_load((profile_dir / "params.yaml").read_text())
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())
    steps = plan(dvc, raw, cfg.stage_order, cfg.cpu_only)
    needs = {d for d in dvc["stages"]["report"]["deps"] if d.startswith("data/")}
    producers = [s for s, st in dvc["stages"].items() if "outs" in st and "matrix" not in st
                 and "foreach" not in st and any(str(o) in needs for o in st["outs"] if isinstance(o, str))]
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text((profile_dir / "params.yaml").read_text())
    env = stage_env(repo, **({"CIFAR10_LOCAL": str(Path(cifar).resolve())} if cifar else {}))
    want = (json.loads((profile_dir / "run.json").read_text()).get("data_sha256", {})
            if (profile_dir / "run.json").is_file() else {})

    def sh(argv):
        argv = with_python(argv)
        r = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
        if r.returncode:
            raise StudyError(f"{shlex.join(argv)} failed (rc {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")

    def matches():
        return {f: _sha256(work / f) == h for f, h in want.items() if h}

    checks = matches()
    if not want or not all(checks.values()):
        for _, stage, cmd in steps:
            if stage in producers:
                log.info("data for the report: %s", cmd)
                sh(shlex.split(cmd))
        checks = matches()
    for f in sorted((work / "metrics").glob("*.json")):  # the data stages' summaries, where both have them
        if (profile_dir / "metrics" / f.name).is_file():
            checks[f"metrics/{f.name}"] = json.loads(f.read_text()) == json.loads((profile_dir / "metrics" / f.name).read_text())
    for f, ok in checks.items():
        if not ok:
            log.warning("%s differs from the GPU run's (other code, OpenCV or torch?): the report's inputs "
                        "besides the results are not the run's", f)
    sh(["python", "-m", "stages.report", "--metrics", str(profile_dir / "metrics"),
        "--predictions", str(profile_dir / "predictions"), "--logs", str(profile_dir / "logs"),
        "--raw", str(work / "data/raw"),
        "--distorted", str(work / "data/distorted"), "--scores", str(work / "data/scores"),
        "--paper", str(repo / "reference"), "--out", str(out), "--missing", "skip"])
    log.info("report regenerated from %s into %s", profile_dir, out)
    write_text(profile_dir / "RUN.md", run_markdown(profile_dir, checks, repo))
    return checks


# ---------------------------------------------------------------- command line
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("unpack")
    u.add_argument("folder", type=Path)
    u.add_argument("--results", type=Path, default=Path("results"))
    u.add_argument("--dvc-yaml", type=Path, default=Path("dvc.yaml"))
    r = sub.add_parser("report")
    r.add_argument("profile", type=Path, help="results/<profile>")
    r.add_argument("--out", type=Path, default=None, help="default: results/<profile>/plots")
    r.add_argument("--work", type=Path, default=Path("gpu_work/regen"))
    r.add_argument("--cifar", type=Path, default=os.environ.get("CIFAR10_LOCAL", "../shared/data/cifar10"),
                   help="the local CIFAR-10 copy (default $CIFAR10_LOCAL, else ../shared/data/cifar10)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gpu_results %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    if args.cmd == "unpack":
        unpack_all(args.folder, args.results, args.dvc_yaml)
    else:
        checks = regenerate_report(args.profile, args.work / args.profile.name, args.out, args.cifar)
        logging.getLogger("gpu_results").info("data checksums against the GPU run: %s", checks or "none recorded")


if __name__ == "__main__":
    run(main)
