"""The agent's side of its shipping process (decision 029): start it, feed it, settle for it.

:class:`Shipper` owns one :mod:`agents.shipd` process for every disk of the agent. Two of its
ends live on the agent's loops:

- on the NBD (home) loop, the *settle* socket: each SETTLE names extents the process has just
  read from the image; one step of this loop answers it with :meth:`agents.cut.Cut.settle`
  (the copies of blocks the guest overwrote since the cut, and SENT for the rest), so reads
  stay atomic with respect to guest requests without the agent touching a byte of them;
- on the shipping loop, the *data* socket: a batch is OPENed with duplicates of its frozen
  map's, grain bits' and image's descriptors and the broker URL this agent's client chose; the
  process uploads it there itself, reports each chunk it sent (paced here before it may send
  more) and returns the broker's answer, which the client here interprets as for any request
  (redirects, refusals, the member rotation: :meth:`agents.ship.BrokerClient.upload_from`).

If the process ends, every batch in flight fails (its cut merges back and the worker sends it
again) and the next batch starts a new process.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from agents.body import BatchStats, Pacer
from agents.cut import Cut
from agents.errors import ShipError
from agents.ship import NetworkFailure, Sender
from agents.shipwire import (
    CHUNK,
    CREDIT,
    CREDITS,
    DONE,
    DROP,
    FAIL,
    GONE,
    OPEN,
    PATCHES,
    SETTLE,
    Frame,
    FrameDecoder,
    error_from_meta,
    frame_head,
    header_meta,
    receive,
    send,
    spans_from,
)
from common.hrl import BatchHeader
from common.logs import get_logger

log = get_logger("agents.shipproc")
T = TypeVar("T")


async def _call(fn: Callable[[int], T], arg: int) -> T:
    """``fn(arg)`` as a coroutine, to run it in a step of another thread's loop."""
    return fn(arg)


def _same_code() -> dict[str, str]:
    """The environment for the process: this one's, with the folder our own ``agents`` package
    was imported from first on its path, so it runs the same code as this agent."""
    ours = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{ours}{os.pathsep}{path}" if path else ours}


class _SettleProtocol(asyncio.Protocol):
    """The settle socket on the NBD loop: every SETTLE is answered in the callback that read it,
    so a hop costs the guests one short step of the loop, not a coroutine's wake-ups."""

    def __init__(self, answer: Callable[[int, bytes], tuple[int, Any, bytes]]) -> None:
        self._answer = answer
        self._decoder = FrameDecoder()
        self._transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        try:
            frames = self._decoder.feed(data)
        except ValueError as exc:
            log.error("shipping_process_misbehaved", detail=str(exc))
            transport.close()
            return
        for got in frames:
            if got.kind != SETTLE:
                log.error("shipping_process_misbehaved", frame=got.kind)
                transport.close()
                return
            kind, meta, payload = self._answer(got.job, got.payload)
            transport.writelines((frame_head(kind, got.job, meta, len(payload)), payload))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class Shipper:
    """The shipping process, started with the agent (or on first use) and again after it ended.

    ``settings`` tell the process how to reach the brokers (:func:`agents.shipd.client_from`);
    ``on_pid`` is called on the home loop with each new process's pid, and with None once its
    sockets closed (the shipping loop's priority rule covers the process's threads while it
    lives, decision 028, and never a later process given the same pid).
    """

    def __init__(
        self,
        settings: dict[str, Any],
        on_pid: Callable[[int | None], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_pid = on_pid
        self.home: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self._cuts: dict[int, Cut] = {}  # home loop only
        self._proc: asyncio.subprocess.Process | None = None  # home loop only
        self._settle_task: asyncio.Task[None] | None = None  # home loop only
        self._writer: asyncio.StreamWriter | None = None  # shipping loop only, as are these
        self._fdsock: socket.socket | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._queues: dict[int, asyncio.Queue[Frame]] = {}
        self._starting: asyncio.Lock | None = None

    @property
    def pid(self) -> int | None:
        """The running process's pid."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    # -- on the home loop --------------------------------------------------------------------

    def sender(
        self,
        cut: Cut,
        header: BatchHeader,
        *,
        level: int,
        bucket: Pacer | None,
        stats: BatchStats,
        max_extent: int,
    ) -> Sender:
        """What uploads the batch of ``cut`` from the process (call on the home loop; the
        sender is awaited on the shipping loop, by :meth:`agents.ship.BrokerClient.upload_from`)."""
        self.home = asyncio.get_running_loop()
        for stale in [j for j, c in self._cuts.items() if c.closed]:
            del self._cuts[stale]  # batches whose upload never began
        job = next(self._ids)
        self._cuts[job] = cut
        meta = {
            "header": header_meta(header),
            "level": level,
            "max_extent": max_extent,
            # Unpaced (no bandwidth limit): the chunks go without announcing each to the agent.
            "credits": CREDITS if bucket is not None else 0,
        }
        return functools.partial(self._send, job, meta, bucket, stats)

    def _descriptors(self, job: int) -> tuple[list[int], dict[str, Any]]:
        """Duplicates of the cut's descriptors, and its geometry (in a step of the home loop,
        so a cut released meanwhile is seen as such, never a reused descriptor number)."""
        cut = self._cuts.get(job)
        if cut is None or cut.closed:
            raise ShipError(
                "batch abandoned before it was sent (the disk stopped or resumed elsewhere)",
                code="batch_abandoned",
            )
        fds = [os.dup(cut.frozen.fd), os.dup(cut.frozen.grains.fd), os.dup(cut.image_fd)]
        return fds, {
            "size": cut.size,
            "block_size": cut.block_size,
            "nblocks": cut.frozen.nblocks,
            "gpb": cut.frozen.gpb,
            "cut_time_ns": cut.cut_time_ns,
            "cut_id": cut.cut_id,
        }

    async def _spawn(self) -> tuple[socket.socket, socket.socket]:
        """Start the process; serve its settle socket here; its data and descriptor sockets."""
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
        theirs = [b.fileno() for _, b in pairs]
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # never import from the working directory (-m would put it first)
                "-m",
                "agents.shipd",
                *map(str, theirs),
                json.dumps(self.settings),
                pass_fds=theirs,
                stdin=subprocess.DEVNULL,
                env=_same_code(),
            )
        except BaseException:
            for a, _ in pairs:
                a.close()
            raise
        finally:
            for _, b in pairs:
                b.close()
        self._proc = proc
        # One process serves every VM: its events carry none of the first batch's context.
        quiet = contextvars.Context()
        self._settle_task = asyncio.get_running_loop().create_task(
            self._settle(pairs[1][0], proc), context=quiet
        )
        quiet.run(log.info, "shipping_process_started", pid=proc.pid)
        if self.on_pid is not None:
            self.on_pid(proc.pid)
        pairs[2][0].setblocking(True)
        return pairs[0][0], pairs[2][0]

    async def _settle(self, sock: socket.socket, proc: asyncio.subprocess.Process) -> None:
        """Answer SETTLE requests, each in the callback that read it, until the process ends."""
        transport: asyncio.BaseTransport | None = None
        try:
            transport, protocol = await asyncio.get_running_loop().create_unix_connection(
                lambda: _SettleProtocol(self._patches), sock=sock
            )
            await protocol.closed
        finally:
            if self.on_pid is not None:
                self.on_pid(None)
            if transport is not None:
                transport.close()
            else:
                sock.close()
            status = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    status = await proc.wait()
            if status is None:
                proc.kill()
                status = await proc.wait()
            if status:
                log.warning("shipping_process_ended", pid=proc.pid, status=status)

    def _patches(self, job: int, spans: bytes) -> tuple[int, Any, bytes]:
        cut = self._cuts.get(job)
        if cut is None or cut.closed:
            self._cuts.pop(job, None)
            return GONE, {"error": "the batch was abandoned while it was being read"}, b""
        out: list[tuple[int, int, bytes]] = []
        cut.settle(spans_from(spans), out)
        return PATCHES, [[i, at, len(piece)] for i, at, piece in out], b"".join(p for *_, p in out)

    def _forget(self, job: int) -> None:
        self._cuts.pop(job, None)

    async def close_home(self) -> None:
        """Stop the process (after :meth:`close_ship`): its settle socket closes, it exits."""
        if self._settle_task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await asyncio.shield(self._settle_task)
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        if self._settle_task is not None:
            self._settle_task.cancel()
            await asyncio.gather(self._settle_task, return_exceptions=True)

    # -- on the shipping loop ----------------------------------------------------------------

    async def start(self) -> None:
        """Start the process ahead of the first batch (``home`` set by the caller)."""
        await self._ensure()

    async def _ensure(self) -> tuple[asyncio.StreamWriter, socket.socket]:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:  # the disks of a VM open their batches at the same time
            if self._writer is not None and not self._writer.is_closing():
                assert self._fdsock is not None
                return self._writer, self._fdsock
            assert self.home is not None
            try:
                data, fdsock = await asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(self._spawn(), self.home)
                )
            except OSError as exc:
                raise ShipError(
                    f"the agent could not start its shipping process ({sys.executable} -P -m "
                    f"agents.shipd): {exc}",
                    fix=f"the agent's user must be able to run {sys.executable} and read the "
                    "folders it loads from (install Replikant where its unit's user may, such "
                    "as /usr or /opt, not under /root or /home)",
                    code="shipping_process_failed",
                ) from None
            reader, writer = await asyncio.open_unix_connection(sock=data)
            if self._fdsock is not None:
                self._fdsock.close()  # the previous process's
            self._writer, self._fdsock = writer, fdsock
            self._reader_task = asyncio.get_running_loop().create_task(self._read(reader, writer))
            return writer, fdsock

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Route the process's frames to their batches; once it ends, fail the batches."""
        try:
            while True:
                got = await receive(reader)
                queue = self._queues.get(got.job)
                if queue is not None:
                    queue.put_nowait(got)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            ended = Frame(FAIL, 0, {"error": "the agent's shipping process ended"}, b"")
            for queue in self._queues.values():
                queue.put_nowait(ended)

    async def _send(
        self,
        job: int,
        meta: dict[str, Any],
        bucket: Pacer | None,
        stats: BatchStats,
        url: str,
        accepted: bool,
        what: str,
    ) -> tuple[int, bytes, str]:
        """Have the process upload batch ``job`` to ``url``; the broker's answer (status, body,
        reason). Each chunk it announces is paced here before it may send it."""
        done = False
        writer: asyncio.StreamWriter | None = None
        queue: asyncio.Queue[Frame] = asyncio.Queue()
        self._queues[job] = queue
        fds: list[int] = []
        try:
            writer, fdsock = await self._ensure()
            assert self.home is not None
            fds, geometry = await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(_call(self._descriptors, job), self.home)
            )
            socket.send_fds(fdsock, [b"f"], fds)
            upload = {"url": url, "accepted": accepted, "what": what}
            send(writer, OPEN, job, {**meta, **geometry, **upload})
            while True:
                got = await queue.get()
                if got.kind == CHUNK:
                    if bucket is not None:
                        await bucket.take(got.meta["n"])
                    send(writer, CREDIT, job, {})
                elif got.kind == DONE:
                    for name, value in got.meta["stats"].items():
                        setattr(stats, name, value)
                    done = True
                    return got.meta["status"], got.payload, got.meta["reason"]
                elif "network" in got.meta:
                    raise NetworkFailure(error_from_meta(got.meta["network"]))
                else:
                    raise ShipError(
                        f"batch not sent: {got.meta.get('error')}",
                        fix="nothing to do if it passes: the batch is sent again; if it "
                        "repeats, read the agent's log",
                        code="shipping_failed",
                    )
        finally:
            for fd in fds:
                os.close(fd)
            self._queues.pop(job, None)
            if not done and writer is not None and not writer.is_closing():
                send(writer, DROP, job, {})
            if self.home is not None and not self.home.is_closed():
                self.home.call_soon_threadsafe(self._forget, job)

    async def close_ship(self) -> None:
        """Close the data socket (the process then exits) and wait for its reader."""
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)
        if self._fdsock is not None:
            self._fdsock.close()
            self._fdsock = None


__all__ = ["Shipper"]
