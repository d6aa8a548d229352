"""`POST /v1/vms/{vm}/adopt` (decision 041) takes a file path from an admin: only a regular file
of the disk's size, named by an absolute path that is not a link, becomes a replica image; and a
promoted VM cannot be promoted again by a second, concurrent failover."""

from __future__ import annotations

import uuid
from pathlib import Path

from common.tls import client_context
from tests.security.broker_doors import BrokerWorld, expired, https, snapshot, world
from tests.security.rows import Door
from tests.support_broker import MiB

__all__ = ["expired", "world"]

SURFACE = "broker HTTPS adopt/promote"


def _adopt_body(image: str, size: int = MiB) -> dict[str, object]:
    disk = {"disk_id": "disk0", "image": image, "disk_size": size, "block_size": 65536}
    return {"vm_uuid": str(uuid.uuid4()), "generation": 2, "source_host": "h2",
            "source_site": "recovery", "disks": [disk]}  # fmt: skip


async def test_adopt_refuses_links_relative_paths_and_other_files(
    world: BrokerWorld, door: Door, tmp_path: Path
) -> None:
    """An adopt naming a symlink, a relative path, a directory or a file of another size is
    refused with 400 and creates no replica."""
    real = tmp_path / "disk.img"
    real.write_bytes(b"\0" * MiB)
    link = tmp_path / "link.img"
    link.symlink_to(real)
    small = tmp_path / "small.img"
    small.write_bytes(b"\0" * 4096)
    ctx = client_context(world.pki.admin)
    for what, image in (
        ("a symlink to a disk-sized file", str(link)),
        ("a relative path", "disk.img"),
        ("a directory", str(tmp_path)),
        ("a file of another size", str(small)),
        ("/proc/self/mem", "/proc/self/mem"),
    ):
        before = snapshot(world.svc.store.root)
        status, seen = await https(
            ctx, "POST", f"{world.url}/v1/vms/web2/adopt", json_body=_adopt_body(image)
        )
        door.attempt(
            SURFACE,
            f"admin adopts {what} as a replica image",
            expected="400 bad_request, no replica created",
            observed=f"{seen}; {world.store_text(before)}",
            refused=status == 400 and not world.damage(before),
        )
    assert real.stat().st_size == MiB


async def test_a_second_promotion_of_one_vm_is_refused(world: BrokerWorld, door: Door) -> None:
    """Promoting a VM that is already handed over is refused 409 naming its failover state."""
    ctx = client_context(world.pki.admin)
    status, seen = await https(
        ctx, "POST", f"{world.url}/v1/vms/web1/promote", json_body={"generation": 2}
    )
    assert status == 200, seen
    status, seen = await https(
        ctx, "POST", f"{world.url}/v1/vms/web1/promote", json_body={"generation": 3}
    )
    door.attempt(
        SURFACE,
        "second promotion of a VM already failed over",
        expected="409 failover_state",
        observed=seen,
        refused=status == 409 and "failover_state" in seen,
    )
