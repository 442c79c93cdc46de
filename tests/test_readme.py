"""The README's promises: its first commands, and results copied verbatim from the pipeline."""
import re

import pytest

from stages.report import README_BEGIN, README_END


def test_readme_opens_with_study_and_test_commands(repo_root):
    text = (repo_root / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make study", "make test"]
    make = (repo_root / "Makefile").read_text()
    assert re.search(r"^study: setup\n\tdvc repro$", make, re.M)
    assert re.search(r"^test: setup\n\t\$\(PY\) -m pytest", make, re.M)
    assert "make test" in (repo_root / ".ci" / "run").read_text()


def test_readme_results_are_the_committed_report(repo_root):
    report = repo_root / "plots" / "report.md"
    if not report.exists():
        pytest.skip("no committed report yet")
    text = (repo_root / "README.md").read_text()
    block = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    assert block.strip() == report.read_text().strip()
