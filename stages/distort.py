"""Stage distort: data/raw -> data/distorted/{train,test}.npy and metrics/distort.json.

Each .npy is uint8 (types, levels, N, 32, 32, 3), types in params.DISTORTIONS order (blur, noise, jpeg); load with
np.load(path, mmap_mode="r"). The metrics: each type and level's mean test-set PSNR (IQA scores: metrics/score.json).
"""
import logging
from pathlib import Path

import cv2
import PIL
from tqdm import tqdm

from iqals import distort, stacks
from iqals.data import load_raw, official_index
from iqals.errors import UsageError
from iqals.io import save_npy, write_json
from iqals.params import DISTORTIONS, LEVELS
from stages.common import cli, run, setup


def main() -> None:
    args, p = cli(__doc__, raw="data/raw", out="data/distorted", metrics="metrics/distort.json"), setup("distort")
    if not p.distort.uint8:  # the training pool is uint8; the float outputs exist for test sets only
        raise UsageError(f"params.yaml: distort.noise_output = {p.distort.noise_output!r}: expected round or floor "
                         "(the training images are uint8; float outputs are deviation.conventions' test sets)")
    raw = load_raw(args.raw)
    logging.info("OpenCV %s, Pillow %s (JPEG encoder: %s)", cv2.__version__, PIL.__version__, p.distort.jpeg_encoder)
    with tqdm(total=len(raw) * len(DISTORTIONS) * LEVELS, desc="distort", unit="set") as bar:
        for split, (images, _) in raw.items():
            index = official_index(Path(args.raw) / f"{split}.npz")
            d = distort.distort_all(images, p.distort, p.base.seed, split, index, progress=bar)
            save_npy(Path(args.out) / f"{split}.npy", d)
            if split == "test":
                levels = stacks.mean_psnr(images, d)
    write_json(args.metrics, {"opencv": cv2.__version__, "test_images": len(raw["test"][1]), "levels": levels})


if __name__ == "__main__":
    run(main)
