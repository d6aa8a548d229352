"""Real MQTT brokers for tests: a Mosquitto process or the embedded amqtt broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiomqtt

from common.config import TLSFiles
from common.mqtt import MQTTLink
from common.mqttbroker import mosquitto_acl, mosquitto_config, serve_embedded
from common.signedrecord import Verifier
from common.tls import TLSMaterial
from common.tls.identities import Identity

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    """An ephemeral loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(port: int, timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on the loopback port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


_running: dict[int, subprocess.Popen[bytes]] = {}


@contextmanager
def _run_mosquitto(conf: Path, port: int) -> Iterator[int]:
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _running[port] = proc
    try:
        wait_listening(port)
        yield port
    finally:
        _running.pop(port, None)
        proc.kill()
        proc.wait()


@contextmanager
def frozen(port: int) -> Iterator[None]:
    """Stop the Mosquitto on ``port`` with SIGSTOP: its connections stay open and nothing is
    answered, as a hung server or a black-holed link; SIGCONT afterwards."""
    proc = _running[port]
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


@contextmanager
def mosquitto(tmp: Path, port: int | None = None) -> Iterator[int]:
    """Run a real Mosquitto on loopback (plain MQTT, no persistence) and yield its port."""
    port = port or free_port()
    conf = tmp / f"mosquitto-{port}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    with _run_mosquitto(conf, port):
        yield port


@contextmanager
def mosquitto_tls(
    tmp: Path, server: TLSFiles, clients: list[Identity], port: int | None = None
) -> Iterator[int]:
    """Run a real Mosquitto configured as deploy/mosquitto.conf (mutual TLS, certificate subjects
    as user names, the ACL for ``clients``) and yield its port."""
    port = port or free_port()
    acl = tmp / f"mosquitto-{port}.acl"
    acl.write_text(mosquitto_acl(clients))
    conf = tmp / f"mosquitto-{port}.conf"
    # Started by root, Mosquitto would switch to its own user, who cannot read the test's key.
    user = pwd.getpwuid(os.geteuid()).pw_name
    conf.write_text(mosquitto_config("127.0.0.1", port, server, acl_file=acl, user=user))
    with _run_mosquitto(conf, port):
        yield port


async def read_retained(
    port: int, topic: str, tls: ssl.SSLContext | None = None, *, window: float = 1.0
) -> bytes | None:
    """The retained record on ``topic`` as a fresh subscriber sees it within ``window`` seconds
    (``None``: there is none)."""
    # A fresh client id each time: amqtt may hand a reused id the old session's messages.
    reader = f"reader-{secrets.token_hex(4)}"
    async with aiomqtt.Client("127.0.0.1", port, identifier=reader, tls_context=tls) as client:
        await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(window):
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    if message.topic.matches(topic):
                        return message.payload
        except TimeoutError:
            return None
    return None


def record_of(ca: Path, topic: str, payload: bytes) -> Any:
    """The JSON record inside a daemon's signed envelope, after checking it against ``ca``."""
    return json.loads(Verifier.from_file(ca).open(topic, payload).record)


@asynccontextmanager
async def embedded(cert: TLSMaterial) -> AsyncIterator[int]:
    """Run the lab's embedded MQTT broker (mutual TLS, no ACL) in this loop; yield its port."""
    port = free_port()
    ready = asyncio.Event()
    task = asyncio.create_task(serve_embedded("127.0.0.1", port, cert, ready))
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        yield port
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@asynccontextmanager
async def running(link: MQTTLink, *, connected: bool = True) -> AsyncIterator[MQTTLink]:
    """Run ``link`` (waiting until it is connected, unless told not to) and stop it after."""
    task = asyncio.create_task(link.run())
    try:
        if connected:
            async with asyncio.timeout(15):
                await link.wait_connected()
        yield link
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
