"""Point-in-time exports through an owner's step-down (decision 043): one broker in the default
``placement = "owner"`` mode, a real Mosquitto over mutual TLS that the test freezes (SIGSTOP)
so that the broker loses its lease, an agent's batches over HTTPS, the exports read over NBD."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog.testing

from broker.service import BrokerService
from common.config import BrokerConfig
from common.tls import Identity, client_context
from tests.fixtures_pki import Pki, make_pki
from tests.support_agent import MiniNBD, NBDClientError
from tests.support_broker import AgentClient, Cut, FakeSource
from tests.support_mqtt import frozen, mosquitto_tls
from tests.test_placement_sim import until
from tests.test_scaleout import FAST, _applied_seq


@contextlib.asynccontextmanager
async def _owner(tmp_path: Path) -> AsyncIterator[tuple[Pki, BrokerService, int]]:
    """One broker of cluster c1 (owner mode) elected over a real Mosquitto; ``(pki, broker,
    Mosquitto's port)``."""
    pki = make_pki(tmp_path / "pki")
    server = pki.store.issue_broker("c1", "mqtt", dns=["localhost"], ips=["127.0.0.1"]).tls
    tls = pki.broker.tls
    store = tmp_path / "store"
    with mosquitto_tls(tmp_path, server, [Identity.broker("c1", "b1")]) as port:
        config = BrokerConfig.model_validate(
            {
                "broker": {
                    "node": "b1",
                    "cluster": "c1",
                    "listen": "127.0.0.1:0",
                    "store": str(store),
                    "min_free_bytes": 0,
                },
                "tls": {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)},
                "mqtt": {"url": f"mqtts://127.0.0.1:{port}"},
                "election": FAST,
                "nbd_socket_dir": str(tmp_path / "nbd"),
            }
        )
        svc = BrokerService(config)
        await svc.start()
        try:
            await until("the broker owns the cluster", lambda: svc.serving)
            yield pki, svc, port
        finally:
            await svc.stop()


async def _ship(svc: BrokerService, pki: Pki, src: FakeSource, seq: int, store: Path) -> Cut:
    src.mutate()
    cut = src.cut()
    async with AgentClient(svc.url, pki.agent.tls) as agent:
        if seq == 1:
            await agent.enable(src)
        assert await agent.ship(src, cut) == seq
    await until(f"batch {seq} applied", lambda: _applied_seq(store, src) == seq)
    return cut


async def _export(svc: BrokerService, pki: Pki, src: FakeSource) -> dict[str, Any]:
    admin = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(pki.admin.tls)))
    url = f"{svc.url}/v1/vms/{src.vm_uuid}/exports"
    async with admin, admin.post(url, json={"point": "latest"}) as resp:
        assert resp.status == 201, await resp.text()
        (export,) = (await resp.json())["exports"]
    return dict(export)


async def _read(export: dict[str, Any], length: int) -> bytes:
    nbd = await asyncio.to_thread(MiniNBD, Path(export["socket"]), export["name"])
    try:
        return await asyncio.to_thread(nbd.read, 0, length)
    finally:
        nbd.close()


@pytest.mark.mosquitto
@pytest.mark.slow
async def test_an_export_outlives_the_owners_step_down_and_reelection(tmp_path: Path) -> None:
    """The owner loses MQTT for longer than its lease and steps down; its export (a test copy's
    disk) still reads the point byte for byte meanwhile, and after the re-election too, while
    the applier, resumed, applies the next batch to the replica underneath. Before, the
    step-down removed every export and the test guest's disk failed."""
    async with _owner(tmp_path) as (pki, svc, port):
        store = tmp_path / "store"
        src = FakeSource(seed=7)
        first = await _ship(svc, pki, src, 1, store)
        export = await _export(svc, pki, src)
        with structlog.testing.capture_logs() as logs, frozen(port):
            await until("the owner stepped down", lambda: not svc.serving)
            assert await _read(export, len(first.image)) == first.image
        assert [e["vms"] for e in logs if e["event"] == "pit_exports_kept"] == [[str(src.vm_uuid)]]
        await until("the owner elected again", lambda: svc.serving, limit=60)
        assert [e["name"] for e in svc.list_exports()] == [export["name"]]
        second = await _ship(svc, pki, src, 2, store)
        assert second.image != first.image
        replica = store / str(src.vm_uuid) / src.disk_id / "replica.img"
        assert replica.read_bytes() == second.image
        assert await _read(export, len(first.image)) == first.image
        assert await asyncio.to_thread(os.path.exists, export["overlay"])


@pytest.mark.mosquitto
@pytest.mark.slow
async def test_a_kept_export_ends_once_another_broker_claimed_the_store(tmp_path: Path) -> None:
    """While the owner is cut off, another broker claims the store (it won the election on the
    other side of the partition; here its claim is made through the store's own API): from then
    on the kept export answers EIO rather than bytes that may have changed under it, says why
    once, and is removed when the broker is elected again."""
    async with _owner(tmp_path) as (pki, svc, port):
        store = tmp_path / "store"
        src = FakeSource(seed=8)
        first = await _ship(svc, pki, src, 1, store)
        export = await _export(svc, pki, src)
        with structlog.testing.capture_logs() as logs:
            with frozen(port):
                await until("the owner stepped down", lambda: not svc.serving)
                assert await _read(export, len(first.image)) == first.image
                await asyncio.to_thread(svc.store.claim_epoch, svc.epoch + 1, "b2")
                with pytest.raises(NBDClientError, match="NBD error 5"):
                    await _read(export, len(first.image))
                (listed,) = svc.list_exports()
                assert "another broker claimed the store" in listed["lost"]
            await until("the owner elected again", lambda: svc.serving, limit=60)
            assert svc.list_exports() == []
        (lost,) = [e for e in logs if e["event"] == "pit_export_lost"]
        assert lost["export"] == export["name"]
        assert "another broker claimed the store" in lost["reason"]
        (ended,) = [e for e in logs if e["event"] == "pit_export_ended"]
        assert ended["export"] == export["name"]
        assert not await asyncio.to_thread(os.path.exists, export["overlay"])
