"""Stage corrupt: data/raw/test.npz -> data/corrupted/test.npy and metrics/corrupt.json.

CIFAR-10-C style corruptions of the test set (iqals/corruptions.py), for evaluation only (no family is used in
training). The .npy is uint8 (F, S, N, 32, 32, 3) in the order of params.yaml's corrupt.families and severities;
load it with np.load(path, mmap_mode="r"). The metrics: each family's mean PSNR at each severity (e.g. fog_5).
"""
import logging
from pathlib import Path

from tqdm import tqdm

from iqals import corruptions, stacks
from iqals.data import load_npz, official_index
from iqals.io import save_npy, write_json
from stages.common import cli, run, setup


def main() -> None:
    args = cli(__doc__, raw="data/raw", out="data/corrupted/test.npy", metrics="metrics/corrupt.json")
    cfg = setup("corrupt").corrupt
    path = Path(args.raw) / "test.npz"
    images, _ = load_npz(path, "test")
    logging.info("%d test images x %d families x %d severities", len(images), len(cfg.families), len(cfg.severities))
    with tqdm(total=len(cfg.families) * len(cfg.severities), desc="corrupt", unit="set") as bar:
        out = corruptions.corrupt_all(images, cfg.families, cfg.severities, cfg.seed, official_index(path),
                                      progress=bar)
    save_npy(args.out, out)
    levels = stacks.mean_psnr(images, out, lambda f, s: f"{cfg.families[f]}_{cfg.severities[s]}")
    write_json(args.metrics, {"test_images": len(images), "seed": cfg.seed, "families": list(cfg.families),
                              "severities": list(cfg.severities), "levels": levels})


if __name__ == "__main__":
    run(main)
