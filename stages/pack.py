"""Send the CIFAR-10 copy to the GPU machine in parts (iqals/pack.py); not a DVC stage.

  python -m stages.pack pack   [--src ../shared/data/cifar10] [--out transfer/cifar10] [--max-part-mib M]
  python -m stages.pack check  [--parts transfer/cifar10] [--part K ...]
  python -m stages.pack unpack [--parts transfer/cifar10] --out DIR

Without --max-part-mib each part is sized so that it travels with the working tree in one
transfer to the GPU node: the per-transfer size limit minus what travels anyway (tracked and
untracked-not-ignored files) minus a margin. Each part lies in its own folder
transfer/cifar10/part<k>: send that folder along with the tree.
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import time
from pathlib import Path

from iqals import pack as pack_lib
from stages.common import run

log = logging.getLogger("pack")

TRANSFER_LIMIT = 64 * 2**20  # bytes one transfer to the GPU node holds: working tree plus the paths sent with it
MARGIN = 4 * 2**20           # room for files added to the tree between packing and sending


def tree_bytes(root: str | Path = ".") -> int:
    """Bytes of what travels anyway: tracked files and untracked files git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((Path(root) / n.decode()).stat().st_size for n in names
               if n and (Path(root) / n.decode()).is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--src", default="../shared/data/cifar10", help="directory with train.npz, test.npz")
    a.add_argument("--out", default="transfer/cifar10")
    a.add_argument("--max-part-mib", type=float, default=None)
    c = sub.add_parser("check")
    c.add_argument("--parts", default="transfer/cifar10")
    c.add_argument("--part", type=int, action="append", help="check only this part (repeatable)")
    u = sub.add_parser("unpack")
    u.add_argument("--parts", default="transfer/cifar10")
    u.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s pack %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    t0 = time.perf_counter()
    if args.cmd == "pack":
        if args.max_part_mib is not None:
            limit = int(args.max_part_mib * 2**20)
        else:
            tree = tree_bytes()
            limit = TRANSFER_LIMIT - tree - MARGIN
            log.info("working tree that travels: %.1f MiB; parts of at most %.1f MiB", tree / 2**20, limit / 2**20)
        m = pack_lib.pack(args.src, args.out, limit)
        log.info("%.1f s; send one folder per transfer: %s", time.perf_counter() - t0,
                 ", ".join(str(Path(args.out) / p["file"]).rsplit("/", 1)[0] for p in m["parts"]))
    elif args.cmd == "check":
        m = pack_lib.check_parts(args.parts, args.part)
        log.info("%s: part(s) %s of %d intact", args.parts, args.part or "all", len(m["parts"]))
    else:
        pack_lib.unpack(args.parts, args.out)
        log.info("%.1f s", time.perf_counter() - t0)


if __name__ == "__main__":
    run(main)
