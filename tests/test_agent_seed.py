"""`POST /v1/seed/export` in process, against the stand-in broker: interruption and resume,
an older export imported instead of the newest, lost media (cancel), an unreachable broker.

The stand-in broker has no import endpoint: a test "imports" media the way the broker does it
(the image into the replica, durable seq set to the export's seq). The real import runs in
tests/test_seed_export.py.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agents import seedmedia as seed_mod
from tests.support_agent import (
    MiB,
    control_request,
    wait_until,
)
from tests.test_agent_ship import Rig, make_rig

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def media_rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """One 16 MiB disk (4 MiB of data) whose policy waits for media."""
    r = await make_rig(tmp_path, policy_extra='initial_copy = "media"')
    try:
        yield r
    finally:
        await r.halt()
        await r.rx.stop()


async def export(rig: Rig, directory: Path, **extra: Any) -> tuple[int, dict[str, Any]]:
    """POST /v1/seed/export to the rig's agent."""
    assert rig.agent is not None
    body = {"dir": str(directory), "vms": ["vm1"], **extra}
    status, doc = await control_request(rig.agent.control_socket, "POST", "/v1/seed/export", body)
    return status, doc


def import_media(rig: Rig, directory: Path) -> int:
    """What `replikant seed import` does to the replica; returns the imported seq."""
    (vm,) = json.loads((directory / "manifest.json").read_text())["vms"]
    (disk,) = vm["disks"]
    shutil.copyfile(directory / disk["image"], rig.replica.image)
    rig.replica.durable_seq = disk["seq"]
    rig.replica.initial_sync = "complete"
    return int(disk["seq"])


async def test_interrupted_export_resumes_and_keeps_tracking_exact(
    media_rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed export gives back only the blocks pending before its cut; the rerun with
    --resume reuses what the media holds; after the import only later changes ship."""
    rig = media_rig
    await rig.start()
    await wait_until(lambda: rig.rep.seed_status() == {"state": "awaiting_export"})
    await rig.write(("write", 3 * MiB + 4096, b"before the export" * 100))
    pending = rig.rep.export.map.dirty_bytes
    assert 0 < pending <= 128 * 1024

    calls = {"n": 0}
    real = seed_mod.MediaImage.data

    def failing(self: seed_mod.MediaImage, offset: int, data: bytes | bytearray) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, offset, data)

    monkeypatch.setattr(seed_mod.MediaImage, "data", failing)
    media = rig.tmp / "media"
    status, body = await export(rig, media)
    assert status == 507, body
    assert body["error"] == "media_full"
    assert "--resume" in body["fix"]
    # Only what was pending before the cut is pending again, not the whole disk.
    assert rig.rep.export.map.dirty_bytes == pending
    assert rig.rep.export.cut is None
    assert rig.rep.seed_status() == {"state": "awaiting_export"}
    assert not (media / "manifest.json").exists()

    monkeypatch.setattr(seed_mod.MediaImage, "data", real)
    status, body = await export(rig, media)
    assert status == 409
    assert body["error"] == "media_not_empty"
    assert "interrupted export" in body["message"]
    status, body = await export(rig, media, resume=True)
    assert status == 200, body
    (disk,) = body["vms"][0]["disks"]
    assert disk["seq"] == 1
    assert disk["reused_bytes"] >= 2 * MiB  # the extents written before the failure
    assert disk["written_bytes"] + disk["reused_bytes"] == 4 * MiB + 64 * 1024
    assert rig.rep.seed_status()["state"] == "awaiting_import"  # type: ignore[index]
    assert rig.rep.state is not None
    assert rig.rep.state.seed_seq == 1
    assert rig.replica.batches == []

    await rig.write(("write", 9 * MiB, b"after the export" * 100))
    assert import_media(rig, media) == 1
    await wait_until(lambda: rig.converged() and bool(rig.replica.batches), within=20)
    assert rig.rep.mode == "delta"
    assert [b.header.seq for b in rig.replica.batches][:1] == [2]
    assert not any(b.header.full for b in rig.replica.batches)
    assert sum(b.header.data_bytes for b in rig.replica.batches) <= 64 * 1024


async def test_older_media_imported_falls_back_to_hash_compare(media_rig: Rig) -> None:
    """A second export numbers its cut anew; importing the first one instead is noticed and
    resolved by comparing hashes (the dirty map only knows the changes since the second)."""
    rig = media_rig
    await rig.start()
    await wait_until(lambda: rig.rep.seed_status() == {"state": "awaiting_export"})
    status, body = await export(rig, rig.tmp / "m1")
    assert status == 200, body
    await rig.write(("write", 5 * MiB, b"between the two exports" * 50))
    status, body = await export(rig, rig.tmp / "m2")
    assert status == 200, body
    assert body["vms"][0]["disks"][0]["seq"] == 2
    assert import_media(rig, rig.tmp / "m1") == 1
    await wait_until(lambda: rig.converged() and bool(rig.replica.batches), within=20)
    assert rig.rep.mode == "delta"
    assert rig.rep.state is not None
    assert not rig.rep.state.verify_pending
    # Only the block that differs from the older media was shipped.
    assert sum(b.header.data_bytes for b in rig.replica.batches) <= 2 * 64 * 1024


async def test_unreachable_broker_and_lost_media(tmp_path: Path) -> None:
    """With the broker down the export is judged by local state; `seed cancel` then gives the
    disk back to its network policy (an initial copy, since the replica is empty)."""
    rig = await make_rig(tmp_path)
    try:
        rig.rx.refuse = True  # every request 503: the recovery site is not reachable
        await rig.start()
        status, body = await export(rig, tmp_path / "media")
        assert status == 200, body
        assert rig.rep.seed_status()["state"] == "awaiting_import"  # type: ignore[index]
        assert rig.agent is not None
        status, doc = await control_request(
            rig.agent.control_socket, "POST", "/v1/seed/cancel", {"vms": ["vm1"]}
        )
        assert status == 200
        assert doc["vms"][0]["disks"] == [{"id": "disk0", "cancelled": True}]
        rig.rx.refuse = False
        await wait_until(rig.settled, within=30)
        assert any(b.header.full for b in rig.replica.batches)
        # A replica that holds data is not exported without --force.
        status, body = await export(rig, tmp_path / "media2")
        assert status == 409
        assert body["error"] == "replica_has_data"
        assert "--force" in body["fix"]
    finally:
        await rig.halt()
        await rig.rx.stop()
