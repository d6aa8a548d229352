"""A real broker with one replicated disk, and the probes the broker's door tests share.

The broker runs in this process (:class:`broker.service.BrokerService`, real mutual TLS on a
loopback port, a real store on disk). Before an attempt a test takes :func:`snapshot` of the
whole store; after it, :meth:`BrokerWorld.damage` says what changed (nothing, for a refusal):
every file's bytes, every directory, the replica's durable and applied seq, and any journal or
``.part`` file left behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.service import BrokerService
from certs.store import CertStore
from common.config import TLSFiles
from common.hrl import Compression
from tests.fixtures_pki import issue_expired
from tests.support_broker import PKI, AgentClient, FakeSource, MiB, running_broker
from tests.test_broker_http import settle


@dataclass
class BrokerWorld:
    """A running broker, its PKI, and the disk ``src`` that agent h1 replicates to it."""

    svc: BrokerService
    pki: PKI
    src: FakeSource
    expired: TLSFiles

    @property
    def url(self) -> str:
        """The broker's base URL."""
        return self.svc.url

    @property
    def replica_url(self) -> str:
        """``/v1/replicas/{vm_uuid}/{disk_id}`` of ``src``."""
        return f"{self.svc.url}/v1/replicas/{self.src.vm_uuid}/{self.src.disk_id}"

    def seqs(self) -> tuple[int, int]:
        """``(durable_seq, applied_seq)`` of ``src``'s replica as the broker holds them."""
        r = self.svc.store.get(str(self.src.vm_uuid), self.src.disk_id)
        assert r is not None
        return r.meta.durable_seq, r.meta.applied_seq

    def damage(self, before: dict[str, str]) -> str:
        """What an attempt changed in the store since ``before``: ``""`` when nothing did."""
        after = snapshot(self.svc.store.root)
        changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
        leftovers = sorted(p for p in after if p.endswith(".part") or "/journal/" in p)
        return "; ".join(
            part
            for part in (
                f"changed: {', '.join(changed)}" if changed else "",
                f"left behind: {', '.join(leftovers)}" if leftovers else "",
            )
            if part
        )

    def store_text(self, before: dict[str, str]) -> str:
        """The store half of an observation: unchanged, or what changed, with the seqs."""
        durable, applied = self.seqs()
        damage = self.damage(before)
        return f"store {damage or 'unchanged'} (durable_seq {durable}, applied_seq {applied})"


async def quiesce(svc: BrokerService, src: FakeSource) -> None:
    """Wait until ``src``'s replica is applied and its applier has finished tidying up (the
    journal file deleted, meta written), so that a snapshot sees a store at rest."""
    await settle(svc, src)
    r = svc.store.get(str(src.vm_uuid), src.disk_id)
    assert r is not None
    async with asyncio.timeout(20):
        # Nothing to await: the applier deletes the journal file after it records the apply.
        while any(r.journal_dir.iterdir()) or any(r.path.rglob("*.tmp")):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a digest of its bytes (files) or its kind."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"link->{path.readlink()}"
        elif path.is_dir():
            out[rel] = "dir"
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "special"  # the point-in-time NBD socket
    return out


@pytest.fixture(scope="module")
def expired(pki: PKI) -> TLSFiles:
    """An agent certificate of our CA that expired yesterday."""
    return issue_expired(CertStore(pki.root / "ca")).tls


@pytest.fixture
async def world(pki: PKI, expired: TLSFiles, tmp_path: Path) -> AsyncIterator[BrokerWorld]:
    """A broker (the shipped defaults: ``[authorization] mode = "any"``) whose replica of h1's
    disk holds seq 1, applied."""
    async with running_broker(pki, tmp_path / "store") as svc:
        src = FakeSource(disk_size=1 * MiB, compression=Compression.ZSTD)
        async with AgentClient(svc.url, pki.agents["h1"]) as h1:
            await h1.enable(src)
            src.mutate(6)
            assert await h1.ship(src, src.cut()) == 1
        await quiesce(svc, src)
        yield BrokerWorld(svc, pki, src, expired)


REPLICATION_PREFIX = "/v1/replicas/"
# Agent routes outside the prefix: the shared idle statement names its VMs in the body and
# authorises each one there (proven VM by VM in tests/security/test_broker_current.py).
AGENT_ROUTES = frozenset({"/v1/current"})


def is_agent_route(template: str) -> bool:
    """Whether ``template`` is a route for replicating agents (every other route is an
    admin's)."""
    return template.startswith(REPLICATION_PREFIX) or template in AGENT_ROUTES


def route_url(world: BrokerWorld, template: str) -> str:
    """A route template of the broker's router filled in for ``src`` (VM ``web1``); any other
    name (an export's, say) is ``x``."""
    values = {"vm_uuid": str(world.src.vm_uuid), "disk_id": world.src.disk_id, "vm": "web1"}
    return world.url + re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), "x"), template)


def enable_body(disk_size: int = MiB, name: str = "intruder") -> dict[str, Any]:
    """A valid ``PUT /v1/replicas/...`` body."""
    return {"vm_name": name, "disk_size": disk_size, "block_size": 65536, "generation": 1}


def new_replica_url(world: BrokerWorld) -> str:
    """The URL of a replica that does not exist yet (a PUT there would create one)."""
    return f"{world.url}/v1/replicas/{uuid.uuid4()}/disk0"


async def https(
    ctx: ssl.SSLContext,
    method: str,
    url: str,
    *,
    json_body: object = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int | None, str]:
    """Make one request; returns ``(status, observed)``, status ``None`` when no HTTP answer
    came (the TLS handshake or the connection failed), observed naming what happened."""
    headers = dict(headers or {})
    if json_body is not None:
        data = json.dumps(json_body).encode()
        headers["Content-Type"] = "application/json"
    # aiohttp warns about large bytes bodies (filterwarnings = error): hand it a stream.
    payload = io.BytesIO(data) if data is not None else None
    try:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx),
                timeout=aiohttp.ClientTimeout(total=20),
            ) as session,
            session.request(method, url, data=payload, headers=headers) as resp,
        ):
            raw = await resp.read()
            return resp.status, f"HTTP {resp.status} {error_code(raw)}".rstrip()
    except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
        return None, f"no HTTP answer: {failure_text(exc)}"


def error_code(raw: bytes) -> str:
    """The ``error`` code of a JSON refusal body (or ``""``)."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return ""
    return str(doc.get("error", "")) if isinstance(doc, dict) else ""


def failure_text(exc: BaseException) -> str:
    """The innermost cause of a client-side failure, e.g. ``SSLError: [SSL: ...] ...``."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        nxt = exc.__cause__ or exc.__context__
        assert nxt is not None
        exc = nxt
    reason = getattr(exc, "reason", None)
    text = reason if isinstance(reason, str) and reason else str(exc)
    return f"{type(exc).__name__}: {text}"[:160]
