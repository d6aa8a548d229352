"""A real broker cluster for tests: Mosquitto with mutual TLS, N `replikant broker run` members
sharing one store, and a watcher that timestamps every owner record the cluster publishes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt

from common import topics
from common.tls import client_context
from tests.fixtures_pki import Pki
from tests.support_agent import MiB, MiniNBD, free_port, replikant_exe
from tests.support_mqtt import record_of

CLUSTER = "c1"


@dataclass
class Member:
    """One `replikant broker run` process of the cluster."""

    node: str
    config: Path
    log: Path
    store: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it (with its extra environment)."""
        (self.store / ".run" / f"{self.node}.json").unlink(missing_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [replikant_exe(), "--log-json", "broker", "run", "--config", str(self.config)],
                stdout=out,
                stderr=out,
                env={**os.environ, **self.env},
            )

    def run_file(self) -> dict[str, Any] | None:
        """Its ``.run/<node>.json`` once this process wrote it."""
        try:
            doc: dict[str, Any] = json.loads(
                (self.store / ".run" / f"{self.node}.json").read_text()
            )
        except (OSError, ValueError):
            return None
        return doc if self.proc is not None and doc.get("pid") == self.proc.pid else None

    async def wait_up(self, within: float = 30.0) -> str:
        """Wait until it listens; its URL."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.node} exited with {self.proc.returncode}: {self.log}")
            doc = self.run_file()
            if doc is not None:
                return str(doc["url"])
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.node} did not start within {within} s: {self.log}")

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` (SIGKILL reaps it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig is signal.SIGKILL:
                self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)

    def events(self, name: str) -> list[dict[str, Any]]:
        """Its JSON log events called ``name``."""
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("event") == name:
                    out.append(doc)
        return out


@dataclass
class OwnerWatch:
    """Every owner record seen, with the monotonic time it arrived."""

    seen: list[tuple[float, topics.OwnerRecord]] = field(default_factory=list)

    def current(self) -> topics.OwnerRecord | None:
        """The newest record."""
        return self.seen[-1][1] if self.seen else None

    async def new_owner(self, above: int, within: float) -> tuple[float, topics.OwnerRecord]:
        """The first record with an epoch above ``above`` (waiting up to ``within``)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for at, rec in self.seen:
                if rec.epoch > above:
                    return at, rec
            await asyncio.sleep(0.01)
        raise AssertionError(f"no owner above epoch {above} within {within} s: {self.seen[-3:]}")


def member_config(
    path: Path, pki: Pki, node: str, store: Path, *, mqtt_port: int, port: int
) -> Path:
    """broker.toml of member ``node`` (its own certificate, the shared store)."""
    cert = (
        pki.broker.tls
        if node == "b1"  # make_pki issued it
        else pki.store.issue_broker(CLUSTER, node, dns=["localhost"], ips=["127.0.0.1"]).tls
    )
    path.write_text(
        f"""
nbd_socket_dir = "{path.parent / f"nbd-{node}"}"

[broker]
node = "{node}"
cluster = "{CLUSTER}"
listen = "127.0.0.1:{port}"
store = "{store}"
min_free_bytes = 0

[tls]
ca = "{cert.ca}"
cert = "{cert.cert}"
key = "{cert.key}"

[mqtt]
url = "mqtts://127.0.0.1:{mqtt_port}"
"""
    )
    return path


def make_members(
    tmp: Path, pki: Pki, store: Path, mqtt_port: int, count: int
) -> tuple[list[Member], list[str]]:
    """``count`` members b1..bN (not started) and their URLs."""
    members, urls = [], []
    for i in range(1, count + 1):
        node = f"b{i}"
        port = free_port()
        cfg = member_config(tmp / f"{node}.toml", pki, node, store, mqtt_port=mqtt_port, port=port)
        members.append(Member(node, cfg, tmp / f"{node}.log", store))
        urls.append(f"https://127.0.0.1:{port}")
    return members, urls


@contextlib.asynccontextmanager
async def watch_owner(pki: Pki, mqtt_port: int) -> AsyncIterator[OwnerWatch]:
    """Subscribe (as the admin) to the cluster's owner record for the block's duration."""
    watch = OwnerWatch()

    async def run() -> None:
        tls = client_context(pki.admin.tls)
        while True:
            with contextlib.suppress(aiomqtt.MqttError):
                async with aiomqtt.Client(
                    "127.0.0.1", mqtt_port, identifier="owner-watch", tls_context=tls
                ) as client:
                    await client.subscribe(topics.owner(CLUSTER), qos=1)
                    async for message in client.messages:
                        payload = message.payload
                        if isinstance(payload, bytes) and payload:
                            # Daemons sign their records: read the verified one.
                            record = record_of(pki.ca, str(message.topic), payload)
                            rec = topics.OwnerRecord.model_validate(record)
                            watch.seen.append((time.monotonic(), rec))
            await asyncio.sleep(0.2)

    task = asyncio.create_task(run())
    try:
        yield watch
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def applied_log(replica_dir: Path) -> list[dict[str, Any]]:
    """The replica's ``applied.log``, one record per applied batch, oldest first."""
    path = replica_dir / "applied.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def same(a: Path, b: Path) -> bool:
    try:
        return a.read_bytes() == b.read_bytes()
    except FileNotFoundError:
        return False


async def replica_state(
    http: aiohttp.ClientSession, urls: list[str], path: str
) -> dict[str, object]:
    """The replica's state from whichever member serves it now."""
    for url in urls:
        try:
            async with http.get(url + path) as resp:
                if resp.status == 200:
                    doc: dict[str, object] = await resp.json()
                    return doc
        except aiohttp.ClientError:
            continue
    return {}


async def converge(
    http: aiohttp.ClientSession, urls: list[str], path: str, replica: Path, image: Path
) -> int:
    """Wait until the replica equals the image with everything durable applied; durable seq."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = await replica_state(http, urls, path)
        if (
            st
            and st["applied_seq"] == st["durable_seq"]
            and await asyncio.to_thread(same, replica, image)
        ):
            return int(str(st["durable_seq"]))
        await asyncio.sleep(0.2)
    raise AssertionError(f"replica did not converge: {await replica_state(http, urls, path)}")


def write_burst(sock: Path, export: str, rng: random.Random, mib: int, size: int) -> None:
    """An incompressible write of ``mib`` MiB (its batch takes a while to upload)."""
    nbd = MiniNBD(sock, export, timeout=10)
    try:
        base = rng.randrange(0, size - mib * MiB, 4096)
        for k in range(mib * 4):
            nbd.write(base + k * 256 * 1024, rng.randbytes(256 * 1024))
    finally:
        nbd.close()
