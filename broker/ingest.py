"""The agents' replication endpoints of the broker (docs/protocol/http.md): announce a disk,
read its replica's state, upload batches (streamed, verified and journaled before the ack) and
read block hashes.

Every request arrives over mutual TLS (:class:`common.tls.MutualTLSSite`); :mod:`broker.authz`
decides who may use it, and handlers raise :class:`~broker.errors.BrokerError`, which
:mod:`broker.httperrors` turns into the refusal body.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from broker import names
from broker.ahead import UploadUndo
from broker.api import SERVICE_KEY, Ingest
from broker.authz import authorise_agent, check_generation, check_source, identity_of
from broker.direct import DirectApply
from broker.errors import (
    BadRequest,
    BatchTooLarge,
    BrokerError,
    IdentityConflict,
    StorageFullError,
    UploadInProgress,
)
from broker.httperrors import CLIENT_GONE, json_error, model_body, reason_text
from broker.journal import BatchReceiver, Receipt
from broker.points import parse_cut, parse_key
from broker.pools import INGEST, run_in, submit_in
from broker.store import Replica, placement_fence
from broker.views import cut_pending, disk_key_at_cut, point_pending, replica_of, state_json
from common.config import NAME_PATTERN
from common.hrl import BATCH_CONTENT_TYPE
from common.logs import get_logger

if TYPE_CHECKING:
    from broker.apply import ReplicaEngine

_log = get_logger("broker.ingest")

_FEED_BYTES: Final = 1 << 20
IDLE_TIMEOUT: Final = 60.0
"""Seconds an upload may stall before it is dropped (it holds the disk's ingest lock)."""
LOCK_TIMEOUT: Final = 75.0
MAX_HASHES_WAIT: Final = 120.0
"""Seconds a ``hashes?point=...&wait=...`` request may wait for a durable point to be applied."""


class EnableRequest(BaseModel):
    """Body of ``PUT /v1/replicas/{vm_uuid}/{disk_id}``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    vm_name: str = Field(pattern=NAME_PATTERN)
    disk_size: int = Field(gt=0)
    block_size: int = Field(ge=4096, le=4 * 1024 * 1024)
    generation: int = Field(default=1, ge=0)
    # The site names an MQTT topic level: the name rule keeps "+", "#" and "/" out of it.
    site: str = Field(default="", pattern=f"^$|{NAME_PATTERN}")
    host: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    rpo_seconds: float | None = Field(default=None, gt=0)

    @field_validator("labels")
    @classmethod
    def _bounded(cls, value: dict[str, str]) -> dict[str, str]:
        problem = names.labels_problem(value)
        if problem is not None:
            raise ValueError(f"{problem} (limit: {names.LABELS_RULE})")
        return value

    @field_validator("disk_size")
    @classmethod
    def _sector_multiple(cls, value: int) -> int:
        if value % 512:
            raise ValueError("must be a multiple of 512")
        return value

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("must be a power of two")
        return value


def _vm_uuid(request: web.Request) -> str:
    return names.vm_uuid(request.match_info["vm_uuid"])


def _disk_id(request: web.Request) -> str:
    return names.disk_id(request.match_info["disk_id"])


async def enable_replica(request: web.Request) -> web.Response:
    """PUT: create (or re-announce) the replica of one disk; answers its state."""
    service = request.app[SERVICE_KEY]
    ident = identity_of(request)
    vm_uuid = _vm_uuid(request)
    disk_id = _disk_id(request)
    authorise_agent(service.config, ident, vm_uuid)
    what = f"PUT body for vm {vm_uuid} disk {disk_id} is invalid"
    body = await model_body(request, EnableRequest, what)
    service.check_owner(vm_uuid)
    replica = service.store.get(vm_uuid, disk_id)
    if replica is not None:
        m = replica.meta
        check_source(replica, ident)
        check_generation(replica, ident, body.generation)
        if body.vm_name != m.vm_name or body.disk_size != m.disk_size:
            raise IdentityConflict(
                f"replica {vm_uuid}/{disk_id} exists for vm {m.vm_name!r} with {m.disk_size} "
                f"bytes; the request names vm {body.vm_name!r} with {body.disk_size} bytes",
                fix="a VM keeps its UUID, name and disk size; remove the old replica if this is "
                "another disk",
                details={
                    "replica": {"vm_name": m.vm_name, "disk_size": m.disk_size},
                    "request": {"vm_name": body.vm_name, "disk_size": body.disk_size},
                },
            )
        await service.reannounce(replica, ident, body.model_dump())
    else:
        service.check_space(needed=0)
        created, _ = await asyncio.to_thread(
            service.store.create_replica,
            vm_uuid=vm_uuid,
            disk_id=disk_id,
            vm_name=body.vm_name,
            disk_size=body.disk_size,
            block_size=body.block_size,
            generation=body.generation,
            source_host=ident.name,
            source_site=body.site,
            labels=body.labels,
            rpo_seconds=body.rpo_seconds,
            epoch=service.epoch,
        )
        service.engine_for(created)
        replica = created
    return web.json_response(state_json(service, replica))


async def replica_state(request: web.Request) -> web.Response:
    """GET: the replica's state (agents resume from ``durable_seq + 1``)."""
    service = request.app[SERVICE_KEY]
    ident = identity_of(request)
    vm_uuid = _vm_uuid(request)
    if ident.role != "admin":
        authorise_agent(service.config, ident, vm_uuid)
    service.check_owner(vm_uuid)  # a standby knows no replica: it names the one that does
    replica = replica_of(service, vm_uuid, _disk_id(request))
    if ident.role != "admin":
        check_source(replica, ident)
    return web.json_response(state_json(service, replica))


async def upload_batch(request: web.Request) -> web.Response:
    """POST: stream, verify and journal one batch; ack only once it is durable."""
    service = request.app[SERVICE_KEY]
    ident = identity_of(request)
    vm_uuid = _vm_uuid(request)
    disk_id = _disk_id(request)
    started = time.monotonic()
    log = _log.bind(vm_uuid=vm_uuid, disk=disk_id, peer=ident.uri, epoch=service.epoch)
    progress = UploadProgress()
    try:
        authorise_agent(service.config, ident, vm_uuid)
        service.check_owner(vm_uuid)
        replica = replica_of(service, vm_uuid, disk_id)
        log = log.bind(vm=replica.meta.vm_name, generation=replica.meta.generation)
        check_source(replica, ident)
        if request.content_type != BATCH_CONTENT_TYPE:
            raise BadRequest(
                f"batch uploads must be {BATCH_CONTENT_TYPE}, not {request.content_type!r}"
            )
        limit = max_batch_bytes(replica)
        if request.content_length is not None and request.content_length > limit:
            raise BatchTooLarge(
                f"batch of {request.content_length} bytes for {replica.label} exceeds this "
                f"broker's limit of {limit} bytes",
                fix="split the change into smaller batches",
                details={"limit": limit, "content_length": request.content_length},
            )
        service.check_space(needed=request.content_length or 0, replica=replica)
        engine = service.engine_for(replica)
        receipt = await _journal(service, engine, request, limit, progress)
    except (*CLIENT_GONE, asyncio.CancelledError) as exc:
        # Nothing was acked and the partial journal file is gone: the agent sends it again.
        log.warning(
            "batch_upload_aborted",
            seq=progress.seq,
            bytes=progress.received,
            reason=reason_text(exc) if not isinstance(exc, asyncio.CancelledError) else "cancelled",
        )
        if isinstance(exc, asyncio.CancelledError):
            raise
        return json_error(
            BadRequest(
                f"upload of {vm_uuid}/{disk_id} aborted: {reason_text(exc)}",
                fix="nothing was acked; the agent sends the batch again",
            )
        )
    except BrokerError as exc:
        log.warning(
            "batch_refused",
            error=exc.code,
            status=exc.status,
            detail=exc.message,
            **{k: v for k, v in exc.details.items() if isinstance(v, int | str)},
        )
        if isinstance(exc, StorageFullError):
            service.storage_full(exc)
        return json_error(exc)
    if receipt.duplicate:
        log.info("batch_acked_duplicate", seq=receipt.acked_seq)
    else:
        log.info(
            "batch_journaled",
            seq=receipt.acked_seq,
            bytes=receipt.journal_bytes,
            direct=receipt.direct,
            ms=round((time.monotonic() - started) * 1000, 1),
            # A slow upload: the rest of ms is waiting for the agent's bytes.
            worker_ms=round(progress.worker_s * 1000, 1),
            finish_ms=round(progress.finish_s * 1000, 1),
        )
        service.storage_ok()
        engine.wake()
    return web.json_response({"acked_seq": receipt.acked_seq, "duplicate": receipt.duplicate})


def max_batch_bytes(replica: Replica) -> int:
    """The largest upload a replica accepts: a whole disk's worth, plus per-extent overhead."""
    size = replica.meta.disk_size
    return size + size // 128 + 32 * (size // 512 + 1) + (1 << 20)


@dataclass
class UploadProgress:
    """How far an upload got, for the event that reports an aborted one."""

    received: int = 0
    seq: int | None = None
    worker_s: float = 0.0  # decoding, verifying and writing the journal, on the ingest worker
    finish_s: float = 0.0  # of which the end: the journal file's fdatasync and rename


async def _journal(
    service: Ingest,
    engine: ReplicaEngine,
    request: web.Request,
    limit: int,
    progress: UploadProgress,
) -> Receipt:
    replica = engine.replica
    try:
        async with asyncio.timeout(LOCK_TIMEOUT):
            await engine.ingest_lock.acquire()
    except TimeoutError:
        raise UploadInProgress(
            f"another upload for {replica.label} is still in progress",
            fix="retry shortly; a stalled upload is dropped after "
            f"{IDLE_TIMEOUT:.0f} s without data",
        ) from None
    rx = BatchReceiver(
        service.store,
        replica,
        url_identity=replica.key,
        limits=service.limits,
        min_free_bytes=service.config.broker.min_free_bytes,
        max_batch_bytes=limit,
        direct=DirectApply(engine),
        epoch=service.epoch,
        held=engine.held,
        ahead=(undo := UploadUndo(engine)),
    )
    fence_due = True

    def step(batch: list[bytes], last: bool) -> Receipt | None:
        # One worker hop does the fence, the bytes read so far and, once the body has ended,
        # the finish: a batch under _FEED_BYTES (most of them) costs one hop, not three.
        nonlocal fence_due
        began = time.perf_counter()
        if fence_due:
            # The per-VM fence (decision 032) before anything is journaled (finish checks again).
            placement_fence(service.store, replica)
            fence_due = False
        rx.feed_many(batch)
        fed = time.perf_counter()
        receipt = rx.finish() if last or rx.duplicate else None
        progress.worker_s += time.perf_counter() - began
        progress.finish_s += time.perf_counter() - fed
        return receipt

    async def settle(feed: Future[Receipt | None]) -> Receipt | None:
        receipt = await asyncio.wrap_future(feed)
        if rx.header is not None:
            progress.seq = rx.header.seq
        return receipt

    # One feed is processed on a worker (decompress, verify, write) while the loop reads the next
    # from the network, so the agent's stream does not stall behind the worker: at most two
    # feeds (_FEED_BYTES each) in memory per upload, and rx is only ever used by one step.
    receipt: Receipt | None = None
    inflight: Future[Receipt | None] | None = None
    try:
        chunks: list[bytes] = []
        pending = 0
        ended = False
        while receipt is None:
            if not ended:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        chunk = await request.content.readany()
                except TimeoutError:
                    raise BadRequest(
                        f"upload for {replica.label} stalled for {IDLE_TIMEOUT:.0f} s",
                        fix="the agent retries",
                    ) from None
                if chunk:
                    # Hand the network's chunks over as they are: no joining copy.
                    chunks.append(chunk)
                    pending += len(chunk)
                    progress.received += len(chunk)
                    if pending < _FEED_BYTES:
                        continue
                else:
                    ended = True
            if inflight is not None:
                receipt = await settle(inflight)
                inflight = None
                if receipt is not None:  # a duplicate: the rest of the body is not needed
                    break
            batch, chunks, pending = chunks, [], 0
            inflight = submit_in(INGEST, step, batch, ended)
            if ended:
                receipt = await settle(inflight)
                inflight = None
    except BaseException:
        await _abandon(rx, inflight, progress, undo)
        raise
    finally:
        engine.ingest_lock.release()
    return receipt


async def _abandon(
    rx: BatchReceiver,
    unfinished: Future[Receipt | None] | None,
    progress: UploadProgress,
    undo: UploadUndo,
) -> None:
    """Drop an upload that failed: the partial journal file and undo capture go, nothing was
    acked."""

    def abort() -> None:
        if unfinished is not None:  # rx belongs to that step until it ends
            wait([unfinished])
        rx.abort()
        undo.drop()

    await run_in(INGEST, abort)
    if rx.header is not None:  # what the unfinished step had decoded, for the event
        progress.seq = rx.header.seq


async def replica_hashes(request: web.Request) -> web.Response:
    """GET hashes: block hashes of the replica as of its applied state, or as of ``point``:
    one of its own states (``G-S``) or its state at a VM point (``G:C``)."""
    service = request.app[SERVICE_KEY]
    ident = identity_of(request)
    vm_uuid = _vm_uuid(request)
    if ident.role != "admin":
        authorise_agent(service.config, ident, vm_uuid)
    service.check_owner(vm_uuid)
    replica = replica_of(service, vm_uuid, _disk_id(request))
    if ident.role != "admin":
        # Block hashes tell about the disk's contents: only its own source may read them.
        check_source(replica, ident)
    return await hashes_response(service, replica, request)


async def hashes_response(service: Ingest, replica: Replica, request: web.Request) -> web.Response:
    """Block hashes of ``replica`` as the request's query asks (range, block size, point)."""
    q = request.query
    try:
        block_size = int(q.get("block_size", replica.meta.block_size))
        offset = int(q.get("offset", 0))
        length = int(q.get("length", replica.meta.disk_size - offset))
    except ValueError:
        raise BadRequest("block_size, offset and length must be integers") from None
    if block_size < 512 or block_size & (block_size - 1) or block_size > 64 << 20:
        raise BadRequest(f"block_size {block_size} must be a power of two 512 .. 64 MiB")
    if offset < 0 or length < 0 or offset + length > replica.meta.disk_size or offset % 512:
        raise BadRequest(
            f"offset {offset} / length {length} are outside the disk ({replica.meta.disk_size} "
            "bytes) or not sector aligned"
        )
    if length // block_size > 1 << 24:
        raise BadRequest("too many blocks in one request; ask for a smaller range")
    raw = q.get("point")
    cut = parse_cut(names.vm_point_id(raw)) if raw is not None and ":" in raw else None
    key = parse_key(names.point_id(raw)) if raw is not None and cut is None else None
    try:
        wait = float(q.get("wait", 0))
    except ValueError:
        wait = -1.0
    if not wait >= 0:  # also refuses nan
        raise names.refuse("wait", q.get("wait"), "a number of seconds, 0 or more")
    engine = service.engine_for(replica)
    # The point check runs even without a wait: an unknown point is refused, never guessed.
    if cut is not None:
        if cut_pending(engine, cut) and wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait, MAX_HASHES_WAIT)):
                    await engine.wait_for_cut(cut)
        key = disk_key_at_cut(engine, replica, cut)
    elif key is not None and point_pending(engine, key) and wait > 0:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(wait, MAX_HASHES_WAIT)):
                await engine.wait_for_state(key)
    data, at = await asyncio.to_thread(service.hashes, engine, key, offset, length, block_size)
    headers = {
        "X-Replikant-Applied-Seq": str(at[1]),
        "X-Replikant-Generation": str(at[0]),
        "X-Replikant-Block-Size": str(block_size),
    }
    if cut is not None:
        headers["X-Replikant-Cut-Id"] = str(cut[1])
    return web.Response(body=data, content_type="application/octet-stream", headers=headers)
