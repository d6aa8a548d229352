"""The frames between the agent and its shipping process (decision 029): the two functions that
write and read one on an asyncio stream, and a decoder for a protocol's callbacks.

Two stream sockets carry frames of one fixed header (kind, job, meta length, payload length), a
JSON ``meta`` and a raw ``payload``:

- the *data* socket, between the agent's shipping loop and the process: OPEN a batch (the
  descriptors of its frozen map, grain bits and image go ahead of it on a third socket; its meta
  names the broker URL to upload it to), CREDIT it one more chunk, DROP it; the process announces
  each CHUNK before it sends it (its size, not its bytes), then DONE (its counts and the broker's
  answer: status, reason, and the body as payload) or FAIL (``network``: no answer came, and
  why; ``error``: the batch could not be read or encoded);
- the *settle* socket, between the process and the agent's NBD loop: SETTLE the extents the
  process has just read (packed integers, not JSON: the agent decodes them on its NBD loop),
  answered in order with PATCHES (the copy-on-write copies to lay over what it read) or GONE
  (the cut was released: the batch fails).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct
from array import array
from collections.abc import Sequence
from typing import Any, Final, NamedTuple
from uuid import UUID

from agents.errors import FencedError, ShipError
from common.hrl import BatchHeader, Compression, Consistency

FRAME: Final = struct.Struct("<BIII")
"""kind, job id, bytes of meta, bytes of payload."""

OPEN: Final = 1
CREDIT: Final = 2
DROP: Final = 3
CHUNK: Final = 4
DONE: Final = 5
FAIL: Final = 6
SETTLE: Final = 7
PATCHES: Final = 8
GONE: Final = 9

CREDITS: Final = 1
"""Chunks of one batch the process may send ahead of the agent's pacing (each ~256 KiB): one,
so that the next one's credit is on its way while a chunk goes out, and no burst beyond it."""
MAX_META: Final = 64 << 20
MAX_PAYLOAD: Final = 256 << 20


class Frame(NamedTuple):
    """One frame as read."""

    kind: int
    job: int
    meta: Any
    payload: bytes


# One encoder for every frame: ``json.dumps`` with separators builds a new one per call, twice
# the cost of the encoding itself for the small metas of a settle step on the guest's loop.
_encode = json.JSONEncoder(separators=(",", ":")).encode


def frame_head(kind: int, job: int, meta: Any, payload_len: int = 0) -> bytes:
    """A frame's fixed header and meta; its payload follows it as it is (not copied)."""
    raw = _encode(meta).encode()
    return FRAME.pack(kind, job, len(raw), payload_len) + raw


def send(
    writer: asyncio.StreamWriter, kind: int, job: int, meta: Any, payload: bytes = b""
) -> None:
    """Queue one frame on ``writer`` in one write (no await between its parts: frames never
    interleave). One write is one send: a SETTLE written in two reached the agent's NBD loop in
    two pieces, waking it twice per hop."""
    writer.writelines((frame_head(kind, job, meta, len(payload)), payload))


def _head(raw: bytes | bytearray, at: int = 0) -> tuple[int, int, int, int]:
    kind, job, meta_len, payload_len = FRAME.unpack_from(raw, at)
    if meta_len > MAX_META or payload_len > MAX_PAYLOAD:
        raise ValueError(f"shipping frame of {meta_len} + {payload_len} bytes is beyond limits")
    return kind, job, meta_len, payload_len


async def receive(reader: asyncio.StreamReader) -> Frame:
    """The next frame; ``asyncio.IncompleteReadError`` once the peer closed its end."""
    kind, job, meta_len, payload_len = _head(await reader.readexactly(FRAME.size))
    meta = json.loads(await reader.readexactly(meta_len))
    return Frame(kind, job, meta, await reader.readexactly(payload_len))


class FrameDecoder:
    """Frames out of a byte stream fed as it arrives, with no I/O of its own: the agent's NBD
    loop parses SETTLE frames in its protocol callback, without a coroutine step per frame."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data``; return the frames it completed (``ValueError``: one is beyond limits)."""
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        at = 0
        while len(buf) - at >= FRAME.size:
            kind, job, meta_len, payload_len = _head(buf, at)
            meta_at = at + FRAME.size
            end = meta_at + meta_len + payload_len
            if len(buf) < end:
                break
            meta = json.loads(buf[meta_at : meta_at + meta_len])
            frames.append(Frame(kind, job, meta, bytes(buf[meta_at + meta_len : end])))
            at = end
        del buf[:at]
        return frames


def header_meta(header: BatchHeader) -> dict[str, Any]:
    """``header`` as JSON values."""
    doc = dataclasses.asdict(header)
    doc["vm_uuid"] = str(header.vm_uuid)
    doc["consistency"] = int(header.consistency)
    doc["compression"] = int(header.compression)
    return doc


def header_from_meta(doc: dict[str, Any]) -> BatchHeader:
    """The header :func:`header_meta` described."""
    return BatchHeader(
        **{
            **doc,
            "vm_uuid": UUID(doc["vm_uuid"]),
            "consistency": Consistency(doc["consistency"]),
            "compression": Compression(doc["compression"]),
        }
    )


def error_meta(error: ShipError) -> dict[str, Any]:
    """Why a broker gave no answer (:class:`agents.ship.NetworkFailure`), as JSON values."""
    return {
        "fenced": isinstance(error, FencedError),
        "message": error.message,
        "fix": error.fix,
        "code": error.code,
    }


def error_from_meta(doc: dict[str, Any]) -> ShipError:
    """The error :func:`error_meta` described."""
    if doc["fenced"]:
        return FencedError(doc["message"], fix=doc["fix"], code=doc["code"])
    return ShipError(doc["message"], fix=doc["fix"], code=doc["code"])


def spans_payload(spans: Sequence[int]) -> bytes:
    """A SETTLE's payload: the hop's DATA extents as ``(offset, length, done block)`` triples
    (:meth:`agents.cut.Cut.settle`), native 64-bit integers: the agent decodes it in one call."""
    return array("q", spans).tobytes()


def spans_from(payload: bytes) -> array[int]:
    """The triples :func:`spans_payload` packed."""
    spans = array("q")
    spans.frombytes(payload)
    return spans


__all__ = [
    "CHUNK",
    "CREDIT",
    "CREDITS",
    "DONE",
    "DROP",
    "FAIL",
    "FRAME",
    "GONE",
    "OPEN",
    "PATCHES",
    "SETTLE",
    "Frame",
    "FrameDecoder",
    "error_from_meta",
    "error_meta",
    "frame_head",
    "header_from_meta",
    "header_meta",
    "receive",
    "send",
    "spans_from",
    "spans_payload",
]
