"""The whole study on a GPU machine, without DVC, sized to a time budget (iqals/gpu_study.py).

  python -m stages.gpu_study --parts transfer/cifar10 --out $OUT --budget-s 540

reassembles CIFAR-10 from its parts, smoke-checks and times the training-step variants, then
runs the pipeline's own stages (the order and commands of `dvc repro`, training grouped) for
the converged schedule and then the longest schedule of gpu_study.yaml that fits the budget;
with --epochs, --seeds or --strategies, that one profile instead (e.g. `--epochs 60 --seeds 0
--strategies S1,S2,S3,S4,S5,S6,S7,S8,S9`: Table 2 only, one seed, lr decay at the paper's ratio).
Results: <out>/<profile>.tar after every stage, <out>/study.log, <out>/stages.log,
<out>/probe.json. `--probe-only` stops after the probe (a first, short command); a later one on
the same machine reuses its result. `--describe --ips N` prints the plan and the projected
training minutes per schedule at N images/s, without running anything. Not a DVC stage.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from iqals import gpu_study
from iqals.pack import PackError
from stages.common import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=Path, default=None,
                    help="folder of the data parts (transfer/cifar10); omit to reuse an earlier reassembly")
    ap.add_argument("--out", type=Path, help="where the archives and logs go ($OUT)")
    ap.add_argument("--budget-s", type=float, help="seconds this command may take in all")
    ap.add_argument("--work", type=Path, default=Path("gpu_work"), help="scratch folder (ignored by git)")
    ap.add_argument("--config", type=Path, default=Path(gpu_study.REPO / "gpu_study.yaml"))
    ap.add_argument("--probe-only", action="store_true", help="stop after the smoke check and probe")
    ap.add_argument("--probe-s", type=float, default=None, help="override probe_seconds of the config")
    ap.add_argument("--device", default=None, help="override train.device (auto | cpu | cuda)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="one profile of this many epochs (decay at gpu_study.yaml's long.decay_ratio)")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="one profile with these seeds (comma-separated)")
    ap.add_argument("--strategies", type=lambda s: s.split(","), default=None,
                    help="one profile with only these strategies (comma-separated, e.g. S1,S2,S3)")
    ap.add_argument("--describe", action="store_true",
                    help="only print the plan and the projected training minutes per schedule")
    ap.add_argument("--ips", type=float, action="append", help="with --describe: images/s summed over runs")
    ap.add_argument("--group", type=int, default=17, help="with --describe: runs per training call")
    args = ap.parse_args()
    if args.describe:
        return print(gpu_study.describe(gpu_study.load_config(args.config), args.ips or [500_000], args.group))
    if args.out is None or args.budget_s is None:
        ap.error("--out and --budget-s are required (unless --describe)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        status = gpu_study.run_study(args.parts, args.work, args.out, args.config, args.budget_s,
                                     probe_only=args.probe_only, probe_seconds=args.probe_s,
                                     device=args.device, epochs=args.epochs, seeds=args.seeds,
                                     strategies=args.strategies)
    except PackError as e:
        raise gpu_study.StudyError(f"data parts: {e}") from None
    logging.getLogger("gpu_study").info("status: %s", status)


if __name__ == "__main__":
    run(main)
