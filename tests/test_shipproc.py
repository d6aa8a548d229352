"""The agent's shipping process (decision 029): batches leave from it, and it may die.

An in-process agent ships to a stand-in broker over mutual TLS; the uploads must come from the
shipping process's own connections (the guest's process makes none for them), and killing that
process in the middle of an upload must cost only that batch: it fails with an error naming the
cause, a new process takes the next one, and the replica converges byte for byte.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from agents.shipwire import (
    FRAME,
    MAX_PAYLOAD,
    PATCHES,
    SETTLE,
    Frame,
    FrameDecoder,
    frame_head,
    spans_payload,
)
from tests.support_agent import MiB, wait_for
from tests.test_agent_ship import make_rig

pytestmark = pytest.mark.timeout(120)


def _tcp_ports(pid: int, *, listening: bool = False) -> set[int]:
    """Local ports of the TCP sockets process ``pid`` holds open (only those it listens on)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and (fields[3] == "0A" or not listening):  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def test_batches_leave_from_the_shipping_process_and_outlive_it(tmp_path: Path) -> None:
    """Uploads use the process's connections; killing it mid-upload fails that batch alone."""
    rig = await make_rig(tmp_path)
    try:
        await rig.start()
        await wait_for(rig.settled, "the initial copy", within=60)
        assert rig.agent is not None
        assert rig.agent.uploader is not None
        shipper = rig.agent.uploader.shipper
        first = shipper.pid
        assert first is not None
        # The last upload's connection is still pooled: it is the shipping process's, not ours.
        assert rig.rx.batch_ports[-1] in _tcp_ports(first)
        assert rig.rx.batch_ports[-1] not in _tcp_ports(os.getpid())
        assert not _tcp_ports(first, listening=True)  # nothing reaches it but the agent

        # A batch the broker holds on to (durable, its ack late) when the process dies.
        rig.rx.ack_delay = 2.0
        uploads = len(rig.rx.batch_ports)
        await rig.write(("write", 3 * MiB, os.urandom(64 * 1024)))
        await wait_for(lambda: len(rig.rx.batch_ports) > uploads, "an upload", within=10)
        os.kill(first, signal.SIGKILL)
        await wait_for(
            lambda: "shipping process ended" in (rig.rep.status.last_error or ""),
            "the batch to fail, naming the shipping process",
            within=10,
        )
        rig.rx.ack_delay = 0.0
        await rig.write(("write", 7 * MiB, os.urandom(12 * 1024)), ("zero", 0, 1 * MiB))
        await wait_for(rig.settled, "the replica to converge after the kill", within=30)
        assert shipper.pid not in (None, first)
        assert rig.rx.batch_ports[-1] in _tcp_ports(shipper.pid)
    finally:
        await rig.halt()
        await rig.rx.stop()


async def test_a_shipping_process_that_cannot_start_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interpreter the agent cannot run fails each batch with the path and the fix."""
    missing = tmp_path / "no-such-python"
    monkeypatch.setattr(sys, "executable", str(missing))
    rig = await make_rig(tmp_path)
    try:
        await rig.start()
        await wait_for(
            lambda: "could not start its shipping process" in (rig.rep.status.last_error or ""),
            "the batch to fail, naming the shipping process",
            within=20,
        )
        error = rig.rep.status.last_error or ""
        assert str(missing) in error
        assert "unit's user may" in error
        assert rig.rx.batch_ports == []  # nothing went out another way
    finally:
        await rig.halt()
        await rig.rx.stop()


async def test_a_bandwidth_limit_paces_the_shipping_process(tmp_path: Path) -> None:
    """Under ``bandwidth_limit_mbps`` the process's chunks go at the agent's pace: the 4 MiB
    of random data of the initial copy, at 16 Mbit/s after a 0.5 MiB burst, cannot arrive in
    under 1.75 s (an unpaced batch announces nothing and would not wait at all)."""
    rig = await make_rig(tmp_path, policy_extra="bandwidth_limit_mbps = 16.0\n")
    try:
        started = time.monotonic()
        await rig.start()
        await wait_for(rig.settled, "the initial copy", within=60)
        took = time.monotonic() - started
        assert rig.rep.status.bytes_shipped >= 4 * MiB
        assert took >= 1.5, f"4 MiB went in {took:.2f} s: faster than 16 Mbit/s allows"
    finally:
        await rig.halt()
        await rig.rx.stop()


def test_frames_come_out_of_the_decoder_however_the_stream_is_cut() -> None:
    """The NBD loop's decoder returns each frame once it is whole, whether the bytes arrive one
    by one, frames at a time, or with a frame split between two reads; a frame beyond the
    limits is refused before its bytes are waited for."""
    sent = [
        Frame(SETTLE, 7, {}, spans_payload([0, 4096, 1, 65536, 8192, 2])),
        Frame(SETTLE, 8, None, b""),
        Frame(PATCHES, 9, [[0, 12, 3]], b"abc"),
    ]
    stream = b"".join(frame_head(f.kind, f.job, f.meta, len(f.payload)) + f.payload for f in sent)
    for cuts in ([1] * len(stream), [len(stream)], [5, 30, len(stream)]):
        decoder, got, at = FrameDecoder(), [], 0
        for n in cuts:
            got += decoder.feed(stream[at : at + n])
            at += n
        assert got == sent
    with pytest.raises(ValueError, match="beyond limits"):
        FrameDecoder().feed(FRAME.pack(SETTLE, 1, 0, MAX_PAYLOAD + 1))
