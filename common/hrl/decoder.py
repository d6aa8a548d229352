"""The sans-I/O batch decoder: bytes in, verified events out.

The caller feeds whatever bytes it has with :meth:`BatchDecoder.receive_data` (``b""`` at end of
stream) and pulls events with :meth:`BatchDecoder.next_event` until it returns
:data:`NEED_DATA`. The decoder does no I/O, holds at most one record beyond what the caller fed
it, and checks every length against the format, the header and :class:`DecodeLimits` before
waiting for (or allocating) the bytes it names. The one exception: the zstd payloads complete in
what was fed are decompressed together (common/hrl/frames.py says why), up to 2 MiB of content
held ahead of the records' turn.
"""

from __future__ import annotations

import enum
import traceback
import uuid
from typing import Final, Literal

import xxhash
import zstandard

from common.hrl.errors import (
    BadField,
    BadMagic,
    BatchFormatError,
    ExtentChecksumMismatch,
    HeaderChecksumMismatch,
    LimitExceeded,
    TrailerMismatch,
    TrailingData,
    Truncated,
    UnsupportedVersion,
)
from common.hrl.format import (
    DEFAULT_LIMITS,
    DISK_ID_BYTES,
    FLAG_FULL,
    H_COMPRESSION,
    H_CONSISTENCY,
    H_DISK_ID,
    H_DISK_ID_LEN,
    H_FLAGS,
    H_HEADER_LEN,
    H_VERSION,
    HEADER_FIXED,
    HEADER_MIN_LEN,
    HEADER_PREFIX,
    HEADER_XXH,
    MAGIC,
    MAX_DISK_ID_LEN,
    MAX_ZSTD_WINDOW,
    R_DATA_XXH,
    R_KIND,
    R_RECORD_XXH,
    R_RESERVED,
    R_STORED_LEN,
    RECORD,
    T_CHAIN_XXH,
    T_DATA_BYTES,
    T_EXTENT_COUNT,
    T_RESERVED,
    TRAILER,
    TRAILER_MAGIC,
    VERSION,
    ZSTD_FRAME_MAGIC,
    BatchEnd,
    BatchHeader,
    Compression,
    Consistency,
    DecodeLimits,
    Extent,
    ExtentKind,
    check_extent,
    check_header,
    zstd_compress_bound,
)
from common.hrl.frames import check_frame, decompress_frames

_xxh3 = xxhash.xxh3_64_intdigest
_KINDS: Final = tuple(ExtentKind)
_RECORD_LEN: Final = RECORD.size
_TRAILER_LEN: Final = TRAILER.size
_AHEAD_FRAMES: Final = 256
_AHEAD_BYTES: Final = 2 << 20  # decompressed bytes held ahead of their turn, at most


class NeedData(enum.Enum):
    """The type of :data:`NEED_DATA` (an enum so that ``event is NEED_DATA`` narrows types)."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA
"""Returned by :meth:`BatchDecoder.next_event` when it cannot go on without more bytes."""

Event = BatchHeader | Extent | BatchEnd
"""What :meth:`BatchDecoder.next_event` returns when it has something."""


class _State(enum.Enum):
    HEADER = enum.auto()
    RECORD = enum.auto()  # waiting for an extent record's 32 bytes
    PAYLOAD = enum.auto()  # record parsed, waiting for its DATA payload
    TRAILER = enum.auto()
    END = enum.auto()  # trailer verified, waiting for end of stream
    DONE = enum.auto()  # BatchEnd returned
    ERROR = enum.auto()


class BatchDecoder:
    """Parse and verify one batch stream (sans-I/O).

    Events come in order: one :class:`BatchHeader`, ``extent_count`` :class:`Extent` events
    (DATA payloads already decompressed and checksum-checked), then one :class:`BatchEnd`.
    :class:`BatchEnd` is returned only once the end of stream has been fed and nothing follows
    the trailer, so a caller may treat it as "the whole batch is valid". After it, :attr:`done`
    is true and :meth:`next_event` returns :data:`NEED_DATA` for ever.

    Any refusal raises a :class:`BatchFormatError` subclass; the decoder then stays failed and
    raises the same error again from :meth:`next_event`.
    """

    def __init__(self, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
        """Create a decoder that enforces ``limits``."""
        self._limits = limits
        self._buf = bytearray()
        self._pos = 0  # read offset in _buf
        self._base = 0  # stream offset of _buf[0]
        self._eof = False
        self._state = _State.HEADER
        self._error: BatchFormatError | None = None
        self._header: BatchHeader | None = None
        self._count = 0
        self._data_seen = 0
        self._prev_end = 0
        self._chain = xxhash.xxh3_64()
        # The DATA record whose payload we are waiting for: offset, length, stored_len, xxh,
        # and the stream offset of its record.
        self._pending = (0, 0, 0, 0, 0)
        self._dctx: zstandard.ZstdDecompressor | None = None
        self._end: BatchEnd | None = None
        # DATA payloads decompressed ahead of their turn, by the stream offset of their frame,
        # and where taking frames ahead stopped after a failed try.
        self._ahead: dict[int, bytes] = {}
        self._alone_until = 0

    @property
    def header(self) -> BatchHeader | None:
        """The batch header once it has been returned, else ``None``."""
        return self._header

    @property
    def done(self) -> bool:
        """True once :class:`BatchEnd` has been returned: the batch is complete and valid."""
        return self._state is _State.DONE

    @property
    def position(self) -> int:
        """Stream offset of the first byte not yet consumed."""
        return self._base + self._pos

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet consumed (what the decoder holds on the caller's behalf)."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed the next bytes of the stream; ``b""`` means the stream has ended.

        Raises :class:`RuntimeError` if non-empty data follows the end of stream.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("BatchDecoder.receive_data: data after the end of stream")
        if self._error is not None:
            return  # a failed decoder never reads again: don't hold the bytes
        if self._pos:
            # Drop what has been consumed. Deleting a bytearray's head is cheap in CPython (it
            # moves the start pointer), so the buffer holds only the unconsumed tail.
            del self._buf[: self._pos]
            self._base += self._pos
            self._pos = 0
        self._buf += data

    def next_event(self) -> Event | Literal[NeedData.NEED_DATA]:
        """Return the next event, or :data:`NEED_DATA` if more bytes (or end of stream) are needed.

        Raises a :class:`BatchFormatError` subclass if the stream breaks the format.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except BatchFormatError as e:
            # The traceback's frames would keep the input buffer (and views of it) alive for as
            # long as the caller keeps the error; keep the line numbers, drop the locals.
            traceback.clear_frames(e.__traceback__)
            self._error = e
            self._state = _State.ERROR
            self._buf = bytearray()
            self._pos = 0
            self._ahead.clear()
            raise

    # -- the state machine ---------------------------------------------------------------------

    def _next(self) -> Event | Literal[NeedData.NEED_DATA]:
        state = self._state
        if state is _State.RECORD:
            if self._header is not None and self._count < self._header.extent_count:
                return self._record()
            self._state = state = _State.TRAILER
        if state is _State.PAYLOAD:
            return self._payload()
        if state is _State.HEADER:
            return self._read_header()
        if state is _State.TRAILER:
            if len(self._buf) - self._pos < _TRAILER_LEN:
                return self._need(_TRAILER_LEN, "trailer", "trailer")
            self._read_trailer()
            self._state = state = _State.END
        if state is _State.END:
            if len(self._buf) > self._pos:
                # Say neither how many bytes nor which: that depends on how the stream was
                # chunked, and a refusal should not.
                raise TrailingData(
                    f"data follows the trailer that ends at byte {self.position}; nothing may "
                    "follow it",
                    field="trailer",
                    position=self.position,
                )
            if not self._eof:
                return NEED_DATA
            self._state = _State.DONE
            assert self._end is not None
            return self._end
        return NEED_DATA  # DONE

    def _need(self, n: int, field: str, what: str) -> Literal[NeedData.NEED_DATA]:
        """Return NEED_DATA while ``n`` bytes of ``what`` are awaited; refuse at end of stream."""
        if self._eof:
            have = len(self._buf) - self._pos
            raise Truncated(
                f"the stream ends at byte {self._base + len(self._buf)}, inside the {what} "
                f"(at least {n - have} more bytes were needed)",
                field=field,
                position=self._base + len(self._buf),
            )
        return NEED_DATA

    def _read_header(self) -> BatchHeader | Literal[NeedData.NEED_DATA]:
        buf, pos = self._buf, self._pos
        have = len(buf) - pos
        if have < HEADER_PREFIX.size:
            # Check the magic as soon as its first byte arrives, so that a stray HTTP request or
            # an HTML error page is refused at once instead of waiting for a header.
            if buf[pos : pos + min(have, len(MAGIC))] != MAGIC[: min(have, len(MAGIC))]:
                self._bad_magic(bytes(buf[pos : pos + len(MAGIC)]))
            return self._need(HEADER_PREFIX.size, "header", "header")
        header_len = self._check_prefix(buf, pos)
        if have < header_len:
            return self._need(header_len, "header", "header")
        header = self._decode_header(buf, pos, header_len)
        check_header(header, self._limits)
        self._pos += header_len
        self._header = header
        self._state = _State.RECORD
        return header

    def _check_prefix(self, buf: bytearray, pos: int) -> int:
        """Check magic, version and header length (before the rest has arrived); return the
        header's length."""
        magic, version, header_len = HEADER_PREFIX.unpack_from(buf, pos)
        if magic != MAGIC:
            self._bad_magic(magic)
        if version != VERSION:
            raise UnsupportedVersion(
                f"format version is {version}; this broker speaks version {VERSION}",
                field="header.version",
                position=H_VERSION,
            )
        id_len = header_len - HEADER_MIN_LEN
        if not 1 <= id_len <= MAX_DISK_ID_LEN:
            raise BadField(
                f"header_len is {header_len}, must be {HEADER_MIN_LEN} + the disk id's length "
                f"(1..{MAX_DISK_ID_LEN})",
                field="header.header_len",
                position=H_HEADER_LEN,
            )
        if id_len > self._limits.max_disk_id_len:
            raise LimitExceeded(
                f"header_len is {header_len}: a {id_len}-byte disk id, more than this "
                f"broker's limit of {self._limits.max_disk_id_len}",
                field="header.header_len",
                position=H_HEADER_LEN,
            )
        return int(header_len)

    def _decode_header(self, buf: bytearray, pos: int, header_len: int) -> BatchHeader:
        """Verify the complete header's checksum and decode its fields, each one checked."""
        id_len = header_len - HEADER_MIN_LEN
        sealed = header_len - HEADER_XXH.size
        (stated,) = HEADER_XXH.unpack_from(buf, pos + sealed)
        with memoryview(buf) as mv:
            actual = _xxh3(mv[pos : pos + sealed])
        if stated != actual:
            raise HeaderChecksumMismatch(
                f"header checksum mismatch (header says {stated:#018x}, bytes hash to "
                f"{actual:#018x}): the header was corrupted",
                field="header.header_xxh",
                position=sealed,
            )
        (
            _magic,
            _version,
            _header_len,
            raw_uuid,
            generation,
            seq,
            base_seq,
            cut_time_ns,
            disk_size,
            block_size,
            consistency,
            compression,
            flags,
            extent_count,
            data_bytes,
            cut_id,
            first_change_cut,
            disk_id_len,
        ) = HEADER_FIXED.unpack_from(buf, pos)
        if consistency not in (0, 1):
            raise BadField(
                f"consistency is {consistency}, must be 0 (crash) or 1 (application)",
                field="header.consistency",
                position=H_CONSISTENCY,
            )
        if compression not in (0, 1):
            raise BadField(
                f"compression is {compression}, must be 0 (none) or 1 (zstd)",
                field="header.compression",
                position=H_COMPRESSION,
            )
        if flags & ~FLAG_FULL:
            raise BadField(
                f"flags is {flags:#06x}; only bit 0 (FULL) is defined, the others must be 0",
                field="header.flags",
                position=H_FLAGS,
            )
        if disk_id_len != id_len:
            raise BadField(
                f"disk_id_len is {disk_id_len} but header_len {header_len} implies {id_len}",
                field="header.disk_id_len",
                position=H_DISK_ID_LEN,
            )
        raw_id = bytes(buf[pos + H_DISK_ID : pos + H_DISK_ID + id_len])
        if not DISK_ID_BYTES.fullmatch(raw_id):
            raise BadField(
                f"disk_id is {raw_id!r}, must match [A-Za-z0-9][A-Za-z0-9._-]*",
                field="header.disk_id",
                position=H_DISK_ID,
            )
        return BatchHeader(
            vm_uuid=uuid.UUID(bytes=raw_uuid),
            disk_id=raw_id.decode("ascii"),
            generation=generation,
            seq=seq,
            base_seq=base_seq,
            cut_time_ns=cut_time_ns,
            disk_size=disk_size,
            block_size=block_size,
            consistency=Consistency(consistency),
            compression=Compression(compression),
            full=bool(flags & FLAG_FULL),
            extent_count=extent_count,
            data_bytes=data_bytes,
            cut_id=cut_id,
            first_change_cut=first_change_cut,
        )

    def _bad_magic(self, got: bytes) -> None:
        # Show the bytes up to the first wrong one only: how many more arrived depends on the
        # chunking, and a refusal must not.
        wrong = next(i for i, (a, b) in enumerate(zip(got, MAGIC, strict=False)) if a != b)
        got = got[: wrong + 1]
        raise BadMagic(
            f"the stream does not start with the batch magic {MAGIC!r} (got {got!r}): it is not "
            "a Replikant batch, or it was mangled",
            field="header.magic",
            position=0,
        )

    def _record(self) -> Extent | Literal[NeedData.NEED_DATA]:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < _RECORD_LEN:
            if len(buf) == pos and self._eof:
                assert self._header is not None
                raise Truncated(
                    f"the stream ends at byte {self.position} after {self._count} of the "
                    f"{self._header.extent_count} extents the header announced",
                    field="extent",
                    position=self.position,
                )
            return self._need(_RECORD_LEN, "extent", f"extent record #{self._count}")
        header = self._header
        assert header is not None
        rec_at = self._base + pos
        offset, length, kind_word, stored_len, data_xxh, record_xxh = RECORD.unpack_from(buf, pos)
        with memoryview(buf) as mv:
            actual = _xxh3(mv[pos : pos + R_RECORD_XXH]) & 0xFFFFFFFF
            if record_xxh != actual:
                raise ExtentChecksumMismatch(
                    f"extent record #{self._count} (at byte {rec_at}): record checksum mismatch "
                    f"(record says {record_xxh:#010x}, bytes hash to {actual:#010x}): the record "
                    "was corrupted",
                    field="extent.record_xxh",
                    position=rec_at + R_RECORD_XXH,
                )
            self._chain.update(mv[pos : pos + _RECORD_LEN])
        kind_value = kind_word >> 24
        if kind_value >= len(_KINDS):
            raise BadField(
                f"extent at disk offset {offset}: kind is {kind_value}, must be 0 (DATA), "
                "1 (ZERO) or 2 (TRIM)",
                field="extent.kind",
                position=rec_at + R_KIND,
            )
        if kind_word & 0xFFFFFF:
            raise BadField(
                f"extent at disk offset {offset}: reserved bytes are "
                f"{kind_word & 0xFFFFFF:06x}, must be zero",
                field="extent.reserved",
                position=rec_at + R_RESERVED,
            )
        kind = _KINDS[kind_value]
        check_extent(
            offset,
            length,
            kind,
            prev_end=self._prev_end,
            header=header,
            data_seen=self._data_seen,
            max_extent_bytes=self._limits.max_extent_bytes,
            position=rec_at,
        )
        self._pos = pos + _RECORD_LEN
        self._count += 1
        self._data_seen += length
        self._prev_end = offset + length
        if kind is not ExtentKind.DATA:
            if stored_len:
                raise BadField(
                    f"{kind.name} extent at disk offset {offset}: stored_len is {stored_len}, "
                    "must be 0 (ZERO and TRIM extents carry no payload)",
                    field="extent.stored_len",
                    position=rec_at + R_STORED_LEN,
                )
            if data_xxh:
                raise BadField(
                    f"{kind.name} extent at disk offset {offset}: data_xxh is {data_xxh:#018x}, "
                    "must be 0",
                    field="extent.data_xxh",
                    position=rec_at + R_DATA_XXH,
                )
            return Extent(offset, length, kind)
        if header.compression is Compression.NONE:
            if stored_len != length:
                raise BadField(
                    f"DATA extent at disk offset {offset}: stored_len is {stored_len}, must equal "
                    f"length {length} in an uncompressed batch",
                    field="extent.stored_len",
                    position=rec_at + R_STORED_LEN,
                )
        elif not len(ZSTD_FRAME_MAGIC) <= stored_len <= zstd_compress_bound(length):
            raise BadField(
                f"DATA extent at disk offset {offset}: stored_len is {stored_len}, must be "
                f"{len(ZSTD_FRAME_MAGIC)}..{zstd_compress_bound(length)} (the zstd bound for "
                f"{length} bytes)",
                field="extent.stored_len",
                position=rec_at + R_STORED_LEN,
            )
        self._pending = (offset, length, stored_len, data_xxh, rec_at)
        self._state = _State.PAYLOAD
        return self._payload()

    def _payload(self) -> Extent | Literal[NeedData.NEED_DATA]:
        offset, length, stored_len, data_xxh, rec_at = self._pending
        buf, pos = self._buf, self._pos
        if len(buf) - pos < stored_len:
            return self._need(
                stored_len, "extent.payload", f"payload of the extent at disk offset {offset}"
            )
        at = rec_at + _RECORD_LEN
        assert self._header is not None
        if self._header.compression is Compression.NONE:
            with memoryview(buf) as mv:
                data = bytes(mv[pos : pos + stored_len])
        else:
            with memoryview(buf) as mv:
                data = self._decompress(mv[pos : pos + stored_len], offset, length, at)
        actual = _xxh3(data)
        if actual != data_xxh:
            raise ExtentChecksumMismatch(
                f"extent at disk offset {offset}: data checksum mismatch (expected "
                f"{data_xxh:#018x}, got {actual:#018x}): the batch was corrupted in transit or "
                "on the source; the agent will resend it",
                field="extent.data_xxh",
                position=rec_at + R_DATA_XXH,
            )
        self._pos = pos + stored_len
        self._state = _State.RECORD
        return Extent(offset, length, ExtentKind.DATA, data, actual)

    def _decompress(self, frame: memoryview, offset: int, length: int, at: int) -> bytes:
        """Decompress one zstd frame to exactly ``length`` bytes, allocating at most that: from
        the look-ahead if an earlier call decompressed it, else together with the complete
        DATA payloads that follow it in the buffer, else alone."""
        ready = self._ahead.pop(at, None)
        if ready is not None:
            return ready

        def bad(why: str) -> BadField:
            return BadField(
                f"DATA extent at disk offset {offset}: the zstd payload {why}",
                field="extent.payload",
                position=at,
            )

        problem, fills = check_frame(frame, length)
        if problem is not None:
            raise bad(problem)
        if self._dctx is None:
            self._dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
        if at >= self._alone_until and fills:
            data = self._decompress_ahead(frame, length, at)
            if data is not None:
                return data
        try:
            # With the content size unknown, zstd decompresses into a buffer of max_output_size
            # and fails if the frame wants more; allow_extra_data=False refuses bytes after it.
            data = self._dctx.decompress(frame, max_output_size=length, allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise bad(f"does not decompress ({e})") from None
        if len(data) != length:
            raise bad(f"decompresses to {len(data)} bytes, the extent is {length}")
        return data

    def _decompress_ahead(self, first: memoryview, length: int, at: int) -> bytes | None:
        """``first``'s content, decompressed in one call with the frames of the DATA records
        complete in the buffer after it (kept in :attr:`_ahead` for their turn); None if there
        are none or one of them fails (from then on up to the last of them, one by one).

        The records are only peeked at: each is parsed and checked in its turn as ever, so a
        frame taken ahead that its record then refuses is never returned. What one call holds
        is bounded by ``_AHEAD_FRAMES`` and ``_AHEAD_BYTES``."""
        assert self._dctx is not None
        buf, limit = self._buf, self._limits.max_extent_bytes
        assert self._header is not None
        records = self._header.extent_count - self._count  # announced, after this one
        q = at - self._base + len(first)
        starts, lengths, total = [at], [length], length
        with memoryview(buf) as mv:
            frames = [first]
            try:
                while records and len(frames) < _AHEAD_FRAMES and len(buf) - q >= _RECORD_LEN:
                    _off, n, kind_word, stored, _xxh, _rec = RECORD.unpack_from(buf, q)
                    q += _RECORD_LEN
                    records -= 1
                    if kind_word and not stored:  # ZERO or TRIM: no payload to decompress
                        continue
                    if (
                        kind_word
                        or not 0 < n <= limit
                        or total + n > _AHEAD_BYTES
                        or not len(ZSTD_FRAME_MAGIC) <= stored <= zstd_compress_bound(n)
                        or len(buf) - q < stored
                    ):
                        break
                    frame = mv[q : q + stored]
                    problem, fills = check_frame(frame, n)
                    if problem is not None or not fills:
                        frame.release()
                        break
                    frames.append(frame)
                    starts.append(self._base + q)
                    lengths.append(n)
                    total += n
                    q += stored
                out = decompress_frames(self._dctx, frames, lengths) if len(frames) > 1 else None
            finally:
                for view in frames[1:]:
                    view.release()
        if out is None:
            if len(frames) > 1:
                self._alone_until = starts[-1] + 1
            return None
        self._ahead.update(zip(starts[1:], out[1:], strict=True))
        return out[0]

    def _read_trailer(self) -> None:
        buf, pos = self._buf, self._pos
        at = self._base + pos
        header = self._header
        assert header is not None
        magic, count, reserved, data_bytes, chain = TRAILER.unpack_from(buf, pos)
        if magic != TRAILER_MAGIC:
            raise BadMagic(
                f"expected the trailer magic {TRAILER_MAGIC!r} after {self._count} extents "
                f"(the header's extent_count), got {magic!r}",
                field="trailer.magic",
                position=at,
            )
        if count != header.extent_count:
            raise TrailerMismatch(
                f"trailer extent_count is {count}, the header's is {header.extent_count}",
                field="trailer.extent_count",
                position=at + T_EXTENT_COUNT,
            )
        if reserved:
            raise BadField(
                f"trailer reserved field is {reserved:#010x}, must be zero",
                field="trailer.reserved",
                position=at + T_RESERVED,
            )
        if data_bytes != header.data_bytes or data_bytes != self._data_seen:
            raise TrailerMismatch(
                f"trailer data_bytes is {data_bytes}, the header's is {header.data_bytes} and "
                f"the extents total {self._data_seen}",
                field="trailer.data_bytes",
                position=at + T_DATA_BYTES,
            )
        actual = self._chain.intdigest()
        if chain != actual:
            raise TrailerMismatch(
                f"trailer chain_xxh is {chain:#018x}, the extent records hash to {actual:#018x}",
                field="trailer.chain_xxh",
                position=at + T_CHAIN_XXH,
            )
        self._pos = pos + _TRAILER_LEN
        self._end = BatchEnd(count, data_bytes, chain)
