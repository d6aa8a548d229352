"""Point-in-time NBD exports read by real NBD clients (nbdcopy, qemu-io, qemu-img)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from broker.service import BrokerService
from broker.undo import KIND_DATA
from tests.support_agent import wait_until
from tests.support_broker import PKI, AgentClient, FakeSource, MiB, make_pki
from tests.support_pagecache import cached_pages, drop_from_cache
from tests.test_broker_http import broker as broker  # noqa: PLC0414 - re-exported fixture
from tests.test_broker_http import settle

pytestmark = pytest.mark.qemu

needs = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nbdcopy", "qemu-io", "qemu-img")),
    reason="needs nbdcopy (libnbd-bin) and qemu-io/qemu-img (qemu-utils)",
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def run(*cmd: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{cmd}: {err.decode()}{out.decode()}"
    return out.decode()


async def admin_call(svc: BrokerService, pki: PKI, method: str, path: str, **kw: Any) -> Any:
    async with AgentClient(svc.url, pki.admin) as admin:
        assert admin.session is not None
        async with admin.session.request(method, svc.url + path, **kw) as resp:
            body = await resp.json()
            assert resp.status < 400, body
            return body


@needs
async def test_read_every_point_with_nbdcopy_and_write_privately(
    broker: BrokerService, pki: PKI, tmp_path: Path
) -> None:
    """nbdcopy reads each retained point equal to the source at that cut, while the replica keeps
    applying; qemu-io writes land in the private overlay only, which is deleted on close."""
    src = FakeSource(disk_size=8 * MiB)
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        await agent.enable(src)
        for _ in range(5):
            src.mutate(12)
            await agent.ship(src, src.cut())
        await settle(broker, src)
        replica = broker.store.get(str(src.vm_uuid), src.disk_id)
        assert replica is not None
        made = await admin_call(broker, pki, "POST", "/v1/vms/web1/exports", json={"point": "1:2"})
        (exp,) = made["exports"]
        assert (exp["point"], exp["disk_point"]) == ("1:2", "1-2")
        # Replication goes on while the point is exported.
        for _ in range(3):
            src.mutate(12)
            await agent.ship(src, src.cut())
        await settle(broker, src)
    out = tmp_path / "p2.img"
    await run("nbdcopy", exp["nbd_uri"], str(out))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == src.cuts[2].digest
    replica_before = hashlib.sha256(replica.image.read_bytes()).hexdigest()
    # Every retained point, through its own export.
    pts = await admin_call(broker, pki, "GET", "/v1/vms/web1/points")
    assert [p["cut_id"] for p in pts["points"]] == list(range(8, 0, -1))
    for p in pts["points"]:
        made = await admin_call(
            broker, pki, "POST", "/v1/vms/web1/exports", json={"point": p["id"]}
        )
        (e,) = made["exports"]
        dst = tmp_path / f"{p['id']}.img"
        await run("nbdcopy", e["nbd_uri"], str(dst))
        assert hashlib.sha256(dst.read_bytes()).hexdigest() == src.cuts[p["cut_id"]].digest, p
        await admin_call(broker, pki, "DELETE", f"/v1/exports/{e['name']}")
        dst.unlink()
    # Writes go to the overlay: qemu-io writes a pattern and reads it back, unaligned too.
    uri = exp["nbd_uri"]
    await run("qemu-io", "-f", "raw", "-c", "write -P 0xab 65536 131072", uri)
    await run("qemu-io", "-f", "raw", "-c", "write -P 0xcd 1000448 4096", uri)
    await run("qemu-io", "-f", "raw", "-c", "write -z 2097152 1048576", uri)
    await run("qemu-io", "-f", "raw", "-c", "read -P 0xab 65536 131072", uri)
    await run("qemu-io", "-f", "raw", "-c", "read -P 0xcd 1000448 4096", uri)
    await run("qemu-io", "-f", "raw", "-c", "read -P 0 2097152 1048576", uri)
    after = tmp_path / "after.img"
    await run("nbdcopy", uri, str(after))
    expect = bytearray(src.cuts[2].image)
    expect[65536 : 65536 + 131072] = b"\xab" * 131072
    expect[1000448 : 1000448 + 4096] = b"\xcd" * 4096
    expect[2097152 : 2097152 + MiB] = bytes(MiB)
    assert after.read_bytes() == bytes(expect)
    assert hashlib.sha256(replica.image.read_bytes()).hexdigest() == replica_before
    # The other points are untouched by those writes.
    engine = broker.engines[replica.key]
    with engine.open_view((1, 2)) as view:
        assert view.read(0, src.disk_size) == src.cuts[2].image
    overlay = Path(exp["overlay"])
    assert await asyncio.to_thread(overlay.exists)
    await admin_call(broker, pki, "DELETE", f"/v1/exports/{exp['name']}")
    assert not await asyncio.to_thread(overlay.exists)
    assert (await admin_call(broker, pki, "GET", "/v1/exports"))["exports"] == []
    assert engine.points.pinned() == set()


@needs
async def test_qemu_img_compare_latest(broker: BrokerService, pki: PKI, tmp_path: Path) -> None:
    """qemu-img compare says the latest-point export equals the source image."""
    src = FakeSource(disk_size=4 * MiB, seed=7)
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        await agent.enable(src)
        src.mutate(30)
        await agent.ship(src, src.cut())
        await settle(broker, src)
    made = await admin_call(broker, pki, "POST", "/v1/vms/web1/exports", json={"read_only": True})
    (exp,) = made["exports"]
    source = tmp_path / "source.img"
    source.write_bytes(bytes(src.image))
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), exp["nbd_uri"])


def zero_blocks(image: bytes, block: int) -> set[int]:
    """Offsets of the ``block``-sized blocks of ``image`` that are all zero."""
    empty = bytes(block)
    return {o for o in range(0, len(image), block) if image[o : o + block] == empty}


async def mapped(uri: str) -> list[dict[str, Any]]:
    """qemu-img's map of an NBD export, from its block status (``base:allocation``)."""
    doc: list[dict[str, Any]] = json.loads(
        await run("qemu-img", "map", "--output=json", "-f", "raw", uri)
    )
    return doc


@needs
async def test_block_status_reports_what_reads_as_zero_at_each_point(
    broker: BrokerService, pki: PKI
) -> None:
    """qemu-img map of every point's export: whatever it calls zero reads as zero at that point,
    and every 64 KiB block that is all zero there is among it, undone later writes included
    (a restore of a sparse disk reads only what it holds); what the reader writes is data."""
    src = FakeSource(disk_size=8 * MiB, seed=11)
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        await agent.enable(src)
        for _ in range(4):
            src.mutate(12)
            await agent.ship(src, src.cut())
        # Blocks with data at the older points become holes in the replica: only their undo
        # data knows they were not zero then.
        for o in sorted(
            set(range(0, src.disk_size, src.block_size)) - zero_blocks(src.image, src.block_size)
        )[:3]:
            src.write(o, bytes(src.block_size))
        await agent.ship(src, src.cut())
        await settle(broker, src)
    pts = await admin_call(broker, pki, "GET", "/v1/vms/web1/points")
    assert len(pts["points"]) == 5
    for p in pts["points"]:
        image = src.cuts[p["cut_id"]].image
        made = await admin_call(
            broker, pki, "POST", "/v1/vms/web1/exports", json={"point": p["id"]}
        )
        (exp,) = made["exports"]
        extents = await mapped(exp["nbd_uri"])
        assert sum(e["length"] for e in extents) == src.disk_size
        zero = bytearray(src.disk_size)  # 1 where the map says zero
        for e in extents:
            if e["zero"]:
                start, n = e["start"], e["length"]
                assert image[start : start + n] == bytes(n), (p["id"], e)
                zero[start : start + n] = b"\x01" * n
        missed = [
            o
            for o in zero_blocks(image, src.block_size)
            if zero[o : o + src.block_size] != b"\x01" * src.block_size
        ]
        assert not missed, (p["id"], missed)
        assert any(not e["zero"] for e in extents)  # the data is there too
        if p is pts["points"][-1]:
            # The reader's own write over a hole makes that cluster data, the rest stays zero.
            hole = min(zero_blocks(image, src.block_size))
            await run(
                "qemu-io", "-f", "raw", "-c", f"write -P 0x5a {hole + 4096} 512", exp["nbd_uri"]
            )
            after = await mapped(exp["nbd_uri"])
            at = next(e for e in after if e["start"] <= hole < e["start"] + e["length"])
            assert not at["zero"], at
            assert at["data"], at
            await run(
                "qemu-io", "-f", "raw", "-c", f"read -P 0x5a {hole + 4096} 512", exp["nbd_uri"]
            )
        await admin_call(broker, pki, "DELETE", f"/v1/exports/{exp['name']}")


@pytest.mark.skipif(os.geteuid() != 0, reason="mincore of another process's files: root only")
async def test_prefetch_of_an_older_point_reads_its_undo_data_in(
    broker: BrokerService, pki: PKI
) -> None:
    """The NBD server prefetches a batch of cold READs before it reads them (``cache``): for an
    older point that must bring in the undo data its bytes come from, not only the replica's
    range, or each read of it waits for the disk in turn. Fails if ``prefetch`` skips the
    segments: they stay out of the page cache."""
    src = FakeSource(disk_size=8 * MiB)
    async with AgentClient(broker.url, pki.agents["h1"]) as agent:
        await agent.enable(src)
        for _ in range(4):
            src.mutate(40)
            await agent.ship(src, src.cut())
        await settle(broker, src)
    replica = broker.store.get(str(src.vm_uuid), src.disk_id)
    assert replica is not None
    segments = sorted(replica.points_dir.glob("undo-*.dat"))
    assert segments
    for path in [replica.image, *segments]:
        drop_from_cache(path)
    assert sum(cached_pages(p)[0] for p in segments) == 0
    with broker.engines[replica.key].open_view((1, 2)) as view:
        saved = [e for e in view.overlay_in(0, src.disk_size) if e[4] == KIND_DATA]
        assert saved, "the point must read some of its bytes from undo data"
        view.prefetch(0, src.disk_size)
        await wait_until(lambda: sum(cached_pages(p)[0] for p in segments) > 0, within=5)
        assert view.read(0, src.disk_size) == src.cuts[2].image
