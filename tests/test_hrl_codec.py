"""Unit tests of the HRL batch codec against docs/protocol/batch.md.

Hostile inputs are built by hand with :func:`raw_header`, :func:`raw_record` and
:func:`raw_trailer`, which follow the spec's tables independently of the implementation and
seal checksums unless told not to, so each test reaches the check it is about.
"""

from __future__ import annotations

import struct
import tracemalloc
import uuid
from typing import Any

import pytest
import xxhash
import zstandard

from common.errors import ReplikantError
from common.hrl import (
    BATCH_CONTENT_TYPE,
    NEED_DATA,
    BadField,
    BadMagic,
    BatchDecoder,
    BatchEncoder,
    BatchEnd,
    BatchFormatError,
    BatchHeader,
    Compression,
    Consistency,
    DecodeLimits,
    Extent,
    ExtentChecksumMismatch,
    ExtentKind,
    ExtentLike,
    HeaderChecksumMismatch,
    LimitExceeded,
    TrailerMismatch,
    TrailingData,
    Truncated,
    UnsupportedVersion,
    decode_batch,
    encode_batch,
    xxh64_of,
    zstd_compress_bound,
)

# -- a spec-following builder of raw batches ----------------------------------------------------

MAGIC = b"RKHRL\r\n\x1a"
TRAILER_MAGIC = b"RKHRLEND"
VM = uuid.UUID("6f1c1d2e-8a59-4d6b-9a51-0d7e6f3b2c11")
_HEADER = struct.Struct(">8sHH16sQQQQQIBBHIQQQB")
_RECORD = struct.Struct(">QIB3sIQ")
_TRAILER = struct.Struct(">8sIIQQ")


def xxh(data: bytes) -> int:
    """XXH3-64, seed 0, as the spec defines it."""
    return xxhash.xxh3_64_intdigest(data)


def raw_header(**over: Any) -> bytes:
    """Return header bytes with the spec's fields, overridden by ``over``; checksum sealed."""
    f: dict[str, Any] = {
        "magic": MAGIC,
        "version": 2,
        "vm_uuid": VM.bytes,
        "generation": 3,
        "seq": 7,
        "base_seq": 6,
        "cut_time_ns": 1_700_000_000_000_000_000,
        "disk_size": 1 << 30,
        "block_size": 65536,
        "consistency": 0,
        "compression": 0,
        "flags": 0,
        "extent_count": 1,
        "data_bytes": 4096,
        "cut_id": 41,
        "first_change_cut": 40,
        "disk_id": b"sda",
    }
    f.update(over)
    disk_id: bytes = f["disk_id"]
    header_len = f.get("header_len", 113 + len(disk_id))
    disk_id_len = f.get("disk_id_len", len(disk_id))
    sealed: bytes = (
        _HEADER.pack(
            f["magic"],
            f["version"],
            header_len,
            f["vm_uuid"],
            f["generation"],
            f["seq"],
            f["base_seq"],
            f["cut_time_ns"],
            f["disk_size"],
            f["block_size"],
            f["consistency"],
            f["compression"],
            f["flags"],
            f["extent_count"],
            f["data_bytes"],
            f["cut_id"],
            f["first_change_cut"],
            disk_id_len,
        )
        + disk_id
    )
    return sealed + struct.pack(">Q", f.get("header_xxh", xxh(sealed)))


def raw_record(
    offset: int,
    length: int,
    kind: int = 0,
    payload: bytes = b"",
    *,
    data: bytes | None = None,
    reserved: bytes = bytes(3),
    stored_len: int | None = None,
    data_xxh: int | None = None,
    record_xxh: int | None = None,
) -> bytes:
    """Return one extent record (32-byte header + payload); ``data`` is the uncompressed bytes."""
    if data is None and kind == 0:
        data = payload
    sealed = _RECORD.pack(
        offset,
        length,
        kind,
        reserved,
        len(payload) if stored_len is None else stored_len,
        (xxh(data) if data is not None else 0) if data_xxh is None else data_xxh,
    )
    rx = xxh(sealed) & 0xFFFFFFFF if record_xxh is None else record_xxh
    return sealed + struct.pack(">I", rx) + payload


def raw_trailer(records: list[bytes], total: int, **over: Any) -> bytes:
    """Return the trailer for ``records`` (each a :func:`raw_record` result)."""
    chain = xxhash.xxh3_64()
    for r in records:
        chain.update(r[:32])
    return _TRAILER.pack(
        over.get("magic", TRAILER_MAGIC),
        over.get("extent_count", len(records)),
        over.get("reserved", 0),
        over.get("data_bytes", total),
        over.get("chain_xxh", chain.intdigest()),
    )


def raw_batch(records: list[bytes], header: dict[str, Any] | None = None, **trailer: Any) -> bytes:
    """Return header + records + trailer, with extent_count and data_bytes filled in."""
    total = sum(struct.unpack_from(">I", r, 8)[0] for r in records)
    h = {"extent_count": len(records), "data_bytes": total, **(header or {})}
    return raw_header(**h) + b"".join(records) + raw_trailer(records, total, **trailer)


def make_header(**over: Any) -> BatchHeader:
    """Return a valid :class:`BatchHeader`, overridden by ``over``."""
    f: dict[str, Any] = {
        "vm_uuid": VM,
        "disk_id": "sda",
        "generation": 3,
        "seq": 7,
        "base_seq": 6,
        "cut_time_ns": 1_700_000_000_000_000_000,
        "disk_size": 1 << 30,
        "block_size": 65536,
        "consistency": Consistency.CRASH,
        "compression": Compression.NONE,
        "full": False,
        "extent_count": 1,
        "data_bytes": 4096,
        "cut_id": 41,
        "first_change_cut": 40,
    }
    f.update(over)
    return BatchHeader(**f)


def refusal(data: bytes, limits: DecodeLimits | None = None) -> BatchFormatError:
    """Decode ``data`` and return the refusal (failing the test if there is none)."""
    with pytest.raises(BatchFormatError) as info:
        decode_batch(data, limits or DecodeLimits())
    return info.value


BLOCK = bytes(range(256)) * 16  # 4096 bytes


# -- the happy path -----------------------------------------------------------------------------


def test_content_type_and_checksum_function() -> None:
    """The constants others depend on have the values the spec and the HTTP docs give."""
    assert BATCH_CONTENT_TYPE == "application/x-replikant-batch"
    assert xxh64_of(b"abc") == xxhash.xxh3_64_intdigest(b"abc")
    assert zstd_compress_bound(0) == 64
    assert zstd_compress_bound(8 << 20) == (8 << 20) + (8 << 12)


def test_hand_built_batch_decodes_to_the_spec_values() -> None:
    """A batch built from the spec's tables decodes field for field."""
    records = [
        raw_record(0, 4096, 0, BLOCK),
        raw_record(4096, 1 << 20, 1),
        raw_record(8 << 20, 512, 2),
    ]
    header, extents, end = decode_batch(
        raw_batch(records, {"consistency": 1, "flags": 1, "disk_id": b"disk-0.a_b"})
    )
    assert header == make_header(
        disk_id="disk-0.a_b",
        consistency=Consistency.APP,
        full=True,
        extent_count=3,
        data_bytes=4096 + (1 << 20) + 512,
    )
    assert extents == [
        Extent(0, 4096, ExtentKind.DATA, BLOCK, xxh(BLOCK)),
        Extent(4096, 1 << 20, ExtentKind.ZERO),
        Extent(8 << 20, 512, ExtentKind.TRIM),
    ]
    assert end.extent_count == 3
    assert end.data_bytes == 4096 + (1 << 20) + 512


@pytest.mark.parametrize("compression", list(Compression))
def test_encoder_output_matches_the_hand_built_layout(compression: Compression) -> None:
    """The encoder writes the spec's layout: uncompressed, it is byte-identical to the builder."""
    header = make_header(compression=compression, extent_count=2, data_bytes=4096 + 512)
    blob = b"".join(encode_batch(header, [(0, 4096, ExtentKind.DATA, BLOCK), (8192, 512, 2)]))
    if compression is Compression.NONE:
        records = [raw_record(0, 4096, 0, BLOCK), raw_record(8192, 512, 2)]
        assert blob == raw_batch(records)
    assert decode_batch(blob)[1][0].data == BLOCK


def test_empty_batch_round_trips() -> None:
    """A cut with no changes is a header and a trailer."""
    header = make_header(extent_count=0, data_bytes=0)
    blob = b"".join(encode_batch(header, []))
    assert len(blob) == 113 + 3 + 32
    assert decode_batch(blob) == (header, [], BatchEnd(0, 0, xxhash.xxh3_64().intdigest()))


def test_extents_may_touch_and_reach_the_end_of_the_disk() -> None:
    """Consecutive extents may share a boundary, and the last may end exactly at disk_size."""
    disk = 3 * 4096 + 100
    exts: list[ExtentLike] = [
        (0, 4096, 0, BLOCK),
        (4096, 8192, 1),
        (3 * 4096, 100, 0, BLOCK[:100]),
    ]
    header = make_header(disk_size=disk, extent_count=3, data_bytes=disk)
    assert len(decode_batch(b"".join(encode_batch(header, exts)))[1]) == 3


def test_zstd_frame_without_content_size_is_accepted() -> None:
    """A frame from a streaming compressor (no content size in its header) still decodes."""
    cobj = zstandard.ZstdCompressor(level=3).compressobj()
    frame = cobj.compress(BLOCK) + cobj.flush()
    assert zstandard.get_frame_parameters(frame).content_size == zstandard.CONTENTSIZE_UNKNOWN
    blob = raw_batch([raw_record(0, 4096, 0, frame, data=BLOCK)], {"compression": 1})
    assert decode_batch(blob)[1][0].data == BLOCK


# -- decoder behaviour --------------------------------------------------------------------------


def drain(dec: BatchDecoder) -> list[object]:
    """Return every event the decoder has ready."""
    events: list[object] = []
    while (ev := dec.next_event()) is not NEED_DATA:
        events.append(ev)
    return events


def test_batch_end_waits_for_end_of_stream() -> None:
    """BatchEnd comes only after the end of stream, so it always means 'complete and valid'."""
    blob = raw_batch([raw_record(0, 4096, 0, BLOCK)])
    dec = BatchDecoder()
    dec.receive_data(blob)
    events = drain(dec)
    assert [type(e) for e in events] == [BatchHeader, Extent]
    done_before_eof = dec.done
    assert not done_before_eof
    dec.receive_data(b"")
    assert [type(e) for e in drain(dec)] == [BatchEnd]
    assert dec.done
    assert dec.next_event() is NEED_DATA
    assert dec.position == len(blob)
    dec.receive_data(b"")  # a second end of stream is harmless
    with pytest.raises(RuntimeError):
        dec.receive_data(b"x")


def test_byte_at_a_time_feeding_gives_the_same_events() -> None:
    """The decoder is indifferent to how the stream is chunked, down to single bytes."""
    blob = raw_batch([raw_record(0, 4096, 0, BLOCK), raw_record(4096, 4096, 1)])
    dec = BatchDecoder()
    events: list[object] = []
    for i in range(len(blob)):
        dec.receive_data(blob[i : i + 1])
        events += drain(dec)
        assert dec.buffered <= 4096
    dec.receive_data(b"")
    events += drain(dec)
    assert events[:3] == [*decode_batch(blob)[:1], *decode_batch(blob)[1]]
    assert isinstance(events[3], BatchEnd)


def test_errors_are_sticky_and_the_buffer_is_dropped() -> None:
    """After a refusal the decoder keeps refusing with the same error and holds no bytes."""
    dec = BatchDecoder()
    dec.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(BadMagic) as first:
        dec.next_event()
    dec.receive_data(b"more")
    with pytest.raises(BadMagic) as second:
        dec.next_event()
    assert first.value is second.value
    assert dec.buffered == 0


def test_errors_are_replikant_errors_that_name_field_position_and_fix() -> None:
    """Refusals print as one operator-readable line naming the field, value, byte and fix."""
    err = refusal(raw_batch([raw_record(0, 4096, 0, BLOCK)], {"block_size": 3000}))
    assert isinstance(err, ReplikantError)
    assert err.field == "header.block_size"
    assert err.position == 68
    assert "block_size is 3000" in str(err)
    assert "header.block_size at byte 68" in str(err)
    assert err.fix


# -- one test per refusal -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix", [b"G", b"GET / HT", b"RKHRL\n\x1a", b"RKHRL\r\n\x1b", b"\x00" * 200]
)
def test_bad_magic_is_refused_from_the_first_wrong_byte(prefix: bytes) -> None:
    """A stream that is not a batch is refused as soon as a magic byte is wrong."""
    dec = BatchDecoder()
    dec.receive_data(prefix)
    with pytest.raises(BadMagic) as info:
        dec.next_event()
    assert (info.value.field, info.value.position) == ("header.magic", 0)


def test_missing_trailer_magic_is_refused() -> None:
    """After extent_count records the trailer must follow; anything else is a bad magic."""
    records = [raw_record(0, 4096, 1), raw_record(4096, 4096, 1)]
    blob = raw_header(extent_count=1, data_bytes=4096) + b"".join(records) + bytes(32)
    err = refusal(blob)
    assert isinstance(err, BadMagic)
    assert (err.field, err.position) == ("trailer.magic", 113 + 3 + 32)


@pytest.mark.parametrize("version", [1, 3])
def test_unsupported_version(version: int) -> None:
    """A version other than 2 (version 1 had no cut id) is refused, naming the version."""
    err = refusal(raw_batch([raw_record(0, 4096, 1)], {"version": version}))
    assert isinstance(err, UnsupportedVersion)
    assert (err.field, err.position) == ("header.version", 8)
    assert f"version is {version}" in str(err)


def test_cut_fields_sit_where_version_1_had_reserved_bytes() -> None:
    """cut_id and first_change_cut are the u64s at header offsets 88 and 96."""
    blob = b"".join(
        encode_batch(
            make_header(cut_id=0x0102, first_change_cut=0x0101, extent_count=0, data_bytes=0), []
        )
    )
    assert struct.unpack_from(">QQ", blob, 88) == (0x0102, 0x0101)
    header = decode_batch(blob)[0]
    assert (header.cut_id, header.first_change_cut) == (0x0102, 0x0101)


def test_a_header_without_a_cut_defaults_to_no_cut_and_no_statement() -> None:
    """A BatchHeader built without the cut fields encodes cut_id 0 and first_change_cut 0."""
    header = BatchHeader(
        vm_uuid=VM,
        disk_id="sda",
        generation=1,
        seq=1,
        base_seq=0,
        cut_time_ns=1,
        disk_size=1 << 20,
        block_size=65536,
        consistency=Consistency.CRASH,
        compression=Compression.NONE,
        full=False,
        extent_count=0,
        data_bytes=0,
    )
    blob = b"".join(encode_batch(header, []))
    assert struct.unpack_from(">QQ", blob, 88) == (0, 0)
    assert decode_batch(blob)[0] == header


def test_header_checksum_mismatch() -> None:
    """A header byte changed after sealing is caught by the header checksum."""
    blob = bytearray(raw_batch([raw_record(0, 4096, 1)]))
    blob[30] ^= 0x10  # inside generation
    err = refusal(bytes(blob))
    assert isinstance(err, HeaderChecksumMismatch)
    assert (err.field, err.position) == ("header.header_xxh", 108)


_HEADER_BAD_FIELDS: list[tuple[dict[str, Any], str, int]] = [
    ({"header_len": 113}, "header.header_len", 10),
    ({"header_len": 113 + 65, "disk_id": b"a" * 65}, "header.header_len", 10),
    ({"header_len": 65535}, "header.header_len", 10),
    ({"disk_id_len": 4}, "header.disk_id_len", 104),
    ({"disk_id": b"-sda"}, "header.disk_id", 105),
    ({"disk_id": b"sd a"}, "header.disk_id", 105),
    ({"disk_id": "d\u00e9".encode()}, "header.disk_id", 105),
    ({"disk_id": b"sda\x00"}, "header.disk_id", 105),
    ({"vm_uuid": bytes(16)}, "header.vm_uuid", 12),
    ({"seq": 0, "base_seq": 0}, "header.seq", 36),
    ({"base_seq": 5}, "header.base_seq", 44),
    ({"block_size": 3000}, "header.block_size", 68),
    ({"block_size": 2048}, "header.block_size", 68),
    ({"block_size": 8 << 20}, "header.block_size", 68),
    ({"consistency": 2}, "header.consistency", 72),
    ({"compression": 2}, "header.compression", 73),
    ({"flags": 2}, "header.flags", 74),
    ({"flags": 0x8001}, "header.flags", 74),
    ({"cut_id": 5, "first_change_cut": 6}, "header.first_change_cut", 96),
    ({"cut_id": 0, "first_change_cut": 1}, "header.first_change_cut", 96),
    ({"disk_size": 4095, "data_bytes": 4096}, "header.data_bytes", 80),
    ({"extent_count": 4097}, "header.extent_count", 76),
]


@pytest.mark.parametrize(("over", "field", "position"), _HEADER_BAD_FIELDS)
def test_bad_header_field(over: dict[str, Any], field: str, position: int) -> None:
    """Each out-of-range header field is refused as BadField naming the field and its offset."""
    err = refusal(raw_header(**{"extent_count": 1, "data_bytes": 4096, **over}) + bytes(64))
    assert isinstance(err, BadField)
    assert (err.field, err.position) == (field, position)


def _rec(offset: int = 0, length: int = 4096, kind: int = 0, **kw: Any) -> bytes:
    payload = kw.pop("payload", BLOCK[:length] if kind == 0 and length <= 4096 else b"")
    return raw_record(offset, length, kind, payload, **kw)


R0 = 113 + 3  # stream offset of the first record with disk id "sda"
_EXTENT_BAD_FIELDS: list[tuple[list[bytes], dict[str, Any], str, int]] = [
    ([_rec(offset=100)], {}, "extent.offset", R0),
    ([_rec(4096), _rec(0)], {}, "extent.offset", R0 + 32 + 4096),
    ([_rec(0, 4096, 1), _rec(3584, 512, 1)], {}, "extent.offset", R0 + 32),
    ([_rec(length=0, kind=1)], {"data_bytes": 1}, "extent.length", R0 + 8),
    ([_rec(length=(8 << 20) + 1, payload=b"")], {}, "extent.length", R0 + 8),
    ([_rec(offset=1 << 30, length=512, kind=1)], {}, "extent.length", R0 + 8),
    ([_rec(offset=(1 << 30) - 512, length=1024, kind=2)], {}, "extent.length", R0 + 8),
    ([_rec(kind=3)], {}, "extent.kind", R0 + 12),
    ([_rec(kind=255)], {}, "extent.kind", R0 + 12),
    ([_rec(reserved=b"\x00\x00\x01")], {}, "extent.reserved", R0 + 13),
    ([_rec(kind=1, stored_len=1)], {}, "extent.stored_len", R0 + 16),
    ([_rec(kind=2, data_xxh=1)], {}, "extent.data_xxh", R0 + 20),
    ([_rec(stored_len=4095)], {}, "extent.stored_len", R0 + 16),
    ([_rec(stored_len=0xFFFFFFFF)], {}, "extent.stored_len", R0 + 16),
    ([_rec(0, 4096, 1), _rec(4096, 4096, 1)], {"data_bytes": 6000}, "header.data_bytes", R0 + 40),
]


@pytest.mark.parametrize(("records", "header", "field", "position"), _EXTENT_BAD_FIELDS)
def test_bad_extent_field(
    records: list[bytes], header: dict[str, Any], field: str, position: int
) -> None:
    """Each bad extent field is refused as BadField naming the field and its stream offset."""
    err = refusal(raw_batch(records, header))
    assert isinstance(err, BadField), err
    assert (err.field, err.position) == (field, position)


def _zstd_case(payload: bytes, data: bytes = BLOCK) -> bytes:
    return raw_batch([raw_record(0, len(data), 0, payload, data=data)], {"compression": 1})


_CCTX = zstandard.ZstdCompressor(level=1)


def _unsized_frame(data: bytes) -> bytes:
    cobj = _CCTX.compressobj()
    return cobj.compress(data) + cobj.flush()


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"\x00" * 64, "does not start with the zstd frame magic"),
        (b"\x50\x2a\x4d\x18" + bytes(60), "does not start with the zstd frame magic"),
        (b"\x28\xb5\x2f\xfd", "unreadable frame header"),
        (_CCTX.compress(BLOCK + b"x"), "declares 4097 bytes"),
        (_CCTX.compress(b""), "declares 0 bytes"),
        (_CCTX.compress(BLOCK) + b"\x00", "does not decompress"),
        (_CCTX.compress(BLOCK) + _CCTX.compress(b"x"), "does not decompress"),
        (_CCTX.compress(BLOCK)[:-3] + b"\xff\xff\xff", "does not decompress"),
        (_unsized_frame(BLOCK + b"x"), "does not decompress"),
        (_unsized_frame(BLOCK[:-1]), "decompresses to 4095 bytes"),
    ],
)
def test_bad_zstd_payload(payload: bytes, why: str) -> None:
    """A zstd payload that is not exactly one frame of exactly `length` bytes is refused."""
    err = refusal(_zstd_case(payload))
    assert isinstance(err, BadField)
    assert (err.field, err.position) == ("extent.payload", R0 + 32)
    assert why in str(err)


def test_zstd_frame_with_a_huge_window_is_refused() -> None:
    """A frame that would make zstd allocate more than an 8 MiB window is refused."""
    cobj = zstandard.ZstdCompressor(level=22).compressobj()
    frame = cobj.compress(BLOCK) + cobj.flush()  # streamed: the window is the level's, 128 MiB
    assert zstandard.get_frame_parameters(frame).window_size > 8 << 20
    err = refusal(_zstd_case(frame))
    assert isinstance(err, BadField)
    assert "window" in str(err)


def test_zstd_stored_len_beyond_the_bound_is_refused() -> None:
    """A zstd stored_len over ZSTD_COMPRESSBOUND(length) is refused before it is awaited."""
    records = [_rec(length=512, payload=b"", stored_len=zstd_compress_bound(512) + 1)]
    err = refusal(raw_batch(records, {"compression": 1}))
    assert isinstance(err, BadField)
    assert (err.field, err.position) == ("extent.stored_len", R0 + 16)


@pytest.mark.parametrize(
    ("limits", "header", "records", "field", "position"),
    [
        (DecodeLimits(max_extents=2), {"extent_count": 3}, [], "header.extent_count", 76),
        (DecodeLimits(max_disk_id_len=2), {}, [_rec()], "header.header_len", 10),
        (DecodeLimits(max_extent_bytes=2048), {}, [_rec()], "extent.length", R0 + 8),
    ],
)
def test_limit_exceeded(
    limits: DecodeLimits,
    header: dict[str, Any],
    records: list[bytes],
    field: str,
    position: int,
) -> None:
    """Values legal for the format but over the decoder's limits are refused as LimitExceeded."""
    blob = raw_header(**{"extent_count": len(records), "data_bytes": 4096, **header})
    err = refusal(blob + b"".join(records) + bytes(32), limits)
    assert isinstance(err, LimitExceeded)
    assert (err.field, err.position) == (field, position)


def test_record_checksum_mismatch() -> None:
    """A record whose 28 bytes do not hash to its record_xxh is refused."""
    err = refusal(raw_batch([_rec(record_xxh=1)]))
    assert isinstance(err, ExtentChecksumMismatch)
    assert (err.field, err.position) == ("extent.record_xxh", R0 + 28)


@pytest.mark.parametrize("compression", [0, 1])
def test_data_checksum_mismatch(compression: int) -> None:
    """Data that does not hash to data_xxh is refused, naming the extent's disk offset."""
    payload = _CCTX.compress(BLOCK) if compression else BLOCK
    records = [_rec(kind=1), raw_record(1 << 20, 4096, 0, payload, data=BLOCK, data_xxh=xxh(b"x"))]
    err = refusal(raw_batch(records, {"compression": compression}))
    assert isinstance(err, ExtentChecksumMismatch)
    assert err.field == "extent.data_xxh"
    assert "extent at disk offset 1048576: data checksum mismatch" in str(err)


def test_every_truncation_is_refused_as_truncated() -> None:
    """Every proper prefix of a valid batch is Truncated, naming what was cut short."""
    blob = raw_batch([_rec(), _rec(4096, 4096, 1)])
    fields = set()
    for n in range(len(blob)):
        err = refusal(blob[:n])
        assert isinstance(err, Truncated), (n, err)
        assert err.position == n
        fields.add(err.field)
    assert fields == {"header", "extent", "extent.payload", "trailer"}


def test_trailing_data() -> None:
    """A byte after the trailer is refused, even before the end of stream is fed."""
    blob = raw_batch([_rec()])
    assert isinstance(refusal(blob + b"\x00"), TrailingData)
    dec = BatchDecoder()
    dec.receive_data(blob + b"x")
    with pytest.raises(TrailingData) as info:
        drain(dec)
    assert (info.value.field, info.value.position) == ("trailer", len(blob))


@pytest.mark.parametrize(
    ("over", "field", "kind"),
    [
        ({"extent_count": 2}, "trailer.extent_count", TrailerMismatch),
        ({"data_bytes": 4097}, "trailer.data_bytes", TrailerMismatch),
        ({"chain_xxh": 0}, "trailer.chain_xxh", TrailerMismatch),
        ({"reserved": 1}, "trailer.reserved", BadField),
    ],
)
def test_trailer_mismatch(over: dict[str, Any], field: str, kind: type[BatchFormatError]) -> None:
    """A trailer that disagrees with the header or the records is refused."""
    blob = raw_batch([_rec()], **over)
    err = refusal(blob)
    assert isinstance(err, kind)
    assert err.field == field
    assert R0 + 32 + 4096 <= err.position < len(blob)


def test_extents_summing_short_of_data_bytes_is_a_trailer_mismatch() -> None:
    """If the header's data_bytes exceeds what the extents add up to, the trailer says so."""
    records = [_rec()]
    blob = raw_header(data_bytes=8192) + records[0] + raw_trailer(records, 8192)
    err = refusal(blob)
    assert isinstance(err, TrailerMismatch)
    assert err.field == "trailer.data_bytes"


def _traced_refusal(blob: bytes, limits: DecodeLimits) -> tuple[BatchFormatError, int]:
    """Return the refusal of ``blob`` and the peak bytes traced while decoding it."""
    tracemalloc.start()
    try:
        err = refusal(blob, limits)
        return err, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_one_gib_extent_is_refused_without_allocating() -> None:
    """A record declaring a 1 GiB DATA extent, in a few hundred bytes, allocates nothing big."""
    gib = 1 << 30
    blob = raw_header(disk_size=4 * gib, data_bytes=gib) + raw_record(
        0, gib, 0, b"", stored_len=gib, data_xxh=0
    )
    for limits in (DecodeLimits(), DecodeLimits(max_extent_bytes=1 << 16)):
        err, peak = _traced_refusal(blob, limits)
        assert isinstance(err, BadField)
        assert err.field == "extent.length"
        assert peak < 64 << 10
    # A zstd frame that claims 1 GiB of content for a 4 KiB extent is refused before zstd is
    # asked to decompress it (python-zstandard would allocate the claimed size).
    frame = _CCTX.compress(BLOCK)
    assert frame[4] == 0x60  # single segment, 2-byte content size at [5:7], blocks from [7]
    lying = frame[:4] + b"\xa0" + gib.to_bytes(4, "little") + frame[7:]  # 4-byte size: 1 GiB
    assert zstandard.get_frame_parameters(lying).content_size == gib
    err, peak = _traced_refusal(_zstd_case(lying), DecodeLimits())
    assert isinstance(err, BadField)
    assert err.field == "extent.payload"
    assert "declares 1073741824 bytes" in str(err)
    assert peak < 64 << 10


def test_huge_header_len_is_refused_before_waiting_for_it() -> None:
    """A header_len of 65535 is refused from the first 12 bytes, without waiting for the rest."""
    dec = BatchDecoder()
    dec.receive_data(MAGIC + struct.pack(">HH", 2, 65535))
    with pytest.raises(BadField) as info:
        dec.next_event()
    assert info.value.field == "header.header_len"


# -- the encoder refuses what the decoder would ---------------------------------------------------


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"vm_uuid": uuid.UUID(int=0)}, "header.vm_uuid"),
        ({"disk_id": ""}, "header.disk_id"),
        ({"disk_id": "a" * 65}, "header.disk_id"),
        ({"disk_id": "a/b"}, "header.disk_id"),
        ({"disk_id": "d\u00e9"}, "header.disk_id"),
        ({"generation": -1}, "header.generation"),
        ({"generation": 1 << 64}, "header.generation"),
        ({"seq": 1, "base_seq": 1}, "header.base_seq"),
        ({"seq": 0, "base_seq": -1}, "header.seq"),
        ({"block_size": 4097}, "header.block_size"),
        ({"consistency": 2}, "header.consistency"),
        ({"consistency": True}, "header.consistency"),
        ({"compression": 7}, "header.compression"),
        ({"extent_count": (1 << 20) + 1, "data_bytes": 1 << 21}, "header.extent_count"),
        ({"extent_count": 5, "data_bytes": 4}, "header.extent_count"),
        ({"data_bytes": (1 << 30) + 1}, "header.data_bytes"),
        ({"cut_time_ns": 1.5}, "header.cut_time_ns"),
        ({"cut_id": -1}, "header.cut_id"),
        ({"cut_id": 1 << 64}, "header.cut_id"),
        ({"first_change_cut": 42}, "header.first_change_cut"),
    ],
)
def test_encoder_refuses_a_bad_header(over: dict[str, Any], field: str) -> None:
    """BatchEncoder validates its header with the decoder's rules."""
    with pytest.raises(BatchFormatError) as info:
        BatchEncoder(make_header(**over))
    assert info.value.field == field


def test_encoder_takes_plain_ints_for_enums() -> None:
    """A header built with ints for consistency and compression encodes as the enums would."""
    plain = make_header(consistency=1, compression=1)
    typed = make_header(consistency=Consistency.APP, compression=Compression.ZSTD)
    ext = [(0, 4096, 0, BLOCK)]
    blob = b"".join(encode_batch(plain, ext))
    assert blob == b"".join(encode_batch(typed, ext))
    assert decode_batch(blob)[0] == typed


def test_encoder_refuses_bad_extents_and_miscounts() -> None:
    """The encoder refuses misordered, misaligned, oversized, surplus and missing extents."""
    enc = BatchEncoder(make_header(extent_count=2, data_bytes=8192))
    enc.header_bytes()
    with pytest.raises(BadField, match="not a multiple of 512"):
        enc.zero(100, 4096)
    with pytest.raises(BadField, match="more than the format's"):
        enc.data(0, bytes((8 << 20) + 1))
    enc.data(4096, BLOCK)
    with pytest.raises(BadField, match="before the previous extent's end"):
        enc.trim(0, 4096)
    with pytest.raises(TrailerMismatch):
        enc.end()
    with pytest.raises(BadField, match="more than the header's data_bytes"):
        enc.zero(8192, 8192)
    enc.zero(8192, 4096)
    with pytest.raises(BadField, match="announced only 2 extents"):
        enc.zero(1 << 20, 512)
    enc.end()
    with pytest.raises(TrailingData):
        enc.zero(1 << 20, 512)


def test_encoder_checks_a_given_checksum_and_accepts_views() -> None:
    """data() checks the caller's checksum, and takes memoryviews of any format."""
    enc = BatchEncoder(make_header(extent_count=2, data_bytes=8192))
    with pytest.raises(ExtentChecksumMismatch):
        enc.data(0, BLOCK, checksum=xxh(BLOCK) ^ 1)
    words = memoryview(bytearray(BLOCK)).cast("I")
    parts = [enc.header_bytes(), enc.data(0, words, checksum=xxh(BLOCK))]
    parts += [enc.data(4096, memoryview(BLOCK)), enc.end()]
    assert [e.data for e in decode_batch(b"".join(parts))[1]] == [BLOCK, BLOCK]


def test_encode_batch_checks_extent_objects() -> None:
    """encode_batch refuses an Extent whose length, data or checksum disagree."""
    header = make_header()
    cases: list[tuple[object, type[BatchFormatError]]] = [
        (Extent(0, 4096, ExtentKind.DATA, BLOCK[:100]), BadField),
        (Extent(0, 4096, ExtentKind.DATA), BadField),
        (Extent(0, 4096, ExtentKind.ZERO, BLOCK), BadField),
        (Extent(0, 4096, ExtentKind.DATA, BLOCK, 12345), ExtentChecksumMismatch),
        ((0, 4096, 9), BadField),
    ]
    for ext, err in cases:
        with pytest.raises(err):
            b"".join(encode_batch(header, [ext]))  # type: ignore[list-item]
    good = Extent(0, 4096, ExtentKind.DATA, BLOCK, xxh(BLOCK))
    assert decode_batch(b"".join(encode_batch(header, [good])))[1] == [good]


def test_decode_limits_are_validated() -> None:
    """Limits outside what the format can express are refused at construction."""
    for kwargs in ({"max_extent_bytes": 0}, {"max_extent_bytes": (8 << 20) + 1}):
        with pytest.raises(ValueError, match="max_extent_bytes"):
            DecodeLimits(**kwargs)
    with pytest.raises(ValueError, match="max_disk_id_len"):
        DecodeLimits(max_disk_id_len=65)
    with pytest.raises(ValueError, match="max_extents"):
        DecodeLimits(max_extents=-1)
