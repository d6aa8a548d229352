"""What the agent says when the link to the broker breaks: the right cause, on every disk.

The agent runs in-process against the stand-in broker of :mod:`tests.support_agent`; a TCP
proxy in between resets connections mid-upload (a real RST, SO_LINGER 0), and stopping the
stand-in broker makes a real outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from pathlib import Path

import pytest
import structlog.testing

from agents import replicate
from tests.fixtures_pki import Pki, make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    Receiver,
    VMSpec,
    local_agent_config,
    make_image,
    wait_until,
)
from tests.test_agent_ship import Rig

pytestmark = pytest.mark.timeout(90)

CERT_BLAME = "refused our certificate"


class ResettingProxy:
    """A TCP proxy that resets the next ``resets`` connections once their client has sent more
    than ``after`` bytes (a broker killed, or a network reset, in the middle of an upload), or,
    while ``blackhole`` is set, swallows everything both ways (a network black hole)."""

    def __init__(self, upstream: int, *, resets: int = 0, after: int = 0) -> None:
        self.upstream = upstream
        self.resets = resets
        self.after = after
        self.blackhole = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen on 127.0.0.1; return the port."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def drop_all(self) -> None:
        """Close every proxied connection (the network comes back: old connections are gone)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self) -> None:
        """Stop listening and drop every connection."""
        assert self._server is not None
        self._server.close()
        await self.drop_all()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        back = asyncio.create_task(self._pipe(up_reader, writer))
        sent = 0
        try:
            while data := await reader.read(65536):
                if self.blackhole:
                    continue
                sent += len(data)
                if self.resets > 0 and sent > self.after:
                    self.resets -= 1
                    for w in (writer, up_writer):
                        sock = w.get_extra_info("socket")
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        w.transport.abort()
                    return
                up_writer.write(data)
                await up_writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            back.cancel()
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if self.blackhole:
                    continue
                writer.write(data)
                await writer.drain()


def proxied_config(
    tmp_path: Path, pki: Pki, port: int, vms: list[VMSpec], policy_extra: str = ""
) -> Path:
    """An agent config that ships ``vms`` through the proxy on ``port``."""
    return local_agent_config(
        tmp_path, pki, f"https://127.0.0.1:{port}", vms, policy_extra=policy_extra
    )


async def test_a_reset_mid_upload_is_named_as_such_and_cleared_after_recovery(
    tmp_path: Path,
) -> None:
    """A connection reset while a batch uploads is reported as a reset of that batch (seq,
    vm/disk, retry), never as a refused certificate; after the next ack last_error is gone
    while the error count and time stay."""
    pki = make_pki(tmp_path / "pki")
    rx = Receiver(tmp_path / "rx", pki)
    await rx.start()
    proxy = ResettingProxy(rx.port, resets=2, after=512 * 1024)
    port = await proxy.start()
    image = make_image(
        tmp_path / "d.img", 16 * MiB, fill=lambda i: os.urandom(MiB) if i < 4 else b""
    )
    vm = VMSpec("vm1", [DiskSpec("disk0", image)])
    config = proxied_config(tmp_path, pki, port, [vm], 'compression = "none"')
    rig = Rig(tmp_path, pki, rx, image, vm, config)
    try:
        with structlog.testing.capture_logs() as logs:
            await rig.start()
            await wait_until(rig.settled, within=60)
        failed = [e for e in logs if e["event"] == "batch_failed"]
        assert len(failed) == 2, failed
        for event in failed:
            assert CERT_BLAME not in event["error"], event
            assert "reset by the broker or the network while uploading batch seq" in event["error"]
            assert "of vm1/disk0" in event["error"]
            assert "will retry with backoff" in event["error"]
            assert event["code"] == "connection_reset"
        disk = rig.rep.snapshot()
        assert disk["errors"] == 2
        assert disk["last_error"] is None
        assert disk["last_error_time"] is not None
    finally:
        await rig.halt()
        await proxy.stop()
        await rx.stop()
    assert rig.replica.image.read_bytes() == image.read_bytes()


async def test_an_outage_shows_on_every_disk_until_the_next_ack(tmp_path: Path) -> None:
    """With the broker down, every disk of every VM shows errors and last_error; once the broker
    is back and a batch is acked, last_error is cleared on each."""
    pki = make_pki(tmp_path / "pki")
    rx = Receiver(tmp_path / "rx", pki)
    url = await rx.start()
    images = {
        name: make_image(tmp_path / f"{name}.img", 4 * MiB, fill=lambda i: os.urandom(MiB))
        for name in ("a0", "a1", "b0")
    }
    vms = [
        VMSpec("vma", [DiskSpec("disk0", images["a0"]), DiskSpec("disk1", images["a1"])]),
        VMSpec("vmb", [DiskSpec("disk0", images["b0"])]),
    ]
    config = local_agent_config(tmp_path, pki, url, vms)
    rig = Rig(tmp_path, pki, rx, images["a0"], vms[0], config)
    agent = await rig.start()
    try:
        reps = agent.replicators

        def acked() -> bool:
            return all(r.status.last_acked_seq >= 2 for r in reps)

        await wait_until(acked, within=30)
        port = rx.port
        await rx.stop()  # the outage: connections refused
        await wait_until(
            lambda: all(r.snapshot()["errors"] > 0 and r.snapshot()["last_error"] for r in reps),
            within=30,
        )
        before = {r.disk.id + r.vm.name: r.status.last_acked_seq for r in reps}
        await rx.start(port)
        await wait_until(
            lambda: all(r.status.last_acked_seq > before[r.disk.id + r.vm.name] for r in reps),
            within=45,
        )
        for r in reps:
            doc = r.snapshot()
            assert doc["last_error"] is None, doc
            assert doc["errors"] > 0
            assert doc["last_error_time"] is not None
    finally:
        await rig.halt()
        await rx.stop()


async def test_a_black_hole_shows_on_every_disk_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a network black hole no request fails for minutes, yet every disk's status names the
    unanswered request at once; when the network is back the next ack clears it."""
    monkeypatch.setattr(replicate, "STALL_SECONDS", 1.0)
    pki = make_pki(tmp_path / "pki")
    rx = Receiver(tmp_path / "rx", pki)
    await rx.start()
    proxy = ResettingProxy(rx.port)
    port = await proxy.start()
    images = [make_image(tmp_path / f"d{i}.img", 4 * MiB, fill=lambda i: b"") for i in (0, 1)]
    vm = VMSpec("vm1", [DiskSpec(f"disk{i}", img) for i, img in enumerate(images)])
    config = proxied_config(tmp_path, pki, port, [vm])
    rig = Rig(tmp_path, pki, rx, images[0], vm, config)
    agent = await rig.start()
    try:
        reps = agent.replicators
        await wait_until(lambda: all(r.status.last_acked_seq >= 2 for r in reps), within=30)
        proxy.blackhole = True
        await wait_until(lambda: all(r.snapshot()["stalled"] for r in reps), within=15)
        for r in reps:
            error = r.snapshot()["last_error"]
            assert "no answer from broker" in error
            assert "while uploading batch seq" in error
        acked = [r.status.last_acked_seq for r in reps]
        proxy.blackhole = False
        await proxy.drop_all()
        await wait_until(
            lambda: all(r.status.last_acked_seq > a for r, a in zip(reps, acked, strict=True)),
            within=30,
        )
        for r in reps:
            doc = r.snapshot()
            assert doc["last_error"] is None, doc
            assert not doc["stalled"]
    finally:
        await rig.halt()
        await proxy.stop()
        await rx.stop()
