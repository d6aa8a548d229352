"""Constants, records and validation rules of the HRL batch format, version 2.

The contract is ``docs/protocol/batch.md``; this module is its executable form. The validation
functions here are shared by the decoder (which refuses hostile input) and the encoder (which
refuses to produce anything the decoder would refuse), so the two cannot drift apart.
"""

from __future__ import annotations

import enum
import re
import struct
import uuid
from dataclasses import dataclass
from typing import Final

import xxhash

from common.hrl.errors import BadField, LimitExceeded

BATCH_CONTENT_TYPE: Final = "application/x-replikant-batch"
"""The HTTP ``Content-Type`` of a batch body."""

MAGIC: Final = b"RKHRL\r\n\x1a"
TRAILER_MAGIC: Final = b"RKHRLEND"
VERSION: Final = 2

SECTOR: Final = 512
"""Extent offsets are multiples of this."""
MAX_DATA_EXTENT_BYTES: Final = 8 << 20
"""The largest DATA extent the format allows (and so the decoder's largest allocation)."""
MAX_NODATA_EXTENT_BYTES: Final = (1 << 32) - 1
"""The largest ZERO or TRIM extent (the ``length`` field is 32 bits)."""
MIN_BLOCK_SIZE: Final = 4096
MAX_BLOCK_SIZE: Final = 4 << 20
MAX_DISK_ID_LEN: Final = 64
MAX_ZSTD_WINDOW: Final = MAX_DATA_EXTENT_BYTES
"""No legitimate frame for at most 8 MiB of content needs a larger zstd window."""
ZSTD_FRAME_MAGIC: Final = b"\x28\xb5\x2f\xfd"

FLAG_FULL: Final = 0x0001

# magic, version, header_len, vm_uuid, generation, seq, base_seq, cut_time_ns, disk_size,
# block_size, consistency, compression, flags, extent_count, data_bytes, cut_id, first_change_cut,
# disk_id_len.
HEADER_FIXED: Final = struct.Struct(">8sHH16sQQQQQIBBHIQQQB")
HEADER_PREFIX: Final = struct.Struct(">8sHH")
"""magic, version, header_len: enough to know how many header bytes to wait for."""
HEADER_XXH: Final = struct.Struct(">Q")
HEADER_MIN_LEN: Final = HEADER_FIXED.size + HEADER_XXH.size  # 113: the header without disk id

# offset, length, kind << 24 | reserved, stored_len, data_xxh, record_xxh. Kind and its three
# reserved bytes are read as one u32: one unpack, and the reserved check is a mask.
RECORD: Final = struct.Struct(">QIIIQI")
RECORD_SEALED: Final = struct.Struct(">QIIIQ")
"""The 28 record bytes that ``record_xxh`` covers."""
RECORD_XXH: Final = struct.Struct(">I")
TRAILER: Final = struct.Struct(">8sIIQQ")

# Byte offsets of header fields, for error positions.
H_MAGIC: Final = 0
H_VERSION: Final = 8
H_HEADER_LEN: Final = 10
H_VM_UUID: Final = 12
H_GENERATION: Final = 28
H_SEQ: Final = 36
H_BASE_SEQ: Final = 44
H_CUT_TIME: Final = 52
H_DISK_SIZE: Final = 60
H_BLOCK_SIZE: Final = 68
H_CONSISTENCY: Final = 72
H_COMPRESSION: Final = 73
H_FLAGS: Final = 74
H_EXTENT_COUNT: Final = 76
H_DATA_BYTES: Final = 80
H_CUT_ID: Final = 88
H_FIRST_CHANGE_CUT: Final = 96
H_DISK_ID_LEN: Final = 104
H_DISK_ID: Final = 105

# Byte offsets of fields within an extent record and within the trailer.
R_OFFSET: Final = 0
R_LENGTH: Final = 8
R_KIND: Final = 12
R_RESERVED: Final = 13
R_STORED_LEN: Final = 16
R_DATA_XXH: Final = 20
R_RECORD_XXH: Final = 28
T_EXTENT_COUNT: Final = 8
T_RESERVED: Final = 12
T_DATA_BYTES: Final = 16
T_CHAIN_XXH: Final = 24

U32: Final = (1 << 32) - 1
U64: Final = (1 << 64) - 1

_DISK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DISK_ID_BYTES: Final = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]*")
"""The disk id charset, for raw header bytes (ASCII only, so UTF-8 decoding cannot fail)."""

xxh64_of = xxhash.xxh3_64_intdigest
"""XXH3-64 (seed 0) of a bytes-like object, as an int: the checksum used everywhere.

Extents, headers, trailers, and the block hashes of verify and seed all use this one function.
"""


def zstd_compress_bound(length: int) -> int:
    """Return ``ZSTD_COMPRESSBOUND(length)``: the most a zstd frame of ``length`` bytes needs."""
    small = ((128 << 10) - length) >> 11 if length < (128 << 10) else 0
    return length + (length >> 8) + small


class Consistency(enum.IntEnum):
    """How the cut was taken."""

    CRASH = 0
    """Crash-consistent: the disk as a power cut would have left it."""
    APP = 1
    """Application-consistent: the guest flushed and quiesced before the cut."""


class Compression(enum.IntEnum):
    """How DATA payloads are stored; one choice per batch."""

    NONE = 0
    ZSTD = 1
    """One zstd frame per DATA extent."""


class ExtentKind(enum.IntEnum):
    """What an extent record says about its byte range."""

    DATA = 0
    """The range holds the payload's bytes."""
    ZERO = 1
    """The range reads as zeroes; the replica may allocate it."""
    TRIM = 2
    """The range reads as zeroes; the replica should deallocate it."""


@dataclass(frozen=True, slots=True)
class BatchHeader:
    """The batch header: which disk, which cut, and what follows.

    ``data_bytes`` is the sum of ``length`` over *all* extents, ZERO and TRIM included (the
    logical size of the change), not the payload size on the wire.

    ``cut_id`` names the VM-wide cut this batch belongs to: every disk of the VM cut at the same
    instant carries the same id, and ids grow with every cut of the VM. 0 means the batch is no
    cut of a whole VM (a tool writing one disk); brokers never make a VM point of it.
    ``first_change_cut`` is the agent's statement about idleness: the disk did not change
    between the cut of its previous batch and any cut numbered below this one (0: no statement).
    See ``docs/protocol/batch.md`` and ``docs/decisions/004-vm-points-are-cuts.md``.
    """

    vm_uuid: uuid.UUID
    disk_id: str
    generation: int
    seq: int
    base_seq: int
    cut_time_ns: int
    disk_size: int
    block_size: int
    consistency: Consistency
    compression: Compression
    full: bool
    extent_count: int
    data_bytes: int
    # Defaults, so that callers writing one disk (tests, tools) need not invent a cut.
    cut_id: int = 0
    first_change_cut: int = 0


@dataclass(frozen=True, slots=True)
class Extent:
    """One extent: ``length`` bytes of the disk at ``offset``.

    ``data`` is the uncompressed content for DATA extents and ``None`` for ZERO and TRIM;
    ``checksum`` is ``xxh64_of(data)`` for DATA and 0 otherwise. The decoder fills both (and has
    verified them); when handing an extent to :func:`encode_batch`, ``checksum=0`` means "compute
    it" and any other value is checked against ``data``.
    """

    offset: int
    length: int
    kind: ExtentKind
    data: bytes | None = None
    checksum: int = 0

    @property
    def end(self) -> int:
        """The disk offset just past this extent."""
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class BatchEnd:
    """The verified trailer: the batch is complete and nothing follows it."""

    extent_count: int
    data_bytes: int
    chain_xxh: int


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What a decoder accepts beyond the format's own bounds; they bound its memory.

    ``max_extent_bytes`` is the largest DATA extent and so the largest buffer the decoder
    allocates (at most twice that is held at once: the stored payload and its decompression).
    """

    max_extent_bytes: int = MAX_DATA_EXTENT_BYTES
    max_extents: int = 1 << 20
    max_disk_id_len: int = MAX_DISK_ID_LEN

    def __post_init__(self) -> None:
        if not 1 <= self.max_extent_bytes <= MAX_DATA_EXTENT_BYTES:
            raise ValueError(
                f"DecodeLimits.max_extent_bytes must be 1..{MAX_DATA_EXTENT_BYTES}, "
                f"not {self.max_extent_bytes}"
            )
        if not 0 <= self.max_extents <= U32:
            raise ValueError(f"DecodeLimits.max_extents must be 0..{U32}, not {self.max_extents}")
        if not 1 <= self.max_disk_id_len <= MAX_DISK_ID_LEN:
            raise ValueError(
                f"DecodeLimits.max_disk_id_len must be 1..{MAX_DISK_ID_LEN}, "
                f"not {self.max_disk_id_len}"
            )


DEFAULT_LIMITS: Final = DecodeLimits()


def _uint(value: object, bits: int, field: str, position: int) -> int:
    """Return ``value`` if it is an int that fits ``bits`` unsigned bits; else refuse it."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise BadField(
            f"{field} is {value!r}, must be an integer 0..{(1 << bits) - 1}",
            field=field,
            position=position,
        )
    return value


def check_header(h: BatchHeader, limits: DecodeLimits) -> None:
    """Refuse a header whose values break the format or ``limits``.

    Positions are the fields' offsets in the header, which starts the stream.
    """
    if not isinstance(h.vm_uuid, uuid.UUID) or h.vm_uuid.int == 0:
        raise BadField(
            f"vm_uuid is {h.vm_uuid}, a VM's identity cannot be the nil UUID",
            field="header.vm_uuid",
            position=H_VM_UUID,
        )
    check_disk_id(h.disk_id, limits)
    _uint(h.generation, 64, "header.generation", H_GENERATION)
    seq = _uint(h.seq, 64, "header.seq", H_SEQ)
    if seq == 0:
        raise BadField("seq is 0, sequence numbers start at 1", field="header.seq", position=H_SEQ)
    if h.base_seq != seq - 1:
        raise BadField(
            f"base_seq is {h.base_seq!r}, must be seq - 1 = {seq - 1}",
            field="header.base_seq",
            position=H_BASE_SEQ,
        )
    _uint(h.cut_time_ns, 64, "header.cut_time_ns", H_CUT_TIME)
    cut_id = _uint(h.cut_id, 64, "header.cut_id", H_CUT_ID)
    first_change = _uint(h.first_change_cut, 64, "header.first_change_cut", H_FIRST_CHANGE_CUT)
    if first_change > cut_id:
        raise BadField(
            f"first_change_cut is {first_change}, after the batch's own cut_id {cut_id} (a "
            "batch cannot hold changes made after its cut)",
            field="header.first_change_cut",
            position=H_FIRST_CHANGE_CUT,
        )
    disk_size = _uint(h.disk_size, 64, "header.disk_size", H_DISK_SIZE)
    block_size = _uint(h.block_size, 32, "header.block_size", H_BLOCK_SIZE)
    if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise BadField(
            f"block_size is {block_size}, must be a power of two from {MIN_BLOCK_SIZE} "
            f"to {MAX_BLOCK_SIZE}",
            field="header.block_size",
            position=H_BLOCK_SIZE,
        )
    # Plain ints are accepted for the enums (an IntEnum member equals its value), so a caller
    # that builds a header from stored config is not refused over a type.
    consistency: object = h.consistency
    if isinstance(consistency, bool) or consistency not in (0, 1):
        raise BadField(
            f"consistency is {h.consistency!r}, must be 0 (crash) or 1 (application)",
            field="header.consistency",
            position=H_CONSISTENCY,
        )
    compression: object = h.compression
    if isinstance(compression, bool) or compression not in (0, 1):
        raise BadField(
            f"compression is {h.compression!r}, must be 0 (none) or 1 (zstd)",
            field="header.compression",
            position=H_COMPRESSION,
        )
    count = _uint(h.extent_count, 32, "header.extent_count", H_EXTENT_COUNT)
    if count > limits.max_extents:
        raise LimitExceeded(
            f"extent_count is {count}, more than this broker's limit of {limits.max_extents}",
            field="header.extent_count",
            position=H_EXTENT_COUNT,
        )
    data_bytes = _uint(h.data_bytes, 64, "header.data_bytes", H_DATA_BYTES)
    # Extents are disjoint, within the disk, and at least one byte long, so the logical total
    # lies between the count and the disk size: a header outside that is lying.
    if data_bytes > disk_size:
        raise BadField(
            f"data_bytes is {data_bytes}, more than disk_size {disk_size}",
            field="header.data_bytes",
            position=H_DATA_BYTES,
        )
    if count > data_bytes:
        raise BadField(
            f"extent_count is {count} but data_bytes is only {data_bytes} "
            "(every extent is at least one byte)",
            field="header.extent_count",
            position=H_EXTENT_COUNT,
        )


def check_disk_id(disk_id: object, limits: DecodeLimits) -> None:
    """Refuse a disk id that is empty, too long, or outside ``[A-Za-z0-9][A-Za-z0-9._-]*``."""
    if not isinstance(disk_id, str) or not 1 <= len(disk_id) <= MAX_DISK_ID_LEN:
        raise BadField(
            f"disk_id is {disk_id!r}, must be 1..{MAX_DISK_ID_LEN} characters",
            field="header.disk_id",
            position=H_DISK_ID,
        )
    if not _DISK_ID.fullmatch(disk_id) or not disk_id.isascii():
        raise BadField(
            f"disk_id is {disk_id!r}, must match [A-Za-z0-9][A-Za-z0-9._-]*",
            field="header.disk_id",
            position=H_DISK_ID,
        )
    if len(disk_id) > limits.max_disk_id_len:
        raise LimitExceeded(
            f"disk_id {disk_id!r} is {len(disk_id)} characters, more than this broker's "
            f"limit of {limits.max_disk_id_len}",
            field="header.disk_id",
            position=H_DISK_ID,
        )


def check_extent(
    offset: int,
    length: int,
    kind: ExtentKind,
    *,
    prev_end: int,
    header: BatchHeader,
    data_seen: int,
    max_extent_bytes: int,
    position: int,
) -> None:
    """Refuse an extent that is misaligned, out of order, out of the disk, or too long.

    ``prev_end`` is where the previous extent ended (0 for the first), ``data_seen`` the sum of
    the previous extents' lengths, and ``position`` the stream offset of the record.
    """
    if offset % SECTOR:
        raise BadField(
            f"extent at disk offset {offset}: offset is not a multiple of {SECTOR}",
            field="extent.offset",
            position=position + R_OFFSET,
        )
    if offset < prev_end:
        raise BadField(
            f"extent at disk offset {offset}: starts before the previous extent's end "
            f"{prev_end} (extents must be in increasing order and must not overlap)",
            field="extent.offset",
            position=position + R_OFFSET,
        )
    if length == 0:
        raise BadField(
            f"extent at disk offset {offset}: length is 0",
            field="extent.length",
            position=position + R_LENGTH,
        )
    if kind is ExtentKind.DATA:
        if length > MAX_DATA_EXTENT_BYTES:
            raise BadField(
                f"DATA extent at disk offset {offset}: length is {length}, more than the "
                f"format's {MAX_DATA_EXTENT_BYTES}",
                field="extent.length",
                position=position + R_LENGTH,
            )
        if length > max_extent_bytes:
            raise LimitExceeded(
                f"DATA extent at disk offset {offset}: length is {length}, more than this "
                f"broker's limit of {max_extent_bytes}",
                field="extent.length",
                position=position + R_LENGTH,
            )
    elif length > MAX_NODATA_EXTENT_BYTES:
        raise BadField(
            f"{kind.name} extent at disk offset {offset}: length is {length}, more than "
            f"{MAX_NODATA_EXTENT_BYTES}",
            field="extent.length",
            position=position + R_LENGTH,
        )
    if offset + length > header.disk_size:
        raise BadField(
            f"extent at disk offset {offset}: ends at {offset + length}, past the end of the "
            f"disk ({header.disk_size} bytes)",
            field="extent.length",
            position=position + R_LENGTH,
        )
    if data_seen + length > header.data_bytes:
        raise BadField(
            f"extent at disk offset {offset}: extents so far total {data_seen + length} bytes, "
            f"more than the header's data_bytes {header.data_bytes}",
            field="header.data_bytes",
            position=position + R_LENGTH,
        )
