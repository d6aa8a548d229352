"""A full store: refusal with 507 naming the store, an alert, no corruption, recovery by itself.

The store lives on a small tmpfs mounted by the test (root only; skipped with the reason
otherwise), filled with a filler file until the broker must refuse.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.apply import ReplicaEngine
from broker.journal import BatchReceiver
from broker.service import BrokerService
from broker.space import free_bytes
from broker.store import Store
from common.hrl import DEFAULT_LIMITS, Compression
from tests.support_broker import PKI, AgentClient, FakeSource, MiB, make_pki
from tests.test_broker_http import make_config


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the disk-full test needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> Path:
    """Grow a filler file until only about ``leave`` bytes are free."""
    filler = mnt / "filler"
    chunk = bytes(1 << 20)
    with filler.open("ab") as fh:
        while free_bytes(mnt) > leave + len(chunk):
            fh.write(os.urandom(len(chunk)) if False else chunk)
            fh.flush()
        rest = free_bytes(mnt) - leave
        if rest > 0:
            fh.write(bytes(rest))
    return filler


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_disk_full_refuses_alerts_and_recovers(pki: PKI, small_fs: Path) -> None:
    """507 names the store and both byte counts, an alert is raised, the replica and its points
    stay intact, and the next batch after space returns succeeds with the alert cleared."""
    store_dir = small_fs / "store"
    alerts: list[tuple[str, dict[str, Any]]] = []
    svc = BrokerService(
        make_config(
            pki,
            store_dir,
            broker={
                "node": "b1",
                "cluster": "c1",
                "site": "recovery",
                "listen": "127.0.0.1:0",
                "store": str(store_dir),
                "min_free_bytes": 4 * MiB,
            },
        )
    )
    svc.add_alert_hook(lambda event, fields: alerts.append((event, fields)))
    await svc.start()
    src = FakeSource(disk_size=16 * MiB, compression=Compression.NONE)
    try:
        async with AgentClient(svc.url, pki.agents["h1"]) as agent:
            await agent.enable(src)
            for _ in range(3):
                src.mutate(10)
                assert (await agent.post(src, src.cut().body))[0] == 200
            engine = next(iter(svc.engines.values()))
            import asyncio

            async with asyncio.timeout(20):
                await engine.wait_for_state((1, 3))
            replica = engine.replica
            before = digest(replica.image)
            filler = fill(small_fs, leave=2 * MiB)
            src.mutate(10)
            cut = src.cut()
            status, err = await agent.post(src, cut.body)
            assert status == 507
            assert err["error"] == "storage_full"
            assert str(store_dir) in err["message"]
            assert err["details"]["needed_bytes"] > err["details"]["free_bytes"]
            raised = [f for e, f in alerts if e == "alert_raised"]
            assert any(f["condition"] == "storage_full" for f in raised)
            assert all(f["fix"] for f in raised)  # an MQTT alert never carries "fix": null
            async with agent.session.get(f"{svc.url}/v1/replicas/{src.vm_uuid}/disk0") as r:  # type: ignore[union-attr]
                assert (await r.json())["durable_seq"] == 3
            assert digest(replica.image) == before
            assert list(replica.journal_dir.iterdir()) == []
            # Status shows it: the broker's condition and the VM's health.
            async with AgentClient(svc.url, pki.admin) as admin:
                assert admin.session is not None
                async with admin.session.get(f"{svc.url}/v1/status") as resp:
                    doc = await resp.json()
            assert doc["vms"][0]["health"] == "critical"
            assert [c["code"] for c in doc["broker"]["conditions"]] == ["storage_full"]
            # Recovery points yielded first: their undo went before the 507, the newest state
            # is intact.
            assert engine.points.journal_bytes() == 0
            with engine.open_view((1, 3)) as view:
                assert view.read(0, src.disk_size) == src.cuts[3].image
            # Space returns: the very next upload of the same batch succeeds, alert cleared.
            filler.unlink()
            status, ok = await agent.post(src, cut.body)
            assert status == 200
            assert ok["acked_seq"] == 4
            assert any(e == "alert_cleared" for e, _ in alerts)
            async with asyncio.timeout(20):
                await engine.wait_for_state((1, 4))
            assert replica.image.read_bytes() == bytes(src.image)
    finally:
        await svc.stop()


def test_enospc_mid_journal_and_mid_apply(small_fs: Path) -> None:
    """With no reserve, ENOSPC while journaling refuses and removes the partial file; ENOSPC while
    saving undo data leaves the image untouched, and the apply completes once space returns."""
    store = Store(small_fs / "store")
    store.claim_epoch(1, "b1")
    src = FakeSource(disk_size=16 * MiB, compression=Compression.NONE, seed=11)
    replica, _ = store.create_replica(
        vm_uuid=str(src.vm_uuid),
        disk_id="disk0",
        vm_name="web1",
        disk_size=src.disk_size,
        block_size=src.block_size,
        generation=1,
        epoch=1,
    )
    engine = ReplicaEngine(store, replica, epoch=lambda: 1)

    def journal(body: bytes) -> None:
        rx = BatchReceiver(
            store,
            replica,
            url_identity=replica.key,
            limits=DEFAULT_LIMITS,
            min_free_bytes=0,
            max_batch_bytes=1 << 40,
        )
        try:
            for i in range(0, len(body), 256 * 1024):
                rx.feed(body[i : i + 256 * 1024])
            rx.finish()
        except BaseException:
            rx.abort()
            raise

    # A batch whose data covers most of the disk with random bytes (incompressible).
    for b in range(0, 12 * MiB, 64 * 1024):
        src.write(b, os.urandom(64 * 1024))
    big = src.cut()
    filler = fill(small_fs, leave=1 * MiB)
    from broker.errors import StorageFullError

    with pytest.raises(StorageFullError) as full:
        journal(big.body)
    assert full.value.details["store"] == str(store.root)
    assert list(replica.journal_dir.iterdir()) == []
    filler.unlink()
    journal(big.body)  # durable now
    engine.apply_pending()
    before = digest(replica.image)
    # Now a batch that rewrites the same data: its undo needs ~12 MiB that are not there.
    for b in range(0, 12 * MiB, 64 * 1024):
        src.write(b, os.urandom(64 * 1024))
    second = src.cut()
    journal(second.body)
    filler = fill(small_fs, leave=256 * 1024)
    with pytest.raises(OSError, match="No space left") as err:
        engine.apply_pending()
    assert err.value.errno in (errno.ENOSPC, errno.EDQUOT)
    assert digest(replica.image) == before
    assert not [p for p in replica.points_dir.iterdir() if p.name.endswith(".tmp")]
    filler.unlink()
    assert engine.apply_pending() == 1
    assert replica.image.read_bytes() == bytes(src.image)
    with engine.open_view((1, 1)) as view:
        assert view.read(0, src.disk_size) == big.image
    with contextlib.suppress(Exception):
        engine.close()
