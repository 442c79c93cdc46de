"""Stage download: CIFAR-10 ($CIFAR10_LOCAL if set, else the official archive, fetched into --cache) -> data/raw.

data/raw/{train,test}.npz: images uint8 (N,32,32,3) RGB, labels int64, index int64 (each image's position in the
official split), base.train_size and base.test_size applied; data/raw/source.json: the source, the outputs' sha256.
"""
import logging
from pathlib import Path

from iqals import data
from iqals.io import save_npz, write_json
from stages.common import cli, run, setup


def main() -> None:
    args, p = cli(__doc__, out="data/raw", cache="data/cache"), setup("download")
    loaded, source = data.acquire(args.cache)
    keep = data.subset_indices(loaded, p.base.train_size, p.base.test_size)
    for split, (images, labels) in loaded.items():
        path, k = Path(args.out) / f"{split}.npz", keep[split]
        save_npz(path, images=images[k], labels=labels[k], index=k)
        source |= {f"{split}_images": len(k), f"{split}_sha256": data.sha256(path)}
        logging.info("%s: %d images -> %s", split, len(k), path)
    write_json(Path(args.out) / "source.json", source)


if __name__ == "__main__":
    run(main)
