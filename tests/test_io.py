"""iqals/io.atomic_path: the file appears whole or not at all, with the usual permissions."""
import os

import numpy as np
import pytest
import torch

from iqals import io


def test_success_replaces_the_file_with_usual_permissions(tmp_path):
    path = tmp_path / "sub" / "out.npy"
    io.save_npy(path, np.arange(3))
    io.save_npy(path, np.arange(5))
    np.testing.assert_array_equal(np.load(path), np.arange(5))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(path.parent) == ["out.npy"]  # no temporary file left


@pytest.mark.parametrize("writes", [True, False])
def test_failure_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, writes):
    path = tmp_path / "out.txt"
    io.write_text(path, "old\n")
    with pytest.raises(RuntimeError, match="killed"):
        with io.atomic_path(path) as tmp:
            assert tmp.name == path.name and tmp.parent.parent == path.parent and not tmp.exists()
            if writes:
                tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_a_block_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        with io.atomic_path(tmp_path / "out.txt"):
            pass
    assert os.listdir(tmp_path) == []


def test_two_writers_of_one_path_get_their_own_hidden_temporaries(tmp_path):
    """Overlapping writers never share a temporary; the last to finish wins; temporaries are in dot folders."""
    path = tmp_path / "out.txt"
    with io.atomic_path(path) as a, io.atomic_path(path) as b:
        assert a != b and a.parent.name.startswith(".") and b.parent.name.startswith(".")
        a.write_text("outer\n")
        b.write_text("inner\n")
    assert path.read_text() == "outer\n"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_data_reach_the_disk_before_the_file_appears(tmp_path, monkeypatch):
    """The temporary is fsynced whole while `path` does not exist yet; only then renamed."""
    path, synced, fsync = tmp_path / "out.txt", [], os.fsync

    def recording_fsync(fd):
        synced.append((os.fstat(fd).st_size, path.exists()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    io.write_text(path, "0123456789")
    assert synced == [(10, False)]


def test_json_text_and_round_trip(tmp_path):
    """Keys in the caller's order, two-space indent, a final newline (diff-friendly metrics files)."""
    obj = {"b": 1, "a": [1.5, "x"], "c": {"z": None}}
    io.write_json(tmp_path / "m.json", obj)
    text = '{\n  "b": 1,\n  "a": [\n    1.5,\n    "x"\n  ],\n  "c": {\n    "z": null\n  }\n}\n'
    assert (tmp_path / "m.json").read_text() == text
    assert io.read_json(tmp_path / "m.json") == obj


def test_save_npz_keeps_the_array_names(tmp_path):
    """Readers (load_npz, official_index, the report) look the arrays up by the names they were saved under."""
    probs, labels = np.array([[0.25, 0.75]], np.float32), np.array([1], np.int64)
    io.save_npz(tmp_path / "p.npz", probs=probs, labels=labels)
    with np.load(tmp_path / "p.npz") as z:
        assert sorted(z.files) == ["labels", "probs"]
        np.testing.assert_array_equal(z["probs"], probs)
        np.testing.assert_array_equal(z["labels"], labels)


def test_a_writer_that_records_the_files_name_writes_the_bytes_it_would_write_to_path(tmp_path):
    """torch.save names its zip archive's folder after the file: through atomic_path the model file
    is byte for byte what a direct save gives, so rerunning a stage leaves its hash in dvc.lock."""
    obj = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "history": [{"epoch": 1, "loss": 0.5}]}
    torch.save(obj, tmp_path / "model.pt")
    with io.atomic_path(tmp_path / "atomic" / "model.pt") as tmp:
        torch.save(obj, tmp)
    assert (tmp_path / "atomic" / "model.pt").read_bytes() == (tmp_path / "model.pt").read_bytes()
    assert os.listdir(tmp_path / "atomic") == ["model.pt"]
