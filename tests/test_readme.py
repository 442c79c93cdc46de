"""The README's promises: its first commands, and results copied verbatim from the pipeline."""
import re

import pytest



def test_readme_opens_with_study_and_test_commands(repo_root):
    text = (repo_root / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make study", "make test"]
    make = (repo_root / "Makefile").read_text()
    assert re.search(r"^study: setup\n\tdvc repro$", make, re.M)
    assert re.search(r"^test: setup\n\t\$\(PY\) -m pytest", make, re.M)
    assert "make test" in (repo_root / ".ci" / "run").read_text()


def block(text: str, name: str) -> str:
    return text.split(f"<!-- {name}:begin -->", 1)[1].split(f"<!-- {name}:end -->", 1)[0].strip()


@pytest.mark.parametrize("name, source", [("report", "plots/report.md"), ("bench", "bench/results.md")])
def test_readme_sections_are_the_committed_results(repo_root, name, source):
    """The README's results were copied from what the pipeline / benchmarks wrote, unedited."""
    path = repo_root / source
    if not path.exists():
        pytest.skip(f"no committed {source} yet")
    assert block((repo_root / "README.md").read_text(), name) == path.read_text().strip()
