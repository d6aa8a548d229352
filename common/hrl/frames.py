"""zstd frames of a batch's DATA payloads: the checks one frame must pass before it is
decompressed, and the decompression of many frames in one call.

Why many at once: python-zstandard lets go of the GIL for every call, and a broker busy with
100 uploads and their applies has other threads waiting for it. Each 4 KiB payload
decompressed on its own then cost a hand-over of the GIL and back (futex calls, two context
switches), which made up most of the broker's CPU at 100 busy disks (issue 10). One call for
the frames already in the buffer lets go of it once.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

import zstandard

from common.hrl.format import MAX_ZSTD_WINDOW, ZSTD_FRAME_MAGIC

_BLOCK_HEADER: Final = 3
_RAW: Final = 0
_RLE: Final = 1
_RESERVED: Final = 3
_CHECKSUM: Final = 4
_MAX_BLOCK: Final = 128 * 1024  # zstd's largest block content
_SINGLE_SEGMENT: Final = 0x20  # frame header descriptor: no window descriptor, window = content


def stored_frame(data: memoryview) -> bytes:
    """A standard zstd frame that holds ``data`` (1 byte to 8 MiB) as it is, in raw blocks: what
    zstd itself makes of incompressible data, without its attempt to compress it first
    (RFC 8878, 3.1.1: a single-segment frame with its content size, then raw blocks)."""
    length = data.nbytes
    if length < 256:
        fcs = bytes((_SINGLE_SEGMENT, length))
    elif length < 65536 + 256:
        fcs = bytes((_SINGLE_SEGMENT | 0x40,)) + struct.pack("<H", length - 256)
    else:
        fcs = bytes((_SINGLE_SEGMENT | 0x80,)) + struct.pack("<I", length)
    parts: list[bytes | memoryview] = [ZSTD_FRAME_MAGIC, fcs]
    for pos in range(0, length, _MAX_BLOCK):
        size = min(_MAX_BLOCK, length - pos)
        last = int(pos + size == length)
        parts.append((size << 3 | _RAW << 1 | last).to_bytes(_BLOCK_HEADER, "little"))
        parts.append(data[pos : pos + size])
    return b"".join(parts)


def check_frame(frame: memoryview, length: int) -> tuple[str | None, bool]:
    """``(problem, fills)``: why ``frame`` is not one zstd frame of ``length`` bytes of content
    that we decompress (to finish "the zstd payload ...") or None, and whether its blocks (and
    checksum) end exactly at its end. zstd itself checks the rest as it decompresses.

    ``fills`` matters to a frame decompressed with others: alone, zstd refuses bytes after the
    frame (``allow_extra_data=False``); together it ignores them, so a frame goes with others
    only if its block headers account for every byte."""
    # A skippable or magicless frame is not "one zstd frame"; refuse it before zstd sees it.
    if bytes(frame[: len(ZSTD_FRAME_MAGIC)]) != ZSTD_FRAME_MAGIC:
        return f"does not start with the zstd frame magic (got {bytes(frame[:4])!r})", False
    try:
        params = zstandard.get_frame_parameters(frame)
        pos = zstandard.frame_header_size(frame)
    except zstandard.ZstdError as e:
        return f"has an unreadable frame header ({e})", False
    # python-zstandard allocates the frame's declared content size whatever the output
    # bound, so a lying frame header must be refused here, before it is believed.
    if params.content_size not in (zstandard.CONTENTSIZE_UNKNOWN, length):
        return f"declares {params.content_size} bytes of content, the extent is {length}", False
    if params.window_size > MAX_ZSTD_WINDOW:
        return f"needs a {params.window_size}-byte window, more than {MAX_ZSTD_WINDOW}", False
    return None, _blocks_fill(frame, pos, checksum=params.has_checksum)


def _blocks_fill(frame: memoryview, pos: int, *, checksum: bool) -> bool:
    end = len(frame)
    while pos + _BLOCK_HEADER <= end:
        word = frame[pos] | frame[pos + 1] << 8 | frame[pos + 2] << 16
        kind, size = (word >> 1) & 3, word >> 3
        if kind == _RESERVED:
            return False
        pos += _BLOCK_HEADER + (1 if kind == _RLE else size)
        if word & 1:  # the frame's last block
            return pos + (_CHECKSUM if checksum else 0) == end
    return False


def decompress_frames(
    dctx: zstandard.ZstdDecompressor, frames: Sequence[memoryview], lengths: Sequence[int]
) -> list[bytes] | None:
    """Each frame's content, of exactly its length, from one call into zstd; None if any frame
    does not decompress to its length (the caller then takes them one by one, which names the
    bad one)."""
    sizes = struct.pack(f"={len(lengths)}Q", *lengths)
    try:
        out = dctx.multi_decompress_to_buffer(list(frames), decompressed_sizes=sizes)
    except zstandard.ZstdError:
        return None
    return [out[i].tobytes() for i in range(len(out))]


__all__ = ["check_frame", "decompress_frames", "stored_frame"]
