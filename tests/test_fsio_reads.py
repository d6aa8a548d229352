"""common/fsio.py's small-file read: whole files of any size, in the few calls it promises."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.fsio import read_json, read_small


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 3 * 65536, 200_001])
def test_read_small_returns_the_whole_file(tmp_path: Path, size: int) -> None:
    """Every size, at and around the 64 KiB read, comes back byte for byte."""
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert read_small(path) == data


def test_read_json_reads_what_was_written(tmp_path: Path) -> None:
    """A JSON document round-trips; a missing file is FileNotFoundError."""
    path = tmp_path / "store.json"
    path.write_text('{"epoch": 7, "owner": "b1"}\n')
    assert read_json(path) == {"epoch": 7, "owner": "b1"}
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "absent.json")
