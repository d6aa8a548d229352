"""Incompressible payloads are stored, not compressed (common/hrl/frames.py:stored_frame and the
encoder's policy): the frames are standard zstd, decode as ever, and compression resumes when
the data shrinks again."""

from __future__ import annotations

import random

import pytest
import zstandard

from common.hrl import BatchEncoder, Compression, ExtentKind, decode_batch
from common.hrl.encoder import MISSES_TO_STORE, STORED_RUN
from common.hrl.frames import check_frame, stored_frame
from tests.test_hrl_codec import make_header

N = 200


@pytest.mark.parametrize(
    "size", [1, 255, 256, 4096, 65791, 65792, 128 << 10, (128 << 10) + 1, 1 << 20, 8 << 20]
)
def test_a_stored_frame_is_a_standard_zstd_frame(size: int) -> None:
    """Around every field-size and block boundary, zstd itself decompresses the frame to the
    data, and the decoder's frame check finds nothing wrong and the blocks filling it."""
    data = random.Random(size).randbytes(size)
    frame = stored_frame(memoryview(data))
    assert zstandard.ZstdDecompressor().decompress(frame, max_output_size=size) == data
    assert check_frame(memoryview(frame), size) == (None, True)
    assert len(frame) <= len(zstandard.ZstdCompressor(level=1).compress(data))


def _encode(datas: list[bytes]) -> tuple[bytes, list[int], int]:
    """A ZSTD batch of 4 KiB DATA extents; the stream, each payload's size, stored count."""
    header = make_header(
        compression=Compression.ZSTD, extent_count=len(datas), data_bytes=4096 * len(datas)
    )
    enc = BatchEncoder(header, level=1)
    parts, sizes = [enc.header_bytes()], []
    for i, data in enumerate(datas):
        record, payload = enc.data_parts(i * 4096, data)
        parts += [record, bytes(payload)]
        sizes.append(len(payload))
    parts.append(enc.end())
    return b"".join(parts), sizes, enc.stored


def _decoded(blob: bytes) -> list[bytes]:
    _header, extents, _end = decode_batch(blob)
    assert all(e.kind is ExtentKind.DATA for e in extents)
    return [bytes(e.data or b"") for e in extents]


def test_random_data_is_stored_after_a_few_tries() -> None:
    """Random pages: the encoder stops trying after MISSES_TO_STORE and tries one in every
    STORED_RUN + 1 after that; the batch decodes to the pages."""
    rng = random.Random(1)
    datas = [rng.randbytes(4096) for _ in range(N)]
    blob, _sizes, stored = _encode(datas)
    tries = MISSES_TO_STORE + (N - MISSES_TO_STORE) // (STORED_RUN + 1)  # a try ends each run
    assert stored == N - tries
    assert _decoded(blob) == datas


def test_compressible_data_is_always_compressed() -> None:
    """Database-like pages (half random, half zero) are compressed, every one."""
    rng = random.Random(2)
    datas = [rng.randbytes(2048) + bytes(2048) for _ in range(N)]
    blob, sizes, stored = _encode(datas)
    assert stored == 0
    assert max(sizes) < 2600
    assert _decoded(blob) == datas


def test_compression_resumes_when_the_data_shrinks_again() -> None:
    """After a random stretch, the first try of a compressible page compresses again: every
    page from one STORED_RUN after the change on is compressed."""
    rng = random.Random(3)
    datas = [rng.randbytes(4096) for _ in range(50)]
    datas += [rng.randbytes(1024) + bytes(3072) for _ in range(100)]
    blob, sizes, stored = _encode(datas)
    assert stored > 0
    assert all(size < 1500 for size in sizes[50 + STORED_RUN + 1 :])
    assert _decoded(blob) == datas
