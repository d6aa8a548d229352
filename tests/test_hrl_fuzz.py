"""Property and fuzz tests of the HRL batch codec.

Two claims: anything the encoder writes decodes back to what went in, however the stream is
chunked; and any corruption of a batch (bit flips, replaced, inserted or deleted bytes,
truncation, garbage, fields set to lying values with their checksums resealed) is refused with
a :class:`BatchFormatError` — never another exception, never a hang, and never more memory than
the limits allow.
"""

from __future__ import annotations

import os
import random
import struct
import time
import tracemalloc
import uuid
from collections.abc import Callable

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.hrl import (
    NEED_DATA,
    BatchDecoder,
    BatchEnd,
    BatchFormatError,
    BatchHeader,
    Compression,
    Consistency,
    DecodeLimits,
    Extent,
    ExtentKind,
    encode_batch,
    xxh64_of,
)

SMALL = 64 << 10
LIMITS = DecodeLimits(max_extent_bytes=SMALL, max_extents=64)
# What a decoder may hold beyond the caller's input: a stored payload (at most the zstd bound of
# SMALL) and its decoded copy, plus one fed chunk and bookkeeping.
MEMORY_BOUND = 2 * SMALL + 48 * 1024
MAX_CHUNK = 16 << 10


# -- the round trip -----------------------------------------------------------------------------

_payloads = st.one_of(
    st.binary(min_size=1, max_size=3000),
    st.builds(
        lambda b, n: (b * n)[:SMALL], st.binary(min_size=1, max_size=16), st.integers(1, 4096)
    ),
    st.integers(1, SMALL).map(bytes),
)


@st.composite
def _batches(draw: st.DrawFn) -> tuple[BatchHeader, list[Extent]]:
    extents: list[Extent] = []
    end = 0
    for _ in range(draw(st.integers(0, 10))):
        offset = -(-end // 512) * 512 + 512 * draw(st.integers(0, 3))
        kind = draw(st.sampled_from(ExtentKind))
        if kind is ExtentKind.DATA:
            data = draw(_payloads)
            extents.append(Extent(offset, len(data), kind, data, xxh64_of(data)))
        else:
            extents.append(Extent(offset, draw(st.integers(1, (1 << 32) - 1)), kind))
        end = extents[-1].end
    seq = draw(st.integers(1, (1 << 64) - 1))
    cut_id = draw(st.integers(0, (1 << 64) - 1))
    header = BatchHeader(
        vm_uuid=draw(st.uuids().filter(lambda u: u.int != 0)),
        disk_id=draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)),
        generation=draw(st.integers(0, (1 << 64) - 1)),
        seq=seq,
        base_seq=seq - 1,
        cut_time_ns=draw(st.integers(0, (1 << 64) - 1)),
        disk_size=end + draw(st.integers(0, 1 << 40)),
        block_size=1 << draw(st.integers(12, 22)),
        consistency=draw(st.sampled_from(Consistency)),
        compression=draw(st.sampled_from(Compression)),
        full=draw(st.booleans()),
        extent_count=len(extents),
        data_bytes=sum(e.length for e in extents),
        cut_id=cut_id,
        first_change_cut=draw(st.integers(0, cut_id)),
    )
    return header, extents


def feed(
    blob: bytes, limits: DecodeLimits, chunk: Callable[[], int] | int, *, keep: bool = True
) -> tuple[list[object], BatchFormatError | None]:
    """Feed ``blob`` in chunks of ``chunk()`` (or ``chunk``) bytes; return events and refusal.

    With ``keep`` false the events are dropped as they come (so that only the decoder's own
    memory is measured). Fails the test on any other exception or on a decoder that does not
    make progress.
    """
    dec = BatchDecoder(limits)
    events: list[object] = []
    view = memoryview(blob)
    steps = 0
    try:
        at = 0
        while at < len(blob):
            n = chunk if isinstance(chunk, int) else chunk()
            dec.receive_data(view[at : at + n])
            at += n
            while (ev := dec.next_event()) is not NEED_DATA:
                if keep:
                    events.append(ev)
                steps += 1
                assert steps <= len(blob), "decoder makes no progress"
        dec.receive_data(b"")
        while (ev := dec.next_event()) is not NEED_DATA:
            if keep:
                events.append(ev)
            steps += 1
            assert steps <= len(blob) + 2, "decoder makes no progress"
    except BatchFormatError as e:
        return events, e
    assert dec.done
    return events, None


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=_batches(), rnd=st.randoms(use_true_random=False), level=st.sampled_from([1, 3]))
def test_round_trip_in_any_chunking(
    batch: tuple[BatchHeader, list[Extent]], rnd: random.Random, level: int
) -> None:
    """encode -> decode returns the header and extents, for any chunking of the stream."""
    header, extents = batch
    blob = b"".join(encode_batch(header, extents, level=level))
    events, error = feed(blob, LIMITS, lambda: rnd.choice([1, 7, 32, 100, 4096, 70_000]))
    assert error is None
    assert events[0] == header
    assert events[1:-1] == extents
    end = events[-1]
    assert isinstance(end, BatchEnd)
    assert (end.extent_count, end.data_bytes) == (header.extent_count, header.data_bytes)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_are_refused_cleanly(data: bytes) -> None:
    """Random bytes, with or without a valid magic in front, only ever raise BatchFormatError."""
    for blob in (data, b"RKHRL\r\n\x1a\x00\x02" + data):
        events, error = feed(blob, LIMITS, 64)
        assert error is not None
        assert events == []


# -- the mutation fuzz --------------------------------------------------------------------------

_U32_LIES = [0, 1, 511, 512, 4095, 4096, SMALL - 1, SMALL, SMALL + 1, 8 << 20, (8 << 20) + 1]
_U32_LIES += [1 << 30, (1 << 31), (1 << 32) - 1]
_U64_LIES = [*_U32_LIES, 1 << 32, 1 << 40, (1 << 63), (1 << 64) - 1]
# Header fields (offset, size) and record fields (offset, size) a lie can go into.
_HEADER_FIELDS = [(8, 2), (10, 2), (28, 8), (36, 8), (44, 8), (60, 8), (68, 4), (72, 1), (73, 1)]
_HEADER_FIELDS += [(74, 2), (76, 4), (80, 8), (88, 8), (96, 8), (104, 1)]
_RECORD_FIELDS = [(0, 8), (8, 4), (12, 1), (13, 3), (16, 4), (20, 8)]


def _base_batches() -> list[bytes]:
    """A few valid batches with DATA extents up to the limit, in both compressions."""
    rnd = random.Random(1234)
    out = []
    for compression in Compression:
        for shape in range(3):
            extents: list[tuple[int, int, ExtentKind] | tuple[int, int, ExtentKind, bytes]] = []
            offset = 0
            for i in range(2 + shape * 2):
                kind = [ExtentKind.DATA, ExtentKind.ZERO, ExtentKind.TRIM][(i + shape) % 3]
                if kind is ExtentKind.DATA:
                    n = [SMALL, rnd.randint(1, 6000), 512][(i + shape) % 3]
                    data = rnd.choice([os.urandom(n), bytes(n), (b"abc%d" % i * n)[:n]])
                    extents.append((offset, n, kind, data))
                else:
                    n = rnd.choice([512, 1 << 20, (1 << 32) - 1])
                    extents.append((offset, n, kind))
                offset = -(-(offset + n) // 512) * 512 + rnd.choice([0, 512])
            header = BatchHeader(
                vm_uuid=uuid.UUID(int=rnd.getrandbits(128) | 1),
                disk_id=f"disk{shape}",
                generation=shape,
                seq=shape + 1,
                base_seq=shape,
                cut_time_ns=time.time_ns(),
                disk_size=offset + 4096,
                block_size=4096 << shape,
                consistency=Consistency.CRASH,
                compression=compression,
                full=bool(shape & 1),
                extent_count=len(extents),
                data_bytes=sum(e[1] for e in extents),
                cut_id=shape + 9,
                first_change_cut=shape + 4,
            )
            out.append(b"".join(encode_batch(header, extents)))
    return out


def _layout(blob: bytes) -> tuple[int, list[int]]:
    """Return the header length and the stream offsets of the records of a valid batch."""
    header_len = struct.unpack_from(">H", blob, 10)[0]
    count = struct.unpack_from(">I", blob, 76)[0]
    records, at = [], header_len
    for _ in range(count):
        records.append(at)
        at += 32 + struct.unpack_from(">I", blob, at + 16)[0]
    return header_len, records


def _reseal(b: bytearray, header_len: int, records: list[int]) -> None:
    """Recompute header, record and chain checksums so that a lie reaches the field checks."""
    if 113 < header_len <= len(b):
        b[header_len - 8 : header_len] = struct.pack(
            ">Q", xxhash.xxh3_64_intdigest(b[: header_len - 8])
        )
    chain = xxhash.xxh3_64()
    for r in records:
        if r + 32 <= len(b):
            b[r + 28 : r + 32] = struct.pack(
                ">I", xxhash.xxh3_64_intdigest(b[r : r + 28]) & 0xFFFFFFFF
            )
            chain.update(b[r : r + 32])
    if len(b) >= 32 and b[-32:-24] == b"RKHRLEND":
        b[-8:] = struct.pack(">Q", chain.intdigest())


def _lie(rnd: random.Random, size: int, original: int) -> int:
    pool = _U64_LIES if size == 8 else _U32_LIES
    value = rnd.choice([*pool, original + 1, original - 1, original * 2, rnd.getrandbits(size * 8)])
    return value % (1 << (8 * size))


def _mutate(rnd: random.Random, blob: bytes) -> bytes:
    b = bytearray(blob)
    header_len, records = _layout(blob)
    op = rnd.randrange(11)
    if op == 0:  # bit flips
        for _ in range(rnd.randint(1, 8)):
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
    elif op == 1:  # byte replacements
        for _ in range(rnd.randint(1, 4)):
            b[rnd.randrange(len(b))] = rnd.choice([0, 0xFF, 0x7F, 0x80, rnd.randrange(256)])
    elif op == 2:  # truncation
        del b[rnd.randrange(len(b)) :]
    elif op == 3:  # insertion
        i = rnd.randrange(len(b) + 1)
        b[i:i] = rnd.randbytes(rnd.randint(1, 64))
    elif op == 4:  # deletion
        i = rnd.randrange(len(b))
        del b[i : i + rnd.randint(1, 64)]
    elif op == 5:  # duplication of a range (a repeated record, a repeated header...)
        i = rnd.randrange(len(b))
        j = min(len(b), i + rnd.randint(1, 200))
        b[j:j] = b[i:j]
    elif op == 6:  # garbage, sometimes behind a valid magic or a valid header
        keep = rnd.choice([0, 8, 12, header_len])
        b = b[:keep] + bytearray(rnd.randbytes(rnd.randint(0, 3000)))
    elif op == 7:  # a lying header field, resealed
        at, size = rnd.choice(_HEADER_FIELDS)
        value = _lie(rnd, size, int.from_bytes(b[at : at + size], "big"))
        b[at : at + size] = value.to_bytes(size, "big")
        _reseal(b, header_len, records)
    elif op in (8, 9) and records:  # a lying record field (lengths above all), resealed
        r = rnd.choice(records)
        at, size = rnd.choice(
            _RECORD_FIELDS[:2] + _RECORD_FIELDS
            if op == 8
            else _RECORD_FIELDS[1:2] + _RECORD_FIELDS[4:5]
        )
        value = _lie(rnd, size, int.from_bytes(b[r + at : r + at + size], "big"))
        b[r + at : r + at + size] = value.to_bytes(size, "big")
        _reseal(b, header_len, records)
    elif op == 10 and len(records) >= 2:  # two records swapped, everything resealed
        i = rnd.randrange(len(records) - 1)
        a, c = records[i], records[i + 1]
        end = records[i + 2] if i + 2 < len(records) else len(b) - 32
        first, second = b[a:c], b[c:end]
        b[a:end] = second + first
        _reseal(b, header_len, [*records[:i], a, a + len(second), *records[i + 2 :]])
    else:  # a payload byte changed, its record left alone
        b[rnd.randrange(header_len, len(b))] ^= 0x55
    return bytes(b)


@pytest.mark.timeout(60)
def test_mutated_batches_are_refused_cleanly_and_within_memory() -> None:
    """10,000 corrupted batches give BatchFormatError only, chunking-independent and bounded.

    A mutation that leaves a valid batch (a resealed header field set to another legal value)
    must decode to something that re-encodes to exactly the same bytes: nothing is ignored.
    """
    rnd = random.Random(20240601)
    bases = _base_batches()
    for base in bases:  # the bases themselves are valid
        assert feed(base, LIMITS, MAX_CHUNK)[1] is None
    refused = cases = 0
    worst_memory = 0
    worst_time = 0.0
    while refused < 10_000:
        cases += 1
        assert cases < 12_000, "too many mutations leave a valid batch"
        blob = _mutate(rnd, rnd.choice(bases))
        # tracemalloc slows decoding several-fold: measure the peak on every other case.
        traced = cases % 2 == 0
        if traced:
            tracemalloc.start()
        try:
            started = time.perf_counter()
            _, chunked = feed(blob, LIMITS, lambda: rnd.randint(1, MAX_CHUNK), keep=False)
            worst_time = max(worst_time, time.perf_counter() - started)
            if traced:
                worst_memory = max(worst_memory, tracemalloc.get_traced_memory()[1])
        finally:
            if traced:
                tracemalloc.stop()
        events, whole = feed(blob, LIMITS, len(blob) or 1)
        # The verdict depends on the bytes, not on how they arrived.
        assert repr(chunked) == repr(whole), (cases, chunked, whole)
        if chunked is None:
            header = events[0]
            assert isinstance(header, BatchHeader)
            again = b"".join(encode_batch(header, events[1:-1]))  # type: ignore[arg-type]
            assert again == blob, cases
        else:
            refused += 1
            assert chunked.position == whole.position  # type: ignore[union-attr]
    assert worst_memory <= MEMORY_BOUND, worst_memory
    assert worst_time < 1.0
