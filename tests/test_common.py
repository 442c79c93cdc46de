"""stages/common.run: errors raised on purpose print one line; anything else keeps its traceback."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from iqals.data import DataError
from iqals.errors import ExpectedError, UsageError
from iqals.params import ParamError


def run_stage(repo_root, body: str, cwd=None,
              first: str = "logging.basicConfig(level=logging.INFO)") -> subprocess.CompletedProcess:
    """A stage whose main() runs `first`, then `body`, as `python -c` in cwd, through stages.common.run."""
    code = ("import logging\nfrom stages.common import run, setup\n"
            f"def main():\n    {first}\n    {body}\nrun(main)\n")
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd or repo_root, env=env, capture_output=True,
                          text=True, timeout=60)


MODULES = {"ParamError": "iqals.params", "DataError": "iqals.data", "UsageError": "iqals.errors",
           "PackError": "offline.pack", "StudyError": "offline.study"}


@pytest.mark.parametrize("error", list(MODULES))
def test_expected_errors_print_one_line(repo_root, error):
    mod = MODULES[error]
    r = run_stage(repo_root, f"from {mod} import {error}; raise {error}('--strategy S42: not in params.yaml')")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["ERROR:stage:--strategy S42: not in params.yaml"], r.stderr


@pytest.mark.parametrize("error", ["IndexError('index 10 is out of bounds')", "ValueError('shapes differ')",
                                   "RuntimeError('CUDA out of memory')"])
def test_unexpected_errors_keep_their_traceback(repo_root, error):
    r = run_stage(repo_root, f"raise {error}")
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr and error.split("(")[0] in r.stderr, r.stderr
    assert "ERROR:stage" not in r.stderr


def test_expected_errors_share_one_base():
    for cls in (ParamError, DataError, UsageError):
        assert issubclass(cls, ExpectedError) and issubclass(cls, ValueError), cls


def test_cli_defaults_repeats_and_dashes(monkeypatch):
    from stages.common import cli
    opts = dict(strategy=None, run=[], raw="data/raw", stop_after=None)
    monkeypatch.setattr(sys, "argv", ["stage"])
    assert vars(cli("doc", **opts)) == {"strategy": None, "run": [], "raw": "data/raw", "stop_after": None}
    monkeypatch.setattr(sys, "argv", ["stage", "--run", "S1:0", "--run", "S3:1", "--stop-after", "2", "--raw", "r"])
    assert vars(cli("doc", **opts)) == {"strategy": None, "run": ["S1:0", "S3:1"], "raw": "r", "stop_after": "2"}
    assert opts["run"] == []  # the default list is not appended to
    monkeypatch.setattr(sys, "argv", ["stage", "--stop_after", "2"])
    with pytest.raises(SystemExit):  # the option is spelt with a dash
        cli("doc", **opts)


def test_setup_names_the_stage_in_each_line_and_validates_params_first(repo_root, tmp_path, raw_params):
    """setup(name): log lines `HH:MM:SS name LEVEL message` from INFO on, and params.yaml parsed (attributes, not
    the raw mapping) before the stage's work; a bad value stops the stage there with one line."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    r = run_stage(repo_root, "logging.getLogger('x').info('epochs %d', p.train.epochs)", tmp_path, "p = setup('train')")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(rf"\d\d:\d\d:\d\d train INFO epochs {raw_params['train']['epochs']}\n", r.stderr), r.stderr
    raw_params["train"]["epochs"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    r = run_stage(repo_root, "open('started', 'w')", tmp_path, "setup('train')")
    assert r.returncode == 1 and not (tmp_path / "started").exists()
    assert re.fullmatch(r"\d\d:\d\d:\d\d train ERROR params\.yaml: train\.epochs = 0: expected an integer in "
                        r"\[1, inf\)\n", r.stderr), r.stderr
