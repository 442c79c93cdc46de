"""Stage download: CIFAR-10 (local copy in $CIFAR10_LOCAL, else the official archive) -> data/raw.

Writes data/raw/{train,test}.npz (images uint8 (N,32,32,3) RGB, labels int64, index int64: the
position of each image in the official split; base.train_size and base.test_size applied) and
data/raw/source.json (where it came from, sha256 of outputs). --cache: where the official archive
is downloaded.
"""
from __future__ import annotations

import logging
from pathlib import Path

from iqals import data
from iqals.io import save_npz, write_json
from stages.common import cli, run, setup

log = logging.getLogger("download")


def main() -> None:
    args = cli(__doc__, out="data/raw", cache="data/cache")
    p = setup("download")
    loaded, source = data.acquire(args.cache)
    keep = data.subset_indices(loaded, p.base.train_size, p.base.test_size)
    for split, (images, labels) in loaded.items():
        path, k = Path(args.out) / f"{split}.npz", keep[split]
        save_npz(path, images=images[k], labels=labels[k], index=k)
        source[f"{split}_images"] = len(k)
        source[f"{split}_sha256"] = data.sha256(path)
        log.info("%s: %d images -> %s", split, len(k), path)
    write_json(Path(args.out) / "source.json", source)


if __name__ == "__main__":
    run(main)
