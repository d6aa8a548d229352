"""The store's free space: one reserve check and one ENOSPC mapping for the whole broker."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from broker.errors import StorageFullError
from broker.space import StoreSpace


def test_a_write_to_a_full_device_becomes_storage_full(tmp_path: Path) -> None:
    """ENOSPC from a real full device (/dev/full) is refused as StorageFullError naming the job."""
    space = StoreSpace(tmp_path, reserve=0)
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with (
            pytest.raises(StorageFullError, match="journaling batch 7 of web1/disk0 needs 4096"),
            space.refusing_when_full(4096, "journaling batch 7 of web1/disk0"),
        ):
            os.write(fd, b"x" * 4096)
    finally:
        os.close(fd)


def test_other_os_errors_pass_through(tmp_path: Path) -> None:
    """An OSError that is not about space (EBADF) is not dressed up as a full store."""
    space = StoreSpace(tmp_path, reserve=0)
    with (
        pytest.raises(OSError, match="Bad file descriptor") as raised,
        space.refusing_when_full(1, "writing"),
    ):
        os.write(-1, b"x")
    assert raised.value.errno == errno.EBADF


def test_the_reserve_refuses_before_writing(tmp_path: Path) -> None:
    """A reserve larger than the free space refuses up front with store, free and needed bytes."""
    space = StoreSpace(tmp_path, reserve=1 << 62)
    with pytest.raises(StorageFullError) as raised:
        space.check(100, "accepting a batch for web1/disk0")
    details = raised.value.details
    assert details["store"] == str(tmp_path)
    assert details["needed_bytes"] == (1 << 62) + 100
    assert 0 <= details["free_bytes"] < details["needed_bytes"]
    StoreSpace(tmp_path, reserve=0).check(0, "accepting a batch")  # room: no refusal
