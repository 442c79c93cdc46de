"""iqals/io.atomic_path: the file appears whole or not at all, with the usual permissions."""
import os

import numpy as np
import pytest

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
            assert tmp.parent == path.parent and not tmp.exists()
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
