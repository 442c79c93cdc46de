"""bench/cli.py: a benchmark's options come from its main()'s parameters."""
from __future__ import annotations

import json
import sys


def fake_main(n: int | None = None, loop_n: int = 3, seconds: float | None = None, groups: tuple[int, ...] = (3,),
              strategies: list[str] | None = None, quick: bool = False, device: str = "cpu") -> dict:
    return {"n": n, "loop_n": loop_n, "seconds": seconds, "groups": groups, "strategies": strategies,
            "quick": quick, "device": device}


def test_options_are_typed_from_the_annotations_and_the_result_is_written(tmp_path, monkeypatch):
    from bench import cli
    monkeypatch.setattr(sys, "argv", ["bench_fake", "--n", "5", "--loop-n", "7", "--seconds", "1.5", "--groups",
                                      "1,17", "--strategies", "S1,S3", "--quick", "--out", str(tmp_path / "r.json")])
    got = cli.run(fake_main, "doc")
    assert got == {"n": 5, "loop_n": 7, "seconds": 1.5, "groups": (1, 17), "strategies": ("S1", "S3"),
                   "quick": True, "device": "cpu"}
    assert json.loads((tmp_path / "r.json").read_text())["groups"] == [1, 17]
    monkeypatch.setattr(sys, "argv", ["bench_fake", "--out", str(tmp_path / "d.json")])
    assert cli.run(fake_main, "doc") == fake_main()  # no options: main's own defaults


def test_timed_records_a_successful_command_and_replaces_its_row(tmp_path):
    import os
    import subprocess

    env = dict(os.environ, TIMINGS=str(tmp_path / "t.md"))
    run = lambda name, *cmd: subprocess.run([sys.executable, "-m", "bench.timed", name, "--", *cmd], env=env).returncode
    assert run("make a", "true") == 0 and run("make b", "sleep", "0.1") == 0 and run("make a", "true") == 0
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[0] == "| command | wall minutes | CPU | date |" and len(lines) == 4
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| `make a`", "| `make b`"]
    assert run("make c", "false") == 1 and "make c" not in (tmp_path / "t.md").read_text()
