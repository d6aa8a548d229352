"""Scale-out inside a cluster (decision 032): two brokers with ``placement = "spread"`` on one
store and a real Mosquitto over mutual TLS, an agent's batches over HTTPS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from broker.service import BrokerService
from certs.store import CertStore
from common.config import BrokerConfig, TLSFiles
from common.tls import Identity
from tests.support_broker import PKI, AgentClient, FakeSource, make_pki
from tests.support_mqtt import mosquitto_tls

FAST = {"lease": 2.0, "renew": 0.5, "stagger": 0.3, "settle": 0.5, "hold_down": 2.0}


def _config(pki: PKI, tls: TLSFiles, node: str, store: Path, port: int) -> BrokerConfig:
    return BrokerConfig.model_validate(
        {
            "broker": {
                "node": node,
                "cluster": "c1",
                "listen": "127.0.0.1:0",
                "store": str(store),
                "min_free_bytes": 0,
                "placement": "spread",
            },
            "tls": {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)},
            "mqtt": {"url": f"mqtts://127.0.0.1:{port}"},
            "election": FAST,
            "nbd_socket_dir": str(store.parent / f"nbd-{node}"),
        }
    )


async def _until(what: str, check: Callable[[], bool], limit: float = 30) -> None:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > limit:
            raise AssertionError(f"{what}: not within {limit} s")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def _members(tmp_path: Path) -> AsyncIterator[tuple[PKI, dict[str, BrokerService]]]:
    pki = make_pki(tmp_path / "pki")
    ca = CertStore(pki.root / "ca")
    server = ca.issue_broker("c1", "mqtt", dns=["localhost"], ips=["127.0.0.1"]).tls
    certs = {"b1": pki.broker, "b2": ca.issue_broker("c1", "b2", ips=["127.0.0.1"]).tls}
    store = tmp_path / "store"
    with mosquitto_tls(tmp_path, server, [Identity.broker("c1", n) for n in certs]) as port:
        services = {n: BrokerService(_config(pki, t, n, store, port)) for n, t in certs.items()}
        try:
            for svc in services.values():
                await svc.start()
            yield pki, services
        finally:
            for svc in services.values():
                with contextlib.suppress(Exception):
                    await svc.stop()


def _meta(store: Path, src: FakeSource) -> dict[str, object]:
    data: dict[str, object] = json.loads(
        (store / str(src.vm_uuid) / src.disk_id / "meta.json").read_text()
    )
    return data


@pytest.mark.mosquitto
@pytest.mark.slow
async def test_each_vm_is_served_by_its_member_and_moves_when_it_leaves(tmp_path: Path) -> None:
    """The owner places two VMs on two members; a VM's batch is refused by the other member with
    503 not_owner naming the right one, accepted and applied byte-identically by its member; when
    that member leaves, its VM is re-placed on the survivor, which applies the next batch on top
    (one audit line per batch, across both members)."""
    async with _members(tmp_path) as (pki, svc):
        await _until("an owner", lambda: any(s.serving for s in svc.values()))
        owner = next(n for n, s in svc.items() if s.serving)
        other = next(n for n in svc if n != owner)
        sources = [FakeSource(seed=i) for i in (1, 2)]
        async with AgentClient(svc[owner].url, pki.agents["h1"]) as agent:
            for i, src in enumerate(sources):
                await agent.enable(src, name=f"web{i}")
        scale = {n: s.scaleout for n, s in svc.items()}
        assert all(scale.values())

        def placed() -> bool:
            return all(len(s.placement.serving) == 1 for s in scale.values() if s is not None)

        await _until("one VM served by each member", placed)
        other_scale = scale[other]
        assert other_scale is not None
        (vm,) = other_scale.placement.serving
        src = next(s for s in sources if str(s.vm_uuid) == vm)
        src.mutate()
        cut = src.cut()
        async with AgentClient(svc[owner].url, pki.agents["h1"]) as agent:
            status, body = await agent.post(src, cut.body)
        assert status == 503, body
        assert body["error"] == "not_owner"
        assert body["details"]["owner"] == other
        assert body["details"]["owner_url"] == svc[other].advertised_url
        async with AgentClient(svc[other].url, pki.agents["h1"]) as agent:
            assert await agent.ship(src, cut) == 1
        store = tmp_path / "store"
        await _until("applied by its member", lambda: _meta(store, src)["applied_seq"] == 1)
        image = store / vm / src.disk_id / "replica.img"
        assert image.read_bytes() == cut.image

        await svc[other].stop()  # a clean leave: its membership goes offline at once
        owner_scale = scale[owner]
        assert owner_scale is not None
        await _until("re-placed on the survivor", lambda: vm in owner_scale.placement.serving)
        src.mutate()
        cut = src.cut()
        async with AgentClient(svc[owner].url, pki.agents["h1"]) as agent:
            assert await agent.ship(src, cut) == 2
        await _until("applied by the survivor", lambda: _meta(store, src)["applied_seq"] == 2)
        assert image.read_bytes() == cut.image
        audit = (store / vm / src.disk_id / "applied.log").read_text().splitlines()
        assert [json.loads(line)["seq"] for line in audit] == [1, 2]
