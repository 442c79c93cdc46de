"""The README's promises: its first commands, and results copied verbatim from the pipeline."""
import os
import re
import shlex
import subprocess
import sys

import pytest


def test_readme_opens_with_study_and_test_commands(repo_root):
    text = (repo_root / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make study", "make test"]
    make = (repo_root / "Makefile").read_text()
    assert re.search(r"^study: setup\n\tdvc repro$", make, re.M)
    assert re.search(r"^test: setup\n\t\$\(PYTEST\)$", make, re.M)
    # the suite's files side by side, each on one worker, so that a module's fixture is built once
    assert re.search(r"^PYTEST := \$\(PY\) -m pytest -q -n auto .*--dist loadfile$", make, re.M)
    assert "make test" in (repo_root / ".ci" / "run").read_text()


def block(text: str, name: str) -> str:
    return text.split(f"<!-- {name}:begin -->", 1)[1].split(f"<!-- {name}:end -->", 1)[0].strip()


@pytest.mark.parametrize("name", ["headline", "deviation", "timings", "speed"])
def test_readme_sections_are_the_committed_results(repo_root, name):
    """The README's results were copied from what the pipeline / benchmarks wrote (or computed
    from it by iqals.readme), unedited but for links made relative to the root."""
    from iqals.readme import BLOCKS, fill
    want = fill(repo_root, BLOCKS[name]).strip()
    assert block((repo_root / "README.md").read_text(), name) == want
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", want):
        assert (repo_root / link).is_file(), link  # every figure it shows is committed


def test_rebase_prefixes_relative_links_only():
    from iqals.readme import rebase
    text = "![F](fig3.png) [t](table2.md) [w](https://x.org/a) [h](#sec) ![a](/abs.png)"
    assert rebase(text, "results/g/plots") == ("![F](results/g/plots/fig3.png) [t](results/g/plots/table2.md) "
                                               "[w](https://x.org/a) [h](#sec) ![a](/abs.png)")
    assert rebase(text, ".") == text


def test_make_readme_fills_every_block_from_its_source(tmp_path, repo_root, monkeypatch):
    """`make readme` (iqals.readme.sync) copies each source file (or function's text) between its
    markers, verbatim."""
    from iqals import readme
    from iqals.errors import ExpectedError

    assert re.search(r"^readme: setup\n\t\$\(PY\) -m iqals.readme$", (repo_root / "Makefile").read_text(), re.M)
    sources = {"a": "x/a.md", "b": lambda root: "| b | 1 |\n"}
    text = "# T\n" + "".join(f"<!-- {n}:begin -->\nold\n<!-- {n}:end -->\nkept {n}\n" for n in sources)
    (tmp_path / "README.md").write_text(text)
    (tmp_path / "x").mkdir()
    (tmp_path / "x/a.md").write_text("| a | [1](n.md) |\n\n")
    monkeypatch.setattr(readme, "BLOCKS", sources)
    readme.sync(tmp_path)
    # written out by hand: each block stripped on lines of its own, x/a.md's link made relative to the root
    new = ("# T\n<!-- a:begin -->\n| a | [1](x/n.md) |\n<!-- a:end -->\nkept a\n"
           "<!-- b:begin -->\n| b | 1 |\n<!-- b:end -->\nkept b\n")
    assert (tmp_path / "README.md").read_text() == new
    readme.sync(tmp_path)  # a second `make readme` changes nothing
    assert (tmp_path / "README.md").read_text() == new
    (tmp_path / "README.md").write_text("# no markers\n")
    with pytest.raises(ExpectedError, match="markers"):
        readme.sync(tmp_path)
    # the last block's markers missing: nothing is written, not even the blocks before it
    last = list(readme.BLOCKS)[-1]
    partial = text.replace(f"<!-- {last}:end -->", "")
    (tmp_path / "README.md").write_text(partial)
    with pytest.raises(ExpectedError, match=f"{last}:end"):
        readme.sync(tmp_path)
    assert (tmp_path / "README.md").read_text() == partial
    swapped = "<!-- a:end -->\nx\n<!-- a:begin -->\n<!-- b:begin -->\n<!-- b:end -->\n"  # end before begin
    (tmp_path / "README.md").write_text(swapped)
    with pytest.raises(ExpectedError, match="a:end -->.*in that order"):
        readme.sync(tmp_path)
    assert (tmp_path / "README.md").read_text() == swapped


def test_make_readme_names_a_missing_source_in_one_line(tmp_path, repo_root):
    """`make readme` without its sources (here no README.md at all): one line and exit 1, no traceback."""
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    r = subprocess.run([sys.executable, "-m", "iqals.readme"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and r.stderr.splitlines() == [
        "make readme: [Errno 2] No such file or directory: 'README.md'"], r.stderr


def test_make_clean_keeps_committed_results_and_test_fast_skips_slow(repo_root):
    make = (repo_root / "Makefile").read_text()
    clean = re.search(r"^clean:\n((?:\t.*\n?)+)", make, re.M).group(1)
    targets = [w for line in clean.splitlines() for w in shlex.split(line)[2:]]  # each line: rm -rf PATH...
    assert clean.count("\t") == len(clean.splitlines()) and all(line.split()[:2] == ["rm", "-rf"]
                                                                for line in clean.splitlines()), clean
    tracked = subprocess.run(["git", "ls-files"], cwd=repo_root, capture_output=True, text=True, check=True).stdout
    removed = {str(p.relative_to(repo_root)) for t in targets for p in repo_root.glob(t.strip("/"))}
    hit = [f for f in tracked.splitlines() for r in removed if f == r or f.startswith(r.rstrip("/") + "/")]
    assert targets and not hit, hit  # committed results (logs/, metrics/, plots/, results/ ...) stay
    assert re.search(r"^test-fast: setup\n\t\$\(PYTEST\) -m \"not slow\"$", make, re.M)
