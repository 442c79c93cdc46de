"""Filling the README's generated sections from files the code wrote: `make readme`.

The README's results and timings are never typed by hand; tests/test_readme.py checks that
each block agrees with what its source computes.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from .errors import ExpectedError
from .io import read_json, write_text

HEADLINE = "results/gpu_e16"  # the GPU run the README leads with
TWINS = ("IQA-LS vs one-hot", "IQA-LS vs uniform", "IQA-LS vs shuffled")  # the headline's comparisons


def headline(root: Path) -> str:
    """The first screen's table, from the headline run's Table 2 and comparisons: per strategy of
    Table 2 its pristine accuracy beside the paper's, and per mix IQA-LS against its one-hot twin
    and the two controls on the claim sets (difference in points, 95% interval, Holm p)."""
    plots = root / HEADLINE / "plots"
    t2 = pd.read_csv(plots / "table2.csv").set_index("strategy")
    comps = pd.read_csv(plots / "comparisons.csv")
    claim = comps[comps.test_set == "claim"].set_index(["family", "a"])
    lines = ["| S | labels | train set | pristine, ours (paper) | " + " | ".join(TWINS) + " |",
             "|" + "---|" * (4 + len(TWINS))]
    for name, r in t2.iterrows():
        cells = []
        for family in TWINS:
            c = claim.loc[(family, name)] if (family, name) in claim.index else None
            cells.append("" if c is None else
                         f"{100 * c['diff']:+.1f} [{100 * c.ci_lo:+.1f}, {100 * c.ci_hi:+.1f}], p {c.p_holm:.2g}")
        lines.append(f"| {name} | {r.regularization} | {r.train_set} | {100 * r.pristine:.1f} ± "
                     f"{100 * r.pristine_std:.1f} ({100 * r.pristine_paper:.1f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def deviation_summary(root: Path) -> str:
    """The deviation study's section, its tables left in plots/deviation.md."""
    text = (root / "plots/deviation.md").read_text()
    return text.split("### ", 1)[0].split("\n", 1)[1].strip() + "\n"


def gpu_speed(root: Path) -> str:
    """The GPU probe's summary from bench/results.json (`python -m bench.run --only train_gpu` on a
    CUDA machine): card, date, the fastest step variant that passed its check, and its ratio to the
    step results/gpu_e16 trained with, both timed in the same call (or why a probe gave no figure)."""
    from .probe import BASELINE_NAME, name

    entry = read_json(root / "bench/results.json")["benchmarks"].get("train_gpu", {})
    r, more = entry.get("result", {}), "Every variant, with its check: [`bench/results.md`](bench/results.md).\n"
    if "variants" not in r:  # not run here, or run where torch saw no GPU
        return ("No GPU probe in `bench/results.json` yet: on a CUDA machine, `python -m bench.run --only "
                "train_gpu`, then `make readme`. The last one is in "
                "[`results/gpu_e16/RUN.md`](results/gpu_e16/RUN.md).\n")
    where = f"{r['device_name']}, {entry['machine']['date']}"
    best, base = r.get("chosen"), r.get("baseline")
    if not best:
        return f"The GPU probe on {where} timed no step variant that passed its check. {more}"
    ratio = (f"{r['chosen_vs_baseline']}x ({base['images_per_s']:,.0f} images/s)" if base else
             "not timed in this call")
    return ("| GPU, date | fastest step that passed its check | images/s, summed over runs | vs "
            f"{BASELINE_NAME} (gpu_e16's step), same call |\n|---|---|---|---|\n"
            f"| {where} | {name(best)} | {best['images_per_s']:,.0f} | {ratio} |\n\n{more}")


# README block name -> the file that fills it (written by the pipeline or the benchmarks), or a
# function of the repository root computing it from such files
BLOCKS = {"headline": headline, "deviation": deviation_summary, "timings": "bench/timings.md", "speed": gpu_speed}
_LINK = re.compile(r"(!?\[[^\]]*\]\()(?![a-z]+:|/|#)([^)]+\))")


def rebase(text: str, folder: str) -> str:
    """Relative links of a file in `folder` made relative to the repository root."""
    return _LINK.sub(lambda m: f"{m[1]}{folder}/{m[2]}", text) if folder not in ("", ".") else text


def fill(root: Path, source) -> str:
    """A block's text: a source file with its relative links rebased to the root, or a function's."""
    if callable(source):
        return source(root)
    return rebase((root / source).read_text(), str(Path(source).parent))


def put_block(text: str, name: str, block: str) -> str:
    """text with block (stripped) between its `<!-- name:begin -->` and `<!-- name:end -->` lines."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + block.strip() + "\n" + end + rest.split(end, 1)[1]


def sync(root: str | Path = ".") -> None:
    """Copy every source of BLOCKS between `<!-- name:begin -->` and `<!-- name:end -->` in
    root/README.md, its relative links rebased to the root; one write, after every block is found."""
    root, readme = Path(root), Path(root) / "README.md"
    text = readme.read_text()
    for name, source in BLOCKS.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if begin not in text or end not in text.split(begin, 1)[1]:
            raise ExpectedError(f"{readme}: markers {begin} / {end} not found in that order")
        text = put_block(text, name, fill(root, source))
    write_text(readme, text)


if __name__ == "__main__":
    try:
        sync()
    except (ExpectedError, OSError) as e:  # markers or a source file missing: one line
        raise SystemExit(f"make readme: {e}")
