"""kill -9 of the agent, 50 times, under a continuous write load: nothing lost, no full copy.

The agent runs as a real ``replikant agent run`` process; a writer thread writes random blocks
through its NBD export and remembers every acknowledged write. The agent is killed with SIGKILL
at a random instant (mid-write, mid-cut or mid-upload), restarted at once, and the replica must
then converge to a byte-identical copy of the image, having shipped only a bounded delta (no FULL
batch after the initial copy). A write that failed because the agent died is retried after the
restart, so the image's final contents are known exactly and checked at the end.

The stand-in broker (:class:`tests.support_agent.Receiver`) receives the batches because the
test inspects each one (FULL flag, size) and the real broker has no runnable service yet.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures_pki import make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    MiniNBD,
    NBDClientError,
    Receiver,
    VMSpec,
    free_port,
    make_image,
    replikant_exe,
    write_agent_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

KILLS = 50
SIZE = 64 * MiB
PAGE = 4096
REGION = 4 * MiB


class Writer:
    """Writes random pages into one hot region per burst; remembers what was acknowledged."""

    def __init__(self, sock: Path, export: str, seed: int) -> None:
        self.sock = sock
        self.export = export
        self.rng = random.Random(seed)
        self.model: dict[int, bytes] = {}
        self.pending: tuple[int, bytes] | None = None
        self.acked = 0

    def burst(self, stop: threading.Event, region: int) -> None:
        """Write until ``stop`` or until the agent dies (the failed write stays pending)."""
        try:
            nbd = MiniNBD(self.sock, self.export, timeout=5)
        except (OSError, NBDClientError):
            return
        try:
            if self.pending is not None:
                self._write(nbd, *self.pending)
            while not stop.is_set():
                pages = self.rng.choice([1, 1, 2, 4, 16])
                first = self.rng.randrange(0, REGION // PAGE - pages)
                offset = region * REGION + first * PAGE
                self._write(nbd, offset, self.rng.randbytes(pages * PAGE))
        except (OSError, NBDClientError):
            return
        finally:
            nbd.sock.close()

    def _write(self, nbd: MiniNBD, offset: int, data: bytes) -> None:
        self.pending = (offset, data)
        nbd.write(offset, data, fua=self.rng.random() < 0.02)
        self.pending = None
        self.acked += 1
        for k in range(0, len(data), PAGE):
            self.model[offset + k] = data[k : k + PAGE]


def _same(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x = fa.read(8 * MiB)
            if x != fb.read(8 * MiB):
                return False
            if not x:
                return True


async def _start(cfg: Path, log: Path, sock: Path, export: str) -> asyncio.subprocess.Process:
    with log.open("ab") as fh:
        proc = await asyncio.create_subprocess_exec(
            replikant_exe(),
            "--log-json",
            "agent",
            "run",
            "--config",
            str(cfg),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=fh,
            stderr=fh,
        )
    deadline = time.monotonic() + 20
    while True:  # ready when the export answers (a stale socket file refuses connections)
        if proc.returncode is not None:
            raise AssertionError(f"agent exited with {proc.returncode}; see {log}")
        try:
            MiniNBD(sock, export, timeout=2).close()
            return proc
        except (OSError, NBDClientError):
            if time.monotonic() > deadline:
                raise AssertionError(f"agent did not start; see {log}") from None
            await asyncio.sleep(0.02)


async def _converge(
    rx_image: Path, image: Path, proc: asyncio.subprocess.Process, log: Path
) -> None:
    deadline = time.monotonic() + 20
    while not await asyncio.to_thread(_same, rx_image, image):
        if proc.returncode is not None:
            raise AssertionError(f"agent exited with {proc.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise AssertionError(f"replica did not converge; see {log}")
        await asyncio.sleep(0.05)


async def test_fifty_kill9_under_write_load_converge_without_full_copy(tmp_path: Path) -> None:
    """50 SIGKILLs at random instants: every restart converges byte-identical with a delta."""
    rng = random.Random(99)
    pki = make_pki(tmp_path / "pki")
    rx = Receiver(tmp_path / "rx", pki)
    url = await rx.start()
    image = make_image(
        tmp_path / "disk0.img", SIZE, fill=lambda i: rng.randbytes(MiB) if i % 8 == 0 else b""
    )
    vm = VMSpec("vm1", [DiskSpec("disk0", image)])
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        pki=pki,
        broker_urls=[url],
        vms=[vm],
        state_dir=tmp_path / "state",
        socket_dir=tmp_path / "sock",
        status_port=free_port(),
        interval=1.0,
    )
    sock = tmp_path / "sock" / "vm1-disk0.sock"
    export = "vm1-disk0"
    log = tmp_path / "agent.log"
    writer = Writer(sock, export, seed=7)
    proc = await _start(cfg, log, sock, export)
    try:
        replica = None
        while replica is None:
            await asyncio.sleep(0.05)
            replica = rx.replicas.get((str(vm.uuid), "disk0"))
        await _converge(replica.image, image, proc, log)
        initial = len(replica.batches)
        assert all(b.header.full for b in replica.batches)
        shipped_after_restart: list[int] = []
        for _ in range(KILLS):
            stop = threading.Event()
            burst = asyncio.create_task(
                asyncio.to_thread(writer.burst, stop, rng.randrange(SIZE // REGION))
            )
            await asyncio.sleep(rng.uniform(0.02, 1.5))
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            stop.set()
            await burst
            before = len(replica.batches)
            proc = await _start(cfg, log, sock, export)
            await _converge(replica.image, image, proc, log)
            after = replica.batches[before:]
            shipped_after_restart.append(sum(b.header.data_bytes for b in after))
        # Let the last failed write through, converge, then stop cleanly.
        stop = threading.Event()
        stop.set()
        await asyncio.to_thread(writer.burst, stop, 0)
        await _converge(replica.image, image, proc, log)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await rx.stop()

    assert writer.acked > 1000, "the write load was too light to mean anything"
    later = replica.batches[initial:]
    assert not any(b.header.full for b in later), "a FULL copy happened after a kill"
    seqs = [b.header.seq for b in replica.batches]
    assert seqs == list(range(1, len(seqs) + 1))
    # Each restart shipped at most the regions written since the last ack: a bounded delta.
    assert max(shipped_after_restart) <= SIZE // 4, shipped_after_restart
    assert sum(shipped_after_restart) / KILLS < SIZE / 8
    # Every acknowledged write is in the image (and so in the replica).
    fd = os.open(image, os.O_RDONLY)
    try:
        for offset, data in writer.model.items():
            assert os.pread(fd, PAGE, offset) == data, f"acknowledged write at {offset} lost"
    finally:
        os.close(fd)
    assert _same(replica.image, image)
