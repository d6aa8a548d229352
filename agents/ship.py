"""Shipping batches to the broker: the HTTPS client, pacing and backoff.

The streamed body of a batch upload lives in :mod:`agents.body` (re-exported here).

See ``docs/protocol/http.md`` for the endpoints and ``docs/agent.md`` for the sequencing rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import aiohttp

from agents.errors import FencedError, ShipError
from common.hrl import BATCH_CONTENT_TYPE
from common.logs import get_logger
from common.refusal import Refusal, not_our_service
from common.tls import IdentityCheckingConnector, TLSIdentityError, describe_client_failure

log = get_logger("agents.ship")

# Errors whose cause will not go away by retrying the same thing: the operator must act.
_FENCED = frozenset({"stale_generation", "identity_conflict", "wrong_identity"})


@dataclass(frozen=True)
class ReplicaState:
    """The broker's view of one replica (``GET /v1/replicas/{vm}/{disk}``)."""

    generation: int
    durable_seq: int
    applied_seq: int
    initial_sync: str
    disk_size: int
    durable_cut_id: int = 0  # the VM cut of the newest durable batch (0: none, or an old broker)
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ReplicaState:
        """Parse the broker's JSON, tolerating extra fields."""
        try:
            return cls(
                generation=int(body.get("generation", 1)),
                durable_seq=int(body["durable_seq"]),
                applied_seq=int(body.get("applied_seq", body["durable_seq"])),
                initial_sync=str(body.get("initial_sync", "pending")),
                disk_size=int(body.get("disk_size", 0)),
                durable_cut_id=int(body.get("durable_cut_id", 0)),
                raw=body,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ShipError(f"the broker answered a replica state without {exc}") from None


@dataclass(frozen=True)
class Ack:
    """A durable ack of one batch."""

    seq: int
    duplicate: bool


class TokenBucket:
    """Paces bytes to ``rate`` per second with bursts of up to ``burst`` bytes (0 = unlimited)."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate / 4, 256 * 1024)
        self._tokens = self.burst
        self._stamp = time.monotonic()

    async def take(self, n: int) -> None:
        """Wait until ``n`` bytes may go (a chunk larger than the burst goes on credit)."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= n
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


class Backoff:
    """Capped exponential backoff with full jitter (AWS architecture blog's "full jitter")."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0

    def next_delay(self) -> float:
        """Record a failure and return how long to wait before the next attempt."""
        self.failures += 1
        ceiling = min(self.cap, self.base * (2 ** min(self.failures - 1, 30)))
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """Record a success."""
        self.failures = 0


# A server that refuses our certificate (TLS 1.3) hangs up within moments of the handshake.
_REFUSAL_WINDOW = 2.0


class NetworkFailure(Exception):
    """No answer came from a broker; ``error`` names why, and the fix."""

    def __init__(self, error: ShipError) -> None:
        super().__init__(error.message)
        self.error = error


Sender = Callable[[str, bool, str], Awaitable[tuple[int, bytes, str]]]
"""Makes one upload elsewhere: given the URL, whether that broker took our certificate before
and what the request is (for errors), the answer's status, body and reason; raises
:class:`NetworkFailure` when no answer came."""


@dataclass
class _InFlight:
    """A request waiting on a broker, so that :meth:`BrokerClient.follow` can drop it."""

    base: str
    loop: asyncio.AbstractEventLoop
    task: asyncio.Task[Any]
    exchange: Exchange


@dataclass
class Exchange:
    """How far one request got before it failed (filled in by aiohttp's trace callbacks)."""

    new_connection: bool = False  # a connection (and TLS handshake) was made for this request
    connected_at: float = 0.0  # monotonic time the handshake completed
    sent_bytes: int = 0  # request body bytes handed to the connection
    answered: bool = False  # response headers arrived
    abandoned_for: str = ""  # the member we moved to while this request waited (see follow)

    def just_after_handshake(self) -> bool:
        """Whether a hang-up can only mean our certificate was refused: nothing of the request
        was answered on a connection whose handshake had just completed."""
        return (
            self.new_connection
            and not self.answered
            and time.monotonic() - self.connected_at < _REFUSAL_WINDOW
        )


def _tracing() -> aiohttp.TraceConfig:
    """Trace callbacks that fill the :class:`Exchange` passed as ``trace_request_ctx``."""
    trace = aiohttp.TraceConfig()

    async def created(_s: Any, ctx: Any, _p: Any) -> None:
        if isinstance(ctx.trace_request_ctx, Exchange):
            ctx.trace_request_ctx.new_connection = True
            ctx.trace_request_ctx.connected_at = time.monotonic()

    async def chunk(_s: Any, ctx: Any, params: aiohttp.TraceRequestChunkSentParams) -> None:
        if isinstance(ctx.trace_request_ctx, Exchange):
            ctx.trace_request_ctx.sent_bytes += len(params.chunk)

    async def answered(_s: Any, ctx: Any, _p: Any) -> None:
        if isinstance(ctx.trace_request_ctx, Exchange):
            ctx.trace_request_ctx.answered = True

    trace.on_connection_create_end.append(created)
    trace.on_request_chunk_sent.append(chunk)
    trace.on_request_end.append(answered)
    return trace


class BrokerClient:
    """The agent side of ``docs/protocol/http.md``, over HTTPS with mutual TLS.

    ``urls`` are the brokers of the target cluster; a refused connection or a ``not_owner``
    answer moves on to the next one for the following request, unless the refusal names the
    member to use (``details.owner_url``): then that one is followed (:meth:`follow`) until it
    fails, and the rotation over ``urls`` resumes. Over TLS, every server must
    present a broker identity (of ``cluster``, when given) before a request goes out; another
    identity is a permanent refusal (:class:`FencedError`, code ``wrong_role`` /
    ``wrong_cluster``).
    """

    def __init__(
        self,
        urls: list[str],
        ssl_context: ssl.SSLContext | None,
        *,
        connect_timeout: float = 10.0,
        ack_timeout: float = 300.0,
        cluster: str | None = None,
    ) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.cluster = cluster
        self._current = 0
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=ack_timeout
        )
        self._session: aiohttp.ClientSession | None = None
        self._accepted: set[str] = set()  # brokers that answered us: they took our certificate
        # [followed URL] or []: shared with twins, so a redirect learnt on one loop holds for all.
        self._followed: list[str] = []
        # Where each VM was sent last (decision 032: a cluster spreads VMs over its members), so
        # the VMs of one host served by two members do not bounce the host between them.
        self._by_vm: dict[str, str] = {}
        # Requests waiting on a broker, on any twin's loop: a frozen member never answers them.
        self._inflight: dict[int, _InFlight] = {}
        self._inflight_lock = threading.Lock()
        self._owner: list[str] = []  # [the owner record's URL] or [], shared with twins

    def twin(self) -> BrokerClient:
        """A client for another event loop (an aiohttp session belongs to one), sharing what
        this one learnt of which brokers accepted our certificate (agents.shiploop)."""
        other = BrokerClient(self.urls, self._ssl, cluster=self.cluster)
        other._timeout = self._timeout
        other._accepted = self._accepted
        other._followed = self._followed
        other._by_vm = self._by_vm
        other._inflight = self._inflight
        other._inflight_lock = self._inflight_lock
        other._owner = self._owner
        return other

    @property
    def timeouts(self) -> tuple[float | None, float | None]:
        """Seconds to connect, and to wait for each read of an answer (the ack)."""
        return self._timeout.connect, self._timeout.sock_read

    @property
    def url(self) -> str:
        """The broker currently used."""
        return self._followed[0] if self._followed else self.urls[self._current]

    def follow(self, url: str, *, redirect: bool = False) -> bool:
        """Send the next requests to ``url`` (the member a broker's ``redirect`` or the owner
        record named), until it fails; it must present a broker identity of our cluster like
        any other. Returns whether it is followed (only ``https://`` URLs are).

        When the owner record moves to another member, requests still waiting on the previous
        owner are dropped (:meth:`_abandon`). A redirect does not do that: in a cluster that
        spreads VMs, it names the member of one VM, while the others stay where they are.
        """
        url = url.rstrip("/")
        if not url.startswith("https://"):
            log.warning("broker_redirect_ignored", url=url, reason="not an https:// URL")
            return False
        if url != self.url:
            log.info("broker_followed", url=url, previous=self.url)
        self._followed[:] = [url]
        if not redirect:
            previous = self._owner[0] if self._owner else url
            self._owner[:] = [url]
            if previous != url:
                self._abandon(previous, url)
        return True

    def _abandon(self, stale: str, now: str) -> None:
        """Drop the requests still waiting on ``stale``, which another member replaced (a
        frozen owner would hold them for the whole ack timeout): each fails with ``owner_moved``
        and its disk resumes at ``now`` from the replica's durable seq, as after any failure."""
        for vm, member in list(self._by_vm.items()):
            if member == stale:
                self._by_vm.pop(vm, None)
        try:
            current = asyncio.current_task()
        except RuntimeError:  # called off any event loop
            current = None
        with self._inflight_lock:
            stuck = [(k, e) for k, e in self._inflight.items() if e.base == stale]
        if stuck:
            log.warning("broker_request_abandoned", url=stale, owner_url=now, requests=len(stuck))
        for key, entry in stuck:
            if entry.task is current:
                continue  # the refusal that taught us is being raised already
            entry.exchange.abandoned_for = now
            with contextlib.suppress(RuntimeError):  # that loop has closed: nothing waits
                entry.loop.call_soon_threadsafe(self._cancel_inflight, key)

    def _cancel_inflight(self, key: int) -> None:
        # On the request's own loop: still registered means still waiting inside the request.
        with self._inflight_lock:
            entry = self._inflight.get(key)
        if entry is not None:
            entry.task.cancel()

    def _rotate(self) -> None:
        if self._followed:
            # The followed member failed us: back to the configured list, from where we were.
            self._followed.clear()
            return
        self._current = (self._current + 1) % len(self.urls)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No pool limit (aiohttp's default is 100 connections): every disk holds one for
            # its upload until the broker acks, so 100 disks under load would queue every other
            # request, and each other's uploads, behind the pool. The disks bound the count.
            connector = IdentityCheckingConnector(
                role="broker", cluster=self.cluster, ssl=self._ssl if self._ssl else False, limit=0
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                raise_for_status=False,
                trace_configs=[_tracing()],
            )
        return self._session

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    @staticmethod
    def _path(vm_uuid: UUID, disk_id: str) -> str:
        return f"/v1/replicas/{vm_uuid}/{disk_id}"

    async def _request(
        self,
        method: str,
        path: str,
        *,
        expect: str = "json",
        what: str = "",
        send: Sender | None = None,
        **kwargs: Any,
    ) -> tuple[Any, dict[str, str]]:
        """One request, to the member that serves the path's VM, with the bookkeeping of which
        members answer: ``send`` makes the exchange elsewhere (the shipping process), else
        :meth:`exchange` makes it here."""
        vm = path.split("/")[3] if path.startswith("/v1/replicas/") else ""
        base = self._by_vm.get(vm) or self.url
        url = base + path
        what = what or f"waiting for the answer to {method} {path}"
        exchange = Exchange()
        task = asyncio.current_task()
        assert task is not None
        with self._inflight_lock:
            self._inflight[id(exchange)] = _InFlight(
                base, asyncio.get_running_loop(), task, exchange
            )
        try:
            accepted = base in self._accepted
            if send is None:
                status, raw, reason, headers = await self.exchange(
                    method, url, what=what, accepted=accepted, trace=exchange, **kwargs
                )
            else:
                (status, raw, reason), headers = await send(url, accepted, what), {}
            self._accepted.add(base)
            if status >= 400:
                self._refusal(status, raw, reason, url, vm)
            if expect != "json":
                return raw, headers
            try:
                return (json.loads(raw) if raw.strip() else None), headers
            except ValueError as exc:
                raise NetworkFailure(
                    self._network_error(url, exc, exchange, what, accepted=True)
                ) from None
        except asyncio.CancelledError:
            if not exchange.abandoned_for:
                raise
            task.uncancel()  # our own cancel, not the caller's: the caller sees a ShipError
            self._by_vm.pop(vm, None)
            raise ShipError(
                f"{what} abandoned at broker {base}: the cluster moved to "
                f"{exchange.abandoned_for}; resuming there",
                fix="nothing to do: the disk resumes from the replica's durable seq",
                code="owner_moved",
            ) from None
        except NetworkFailure as failure:
            self._by_vm.pop(vm, None)
            if base == self.url:  # a VM's own member failing says nothing of the others
                self._rotate()
            raise failure.error from None
        finally:
            with self._inflight_lock:
                self._inflight.pop(id(exchange), None)

    async def exchange(
        self,
        method: str,
        url: str,
        *,
        what: str,
        accepted: bool,
        trace: Exchange | None = None,
        **kwargs: Any,
    ) -> tuple[int, bytes, str, dict[str, str]]:
        """One request to ``url`` and its whole answer (status, body, reason, headers), with no
        bookkeeping; :class:`NetworkFailure` (naming the cause and the fix) when none came.
        ``accepted``: whether that broker took our certificate before."""
        trace = trace if trace is not None else Exchange()
        try:
            async with self._get_session().request(
                method, url, trace_request_ctx=trace, **kwargs
            ) as resp:
                return resp.status, await resp.read(), str(resp.reason or ""), dict(resp.headers)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, TLSIdentityError) as exc:
            raise NetworkFailure(
                self._network_error(url, exc, trace, what, accepted=accepted)
            ) from None

    @staticmethod
    def _network_error(
        url: str, exc: BaseException, exchange: Exchange, what: str, *, accepted: bool
    ) -> ShipError:
        """Name what went wrong with the broker at ``url`` (TLS first), with the fix.

        A hang-up is blamed on our certificate only right after a fresh handshake with nothing
        answered, by a broker that never answered us (``accepted``: it took our certificate
        before); otherwise it is what it is: a reset by the broker or the network mid-request.
        """
        rejection = describe_client_failure(exc, url=url, role="agent", cert="<[tls] cert>")
        if (
            rejection is not None
            and rejection.reason == "connection_closed"
            and (accepted or not exchange.just_after_handshake())
        ):
            sent = f" after {exchange.sent_bytes} bytes" if exchange.sent_bytes else ""
            return ShipError(
                f"connection to broker {url} reset by the broker or the network {what}{sent} "
                f"({type(exc).__name__}); will retry with backoff",
                fix="nothing to do if it passes; if it repeats, read the broker's log and check "
                "the network between agent and broker",
                code="connection_reset",
            )
        if rejection is not None and rejection.reason in ("wrong_role", "wrong_cluster"):
            # Not a broker of our cluster: retrying the same URL can never help.
            log.error(
                "broker_identity_refused",
                url=url,
                reason=rejection.reason,
                detail=rejection.detail,
                fix=rejection.fix,
            )
            return FencedError(
                f"refused broker {url}: {rejection.detail}",
                fix=rejection.fix,
                code=rejection.reason,
            )
        if rejection is not None:
            rejection.log()
            return ShipError(
                f"broker {url}: {rejection.detail}", fix=rejection.fix, code="unreachable"
            )
        if isinstance(exc, ValueError | aiohttp.ContentTypeError):
            message, fix = not_our_service(
                url,
                "broker",
                "[broker] urls in the agent config: they must be the brokers' "
                "https:// listen addresses",
            )
            return ShipError(message, fix=fix, code="unreachable")
        return ShipError(
            f"broker {url} unreachable or broke off: {type(exc).__name__}: {exc}",
            code="unreachable",
        )

    def _refusal(self, status: int, raw: bytes, reason: str, url: str, vm: str = "") -> None:
        text = raw.decode("utf-8", "replace")
        try:
            body = json.loads(text)
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        refusal = Refusal.from_body(status, body, fallback=text[:200] or reason)
        details = body.get("details")
        owner_url = details.get("owner_url") if isinstance(details, dict) else None
        if refusal.code == "not_owner" and isinstance(owner_url, str) and owner_url:
            # The member says who serves us: go there next. One that names itself is still
            # taking over: ask the others meanwhile.
            if owner_url.rstrip("/") == url.split("/v1/", 1)[0] or not self.follow(
                owner_url, redirect=True
            ):
                self._by_vm.pop(vm, None)
                self._rotate()
            elif vm:
                self._by_vm[vm] = owner_url.rstrip("/")
        elif status in (502, 503, 504):
            self._by_vm.pop(vm, None)
            self._rotate()  # not the owner (or a proxy in trouble): try another broker next
        if refusal.code in _FENCED:
            raise FencedError(
                f"broker {url} refused: {refusal.message}", fix=refusal.fix, code=refusal.code
            )
        raise ShipError(
            refusal.sentence(f"broker {url}"),
            fix=refusal.fix,
            code=refusal.code,
            status=status,
        )

    async def enable(self, vm_uuid: UUID, disk_id: str, body: dict[str, Any]) -> ReplicaState:
        """``PUT`` the replica (idempotent) and return its state."""
        data, _ = await self._request("PUT", self._path(vm_uuid, disk_id), json=body)
        return ReplicaState.from_json(data)

    async def state(self, vm_uuid: UUID, disk_id: str) -> ReplicaState:
        """``GET`` the replica's state."""
        data, _ = await self._request("GET", self._path(vm_uuid, disk_id))
        return ReplicaState.from_json(data)

    async def upload(
        self, vm_uuid: UUID, disk_id: str, body: AsyncIterator[bytes], *, what: str = ""
    ) -> Ack:
        """``POST`` one streamed batch; return only once the broker acked it durably.

        ``what`` names the batch in errors ("batch seq 7 of web1/disk0").
        """
        data, _ = await self._request(
            "POST",
            self._path(vm_uuid, disk_id) + "/batches",
            what=f"while uploading {what or 'a batch'}",
            data=body,
            headers={"Content-Type": BATCH_CONTENT_TYPE},
        )
        return self._ack(data)

    async def upload_from(self, vm_uuid: UUID, disk_id: str, send: Sender, *, what: str) -> Ack:
        """:meth:`upload`, with the batch encoded and sent by ``send`` (the shipping process,
        decision 029), given the URL this client chose."""
        data, _ = await self._request(
            "POST",
            self._path(vm_uuid, disk_id) + "/batches",
            what=f"while uploading {what}",
            send=send,
        )
        return self._ack(data)

    @staticmethod
    def _ack(data: Any) -> Ack:
        try:
            return Ack(seq=int(data["acked_seq"]), duplicate=bool(data.get("duplicate", False)))
        except (KeyError, TypeError, ValueError):
            raise ShipError(f"the broker's answer to a batch is not an ack: {data!r}") from None

    async def current(self, vm_uuid: UUID, body: dict[str, Any]) -> dict[str, bool]:
        """``POST`` that idle disks are current as of a cut (agents.current); which were taken."""
        data, _ = await self._request("POST", f"/v1/replicas/{vm_uuid}/current", json=body)
        disks = data.get("disks") if isinstance(data, dict) else None
        if not isinstance(disks, dict):
            raise ShipError(f"the broker's answer to a current statement is malformed: {data!r}")
        return {str(k): v is True for k, v in disks.items()}

    async def current_all(self, statements: list[dict[str, Any]]) -> dict[str, Any]:
        """``POST /v1/current``: many VMs' statements at once; each VM's answer by its UUID."""
        data, _ = await self._request("POST", "/v1/current", json={"vms": statements})
        vms = data.get("vms") if isinstance(data, dict) else None
        if not isinstance(vms, dict):
            raise ShipError(f"the broker's answer to current statements is malformed: {data!r}")
        return vms

    def routed(self, vm_uuid: UUID) -> bool:
        """Whether another cluster member than :attr:`url` serves ``vm_uuid`` (decision 032)."""
        return self._by_vm.get(str(vm_uuid), self.url) != self.url

    async def hashes(
        self, vm_uuid: UUID, disk_id: str, block_size: int, offset: int, length: int
    ) -> tuple[bytes, int]:
        """Block hashes of the replica (8 bytes each, big-endian) and the seq they reflect."""
        raw, headers = await self._request(
            "GET",
            self._path(vm_uuid, disk_id) + "/hashes",
            params={"block_size": block_size, "offset": offset, "length": length},
            expect="bytes",
        )
        seq = int(headers.get("X-Replikant-Applied-Seq", "-1"))
        return bytes(raw), seq
