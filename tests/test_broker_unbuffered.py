"""The initial copy's replica writes skip the page cache (broker/unbuffered.py), land byte for
byte, and what the disk returns is checked against the batch."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import xxhash

from broker.apply import digest_at
from broker.direct import DirectApply
from broker.errors import ApplyVerifyError
from broker.unbuffered import ALIGN, UnbufferedWriter
from common.hrl import Extent, ExtentKind
from tests.support_broker import FakeSource, MiB
from tests.test_broker_store import enable, engine, journal, make_store


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache, as util-linux's fincore counts them."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out.strip())


def test_an_initial_copy_skips_the_page_cache_and_lands_byte_for_byte(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    src = FakeSource(disk_size=8 * MiB)
    replica = enable(store, src)
    eng = engine(store, replica)
    src.mutate(60)
    body = src.cut(full=True, all_blocks=True).body
    receipt = journal(store, replica, body, chunk=1 << 20, held=eng.held, direct=DirectApply(eng))
    assert receipt.direct
    assert replica.meta.applied_seq == 1
    # Written through the page cache, nearly all of the 8 MiB would be resident now.
    assert resident_bytes(replica.image) == 0
    assert replica.image.read_bytes() == bytes(src.image)
    eng.close()


def test_what_cannot_go_unbuffered_is_left_to_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "image"
    with path.open("wb") as f:
        f.truncate(1 * MiB)
    fd = os.open(path, os.O_RDWR)
    writer = UnbufferedWriter(fd)
    try:
        data = os.urandom(3 * ALIGN)
        assert writer.write(512, data) is None  # unaligned offset
        assert writer.write(ALIGN, data[:1000]) is None  # unaligned length
        assert writer.write(2 * ALIGN, data) == xxhash.xxh3_64_intdigest(data)
        assert writer.written == len(data)
        with path.open("rb") as f:
            f.seek(2 * ALIGN)
            assert f.read(len(data)) == data
        writer.close()
        assert writer.write(0, data) is None  # closed: the caller writes as before
    finally:
        writer.close()
        os.close(fd)


def test_bytes_the_disk_returns_are_checked_against_the_batch(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    src = FakeSource(disk_size=1 * MiB)
    replica = enable(store, src)
    eng = engine(store, replica)
    writer = UnbufferedWriter(eng.image_fd)
    data = os.urandom(64 * 1024)
    good = Extent(0, len(data), ExtentKind.DATA, data, xxhash.xxh3_64_intdigest(data))
    eng.write_extent(good, ext_seq=None, unbuffered=writer)
    assert writer.written == len(data)
    # What the disk holds is not what the batch's checksum promises: refused, not applied.
    wrong = Extent(65536, len(data), ExtentKind.DATA, data, good.checksum ^ 1)
    with pytest.raises(ApplyVerifyError, match="read back at offset 65536"):
        eng.write_extent(wrong, ext_seq=None, unbuffered=writer)
    writer.close()
    eng.close()


@pytest.mark.parametrize("length", [4096, 3 * 256 * 1024 + 512], ids=["4k", "over-buffer"])
def test_buffered_writes_are_read_back_from_the_page_cache_and_checked(
    tmp_path: Path, length: int
) -> None:
    store = make_store(tmp_path)
    src = FakeSource(disk_size=4 * MiB)
    replica = enable(store, src)
    eng = engine(store, replica)
    data = os.urandom(length)
    at = 8192 + 512  # unaligned: the buffered path
    eng.write_extent(
        Extent(at, length, ExtentKind.DATA, data, xxhash.xxh3_64_intdigest(data)), ext_seq=3
    )
    assert replica.image.read_bytes()[at : at + length] == data
    assert digest_at(eng.image_fd, at, length, hold=True) == xxhash.xxh3_64_intdigest(data)
    # Bytes past the end of the image are missing, never zeros that happen to match.
    assert digest_at(eng.image_fd, 4 * MiB - 100, 200, hold=True) != xxhash.xxh3_64_intdigest(
        replica.image.read_bytes()[-100:] + bytes(100)
    )
    with pytest.raises(ApplyVerifyError, match=f"read back at offset {at}"):
        eng.write_extent(
            Extent(at, length, ExtentKind.DATA, data, xxhash.xxh3_64_intdigest(data) ^ 1),
            ext_seq=4,
        )
    eng.close()
