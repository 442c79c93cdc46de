"""The study on a GPU node without DVC (offline/): its commands against DVC's own, the archive,
the data in parts, and one rehearsal of the whole round trip on the CPU (dvc and piq blocked)."""
from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from iqals.data import load_npz
from iqals.params import ParamError
from iqals.parallel import merge_training
from offline import pack, results, study
from test_pipeline import COPY, copy_repo, make_project, sh

ONEHOT, SCORED, SEEDS = ["S1", "S2"], ["S3"], [0, 1]


@pytest.fixture(scope="module")
def dvc_yaml(repo_root):
    return yaml.safe_load((repo_root / "dvc.yaml").read_text())


@pytest.fixture(scope="module")
def cfg(repo_root):
    return study.load_config(repo_root / "offline/config.yaml")


def test_commands_and_order_are_what_dvc_repro_runs(tmp_path, repo_root, cfg):
    env = make_project(tmp_path, repo_root, seeds=[0, 3])
    sh(["git", "init", "-q"], tmp_path, env)
    sh([sys.executable, "-m", "dvc", "init", "-q"], tmp_path, env)
    out = sh([sys.executable, "-m", "dvc", "repro", "--dry", "--force"], tmp_path, env)
    want = [(n, c) for n, c in re.findall(r"Running stage '([^']+)':\n> (.+)", out)
            if n.split("@")[0] not in cfg["cpu_only"]]
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    got = study.plan(yaml.safe_load((tmp_path / "dvc.yaml").read_text()), raw, cfg)
    assert [(n, c) for n, _, c in got] == want
    assert ("train_scored@R3", "python -m stages.train --strategy R3 --scores data/scores") in want
    assert [s for s in dict.fromkeys(s for _, s, _ in got)] == cfg["stage_order"]
    with pytest.raises(study.StudyError, match="stage_order .* update it from `dvc repro --dry --force`"):
        study.plan(yaml.safe_load((tmp_path / "dvc.yaml").read_text()), raw,
                   {**cfg, "stage_order": cfg["stage_order"][:-1]})


def test_expand_and_plan_follow_dvc_on_the_forms_it_takes():
    """Hand-written from DVC's rules (matrix: product in key order, named name@v1-v2; foreach over a mapping:
    name@key; a string that is one reference takes the value), run in stage_order, not dvc.yaml's order."""
    dvc = {"vars": [{"sets": ["a", "b"]}], "stages": {
        "grid": {"matrix": {"s": "${sets}", "k": [1, 2]}, "cmd": "run ${item.s} ${item.k}"},
        "each": {"foreach": "${strategies}", "do": {"cmd": "eval ${key} ${item.labels}"}},
        "one": {"cmd": "python -m stages.x --lr ${ train.lr }"}}}
    raw = {"train": {"lr": 0.1}, "strategies": {"S1": {"labels": "original"}, "S3": {"labels": "iqa_ls"}}}
    want = [("grid@a-1", "grid", "run a 1"), ("grid@a-2", "grid", "run a 2"), ("grid@b-1", "grid", "run b 1"),
            ("grid@b-2", "grid", "run b 2"), ("each@S1", "each", "eval S1 original"),
            ("each@S3", "each", "eval S3 iqa_ls"), ("one", "one", "python -m stages.x --lr 0.1")]
    assert study.expand(dvc, raw) == want
    assert study.plan(dvc, raw, {"stage_order": ["one", "each", "grid"], "cpu_only": ["nothing"]}) == \
        [want[6], want[4], want[5], *want[:4]]
    for change, message in [({"vars": ["params2.yaml"]}, "only inline mappings"),
                            ({"stages": {"x": {"cmd": "run ${train.nope}"}}}, "\\$\\{train.nope\\} is not defined"),
                            ({"stages": {"x": {"foreach": "${sets}", "do": {"cmd": "run"}}}}, "foreach over a mapping"),
                            ({"stages": {"x": {"cmd": "${sets}"}}}, "x: cmd must be one command string")]:
        with pytest.raises(study.StudyError, match=message):
            study.expand({**dvc, **change}, raw)


def test_a_subset_of_strategies_leaves_out_their_stages(repo_root, dvc_yaml, cfg):
    raw = study.run_params(repo_root, sets=["train.epochs=30"], strategies=["R3", "S3", "S1", "S2"])
    assert list(raw["strategies"]) == ["S1", "S2", "S3", "R3"]  # params.yaml's order, also after a --set
    assert list(raw) == list(yaml.safe_load((repo_root / "params.yaml").read_text()))
    full = study.plan(dvc_yaml, study.run_params(repo_root), cfg)
    got = study.plan(dvc_yaml, raw, cfg)
    assert {study._strategy_of(c) for _, _, c in got} == {None, "S1", "S2", "S3", "R3"}
    assert [x for x in got if study._strategy_of(x[2]) is None] == [x for x in full if study._strategy_of(x[2]) is None]
    assert [n for n, _, _ in got if n.startswith("evaluate")] == ["evaluate@S1", "evaluate@S2", "evaluate@S3",
                                                                  "evaluate@R3"]
    with pytest.raises(study.StudyError, match="--strategies S1,S10: S10: expected some of .*S1, S2"):
        study.run_params(repo_root, strategies=["S1", "S10"])
    with pytest.raises(study.StudyError, match="--strategies : none given"):
        study.run_params(repo_root, strategies=[])
    # one-hot strategies alone: train_scored has no instance left, and stage_order still holds
    raw = study.run_params(repo_root, sets=["report.fig4_strategies=[S1, S2]"], strategies=["S1", "S2"])
    assert [n for n, _, _ in study.plan(dvc_yaml, raw, cfg)] == [
        "download", "distort", "score", "corrupt", "train_onehot@S1", "train_onehot@S2", "evaluate@S1", "evaluate@S2",
        "report"]


@pytest.mark.parametrize("group", [3, 6, 51])
def test_training_is_grouped_with_merge_training_and_evaluation_is_one_call(repo_root, dvc_yaml, cfg, group):
    raw = study.run_params(repo_root, sets=["train.seeds=[0, 1, 2]"])
    planned = study.plan(dvc_yaml, raw, cfg)
    todo = study.steps(planned, raw, group)
    assert [s.stage for s in todo] == ["download", "distort", "score", "corrupt", "train", "evaluate", "report"]
    train = [c for _, s, c in planned if s.startswith("train_")]
    per_call = group // 3  # a strategy's seeds stay in one call
    want = [shlex.split(merge_training([[c] for c in train[i:i + per_call]])) for i in range(0, len(train), per_call)]
    assert todo[4].argvs == want and len(want) == -(-len(raw["strategies"]) // per_call)
    for argv in todo[4].argvs:  # --scores exactly when a strategy of the call reads them
        strategies = argv[4::2][:argv.count("--strategy")]
        assert ("--scores" in argv) == any(raw["strategies"][s]["labels"] != "original" for s in strategies)
    evaluate = ["python", "-m", "stages.evaluate", *[x for s in raw["strategies"] for x in ("--strategy", s)]]
    assert todo[5].argvs == [evaluate]
    with pytest.raises(study.StudyError, match="--group 2: expected at least 3 runs"):
        study.steps(planned, raw, 2)
    odd = [(n, s, c + " --fast" if n == "evaluate@S2" else c) for n, s, c in planned]  # not mergeable
    with pytest.raises(study.StudyError, match="evaluate commands .* expected --strategy S only"):
        study.steps(odd, raw, group)


def test_bad_sets_and_presets_are_named(repo_root, tmp_path):
    with pytest.raises(ParamError, match="--set: train.epoch: no such key"):
        study.run_params(repo_root, sets=["train.epoch=3"])
    with pytest.raises(ParamError, match="train.lr_decay_epochs"):
        study.run_params(repo_root, sets=["train.epochs=5", "train.lr_decay_epochs=12"])
    with pytest.raises(study.StudyError, match="--set train.epochs: expected KEY=VALUE"):
        study.run_params(repo_root, sets=["train.epochs"])
    (tmp_path / "p.yaml").write_text("train.epochs: 3\nmodel.lrn_sise: 9\n")
    with pytest.raises(ParamError, match="p.yaml: model.lrn_sise: no such key"):
        study.run_params(repo_root, tmp_path / "p.yaml")
    with pytest.raises(ParamError, match="nope.yaml: no such file"):
        study.run_params(repo_root, tmp_path / "nope.yaml")
    raw = study.run_params(repo_root, repo_root / "presets/paper.yaml", ["train.epochs=400", "train.seeds=[0]"])
    assert raw["train"]["epochs"] == 400 and raw["train"]["seeds"] == [0] and raw["base"]["train_size"] is None


def test_bad_input_stops_before_any_work_and_dry_prints_the_commands(repo_root, tmp_path, monkeypatch):
    def study_cmd(*args):
        return subprocess.run([sys.executable, "-m", "offline.study", "--out", str(tmp_path / "OUT"),
                               "--work", str(tmp_path / "work"), *args], cwd=repo_root, capture_output=True, text=True)
    r = study_cmd("--set", "train.epochs=400", "train.lr_decay_epochs=0")
    assert r.returncode == 1 and "train.lr_decay_epochs = 0" in r.stderr, r.stderr
    assert not (tmp_path / "OUT").exists() and not (tmp_path / "work").exists()
    monkeypatch.setattr(sys, "argv", ["offline.study", "--out", str(tmp_path / "OUT"), "--name", "../x", "--dry"])
    with pytest.raises(study.StudyError, match="--name ../x: expected letters, digits"):  # a path, not a name
        study.main()
    r = study_cmd("--dry", "--preset", "presets/paper.yaml", "--strategies", "S1,S2,S3", "--group", "6")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0] == "python -m stages.download" and lines[-2] == "python -m stages.report"
    assert "python -m stages.train --strategy S1 --strategy S2" in lines  # 2 strategies x 3 seeds
    assert lines[-1] == "# 9 runs x 16 epochs x 50,000 images = 7,200,000 training images"
    assert not (tmp_path / "OUT").exists()


def test_config_errors_name_the_key(tmp_path, repo_root):
    good = yaml.safe_load((repo_root / "offline/config.yaml").read_text())
    for change, message in [({"group": 0}, "group = 0: expected a positive integer"),
                            ({"stage_order": []}, "stage_order = \\[\\]: expected a non-empty list"),
                            ({"margin": 3}, "margin: no such key"), ({"archive_cap_mib": None}, "archive_cap_mib"),
                            ({"archive_cap_mib": 0}, "archive_cap_mib = 0: expected a positive number")]:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({**good, **change}))
        with pytest.raises(study.StudyError, match=message):
            study.load_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**good, "cpu_only": None}))  # `cpu_only:` left empty: none
    assert study.load_config(tmp_path / "c.yaml") == {**good, "cpu_only": []}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({k: v for k, v in good.items() if k != "cpu_only"}))
    with pytest.raises(study.StudyError, match="cpu_only: missing"):
        study.load_config(tmp_path / "c.yaml")
    with pytest.raises(study.StudyError, match="missing.yaml: unreadable"):
        study.load_config(tmp_path / "missing.yaml")


def test_a_failing_or_overlong_command_stops_the_run(tmp_path, repo_root, cfg):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/params.yaml").write_text("x: 1\n")
    s = study.Study(repo_root, tmp_path, tmp_path / "run", "t", cfg, tmp_path, deadline=None)
    with pytest.raises(study.StudyError, match="(?s)failed \\(rc 3\\); the end of .*stages.log.*boom"):
        s.run([study.Step("a", [["python", "-c", "print('boom'); raise SystemExit(3)"]])])
    s = study.Study(repo_root, tmp_path, tmp_path / "run", "u", cfg, tmp_path, deadline=study.time.monotonic() + 2)
    with pytest.raises(study.Stopped):
        s.run([study.Step("b", [["python", "-c", "import time; time.sleep(60)"]])])
    info = json.load(tarfile.open(tmp_path / "u.tar").extractfile("run.json"))
    assert info["status"].startswith("stopped") and info["stages"][0]["calls"][0]["rc"] == study.STOPPED
    assert info["stages"][0]["seconds"] < 20
    assert json.load(tarfile.open(tmp_path / "t.tar").extractfile("run.json"))["status"].startswith("failed")


def test_the_archive_holds_the_results_so_far_and_no_models(tmp_path, repo_root, cfg):
    """A run folder as the stages leave it mid-evaluation; the archive read back is what a researcher gets."""
    run, out, cifar = tmp_path / "run", tmp_path / "out", tmp_path / "cifar"
    files = {"params.yaml": b"train:\n  epochs: 1\n", "logs/S1/seed0.tsv": b"epoch\tloss\n0\t2.3\n",
             "metrics/S1.json": b'{"test_images": 20}\n', "metrics/distort.json": b"{}\n", "plots/report.md": b"# R\n",
             "data/raw/source.json": b'{"source": "local"}\n', "models/S1/seed0.pt": b"weights",
             "data/raw/train.npz": b"train", "data/scores/test.npy": b"scores"}
    for f, data in files.items():
        (run / f).parent.mkdir(parents=True, exist_ok=True)
        (run / f).write_bytes(data)
    probs = np.random.default_rng(0).dirichlet(np.ones(10), size=20).astype(np.float32)
    (run / "data/predictions").mkdir()
    for s in ("S1", "S2"):  # S2's evaluation has not written its metrics yet: its predictions may be partial
        np.savez(run / f"data/predictions/{s}.npz", probs=probs, labels=np.arange(20) % 10)
    out.mkdir()
    (out / "stages.log").write_bytes(bytes(range(256)) * 160)  # longer than half an archive file
    cap = int(0.05 * 2**20)
    s = study.Study(repo_root, out, run, "t", {**cfg, "archive_cap_mib": 0.05}, cifar, deadline=None)
    s.run([study.Step("probe", [["python", "-c", "import os, sys, iqals; print(sys.executable, "
                                 "os.path.dirname(iqals.__file__), os.getcwd(), os.environ['CIFAR10_LOCAL'])"]])])
    dest = results.unpack_all(out, tmp_path / "results")["t"]
    got = {f.relative_to(dest).as_posix() for f in dest.rglob("*") if f.is_file()}
    assert got == {"params.yaml", "run.json", "stages.log", "logs/S1/seed0.tsv", "metrics/S1.json",
                   "metrics/distort.json", "plots/report.md", "data/source.json", "predictions/S1.npz"}
    assert all((dest / f).read_bytes() == files[f] for f in got & set(files))
    assert (dest / "data/source.json").read_bytes() == files["data/raw/source.json"]
    assert (dest / "stages.log").read_bytes() == (out / "stages.log").read_bytes()[-(cap // 2):]  # its end
    # the dvc.yaml command's `python` is this interpreter, with this checkout first on its path, in the run folder
    printed = f"{sys.executable} {repo_root.resolve() / 'iqals'} {run.resolve()} {cifar}"
    assert printed in (dest / "stages.log").read_text(errors="replace")
    info = json.loads((dest / "run.json").read_text())
    assert info["status"] == "complete" and info["stages"][0]["calls"][0]["cmd"].startswith(shlex.quote(sys.executable))
    assert info["data_sha256"] == {"data/raw/train.npz": hashlib.sha256(b"train").hexdigest(),
                                   "data/scores/test.npy": hashlib.sha256(b"scores").hexdigest()}
    with np.load(dest / "predictions/S1.npz") as z:
        assert np.array_equal(z["pred"], probs.argmax(-1)) and np.array_equal(z["labels"], np.arange(20) % 10)


def test_archive_rolls_over_under_the_cap_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    members = {"params.yaml": b"train:\n  epochs: 16\n", "run.json": b'{"status": "complete"}\n'}
    members |= {f"logs/S{i}/seed0.tsv": rng.integers(0, 255, 15_000, dtype=np.uint8).tobytes() for i in (1, 2, 3)}
    (tmp_path / "out").mkdir()
    (tmp_path / "out/gpu_e16.4.tar").write_bytes(b"an earlier run's")
    paths = study.write_archive(tmp_path / "out", "gpu_e16", members, cap=50_000)
    assert [p.name for p in paths] == ["gpu_e16.tar", "gpu_e16.2.tar"]
    assert all(p.stat().st_size <= 50_000 for p in paths)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_e16.2.tar", "gpu_e16.tar"]
    assert results.archives(tmp_path / "out") == {"gpu_e16": paths}
    dest = results.unpack_all(tmp_path / "out", tmp_path / "results")["gpu_e16"]
    assert {m: (dest / m).read_bytes() for m in members} == members
    paths[1].rename(tmp_path / "out/gpu_e16.3.tar")
    with pytest.raises(study.StudyError, match="gpu_e16 has volumes \\[1, 3\\]: one is missing"):
        results.archives(tmp_path / "out")
    with pytest.raises(study.StudyError, match="alone .* exceeds archive_cap_mib"):
        study.write_archive(tmp_path / "out", "big", {"x": bytes(50_000)}, cap=50_000)
    (tmp_path / "out/gpu_e1.tar").write_bytes(b"another run's")  # only this name's earlier volumes go
    (tmp_path / "out/gpu_e160.2.tar").write_bytes(b"another run's")
    study.write_archive(tmp_path / "out", "gpu_e16", {"params.yaml": b"x: 1\n"}, cap=50_000)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_e1.tar", "gpu_e16.tar", "gpu_e160.2.tar"]


@pytest.mark.parametrize("sizes", [[0], [1], [512, 513], [7000, 2000], [10_240 - 2048], [15_000] * 3 + [20],
                                   [512] * 20])
@pytest.mark.parametrize("folder", ["logs/S", "plots/" + "a_long_plot_name_" * 6])  # over 100 characters: pax
def test_tar_bytes_bounds_the_tar_that_tarfile_writes(tmp_path, sizes, folder):
    """The bound against the file itself; at most a record and a pax header (3 blocks) a member above it, so
    that a volume is not cut much before the cap."""
    members = {f"{folder}{i}/seed0.tsv": bytes(n) for i, n in enumerate(sizes)}
    (path,) = study.write_archive(tmp_path, "t", members, cap=2**20)
    assert path.stat().st_size <= study.tar_bytes(sizes) < path.stat().st_size + tarfile.RECORDSIZE + 1536 * len(sizes)


@pytest.mark.parametrize("where", ["../escape.txt", "/absolute"])
def test_a_member_outside_the_run_is_refused(tmp_path, where):
    escape = tmp_path / "escape.txt"
    name = where if where.startswith("..") else str(escape)
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for member in ("params.yaml", name):
            tar.addfile(tarfile.TarInfo(member))
    with pytest.raises(study.StudyError, match=f"'{re.escape(name)}' would land outside"):
        results.unpack_archive([tmp_path / "bad.tar"], tmp_path / "results" / "bad")
    assert not escape.exists() and not (tmp_path / "results" / "bad").exists()


def test_unpacking_replaces_the_run_as_a_whole(tmp_path):
    """A second unpack of a run leaves exactly the new archive's files; links and folders in it are not
    followed; an archive without params.yaml is refused and the run stays as it was."""
    def archive(name, files, extra=()):
        with tarfile.open(tmp_path / name, "w") as tar:
            for f, data in files.items():
                info = tarfile.TarInfo(f)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            for info in extra:
                tar.addfile(info)
        return [tmp_path / name]
    dest = tmp_path / "results/r"
    old = {"params.yaml": b"x: 1\n", "metrics/S2.json": b"{}\n"}
    results.unpack_archive(archive("old.tar", old), dest)
    link, folder = tarfile.TarInfo("plots/link"), tarfile.TarInfo("plots")
    link.type, link.linkname, folder.type = tarfile.SYMTYPE, "/etc/passwd", tarfile.DIRTYPE
    new = {"params.yaml": b"x: 2\n", "metrics/S1.json": b"{}\n"}
    results.unpack_archive(archive("new.tar", new, [folder, link]), dest)
    assert {f.relative_to(dest).as_posix(): f.read_bytes() for f in dest.rglob("*") if f.is_file()} == new
    assert not (dest / "plots/link").is_symlink()
    with pytest.raises(study.StudyError, match="no params.yaml in the archive"):
        results.unpack_archive(archive("none.tar", {"metrics/S3.json": b"{}\n"}), dest)
    assert sorted(f.name for f in dest.parent.iterdir()) == ["r"] and (dest / "params.yaml").read_bytes() == b"x: 2\n"


def test_compact_predictions_keep_the_argmax_through_the_archive(tmp_path):
    probs = np.random.default_rng(0).dirichlet(np.ones(10), size=(2, 10, 500)).astype(np.float32)
    probs[0, 0, :50, 3] = probs[0, 0, :50, 7] + 1e-5  # near ties that float16 cannot separate
    assert not np.array_equal(probs.astype(np.float16).argmax(-1), probs.argmax(-1))
    pred, p16 = study.compact_predictions(probs)
    assert p16.dtype == np.float16 and pred.dtype == np.uint8
    assert np.array_equal(pred, probs.argmax(-1)) and np.array_equal(p16.argmax(-1), pred)
    # only a top class that rounding lost changes, and to the float16 just above the row's other classes
    rounded, top = probs.astype(np.float16), np.eye(10, dtype=bool)[pred]
    fixed = rounded.argmax(-1) != pred
    assert np.array_equal(p16[~top | ~fixed[..., None]], rounded[~top | ~fixed[..., None]])
    others = np.where(top, -np.inf, p16).max(-1)[fixed]
    assert np.all(p16[top & fixed[..., None]] > others)
    assert np.all(np.nextafter(p16[top & fixed[..., None]], np.float16(-np.inf)) <= others)
    np.savez(tmp_path / "S1.npz", probs=probs, labels=np.arange(500) % 10)
    members = {"params.yaml": b"x: 1\n", "predictions/S1.npz.xz": study.pack_predictions(tmp_path / "S1.npz")}
    study.write_archive(tmp_path, "p", members, 2**20)
    with np.load(results.unpack_all(tmp_path, tmp_path / "results")["p"] / "predictions/S1.npz") as z:
        assert np.array_equal(z["probs"].argmax(-1), probs.argmax(-1)) and np.array_equal(z["pred"], pred)
        assert np.array_equal(z["labels"], np.arange(500) % 10)


@pytest.fixture
def packed(tmp_path, tiny_cifar, monkeypatch):
    monkeypatch.setattr(pack, "CHUNK_ROWS", 64)  # several chunks per array, as with the real set
    return tmp_path / "parts", pack.pack(tiny_cifar, tmp_path / "parts", max_part_bytes=200_000)


def planar_row_deltas(x: np.ndarray) -> bytes:
    """The image codec by hand: channel by channel, image, row, each value minus its left neighbour mod 256."""
    out = bytearray()
    for c in range(x.shape[3]):
        for img in x[..., c].astype(int):
            for row in img:
                out += bytes((v - left) % 256 for v, left in zip(row, [0, *row[:-1]]))
    return bytes(out)


def test_pack_round_trip_is_exact_in_several_parts(packed, tiny_cifar, tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    x[0], x[1, :, ::2] = 0, 255  # the largest jumps between neighbours, both ways
    assert pack.encode_images(x) == planar_row_deltas(x)  # the format of parts packed by any version
    assert np.array_equal(pack.decode_images(pack.encode_images(x), x.shape), x)
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)  # dtype and shape are hashed with the bytes
    assert pack.array_sha256(a) == hashlib.sha256(b"|u1(2, 3)" + bytes(range(6))).hexdigest()
    assert pack.array_sha256(a.T) == hashlib.sha256(b"|u1(3, 2)" + bytes([0, 3, 1, 4, 2, 5])).hexdigest()
    parts, m = packed
    n = -(-m["stream_bytes"] // 200_000)  # the fewest parts within the limit, all of one size but the last
    size = -(-m["stream_bytes"] // n)
    assert n >= 2 and [p["length"] for p in m["parts"]] == [size] * (n - 1) + [m["stream_bytes"] - (n - 1) * size]
    assert m["stream_bytes"] < m["raw_bytes"]
    for p in m["parts"]:  # each folder travels alone: each holds the whole manifest
        assert json.loads((parts / f"part{p['k']}" / pack.MANIFEST).read_text()) == m
    with pytest.raises(pack.PackError, match="max part size 0 bytes: expected a positive size"):
        pack.pack(tiny_cifar, tmp_path / "zero", max_part_bytes=0)
    written = pack.unpack(parts, tmp_path / "copy")
    for split in ("train", "test"):
        for a, b in zip(load_npz(tiny_cifar / f"{split}.npz", split), load_npz(written[split], split)):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        assert list(np.load(written[split])["classes"]) == list(np.load(tiny_cifar / f"{split}.npz")["classes"])


@pytest.mark.parametrize("damage, message", [("missing", "is missing"), ("truncated", "is truncated"),
                                             ("corrupt", "is corrupt")])
def test_a_damaged_part_is_named(packed, tmp_path, damage, message):
    parts, m = packed
    path = parts / m["parts"][-1]["file"]
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(data[:-10] if damage == "truncated" else data[:100] + bytes([data[100] ^ 255]) + data[101:])
    with pytest.raises(pack.PackError, match=f"part {len(m['parts'])} of {len(m['parts'])} .* {message}"):
        pack.unpack(parts, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    pack.check_parts(parts, only=[1])  # the parts that did arrive intact still check
    with pytest.raises(pack.PackError, match="no part folder"):
        pack.unpack(tmp_path / "copy", tmp_path / "copy2")


def test_a_manifest_that_disagrees_with_the_data_is_refused(packed, tmp_path):
    """Intact parts, but a manifest of another format, stream or array: the checks after the parts' own."""
    parts, m = packed
    images = next(i for i, r in enumerate(m["arrays"]) if (r["split"], r["key"]) == ("train", "images"))
    for change, message in [(lambda d: d.update(format=2), "format 2, expected 1"),
                            (lambda d: d.update(stream_sha256="0" * 64), "joined parts differ from the packed stream"),
                            (lambda d: d["arrays"][images].update(sha256="0" * 64),
                             "train/images differs from the packed array")]:
        bad = json.loads(json.dumps(m))
        change(bad)
        for p in m["parts"]:
            (parts / f"part{p['k']}" / pack.MANIFEST).write_text(json.dumps(bad))
        with pytest.raises(pack.PackError, match=message):
            pack.unpack(parts, tmp_path / "copy")
        assert not (tmp_path / "copy").exists()


def test_pack_command_takes_the_part_size_in_mib(tiny_cifar, tmp_path, monkeypatch):
    def command(*args):
        monkeypatch.setattr(sys, "argv", ["offline.pack", *args])
        pack.main()
    command("pack", "--src", str(tiny_cifar), "--out", str(tmp_path / "parts"), "--max-part-mib", "0.15")
    m = json.loads((tmp_path / "parts/part1" / pack.MANIFEST).read_text())
    limit = int(0.15 * 2**20)  # 157,286 bytes
    assert len(m["parts"]) == -(-m["stream_bytes"] // limit) >= 2 and max(p["length"] for p in m["parts"]) <= limit
    shutil.rmtree(tmp_path / "parts/part1")
    command("check", "--parts", str(tmp_path / "parts"), "--part", "2")  # the parts that came so far
    with pytest.raises(pack.PackError, match="part 1 of .* is missing"):
        command("check", "--parts", str(tmp_path / "parts"))


def test_old_run_json_gives_a_run_summary(repo_root):
    md = results.run_markdown(repo_root / "results/gpu_e16", {"data/raw/test.npz": True, "data/scores/test.npy": False})
    assert "| status | complete |" in md and "| code | not recorded |" in md
    assert "| data | regenerated on the CPU: matched: `data/raw/test.npz`; differ: `data/scores/test.npy` |" in md
    assert re.search(r"\| train \| 235\.8 \| 1; 40,800,000 training images", md)


def test_run_summary_counts_what_the_run_left(tmp_path, raw_params, repo_root):
    """A run stopped during evaluation, its table written out by hand: 2 seeds x 3 strategies x 2 epochs x
    100 images = 1,200 training images in 10 s; a strategy is trained when every seed's log is there."""
    raw_params["base"]["train_size"] = 100
    raw_params["strategies"] = {k: raw_params["strategies"][k] for k in ("S1", "S2", "S3")}
    t = raw_params["train"]
    t.update(epochs=2, lr=0.1, lr_decay=0.1, lr_decay_epochs=1, batch_size=50, seeds=[0, 1], precision="bf16",
             step="graph")
    del t["layout"]  # params of an older run: params.yaml's default
    run = tmp_path / "gpu_e2"
    for f in ("logs/S1/seed0.tsv", "logs/S1/seed1.tsv", "logs/S2/seed0.tsv"):
        (run / f).parent.mkdir(parents=True, exist_ok=True)
        (run / f).write_text("epoch\n")
    (run / "metrics").mkdir()
    (run / "metrics/S1.json").write_text('{"test_images": 12345}')
    (run / "params.yaml").write_text(yaml.safe_dump(raw_params))
    info = {"device": "Device A", "cpus": 16, "python": "3.12.3", "torch": None, "status": "stopped: at --budget-s",
            "code_sha256": "ab" * 32,
            "stages": [{"stage": "train", "seconds": 10.0, "calls": [{"rc": 0}]},
                       {"stage": "evaluate", "seconds": 5.5, "calls": [{"rc": 0}, {"rc": study.STOPPED}]},
                       {"stage": "train", "seconds": 3.0, "calls": [{"rc": 1}]}]}
    (run / "run.json").write_text(json.dumps(info))
    md = results.run_markdown(run).splitlines()
    assert [line for line in md if line.startswith("| ") and not line.startswith("| |")] == [
        "| device | Device A, 16 CPU cores, Python 3.12.3, torch not recorded |",
        "| schedule | 2 epochs, lr 0.1 x0.1 every 1 epochs, batch 50, 100 training images; step asked: bf16, graph, "
        "channels layout (stages.log: which ran) |",
        "| seeds | [0, 1] |",
        "| strategies | 1 of 3 trained, 1 evaluated; not evaluated: S2, S3 |",
        "| test images | 12,345 |",
        "| status | stopped: at --budget-s |",
        "| code | sha256 abababababababab of iqals/*.py and stages/*.py: not this checkout's |",
        "| stage | seconds | calls |",
        "| train | 10.0 | 1; 1,200 training images, 120 images/s |",
        f"| evaluate | 5.5 | 2; rc {study.STOPPED} |",
        "| train | 3.0 | 1; rc 1 |"]
    (run / "run.json").write_text(json.dumps({**info, "code_sha256": study.code_sha256(repo_root)}))
    (run / "metrics/S1.json").unlink()
    md = results.run_markdown(run, repo=repo_root)
    assert "and stages/*.py: this checkout's |" in md and "| test images | none evaluated |" in md


def source_sha256(repo: Path) -> str:
    """study.code_sha256 as its docstring says, written out again: for each iqals/*.py and stages/*.py in
    path order, its path, NUL, size, NUL and bytes (run.json keeps the hash: the format must not drift)."""
    h = hashlib.sha256()
    for f in sorted([*repo.glob("iqals/*.py"), *repo.glob("stages/*.py")]):
        data = f.read_bytes()
        h.update(f"{f.relative_to(repo).as_posix()}\0{len(data)}\0".encode() + data)
    return h.hexdigest()


def test_code_sha256_is_of_the_library_sources(tmp_path, repo_root):
    copy_repo(tmp_path, repo_root, ["iqals", "stages", "offline"])
    before = study.code_sha256(tmp_path)
    assert before == source_sha256(tmp_path)
    (tmp_path / "offline/study.py").write_text("# not the library\n")
    assert study.code_sha256(tmp_path) == before
    with open(tmp_path / "stages/train.py", "a") as f:  # one byte in one file
        f.write("\n")
    assert study.code_sha256(tmp_path) != before


def test_the_library_never_imports_offline(repo_root):
    for f in [*repo_root.glob("iqals/*.py"), *repo_root.glob("stages/*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "offline" or n.startswith("offline.") for n in names), f


# ---------------------------------------------------------------- the rehearsal

def clean_copy(dest: Path, repo_root: Path, tiny_cifar: Path) -> dict:
    """The repository as it travels, shrunk to the tiny data, with the data in 2 parts; returns the
    node's environment: the copy on PYTHONPATH, and dvc and piq blocked (the node has neither)."""
    copy_repo(dest, repo_root, COPY + ["offline"])
    raw = yaml.safe_load((dest / "params.yaml").read_text())
    raw["base"]["train_size"] = 100
    raw["train"].update(seeds=SEEDS, epochs=1, lr_decay_epochs=1, batch_size=50)
    raw["strategies"] = {k: v for k, v in raw["strategies"].items() if k in ONEHOT + SCORED}
    raw["report"].update(fig4_examples=[0, 1], fig4_strategies=ONEHOT + SCORED)
    raw["corrupt"].update(families=["contrast"], severities=[1, 5])
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    dvc = yaml.safe_load((dest / "dvc.yaml").read_text())
    dvc["vars"] = [{"onehot": ONEHOT}, {"scored": SCORED}]
    (dest / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    assert len(pack.pack(tiny_cifar, dest / "transfer/cifar10", max_part_bytes=250_000)["parts"]) == 2
    block = dest.parent / "absent"
    for name in ("dvc", "piq"):
        (block / name).mkdir(parents=True, exist_ok=True)
        (block / name / "__init__.py").write_text(f"raise ImportError('{name} is absent on the node')\n")
    return dict(os.environ, PYTHONPATH=f"{block}{os.pathsep}{dest}", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def node(dest: Path, env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offline.study", "--parts", "transfer/cifar10", *args],
                          cwd=dest, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, repo_root, tiny_cifar):
    tmp = tmp_path_factory.mktemp("rehearsal")
    dest, out = tmp / "repo", tmp / "OUT"
    env = clean_copy(dest, repo_root, tiny_cifar)
    r = subprocess.run([sys.executable, "-c", "import dvc"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "absent on the node" in r.stderr
    r = node(dest, env, "--out", str(out), "--budget-s", "600", "--work", str(tmp / "work"))
    assert r.returncode == 0, r.stderr[-4000:] + ((out / "stages.log").read_text()[-4000:] if out.exists() else "")
    return tmp, dest, out


@pytest.mark.slow
def test_rehearsal_on_the_node_returns_the_archive(rehearsal):
    tmp, dest, out = rehearsal
    assert sorted(p.name for p in out.iterdir()) == ["gpu_e1.tar", "stages.log"]
    with tarfile.open(out / "gpu_e1.tar") as tar:
        members = set(tar.getnames())
        info = json.load(tar.extractfile("run.json"))
    want = {"params.yaml", "run.json", "stages.log", "data/source.json", "plots/report.md", "plots/fig3.png",
            *(f"metrics/{m}.json" for m in ("distort", "score", "corrupt"))}
    want |= {f"logs/{s}/seed{k}.tsv" for s in ONEHOT + SCORED for k in SEEDS}
    want |= {f"{d}/{s}{x}" for s in ONEHOT + SCORED for d, x in (("metrics", ".json"), ("predictions", ".npz.xz"))}
    assert want <= members and not any(m.endswith(".pt") for m in members)
    assert info["status"] == "complete" and info["code_sha256"] == source_sha256(dest)
    assert [s["stage"] for s in info["stages"]] == ["download", "distort", "score", "corrupt", "train", "evaluate",
                                                    "report"]
    assert [c["cmd"].split(" ", 1)[1] for c in info["stages"][4]["calls"]] == [
        "-m stages.train --strategy S1 --strategy S2 --strategy S3 --scores data/scores"]
    # each of the files as the run wrote them (its work folder keeps them)
    assert info["data_sha256"] == {f: hashlib.sha256((tmp / "work/run" / f).read_bytes()).hexdigest()
                                   for f in study.DATA_FILES}


@pytest.mark.slow
def test_rehearsal_results_metrics_and_regenerated_report(rehearsal, tiny_cifar):
    tmp, dest, out = rehearsal
    env = dict(os.environ, PYTHONPATH=str(dest))
    sh([sys.executable, "-m", "offline.results", "unpack", str(out)], dest, env)
    r1 = dest / "results/gpu_e1"
    with np.load(r1 / "predictions/S3.npz") as z:
        assert z["probs"].dtype == np.float16 and np.array_equal(z["probs"].argmax(-1), z["pred"])
    dvc = yaml.safe_load((dest / "dvc.yaml").read_text())
    (dest / "dvc.yaml").write_text(yaml.safe_dump({**dvc, "metrics": ["results"]}, sort_keys=False))
    sh(["git", "init", "-q"], dest, env)
    sh([sys.executable, "-m", "dvc", "init", "-q"], dest, env)
    with open(dest / ".dvcignore", "a") as f:
        f.write("/results/*/*\n!/results/*/metrics\n")
    shown = sh([sys.executable, "-m", "dvc", "metrics", "show", "--json"], dest, env)
    assert "results/gpu_e1/metrics/S3.json" in shown and "results/gpu_e1/run.json" not in shown
    (r1 / "plots/report.md").unlink()
    sh([sys.executable, "-m", "offline.results", "report", "results/gpu_e1", "--cifar", str(tiny_cifar),
        "--work", str(tmp / "regen")], dest, env)
    assert "### Table 2" in (r1 / "plots/report.md").read_text()
    md = (r1 / "RUN.md").read_text()
    assert "| status | complete |" in md and "differ" not in md and "and stages/*.py: this checkout's |" in md
    assert "| data | regenerated on the CPU: matched: `data/raw/train.npz`, `data/raw/test.npz`" in md


@pytest.mark.slow
def test_a_missing_part_stops_the_run_at_once(tmp_path, repo_root, tiny_cifar):
    dest = tmp_path / "repo"
    env = clean_copy(dest, repo_root, tiny_cifar)
    shutil.rmtree(dest / "transfer/cifar10/part2")
    r = node(dest, env, "--out", str(tmp_path / "OUT"), "--work", str(tmp_path / "work"), timeout=120)
    assert r.returncode == 1 and "part 2 of 2" in r.stderr and "is missing" in r.stderr, r.stderr
    assert not (tmp_path / "OUT").exists() and not (tmp_path / "work").exists()  # before anything ran
