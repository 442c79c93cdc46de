"""The CIFAR-10 copy sent in parts (offline/pack.py): exact round trip, clear failures."""
from __future__ import annotations

import numpy as np
import pytest

from offline import pack
from iqals.data import load_npz


@pytest.fixture
def packed(tmp_path, tiny_cifar, monkeypatch):
    monkeypatch.setattr(pack, "CHUNK_ROWS", 64)  # several chunks per array, as with the real set
    m = pack.pack(tiny_cifar, tmp_path / "parts", max_part_bytes=200_000)
    return tmp_path / "parts", m


def test_row_delta_coding_is_exact_on_extreme_values():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(7, 32, 32, 3), dtype=np.uint8)
    x[0] = 0
    x[1] = 255
    x[2, :, ::2] = 255  # largest jumps between neighbours, both ways
    got = pack.decode_images(pack.encode_images(x), x.shape)
    assert got.dtype == np.uint8 and np.array_equal(got, x)


def test_round_trip_is_exact_and_in_several_parts(packed, tiny_cifar, tmp_path):
    parts, m = packed
    assert len(m["parts"]) >= 2  # the tiny set (~470 kB) is cut at 200 kB
    assert all(p["length"] <= 200_000 for p in m["parts"])
    assert sum(p["length"] for p in m["parts"]) == m["stream_bytes"] < m["raw_bytes"]
    for p in m["parts"]:  # each part in its own folder, with the manifest beside it
        assert (parts / p["file"]).is_file() and (parts / p["file"]).parent.joinpath("manifest.json").is_file()
    written = pack.unpack(parts, tmp_path / "copy")
    for split in ("train", "test"):
        x0, y0 = load_npz(tiny_cifar / f"{split}.npz", split)
        x1, y1 = load_npz(written[split], split)
        assert np.array_equal(x0, x1) and np.array_equal(y0, y1) and y1.dtype == y0.dtype
        with np.load(written[split]) as z:  # the class names travel too
            assert list(z["classes"]) == list(np.load(tiny_cifar / f"{split}.npz")["classes"])


def test_missing_part_is_named(packed, tmp_path):
    parts, m = packed
    last = m["parts"][-1]
    (parts / last["file"]).unlink()
    with pytest.raises(pack.PackError, match=f"part {last['k']} of {len(m['parts'])} .* is missing"):
        pack.unpack(parts, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()  # nothing half-written
    pack.check_parts(parts, only=[1])  # the parts that did arrive still check


def test_truncated_part_is_named(packed, tmp_path):
    parts, m = packed
    path = parts / m["parts"][0]["file"]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(pack.PackError, match="part 1 of .* truncated"):
        pack.unpack(parts, tmp_path / "copy")


def test_corrupt_part_is_named(packed, tmp_path):
    parts, m = packed
    path = parts / m["parts"][0]["file"]
    b = bytearray(path.read_bytes())
    b[100] ^= 0xFF
    path.write_bytes(bytes(b))
    with pytest.raises(pack.PackError, match="part 1 of .* corrupt"):
        pack.unpack(parts, tmp_path / "copy")


def test_no_parts_at_all(tmp_path):
    with pytest.raises(pack.PackError, match="no part folder"):
        pack.unpack(tmp_path, tmp_path / "copy")
