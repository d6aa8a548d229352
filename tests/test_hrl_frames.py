"""The decoder decompresses the zstd payloads it holds together (common/hrl/frames.py), and
that changes nothing it accepts or refuses, wherever in a run the bad payload sits."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import zstandard

import common.hrl.decoder as decoder_module
from common.hrl import BadField, BatchFormatError, DecodeLimits, ExtentKind, decode_batch
from tests.test_hrl_codec import BLOCK, R0, _unsized_frame, raw_batch, raw_record, refusal

_CCTX = zstandard.ZstdCompressor(level=1)
_CHECKSUMMED = zstandard.ZstdCompressor(level=1, write_checksum=True)


def _page(rng: random.Random) -> bytes:
    return rng.randbytes(2048) + bytes(2048)


def _run(payloads: Sequence[bytes | None], datas: Sequence[bytes]) -> bytes:
    """A compressed batch of 4 KiB extents, one per item: ``None`` makes a ZERO extent."""
    records = []
    for i, (payload, data) in enumerate(zip(payloads, datas, strict=True)):
        if payload is None:
            records.append(raw_record(i * 4096, 4096, 1))
        else:
            records.append(raw_record(i * 4096, 4096, 0, payload, data=data))
    return raw_batch(records, {"compression": 1})


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many frames each call into zstd's many-frames path took (the real call still runs)."""
    seen: list[int] = []
    real = decoder_module.decompress_frames

    def spy(
        dctx: zstandard.ZstdDecompressor, frames: Sequence[memoryview], lengths: Sequence[int]
    ) -> list[bytes] | None:
        seen.append(len(frames))
        return real(dctx, frames, lengths)

    monkeypatch.setattr(decoder_module, "decompress_frames", spy)
    return seen


def test_payloads_held_together_are_decompressed_in_one_call(calls: list[int]) -> None:
    """A batch fed whole is decompressed in as few calls as the look-ahead's bounds allow, and
    its extents are the bytes that went in (ZERO extents between them included)."""
    rng = random.Random(7)
    datas = [_page(rng) for _ in range(300)]
    payloads: list[bytes | None] = [
        None if i % 50 == 49 else (_CHECKSUMMED if i % 3 else _CCTX).compress(d)
        for i, d in enumerate(datas)
    ]
    _h, extents, _end = decode_batch(_run(payloads, datas))
    assert [e.data for e in extents if e.kind is ExtentKind.DATA] == [
        d for d, p in zip(datas, payloads, strict=True) if p is not None
    ]
    assert [e.kind for e in extents].count(ExtentKind.ZERO) == 6
    assert sum(calls) == 294, calls
    assert len(calls) == 2, calls  # 256 frames at most per call


def test_a_stream_fed_in_pieces_takes_what_each_piece_holds(calls: list[int]) -> None:
    """Fed in 64 KiB pieces (as the broker's ingest does), each run is what the buffer holds."""
    rng = random.Random(8)
    datas = [_page(rng) for _ in range(100)]
    blob = _run([_CCTX.compress(d) for d in datas], datas)
    dec = decoder_module.BatchDecoder()
    got = []
    for at in range(0, len(blob), 65536):
        dec.receive_data(blob[at : at + 65536])
        while (event := dec.next_event()) is not decoder_module.NEED_DATA:
            got.append(event)
    dec.receive_data(b"")
    got.append(dec.next_event())
    assert [e.data for e in got[1:-1]] == datas  # type: ignore[union-attr]
    assert 1 < len(calls) < 100, calls
    assert all(n > 1 for n in calls), calls


_BAD = [
    (b"\x00" * 64, "does not start with the zstd frame magic"),
    (_CCTX.compress(BLOCK + b"x"), "declares 4097 bytes"),
    (_CCTX.compress(BLOCK) + b"\x00", "does not decompress"),
    (_CCTX.compress(BLOCK) + _CCTX.compress(b"x"), "does not decompress"),
    (_CCTX.compress(BLOCK)[:-3] + b"\xff\xff\xff", "does not decompress"),
    (_unsized_frame(BLOCK + b"x"), "does not decompress"),
    (_unsized_frame(BLOCK[:-1]), "decompresses to 4095 bytes"),
]


@pytest.mark.parametrize("where", [0, 3, 9])
@pytest.mark.parametrize(("payload", "why"), _BAD)
def test_a_bad_payload_in_a_run_is_refused_as_alone(payload: bytes, why: str, where: int) -> None:
    """A bad payload first, inside or last in a run of good ones is refused with the message,
    field and position it gets when it is the batch's only extent."""
    datas = [BLOCK] * 10
    payloads = [_CCTX.compress(BLOCK)] * 10
    payloads[where] = payload
    blob = _run(payloads, datas)
    err = refusal(blob)
    assert isinstance(err, BadField)
    position = R0 + sum(32 + len(p) for p in payloads[:where]) + 32
    assert (err.field, err.position) == ("extent.payload", position)
    assert why in str(err)


def test_a_frame_its_record_refuses_is_never_returned() -> None:
    """A later record whose own fields are bad is refused in its turn, though its frame was
    decompressed ahead with the ones before it."""
    rng = random.Random(9)
    datas = [_page(rng) for _ in range(5)]
    records = [
        raw_record(i * 4096, 4096, 0, _CCTX.compress(d), data=d) for i, d in enumerate(datas)
    ]
    records[3] = raw_record(3 * 4096, 4096, 0, _CCTX.compress(datas[3]), data=datas[3], data_xxh=1)
    err = refusal(raw_batch(records, {"compression": 1}))
    assert err.field == "extent.data_xxh"
    with pytest.raises(BatchFormatError):
        decode_batch(raw_batch(records, {"compression": 1}), DecodeLimits(max_extent_bytes=2048))


def test_frames_past_the_announced_records_are_never_decompressed(calls: list[int]) -> None:
    """A stream with more records than its header announces is refused at the trailer, and
    the look-ahead never decompressed the records past the announced ones."""
    rng = random.Random(10)
    datas = [_page(rng) for _ in range(5)]
    records = [
        raw_record(i * 4096, 4096, 0, _CCTX.compress(d), data=d) for i, d in enumerate(datas)
    ]
    err = refusal(raw_batch(records, {"compression": 1, "extent_count": 2, "data_bytes": 8192}))
    assert err.field == "trailer.magic"
    assert sum(calls) == 2, calls
