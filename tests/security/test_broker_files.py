"""Issue 8, finding 5: the broker's files are as private as the disks they copy.

Every file the broker creates is 0600 and every directory 0700, whatever the umask it was
started with; a store left with looser modes is tightened at start; the point-in-time NBD socket
is for the broker's user and the configured group only (directory 0750, socket 0660); a local
user who is neither reads nothing.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.service import BrokerService
from common.errors import ConfigError
from tests.security.rows import Door
from tests.support_broker import (
    NEWEST_ONLY,
    PKI,
    AgentClient,
    BrokerProcess,
    FakeSource,
    MiB,
    broker_toml,
    free_port,
    make_config,
)

SURFACE = "broker store files"
NOBODY = 65534
SOCKET_GROUP = "daemon"


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """Run with the umask most shells have, so a file created without an explicit mode shows."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def loose_entries(root: Path, skip: Path | None = None) -> tuple[list[str], int]:
    """Entries under ``root`` (itself included, ``skip`` left out) that group or others may
    use, and how many entries were checked."""
    bad = []
    count = 0
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(top) / d != skip]
        for path in [Path(top)] + [Path(top) / n for n in files]:
            st = os.lstat(path)
            count += 1
            mode = stat.S_IMODE(st.st_mode)
            if (stat.S_ISDIR(st.st_mode) and mode != 0o700) or mode & 0o077:
                bad.append(f"{path.relative_to(root)} {oct(mode)}")
    return bad, count


async def _replicate(url: str, pki: PKI, src: FakeSource, batches: int) -> None:
    async with AgentClient(url, pki.agents["h1"]) as agent:
        await agent.enable(src)
        for _ in range(batches):
            src.mutate()
            await agent.ship(src, src.cut())


async def test_every_file_is_private_after_replication_exports_and_retention(
    pki: PKI, tmp_path: Path, loose_umask: None, door: Door
) -> None:
    """Under umask 022, replication, a point-in-time export and retention leave no file or
    directory in the store that group or others may read; the NBD socket directory is 0750 and
    the socket 0660, both of the configured group."""
    cfg = make_config(
        pki,
        tmp_path / "store",
        nbd_socket_dir=str(tmp_path / "nbd"),
        nbd_socket_group=SOCKET_GROUP,
        retention=NEWEST_ONLY,
    )
    svc = BrokerService(cfg)
    await svc.start()
    try:
        src = FakeSource(disk_size=2 * MiB)
        await _replicate(svc.url, pki, src, 6)
        replica = svc.store.get(str(src.vm_uuid), src.disk_id)
        assert replica is not None
        async with asyncio.timeout(20):
            await svc.engines[replica.key].wait_for_state((1, 6))
        async with AgentClient(svc.url, pki.admin) as admin:
            assert admin.session is not None
            async with admin.session.post(
                f"{svc.url}/v1/vms/web1/exports", json={"point": "1:3"}
            ) as resp:
                assert resp.status == 201, await resp.text()
                (export,) = (await resp.json())["exports"]
        assert await asyncio.to_thread(Path(export["overlay"]).exists)
        # Before retention (undo segments, journal, overlay) and after it (merged, pruned).
        bad, checked = loose_entries(svc.store.root)
        await asyncio.to_thread(svc.run_retention)
        bad_after, checked_after = loose_entries(svc.store.root)
        bad, checked = bad + bad_after, checked + checked_after
        door.attempt(
            SURFACE,
            "group/world access to any store file or directory after replication, a PIT "
            "export and retention (umask 022)",
            expected="none: files 0600, directories 0700",
            observed=", ".join(bad) or f"none of {checked} entries",
            refused=not bad,
        )
        sock = svc.nbd_socket
        gid = grp.getgrnam(SOCKET_GROUP).gr_gid
        d, s = os.lstat(sock.parent), os.lstat(sock)
        observed = (
            f"dir {oct(stat.S_IMODE(d.st_mode))} gid {d.st_gid}, "
            f"socket {oct(stat.S_IMODE(s.st_mode))} gid {s.st_gid}"
        )
        door.attempt(
            "broker PIT NBD socket",
            "other users reach the point-in-time NBD socket",
            expected=f"dir 0o750 gid {gid}, socket 0o660 gid {gid}",
            observed=observed,
            refused=observed == f"dir 0o750 gid {gid}, socket 0o660 gid {gid}",
        )
    finally:
        await svc.stop()


async def test_a_planted_socket_directory_stops_the_broker(
    pki: PKI, tmp_path: Path, door: Door
) -> None:
    """A socket directory that another user created (who could swap the socket) is refused at
    start, naming the directory."""
    planted = tmp_path / "nbd"
    planted.mkdir()
    os.chown(planted, NOBODY, NOBODY)
    svc = BrokerService(make_config(pki, tmp_path / "store", nbd_socket_dir=str(planted)))
    with pytest.raises(ConfigError) as caught:
        await svc.start()
    await svc.stop()
    door.attempt(
        "broker PIT NBD socket",
        "socket directory pre-created by uid 65534",
        expected="broker refuses to start, naming the directory",
        observed=caught.value.message,
        refused=str(planted) in caught.value.message,
    )
    assert not (planted / "pit.sock").exists()


def test_broker_run_sets_umask_and_tightens_an_old_store(
    pki: PKI, tmp_path: Path, door: Door
) -> None:
    """`replikant broker run` runs with umask 077, tightens a store left world-readable with one
    store_permissions_tightened event, and then user nobody can read no replica file."""
    store = tmp_path / "store"
    log = tmp_path / "broker.log"
    config = broker_toml(tmp_path / "broker.toml", pki, store, port=free_port())
    proc = BrokerProcess(config, store, log)
    url = proc.start()
    try:
        asyncio.run(_replicate(url, pki, FakeSource(disk_size=MiB), 3))
    finally:
        assert proc.stop() == 0
    # An older broker (or a careless restore) left everything readable to all.
    loosened_files = loosened_dirs = 0
    for top, _dirs, files in os.walk(store):
        os.chmod(top, 0o755)  # noqa: S103 - the looseness under test
        loosened_dirs += 1
        for name in files:
            if stat.S_ISREG(os.lstat(Path(top) / name).st_mode):
                os.chmod(Path(top) / name, 0o644)
                loosened_files += 1
    proc.start()
    try:
        assert proc.proc is not None
        umask = next(
            line.split()[1]
            for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines()
            if line.startswith("Umask:")
        )
        door.attempt(
            SURFACE,
            "broker process creates files group/world-readable",
            expected="umask 0077",
            observed=f"umask {umask}",
            refused=umask == "0077",
        )
        events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        tightened = [e for e in events if e.get("event") == "store_permissions_tightened"]
        # The socket directory keeps its own modes (0750): it is not counted.
        assert [(e["files"], e["dirs"]) for e in tightened] == [(loosened_files, loosened_dirs - 1)]
        bad, checked = loose_entries(store, skip=store / ".nbd")
        door.attempt(
            SURFACE,
            "store left world-readable by an older broker, after restart",
            expected="tightened: files 0600, directories 0700",
            observed=", ".join(bad) or f"none of {checked} entries loose",
            refused=not bad,
        )
        assert stat.S_IMODE(os.lstat(store / ".nbd").st_mode) == 0o750
        image = next(store.glob("*/disk0/replica.img"))
        nobody = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "cat", image],
            capture_output=True,
            text=True,
            check=False,
        )
        door.attempt(
            SURFACE,
            "user nobody reads a replica image",
            expected="Permission denied",
            observed=nobody.stderr.strip() or f"read {len(nobody.stdout)} characters",
            refused=nobody.returncode != 0 and "Permission denied" in nobody.stderr,
        )
    finally:
        proc.stop()
