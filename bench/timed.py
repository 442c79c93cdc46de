"""Time one of the README's commands and record it in bench/timings.md (the README's timings block).

    python -m bench.timed "make study" -- dvc repro
    python -m bench.timed "make test" -- make test

Runs the command, and on success sets the row of NAME in the table: wall minutes, the CPU (model,
cores, whether it has AVX-512) and the date. A failed command records nothing.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.bench_train import cpu_name
from iqals.io import write_text

HEADER = ["| command | wall minutes | CPU | date |", "|---|---|---|---|"]


def cpu() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return f"{cpu_name()}, {os.cpu_count()} cores, {'AVX-512' if 'avx512f' in flags else 'no AVX-512'}"


def record(path: Path, name: str, minutes: float, machine: str, day: str) -> None:
    rows = [line for line in (path.read_text().splitlines() if path.is_file() else [])[2:]
            if line.startswith("| ") and not line.startswith(f"| `{name}` |")]
    rows.append(f"| `{name}` | {minutes:.1f} | {machine} | {day} |")
    write_text(path, "\n".join(HEADER + sorted(rows)) + "\n")


def main() -> int:
    if "--" not in sys.argv[2:] or len(sys.argv) < 4:
        raise SystemExit(__doc__)
    name, cmd = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    out = Path(os.environ.get("TIMINGS", "bench/timings.md"))
    t0 = time.monotonic()
    rc = subprocess.run(cmd).returncode
    if rc == 0:
        record(out, name, (time.monotonic() - t0) / 60, cpu(), datetime.date.today().isoformat())
    return rc


if __name__ == "__main__":
    sys.exit(main())
