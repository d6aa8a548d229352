"""Issue 8, finding 7 (broker side): an agent cannot bloat a replica's meta.json with labels, nor
hold a request open by asking for hashes of a point that can never exist."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.service import BrokerService
from tests.security.broker_support import raw_request
from tests.security.rows import Door
from tests.support_broker import NEWEST_ONLY, PKI, AgentClient, FakeSource, MiB, running_broker

SURFACE = "broker HTTPS"


@pytest.fixture
async def broker(pki: PKI, tmp_path: Path) -> AsyncIterator[BrokerService]:
    async with running_broker(
        pki,
        tmp_path / "store",
        retention=NEWEST_ONLY,
    ) as svc:
        yield svc


async def test_oversized_labels_are_refused(broker: BrokerService, pki: PKI, door: Door) -> None:
    """Too many labels, an overlong key or value, or ~900 KiB in all: 400 naming the limit, and
    meta.json keeps the labels it had."""
    src = FakeSource(disk_size=MiB)
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        await agent.enable(src, labels={"tier": "gold"})
    replica = broker.store.get(str(src.vm_uuid), src.disk_id)
    assert replica is not None
    meta_size = (replica.path / "meta.json").stat().st_size
    attempts = {
        "~900 KiB of labels": {f"k{i}": "v" * 200 for i in range(4600)},
        "65 labels": {f"k{i}": "v" for i in range(65)},
        "a 64-character key": {"k" * 64: "v"},
        "a 257-character value": {"k": "v" * 257},
    }
    for label, labels in attempts.items():
        body = {
            "vm_name": "web1",
            "disk_size": src.disk_size,
            "block_size": src.block_size,
            "labels": labels,
        }
        answer = await raw_request(
            broker.url,
            pki.agents["h1"],
            "PUT",
            f"/v1/replicas/{src.vm_uuid}/{src.disk_id}",
            body=json.dumps(body).encode(),
        )
        door.attempt(
            SURFACE,
            f"PUT with {label}",
            expected="400 bad_request field=labels",
            observed=answer.text(),
            refused=answer.status == 400,
        )
        assert (answer.error, answer.field) == ("bad_request", "labels")
        assert "limit" in answer.body["message"]
    assert replica.meta.labels == {"tier": "gold"}
    assert (replica.path / "meta.json").stat().st_size == meta_size


async def test_hashes_of_an_impossible_point_answer_at_once(
    broker: BrokerService, pki: PKI, door: Door
) -> None:
    """``hashes?point=P&wait=inf`` answers at once with 404 unknown_point when P is beyond what
    is durable, of another generation or older than retention keeps; a kept point answers 200;
    only a durable point not yet applied is waited for."""
    src = FakeSource(disk_size=MiB)
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        await agent.enable(src)
        for _ in range(3):
            src.mutate()
            await agent.ship(src, src.cut())
    replica = broker.store.get(str(src.vm_uuid), src.disk_id)
    assert replica is not None
    engine = broker.engines[replica.key]
    async with asyncio.timeout(20):
        await engine.wait_for_state((1, 3))
    await asyncio.to_thread(broker.run_retention)  # keeps only the newest point, 1-3
    path = f"/v1/replicas/{src.vm_uuid}/{src.disk_id}/hashes"
    for label, point in (
        ("beyond what is durable", "1-999"),
        ("of a generation that does not exist", "7-1"),
        ("older than retention keeps", "1-1"),
    ):
        started = time.monotonic()
        answer = await raw_request(
            broker.url, pki.agents["h1"], "GET", f"{path}?point={point}&wait=inf"
        )
        took = time.monotonic() - started
        door.attempt(
            SURFACE,
            f"hashes of a point {label} ({point}) with wait=inf",
            expected="404 unknown_point at once",
            observed=f"{answer.status} {answer.error} after {took:.2f} s",
            refused=answer.status == 404 and took < 5,
        )
        assert answer.error == "unknown_point"
        assert point in answer.body["message"]
    answer = await raw_request(broker.url, pki.agents["h1"], "GET", f"{path}?point=1-3&wait=inf")
    assert answer.status == 200
    # A point that is durable but not applied yet is worth the wait (the applier is held here).
    await engine.stop()
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        src.mutate()
        assert await agent.ship(src, src.cut()) == 4
    started = time.monotonic()
    answer = await raw_request(broker.url, pki.agents["h1"], "GET", f"{path}?point=1-4&wait=1.5")
    assert time.monotonic() - started >= 1.4
    assert answer.error == "unknown_point"  # still not applied when the wait ran out
    answer = await raw_request(broker.url, pki.agents["h1"], "GET", f"{path}?point=1-3&wait=nan")
    assert (answer.status, answer.field) == (400, "wait")
