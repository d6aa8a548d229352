"""The streaming batch encoder: one record at a time, never the whole batch in memory.

The encoder refuses (with the :class:`BatchFormatError` the decoder would raise) anything that
would make the batch invalid, so whatever it emits decodes with the default limits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Final

import xxhash
import zstandard

from common.hrl.errors import (
    BadField,
    ExtentChecksumMismatch,
    TrailerMismatch,
    TrailingData,
)
from common.hrl.format import (
    DEFAULT_LIMITS,
    FLAG_FULL,
    H_EXTENT_COUNT,
    HEADER_FIXED,
    HEADER_MIN_LEN,
    HEADER_XXH,
    MAGIC,
    MAX_DATA_EXTENT_BYTES,
    MAX_NODATA_EXTENT_BYTES,
    R_DATA_XXH,
    R_LENGTH,
    RECORD,
    RECORD_SEALED,
    RECORD_XXH,
    SECTOR,
    TRAILER,
    TRAILER_MAGIC,
    VERSION,
    BatchHeader,
    Compression,
    Extent,
    ExtentKind,
    check_extent,
    check_header,
)
from common.hrl.frames import stored_frame

_xxh3 = xxhash.xxh3_64_intdigest
_RECORD_LEN: Final = RECORD.size
DATA: Final = ExtentKind.DATA
MISSES_TO_STORE: Final = 4
"""Payloads in a row that zstd could not shrink by 1/32 before the encoder stops trying."""
STORED_RUN: Final = 32
"""Payloads then stored as they are (:func:`stored_frame`) before one is tried again."""


class _Incompressible:
    """Whether to try compressing the next payload: not after :data:`MISSES_TO_STORE` in a row
    did not shrink (random or encrypted data: a LUKS or BitLocker disk, fio's random buffers),
    except one try every :data:`STORED_RUN` + 1, which starts compressing again if it pays. On
    such data zstd spent ~20 % of the shipping process's CPU and sent what it was given."""

    def __init__(self) -> None:
        self.misses = 0
        self.skip = 0
        self.stored = 0

    def should_try(self) -> bool:
        if self.skip:
            self.skip -= 1
            self.stored += 1
            return False
        return True

    def tried(self, length: int, compressed: int) -> None:
        if compressed > length - (length >> 5):
            self.misses += 1
            if self.misses >= MISSES_TO_STORE:
                self.skip = STORED_RUN
        else:
            self.misses = 0


def _header_bytes(h: BatchHeader) -> bytes:
    disk_id = h.disk_id.encode("ascii")
    fixed = HEADER_FIXED.pack(
        MAGIC,
        VERSION,
        HEADER_MIN_LEN + len(disk_id),
        h.vm_uuid.bytes,
        h.generation,
        h.seq,
        h.base_seq,
        h.cut_time_ns,
        h.disk_size,
        h.block_size,
        h.consistency,
        h.compression,
        FLAG_FULL if h.full else 0,
        h.extent_count,
        h.data_bytes,
        h.cut_id,
        h.first_change_cut,
        len(disk_id),
    )
    sealed = fixed + disk_id
    return sealed + HEADER_XXH.pack(_xxh3(sealed))


class BatchEncoder:
    """Encode one batch as a stream of byte strings.

    Write :meth:`header_bytes` first, then one call of :meth:`data`, :meth:`zero` or
    :meth:`trim` per extent in increasing offset order (exactly ``header.extent_count`` of them,
    totalling ``header.data_bytes``), then :meth:`end`. Each method returns the bytes to send
    next. ``level`` is the zstd level used when ``header.compression`` is ZSTD.
    """

    def __init__(self, header: BatchHeader, level: int = 1) -> None:
        """Validate ``header`` (raising :class:`BatchFormatError`) and prepare to encode."""
        check_header(header, DEFAULT_LIMITS)
        self._header = header
        self._header_bytes = _header_bytes(header)
        self._cctx = (
            zstandard.ZstdCompressor(level=level)
            if Compression(header.compression) is Compression.ZSTD
            else None
        )
        self._incompressible = _Incompressible()
        self._position = len(self._header_bytes)
        self._count = 0
        self._data_seen = 0
        self._prev_end = 0
        self._chain = xxhash.xxh3_64()
        self._ended = False

    @property
    def header(self) -> BatchHeader:
        """The header this encoder was made for."""
        return self._header

    @property
    def stored(self) -> int:
        """DATA payloads stored without a try at compressing them (the data did not shrink)."""
        return self._incompressible.stored

    @property
    def position(self) -> int:
        """Bytes of the stream produced so far, counting the header."""
        return self._position

    def header_bytes(self) -> bytes:
        """Return the encoded header (the first bytes of the stream)."""
        return self._header_bytes

    def data(
        self,
        offset: int,
        data: bytes | bytearray | memoryview,
        *,
        checksum: int | None = None,
    ) -> bytes:
        """Return one DATA record for ``data`` at disk ``offset``, compressed per the header.

        ``checksum``, if given, is the xxh3 the caller took when it read the block; it is
        checked against ``data`` so corruption between the read and the encoding is caught.
        """
        return b"".join(self.data_parts(offset, data, checksum=checksum))

    def data_parts(
        self,
        offset: int,
        data: bytes | bytearray | memoryview,
        *,
        checksum: int | None = None,
    ) -> tuple[bytes, bytes | memoryview]:
        """Like :meth:`data`, as ``(record, payload)``: a caller that joins many records into
        one write saves a copy of every payload (uncompressed, the payload is a view of
        ``data``, which must then stay unchanged until it is sent)."""
        view = memoryview(data)
        if view.itemsize != 1 or view.ndim != 1:
            view = view.cast("B")
        return self.compressed_parts(offset, view, None, xxh=_xxh3(view), checksum=checksum)

    def compressed_parts(
        self,
        offset: int,
        data: memoryview,
        payload: bytes | memoryview | None,
        *,
        xxh: int,
        checksum: int | None = None,
    ) -> tuple[bytes, bytes | memoryview]:
        """Like :meth:`data_parts` for a payload compressed elsewhere (``None``: compress it
        here): ``data`` is the extent's bytes (a flat byte view), ``xxh`` their xxh3, which
        must equal ``checksum`` if given. Lets a caller compress several extents at once on
        worker threads and still encode the records in order on one."""
        length = data.nbytes
        self._check(offset, length, ExtentKind.DATA)
        if checksum is not None and checksum != xxh:
            raise ExtentChecksumMismatch(
                f"extent at disk offset {offset}: the data hashes to {xxh:#018x}, not the "
                f"{checksum:#018x} taken when it was read: it changed in memory",
                field="extent.data_xxh",
                position=self._position + R_DATA_XXH,
                fix="check the source host's memory; the agent retries the batch",
            )
        if payload is None:
            payload = self._payload(data)
        record = self._record(offset, length, ExtentKind.DATA, len(payload), xxh)
        self._position += len(payload)
        return record, payload

    def _payload(self, data: memoryview) -> bytes | memoryview:
        if self._cctx is None:
            return data
        policy = self._incompressible
        if not policy.should_try():
            return stored_frame(data)
        payload = self._cctx.compress(data)
        policy.tried(data.nbytes, len(payload))
        return payload

    def zero(self, offset: int, length: int) -> bytes:
        """Return one ZERO record: ``length`` bytes at ``offset`` read as zeroes."""
        self._check(offset, length, ExtentKind.ZERO)
        return self._record(offset, length, ExtentKind.ZERO, 0, 0)

    def trim(self, offset: int, length: int) -> bytes:
        """Return one TRIM record: ``length`` bytes at ``offset`` are discarded."""
        self._check(offset, length, ExtentKind.TRIM)
        return self._record(offset, length, ExtentKind.TRIM, 0, 0)

    def end(self) -> bytes:
        """Return the trailer, refusing if the extents written differ from the header's."""
        self._check_open()
        h = self._header
        if self._count != h.extent_count:
            raise TrailerMismatch(
                f"{self._count} extents were written, the header announced {h.extent_count}",
                field="trailer.extent_count",
                position=self._position,
            )
        if self._data_seen != h.data_bytes:
            raise TrailerMismatch(
                f"the extents written total {self._data_seen} bytes, the header announced "
                f"data_bytes {h.data_bytes}",
                field="trailer.data_bytes",
                position=self._position,
            )
        self._ended = True
        trailer = TRAILER.pack(
            TRAILER_MAGIC, self._count, 0, self._data_seen, self._chain.intdigest()
        )
        self._position += len(trailer)
        return trailer

    def _check_open(self) -> None:
        if self._ended:
            raise TrailingData(
                "the trailer has been written; nothing may follow it",
                field="trailer",
                position=self._position,
                fix="this is a bug in the caller of BatchEncoder",
            )

    def _check(self, offset: int, length: int, kind: ExtentKind) -> None:
        h = self._header
        # The common case in one expression (a batch checks every extent): exactly what
        # check_extent accepts; anything else takes the full path, which names the fault.
        if (
            type(offset) is int
            and type(length) is int
            and not self._ended
            and self._count < h.extent_count
            and not offset % SECTOR
            and offset >= self._prev_end
            and 0 < length <= (MAX_DATA_EXTENT_BYTES if kind == DATA else MAX_NODATA_EXTENT_BYTES)
            and offset + length <= h.disk_size
            and self._data_seen + length <= h.data_bytes
        ):
            return
        self._check_open()
        for value, name, at in ((offset, "offset", 0), (length, "length", R_LENGTH)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BadField(
                    f"extent {name} is {value!r}, must be a non-negative integer",
                    field=f"extent.{name}",
                    position=self._position + at,
                )
        if self._count >= h.extent_count:
            raise BadField(
                f"extent at disk offset {offset}: the header announced only {h.extent_count} "
                "extents",
                field="header.extent_count",
                position=H_EXTENT_COUNT,
            )
        check_extent(
            offset,
            length,
            kind,
            prev_end=self._prev_end,
            header=h,
            data_seen=self._data_seen,
            max_extent_bytes=MAX_DATA_EXTENT_BYTES,
            position=self._position,
        )

    def _record(
        self, offset: int, length: int, kind: ExtentKind, stored_len: int, xxh: int
    ) -> bytes:
        sealed = RECORD_SEALED.pack(offset, length, kind << 24, stored_len, xxh)
        record = sealed + RECORD_XXH.pack(_xxh3(sealed) & 0xFFFFFFFF)
        self._chain.update(record)
        self._count += 1
        self._data_seen += length
        self._prev_end = offset + length
        self._position += _RECORD_LEN
        return record


ExtentLike = (
    Extent | tuple[int, int, ExtentKind | int] | tuple[int, int, ExtentKind | int, bytes | None]
)
"""An :class:`Extent`, or ``(offset, length, kind)`` / ``(offset, length, kind, data)``."""


def encode_batch(
    header: BatchHeader, extents: Iterable[ExtentLike], *, level: int = 1
) -> Iterator[bytes]:
    """Yield the encoded batch: header, one chunk per extent, trailer.

    A convenience for tests and tools; it checks each extent as :class:`BatchEncoder` does,
    plus that a DATA extent's ``length`` matches its data and its non-zero ``checksum`` matches.
    """
    enc = BatchEncoder(header, level)
    yield enc.header_bytes()
    for ext in extents:
        checksum: int | None = None
        raw_kind: ExtentKind | int
        if isinstance(ext, Extent):
            offset, length, raw_kind, data = ext.offset, ext.length, ext.kind, ext.data
            checksum = ext.checksum or None
        elif len(ext) == 3:
            offset, length, raw_kind = ext
            data = None
        else:
            offset, length, raw_kind, data = ext
        try:
            kind = ExtentKind(raw_kind)
        except ValueError:
            raise BadField(
                f"extent at disk offset {offset}: kind is {raw_kind!r}, must be DATA, ZERO or TRIM",
                field="extent.kind",
                position=enc.position,
            ) from None
        if kind is ExtentKind.DATA:
            if data is None or len(data) != length:
                raise BadField(
                    f"DATA extent at disk offset {offset}: length is {length} but it carries "
                    f"{'no data' if data is None else f'{len(data)} bytes'}",
                    field="extent.length",
                    position=enc.position + R_LENGTH,
                )
            yield enc.data(offset, data, checksum=checksum)
        else:
            if data is not None:
                raise BadField(
                    f"{kind.name} extent at disk offset {offset} carries data; it must not",
                    field="extent.data",
                    position=enc.position,
                )
            yield enc.zero(offset, length) if kind is ExtentKind.ZERO else enc.trim(offset, length)
    yield enc.end()
