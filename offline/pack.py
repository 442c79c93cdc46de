"""The local CIFAR-10 copy in parts of limited size, lossless, each part and array with its sha256.

    python -m offline.pack pack   --max-part-mib M [--src ../shared/data/cifar10] [--out transfer/cifar10]
    python -m offline.pack check  [--parts transfer/cifar10] [--part K ...]
    python -m offline.pack unpack [--parts transfer/cifar10] --out DIR

Images are coded byte-planar with each row delta-coded, then xz (`pack` logs the packed size
against the raw one); the stream is cut into equal parts of at most M MiB, each in its
own folder with a copy of the manifest (<out>/part<k>/{manifest.json, <name>.part<k>of<n>}), one
folder per transfer. `unpack` checks every part and array and writes {train,test}.npz in the
local-copy format (iqals/data.py) that the download stage reads through $CIFAR10_LOCAL.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import lzma
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from iqals.data import SPLITS, load_npz
from iqals.errors import ExpectedError
from iqals.io import atomic_path, save_npz, write_json
from stages.common import run

log = logging.getLogger("pack")

FORMAT = 1
MANIFEST = "manifest.json"
CHUNK_ROWS = 5000  # images per independently compressed chunk: threads compress chunks at once
XZ_PRESET = 6      # xz's default preset


class PackError(ExpectedError, ValueError):
    """A part is missing, truncated or corrupt, or the data differ from what was packed."""


def array_sha256(a: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and C-order bytes."""
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def encode_images(x: np.ndarray) -> bytes:
    """uint8 (N, H, W, C) -> bytes: channel planes (C, N, H, W), each row delta-coded mod 256."""
    planes = np.ascontiguousarray(x.transpose(3, 0, 1, 2))
    d = planes.copy()
    d[..., 1:] -= planes[..., :-1]  # uint8 arithmetic wraps: exact inverse by cumsum mod 256
    return d.tobytes()


def decode_images(b: bytes, shape: tuple[int, ...]) -> np.ndarray:
    n, h, w, c = shape
    d = np.frombuffer(b, dtype=np.uint8).reshape(c, n, h, w)
    planes = np.cumsum(d, axis=-1, dtype=np.uint8)  # the running sum wraps mod 256 like the deltas
    return np.ascontiguousarray(planes.transpose(1, 2, 3, 0))


def pack(src: str | Path, out: str | Path, max_part_bytes: int, name: str = "cifar10") -> dict:
    """Pack src/{train,test}.npz into parts under `out`; returns the manifest."""
    if max_part_bytes < 1:
        raise PackError(f"max part size {max_part_bytes} bytes: expected a positive size")
    src, out = Path(src), Path(out)
    arrays, jobs, classes = [], [], None
    for split in SPLITS:
        images, labels = load_npz(src / f"{split}.npz", split)  # validates shapes, dtypes, labels
        with np.load(src / f"{split}.npz") as z:
            classes = [str(c) for c in z["classes"]] if "classes" in z.files else classes
        for key, a in (("images", images), ("labels", labels)):
            rec = {"split": split, "key": key, "dtype": a.dtype.str, "shape": list(a.shape), "sha256": array_sha256(a),
                   "codec": "planar-rowdelta-xz" if key == "images" else "xz", "chunks": []}
            arrays.append(rec)
            for i in range(0, max(len(a), 1), CHUNK_ROWS):
                part = a[i:i + CHUNK_ROWS]
                raw = encode_images(part) if key == "images" else np.ascontiguousarray(part).tobytes()
                jobs.append((rec, raw, len(part)))
    with ThreadPoolExecutor(os.cpu_count()) as ex:  # lzma releases the GIL
        blobs = list(ex.map(lambda job: lzma.compress(job[1], preset=XZ_PRESET), jobs))
    offset = 0
    for (rec, _, rows), blob in zip(jobs, blobs):
        rec["chunks"].append({"rows": rows, "offset": offset, "length": len(blob)})
        offset += len(blob)
    stream = b"".join(blobs)
    n = max(1, -(-len(stream) // max_part_bytes))
    size = -(-len(stream) // n)  # n equal parts, each within the limit
    parts = [{"k": k, "file": f"part{k}/{name}.part{k}of{n}", "offset": (k - 1) * size,
              "length": len(stream[(k - 1) * size:k * size]),
              "sha256": hashlib.sha256(stream[(k - 1) * size:k * size]).hexdigest()} for k in range(1, n + 1)]
    raw_bytes = sum(len(raw) for _, raw, _ in jobs)
    manifest = {"format": FORMAT, "name": name, "classes": classes, "arrays": arrays, "raw_bytes": raw_bytes,
                "stream_bytes": len(stream), "stream_sha256": hashlib.sha256(stream).hexdigest(), "parts": parts}
    for part in parts:
        path = out / part["file"]
        with atomic_path(path) as tmp:
            tmp.write_bytes(stream[part["offset"]:part["offset"] + part["length"]])
        write_json(path.parent / MANIFEST, manifest)
    log.info("packed %s: %d raw bytes -> %d (%.1f%%) in %d part(s) of at most %d bytes",
             src, raw_bytes, len(stream), 100 * len(stream) / raw_bytes, n, max_part_bytes)
    return manifest


def check_parts(parts_dir: str | Path, only: list[int] | None = None) -> dict:
    """Check size and sha256 of every part (or of those numbered in `only`); returns the manifest
    (from any part folder present: each holds a copy)."""
    found = sorted(Path(parts_dir).glob(f"part*/{MANIFEST}"))
    if not found:
        raise PackError(f"{parts_dir}: no part folder with a {MANIFEST} (expected {parts_dir}/part1/{MANIFEST}, "
                        "written by `python -m offline.pack pack`)")
    try:
        manifest = json.loads(found[0].read_text())
    except (OSError, ValueError) as e:
        raise PackError(f"{found[0]}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise PackError(f"{found[0]}: format {manifest.get('format')!r}, expected {FORMAT}")
    n = len(manifest["parts"])
    for part in manifest["parts"]:
        if only and part["k"] not in only:
            continue
        path = Path(parts_dir) / part["file"]
        what = f"part {part['k']} of {n} ({path})"
        if not path.is_file():
            raise PackError(f"{what} is missing: bring its folder {path.parent} before unpacking")
        if path.stat().st_size != part["length"]:
            raise PackError(f"{what} is truncated or wrong: {path.stat().st_size} bytes, expected {part['length']}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != part["sha256"]:
            raise PackError(f"{what} is corrupt: its sha256 differs from the manifest's")
    return manifest


def _decode(rec: dict, stream: bytes, where: str) -> np.ndarray:
    """One array of the manifest from the joined stream, checked against its sha256."""
    try:
        raw = [lzma.decompress(stream[c["offset"]:c["offset"] + c["length"]]) for c in rec["chunks"]]
    except lzma.LZMAError as e:
        raise PackError(f"{where}: {rec['split']}/{rec['key']} does not decompress ({e})") from None
    shape = tuple(rec["shape"])
    if rec["key"] == "images":
        a = np.concatenate([decode_images(r, (c["rows"],) + shape[1:]) for r, c in zip(raw, rec["chunks"])])
    else:
        a = np.frombuffer(b"".join(raw), dtype=np.dtype(rec["dtype"])).reshape(shape)
    if array_sha256(a) != rec["sha256"]:
        raise PackError(f"{where}: {rec['split']}/{rec['key']} differs from the packed array (sha256)")
    return a


def unpack(parts_dir: str | Path, out: str | Path) -> dict[str, Path]:
    """Check, join, decode and verify the parts; write out/{train,test}.npz. Returns the paths."""
    parts_dir, out = Path(parts_dir), Path(out)
    manifest = check_parts(parts_dir)
    stream = b"".join((parts_dir / p["file"]).read_bytes() for p in manifest["parts"])
    if hashlib.sha256(stream).hexdigest() != manifest["stream_sha256"]:
        raise PackError(f"{parts_dir}: the joined parts differ from the packed stream (sha256)")
    with ThreadPoolExecutor(os.cpu_count()) as ex:
        arrays = list(ex.map(lambda rec: _decode(rec, stream, str(parts_dir)), manifest["arrays"]))
    got = {(r["split"], r["key"]): a for r, a in zip(manifest["arrays"], arrays)}
    extra = {"classes": np.array(manifest["classes"])} if manifest["classes"] else {}
    written = {split: out / f"{split}.npz" for split in SPLITS}
    for split, path in written.items():
        save_npz(path, images=got[split, "images"], labels=got[split, "labels"], **extra)
    log.info("unpacked %d part(s) from %s into %s", len(manifest["parts"]), parts_dir, out)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--src", default="../shared/data/cifar10", help="folder with train.npz, test.npz")
    a.add_argument("--out", default="transfer/cifar10")
    a.add_argument("--max-part-mib", type=float, required=True, help="largest part, MiB (what one transfer takes)")
    c = sub.add_parser("check")
    c.add_argument("--parts", default="transfer/cifar10")
    c.add_argument("--part", type=int, action="append", help="check only this part (repeatable)")
    u = sub.add_parser("unpack")
    u.add_argument("--parts", default="transfer/cifar10")
    u.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s pack %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if args.cmd == "pack":
        pack(args.src, args.out, int(args.max_part_mib * 2**20))
    elif args.cmd == "check":
        m = check_parts(args.parts, args.part)
        log.info("%s: part(s) %s of %d intact", args.parts, args.part or "all", len(m["parts"]))
    else:
        unpack(args.parts, args.out)


if __name__ == "__main__":
    run(main)
