"""A multi-disk VM's recovery points stay crash-consistent after lost acks (issue 8, finding 2).

A real ``replikant agent run`` protects a VM with two disks and ships to a real ``replikant broker
run``. A writer writes an increasing counter to disk0, then the same counter to disk1, each with
FUA, through the agent's NBD exports, in that order, for ever. Meanwhile the broker is killed
(SIGKILL) again and again at the one instant that makes the disks' numbering drift: right after
disk0's batch of a cut became durable and before its ack, while disk1's (made larger by filler
writes) is still on its way (a test-only fault hook, see
``broker.journal._fault_die_before_ack``). Then every VM point the broker lists is read through
its point-in-time NBD export, and must preserve the write order: ``counter(disk0)`` equals
``counter(disk1)`` or ``counter(disk1) + 1``.

The test also proves it can fail: the broker's ``applied.log`` must show the disks' sequence
numbers drifted apart, and pairing the same states by sequence number (what brokers did before
cut ids) must break the write order at some point, read back through the hashes endpoint.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import xxhash

from common.tls import client_context
from tests.fixtures_pki import make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    MiniNBD,
    NBDClientError,
    ReplikantProc,
    VMSpec,
    agent_process,
    broker_config,
    export_ready,
    free_port,
    make_image,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

KILLS = 10  # at least this many broker kills...
DRIFTS = 3  # ...and at least this many of them leaving the disks' numbering changed
MAX_KILLS = 30
SIZE = 32 * MiB
BLOCK = 4096
FILLER = 64 * 1024
FAULT_ENV = "REPLIKANT_TEST_FAULT_DIE_BEFORE_ACK"


def block(k: int) -> bytes:
    """Counter ``k`` as one block (repeated, so that a torn block would show)."""
    return struct.pack(">Q", k) * (BLOCK // 8)


def counter(data: bytes) -> int:
    """The counter a block holds (0 for the never-written disk); refuses a torn block."""
    k: int = struct.unpack_from(">Q", data)[0]
    assert data == block(k), f"torn counter block (starts with {k})"
    return k


class OrderedWriter:
    """Writes 1, 2, 3... to disk0 then disk1, each write FUA, each acknowledged in turn.

    After each pair it also writes random filler elsewhere on disk1, so that disk1's batches take
    longer to upload than disk0's: a broker killed when disk0's batch is durable then has not
    got disk1's of the same cut.
    """

    def __init__(self, socks: tuple[Path, Path], exports: tuple[str, str]) -> None:
        self.socks = socks
        self.exports = exports
        self.last = 0
        self.error: BaseException | None = None

    def run(self, stop: threading.Event) -> None:
        """Write until ``stop``; the agent is never killed, so any NBD error is a failure."""
        rng = random.Random(8)
        try:
            nbd = [MiniNBD(s, e, timeout=10) for s, e in zip(self.socks, self.exports, strict=True)]
            try:
                while not stop.is_set():
                    k = self.last + 1
                    nbd[0].write(0, block(k), fua=True)
                    nbd[1].write(0, block(k), fua=True)
                    self.last = k
                    filler = rng.randrange(MiB // FILLER, SIZE // FILLER) * FILLER
                    nbd[1].write(filler, bytes([k & 0xFF]) * FILLER)
                    time.sleep(0.002)  # a few hundred pairs a second: plenty, and gentle on CI
            finally:
                for c in nbd:
                    c.close()
        except (OSError, NBDClientError) as exc:
            self.error = exc


class Admin:
    """The broker's admin API over mutual TLS (the admin certificate)."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.http = http

    async def json(self, method: str, path: str, **kw: Any) -> Any:
        async with self.http.request(method, f"{self.url}{path}", **kw) as resp:
            assert resp.status < 300, (resp.status, await resp.text())
            return await resp.json()

    async def block_hash(self, disk: str, point: str) -> bytes:
        """xxh3 of block 0 of ``disk`` at ``point`` (a disk state ``G-S``)."""
        params = {"disk": disk, "point": point, "block_size": BLOCK, "offset": 0, "length": BLOCK}
        async with self.http.get(f"{self.url}/v1/vms/vm1/hashes", params=params) as resp:
            assert resp.status == 200, (resp.status, await resp.text())
            return await resp.read()

    async def up(self) -> bool:
        try:
            async with self.http.get(f"{self.url}/v1/status") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False


def _applied(replica_dir: Path) -> list[dict[str, Any]]:
    lines = (replica_dir / "applied.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


async def _wait(
    what: str, predicate: Callable[[], Awaitable[bool]], within: float, *procs: ReplikantProc
) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        for p in procs:
            assert p.proc is not None
            assert p.proc.poll() is None, f"{p.args[0]} died; see {p.log}"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_vm_points_keep_write_order_across_lost_acks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten broker kills between fsync and ack: every listed VM point keeps disk0-then-disk1
    write order, read through its point-in-time exports."""
    pki = make_pki(tmp_path / "pki")
    store = tmp_path / "store"
    trigger = tmp_path / "die-before-ack"
    monkeypatch.setenv(FAULT_ENV, str(trigger))  # the broker inherits it; the agent ignores it
    bport = free_port()
    url = f"https://127.0.0.1:{bport}"
    bcfg = broker_config(tmp_path / "b.toml", pki, store, bport)
    # disk1's random filler churns more undo than 100 % of the disk: the default journal bound
    # would drop the points this test reads. The bound has its own tests (test_journal_bound*).
    with bcfg.open("a") as f:
        f.write('\n[retention]\njournal_bound = "10000%"\n')
    broker = ReplikantProc(["broker", "run", "--config", str(bcfg)], tmp_path / "broker.log")
    vm = VMSpec(
        "vm1",
        [DiskSpec(d, make_image(tmp_path / f"{d}.img", SIZE)) for d in ("disk0", "disk1")],
    )
    agent = agent_process(
        tmp_path,
        pki=pki,
        broker_urls=[url],
        vms=[vm],
        interval=1.0,
        # Uncompressed, disk1's filler makes its batches megabytes long: slower than disk0's.
        policy_extra='block_size = 4096\ncompression = "none"',
    )
    socks = (tmp_path / "sock" / "vm1-disk0.sock", tmp_path / "sock" / "vm1-disk1.sock")
    exports = ("vm1-disk0", "vm1-disk1")
    writer = OrderedWriter(socks, exports)
    stop = threading.Event()
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(pki.admin.tls)))
    admin = Admin(url, http)
    writing: asyncio.Task[None] | None = None
    broker.start()
    agent.start()
    try:

        async def exports_ready() -> bool:
            return all(
                [
                    await asyncio.to_thread(export_ready, s, e)
                    for s, e in zip(socks, exports, strict=True)
                ]
            )

        async def has_point() -> bool:
            if not await admin.up():
                return False
            (doc,) = (await admin.json("GET", "/v1/status"))["vms"] or [None]
            return doc is not None and doc["last_point"] is not None

        await _wait("the agent's exports", exports_ready, 20, agent, broker)
        await _wait("a first VM point", has_point, 30, agent, broker)
        writing = asyncio.create_task(asyncio.to_thread(writer.run, stop))
        drift = 0  # applied seq of disk0 minus disk1's at the same cut
        kills = drifts = 0
        while kills < KILLS or drifts < DRIFTS:
            assert kills < MAX_KILLS, f"only {drifts} of {kills} kills made the numbering drift"
            kills += 1
            # disk0's next batch kills the broker once durable: disk0 has that cut, disk1 (its
            # batch larger, still uploading) will not, and the agent hears of neither.
            trigger.write_text("disk0")
            deadline = time.monotonic() + 20
            assert broker.proc is not None
            while broker.proc.poll() is None:
                assert time.monotonic() < deadline, f"kill {kills}: the fault never fired"
                await asyncio.sleep(0.02)
            assert not trigger.exists()
            broker.start()
            await _wait("the broker back up", admin.up, 20, agent, broker)
            before = writer.last

            async def wrote_more(before: int = before) -> bool:
                return writer.last > before + 50

            # Let the agent resume and ship a few cuts with the writer going before the next kill.
            await _wait("new writes", wrote_more, 20, agent, broker)
            await asyncio.sleep(1.5)
            now = await _drift(admin)
            drifts += now != drift
            drift = now
        await asyncio.sleep(2.5)
        stop.set()
        await writing
        writing = None
        assert writer.error is None, writer.error
        # Everything the agent cut after the last write reaches the broker.
        disk_dirs = [store / str(vm.uuid) / d for d in ("disk0", "disk1")]

        async def settled() -> bool:
            (doc,) = (await admin.json("GET", "/v1/status"))["vms"]
            return all(d["backlog"] == 0 for d in doc["disks"]) and await _latest_has(
                admin, writer.last
            )

        await _wait("the last writes in a VM point", settled, 30, agent, broker)
        points = (await admin.json("GET", "/v1/vms/vm1/points"))["points"]
        # Every listed VM point, through its own point-in-time exports, keeps the write order.
        checked = []
        for p in points:
            made = await admin.json("POST", "/v1/vms/vm1/exports", json={"point": p["id"]})
            by_disk = {e["disk"]: e for e in made["exports"]}
            values = []
            for d in ("disk0", "disk1"):
                e = by_disk[d]
                nbd = await asyncio.to_thread(MiniNBD, Path(e["socket"]), e["name"])
                try:
                    values.append(counter(await asyncio.to_thread(nbd.read, 0, BLOCK)))
                finally:
                    nbd.close()
            for e in made["exports"]:
                await admin.json("DELETE", f"/v1/exports/{e['name']}")
            c0, c1 = values
            assert c0 in (c1, c1 + 1), f"VM point {p['id']} breaks write order: {c0=} {c1=}"
            checked.append(c0)
        assert len(points) >= KILLS, f"only {len(points)} VM points listed"
        assert checked[0] == writer.last, "the newest VM point misses the last writes"
        assert len(set(checked)) > KILLS, "the points do not span the write load"
        # The store's audit: each disk applied 1..N exactly once, cut ids only growing, and the
        # faults really made the disks' numbering drift (else this test proved nothing).
        logs = [_applied(d) for d in disk_dirs]
        for log in logs:
            assert [r["seq"] for r in log] == list(range(1, len(log) + 1))
            cuts = [r["cut_id"] for r in log]
            assert cuts == sorted(set(cuts))
            assert cuts[0] > 0
        seq_at = [{r["cut_id"]: r["seq"] for r in log if not r["full"]} for log in logs]
        drifted = [c for c in seq_at[0].keys() & seq_at[1].keys() if seq_at[0][c] != seq_at[1][c]]
        assert drifted, "no lost ack made the disks' sequence numbers drift apart"
        # What pairing by sequence number would have listed breaks the write order.
        known = {
            xxhash.xxh3_64_intdigest(block(k)).to_bytes(8, "big"): k for k in range(writer.last + 1)
        }
        listed = {p["disks"]["disk0"] for p in points} | {p["disks"]["disk1"] for p in points}
        by_seq = sorted(
            {r["seq"] for r in logs[0] if not r["full"]}
            & {r["seq"] for r in logs[1] if not r["full"]}
        )
        broken = 0
        for seq in by_seq:
            state = f"1-{seq}"
            if state not in listed:
                continue  # not retained as part of any VM point: not readable any more
            c0 = known[await admin.block_hash("disk0", state)]
            c1 = known[await admin.block_hash("disk1", state)]
            broken += c0 not in (c1, c1 + 1)
        assert broken, "pairing by seq would have kept the write order: the test cannot fail"
        assert agent.stop() == 0
        assert broker.stop() == 0
    finally:
        stop.set()
        if writing is not None:
            await writing
        await http.close()
        agent.kill9()
        broker.kill9()


async def _drift(admin: Admin) -> int:
    """disk0's applied seq minus disk1's, read when both are at the same cut."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        (doc,) = (await admin.json("GET", "/v1/status"))["vms"]
        d0, d1 = sorted(doc["disks"], key=lambda d: d["disk_id"])
        if d0["last_cut"] == d1["last_cut"] and d0["backlog"] == d1["backlog"] == 0:
            return int(d0["applied_seq"]) - int(d1["applied_seq"])
        await asyncio.sleep(0.05)
    raise AssertionError("the two disks never stood at the same cut")


async def _latest_has(admin: Admin, last: int) -> bool:
    """The newest VM point holds the writer's last counter on both disks."""
    doc = await admin.json("GET", "/v1/vms/vm1/points")
    if not doc["points"]:
        return False
    p = doc["points"][0]
    c0 = await admin.block_hash("disk0", p["disks"]["disk0"])
    c1 = await admin.block_hash("disk1", p["disks"]["disk1"])
    want = xxhash.xxh3_64_intdigest(block(last)).to_bytes(8, "big")
    return c0 == want and c1 == want
