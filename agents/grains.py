"""Sub-block precision for the dirty map: one bit per 4 KiB *grain* of the disk.

The block map (:mod:`agents.dirtymap`) keeps one byte per tracking block (64 KiB by default);
this bitmap says which 4 KiB grains inside a dirty block really changed, so a 4 KiB write ships
about 4 KiB at every block size. A 100 GiB disk needs 3.3 MB of bits (in an anonymous ``mmap``:
pages never written cost nothing), plus 1.6 MB of block bytes at 64 KiB blocks: under 5 MB even
once writes touched the whole disk.

Every operation is a constant number of Python steps plus slice assignments or big-integer
operations over the range: no per-grain or per-block Python loop on the write path. Bit ``g``
lives in byte ``g >> 3`` at ``1 << (g & 7)``.

Invariant kept by the block map: a grain's bit is set only while its block is not CLEAN, so
OR-ing whole bytes at a range's edges never invents a change in a clean neighbour.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Iterator

GRAIN = 4096

_FULL = b"\xff" * 65536
# A run of full bytes, or one byte with some (not all) bits set.
_BIT_RUNS = re.compile(rb"\xff+|[^\x00\xff]")


def _runs_in_byte(value: int) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    bit = 0
    while bit < 8:
        if value >> bit & 1:
            start = bit
            while bit < 8 and value >> bit & 1:
                bit += 1
            out.append((start, bit))
        else:
            bit += 1
    return tuple(out)


_BYTE_RUNS = tuple(_runs_in_byte(v) for v in range(256))


_FULL_VIEW = memoryview(_FULL)


def shared_map(name: str, size: int, fd: int = -1) -> tuple[mmap.mmap, int]:
    """A shared mapping of ``size`` bytes and its descriptor: a new ``memfd`` (zero-filled,
    untouched pages cost no memory), or, given ``fd``, that one's memory read-only (the agent's
    shipping process reads the maps of the cuts it ships, decision 029)."""
    size = max(size, 1)
    if fd >= 0:
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ), fd
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size), fd
    except BaseException:
        os.close(fd)
        raise


class GrainBits:
    """One bit per grain in a shared mapping (:func:`shared_map`)."""

    __slots__ = ("fd", "mm", "ngrains")

    def __init__(self, ngrains: int, fd: int = -1) -> None:
        self.ngrains = ngrains
        self.mm, self.fd = shared_map("replikant-grains", (ngrains + 7) >> 3, fd)

    def set(self, g0: int, g1: int) -> None:
        """Set the bits of grains ``[g0, g1)``."""
        if g0 >= g1:
            return
        mm = self.mm
        first, last = g0 >> 3, (g1 - 1) >> 3
        head = (0xFF << (g0 & 7)) & 0xFF
        tail = 0xFF >> (7 - ((g1 - 1) & 7))
        if first == last:
            mm[first] |= head & tail
            return
        mm[first] |= head
        mm[last] |= tail
        # In 64 KiB pieces: no disk-sized temporary for a whole-disk discard.
        for lo in range(first + 1, last, len(_FULL)):
            hi = min(lo + len(_FULL), last)
            mm[lo:hi] = _FULL_VIEW[: hi - lo]

    def _window(self, g0: int, g1: int) -> bytearray:
        """The bytes holding grains ``[g0, g1)``, with bits outside the range cleared."""
        buf = bytearray(self.mm[g0 >> 3 : (g1 + 7) >> 3])
        if g0 & 7:
            buf[0] &= (0xFF << (g0 & 7)) & 0xFF
        if g1 & 7:
            buf[-1] &= (1 << (g1 & 7)) - 1
        return buf

    def any(self, g0: int, g1: int) -> bool:
        """Whether any grain of ``[g0, g1)`` is set."""
        if g0 >= g1:
            return False
        buf = self._window(g0, g1)
        return buf.count(0) != len(buf)

    def value(self, g0: int, g1: int) -> int:
        """Grains ``[g0, g1)`` as an integer: bit ``i`` is grain ``g0 + i``."""
        return int.from_bytes(self._window(g0, g1), "little") >> (g0 & 7)

    def or_from(self, other: GrainBits, g0: int, g1: int) -> None:
        """OR ``other``'s bits into this map over the whole bytes that hold ``[g0, g1)``."""
        lo, hi = g0 >> 3, (g1 + 7) >> 3
        theirs = other.mm[lo:hi]
        if theirs.count(0) == hi - lo:
            return
        ours = self.mm[lo:hi]
        merged = int.from_bytes(ours, "little") | int.from_bytes(theirs, "little")
        self.mm[lo:hi] = merged.to_bytes(hi - lo, "little")

    def copy_from(self, other: GrainBits) -> None:
        """Make this map equal to ``other`` (same size)."""
        self.mm[:] = other.mm[:]

    def runs(self, g0: int, g1: int) -> Iterator[tuple[int, int]]:
        """Yield ``(start, end)`` grain ranges: the maximal runs of set bits within ``[g0, g1)``.

        One regex match per full-byte run or partial byte: the work follows the number of runs
        (extents), not the number of grains.
        """
        if g0 >= g1:
            return
        buf = self._window(g0, g1)
        base = (g0 >> 3) << 3
        start = end = -1
        for m in _BIT_RUNS.finditer(buf):
            s, e = m.start(), m.end()
            value = buf[s]
            pieces = ((0, (e - s) << 3),) if value == 0xFF else _BYTE_RUNS[value]
            at = base + (s << 3)
            for lo, hi in pieces:
                if at + lo == end:
                    end = at + hi
                    continue
                if end > start:
                    yield start, end
                start, end = at + lo, at + hi
        if end > start:
            yield start, end

    def close(self) -> None:
        """Release the bitmap's memory."""
        self.mm.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
