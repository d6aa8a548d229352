"""The agent's idle-VM statements (agents/current.py) against a real in-process broker over mTLS:
VMs that state at once share one ``POST /v1/current``; a VM refused inside it states again on
its own and gets its own refusal; a broker without ``/v1/current`` gets per-VM statements."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from agents.current import batches_of
from agents.errors import ShipError
from agents.ship import BrokerClient
from agents.worker import next_due
from broker.api import SERVICE_KEY
from broker.current import vm_current
from broker.httperrors import errors_middleware
from broker.service import BrokerService
from common.tls import client_context, server_context
from tests.support_broker import PKI, AgentClient, FakeSource, MiB, make_pki, running_broker


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def broker(pki: PKI, tmp_path: Path) -> AsyncIterator[BrokerService]:
    async with running_broker(pki, tmp_path / "store") as svc:
        yield svc


async def _replicas(broker: BrokerService, pki: PKI, hosts: list[str]) -> list[FakeSource]:
    """One single-disk VM per entry of ``hosts``, enabled by that agent, with one acked batch."""
    out = []
    for host in hosts:
        src = FakeSource(disk_size=MiB)
        async with AgentClient(broker.url, pki.agents[host]) as agent:
            await agent.enable(src)
            src.mutate()
            await agent.ship(src, src.cut())
        out.append(src)
    return out


def _noted_cut(broker: BrokerService, src: FakeSource) -> int | None:
    """The cut of the statement the broker noted for ``src``'s replica (None: none)."""
    replica = broker.store.get(str(src.vm_uuid), src.disk_id)
    assert replica is not None
    current = broker.engine_for(replica).current
    return None if current is None else current.cut_id


def _body(src: FakeSource, cut_id: int) -> dict[str, Any]:
    disk = {"disk_id": src.disk_id, "generation": src.generation, "seq": 1}
    return {"cut_id": cut_id, "cut_time_ns": 10**19, "disks": [disk]}


async def test_statements_made_at_once_share_one_request(broker: BrokerService, pki: PKI) -> None:
    """Three of h1's VMs stating at once make one ``POST /v1/current`` that the broker takes for
    all three; a VM of h2 among them answers None (state it per VM), and its per-VM statement
    is refused 403 by the broker with nothing noted."""
    own = await _replicas(broker, pki, ["h1", "h1", "h1"])
    (foreign,) = await _replicas(broker, pki, ["h2"])
    client = BrokerClient([broker.url], client_context(pki.agents["h1"]), cluster="c1")
    try:
        batches = batches_of(client)
        with structlog.testing.capture_logs() as logs:
            answers = await asyncio.gather(
                *(batches.state(s.vm_uuid, _body(s, 5)) for s in [*own, foreign])
            )
        assert answers == [{s.disk_id: True} for s in own] + [None]
        assert [e["vms"] for e in logs if e["event"] == "agent_current_noted"] == [4]
        with pytest.raises(ShipError) as refused:
            await client.current(foreign.vm_uuid, _body(foreign, 5))
        assert (refused.value.status, refused.value.code) == (403, "not_authorised")
    finally:
        await client.close()
    assert [_noted_cut(broker, s) for s in [*own, foreign]] == [5, 5, 5, None]


async def test_a_deposed_owner_notes_no_statement_of_a_shared_request(
    broker: BrokerService, pki: PKI
) -> None:
    """Once another member claimed a higher epoch at the store, the shared statement request
    (the store's epoch read once for all its VMs) is refused for each VM, the per-VM one answers
    503 not_owner, and nothing is noted."""
    own = await _replicas(broker, pki, ["h1", "h1"])
    broker.store.claim_epoch(broker.epoch + 1, "b2")
    client = BrokerClient([broker.url], client_context(pki.agents["h1"]), cluster="c1")
    try:
        batches = batches_of(client)
        with structlog.testing.capture_logs() as logs:
            answers = await asyncio.gather(*(batches.state(s.vm_uuid, _body(s, 5)) for s in own))
        assert answers == [None, None]
        refused = [e for e in logs if e["event"] == "current_statement_refused"]
        assert [e["error"] for e in refused] == ["not_owner", "not_owner"]
        with pytest.raises(ShipError) as single:
            await client.current(own[0].vm_uuid, _body(own[0], 5))
        assert (single.value.status, single.value.code) == (503, "not_owner")
    finally:
        await client.close()
    assert [_noted_cut(broker, s) for s in own] == [None, None]


async def test_a_broker_without_the_shared_endpoint_gets_per_vm_statements(
    broker: BrokerService, pki: PKI, tmp_path: Path
) -> None:
    """An older broker (only ``POST /v1/replicas/{vm_uuid}/current``) answers the shared request
    404: the client's VMs are told to state per VM from then on (without asking again), and
    the broker takes the per-VM statement."""
    (src,) = await _replicas(broker, pki, ["h1"])
    # A stand-in for an older broker: the real per-VM handler on the real service, without the
    # shared route (a release that predates it cannot be run here otherwise).
    app = web.Application(middlewares=[errors_middleware])
    app[SERVICE_KEY] = broker
    app.add_routes([web.post("/v1/replicas/{vm_uuid}/current", vm_current)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(pki.broker))
    await site.start()
    port = runner.addresses[0][1]
    client = BrokerClient(
        [f"https://127.0.0.1:{port}"], client_context(pki.agents["h1"]), cluster="c1"
    )
    try:
        batches = batches_of(client)
        assert await batches.state(src.vm_uuid, _body(src, 7)) is None
        assert batches.supported is False
        assert await batches.state(src.vm_uuid, _body(src, 8)) is None  # without asking again
        assert await client.current(src.vm_uuid, _body(src, 8)) == {src.disk_id: True}
    finally:
        await client.close()
        await runner.cleanup()
    assert _noted_cut(broker, src) == 8


@pytest.mark.parametrize(
    ("started", "interval", "due"),
    [
        (12.3, 1.0, 13.0),
        (12.999, 1.0, 13.0),
        (13.0, 1.0, 14.0),
        (7.01, 0.25, 7.25),
        (0.1, 5.0, 5.0),
    ],
)
def test_idle_vms_share_the_next_tick(started: float, interval: float, due: float) -> None:
    """An idle VM's next cut is the next multiple of its interval: after ``started``, never later
    than a plain interval, and the same instant for every VM whose cycle began in that interval."""
    assert next_due(started, interval) == pytest.approx(due)
    assert started < next_due(started, interval) <= started + interval
