"""The broker's HTTPS API (docs/protocol/http.md): batch ingest for agents, status for admins.

Every request arrives over mutual TLS (:class:`common.tls.MutualTLSSite`); who the peer is comes
from its certificate (:func:`common.tls.peer_identity`), never from its address. Handlers raise
:class:`~broker.errors.BrokerError`; the error middleware turns each one into the JSON refusal
body of http.md with its status code, and logs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from broker import names
from broker.errors import (
    BadRequest,
    BatchTooLarge,
    BrokerError,
    GenerationAhead,
    IdentityConflict,
    NotAuthorised,
    StaleGeneration,
    StorageFullError,
    UnknownPoint,
    UnknownVM,
    UploadInProgress,
)
from broker.journal import BatchReceiver
from broker.points import (
    CutKey,
    Key,
    VMPoint,
    cut_text,
    key_text,
    pair_by_cut,
    parse_cut,
    parse_key,
)
from broker.retention import journal_json
from broker.store import Replica
from common.config import NAME_PATTERN
from common.hrl import BATCH_CONTENT_TYPE
from common.logs import get_logger
from common.tls import Identity, TLSIdentityError, peer_identity

if TYPE_CHECKING:
    from broker.apply import ReplicaEngine
    from broker.service import BrokerService

_log = get_logger("broker.ingest")

SERVICE_KEY: web.AppKey[BrokerService] = web.AppKey("service")
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


def build_app(service: BrokerService) -> web.Application:
    """The aiohttp application of one broker."""
    app = web.Application(middlewares=[_errors], client_max_size=1 << 20)
    app[SERVICE_KEY] = service
    app.add_routes(
        [
            web.put("/v1/replicas/{vm_uuid}/{disk_id}", enable_replica),
            web.get("/v1/replicas/{vm_uuid}/{disk_id}", replica_state),
            web.post("/v1/replicas/{vm_uuid}/{disk_id}/batches", upload_batch),
            web.get("/v1/replicas/{vm_uuid}/{disk_id}/hashes", replica_hashes),
            web.get("/v1/status", status),
            web.get("/v1/vms/{vm}/points", vm_points),
            web.get("/v1/vms/{vm}/hashes", vm_hashes),
            web.post("/v1/vms/{vm}/source", set_source),
            web.post("/v1/vms/{vm}/exports", create_exports),
            web.get("/v1/exports", list_exports),
            web.delete("/v1/exports/{name}", delete_export),
            web.post("/v1/seed/import", seed_import),
        ]
    )
    return app


# --------------------------------------------------------------------------------------------
# Errors and identities


def _json_error(exc: BrokerError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    peer = _peer_text(request)  # now: once the client is gone its certificate is too
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException:
        raise
    except CLIENT_GONE as exc:
        # The peer went away (reset, closed mid-body, broken chunking): nothing to answer.
        _log.warning(
            "request_aborted",
            method=request.method,
            path=request.path,
            reason=_reason(exc),
            peer=peer,
        )
        raise web.HTTPBadRequest(text="request aborted") from None
    except BrokerError as exc:
        _log.warning(
            "request_refused",
            method=request.method,
            path=request.path,
            error=exc.code,
            status=exc.status,
            detail=exc.message,
            peer=peer,
        )
        return _json_error(exc)
    except Exception as exc:
        # A bug, not the peer's fault: one event with the traceback, and a JSON 500 that says so.
        _log.exception("request_failed", method=request.method, path=request.path, peer=peer)
        internal = BrokerError(
            f"the broker failed on {request.method} {request.path}: {type(exc).__name__}",
            fix="this is a broker bug: report it with the broker log's request_failed event",
        )
        return _json_error(internal)
    return response


CLIENT_GONE: Final = (ConnectionError, RequestPayloadError, HttpProcessingError)
"""What reading a request raises when the client resets, closes early or breaks the framing."""


class _OneEventPerProtocolError(logging.Filter):
    """aiohttp reports a request it cannot parse (bad request line, overlong header, broken
    chunking) with a traceback of its own parser: log one event naming the peer and the reason
    instead; the client already got aiohttp's 400."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        _log.warning("http_request_malformed", remote=str(remote), reason=_reason(exc))
        return False


HTTP_LOG: Final = logging.getLogger("broker.http")
"""The logger aiohttp's request handler reports to (``AppRunner(logger=HTTP_LOG)``)."""
HTTP_LOG.addFilter(_OneEventPerProtocolError())


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _peer_text(request: web.Request) -> str | None:
    try:
        return str(peer_identity(request))
    except (TLSIdentityError, TypeError):
        return None


def _identity(request: web.Request) -> Identity:
    try:
        return peer_identity(request)
    except TLSIdentityError as exc:
        raise NotAuthorised(
            f"the client certificate carries no usable identity: {exc.message}",
            fix=exc.fix,
            details={"reason": exc.reason},
        ) from None


def require_admin(request: web.Request) -> Identity:
    """Admin endpoints: only ``replikant://admin/...`` certificates."""
    ident = _identity(request)
    if ident.role != "admin":
        raise NotAuthorised(
            f"{ident} may not use {request.path}: admin endpoints need an admin certificate",
            fix="run the CLI with an admin certificate (`replikant certs issue admin`)",
            details={"identity": ident.uri, "rule": "role admin"},
        )
    return ident


def authorise_agent(service: BrokerService, ident: Identity, vm_uuid: str) -> None:
    """Replication endpoints: an agent allowed for this VM by the broker's configuration.

    The most specific rule wins: a ``[[vms]]`` entry with ``allowed_agents`` for this VM, else
    ``[authorization]`` (``mode = "any"``: every agent of our CA; ``"listed"``: ``agents``).
    """
    if ident.role != "agent":
        raise NotAuthorised(
            f"{ident} may not replicate: replication endpoints need an agent certificate",
            fix="only agents upload batches; admins use the admin endpoints",
            details={"identity": ident.uri, "rule": "role agent"},
        )
    cfg = service.config
    for vm in cfg.vms:
        if str(vm.uuid) == vm_uuid and vm.allowed_agents:
            if ident.name not in vm.allowed_agents:
                raise NotAuthorised(
                    f"agent {ident.name} may not replicate vm {vm_uuid}: the broker allows only "
                    f"{', '.join(vm.allowed_agents)} for it",
                    fix=f"add {ident.name!r} to allowed_agents of this VM in broker.toml",
                    details={
                        "identity": ident.uri,
                        "rule": "vms.allowed_agents",
                        "allowed": list(vm.allowed_agents),
                    },
                )
            return
    auth = cfg.authorization
    if auth.mode == "listed" and ident.name not in auth.agents:
        raise NotAuthorised(
            f"agent {ident.name} is not in this broker's list of agents allowed to replicate",
            fix=f"add {ident.name!r} to [authorization] agents in broker.toml",
            details={"identity": ident.uri, "rule": "authorization.listed"},
        )


def _vm_uuid(request: web.Request) -> str:
    return names.vm_uuid(request.match_info["vm_uuid"])


def _disk_id(request: web.Request) -> str:
    return names.disk_id(request.match_info["disk_id"])


def _body_error(what: str, exc: ValidationError) -> BadRequest:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(body)"
    return BadRequest(
        f"{what}: {field}: {first['msg']}",
        fix=f"correct {field} as the message says (docs/protocol/http.md)",
        details={"field": field, "rule": first["msg"], "errors": exc.error_count()},
    )


def _replica(service: BrokerService, vm_uuid: str, disk_id: str) -> Replica:
    replica = service.store.get(vm_uuid, disk_id)
    if replica is None:
        raise UnknownVM(
            f"vm {vm_uuid} disk {disk_id} is not enabled for replication on broker "
            f"{service.config.broker.node}",
            fix="enable it first (PUT /v1/replicas/{vm_uuid}/{disk_id}; the agent does this)",
            details={"vm_uuid": vm_uuid, "disk_id": disk_id},
        )
    return replica


def _check_source(replica: Replica, ident: Identity) -> None:
    src = replica.meta.source_host
    if src and src != ident.name:
        m = replica.meta
        raise NotAuthorised(
            f"agent {ident.name} may not write to the replica of {replica.identity_text()}: "
            f"it is bound to source host {src}",
            fix=f"if the VM really moved, an operator rebinds it: `replikant replica rebind "
            f"{m.vm_name} --host {ident.name}`",
            details={"identity": ident.uri, "rule": "replica.source_host", "source_host": src},
        )


def _check_generation(replica: Replica, ident: Identity, announced: int) -> None:
    m = replica.meta
    if announced < m.generation:
        raise StaleGeneration(
            f"{ident} announces vm {m.vm_name} at generation {announced} but the replica is at "
            f"generation {m.generation}",
            fix="the VM was failed over since; this source is fenced until reversed",
            details={"announced": announced, "replica_generation": m.generation},
        )
    if announced > m.generation:
        raise GenerationAhead(
            f"{ident} announces vm {m.vm_name} at generation {announced} but the replica is at "
            f"generation {m.generation}: an agent cannot raise a generation",
            fix=f"raising a generation is a failover act: `replikant replica set-generation "
            f"{m.vm_name} {announced}` if this source is the VM's new primary",
            details={
                "announced": announced,
                "replica_generation": m.generation,
                "rule": "replica.generation",
            },
        )


def state_json(service: BrokerService, replica: Replica) -> dict[str, Any]:
    """The replica state document of http.md."""
    m = replica.meta
    applied = m.applied_seq if m.applied_generation == m.generation else 0
    engine = service.engines.get(replica.key)
    return {
        "vm_uuid": m.vm_uuid,
        "disk_id": m.disk_id,
        "vm_name": m.vm_name,
        "disk_size": m.disk_size,
        "block_size": m.block_size,
        "generation": m.generation,
        "applied_seq": applied,
        "durable_seq": m.durable_seq,
        "durable_cut_id": m.durable_cut_id,
        "epoch": service.epoch,
        "initial_sync": m.initial_sync,
        "site": service.config.broker.site,
        "source_host": m.source_host,
        "health": engine.health() if engine is not None else "ok",
    }


# --------------------------------------------------------------------------------------------
# Replication endpoints


async def enable_replica(request: web.Request) -> web.Response:
    """PUT: create (or re-announce) the replica of one disk; answers its state."""
    service = request.app[SERVICE_KEY]
    ident = _identity(request)
    vm_uuid = _vm_uuid(request)
    disk_id = _disk_id(request)
    authorise_agent(service, ident, vm_uuid)
    what = f"PUT body for vm {vm_uuid} disk {disk_id} is invalid"
    try:
        body = EnableRequest.model_validate(await request.json())
    except ValidationError as exc:
        raise _body_error(what, exc) from None
    except ValueError as exc:
        raise BadRequest(f"{what}: not JSON ({exc})") from None
    service.check_owner()
    replica = service.store.get(vm_uuid, disk_id)
    if replica is not None:
        m = replica.meta
        _check_source(replica, ident)
        _check_generation(replica, ident, body.generation)
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
        )
        service.engine_for(created)
        replica = created
    return web.json_response(state_json(service, replica))


async def replica_state(request: web.Request) -> web.Response:
    """GET: the replica's state (agents resume from ``durable_seq + 1``)."""
    service = request.app[SERVICE_KEY]
    ident = _identity(request)
    vm_uuid = _vm_uuid(request)
    if ident.role != "admin":
        authorise_agent(service, ident, vm_uuid)
    replica = _replica(service, vm_uuid, _disk_id(request))
    if ident.role != "admin":
        _check_source(replica, ident)
    return web.json_response(state_json(service, replica))


async def upload_batch(request: web.Request) -> web.Response:
    """POST: stream, verify and journal one batch; ack only once it is durable."""
    service = request.app[SERVICE_KEY]
    ident = _identity(request)
    vm_uuid = _vm_uuid(request)
    disk_id = _disk_id(request)
    started = time.monotonic()
    log = _log.bind(vm_uuid=vm_uuid, disk=disk_id, peer=ident.uri, epoch=service.epoch)
    progress = UploadProgress()
    try:
        authorise_agent(service, ident, vm_uuid)
        replica = _replica(service, vm_uuid, disk_id)
        log = log.bind(vm=replica.meta.vm_name, generation=replica.meta.generation)
        _check_source(replica, ident)
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
        service.check_owner()
        engine = service.engine_for(replica)
        receipt = await _journal(service, engine, request, limit, progress)
    except (*CLIENT_GONE, asyncio.CancelledError) as exc:
        # Nothing was acked and the partial journal file is gone: the agent sends it again.
        log.warning(
            "batch_upload_aborted",
            seq=progress.seq,
            bytes=progress.received,
            reason=_reason(exc) if not isinstance(exc, asyncio.CancelledError) else "cancelled",
        )
        if isinstance(exc, asyncio.CancelledError):
            raise
        return _json_error(
            BadRequest(
                f"upload of {vm_uuid}/{disk_id} aborted: {_reason(exc)}",
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
        return _json_error(exc)
    if receipt.duplicate:
        log.info("batch_acked_duplicate", seq=receipt.acked_seq)
    else:
        log.info(
            "batch_journaled",
            seq=receipt.acked_seq,
            bytes=receipt.journal_bytes,
            direct=receipt.direct,
            ms=round((time.monotonic() - started) * 1000, 1),
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


async def _journal(
    service: BrokerService,
    engine: ReplicaEngine,
    request: web.Request,
    limit: int,
    progress: UploadProgress,
) -> Any:
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
        direct=engine.direct_sink(),
    )
    try:
        chunks: list[bytes] = []
        pending = 0
        while True:
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
            if chunks:
                batch, chunks, pending = chunks, [], 0
                await asyncio.to_thread(rx.feed_many, batch)
                if rx.header is not None:
                    progress.seq = rx.header.seq
                if rx.duplicate:
                    break
            if not chunk:
                break
        receipt = await asyncio.to_thread(rx.finish)
    except BaseException:
        await asyncio.to_thread(rx.abort)
        raise
    finally:
        engine.ingest_lock.release()
    return receipt


async def replica_hashes(request: web.Request) -> web.Response:
    """GET hashes: block hashes of the replica as of its applied state, or as of ``point``:
    one of its own states (``G-S``) or its state at a VM point (``G:C``)."""
    service = request.app[SERVICE_KEY]
    ident = _identity(request)
    vm_uuid = _vm_uuid(request)
    if ident.role != "admin":
        authorise_agent(service, ident, vm_uuid)
    replica = _replica(service, vm_uuid, _disk_id(request))
    if ident.role != "admin":
        # Block hashes tell about the disk's contents: only its own source may read them.
        _check_source(replica, ident)
    return await _hashes_response(service, replica, request)


async def _hashes_response(
    service: BrokerService, replica: Replica, request: web.Request
) -> web.Response:
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
        if _cut_pending(engine, cut) and wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait, MAX_HASHES_WAIT)):
                    await engine.wait_for_cut(cut)
        key = disk_key_at_cut(engine, replica, cut)
    elif key is not None and _point_pending(engine, key) and wait > 0:
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


def disk_key_at_cut(engine: ReplicaEngine, replica: Replica, cut: CutKey) -> Key:
    """This disk's state at VM cut ``cut``; :class:`UnknownPoint` if it has none."""
    for info in engine.points.points(engine.state(), include_hidden=True):
        if info.state.cut == cut:
            return info.state.key
    raise UnknownPoint(
        f"disk {replica.meta.disk_id} of {replica.meta.vm_name} has no state at VM point "
        f"{cut_text(cut)} (its batch of that cut did not arrive, or retention dropped it)",
        fix="`replikant points VM` lists the VM points every disk has",
        details={"point": cut_text(cut), "disk": replica.meta.disk_id},
    )


def _cut_pending(engine: ReplicaEngine, cut: CutKey) -> bool:
    """True when VM cut ``cut`` is durable on this disk but not yet applied (worth waiting
    for); False when the applied state is at or past it; :class:`UnknownPoint` when this disk
    can never reach it."""
    m = engine.replica.meta
    if cut <= engine.state().cut:
        return False
    if cut[0] == m.generation and cut[1] <= m.durable_cut_id:
        return True
    raise UnknownPoint(
        f"VM point {cut_text(cut)} is beyond what {engine.replica.label} holds durably "
        f"(generation {m.generation}, cut {m.durable_cut_id}): it may never exist",
        fix="ask for a point the VM has (`replikant points VM`)",
        details={"point": cut_text(cut), "durable": cut_text((m.generation, m.durable_cut_id))},
    )


def _point_pending(engine: ReplicaEngine, key: Key) -> bool:
    """True when ``key`` is durable but not yet applied (worth waiting for); False when it is a
    point of this replica now; :class:`UnknownPoint` when it can never become one."""
    m = engine.replica.meta
    state = engine.state()
    if key > state.key:
        if key[0] == m.generation and key[1] <= m.durable_seq:
            return True
        raise UnknownPoint(
            f"point {key_text(key)} of {engine.replica.label} is beyond what is durable "
            f"(generation {m.generation}, durable seq {m.durable_seq}): it may never exist",
            fix="ask for a point the replica holds (`replikant points VM`)",
            details={"point": key_text(key), "durable": key_text((m.generation, m.durable_seq))},
        )
    kept = [p.state.key for p in engine.points.points(state, include_hidden=True)]
    if key not in kept:
        raise UnknownPoint(
            f"point {key_text(key)} is not a point of {engine.replica.label}: it was never "
            "cut or is older than what retention keeps",
            fix="ask for a point the replica holds (`replikant points VM`)",
            details={"point": key_text(key), "oldest": key_text(min(kept)) if kept else None},
        )
    return False


# --------------------------------------------------------------------------------------------
# Admin endpoints


def _disk_json(service: BrokerService, replica: Replica) -> dict[str, Any]:
    engine = service.engine_for(replica)
    m = replica.meta
    state = engine.state()
    return {
        **state_json(service, replica),
        "backlog": engine.backlog(),
        "undo_bytes": engine.points.undo_bytes(),
        "journal": journal_json(engine),
        "replica_image": str(replica.image),
        "last_cut": state.cut_ns / 1e9 if state.cut_ns else None,
        "conditions": [
            {"code": c.code, "level": c.level, "message": c.message}
            for c in engine.conditions.values()
        ],
        "rpo_seconds": m.rpo_seconds,
        "labels": m.labels,
    }


def vm_status(service: BrokerService, replicas: list[Replica], now: float) -> dict[str, Any]:
    """One VM's entry of ``GET /v1/status``."""
    first = replicas[0].meta
    disks = [_disk_json(service, r) for r in replicas]
    levels = [d["health"] for d in disks]
    health = "critical" if "critical" in levels else "warning" if "warning" in levels else "ok"
    if service.conditions and health != "critical":
        health = max(
            (c.level for c in service.conditions.values()),
            key=["ok", "warning", "critical"].index,
        )
    cuts = [d["last_cut"] for d in disks]
    lag = None if any(c is None for c in cuts) else max(0.0, now - min(c for c in cuts if c))
    rpo = min((r.meta.rpo_seconds or 60.0) for r in replicas)
    if health == "ok" and (lag is None or lag > rpo):
        health = "warning"
    if health == "ok" and any(d["initial_sync"] != "complete" for d in disks):
        health = "warning"
    roles: dict[str, str] = {}
    if first.source_site:
        roles[first.source_site] = "PRIMARY"
    roles[service.config.broker.site] = "REPLICA"
    last = _vm_latest_point(service, replicas)
    return {
        "name": first.vm_name,
        "uuid": first.vm_uuid,
        "roles": roles,
        "generation": first.generation,
        "health": health,
        "lag_seconds": None if lag is None else round(lag, 3),
        "rpo_seconds": rpo,
        "last_point": last,
        "source_host": first.source_host,
        "disks": disks,
    }


def _vm_latest_point(service: BrokerService, replicas: list[Replica]) -> dict[str, Any] | None:
    points = vm_point_list(service, replicas)
    return points[0] if points else None


def _vm_points(service: BrokerService, replicas: list[Replica]) -> list[VMPoint]:
    per_disk = []
    for replica in replicas:
        engine = service.engine_for(replica)
        per_disk.append(engine.points.points(engine.state()))
    return pair_by_cut(per_disk)


def vm_point_list(service: BrokerService, replicas: list[Replica]) -> list[dict[str, Any]]:
    """A VM's points, newest first: the cuts every disk of it has (never a join of seqs)."""
    disk_ids = [r.meta.disk_id for r in replicas]
    now, vm = time.time_ns(), replicas[0].meta.vm_uuid
    tier = service.retainer.tier_label
    return [
        {**p.to_json(disk_ids), "tier": tier(vm, p, now)} for p in _vm_points(service, replicas)
    ]


def resolve_vm_point(
    service: BrokerService, replicas: list[Replica], point: str
) -> tuple[str, list[Key]]:
    """The id of VM point ``point`` (``"G:C"`` or ``"latest"``) and each disk's state at it, in
    replica order.

    ``latest`` is the newest VM point, not each disk's newest state: those may belong to
    different cuts (a batch of one disk still on its way).
    """
    points = _vm_points(service, replicas)
    if point == "latest":
        if not points:
            raise UnknownPoint(
                f"vm {replicas[0].meta.vm_name} has no recovery point yet: no cut has reached "
                "every one of its disks",
                fix="wait for the initial copy and the first delta cycle of every disk",
            )
        return points[0].id, [d.state.key for d in points[0].disks]
    cut = parse_cut(point)
    for p in points:
        if p.cut == cut:
            return p.id, [d.state.key for d in p.disks]
    raise UnknownPoint(
        f"vm {replicas[0].meta.vm_name} has no recovery point {point}",
        fix="`replikant points VM` lists the retained points",
        details={"point": point},
    )


def status_vms(service: BrokerService) -> list[dict[str, Any]]:
    """Every replicated VM's status entry, sorted by name (the body of GET /v1/status)."""
    now = time.time()
    by_vm: dict[str, list[Replica]] = {}
    for replica in service.store.replicas():
        by_vm.setdefault(replica.meta.vm_uuid, []).append(replica)
    vms = [vm_status(service, reps, now) for reps in by_vm.values()]
    vms.sort(key=lambda v: v["name"])
    return vms


async def status(request: web.Request) -> web.Response:
    """GET /v1/status: every VM with its roles, health, lag and last point."""
    service = request.app[SERVICE_KEY]
    require_admin(request)
    return web.json_response({"vms": status_vms(service), "broker": service.broker_json()})


def _vm_replicas(service: BrokerService, vm: str) -> list[Replica]:
    names.name(vm, "vm")
    found = service.store.find_vm(vm)
    if not found:
        raise UnknownVM(
            f"no VM named or with UUID {vm!r} is replicated to broker {service.config.broker.node}",
            fix="`replikant status` lists the VMs",
            details={"vm": vm},
        )
    return found


async def vm_points(request: web.Request) -> web.Response:
    """GET /v1/vms/{vm}/points: recovery points, newest first."""
    service = request.app[SERVICE_KEY]
    require_admin(request)
    replicas = _vm_replicas(service, request.match_info["vm"])
    return web.json_response(
        {
            "vm": replicas[0].meta.vm_name,
            "uuid": replicas[0].meta.vm_uuid,
            "points": vm_point_list(service, replicas),
            "journal": [journal_json(service.engine_for(r)) for r in replicas],
        }
    )


async def vm_hashes(request: web.Request) -> web.Response:
    """GET /v1/vms/{vm}/hashes?disk=D: per-disk block hashes (admin, for verify)."""
    service = request.app[SERVICE_KEY]
    require_admin(request)
    replicas = _vm_replicas(service, request.match_info["vm"])
    disk = names.disk_id(request.query.get("disk", replicas[0].meta.disk_id), "disk")
    for replica in replicas:
        if replica.meta.disk_id == disk:
            return await _hashes_response(service, replica, request)
    raise UnknownVM(f"vm {request.match_info['vm']} has no disk {disk!r} here")


async def create_exports(request: web.Request) -> web.Response:
    """POST /v1/vms/{vm}/exports {"point": "G:C"|"latest", "read_only": false}: PIT exports."""
    service = request.app[SERVICE_KEY]
    require_admin(request)
    replicas = _vm_replicas(service, request.match_info["vm"])
    try:
        body = await request.json() if request.can_read_body else {}
    except json.JSONDecodeError:
        raise BadRequest("body must be JSON") from None
    if not isinstance(body, dict):
        raise BadRequest('body must be a JSON object such as {"point": "1:1042"}')
    point = names.vm_point_id(body.get("point", "latest"))
    point_id, keys = resolve_vm_point(service, replicas, point)
    exports = await service.create_exports(
        replicas, point_id, keys, read_only=bool(body.get("read_only"))
    )
    return web.json_response({"exports": exports}, status=201)


async def list_exports(request: web.Request) -> web.Response:
    """GET /v1/exports: the point-in-time exports being served."""
    service = request.app[SERVICE_KEY]
    require_admin(request)
    return web.json_response({"exports": service.list_exports()})


async def delete_export(request: web.Request) -> web.Response:
    """DELETE /v1/exports/{name}: stop serving, delete the overlay."""
    service = request.app[SERVICE_KEY]
    require_admin(request)
    name = names.export_name(request.match_info["name"])
    await service.remove_export(name)
    return web.json_response({"removed": name})


async def seed_import(request: web.Request) -> web.Response:
    """POST /v1/seed/import {"dir": PATH, "vm": optional}: load an offline-media export."""
    service = request.app[SERVICE_KEY]
    require_admin(request)
    try:
        body = await request.json()
        image = body.get("image")
        directory = str(body.get("dir") or "")
        if not directory and not image:
            raise KeyError("dir")
        vm = body.get("vm")
        raw = (str(image), str(body["vm"]), str(body.get("disk", "disk0"))) if image else None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise BadRequest(
            'body must be {"dir": "/media/on/broker/host"} or {"image": PATH, "vm": VM, '
            '"disk": DISK}'
        ) from None
    if vm is not None:
        names.name(vm, "vm")
    if raw is not None:
        names.disk_id(raw[2], "disk")
    result = await service.seed_import(directory, expect_vm=vm, image=raw)
    return web.json_response(result)


async def set_source(request: web.Request) -> web.Response:
    """POST /v1/vms/{vm}/source {"host": H, "generation": N}: rebind or raise the generation.

    The operator's (or failover's) act that an agent's PUT can never do: bind the VM's replicas
    to another source host, and/or raise their generation (fencing the old primary).
    """
    service = request.app[SERVICE_KEY]
    admin = require_admin(request)
    replicas = _vm_replicas(service, request.match_info["vm"])
    try:
        body = SourceChange.model_validate(await request.json())
    except ValidationError as exc:
        raise _body_error("source change is invalid", exc) from None
    except ValueError as exc:
        raise BadRequest(f"source change is not JSON ({exc})") from None
    if body.host is None and body.generation is None:
        raise BadRequest(
            'the body names nothing to change: give "host", "generation" or both',
            details={"field": "(body)", "rule": "host and/or generation"},
        )
    service.check_owner()
    await service.change_source(replicas, admin, host=body.host, generation=body.generation)
    return web.json_response(
        {"vm": replicas[0].meta.vm_name, "disks": [state_json(service, r) for r in replicas]}
    )


class SourceChange(BaseModel):
    """Body of ``POST /v1/vms/{vm}/source``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str | None = Field(default=None, pattern=NAME_PATTERN)
    generation: int | None = Field(default=None, ge=1)
