"""Filling the README's results and benchmark sections from files the code wrote."""
from __future__ import annotations

from pathlib import Path

from .io import write_text


def replace_block(path: str | Path, name: str, text: str) -> None:
    """Replace what stands between `<!-- name:begin -->` and `<!-- name:end -->` in a text file.

    The README's results and benchmark sections are filled this way from the files the pipeline
    and the benchmarks wrote, never typed by hand; tests/test_readme.py checks they agree.
    """
    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text()
    if begin not in old or end not in old:
        raise ValueError(f"{path}: markers {begin} / {end} not found")
    head, rest = old.split(begin, 1)
    write_text(path, head + begin + "\n" + text.strip() + "\n" + end + rest.split(end, 1)[1])
