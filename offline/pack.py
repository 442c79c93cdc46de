"""A CIFAR-10 copy sent in parts: lossless, small enough for one transfer per part.

A GPU node that takes only a limited size of files per command cannot take the 141 MB of the
raw training set at once. `pack` makes it smaller without loss (images byte-planar, each row
delta-coded, then xz: about 71% of raw), cuts the compressed stream into parts of at most `max_part_bytes`, and
writes each part into its own folder beside a copy of the manifest, so that each command can
send one folder. `unpack` checks every part (size, sha256), decompresses, undoes the coding,
checks each array's sha256 and writes {train,test}.npz in the local-copy format
(iqals/data.py), which the download stage reads through $CIFAR10_LOCAL.

Layout: <out>/part<k>/{manifest.json, <name>.part<k>of<n>}.

    python -m offline.pack pack   [--src ../shared/data/cifar10] [--out transfer/cifar10] [--max-part-mib M]
    python -m offline.pack check  [--parts transfer/cifar10] [--part K ...]
    python -m offline.pack unpack [--parts transfer/cifar10] --out DIR
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import lzma
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from iqals.data import SPLITS, load_npz
from iqals.errors import ExpectedError
from iqals.io import atomic_path, save_npz, write_json
from stages.common import run

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
CHUNK_ROWS = 5000  # images per independently compressed chunk: threads compress chunks at once
XZ_PRESET = 6      # preset 9 is no smaller on CIFAR-10 (measured) and slower


class PackError(ExpectedError, ValueError):
    """A part is missing, truncated or corrupt, or the packed data differ from what was packed."""


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


def _chunks(key: str, a: np.ndarray) -> list[tuple[bytes, dict]]:
    """Raw bytes of each chunk of one array, with its record (before compression)."""
    images = key == "images"
    out = []
    for i in range(0, max(len(a), 1), CHUNK_ROWS):
        part = a[i:i + CHUNK_ROWS]
        out.append((encode_images(part) if images else np.ascontiguousarray(part).tobytes(),
                    {"rows": len(part)}))
    return out


def pack(src: str | Path, out: str | Path, max_part_bytes: int, name: str = "cifar10",
         threads: int | None = None) -> dict:
    """Pack src/{train,test}.npz into parts under `out`; returns the manifest."""
    if max_part_bytes < 1:
        raise PackError(f"max_part_bytes = {max_part_bytes}: expected a positive number of bytes")
    src, out = Path(src), Path(out)
    arrays, jobs = [], []
    classes = None
    for split in SPLITS:
        images, labels = load_npz(src / f"{split}.npz", split)  # validates shapes, dtypes, labels
        with np.load(src / f"{split}.npz") as z:
            if "classes" in z.files:
                classes = [str(c) for c in z["classes"]]
        for key, a in (("images", images), ("labels", labels)):
            rec = {"split": split, "key": key, "dtype": a.dtype.str, "shape": list(a.shape),
                   "sha256": array_sha256(a), "codec": "planar-rowdelta-xz" if key == "images" else "xz",
                   "chunks": []}
            arrays.append(rec)
            jobs += [(rec, raw, c) for raw, c in _chunks(key, a)]
    with ThreadPoolExecutor(threads or os.cpu_count()) as ex:  # lzma releases the GIL
        blobs = list(ex.map(lambda job: lzma.compress(job[1], preset=XZ_PRESET), jobs))
    stream, offset = [], 0
    raw_bytes = 0
    for (rec, raw, c), blob in zip(jobs, blobs):
        rec["chunks"].append({**c, "offset": offset, "length": len(blob)})
        stream.append(blob)
        offset += len(blob)
        raw_bytes += len(raw)
    stream = b"".join(stream)
    n_parts = max(1, -(-len(stream) // max_part_bytes))
    size = -(-len(stream) // n_parts)  # equal parts, each within the limit
    parts = []
    for k in range(n_parts):
        piece = stream[k * size:(k + 1) * size]
        parts.append({"k": k + 1, "file": f"part{k + 1}/{name}.part{k + 1}of{n_parts}",
                      "offset": k * size, "length": len(piece),
                      "sha256": hashlib.sha256(piece).hexdigest()})
    manifest = {"format": FORMAT, "name": name, "classes": classes, "arrays": arrays,
                "raw_bytes": raw_bytes, "stream_bytes": len(stream),
                "stream_sha256": hashlib.sha256(stream).hexdigest(), "parts": parts}
    for part in parts:
        path = out / part["file"]
        with atomic_path(path) as tmp:
            tmp.write_bytes(stream[part["offset"]:part["offset"] + part["length"]])
        write_json(path.parent / MANIFEST, manifest)
    log.info("packed %s: %d raw bytes -> %d compressed (%.1f%%) in %d part(s) of at most %d bytes",
             src, raw_bytes, len(stream), 100 * len(stream) / raw_bytes, n_parts, max_part_bytes)
    return manifest


def read_manifest(parts_dir: str | Path) -> dict:
    """The manifest from any part folder present (every part carries a copy)."""
    parts_dir = Path(parts_dir)
    found = sorted(parts_dir.glob(f"part*/{MANIFEST}"))
    if not found:
        raise PackError(f"{parts_dir}: no part folder with a {MANIFEST} (expected {parts_dir}/part1/"
                        f"{MANIFEST}, written by `python -m offline.pack pack`)")
    try:
        manifest = json.loads(found[0].read_text())
    except (OSError, ValueError) as e:
        raise PackError(f"{found[0]}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise PackError(f"{found[0]}: format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def check_parts(parts_dir: str | Path, only: list[int] | None = None) -> dict:
    """Check size and sha256 of each part (or of the parts numbered in `only`); returns the manifest."""
    parts_dir = Path(parts_dir)
    manifest = read_manifest(parts_dir)
    n = len(manifest["parts"])
    for part in manifest["parts"]:
        if only is not None and part["k"] not in only:
            continue
        path = parts_dir / part["file"]
        what = f"part {part['k']} of {n} ({path})"
        if not path.is_file():
            raise PackError(f"{what} is missing: send its folder {path.parent} with the command, "
                            "or copy it, before unpacking")
        size = path.stat().st_size
        if size != part["length"]:
            raise PackError(f"{what} is truncated or wrong: {size} bytes, expected {part['length']}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != part["sha256"]:
            raise PackError(f"{what} is corrupt: sha256 differs from the manifest")
    return manifest


def unpack(parts_dir: str | Path, out: str | Path, threads: int | None = None) -> dict[str, Path]:
    """Reassemble, decompress and verify; write out/{train,test}.npz. Returns the written paths."""
    parts_dir, out = Path(parts_dir), Path(out)
    manifest = check_parts(parts_dir)
    stream = b"".join((parts_dir / p["file"]).read_bytes() for p in manifest["parts"])
    if hashlib.sha256(stream).hexdigest() != manifest["stream_sha256"]:
        raise PackError(f"{parts_dir}: the joined parts differ from the packed stream (sha256)")

    def decode(rec: dict) -> np.ndarray:
        try:
            raw = [lzma.decompress(stream[c["offset"]:c["offset"] + c["length"]]) for c in rec["chunks"]]
        except lzma.LZMAError as e:
            raise PackError(f"{parts_dir}: {rec['split']}/{rec['key']} does not decompress ({e})") from None
        shape = tuple(rec["shape"])
        if rec["key"] == "images":
            a = np.concatenate([decode_images(r, (c["rows"],) + shape[1:])
                                for r, c in zip(raw, rec["chunks"])])
        else:
            a = np.frombuffer(b"".join(raw), dtype=np.dtype(rec["dtype"])).reshape(shape)
        if array_sha256(a) != rec["sha256"]:
            raise PackError(f"{parts_dir}: {rec['split']}/{rec['key']} differs from the packed array (sha256)")
        return a

    with ThreadPoolExecutor(threads or os.cpu_count()) as ex:
        arrays = list(ex.map(decode, manifest["arrays"]))
    got = {(r["split"], r["key"]): a for r, a in zip(manifest["arrays"], arrays)}
    written = {}
    for split in SPLITS:
        extra = {"classes": np.array(manifest["classes"])} if manifest["classes"] else {}
        written[split] = out / f"{split}.npz"
        save_npz(written[split], images=got[split, "images"], labels=got[split, "labels"], **extra)
    log.info("unpacked %d part(s) from %s into %s", len(manifest["parts"]), parts_dir, out)
    return written


# ---------------------------------------------------------------- command line
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
        m = pack(args.src, args.out, limit)
        log.info("%.1f s; send one folder per transfer: %s", time.perf_counter() - t0,
                 ", ".join(str(Path(args.out) / p["file"]).rsplit("/", 1)[0] for p in m["parts"]))
    elif args.cmd == "check":
        m = check_parts(args.parts, args.part)
        log.info("%s: part(s) %s of %d intact", args.parts, args.part or "all", len(m["parts"]))
    else:
        unpack(args.parts, args.out)
        log.info("%.1f s", time.perf_counter() - t0)


if __name__ == "__main__":
    run(main)
