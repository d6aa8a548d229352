"""Per-block hashes, a wire format: XXH3-64 of every block, 8 bytes big-endian each.

A disk of ``size`` bytes hashed in ``block_size`` blocks is ``ceil(size / block_size)`` hashes of
:data:`HASH_SIZE` bytes, in block order, the last block possibly short. XXH3-64 is xxHash's
64-bit XXH3 with seed 0 (``xxhash.xxh3_64``), the same function as the HRL checksums
(:data:`common.hrl.xxh64_of`). The agent sends these lists to the broker and the broker to the
admin CLI (resync comparison, ``verify``), and seed media store them next to each image
(``<disk-id>.xxh3``), so both sides must build them here and nowhere else.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Final

import xxhash

HASH_SIZE: Final = 8
"""Bytes per block in a hash list."""

_PACK: Final = struct.Struct(">Q")
_xxh3_64 = xxhash.xxh3_64_intdigest


def block_hash(block: bytes | bytearray | memoryview) -> bytes:
    """The :data:`HASH_SIZE`-byte hash of one block."""
    return _PACK.pack(_xxh3_64(block))


def hash_blocks(data: bytes | bytearray | memoryview, block_size: int) -> bytes:
    """The hash list of ``data`` cut into ``block_size`` blocks (the last one possibly short)."""
    view = memoryview(data)
    pack = _PACK.pack
    return b"".join(
        pack(_xxh3_64(view[i : i + block_size])) for i in range(0, len(view), block_size)
    )


def hash_at(hashes: bytes | bytearray | memoryview, index: int) -> bytes:
    """The hash of block ``index`` in a hash list."""
    start = index * HASH_SIZE
    return bytes(hashes[start : start + HASH_SIZE])


def file_block_hashes(path: str, *, block_size: int) -> bytes:
    """The hash list of a plain image file (read through a read-only mmap, without a copy)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if not size:
            return b""
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
            mv = memoryview(mm)
            try:
                return hash_blocks(mv, block_size)
            finally:
                mv.release()
    finally:
        os.close(fd)
