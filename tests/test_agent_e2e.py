"""End to end with the real broker: `replikant agent run` ships to `replikant broker run`.

Both are real processes talking HTTPS with mutual TLS. A writer keeps writing through the agent's
NBD export while the agent, and once the broker too, are killed with SIGKILL; the broker's replica
must converge byte-identical each time, and the agent's log must show no FULL batch after the
initial copy.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_pki import Pki, make_pki
from tests.support_agent import (
    DiskSpec,
    MiB,
    MiniNBD,
    NBDClientError,
    VMSpec,
    free_port,
    make_image,
    replikant_exe,
    write_agent_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SIZE = 32 * MiB


def _broker_toml(path: Path, pki: Pki, store: Path, port: int) -> Path:
    tls = pki.broker.tls
    path.write_text(
        f"""
[broker]
node = "b1"
cluster = "c1"
listen = "127.0.0.1:{port}"
store = "{store}"
min_free_bytes = 0

[tls]
ca = "{tls.ca}"
cert = "{tls.cert}"
key = "{tls.key}"
"""
    )
    return path


class Proc:
    """A replikant sub-command as a subprocess, logging JSON to a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [replikant_exe(), "--log-json", *self.args], stdout=out, stderr=out
            )

    def kill9(self) -> None:
        """SIGKILL and reap."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        """SIGTERM and wait."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        return self.proc.returncode

    def events(self, name: str) -> list[dict[str, Any]]:
        """Every JSON log event called ``name`` so far."""
        out = []
        for line in self.log.read_text().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == name:
                out.append(doc)
        return out


def _same(a: Path, b: Path) -> bool:
    return a.exists() and a.read_bytes() == b.read_bytes()


async def _wait(predicate: Callable[[], bool], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def _ready(sock: Path, export: str) -> bool:
    try:
        MiniNBD(sock, export, timeout=2).close()
    except (OSError, NBDClientError):
        return False
    return True


async def test_agent_and_broker_processes_survive_kill9(tmp_path: Path) -> None:
    """Real agent, real broker: kills of either lose nothing and never force a full copy."""
    rng = random.Random(5)
    pki = make_pki(tmp_path / "pki")
    store = tmp_path / "store"
    bport = free_port()
    broker = Proc(
        ["broker", "run", "--config", str(_broker_toml(tmp_path / "b.toml", pki, store, bport))],
        tmp_path / "broker.log",
    )
    image = make_image(
        tmp_path / "d.img", SIZE, fill=lambda i: rng.randbytes(MiB) if i % 4 else b""
    )
    vm = VMSpec("web1", [DiskSpec("disk0", image)])
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        pki=pki,
        broker_urls=[f"https://127.0.0.1:{bport}"],
        vms=[vm],
        state_dir=tmp_path / "state",
        socket_dir=tmp_path / "s",
        status_port=free_port(),
    )
    agent = Proc(["agent", "run", "--config", str(cfg)], tmp_path / "agent.log")
    sock = tmp_path / "s" / "web1-disk0.sock"
    replica = store / str(vm.uuid) / "disk0" / "replica.img"
    broker.start()
    agent.start()
    try:
        await _wait(lambda: _ready(sock, "web1-disk0"), "the agent's export")
        await _wait(lambda: _same(replica, image), "the initial copy")

        def burst(stop: threading.Event, seed: int) -> None:
            r = random.Random(seed)
            try:
                nbd = MiniNBD(sock, "web1-disk0", timeout=5)
            except (OSError, NBDClientError):
                return
            try:
                base = r.randrange(SIZE // (4 * MiB)) * 4 * MiB
                while not stop.is_set():
                    nbd.write(base + r.randrange(1024) * 4096, r.randbytes(4096))
            except (OSError, NBDClientError):
                pass
            finally:
                nbd.sock.close()

        for i in range(8):
            stop = threading.Event()
            writer = asyncio.create_task(asyncio.to_thread(burst, stop, i))
            await asyncio.sleep(rng.uniform(0.1, 1.2))
            victim = broker if i in (2, 5) else agent
            victim.kill9()
            stop.set()
            await writer
            victim.start()
            await _wait(lambda: _ready(sock, "web1-disk0"), "the agent's export")
            await _wait(lambda: _same(replica, image), f"convergence after kill {i}")
        assert agent.stop() == 0
        assert broker.stop() == 0
    finally:
        for p in (agent, broker):
            if p.proc is not None and p.proc.poll() is None:
                p.kill9()
    acked = agent.events("batch_acked")
    full = [e for e in acked if e["full"]]
    assert full, "the initial copy went as FULL batches"
    first_delta = min(int(e["seq"]) for e in acked if not e["full"])
    assert all(int(e["seq"]) < first_delta for e in full), "a FULL batch after a kill"
    assert max(int(e["data_bytes"]) for e in acked if not e["full"]) <= SIZE // 2


async def test_replikant_verify_against_agent_and_broker(tmp_path: Path) -> None:
    """`replikant verify VM` compares the agent's hashes of a fresh cut with the broker's."""
    pki = make_pki(tmp_path / "pki")
    bport = free_port()
    sport = free_port()
    broker = Proc(
        [
            "broker",
            "run",
            "--config",
            str(_broker_toml(tmp_path / "b.toml", pki, tmp_path / "store", bport)),
        ],
        tmp_path / "broker.log",
    )
    image = make_image(tmp_path / "d.img", 16 * MiB, fill=lambda i: random.randbytes(MiB))
    vm = VMSpec("web1", [DiskSpec("disk0", image)])
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        pki=pki,
        broker_urls=[f"https://127.0.0.1:{bport}"],
        vms=[vm],
        state_dir=tmp_path / "state",
        socket_dir=tmp_path / "s",
        status_port=sport,
    )
    agent = Proc(["agent", "run", "--config", str(cfg)], tmp_path / "agent.log")
    replica = tmp_path / "store" / str(vm.uuid) / "disk0" / "replica.img"
    admin = pki.admin.tls
    admin_toml = tmp_path / "admin.toml"
    admin_toml.write_text(
        f'[admin]\nbrokers = ["https://127.0.0.1:{bport}"]\n'
        f'agents = ["http://127.0.0.1:{sport}"]\n'
        f'[tls]\nca = "{admin.ca}"\ncert = "{admin.cert}"\nkey = "{admin.key}"\n'
    )
    broker.start()
    agent.start()
    try:
        await _wait(lambda: _same(replica, image), "the initial copy")
        proc = await asyncio.create_subprocess_exec(
            replikant_exe(),
            "--config",
            str(admin_toml),
            "verify",
            "web1",
            "--json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        doc = json.loads(out)
        assert doc["result"] == "match"
        assert doc["disks"][0]["matching_blocks"] == 256
    finally:
        for p in (agent, broker):
            if p.proc is not None and p.proc.poll() is None:
                p.stop()
