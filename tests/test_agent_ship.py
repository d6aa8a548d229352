"""Shipping: durable acks, retries, resends, zero/trim extents, initial copy, seeding, status.

The agent runs in-process (its NBD exports, replication loops and status endpoint) against the
stand-in broker of :mod:`tests.support_agent`, which lets each test break the link on purpose.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
import structlog.testing
import xxhash

import agents.replicate
import agents.state
from agents.errors import ShipError
from agents.replicate import DiskReplicator
from agents.service import Agent
from agents.ship import BrokerClient, TokenBucket
from common.config import AgentConfig, load_config
from common.hrl import ExtentKind
from common.tls import client_context
from tests.fixtures_pki import Pki, make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    MiniNBD,
    Receiver,
    ReplicaRecord,
    VMSpec,
    control_request,
    local_agent_config,
    make_image,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


@dataclass
class Rig:
    """An in-process agent protecting one disk, shipping to a stand-in broker."""

    tmp: Path
    pki: Pki
    rx: Receiver
    image: Path
    vm: VMSpec
    config: Path
    agent: Agent | None = None
    stop: asyncio.Event | None = None
    task: asyncio.Task[None] | None = None

    @property
    def rep(self) -> DiskReplicator:
        """The disk's replicator."""
        assert self.agent is not None
        return self.agent.replicators[0]

    @property
    def replica(self) -> ReplicaRecord:
        """The stand-in broker's replica."""
        return self.rx.replica(self.vm.uuid, "disk0")

    @property
    def sock(self) -> Path:
        """The export's unix socket."""
        return self.tmp / "s" / "vm1-disk0.sock"

    async def start(self, *, run: bool = True, full_batch_bytes: int | None = None) -> Agent:
        """Start the agent (and its loops unless ``run`` is false)."""
        self.agent = Agent(load_config(self.config, AgentConfig))
        await self.agent.start()
        if full_batch_bytes is not None:
            self.rep.full_batch_bytes = full_batch_bytes
        if run:
            self.stop = asyncio.Event()
            self.task = asyncio.create_task(self.agent.run(self.stop))
        return self.agent

    async def halt(self, *, clean: bool = True) -> None:
        """Stop the loops and the agent."""
        if self.stop is not None and self.task is not None:
            self.stop.set()
            async with asyncio.timeout(20):
                await self.task
        if self.agent is not None:
            await self.agent.stop(clean=clean)
        self.agent = self.stop = self.task = None

    def converged(self) -> bool:
        """Replica and image are byte-identical."""
        key = (str(self.vm.uuid), "disk0")
        return key in self.rx.replicas and (
            self.replica.image.read_bytes() == self.image.read_bytes()
        )

    def settled(self) -> bool:
        """Converged, and the agent has processed the ack of everything the broker holds."""
        if not self.converged() or self.replica.applying:
            return False
        seq = self.replica.durable_seq
        return seq > 0 and self.rep.status.last_acked_seq == seq == len(self.replica.batches)

    async def write(self, *ops: tuple[str, int, bytes | int]) -> None:
        """Run NBD requests against the export in a thread."""

        def run() -> None:
            nbd = MiniNBD(self.sock, "vm1-disk0")
            try:
                for op, offset, arg in ops:
                    if op == "write":
                        assert isinstance(arg, bytes)
                        nbd.write(offset, arg)
                    elif op == "zero":
                        assert isinstance(arg, int)
                        nbd.write_zeroes(offset, arg)
                    else:
                        assert isinstance(arg, int)
                        nbd.trim(offset, arg)
                nbd.flush()
            finally:
                nbd.close()

        await asyncio.to_thread(run)


async def make_rig(tmp_path: Path, *, policy_extra: str = "") -> Rig:
    """A 16 MiB image with 4 MiB of data, protected with a 1 s interval (not started)."""
    pki = make_pki(tmp_path / "pki")
    rx = Receiver(tmp_path / "rx", pki)
    url = await rx.start()
    image = make_image(
        tmp_path / "d.img", 16 * MiB, fill=lambda i: os.urandom(MiB) if i in (0, 5, 6, 9) else b""
    )
    vm = VMSpec("vm1", [DiskSpec("disk0", image)])
    config = local_agent_config(tmp_path, pki, url, [vm], interval=1.0, policy_extra=policy_extra)
    return Rig(tmp_path, pki, rx, image, vm, config)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """A 16 MiB image with 4 MiB of data, protected with a 1 s interval."""
    r = await make_rig(tmp_path)
    try:
        yield r
    finally:
        await r.halt()
        await r.rx.stop()


async def test_initial_copy_skips_holes_and_is_resumable(rig: Rig) -> None:
    """The initial copy goes as bounded FULL batches of allocated data and resumes after a stop."""
    rig.rx.accept_limit = 2
    await rig.start(full_batch_bytes=1 * MiB)
    await wait_until(lambda: len(rig.rx.replicas) == 1 and len(rig.replica.batches) >= 2)
    await rig.halt(clean=False)  # as if stopped between two chunks of the initial copy
    rig.rx.accept_limit = None
    done = len(rig.replica.batches)
    cursor_end = max(e[0] + e[1] for b in rig.replica.batches for e in b.extents)
    with structlog.testing.capture_logs() as logs:
        await rig.start(full_batch_bytes=1 * MiB)
        # The last progress event, not the state flag: the agent flips the flag in memory
        # before it writes the state file off the event loop and logs the event.
        await wait_until(
            lambda: (
                rig.converged()
                and any(e["event"] == "initial_sync_progress" and e["complete"] for e in logs)
            ),
            within=20,
        )
    # Progress says bytes, rate and ETA of this run (the resumed part only).
    progress = [e for e in logs if e["event"] == "initial_sync_progress"]
    assert progress[-1]["complete"] is True
    assert progress[-1]["done_bytes"] == progress[-1]["total_bytes"]
    assert progress[-1]["rate_bytes_per_second"] > 0
    assert progress[-1]["eta_seconds"] == 0
    batches = rig.replica.batches
    full = [b for b in batches if b.header.full]
    assert len(full) >= 4  # 4 MiB of data in chunks of 1 MiB
    # Holes are never read or sent: only the allocated MiBs appear in the FULL batches.
    assert sum(b.header.data_bytes for b in full) <= 5 * MiB
    # The restart resumed where the acked chunks ended (no chunk sent twice).
    resumed = batches[done]
    assert resumed.header.full
    assert resumed.extents[0][0] >= cursor_end - MiB
    assert rig.rep.state is not None
    assert rig.rep.state.initial_done


async def test_full_batches_grow_with_the_copys_rate(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FULL batches start at FULL_BATCH_BYTES and grow to what FULL_BATCH_SECONDS copies at the
    rate of the batch before, never past FULL_BATCH_MAX; the copy stays exact (scaled down: 1
    and 2 MiB instead of 256 MiB and 1 GiB)."""
    monkeypatch.setattr(agents.replicate, "FULL_BATCH_BYTES", 1 * MiB)
    monkeypatch.setattr(agents.replicate, "FULL_BATCH_MAX", 2 * MiB)
    await rig.start()
    await wait_until(
        lambda: rig.converged() and rig.rep.state is not None and rig.rep.state.initial_done,
        within=20,
    )
    sizes = [b.header.data_bytes for b in rig.replica.batches if b.header.full]
    assert sizes[0] == 1 * MiB  # nothing measured yet
    assert max(sizes) == 2 * MiB  # loopback copies 1 MiB far faster than in 2 s: capped
    assert sum(sizes) == 4 * MiB  # the allocated MiBs once each, holes skipped
    assert agents.replicate.full_batch_size(0.0) == 1 * MiB  # a stalled copy keeps the least
    assert agents.replicate.full_batch_size(0.75 * MiB) == 1.5 * MiB


async def test_zero_writes_and_trims_travel_without_payload(rig: Rig) -> None:
    """A written block of zeroes becomes a ZERO extent; WRITE_ZEROES and TRIM need no read."""
    await rig.start()
    await wait_until(rig.settled, within=20)
    n = len(rig.replica.batches)
    await rig.write(
        ("write", 0, bytes(256 * 1024)),
        ("zero", 5 * MiB, MiB),
        ("trim", 9 * MiB, MiB),
        ("write", 12 * MiB, b"x" * 4096),
    )
    # Converged alone is not enough: the zeroes already match the fresh replica before they ship.
    await wait_until(
        lambda: (
            rig.settled() and rig.rep.export.map.dirty_bytes == 0 and len(rig.replica.batches) > n
        ),
        within=10,
    )
    kinds: dict[ExtentKind, int] = {}
    for b in rig.replica.batches[n:]:
        for _off, length, kind in b.extents:
            kinds[kind] = kinds.get(kind, 0) + length
    assert kinds[ExtentKind.ZERO] == 256 * 1024 + MiB
    assert kinds[ExtentKind.TRIM] == MiB
    assert kinds[ExtentKind.DATA] == 4096  # the written grain, not its 64 KiB block
    wire = sum(b.wire_bytes for b in rig.replica.batches[n:])
    assert wire < 64 * 1024, "zero and trim extents must not carry payload"


async def test_broker_outage_keeps_tracking_and_catches_up(rig: Rig) -> None:
    """While the broker is down writes keep being tracked; afterwards one delta catches up."""
    await rig.start()
    await wait_until(rig.settled, within=20)
    port = rig.rx.port
    await rig.rx.stop()
    for i in range(20):
        await rig.write(("write", (i % 16) * MiB + 4096, os.urandom(8192)))
        await asyncio.sleep(0.1)
    await wait_until(lambda: rig.rep.status.errors >= 1, within=10)
    assert rig.agent is not None
    assert rig.rep.export.map.dirty_bytes <= 16 * 64 * 1024  # only the map grows, bounded
    await rig.rx.start(port)
    await wait_until(rig.settled, within=40)
    seqs = [b.header.seq for b in rig.replica.batches]
    assert seqs == list(range(1, len(seqs) + 1))


async def test_guests_are_served_while_the_state_file_is_written(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state file written after each ack (two fsyncs) does not hold up guest requests: it
    is written off the event loop that serves them. A slow store disk is stood in for by a
    write that sleeps 3 s (a fault a test cannot cause otherwise)."""
    await rig.start()
    await wait_until(rig.settled, within=20)
    real = agents.state.atomic_write
    slow = threading.Event()

    def slow_write(path: Path, data: bytes, **kw: object) -> None:
        if path.name == "disk0.json":
            slow.set()
            time.sleep(3)
        real(path, data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(agents.state, "atomic_write", slow_write)
    took: list[float] = []

    def guest() -> None:  # a thread of its own: the test's loop is the agent's
        if not slow.wait(10):
            return
        began = time.monotonic()
        nbd = MiniNBD(rig.sock, "vm1-disk0")
        try:
            nbd.write(5 * MiB, os.urandom(4096))
            nbd.flush()
        finally:
            nbd.close()
        took.append(time.monotonic() - began)

    writer = threading.Thread(target=guest)
    writer.start()
    await rig.write(("write", 3 * MiB, os.urandom(4096)))
    await asyncio.to_thread(writer.join, 20)
    assert took, "the state file was never written"
    assert took[0] < 1.5, f"a guest write waited {took[0]:.1f} s for the state file"
    monkeypatch.undo()
    await wait_until(rig.settled, within=20)


async def test_lost_ack_resends_harmlessly(rig: Rig) -> None:
    """A batch that became durable but whose ack was lost goes again in the next seq."""
    await rig.start()
    await wait_until(rig.settled, within=20)
    rig.rx.lose_acks = 1
    rig.rx.lose_only_nonempty = True
    await rig.write(("write", 3 * MiB, os.urandom(65536)))
    await wait_until(lambda: rig.rep.status.errors >= 1, within=10)
    await rig.write(("write", 3 * MiB + 4096, os.urandom(4096)))
    await wait_until(rig.settled, within=20)
    batches = rig.replica.batches
    seqs = [b.header.seq for b in batches]
    assert seqs == list(range(1, len(seqs) + 1))
    # The block of the lost-ack batch was shipped again after the failure.
    with_block = [b.header.seq for b in batches if any(e[0] == 3 * MiB for e in b.extents)]
    assert len(with_block) >= 2


async def test_refused_batches_back_off_and_retry(rig: Rig) -> None:
    """503 answers are retried with backoff, then the data arrives."""
    await rig.start()
    await wait_until(rig.settled, within=20)
    rig.rx.reject_batches = 3
    await rig.write(("write", MiB, os.urandom(4096)))
    await wait_until(rig.settled, within=30)
    assert rig.rep.status.errors >= 3


async def test_bandwidth_limit_paces_the_upload() -> None:
    """The token bucket holds a stream to its rate (after the initial burst)."""
    bucket = TokenBucket(rate=4 * MiB, burst=256 * 1024)
    started = time.monotonic()
    for _ in range(8):
        await bucket.take(256 * 1024)
    elapsed = time.monotonic() - started
    assert 0.35 < elapsed < 1.0  # 2 MiB at 4 MiB/s, less the burst


async def test_seeding_ships_only_differing_blocks(rig: Rig) -> None:
    """A replica seeded from an older copy is compared by hashes: only differences cross."""
    seed = rig.tmp / "seed.img"
    shutil.copyfile(rig.image, seed)
    with rig.image.open("r+b") as fh:  # the source moved on since the copy was taken
        fh.seek(5 * MiB + 100)
        fh.write(b"changed since the seed")
        fh.seek(11 * MiB)
        fh.write(os.urandom(70000))
    rig.rx.seed_from = seed
    await rig.start()
    await wait_until(rig.settled, within=20)
    shipped = sum(
        length
        for b in rig.replica.batches
        for _o, length, kind in b.extents
        if kind is ExtentKind.DATA
    )
    assert not any(b.header.full for b in rig.replica.batches)
    assert shipped == 3 * 64 * 1024  # one block at 5 MiB, two at 11 MiB


async def test_interrupted_hash_compare_starts_over(rig: Rig) -> None:
    """A hash comparison cut short (here: the broker fails, then the agent stops) is redone."""
    seed = rig.tmp / "seed.img"
    shutil.copyfile(rig.image, seed)
    with rig.image.open("r+b") as fh:
        fh.seek(13 * MiB)
        fh.write(b"newer than the seed")
    rig.rx.seed_from = seed
    rig.rx.fail_hashes = 1000
    await rig.start()
    await wait_until(lambda: rig.rep.status.errors >= 1, within=10)
    await rig.halt(clean=True)  # a clean stop: the dirty map alone would trust itself
    rig.rx.fail_hashes = 0
    await rig.start()
    await wait_until(rig.settled, within=20)
    data = [e for b in rig.replica.batches for e in b.extents if e[2] is ExtentKind.DATA]
    assert [(o, length) for o, length, _k in data] == [(13 * MiB, 64 * 1024)]


async def test_image_changed_while_stopped_resyncs_by_hashes(rig: Rig) -> None:
    """After a clean stop, a change made behind the agent's back is found by hash compare."""
    await rig.start()
    await wait_until(rig.settled, within=20)
    await rig.halt(clean=True)
    with rig.image.open("r+b") as fh:
        fh.seek(7 * MiB)
        fh.write(b"offline edit")
    n = len(rig.replica.batches)
    await rig.start()
    await wait_until(rig.settled, within=20)
    data = [e for b in rig.replica.batches[n:] for e in b.extents if e[2] is ExtentKind.DATA]
    assert [(o, length) for o, length, _k in data] == [(7 * MiB, 64 * 1024)]


async def test_fenced_when_replica_has_a_newer_generation(rig: Rig) -> None:
    """A failed-over replica (higher generation) stops this disk's shipping, visibly."""
    await rig.start()
    # Past the batch that completes the initial copy too, or it could meet generation 2 first
    # and fence the VM before the write below (which then fails with EPERM).
    await wait_until(lambda: rig.settled() and not rig.rep.backlog, within=20)
    rig.replica.generation = 2
    await rig.write(("write", 0, os.urandom(4096)))
    await wait_until(lambda: rig.rep.fenced is not None, within=20)
    assert "generation" in (rig.rep.fenced or "")
    assert rig.agent is not None
    assert rig.agent.status()["disks"][0]["fenced"]


async def test_status_endpoint_and_cli(rig: Rig) -> None:
    """GET /v1/status reports per disk; `replikant agent status` renders it."""
    agent = await rig.start()
    await wait_until(rig.settled, within=20)
    await rig.write(("write", 0, os.urandom(4096)))
    _, doc = await control_request(agent.control_socket, "GET", "/v1/status")
    (disk,) = doc["disks"]
    for key in (
        "dirty_bytes",
        "last_cut_time",
        "last_acked_seq",
        "lag_seconds",
        "throughput_bytes_per_second",
        "errors",
    ):
        assert key in disk
    assert disk["last_acked_seq"] >= 1
    assert disk["errors"] == 0
    # The command runs as the operator runs it, a process of its own: in this one, click's
    # CliRunner would swap sys.stdout under the agent's loop, whose log lines then land in the
    # command's output.
    status = [str(Path(sys.executable).parent / "replikant"), "agent", "status"]
    result = await asyncio.to_thread(
        subprocess.run, [*status, "--config", str(rig.config), "--json"], capture_output=True
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["disks"][0]["disk"] == "disk0"
    table = await asyncio.to_thread(
        subprocess.run, [*status, "--config", str(rig.config)], capture_output=True, text=True
    )
    assert table.returncode == 0, table.stderr
    assert "disk0" in table.stdout


async def test_clean_restart_ships_nothing_extra(rig: Rig) -> None:
    """After SIGTERM-style clean stop, a restart restores the exact map: no pessimistic delta."""
    await rig.start()
    await wait_until(rig.settled, within=20)
    assert rig.agent is not None
    rig.agent.workers[0].policy = rig.agent.workers[0].policy.model_copy(
        update={"interval_seconds": 60.0}
    )
    await rig.halt(clean=True)
    n = len(rig.replica.batches)
    await rig.start()
    await wait_until(lambda: len(rig.replica.batches) > n, within=10)
    assert sum(b.header.data_bytes for b in rig.replica.batches[n:]) == 0


async def test_verify_endpoint_hashes_the_shipped_cut(rig: Rig) -> None:
    """POST /v1/vms/VM/verify ships a cut and returns hashes equal to the replica's at that seq.

    A guest keeps writing during the hashing: the snapshot's copy-on-write keeps the hashes at
    the cut.
    """
    rig.rx.keep_images = True
    agent = await rig.start()
    await wait_until(rig.settled, within=20)
    stop = asyncio.Event()

    async def guest() -> None:
        while not stop.is_set():
            await rig.write(("write", int.from_bytes(os.urandom(2)) * 128, os.urandom(8192)))

    writer = asyncio.create_task(guest())
    try:
        sock = agent.control_socket
        status, doc = await control_request(sock, "POST", "/v1/vms/vm1/verify", {})
        assert status == 200, doc
        (disk,) = doc["disks"]
        replica_hashes = await asyncio.to_thread(
            _replica_hashes_at, rig, int(disk["seq"]), int(disk["block_size"])
        )
        status, _ = await control_request(sock, "POST", "/v1/vms/nope/verify", {})
        assert status == 404
        status, doc = await control_request(
            sock,
            "POST",
            "/v1/vms/vm1/repair",
            {"disks": [{"disk_id": "disk0", "ranges": [[2 * MiB, 4096]]}]},
        )
        assert status == 200
        assert doc["marked_bytes"] == 4096
    finally:
        stop.set()
        await writer
    assert base64.b64decode(disk["hashes"]) == replica_hashes
    await wait_until(
        lambda: any(e[0] == 2 * MiB for b in rig.replica.batches for e in b.extents), within=10
    )


def _replica_hashes_at(rig: Rig, seq: int, block_size: int) -> bytes:
    """The replica's block hashes as of ``seq`` (the receiver kept the image of each seq)."""
    data = rig.replica.images[seq]
    return b"".join(
        struct.pack(">Q", xxhash.xxh3_64_intdigest(data[i : i + block_size]))
        for i in range(0, len(data), block_size)
    )


@pytest.mark.parametrize("code", ["not_authorised", "wrong_identity"])
async def test_refused_by_the_broker_retries_slowly(rig: Rig, code: str) -> None:
    """A 403 is an error shown in status and retried only every minute, not a fast loop."""
    rig.rx.forbid = code
    with structlog.testing.capture_logs() as logs:
        await rig.start()
        await wait_until(lambda: rig.rep.refused is not None, within=10)
        await asyncio.sleep(1.5)  # past an interval: no new attempt while refused
    refused = [e for e in logs if e["event"] == "replication_refused"]
    assert len(refused) == 1
    assert refused[0]["log_level"] == "error"
    assert refused[0]["code"] == code
    assert "may not replicate" in refused[0]["error"]
    assert refused[0]["fix"] == "add 'h1' to allowed_agents"
    assert not [e for e in logs if e["event"] == "broker_unavailable"]
    assert len(rig.rx.requests) == 1
    assert rig.agent is not None
    disk = rig.agent.status()["disks"][0]
    assert "may not replicate" in disk["refused"]
    assert disk["fenced"] is None
    # The broker's configuration is fixed; the next slow retry replicates again.
    rig.rx.forbid = None
    rig.rep.refused_until = 0.0  # as if the minute had passed
    await wait_until(rig.settled, within=20)
    assert rig.rep.refused is None


async def test_refused_batch_is_not_fenced(rig: Rig) -> None:
    """A 403 on a batch upload (not on the PUT) refuses the same way."""
    await rig.start()
    await wait_until(rig.settled, within=20)
    rig.rx.forbid = "not_authorised"
    await rig.write(("write", 0, os.urandom(4096)))
    await wait_until(lambda: rig.rep.refused is not None, within=10)
    assert rig.rep.fenced is None
    assert rig.rep.refused_until > time.monotonic() + 50


async def test_client_follows_the_member_a_refusal_names(tmp_path: Path) -> None:
    """A `not_owner` refusal naming `owner_url` sends the next request there (even a member not
    in `[broker] urls`); when that member fails, the client falls back to its list."""
    pki = make_pki(tmp_path / "pki")
    standby = Receiver(tmp_path / "standby", pki)
    owner = Receiver(tmp_path / "owner", pki)
    await standby.start()
    await owner.start()
    standby.redirect = owner.url
    vm_uuid = uuid.uuid4()
    body = {"vm_name": "vm1", "disk_size": MiB, "block_size": 65536}
    client = BrokerClient([standby.url], client_context(pki.agent.tls), cluster="c1")
    try:
        with pytest.raises(ShipError) as refused:
            await client.state(vm_uuid, "disk0")
        assert refused.value.code == "not_owner"
        assert client.url == owner.url
        state = await client.enable(vm_uuid, "disk0", body)
        assert state.durable_seq == 0
        assert ("PUT", f"/v1/replicas/{vm_uuid}/disk0") in owner.requests
        await owner.stop()
        with pytest.raises(ShipError):
            await client.state(vm_uuid, "disk0")
        assert client.url == standby.url
    finally:
        await client.close()
        await standby.stop()
        await owner.stop()
