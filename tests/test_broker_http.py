"""The broker's HTTPS endpoint under real mutual TLS: ingest, hostile input, authorisation."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from broker.service import BrokerService
from common.hrl import Compression, ExtentKind
from tests.support_broker import (
    NEWEST_ONLY,
    PKI,
    AgentClient,
    FakeSource,
    MiB,
    encode_extents,
    make_config,
    make_pki,
    running_broker,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def broker(pki: PKI, tmp_path: Path) -> AsyncIterator[BrokerService]:
    # These tests read many points of small disks: more undo than 100 % of a disk. The bound
    # has its own tests (tests/test_journal_bound.py).
    async with running_broker(
        pki, tmp_path / "store", retention={"journal_bound": "10000%"}
    ) as svc:
        yield svc


def image_digest(svc: BrokerService, src: FakeSource) -> str:
    r = svc.store.get(str(src.vm_uuid), src.disk_id)
    assert r is not None
    return hashlib.sha256(r.image.read_bytes()).hexdigest()


async def settle(svc: BrokerService, src: FakeSource) -> None:
    r = svc.store.get(str(src.vm_uuid), src.disk_id)
    assert r is not None
    engine = svc.engines[r.key]
    async with asyncio.timeout(20):
        await engine.wait_for_state((src.generation, r.meta.durable_seq))


async def test_stream_and_apply(broker: BrokerService, pki: PKI) -> None:
    """Batches stream in over mTLS, are acked once durable and applied byte for byte."""
    src = FakeSource(disk_size=8 * MiB)
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        state = await agent.enable(src)
        assert state["durable_seq"] == 0
        assert state["initial_sync"] == "pending"
        src.mutate(40)
        assert await agent.ship(src, src.cut(full=True, all_blocks=True)) == 1
        for _ in range(5):
            src.mutate(10)
            cut = src.cut()
            status, body = await agent.post(src, cut.body)
            assert (status, body) == (200, {"acked_seq": cut.seq, "duplicate": False})
        await settle(broker, src)
        state = await agent.state(src)
        assert state["applied_seq"] == state["durable_seq"] == 6
        assert state["initial_sync"] == "complete"
    assert image_digest(broker, src) == hashlib.sha256(src.image).hexdigest()


async def _enabled(broker: BrokerService, pki: PKI) -> tuple[FakeSource, str]:
    src = FakeSource(disk_size=1 * MiB, compression=Compression.NONE)
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        await agent.enable(src)
        src.mutate(5)
        await agent.ship(src, src.cut())
    await settle(broker, src)
    return src, image_digest(broker, src)


def _assert_unchanged(broker: BrokerService, src: FakeSource, digest: str) -> None:
    assert image_digest(broker, src) == digest
    r = broker.store.get(str(src.vm_uuid), src.disk_id)
    assert r is not None
    assert list(r.journal_dir.iterdir()) == []
    assert r.meta.durable_seq == 1


async def test_hostile_bodies_refused(broker: BrokerService, pki: PKI) -> None:
    """Truncated, lying and corrupt bodies are refused with precise codes; nothing changes."""
    src, digest = await _enabled(broker, pki)
    src.mutate(5)
    good = src.cut()
    body = good.body
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        # Truncated mid-extent.
        status, err = await agent.post(src, body[: len(body) // 2])
        assert status == 400
        assert err["error"] == "malformed_batch"
        assert err["details"]["class"] == "Truncated"
        # Trailer missing.
        status, err = await agent.post(src, body[:-32])
        assert status == 400
        assert err["details"]["class"] == "Truncated"
        # Trailing garbage.
        status, err = await agent.post(src, body + b"junk")
        assert status == 400
        assert err["details"]["class"] == "TrailingData"
        # Corrupt data: flip one byte inside the first extent's payload.
        bad = bytearray(body)
        bad[len(body) - 32 - 10] ^= 0x55
        status, err = await agent.post(src, bytes(bad))
        assert status == 400
        assert err["error"] == "corrupt_extent"
        assert "offset" in err["message"]
        # Lying length: a header that announces more extents than follow.
        extents = [(0, 4096, ExtentKind.DATA, b"x" * 4096)]
        h = src.header(1, 4096)
        lying = encode_extents(h, extents)
        lying = lying[:76] + (2).to_bytes(4, "big") + lying[80:]  # extent_count field
        status, err = await agent.post(src, lying)
        assert status == 400
        assert err["details"]["class"] == "HeaderChecksumMismatch"
        # Not a batch at all.
        status, err = await agent.post(src, b"GET / HTTP/1.1\r\n\r\n")
        assert status == 400
        assert err["details"]["class"] == "BadMagic"
        # Empty body.
        status, err = await agent.post(src, b"")
        assert status == 400
        _assert_unchanged(broker, src, digest)
        # The good batch still goes through afterwards.
        status, ok = await agent.post(src, body)
        assert status == 200
        assert ok["acked_seq"] == 2


async def test_replay_reorder_and_generation(broker: BrokerService, pki: PKI) -> None:
    """Replays are harmless duplicates, a reordered batch is a named gap, old generations go."""
    src, digest = await _enabled(broker, pki)
    first = src.cuts[1]
    src.mutate()
    second = src.cut()
    src.mutate()
    third = src.cut()
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        status, body = await agent.post(src, first.body)
        assert (status, body) == (200, {"acked_seq": 1, "duplicate": True})
        status, err = await agent.post(src, third.body)
        assert status == 409
        assert err["error"] == "sequence_gap"
        assert err["details"] == {"expected_seq": 2, "received_seq": 3}
        assert "expects seq 2" in err["message"]
        old = FakeSource(disk_size=src.disk_size, vm_uuid=src.vm_uuid, generation=0)
        old.mutate()
        status, err = await agent.post(src, old.cut().body)
        assert status == 409
        assert err["error"] == "stale_generation"
        _assert_unchanged(broker, src, digest)
        for cut in (second, third):
            status, body = await agent.post(src, cut.body)
            assert status == 200
            assert body["acked_seq"] == cut.seq


async def test_identity_and_size_refusals(broker: BrokerService, pki: PKI) -> None:
    """A batch of another VM posted to this URL names both; an unknown VM is 404; 413 oversize."""
    src, digest = await _enabled(broker, pki)
    other = FakeSource(disk_size=src.disk_size)
    other.mutate()
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        status, err = await agent.post(src, other.cut().body)
        assert status == 403
        assert err["error"] == "wrong_identity"
        assert str(other.vm_uuid) in err["message"]
        assert str(src.vm_uuid) in err["message"]
        status, err = await agent.post(other, other.cuts[1].body)
        assert status == 404
        assert err["error"] == "unknown_vm"
        status, err = await agent.post(src, b"\0" * (3 * MiB))
        assert status == 413
        assert err["error"] == "batch_too_large"
        # Re-enabling with another name is an identity conflict naming both.
        assert agent.session is not None
        async with agent.session.put(
            f"{broker.url}/v1/replicas/{src.vm_uuid}/{src.disk_id}",
            json={"vm_name": "db9", "disk_size": src.disk_size, "block_size": src.block_size},
        ) as resp:
            err = await resp.json()
            assert resp.status == 409
            assert err["error"] == "identity_conflict"
            assert "web1" in err["message"]
            assert "db9" in err["message"]
    _assert_unchanged(broker, src, digest)


async def test_unauthorised_identities(broker: BrokerService, pki: PKI, tmp_path: Path) -> None:
    """Admin certs cannot upload, another host cannot write this replica, foreign CAs fail TLS."""
    src, digest = await _enabled(broker, pki)
    src.mutate()
    cut = src.cut()
    async with AgentClient(broker.url, pki.admin) as admin:
        status, err = await admin.post(src, cut.body)
        assert status == 403
        assert err["error"] == "not_authorised"
        assert "replikant://admin/alice" in err["message"]
    async with AgentClient(broker.url, pki.agents["h2"]) as h2:
        status, err = await h2.post(src, cut.body)
        assert status == 403
        assert err["error"] == "not_authorised"
        assert "h2" in err["message"]
        assert "h1" in err["message"]
    with pytest.raises((aiohttp.ClientError, OSError)):
        async with AgentClient(broker.url, pki.foreign_agent) as foreign:
            await foreign.post(src, cut.body)
    # No client certificate at all.
    bare = ssl.create_default_context(cafile=str(pki.broker.ca))
    bare.minimum_version = ssl.TLSVersion.TLSv1_3
    with pytest.raises((aiohttp.ClientError, OSError)):
        await _get_status(bare, broker.url)
    _assert_unchanged(broker, src, digest)


async def _get_status(ctx: ssl.SSLContext, url: str) -> None:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
        s.get(f"{url}/v1/status") as resp,
    ):
        await resp.read()


async def test_listed_mode_and_per_vm_rule(pki: PKI, tmp_path: Path) -> None:
    """mode=listed refuses unlisted agents; a per-VM allowed_agents list overrides the mode."""
    src = FakeSource(disk_size=1 * MiB)
    cfg = make_config(
        pki,
        tmp_path / "store",
        authorization={"mode": "listed", "agents": ["h1"]},
        vms=[{"uuid": str(src.vm_uuid), "allowed_agents": ["h3"]}],
    )
    svc = BrokerService(cfg)
    await svc.start()
    try:
        other = FakeSource(disk_size=1 * MiB)
        async with AgentClient(svc.url, pki.agents["h2"]) as h2:
            assert h2.session is not None
            async with h2.session.put(
                f"{svc.url}/v1/replicas/{other.vm_uuid}/disk0",
                json={"vm_name": "x", "disk_size": MiB, "block_size": 65536},
            ) as resp:
                err = await resp.json()
                assert resp.status == 403
                assert err["details"]["rule"] == "authorization.listed"
        async with AgentClient(svc.url, pki.agents["h1"]) as h1:
            assert h1.session is not None
            async with h1.session.put(
                f"{svc.url}/v1/replicas/{src.vm_uuid}/disk0",
                json={"vm_name": "x", "disk_size": MiB, "block_size": 65536},
            ) as resp:
                err = await resp.json()
                assert resp.status == 403
                assert err["details"]["rule"] == "vms.allowed_agents"
        async with AgentClient(svc.url, pki.agents["h3"]) as h3:
            await h3.enable(src)
    finally:
        await svc.stop()


async def test_status_points_and_hashes(broker: BrokerService, pki: PKI) -> None:
    """Admin status shows roles, lag and last point; points list every cut; hashes match."""
    import struct

    import xxhash

    src = FakeSource(disk_size=2 * MiB)
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        await agent.enable(src, rpo_seconds=3600.0)
        for _ in range(4):
            src.mutate()
            await agent.ship(src, src.cut(consistency=1 if src.seq == 1 else 0))
        await settle(broker, src)
        assert agent.session is not None
        url = f"{broker.url}/v1/replicas/{src.vm_uuid}/{src.disk_id}/hashes?block_size=65536"
        async with agent.session.get(url) as resp:
            raw = await resp.read()
            assert resp.headers["X-Replikant-Applied-Seq"] == "4"
        expect = b"".join(
            struct.pack(">Q", xxhash.xxh3_64_intdigest(bytes(src.image[i : i + 65536])))
            for i in range(0, src.disk_size, 65536)
        )
        assert raw == expect
        async with agent.session.get(f"{broker.url}/v1/status") as resp:
            assert resp.status == 403
    async with AgentClient(broker.url, pki.admin) as admin:
        assert admin.session is not None
        async with admin.session.get(f"{broker.url}/v1/status") as resp:
            doc = await resp.json()
        (vm,) = doc["vms"]
        assert vm["name"] == "web1"
        assert vm["uuid"] == str(src.vm_uuid)
        assert vm["roles"] == {"primary": "PRIMARY", "recovery": "REPLICA"}
        assert vm["health"] in ("ok", "warning")
        assert vm["last_point"]["id"] == "1:4"
        async with admin.session.get(f"{broker.url}/v1/vms/web1/points") as resp:
            pts = await resp.json()
        assert [p["cut_id"] for p in pts["points"]] == [4, 3, 2, 1]
        assert pts["points"][2]["disks"] == {"disk0": "1-2"}
        assert [p["kind"] for p in pts["points"]] == ["crash", "crash", "app", "crash"]
        # Hashes of an older point, by id, through the admin endpoint.
        async with admin.session.get(
            f"{broker.url}/v1/vms/web1/hashes?block_size=65536&point=1-2"
        ) as resp:
            raw2 = await resp.read()
            assert resp.headers["X-Replikant-Applied-Seq"] == "2"
        # The same state named as the VM point of cut 2.
        async with admin.session.get(
            f"{broker.url}/v1/vms/web1/hashes?block_size=65536&point=1:2"
        ) as resp:
            assert await resp.read() == raw2
            assert resp.headers["X-Replikant-Cut-Id"] == "2"
            assert resp.headers["X-Replikant-Applied-Seq"] == "2"
        # A cut beyond anything durable is refused at once, however long the caller would wait.
        started = time.monotonic()
        async with admin.session.get(
            f"{broker.url}/v1/vms/web1/hashes?block_size=65536&point=1:99&wait=inf"
        ) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == "unknown_point"
        assert time.monotonic() - started < 5
        old = src.cuts[2].image
        assert raw2 == b"".join(
            struct.pack(">Q", xxhash.xxh3_64_intdigest(old[i : i + 65536]))
            for i in range(0, src.disk_size, 65536)
        )


async def test_client_dies_mid_upload(broker: BrokerService, pki: PKI) -> None:
    """A sender that dies halfway leaves no partial journal file, and its retry succeeds."""
    src, digest = await _enabled(broker, pki)
    src.mutate(20)
    cut = src.cut()

    async def half() -> AsyncIterator[bytes]:
        yield cut.body[: len(cut.body) // 2]
        await asyncio.sleep(0.2)
        raise ConnectionResetError("sender died")

    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        with pytest.raises((aiohttp.ClientError, ConnectionResetError)):
            await agent.post(src, half())
        replica = broker.store.get(str(src.vm_uuid), src.disk_id)
        assert replica is not None
        for _ in range(100):
            if not list(replica.journal_dir.iterdir()):
                break
            await asyncio.sleep(0.05)
        _assert_unchanged(broker, src, digest)
        status, body = await agent.post(src, cut.body)
        assert status == 200
        assert body["acked_seq"] == 2


async def test_full_batch_applied_directly_and_refused_cleanly(
    broker: BrokerService, pki: PKI
) -> None:
    """During the initial copy a FULL batch is applied while it streams; a corrupt one is refused
    without being committed, and its resend is applied once."""
    src = FakeSource(disk_size=2 * MiB, compression=Compression.NONE)
    src.mutate(30)
    cut = src.cut(full=True, all_blocks=True)
    bad = bytearray(cut.body)
    bad[len(bad) - 32 - 100] ^= 1  # inside the last extent's data
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        await agent.enable(src)
        status, err = await agent.post(src, bytes(bad))
        assert status == 400
        assert err["error"] == "corrupt_extent"
        state = await agent.state(src)
        assert state["durable_seq"] == 0
        status, body = await agent.post(src, cut.body)
        assert status == 200
        assert body["acked_seq"] == 1
        state = await agent.state(src)
        assert state["applied_seq"] == 1
        assert state["initial_sync"] == "in_progress"
        src.mutate(3)
        await agent.ship(src, src.cut())
        await settle(broker, src)
        assert (await agent.state(src))["initial_sync"] == "complete"
    r = broker.store.get(str(src.vm_uuid), src.disk_id)
    assert r is not None
    assert [x.seq for x in r.applied_records()] == [1, 2]
    assert r.image.read_bytes() == bytes(src.image)


async def test_deposed_owner_is_fenced(broker: BrokerService, pki: PKI) -> None:
    """Once another broker claims a higher epoch on the store, this one refuses uploads (503)
    and its applier stops with the `fenced` condition; nothing more is written."""
    from broker.store import Store

    src, digest = await _enabled(broker, pki)
    Store(broker.store.root).claim_next_epoch("b2")
    src.mutate()
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        status, err = await agent.post(src, src.cut().body)
    assert status == 503
    assert err["error"] == "not_owner"
    _assert_unchanged(broker, src, digest)


async def test_retention_task_prunes_by_policy(pki: PKI, tmp_path: Path) -> None:
    """With a zero any-point window and no hourly window, retention keeps only the newest point."""
    cfg = make_config(
        pki,
        tmp_path / "store",
        retention={**NEWEST_ONLY, "journal_bound": "1000%"},  # the policy prunes, not the bound
    )
    svc = BrokerService(cfg)
    await svc.start()
    try:
        src = FakeSource(disk_size=1 * MiB)
        async with AgentClient(svc.url, pki.agents["h1"]) as agent:
            await agent.enable(src)
            for _ in range(5):
                src.mutate()
                await agent.ship(src, src.cut())
        await settle(svc, src)
        engine = next(iter(svc.engines.values()))
        assert len(engine.points.points(engine.state())) == 5
        await asyncio.to_thread(svc.run_retention)
        assert [p.state.seq for p in engine.points.points(engine.state())] == [5]
        assert engine.points.undo_bytes() == 0
        r = engine.replica
        assert list(r.points_dir.iterdir()) == []
        assert r.image.read_bytes() == bytes(src.image)
    finally:
        await svc.stop()


async def test_generation_bump_keeps_points(broker: BrokerService, pki: PKI) -> None:
    """An admin's generation raise restarts seq numbering; the agent's PUT at the new generation
    is accepted, older points stay readable and a batch of the old generation is refused."""
    src = FakeSource(disk_size=1 * MiB)
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        await agent.enable(src)
        for _ in range(2):
            src.mutate()
            await agent.ship(src, src.cut())
        await settle(broker, src)
        stale = FakeSource(disk_size=src.disk_size, vm_uuid=src.vm_uuid, seq=2, seed=99)
        stale.mutate()
        old_gen_batch = stale.cut()  # generation 1, seq 3: from the old primary
        point_2 = src.cuts[2].image
        src.generation, src.seq = 2, 0
        async with AgentClient(broker.url, pki.admin) as admin:
            assert admin.session is not None
            async with admin.session.post(
                f"{broker.url}/v1/vms/web1/source", json={"generation": 2}
            ) as resp:
                assert resp.status == 200, await resp.text()
        state = await agent.enable(src)
        assert (state["generation"], state["durable_seq"]) == (2, 0)
        src.mutate()
        status, body = await agent.post(src, src.cut().body)
        assert (status, body["acked_seq"]) == (200, 1)
        status, err = await agent.post(src, old_gen_batch.body)
        assert (status, err["error"]) == (409, "stale_generation")
        await settle(broker, src)
    r = broker.store.get(str(src.vm_uuid), src.disk_id)
    assert r is not None
    engine = broker.engines[r.key]
    keys = [p.state.key for p in engine.points.points(engine.state())]
    assert keys == [(2, 1), (1, 2), (1, 1)]
    with engine.open_view((1, 2)) as view:
        assert view.read(0, src.disk_size) == point_2
    assert r.image.read_bytes() == bytes(src.image)
