"""The HRL batch format: a sans-I/O decoder, a streaming encoder, and their shared rules.

A batch is one crash-consistent (or application-consistent) cut of one disk. The contract is
``docs/protocol/batch.md``. Typical use on the broker::

    decoder = BatchDecoder()
    async for chunk in body:
        decoder.receive_data(chunk)
        while (event := decoder.next_event()) is not NEED_DATA:
            handle(event)
    decoder.receive_data(b"")  # end of stream: the BatchEnd event comes only after this
    while (event := decoder.next_event()) is not NEED_DATA:
        handle(event)
    assert decoder.done

and on the agent::

    encoder = BatchEncoder(header)
    send(encoder.header_bytes())
    for offset, block in frozen_blocks:
        send(encoder.data(offset, block))
    send(encoder.end())
"""

from __future__ import annotations

from common.hrl.decoder import NEED_DATA, BatchDecoder, Event, NeedData
from common.hrl.encoder import BatchEncoder, ExtentLike, encode_batch
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
    BATCH_CONTENT_TYPE,
    DEFAULT_LIMITS,
    MAX_DATA_EXTENT_BYTES,
    SECTOR,
    BatchEnd,
    BatchHeader,
    Compression,
    Consistency,
    DecodeLimits,
    Extent,
    ExtentKind,
    xxh64_of,
    zstd_compress_bound,
)

__all__ = [
    "BATCH_CONTENT_TYPE",
    "DEFAULT_LIMITS",
    "MAX_DATA_EXTENT_BYTES",
    "NEED_DATA",
    "SECTOR",
    "BadField",
    "BadMagic",
    "BatchDecoder",
    "BatchEncoder",
    "BatchEnd",
    "BatchFormatError",
    "BatchHeader",
    "Compression",
    "Consistency",
    "DecodeLimits",
    "Event",
    "Extent",
    "ExtentChecksumMismatch",
    "ExtentKind",
    "ExtentLike",
    "HeaderChecksumMismatch",
    "LimitExceeded",
    "NeedData",
    "TrailerMismatch",
    "TrailingData",
    "Truncated",
    "UnsupportedVersion",
    "decode_batch",
    "encode_batch",
    "xxh64_of",
    "zstd_compress_bound",
]


def decode_batch(
    data: bytes | bytearray | memoryview, limits: DecodeLimits = DEFAULT_LIMITS
) -> tuple[BatchHeader, list[Extent], BatchEnd]:
    """Decode a whole batch held in memory (for tests and tools; the broker streams).

    Raises a :class:`BatchFormatError` subclass if ``data`` is not exactly one valid batch.
    """
    decoder = BatchDecoder(limits)
    decoder.receive_data(data)
    decoder.receive_data(b"")
    return _collect(decoder)


def _collect(decoder: BatchDecoder) -> tuple[BatchHeader, list[Extent], BatchEnd]:
    extents: list[Extent] = []
    header: BatchHeader | None = None
    while True:
        event = decoder.next_event()
        if isinstance(event, Extent):
            extents.append(event)
        elif isinstance(event, BatchHeader):
            header = event
        elif isinstance(event, BatchEnd):
            assert header is not None
            return header, extents, event
        else:
            # With the end of stream fed, the decoder either finishes or refuses.
            raise AssertionError("BatchDecoder wants data after the end of stream")
