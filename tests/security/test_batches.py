"""Hostile batches: replayed, reordered, truncated, lying, corrupt and oversized uploads.

Each attempt is posted with the replicating agent's own certificate to its own replica (so only
the batch itself can be at fault), then the whole store is compared with its state before: the
image bytes, meta (durable and applied seq), and no journal or ``.part`` file left. Batches are
built with the encoder (:mod:`common.hrl`); where a lie needs bytes the encoder refuses to
write, they are patched at the offsets :mod:`common.hrl.format` defines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import xxhash
from structlog.testing import capture_logs

from broker.ingest import max_batch_bytes
from broker.service import READ_BUFSIZE
from common.hrl import (
    BATCH_CONTENT_TYPE,
    BatchEncoder,
    BatchHeader,
    Compression,
    ExtentKind,
    decode_batch,
    encode_batch,
    xxh64_of,
)
from common.hrl.format import (
    H_BASE_SEQ,
    H_BLOCK_SIZE,
    H_DATA_BYTES,
    H_EXTENT_COUNT,
    H_FIRST_CHANGE_CUT,
    HEADER_PREFIX,
    HEADER_XXH,
    MAX_BLOCK_SIZE,
    R_RECORD_XXH,
    RECORD,
    RECORD_SEALED,
    RECORD_XXH,
    SECTOR,
    T_CHAIN_XXH,
    TRAILER,
    TRAILER_MAGIC,
    ZSTD_FRAME_MAGIC,
    zstd_compress_bound,
)
from common.tls import client_context
from tests.security.broker_doors import (
    BrokerWorld,
    enable_body,
    error_code,
    expired,
    https,
    new_replica_url,
    snapshot,
    world,
)
from tests.security.rows import Door
from tests.support_broker import AgentClient, FakeSource, MiB

__all__ = ["expired", "world"]

SURFACE = "broker batch upload"
EXTRA = 4 * READ_BUFSIZE
"""How far the oversized stream goes on past its batch: beyond anything the broker buffers."""
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


# --------------------------------------------------------------------------------------------
# Building bad batches


def patch_header(body: bytes, at: int, field: struct.Struct, value: int) -> bytes:
    """``body`` with one header field rewritten and the header checksum made right again, so
    that the lie, not the checksum, is what the broker has to catch."""
    _magic, _version, header_len = HEADER_PREFIX.unpack_from(body)
    out = bytearray(body)
    field.pack_into(out, at, value)
    sealed = header_len - HEADER_XXH.size
    HEADER_XXH.pack_into(out, sealed, xxh64_of(bytes(out[:sealed])))
    return bytes(out)


def sealed_record(offset: int, length: int, stored_len: int, xxh: int) -> bytes:
    """One DATA extent record with its own checksum right, whatever it says."""
    sealed = RECORD_SEALED.pack(offset, length, ExtentKind.DATA << 24, stored_len, xxh)
    return sealed + RECORD_XXH.pack(xxh64_of(sealed) & 0xFFFFFFFF)


def forge(header: BatchHeader, extents: list[tuple[int, bytes]]) -> bytes:
    """An uncompressed batch whose header and records are each sealed correctly but which the
    encoder would refuse as a whole (overlapping, unaligned, beyond the disk); the trailer's
    chain checksum is computed over the records."""
    header = dataclasses.replace(header, compression=Compression.NONE)
    parts = [BatchEncoder(header).header_bytes()]
    chain = xxhash.xxh3_64()
    for offset, data in extents:
        record = sealed_record(offset, len(data), len(data), xxh64_of(data))
        chain.update(record)
        parts += [record, data]
    total = sum(len(d) for _, d in extents)
    parts.append(TRAILER.pack(TRAILER_MAGIC, len(extents), 0, total, chain.intdigest()))
    return b"".join(parts)


def layout(body: bytes) -> list[tuple[int, int, int]]:
    """``(record position, payload position, stored_len)`` of every extent of a valid batch."""
    header, _extents, _end = decode_batch(body)
    _magic, _version, pos = HEADER_PREFIX.unpack_from(body)
    out = []
    for _ in range(header.extent_count):
        stored_len = RECORD.unpack_from(body, pos)[3]
        out.append((pos, pos + RECORD.size, stored_len))
        pos += RECORD.size + stored_len
    return out


def flip(body: bytes, at: int, mask: int = 0x01) -> bytes:
    """``body`` with the bits of ``mask`` flipped in byte ``at``."""
    out = bytearray(body)
    out[at] ^= mask
    return bytes(out)


def uncompressed(body: bytes) -> bytes:
    """The same batch re-encoded without compression (its payloads are the disk's bytes)."""
    header, extents, _end = decode_batch(body)
    return b"".join(
        encode_batch(dataclasses.replace(header, compression=Compression.NONE), extents)
    )


def bloated_frame(data: bytes) -> bytes:
    """A valid zstd frame of ``data`` made as large as the format allows (raw blocks, many of
    them): the frame header is the magic, a descriptor with single-segment and a 2-byte content
    size, then 3-byte block headers. RFC 8878 section 3.1.1."""
    bound = zstd_compress_bound(len(data))
    fixed = len(ZSTD_FRAME_MAGIC) + 1 + 2
    blocks = (bound - fixed - len(data)) // 3
    out = bytearray(ZSTD_FRAME_MAGIC + bytes([0x60]) + (len(data) - 256).to_bytes(2, "little"))
    step = -(-len(data) // blocks)
    for i in range(0, len(data), step):
        chunk = data[i : i + step]
        last = 1 if i + step >= len(data) else 0
        out += ((len(chunk) << 3) | last).to_bytes(3, "little") + chunk  # block type 0: raw
    return bytes(out)


# --------------------------------------------------------------------------------------------
# The attempts


@dataclasses.dataclass(frozen=True)
class Case:
    """One hostile body, and the refusal the broker must answer it with."""

    body: bytes
    status: int
    error: str
    batch_class: str | None = None
    duplicate: bool = False


def next_batch(world: BrokerWorld) -> bytes:
    """The valid next batch (seq 2) of ``src``, with several DATA extents and a ZERO one."""
    src = world.src
    if 2 not in src.cuts:
        src.mutate(6)
        src.write(src.disk_size - src.block_size, bytes(src.block_size))
        src.cut()
    return src.cuts[2].body


def next_header(world: BrokerWorld, count: int, data_bytes: int) -> BatchHeader:
    """A valid header for seq 2 of ``src`` (its cut id and the rest as the source numbers them),
    without cutting: the forged batches below supply their own extents."""
    src = world.src
    saved, src.seq = src.seq, 2
    try:
        return src.header(count, data_bytes)
    finally:
        src.seq = saved


def truncated(at: Callable[[bytes], int]) -> Callable[[BrokerWorld], Case]:
    """A case: the next batch cut at ``at(body)``."""

    def build(world: BrokerWorld) -> Case:
        body = next_batch(world)
        return Case(body[: at(body)], 400, "malformed_batch", "Truncated")

    return build


def header_len(body: bytes) -> int:
    """The encoded header's length."""
    return int(HEADER_PREFIX.unpack_from(body)[2])


def _replay(world: BrokerWorld) -> Case:
    return Case(world.src.cuts[1].body, 200, "", duplicate=True)


def _reordered(world: BrokerWorld) -> Case:
    next_batch(world)
    src = world.src
    if 3 not in src.cuts:
        src.mutate(2)
        src.cut()
    return Case(src.cuts[3].body, 409, "sequence_gap")


def _header_field(
    at: int, field: struct.Struct, delta: int, klass: str
) -> Callable[[BrokerWorld], Case]:
    def build(world: BrokerWorld) -> Case:
        body = next_batch(world)
        value = field.unpack_from(body, at)[0] + delta
        return Case(patch_header(body, at, field, value), 400, _code(klass), klass)

    return build


def _code(klass: str) -> str:
    return "corrupt_extent" if klass == "ExtentChecksumMismatch" else "malformed_batch"


def _header_value(
    at: int, field: struct.Struct, value: int, klass: str
) -> Callable[[BrokerWorld], Case]:
    def build(world: BrokerWorld) -> Case:
        return Case(patch_header(next_batch(world), at, field, value), 400, _code(klass), klass)

    return build


def _identity(**change: Any) -> Callable[[BrokerWorld], Case]:
    def build(world: BrokerWorld) -> Case:
        header = dataclasses.replace(next_header(world, 1, 4096), **change)
        body = b"".join(encode_batch(header, [(0, 4096, ExtentKind.DATA, b"\x5a" * 4096)]))
        status, error = {
            "vm_uuid": (403, "wrong_identity"),
            "disk_id": (403, "wrong_identity"),
            "disk_size": (409, "identity_conflict"),
            "generation": (409, "stale_generation"),
            "cut_id": (409, "sequence_gap"),
        }[next(iter(change))]
        return Case(body, status, error)

    return build


def _beyond_end(world: BrokerWorld) -> Case:
    src = world.src
    body = forge(next_header(world, 1, 4096), [(src.disk_size - SECTOR, b"\x5a" * 4096)])
    return Case(body, 400, "malformed_batch", "BadField")


def _overlapping(world: BrokerWorld) -> Case:
    body = forge(next_header(world, 2, 8192), [(0, b"\x11" * 4096), (2048, b"\x22" * 4096)])
    return Case(body, 400, "malformed_batch", "BadField")


def _unaligned(world: BrokerWorld) -> Case:
    body = forge(next_header(world, 1, 4096), [(100, b"\x5a" * 4096)])
    return Case(body, 400, "malformed_batch", "BadField")


def _payload_bit(world: BrokerWorld) -> Case:
    body = uncompressed(next_batch(world))
    _rec, payload, stored_len = layout(body)[0]
    return Case(flip(body, payload + stored_len // 2), 400, "corrupt_extent")


def _full_batch(world: BrokerWorld) -> Case:
    src = world.src
    if 2 not in src.cuts:
        src.mutate(6)
        src.cut(full=True, all_blocks=True)
    body = uncompressed(src.cuts[2].body)
    _rec, payload, stored_len = [e for e in layout(body) if e[2]][-1]
    return Case(flip(body, payload + stored_len - 1), 400, "corrupt_extent")


def _record_checksum(world: BrokerWorld) -> Case:
    body = next_batch(world)
    rec, _payload, _n = layout(body)[0]
    return Case(flip(body, rec + R_RECORD_XXH), 400, "corrupt_extent", "ExtentChecksumMismatch")


def _zstd_magic(world: BrokerWorld) -> Case:
    body = next_batch(world)
    _rec, payload, _n = layout(body)[0]
    return Case(flip(body, payload, 0xFF), 400, "malformed_batch", "BadField")


def _zstd_block(world: BrokerWorld) -> Case:
    body = next_batch(world)
    _rec, payload, stored_len = layout(body)[0]
    # A flipped bit inside the frame's blocks: zstd fails, or decodes other bytes.
    at = payload + stored_len // 2
    return Case(flip(body, at, 0x10), 400, "")


def _header_bit(world: BrokerWorld) -> Case:
    body = next_batch(world)
    return Case(flip(body, H_DATA_BYTES), 400, "malformed_batch", "HeaderChecksumMismatch")


def _chain(world: BrokerWorld) -> Case:
    body = next_batch(world)
    at = len(body) - TRAILER.size + T_CHAIN_XXH
    return Case(flip(body, at), 400, "malformed_batch", "TrailerMismatch")


def _trailing(world: BrokerWorld) -> Case:
    return Case(next_batch(world) + b"\0", 400, "malformed_batch", "TrailingData")


CASES: dict[str, Callable[[BrokerWorld], Case]] = {
    "replayed: a retransmit of acked seq 1": _replay,
    "reordered: seq 3 while seq 2 is expected": _reordered,
    "truncated inside the header's fixed prefix": truncated(lambda b: HEADER_PREFIX.size - 3),
    "truncated inside the header, before its checksum": truncated(
        lambda b: header_len(b) - HEADER_XXH.size
    ),
    "truncated right after the header": truncated(header_len),
    "truncated inside the first extent record": truncated(lambda b: header_len(b) + 10),
    "truncated inside the first extent's payload": truncated(
        lambda b: layout(b)[0][1] + layout(b)[0][2] // 2
    ),
    "truncated before the trailer": truncated(lambda b: len(b) - TRAILER.size),
    "truncated inside the trailer": truncated(lambda b: len(b) - 5),
    "lying: extent_count one more than sent": _header_field(
        H_EXTENT_COUNT, U32, +1, "ExtentChecksumMismatch"
    ),
    "lying: extent_count one fewer than sent": _header_field(H_EXTENT_COUNT, U32, -1, "BadMagic"),
    "lying: data_bytes 512 more than the extents": _header_field(
        H_DATA_BYTES, U64, +SECTOR, "TrailerMismatch"
    ),
    "lying: data_bytes 512 fewer than the extents": _header_field(
        H_DATA_BYTES, U64, -SECTOR, "BadField"
    ),
    "lying: data_bytes larger than the disk": _header_value(H_DATA_BYTES, U64, 2 * MiB, "BadField"),
    "lying: block_size not a power of two": _header_value(
        H_BLOCK_SIZE, U32, 65536 + 4096, "BadField"
    ),
    "lying: block_size above the format's maximum": _header_value(
        H_BLOCK_SIZE, U32, 2 * MAX_BLOCK_SIZE, "BadField"
    ),
    "lying: base_seq not seq - 1": _header_value(H_BASE_SEQ, U64, 0, "BadField"),
    "lying: first_change_cut after the batch's own cut_id": _header_value(
        H_FIRST_CHANGE_CUT, U64, 1 << 40, "BadField"
    ),
    "lying: VM cut id 1 again (not after the durable batch's)": _identity(cut_id=1),
    "lying: disk_size twice the replica's": _identity(disk_size=2 * MiB),
    "lying: another VM's uuid in the header": _identity(vm_uuid=uuid.uuid4()),
    "lying: disk id disk1 in a batch posted to disk0": _identity(disk_id="disk1"),
    "lying: stale generation 0 (replica at 1)": _identity(generation=0),
    "lying: generation 2 never announced (replica at 1)": _identity(generation=2),
    "lying: an extent past the end of the disk": _beyond_end,
    "lying: overlapping extents": _overlapping,
    "lying: an extent offset not sector aligned": _unaligned,
    "corrupt: one flipped bit in an uncompressed payload": _payload_bit,
    "corrupt: one flipped bit in a record checksum": _record_checksum,
    "corrupt: a FULL batch (streamed straight into the image during an initial copy) with a "
    "flipped bit in its last extent, to a replica that has recovery points": _full_batch,
    "corrupt: a zstd payload without the frame magic": _zstd_magic,
    "corrupt: one flipped bit inside a zstd frame": _zstd_block,
    "corrupt: one flipped bit in the header": _header_bit,
    "corrupt: one flipped bit in the trailer's chain checksum": _chain,
    "corrupt: one byte after the trailer": _trailing,
}


async def _post(world: BrokerWorld, body: bytes | AsyncIterator[bytes]) -> tuple[int, Any]:
    async with AgentClient(world.url, world.pki.agents["h1"]) as h1:
        return await h1.post(world.src, body)


@pytest.mark.parametrize("name", list(CASES))
async def test_a_hostile_batch_changes_nothing(world: BrokerWorld, door: Door, name: str) -> None:
    """Each hostile batch is answered with its own refusal (a replay with "duplicate") and the
    replica's image, meta and journal stay exactly as they were; the valid batch goes in after."""
    case = CASES[name](world)
    before = snapshot(world.svc.store.root)
    seqs = world.seqs()
    status, answer = await _post(world, case.body)
    code = answer.get("error", "") if isinstance(answer, dict) else ""
    klass = (answer.get("details") or {}).get("class") if isinstance(answer, dict) else None
    if case.duplicate:
        seen = (
            f"HTTP {status} acked_seq={answer.get('acked_seq')} duplicate={answer.get('duplicate')}"
        )
        good = status == 200 and answer.get("duplicate") is True
    else:
        seen = f"HTTP {status} {code}{f' ({klass})' if klass else ''}"
        good = 400 <= status < 500
    door.attempt(
        SURFACE,
        name,
        expected=(
            "200 duplicate, nothing written"
            if case.duplicate
            else f"{case.status} {case.error or 'refusal'}"
            f"{f' ({case.batch_class})' if case.batch_class else ''}, store unchanged"
        ),
        observed=f"{seen}; {world.store_text(before)}",
        refused=good and not world.damage(before) and world.seqs() == seqs,
    )
    assert status == case.status
    if case.error:
        assert code == case.error
    if case.batch_class:
        assert klass == case.batch_class
    # The replica is not stuck: the valid next batch is accepted after the refusal.
    status, ack = await _post(world, next_batch(world))
    assert (status, ack["acked_seq"]) == (200, 2)


# --------------------------------------------------------------------------------------------
# Oversized bodies


async def raw_post(world: BrokerWorld, headers: str, body: bytes = b"") -> tuple[str, bytes, float]:
    """POST to ``src``'s batches URL with the agent's certificate and ``headers`` exactly as
    written (no client library to tidy them up); returns the status line, the response body
    and the seconds until the answer came."""
    host, port = world.url.removeprefix("https://").rsplit(":", 1)
    path = world.replica_url.removeprefix(world.url) + "/batches"
    reader, writer = await asyncio.open_connection(
        host, int(port), ssl=client_context(world.pki.agents["h1"]), server_hostname=host
    )
    started = time.monotonic()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {BATCH_CONTENT_TYPE}\r\n"
        f"{headers}\r\n\r\n".encode()
        + body
    )
    raw = b""
    try:
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            lengths = [
                ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")
            ]
            if lengths:
                raw = await reader.readexactly(int(lengths[0].split(b":")[1]))
    except TimeoutError:
        head = b"(no answer within 10 s)"
    except (asyncio.IncompleteReadError, ConnectionError):
        head = b"(connection closed without an answer)"
    elapsed = time.monotonic() - started
    writer.close()
    return head.split(b"\r\n")[0].decode(errors="replace"), raw, elapsed


async def test_a_content_length_above_the_limit_is_answered_before_reading(
    world: BrokerWorld, door: Door
) -> None:
    """A POST announcing more bytes than the replica's limit gets 413 at once, though not one
    byte of its body was sent."""
    replica = world.svc.store.get(str(world.src.vm_uuid), world.src.disk_id)
    assert replica is not None
    limit = max_batch_bytes(replica)
    before = snapshot(world.svc.store.root)
    status, raw, elapsed = await raw_post(world, f"Content-Length: {limit + 1}")
    door.attempt(
        SURFACE,
        f"POST with Content-Length {limit + 1} (limit {limit}) and no body sent",
        expected="413 batch_too_large before any body byte is read",
        observed=f"{status} {error_code(raw)} after {elapsed:.2f} s; {world.store_text(before)}",
        refused=" 413 " in status and not world.damage(before),
    )
    assert error_code(raw) == "batch_too_large"


async def test_a_body_framed_two_ways_is_refused(world: BrokerWorld, door: Door) -> None:
    """A request that carries both Content-Length and Transfer-Encoding (the request-smuggling
    shape: two parsers may disagree where the body ends) is refused by the HTTP parser."""
    body = next_batch(world)
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    before = snapshot(world.svc.store.root)
    status, raw, _ = await raw_post(
        world, f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked", chunked
    )
    door.attempt(
        SURFACE,
        "a valid batch sent with both Content-Length and Transfer-Encoding: chunked",
        expected="400 from the HTTP parser, nothing journaled",
        observed=f"{status} {raw[:60]!r}; {world.store_text(before)}",
        refused=" 400 " in status and not world.damage(before),
    )


async def test_a_streamed_body_growing_past_the_limit(world: BrokerWorld, door: Door) -> None:
    """A chunked upload (no Content-Length) that is still a well-formed batch when it passes the
    replica's limit is cut off there with 413 (not read to its end), and leaves no journal file
    behind."""
    # A 16 MiB replica: with every sector its own extent and every zstd frame as large as the
    # format allows, a well-formed batch outgrows the limit (disk + 1/128 + 32 B a sector + 1 MiB).
    src = FakeSource(disk_size=16 * MiB, compression=Compression.ZSTD)
    async with AgentClient(world.url, world.pki.agents["h1"]) as h1:
        await h1.enable(src, name="big")
    replica = world.svc.store.get(str(src.vm_uuid), src.disk_id)
    assert replica is not None
    limit = max_batch_bytes(replica)
    src.seq = 1
    count = src.disk_size // SECTOR
    header = src.header(count, src.disk_size)
    data = bytes(range(256)) * (SECTOR // 256)
    frame = bloated_frame(data)
    xxh = xxh64_of(data)
    sent = 0

    def chunks() -> Iterator[bytes]:
        yield BatchEncoder(header).header_bytes()
        chain = xxhash.xxh3_64()
        piece = bytearray()
        for i in range(count):
            record = sealed_record(i * SECTOR, SECTOR, len(frame), xxh)
            chain.update(record)
            piece += record + frame
            if len(piece) >= MiB:
                yield bytes(piece)
                piece.clear()
        yield bytes(piece) + TRAILER.pack(TRAILER_MAGIC, count, 0, src.disk_size, chain.intdigest())
        # And it keeps growing, by more than the broker's read buffer can hold: a broker that
        # read on would see these bytes long past the limit.
        for _ in range(EXTRA // MiB):
            yield bytes(MiB)

    total = sum(len(c) for c in chunks())
    batch = total - EXTRA
    assert batch > limit, "the batch itself must outgrow the limit for the attempt to mean much"

    async def stream() -> AsyncIterator[bytes]:
        nonlocal sent
        for c in chunks():
            sent += len(c)
            yield c
            await asyncio.sleep(0)

    before = snapshot(world.svc.store.root)
    with capture_logs() as logs:
        try:
            async with AgentClient(world.url, world.pki.agents["h1"]) as h1:
                status, answer = await h1.post(src, stream())
            seen = f"HTTP {status} {answer.get('error')}"
        except (OSError, aiohttp.ClientError) as exc:
            status, seen = 0, f"connection ended: {type(exc).__name__}"
    await asyncio.sleep(0.2)  # the handler's abort runs in a worker thread
    refusals = [e for e in logs if e["event"] == "batch_refused"]
    received = refusals[0].get("received") if refusals else None
    door.attempt(
        SURFACE,
        f"chunked upload without Content-Length: a {batch}-byte well-formed batch and "
        f"{EXTRA // MiB} MiB more, against a limit of {limit}",
        expected="413 batch_too_large once the limit is passed, no journal left",
        observed=f"{seen}; broker refused after receiving {received} bytes; "
        f"{world.store_text(before)}",
        refused=status == 413 and not world.damage(before),
    )
    # Cut off at the limit, give or take what aiohttp had buffered (the broker reads whatever is
    # buffered at once, at most twice its read buffer), never at the end of the stream.
    assert isinstance(received, int)
    assert limit < received <= limit + 2 * READ_BUFSIZE + MiB < total


async def test_an_oversized_json_body_on_put(world: BrokerWorld, door: Door) -> None:
    """A PUT whose JSON body is larger than the 1 MiB request limit is refused with 413 and
    creates no replica."""
    body = {**enable_body(), "labels": {f"k{i}": "v" * 1000 for i in range(1100)}}
    before = snapshot(world.svc.store.root)
    status, seen = await https(
        client_context(world.pki.agents["h1"]), "PUT", new_replica_url(world), json_body=body
    )
    door.attempt(
        SURFACE,
        "PUT of a new replica with a 1.1 MB JSON body",
        expected="413, no replica created",
        observed=f"{seen}; {world.store_text(before)}",
        refused=status == 413 and not world.damage(before),
    )
