"""Issue 8, finding 6 (broker side): a client that resets its connection mid-upload is one log
event with vm, disk, seq, bytes received and the reason, never an aiohttp traceback."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import pytest

from broker.service import HANDLER_GRACE
from common import topics
from common.hrl import BATCH_CONTENT_TYPE, Compression
from common.tls import client_context
from tests.support_agent import stop_daemon, wait_until
from tests.support_broker import (
    PKI,
    AgentClient,
    BrokerProcess,
    FakeSource,
    MiB,
    broker_toml,
    free_port,
    make_pki,
    running_broker,
)
from tests.support_mqtt import mosquitto, record_of

BROKER_SECTION = {"node": "b1", "cluster": "c1", "site": "recovery", "listen": "127.0.0.1:0"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _start_upload(url: str, pki: PKI, src: FakeSource, body: bytes, sent: int) -> ssl.SSLSocket:
    """Send the headers and ``sent`` bytes of ``body``; the connection, still open."""
    host, _, port = url.removeprefix("https://").rpartition(":")
    raw = socket.create_connection((host, int(port)))
    tls = client_context(pki.agents["h1"]).wrap_socket(raw, server_hostname=host)
    head = (
        f"POST /v1/replicas/{src.vm_uuid}/{src.disk_id}/batches HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: {BATCH_CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    tls.sendall(head.encode() + body[:sent])
    time.sleep(0.5)  # let the broker read and journal what was sent
    return tls


def _reset_mid_upload(url: str, pki: PKI, src: FakeSource, body: bytes, sent: int) -> None:
    """Send the headers and ``sent`` bytes of ``body``, then reset the TCP connection (RST)."""
    tls = _start_upload(url, pki, src, body, sent)
    # Linger 0: close() sends a TCP RST, no TLS close_notify, as a crashing peer would.
    tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tls.close()


def _send_raw(url: str, pki: PKI, data: bytes) -> bytes:
    """Send ``data`` as it is over mutual TLS; return the first line of the answer."""
    host, _, port = url.removeprefix("https://").rpartition(":")
    with (
        socket.create_connection((host, int(port))) as raw,
        client_context(pki.agents["h1"]).wrap_socket(raw, server_hostname=host) as tls,
    ):
        tls.sendall(data)
        return tls.recv(4096).split(b"\r\n")[0]


def test_reset_mid_upload_is_one_event_without_traceback(pki: PKI, tmp_path: Path) -> None:
    """A connection reset halfway through a batch logs exactly one batch_upload_aborted event
    naming vm, disk, seq and bytes received, no traceback; the batch's resend is acked; requests
    aiohttp cannot parse are one http_request_malformed event each, no traceback either."""
    store = tmp_path / "store"
    log = tmp_path / "broker.log"
    proc = BrokerProcess(broker_toml(tmp_path / "b.toml", pki, store, port=free_port()), store, log)
    url = proc.start()
    try:
        src = FakeSource(disk_size=4 * MiB, compression=Compression.NONE)

        async def enable() -> None:
            async with AgentClient(url, pki.agents["h1"]) as agent:
                await agent.enable(src)

        asyncio.run(enable())
        src.mutate(60)
        cut = src.cut(full=True, all_blocks=True)
        sent = len(cut.body) // 2
        _reset_mid_upload(url, pki, src, cut.body, sent)

        async def resend() -> int:
            async with AgentClient(url, pki.agents["h1"]) as agent:
                return await agent.ship(src, cut)

        assert asyncio.run(resend()) == 1
        broken_chunks = (
            f"PUT /v1/replicas/{src.vm_uuid}/disk0 HTTP/1.1\r\nHost: b1\r\n"
            "Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\nZZ\r\n"
        )
        assert b" 400 " in _send_raw(url, pki, broken_chunks.encode())
        overlong = b"GET /v1/status HTTP/1.1\r\nHost: b1\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n"
        assert b" 400 " in _send_raw(url, pki, overlong)
    finally:
        assert proc.stop() == 0
    text = log.read_text()
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    aborted = [e for e in events if e["event"] == "batch_upload_aborted"]
    assert len(aborted) == 1, aborted
    (event,) = aborted
    assert event["vm"] == "web1"
    assert event["disk"] == src.disk_id
    assert event["seq"] == 1
    assert 0 < event["bytes"] <= sent
    assert "Connection" in event["reason"] or "Reset" in event["reason"], event["reason"]
    assert "Traceback" not in text
    assert "Error handling request" not in text
    assert not [e for e in events if e["event"] in ("request_failed", "request_aborted")]
    malformed = [e["reason"] for e in events if e["event"] == "http_request_malformed"]
    assert len(malformed) == 2, malformed
    assert "chunk size" in malformed[0]
    assert "LineTooLong" in malformed[1]


def test_stalled_upload_does_not_hold_a_stop_and_sigusr1_shows_stacks(
    pki: PKI, tmp_path: Path
) -> None:
    """SIGUSR1 writes every thread's stack to the log and the broker goes on serving; SIGTERM
    while an agent's upload sits half-sent (its connection open, no more bytes) stops the broker
    cleanly within its handler grace, the upload dropped unacked, not after the 60 s idle
    timeout."""
    store = tmp_path / "store"
    log = tmp_path / "broker.log"
    proc = BrokerProcess(broker_toml(tmp_path / "b.toml", pki, store, port=free_port()), store, log)
    url = proc.start()
    assert proc.proc is not None
    src = FakeSource(disk_size=4 * MiB, compression=Compression.NONE)

    async def enable() -> None:
        async with AgentClient(url, pki.agents["h1"]) as agent:
            await agent.enable(src)

    asyncio.run(enable())
    proc.proc.send_signal(signal.SIGUSR1)
    asyncio.run(wait_until(lambda: "Current thread" in log.read_text()))
    assert 'File "' in log.read_text().split("Current thread", 1)[1]
    asyncio.run(enable())  # still serving

    src.mutate(60)
    cut = src.cut(full=True, all_blocks=True)
    stalled = _start_upload(url, pki, src, cut.body, len(cut.body) // 2)
    try:
        assert stop_daemon(proc.proc, log, within=HANDLER_GRACE + 10) == 0
    finally:
        stalled.close()
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    (aborted,) = [e for e in events if e["event"] == "batch_upload_aborted"]
    assert aborted["reason"] == "cancelled"
    assert not [e for e in events if e["event"] == "batch_journaled"]


def test_stop_deadline_dumps_every_thread_and_exits_1() -> None:
    """A process past its stop deadline writes its threads' stacks (the place it hung) and exits
    with status 1: every thread's stack, each in the call it is stuck in."""
    code = (
        "import threading, time\n"
        "from common.stacks import arm_stop_deadline\n"
        "def stuck_in_stop(): time.sleep(60)\n"
        "threading.Thread(target=stuck_in_stop).start()\n"
        "arm_stop_deadline(0.5)\n"
        "stuck_in_stop()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 1
    assert done.stderr.count("stuck_in_stop") >= 2, done.stderr  # both threads' stacks


async def test_mqtt_alerts_name_a_fix(pki: PKI, tmp_path: Path) -> None:
    """A storage_full alert published on a real Mosquitto carries the message and a fix, never
    ``"fix": null``."""
    src = FakeSource(disk_size=MiB)
    async with (
        running_broker(pki, tmp_path / "store") as svc,
        AgentClient(svc.url, pki.agents["h1"]) as agent,
    ):
        await agent.enable(src)
    # Restarted with a reserve no disk has: the next batch raises storage_full.
    no_space = {**BROKER_SECTION, "store": str(tmp_path / "store"), "min_free_bytes": 2**62}
    with mosquitto(tmp_path) as port:
        async with (
            running_broker(
                pki,
                tmp_path / "store",
                mqtt={"url": f"mqtt://127.0.0.1:{port}"},
                broker=no_space,
            ) as svc,
            aiomqtt.Client("127.0.0.1", port, identifier="alert-reader") as reader,
        ):
            await reader.subscribe(topics.alerts("c1"), qos=1)
            assert svc.membership is not None
            async with asyncio.timeout(10):
                await svc.membership.link.wait_connected()
            await wait_until(lambda: svc.serving)  # a member with MQTT serves once elected
            src.mutate()
            async with AgentClient(svc.url, pki.agents["h1"]) as agent:
                status, err = await agent.post(src, src.cut().body)
            assert (status, err["error"]) == (507, "storage_full")
            async with asyncio.timeout(10):
                message = await anext(aiter(reader.messages))
    assert isinstance(message.payload, bytes)
    record = record_of(pki.broker.ca, topics.alerts("c1"), message.payload)
    assert record["kind"] == "storage_full"
    assert "store" in record["message"]
    assert record["fix"]
    assert "free space" in record["fix"]
