"""The agent's shipping process: plans, reads, encodes and uploads batches away from the
guest's GIL (decision 029).

``python -m agents.shipd DATA SETTLE FDS SETTINGS`` is started by the agent
(:class:`agents.shipproc.Shipper`) with three inherited sockets and its broker client's
settings, and runs until the agent closes them (or dies: they then read as closed). For every
batch the agent OPENs, it maps the cut's frozen block map and grain bits read-only (the agent's
``memfd`` descriptors arrive on ``FDS``), plans the batch from them, reads the image through the
agent's replication descriptor, asks the agent's NBD loop to settle each hop it read
(``SETTLE``: the copies of blocks the guest overwrote since the cut, and SENT for the rest), and
uploads :func:`agents.body.batch_body`'s output to the broker URL the agent named, within the
credit the agent gives; the broker's answer, or why none came, goes back to the agent, whose client
interprets it. The per-extent Python work (planning, zero checks, hashes, compression, framing)
and the TLS and HTTP of the upload thus hold this process's GIL, never the one the guest's
requests need.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import socket
import sys
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from agents.body import BatchStats, batch_body
from agents.cut import CowStore, Cut, PlannedExtent
from agents.dirtymap import BlockMap
from agents.ship import BrokerClient, NetworkFailure
from agents.shipwire import (
    CHUNK,
    CREDIT,
    DONE,
    DROP,
    FAIL,
    GONE,
    OPEN,
    SETTLE,
    error_meta,
    header_from_meta,
    receive,
    send,
    spans_payload,
)
from common.hrl import BATCH_CONTENT_TYPE
from common.logs import configure_logging
from common.tls import client_context


class Settler:
    """Asks the agent's NBD loop to settle hops; its answers come in the order asked."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._waiting: deque[asyncio.Future[tuple[int, Any, bytes]]] = deque()
        self.task = asyncio.get_running_loop().create_task(self._answers())

    async def _answers(self) -> None:
        try:
            while True:
                got = await receive(self._reader)
                fut = self._waiting.popleft()
                if not fut.done():  # done: its batch was dropped while it waited
                    fut.set_result((got.kind, got.meta, got.payload))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError):
            for fut in self._waiting:
                if not fut.done():
                    fut.set_exception(ConnectionResetError("the agent closed the settle socket"))

    async def settle(self, job: int, spans: list[int]) -> list[tuple[int, int, memoryview]]:
        """``(extent index, offset in it, bytes)`` of the copies to lay over what was read of
        the extents ``spans`` gives (:meth:`agents.cut.Cut.settle`)."""
        if self.task.done():
            raise ConnectionResetError("the agent closed the settle socket")
        fut: asyncio.Future[tuple[int, Any, bytes]] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        send(self._writer, SETTLE, job, {}, spans_payload(spans))
        kind, meta, payload = await fut
        if kind == GONE:
            raise ConnectionAbortedError(str(meta.get("error", "the batch was abandoned")))
        view = memoryview(payload)
        out = []
        at = 0
        for index, offset, length in meta:
            out.append((index, offset, view[at : at + length]))
            at += length
        return out


class RemoteCut(Cut):
    """A cut of the agent's, seen from here: its frozen map shared read-only, its image read
    through the agent's replication descriptor, each hop settled by the agent's NBD loop."""

    def __init__(self, job: int, meta: dict[str, Any], fds: list[int], settler: Settler) -> None:
        map_fd, grains_fd, image_fd = fds
        frozen = BlockMap(meta["nblocks"], meta["gpb"], fds=(map_fd, grains_fd))
        super().__init__(
            frozen,
            size=meta["size"],
            block_size=meta["block_size"],
            reader=self._pread,
            cow=CowStore(meta["block_size"], 0, None),  # the copies stay with the agent
            cut_time_ns=meta["cut_time_ns"],
            cut_id=meta["cut_id"],
            image_fd=image_fd,
        )
        self.job = job
        self.settler = settler

    def _pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.image_fd, length, offset)
        if len(data) != length:
            raise OSError(f"short read of the image at {offset}: it shrank?")
        return data

    async def fetch(self, exts: Sequence[PlannedExtent]) -> list[bytes | bytearray]:
        """Read the extents from the image, then have the agent settle them (the order is the
        consistency argument: see :meth:`agents.cut.Cut.settle`)."""
        if self.closed:
            raise ConnectionAbortedError("the batch was abandoned")
        reads: list[bytes | bytearray] = [self._pread(e.offset, e.length) for e in exts]
        spans: list[int] = []
        for e in exts:
            spans += (e.offset, e.length, self.done_block(e))
        for index, offset, piece in await self.settler.settle(self.job, spans):
            buf = reads[index]
            if not isinstance(buf, bytearray):
                buf = reads[index] = bytearray(buf)
            buf[offset : offset + len(piece)] = piece
        return reads

    def release(self) -> None:
        """Unmap the shared map and close the agent's descriptors."""
        self.closed = True
        self.frozen.close()
        os.close(self.image_fd)


class Credit:
    """:class:`agents.body.Pacer` for one batch: each chunk is announced to the agent before it
    goes (CHUNK, its size), whose token bucket answers with a credit; at most ``n`` chunks go
    ahead of those answers, so the upload keeps the agent's pace."""

    def __init__(self, job: int, out: asyncio.StreamWriter, n: int) -> None:
        self._job = job
        self._out = out
        self._sem = asyncio.Semaphore(n)

    async def take(self, n: int) -> None:
        """Announce a chunk of ``n`` bytes and wait for a credit to send it."""
        send(self._out, CHUNK, self._job, {"n": n})
        await self._sem.acquire()

    def give(self) -> None:
        """The agent's bucket took a chunk."""
        self._sem.release()


def client_from(settings: dict[str, Any]) -> BrokerClient:
    """The client this process uploads with, as the agent's ``settings`` describe it: its TLS
    files (or none), cluster and timeouts. It only makes exchanges: which broker to ask, and what
    an answer means, the agent's client decides."""
    tls = settings["tls"]
    return BrokerClient(
        [],
        client_context(tuple(tls)) if tls else None,
        cluster=settings["cluster"],
        connect_timeout=settings["connect_timeout"],
        ack_timeout=settings["ack_timeout"],
    )


async def _ship(
    job: int,
    meta: dict[str, Any],
    cut: RemoteCut,
    credit: Credit,
    out: asyncio.StreamWriter,
    client: BrokerClient,
) -> None:
    stats = BatchStats()
    broken: list[BaseException] = []  # what failed the body, not the exchange

    async def chunks() -> AsyncGenerator[bytes, None]:
        body = batch_body(
            cut,
            header_from_meta(meta["header"]),
            level=meta["level"],
            bucket=credit if meta["credits"] else None,
            stats=stats,
            max_extent=meta["max_extent"],
        )
        try:
            async for chunk in body:
                yield chunk
        except (GeneratorExit, asyncio.CancelledError):
            raise  # the exchange stopped reading it (its connection broke, or DROP)
        except BaseException as exc:
            broken.append(exc)
            raise

    try:
        status, answer, reason, _ = await client.exchange(
            "POST",
            meta["url"],
            what=meta["what"],
            accepted=meta["accepted"],
            data=chunks(),
            headers={"Content-Type": BATCH_CONTENT_TYPE},
        )
        send(
            out,
            DONE,
            job,
            {"stats": dataclasses.asdict(stats), "status": status, "reason": reason},
            answer,
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the batch fails (and is sent again); the others go on
        if isinstance(exc, NetworkFailure) and not broken:
            send(out, FAIL, job, {"network": error_meta(exc.error)})
        else:
            cause = broken[0] if broken else exc
            send(out, FAIL, job, {"error": f"{type(cause).__name__}: {cause}"})
    finally:
        cut.release()


def _forget(jobs: dict[int, Any], job: int, _task: asyncio.Task[None]) -> None:
    jobs.pop(job, None)


async def serve(
    data: socket.socket, settle: socket.socket, fds: socket.socket, client: BrokerClient
) -> None:
    """Ship the batches the agent opens until it closes the data socket."""
    reader, writer = await asyncio.open_unix_connection(sock=data)
    settler = Settler(*await asyncio.open_unix_connection(sock=settle))
    jobs: dict[int, tuple[asyncio.Task[None], Credit]] = {}
    try:
        while True:
            try:
                got = await receive(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if got.kind == OPEN:
                # The agent sent the descriptors just before this frame: they are there.
                _, passed, _, _ = socket.recv_fds(fds, 16, 3)
                cut = RemoteCut(got.job, got.meta, passed, settler)
                credit = Credit(got.job, writer, got.meta["credits"])
                task = asyncio.get_running_loop().create_task(
                    _ship(got.job, got.meta, cut, credit, writer, client)
                )
                jobs[got.job] = (task, credit)
                task.add_done_callback(functools.partial(_forget, jobs, got.job))
            elif got.kind == CREDIT and got.job in jobs:
                jobs[got.job][1].give()
            elif got.kind == DROP and got.job in jobs:
                jobs[got.job][0].cancel()
    finally:
        for task, _ in list(jobs.values()):
            task.cancel()
        await asyncio.gather(*(t for t, _ in jobs.values()), return_exceptions=True)
        settler.task.cancel()
        await client.close()


def main() -> None:
    """Entry point: the three descriptors, in the order above, and the client's settings."""
    settings = json.loads(sys.argv[4])
    configure_logging(level=settings["log_level"])  # on the agent's stderr, as the agent logs
    data, settle, fds = (socket.socket(fileno=int(a)) for a in sys.argv[1:4])
    client = client_from(settings)
    fds.setblocking(True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(data, settle, fds, client))


if __name__ == "__main__":
    main()
