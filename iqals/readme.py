"""Filling the README's generated sections from files the code wrote: `make readme`.

The README's results and benchmark sections are never typed by hand; tests/test_readme.py
checks that each agrees with its source file.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import ExpectedError
from .io import write_text

# README block name -> the file that fills it (written by the pipeline, gpu_results or the benchmarks)
HEADLINE = "results/gpu_e16"  # the GPU run the README leads with
BLOCKS = {"gpu_run": f"{HEADLINE}/RUN.md", "gpu_report": f"{HEADLINE}/plots/report.md",
          "report": "plots/report.md", "bench": "bench/results.md"}
_LINK = re.compile(r"(!?\[[^\]]*\]\()(?![a-z]+:|/|#)([^)]+\))")


def rebase(text: str, folder: str) -> str:
    """Relative links of a file in `folder` made relative to the repository root."""
    return _LINK.sub(lambda m: f"{m[1]}{folder}/{m[2]}", text) if folder not in ("", ".") else text


def sync(root: str | Path = ".") -> None:
    """Copy every source of BLOCKS between `<!-- name:begin -->` and `<!-- name:end -->` in
    root/README.md, its relative links rebased to the root; one write, after every block is found."""
    root, readme = Path(root), Path(root) / "README.md"
    text = readme.read_text()
    for name, source in BLOCKS.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if begin not in text or end not in text:
            raise ExpectedError(f"{readme}: markers {begin} / {end} not found")
        block = rebase((root / source).read_text(), str(Path(source).parent))
        head, rest = text.split(begin, 1)
        text = head + begin + "\n" + block.strip() + "\n" + end + rest.split(end, 1)[1]
    write_text(readme, text)


if __name__ == "__main__":
    try:
        sync()
    except (ExpectedError, OSError) as e:  # markers or a source file missing: one line
        raise SystemExit(f"make readme: {e}")
