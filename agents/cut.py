"""Crash-consistent cuts: a frozen block map plus copy-on-write of the blocks it still needs.

A cut happens in one synchronous step of the event loop that also runs the NBD server's request
handlers, so it falls between two guest requests: every write acknowledged before it is in the
frozen map, none after. The active map is swapped out (:meth:`agents.dirtymap.DirtyMap.swap`)
and becomes the cut's *frozen* map. From then on:

- before a guest write, trim or write-zeroes modifies a changed grain of a block that is frozen
  as DATA and not yet read for the batch (the only bytes of the block the batch reads),
  :meth:`Cut.preserve` copies the block's current (= cut-time) changed grains aside: into
  memory up to a bound, then into a spill file; the block becomes COWED. A request that touches
  only other grains of the block copies nothing;
- the batch reads frozen blocks with :meth:`Cut.read`, which takes COWED blocks from the copy
  and the rest from the image, in one synchronous step (so no guest write can slip between the
  read and the bookkeeping), marks them SENT and releases their copies.

ZERO and TRIM blocks need neither a read nor a copy: their extent carries no payload. The cost
of a guest write is thus one ``mmap.find`` on the frozen map, plus the copy when it really
overwrites unread cut-time data.
"""

from __future__ import annotations

import contextlib
import os
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from agents.dirtymap import COWED, DATA, SENT, TRIM, ZERO, BlockMap, _fill
from agents.errors import TrackingError
from common.fsio import data_extents

_DATA_BYTE = bytes([DATA])
_COWED_BYTE = bytes([COWED])
_TO_SENT = bytes.maketrans(bytes([DATA, COWED]), bytes([SENT, SENT]))
# A hop's blocks are translated in one piece up to this many (a copy of them is made): sparse
# extents of a huge disk may lie further apart, and are settled one by one.
_MAX_TRANSLATED = 64 * 1024
MAX_NODATA_EXTENT = 1 << 31  # well inside the format's 2^32 - 1, and block aligned

Reader = Callable[[int, int], bytes | bytearray]


class PlannedExtent(NamedTuple):
    """One extent of a batch, as planned from the frozen map (kind DATA, ZERO or TRIM).

    A named tuple: planning makes one per extent, twice per batch, and a tuple is the cheapest
    object Python builds.
    """

    offset: int
    length: int
    kind: int


class CowStore:
    """Cut-time copies of blocks, in memory up to ``memory_limit`` bytes, then in a spill file.

    A copy may cover only part of its block (the changed grains): each is kept with the disk
    offset it starts at.
    """

    def __init__(self, block_size: int, memory_limit: int, spill_path: Path | None) -> None:
        self.block_size = block_size
        self.memory_limit = memory_limit
        self.spill_path = spill_path
        self._mem: dict[int, tuple[int, bytes]] = {}
        self._spilled: dict[int, tuple[int, int, int]] = {}
        self._fd = -1
        self._spill_end = 0
        self.memory_bytes = 0
        self.peak_memory_bytes = 0
        self.copied_blocks = 0
        self.spilled_blocks = 0

    def put(self, block: int, at: int, data: bytes) -> None:
        """Keep ``data``: the cut-time contents of ``block`` from disk offset ``at`` on."""
        self.copied_blocks += 1
        if self.memory_bytes + len(data) <= self.memory_limit or self.spill_path is None:
            self._mem[block] = (at, data)
            self.memory_bytes += len(data)
            self.peak_memory_bytes = max(self.peak_memory_bytes, self.memory_bytes)
            return
        if self._fd < 0:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(
                self.spill_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
            )
        written = os.pwrite(self._fd, data, self._spill_end)
        if written != len(data):
            raise TrackingError(f"short write to copy-on-write spill file {self.spill_path}")
        self._spilled[block] = (at, self._spill_end, len(data))
        self._spill_end += len(data)
        self.spilled_blocks += 1

    def take(self, block: int) -> tuple[int, bytes]:
        """Return and forget the copy of ``block``: ``(disk offset, data)``."""
        kept = self._mem.pop(block, None)
        if kept is not None:
            self.memory_bytes -= len(kept[1])
            return kept
        at, offset, length = self._spilled.pop(block)
        return at, os.pread(self._fd, length, offset)

    def get(self, block: int) -> tuple[int, bytes]:
        """Return the copy of ``block`` and keep it (a later extent of the block needs it)."""
        kept = self._mem.get(block)
        if kept is not None:
            return kept
        at, offset, length = self._spilled[block]
        return at, os.pread(self._fd, length, offset)

    def __len__(self) -> int:
        return len(self._mem) + len(self._spilled)

    def close(self) -> None:
        """Drop every copy and remove the spill file."""
        self._mem.clear()
        self._spilled.clear()
        self.memory_bytes = 0
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if self.spill_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.spill_path.unlink()


class Cut:
    """One frozen point in time of one disk, being read into a batch."""

    def __init__(
        self,
        frozen: BlockMap,
        *,
        size: int,
        block_size: int,
        reader: Reader,
        cow: CowStore,
        cut_time_ns: int,
        cut_id: int = 0,
        image_fd: int = -1,
    ) -> None:
        self.frozen = frozen
        self.image_fd = image_fd  # what ``reader`` preads, for the shipping process (-1: none)
        self.size = size
        self.block_size = block_size
        self.shift = block_size.bit_length() - 1
        self.grain = block_size // frozen.gpb
        self.gshift = self.grain.bit_length() - 1
        self.reader = reader
        self.cow = cow
        self.cut_time_ns = cut_time_ns
        self.cut_id = cut_id  # the VM-wide cut this disk's cut is part of (0: none)
        self.closed = False

    # -- called by the export before a guest modification --------------------------------

    def preserve(self, offset: int, length: int) -> None:
        """Copy aside what the batch still has to read of bytes ``[offset, offset + length)``
        before a guest request changes them.

        The batch reads only a DATA block's changed grains (:meth:`plan`), so a request that
        touches none of them (another 4 KiB of the same 64 KiB block, the usual random write)
        needs no copy: the block stays DATA and its grains are read from the image later. One
        that does touch them copies the span of the block's changed grains; the block becomes
        COWED. Only the request's first and last blocks can be partly covered: any block
        between is wholly overwritten, so it needs its copy whenever it is DATA.
        """
        shift = self.shift
        end = offset + length
        b0 = offset >> shift
        b1 = (end + self.block_size - 1) >> shift
        mm = self.frozen.mm
        first = mm.find(_DATA_BYTE, b0, b1)
        if first < 0:
            return
        last = mm.rfind(_DATA_BYTE, first, b1)
        g0 = offset >> self.gshift
        g1 = (end + self.grain - 1) >> self.gshift
        if first == b0 and not self._touched(b0, g0, g1):
            first = mm.find(_DATA_BYTE, b0 + 1, last + 1)
            if first < 0:
                return
        if last == b1 - 1 and last != b0 and not self._touched(last, g0, g1):
            last = mm.rfind(_DATA_BYTE, first, last)
            if last < 0:
                return
        start, stop = self._span(first)
        if last == first:  # the usual guest write, within one block: its bytes as read
            self.cow.put(first, start, bytes(self.reader(start, stop - start)))
            mm[first : first + 1] = _COWED_BYTE
            return
        # One read for the whole span (bounded by the request size), sliced per block.
        view = memoryview(self.reader(start, self._span(last)[1] - start))
        q = first
        while q >= 0:
            lo, hi = self._span(q)
            self.cow.put(q, lo, bytes(view[lo - start : hi - start]))
            mm[q : q + 1] = _COWED_BYTE
            q = mm.find(_DATA_BYTE, q + 1, last + 1)

    def _touched(self, block: int, g0: int, g1: int) -> bool:
        """Whether grains ``[g0, g1)`` include a changed grain of ``block``."""
        gpb = self.frozen.gpb
        return self.frozen.grains.any(max(g0, block * gpb), min(g1, (block + 1) * gpb))

    def _span(self, block: int) -> tuple[int, int]:
        """Disk bytes from the first to the end of the last changed grain of ``block``."""
        gpb = self.frozen.gpb
        g0 = block * gpb
        bits = self.frozen.grains.value(g0, g0 + gpb)
        if not bits:  # cannot happen for a DATA block; the whole block is always right
            return block << self.shift, min((block + 1) << self.shift, self.size)
        low = (bits & -bits).bit_length() - 1
        return (g0 + low) << self.gshift, min((g0 + bits.bit_length()) << self.gshift, self.size)

    # -- planning --------------------------------------------------------------------------

    def add_full_range(self, start: int, stop: int, fd: int | None) -> int:
        """Add bytes ``[start, stop)`` to the batch as DATA (initial copy), skipping holes.

        Only blocks not already frozen change; returns the number of blocks added. Called in
        the same loop step as the cut, before any guest request can run.
        """
        added = 0
        ranges = [(start, stop)] if fd is None else data_extents(fd, start, stop)
        for lo, hi in ranges:
            b0 = lo >> self.shift
            b1 = (hi + self.block_size - 1) >> self.shift
            added += self.frozen.fill_clean(b0, b1, DATA)
            # A block already pending for a few grains must now ship whole.
            self.frozen.grains.set(b0 * self.frozen.gpb, b1 * self.frozen.gpb)
        return added

    def plan(self, max_data_extent: int) -> Iterator[PlannedExtent]:
        """Yield the batch's extents in offset order; deterministic, so callable twice.

        A DATA run of blocks yields only its changed grains, adjacent ones merged into one
        extent; DATA extents never cross a multiple of ``max_data_extent`` (rounded to blocks).
        """
        shift = self.shift
        gshift = self.gshift
        gpb = self.frozen.gpb
        size = self.size
        chunk = max(max_data_extent >> shift, 1) * gpb  # grains per DATA extent at most
        nodata_blocks = MAX_NODATA_EXTENT >> shift
        grain_runs = self.frozen.grains.runs
        for b0, b1, kind in self.frozen.runs():
            if kind != DATA:
                for s in range(b0, b1, nodata_blocks):
                    offset = s << shift
                    end = min(min(s + nodata_blocks, b1) << shift, size)
                    yield PlannedExtent(offset, end - offset, kind)
                continue
            for first, g1 in grain_runs(b0 * gpb, b1 * gpb):
                g0 = first
                border = (g0 // chunk + 1) * chunk
                while g1 > border:
                    yield PlannedExtent(g0 << gshift, (border - g0) << gshift, DATA)
                    g0, border = border, border + chunk
                offset = g0 << gshift
                yield PlannedExtent(offset, min(g1 << gshift, size) - offset, DATA)

    def totals(self, max_data_extent: int) -> tuple[int, int]:
        """``(extent_count, data_bytes)`` of :meth:`plan`, for the batch header."""
        count = 0
        total = 0
        for ext in self.plan(max_data_extent):
            count += 1
            total += ext.length
        return count, total

    # -- reading ---------------------------------------------------------------------------

    def read(self, ext: PlannedExtent) -> bytes | bytearray:
        """Return the cut-time contents of a DATA extent; its blocks become SENT.

        Synchronous on purpose: the image read, the copy-on-write overlay and the state change
        happen with no guest request in between.
        """
        data: bytes | bytearray = self.reader(ext.offset, ext.length)
        pieces = self.patches(ext)
        if pieces:
            buf = bytearray(data)
            for at, piece in pieces:
                buf[at : at + len(piece)] = piece
            data = buf
        return data

    def patches(self, ext: PlannedExtent) -> list[tuple[int, bytes]]:
        """The copies that make the image's bytes of DATA extent ``ext`` its cut-time contents,
        as ``(offset in the extent, bytes)``; its blocks become SENT (:meth:`settle`)."""
        out: list[tuple[int, int, bytes]] = []
        self.settle(array("q", (ext.offset, ext.length, self.done_block(ext))), out)
        return [(at, piece) for _, at, piece in out]

    def done_block(self, ext: PlannedExtent) -> int:
        """The block after the last one ``ext`` finishes: its last block stays unread (DATA or
        COWED, its copy kept) while a later extent of the cut still needs some of its grains.
        The frozen map alone says so, so the shipping process works it out for the agent."""
        end = ext.offset + ext.length
        b1 = (end + self.block_size - 1) >> self.shift
        if end & (self.block_size - 1) and self.frozen.grains.any(
            (end + self.grain - 1) >> self.gshift, b1 * self.frozen.gpb
        ):
            return b1 - 1
        return b1

    def settle(self, spans: array[int], out: list[tuple[int, int, bytes]]) -> None:
        """For DATA extents read from the image after the cut, given as ``(offset, length,
        done block)`` triples (:meth:`done_block`), append to ``out`` the copies that make
        their bytes cut-time contents (``(extent index, offset in it, bytes)``), and mark their
        finished blocks SENT. It runs in a step of the NBD loop for every hop the shipping
        process reads (decision 029), so a guest request may wait for it: consecutive extents of
        the plan (the usual hop) are settled with one search for copies and one translation of
        the hop's blocks, whatever their number; anything else extent by extent.

        The bytes may have been read at any time after the cut and before this call: a guest
        request copies a block aside and marks it COWED before it changes any of the block's
        changed grains in the image, so the grains a block still DATA here has in the hop were not
        changed before the read ended, and one that is COWED has its copy.
        """
        n = len(spans)
        if not n:
            return
        shift = self.shift
        offsets = spans[0::3].tolist()
        b0 = offsets[0] >> shift
        b1 = (spans[n - 3] + spans[n - 2] + self.block_size - 1) >> shift
        done = min(max(spans[n - 1], spans[n - 3] >> shift), b1)
        if done - b0 > _MAX_TRANSLATED or offsets != sorted(offsets):
            self._settle_each(spans, out)
            return
        # Extents in plan order cover every DATA and COWED block of [b0, done) and only those
        # of the hop (a block between two of them is CLEAN, ZERO, TRIM or SENT): so the blocks
        # with copies are found by one search, each mapped to its extents by bisection.
        mm = self.frozen.mm
        p = mm.find(_COWED_BYTE, b0, b1)
        while p >= 0:
            self._copies_of(p, spans, max(bisect_right(offsets, p << shift) - 1, 0) * 3, out)
            p = mm.find(_COWED_BYTE, p + 1, b1)
        if done > b0:
            mm[b0:done] = mm[b0:done].translate(_TO_SENT)

    def _settle_each(self, spans: array[int], out: list[tuple[int, int, bytes]]) -> None:
        """:meth:`settle` extent by extent (the definition the hop-wide walk must match)."""
        shift = self.shift
        mask = self.block_size - 1
        mm = self.frozen.mm
        find = mm.find
        for i in range(0, len(spans), 3):
            offset = spans[i]
            end = offset + spans[i + 1]
            b0 = offset >> shift
            b1 = (end + mask) >> shift
            done = min(max(spans[i + 2], b0), b1)
            p = find(_COWED_BYTE, b0, b1)
            while p >= 0:
                self._patch(i, offset, end, p, p < done, out)
                p = find(_COWED_BYTE, p + 1, b1)
            if done > b0:
                mm[b0:done] = _fill(SENT, done - b0)

    def _copies_of(
        self, block: int, spans: array[int], first: int, out: list[tuple[int, int, bytes]]
    ) -> None:
        """The copy of COWED ``block`` for each extent from triple ``first`` on that overlaps it
        (the first such extent starts at or before the block)."""
        shift = self.shift
        for i in range(first, len(spans), 3):
            offset = spans[i]
            b0 = offset >> shift
            if b0 > block:
                return
            end = offset + spans[i + 1]
            b1 = (end + self.block_size - 1) >> shift
            if b1 > block:
                self._patch(i, offset, end, block, block < min(max(spans[i + 2], b0), b1), out)

    def _patch(
        self,
        i: int,
        offset: int,
        end: int,
        block: int,
        last: bool,
        out: list[tuple[int, int, bytes]],
    ) -> None:
        """Append the part of ``block``'s copy inside extent ``i`` (bytes ``[offset, end)``);
        ``last``: the extent finishes the block, so the copy is released."""
        at, saved = self.cow.take(block) if last else self.cow.get(block)
        lo = max(at, offset)
        hi = min(at + len(saved), end)
        # A copy inside the extent (the usual case) goes as it is, not as a sliced copy of it.
        piece = saved if lo == at and hi - lo == len(saved) else saved[lo - at : hi - at]
        out.append((i // 3, lo - offset, piece))

    def read_many(self, exts: Sequence[PlannedExtent]) -> list[bytes | bytearray]:
        """:meth:`read` of each DATA extent of ``exts`` (in plan order), in one synchronous step."""
        return [self.read(ext) for ext in exts]

    async def fetch(self, exts: Sequence[PlannedExtent]) -> list[bytes | bytearray]:
        """:meth:`read_many` for the batch body: a coroutine that never suspends, so still one
        step of the calling loop (:class:`agents.shiploop.LoopCut` hops to the NBD loop)."""
        return self.read_many(exts)

    def close(self) -> None:
        """Release the copies (the frozen map stays with its owner until merged or settled)."""
        self.closed = True
        self.cow.close()


__all__ = ["MAX_NODATA_EXTENT", "TRIM", "ZERO", "CowStore", "Cut", "PlannedExtent"]
