"""Helpers for the broker suites: a fake changing source disk that cuts real HRL batches, a PKI
for mTLS tests, broker configs, and an uploader that follows the agent's retry rule.

The fake source keeps a copy of the disk as of every cut, so a test can compare any recovery
point, or the replica, with the source "image saved at that cut".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from common.config import BrokerConfig, TLSFiles
from common.hrl import (
    BATCH_CONTENT_TYPE,
    BatchHeader,
    Compression,
    Consistency,
    ExtentKind,
    encode_batch,
)
from common.tls import client_context
from tests.support_agent import stacks_and_kill, stop_daemon

if TYPE_CHECKING:
    from broker.service import BrokerService

MiB = 1024 * 1024


_PAGE = 4096


@dataclass
class Cut:
    """One batch cut from the fake source, with the disk as it was at the cut."""

    generation: int
    seq: int
    body: bytes
    pages: tuple[bytes, ...]  # the disk at the cut, page by page (shared with other cuts)
    cut_ns: int
    consistency: int
    full: bool

    @property
    def image(self) -> bytes:
        """The disk at the cut."""
        return b"".join(self.pages)

    @property
    def digest(self) -> str:
        """sha256 of the disk at the cut."""
        return hashlib.sha256(self.image).hexdigest()


@dataclass
class FakeSource:
    """A small in-memory source disk with block-granular change tracking, like an agent's."""

    disk_size: int = 4 * MiB
    block_size: int = 64 * 1024
    vm_uuid: uuid.UUID = field(default_factory=uuid.uuid4)
    disk_id: str = "disk0"
    generation: int = 1
    compression: Compression = Compression.ZSTD
    seed: int = 1
    seq: int = 0

    def __post_init__(self) -> None:
        self.image = bytearray(self.disk_size)
        self.dirty: set[int] = set()
        self.rng = random.Random(self.seed)
        self.cuts: dict[int, Cut] = {}
        self._clock = time.time_ns() - 10**12

    @property
    def blocks(self) -> int:
        """Number of tracking blocks."""
        return self.disk_size // self.block_size

    def write(self, offset: int, data: bytes) -> None:
        """A guest write: change the image and mark the blocks dirty."""
        self.image[offset : offset + len(data)] = data
        first = offset // self.block_size
        last = (offset + len(data) - 1) // self.block_size
        self.dirty.update(range(first, last + 1))

    def mutate(self, n_writes: int = 8) -> None:
        """Random guest activity: text-like data, random data, zeroed ranges."""
        for _ in range(n_writes):
            length = self.rng.choice([512, 4096, 8192, 65536, 100_000])
            offset = self.rng.randrange(0, self.disk_size - length) // 512 * 512
            style = self.rng.random()
            if style < 0.5:
                data = self.rng.randbytes(length)
            elif style < 0.8:
                word = self.rng.choice([b"replikant ", b"hello world ", b"\x00\x01\x02\x03"])
                data = (word * (length // len(word) + 1))[:length]
            else:
                data = bytes(length)
            self.write(offset, data)

    def cut(self, *, full: bool = False, consistency: int = 0, all_blocks: bool = False) -> Cut:
        """Cut a batch of the dirty blocks (or every block) and remember the disk at the cut."""
        self.seq += 1
        self._clock += 2 * 10**9
        blocks = range(self.blocks) if all_blocks else sorted(self.dirty)
        self.dirty.clear()
        extents: list[tuple[int, int, ExtentKind, bytes | None]] = []
        for b in blocks:
            off = b * self.block_size
            data = bytes(self.image[off : off + self.block_size])
            if data == bytes(len(data)):
                kind = ExtentKind.TRIM if self.rng.random() < 0.5 else ExtentKind.ZERO
                extents.append((off, len(data), kind, None))
            else:
                extents.append((off, len(data), ExtentKind.DATA, data))
        body = encode_extents(
            self.header(len(extents), sum(e[1] for e in extents), full, consistency),
            extents,
        )
        c = Cut(self.generation, self.seq, body, self._pages(), self._clock, consistency, full)
        self.cuts[self.seq] = c
        return c

    def _pages(self) -> tuple[bytes, ...]:
        """The disk now, sharing every page that did not change with the previous cut: a copy
        of the whole disk per cut grew the 50-kill test to 11 GB of memory (2,700 cuts), which
        slowed whatever else ran on the host."""
        view = memoryview(self.image)
        before = self.cuts[self.seq - 1].pages if self.seq - 1 in self.cuts else ()
        pages = []
        for i, at in enumerate(range(0, self.disk_size, _PAGE)):
            page = view[at : at + _PAGE]
            if i < len(before) and before[i] == page:
                pages.append(before[i])
            else:
                pages.append(bytes(page))
        return tuple(pages)

    def header(
        self, count: int, data_bytes: int, full: bool = False, consistency: int = 0
    ) -> BatchHeader:
        """A header for the next batch (``self.seq``)."""
        return BatchHeader(
            vm_uuid=self.vm_uuid,
            disk_id=self.disk_id,
            generation=self.generation,
            seq=self.seq,
            base_seq=self.seq - 1,
            cut_time_ns=self._clock,
            disk_size=self.disk_size,
            block_size=self.block_size,
            consistency=Consistency(consistency),
            compression=self.compression,
            full=full,
            extent_count=count,
            data_bytes=data_bytes,
            cut_id=self.seq,  # one disk, one cut per batch: its seq numbers its cuts
        )


def encode_extents(
    header: BatchHeader, extents: Iterable[tuple[int, int, ExtentKind, bytes | None]]
) -> bytes:
    """Encode a whole batch into bytes."""
    return b"".join(encode_batch(header, list(extents)))


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(MiB):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# PKI, configs, a running broker


@dataclass
class PKI:
    """A CA and the certificates the broker tests use (plus a foreign CA's agent)."""

    root: Path
    broker: TLSFiles
    agents: dict[str, TLSFiles]
    admin: TLSFiles
    foreign_agent: TLSFiles


def make_pki(root: Path) -> PKI:
    """Issue a broker (IP SAN 127.0.0.1), agents h1/h2/h3, an admin, and a foreign-CA agent."""
    from certs.store import CertStore

    store = CertStore.init(root / "ca")
    broker = store.issue_broker("c1", "b1", ips=["127.0.0.1"])
    agents = {h: store.issue_agent(h, ips=["127.0.0.1"]).tls for h in ("h1", "h2", "h3")}
    admin = store.issue_admin("alice")
    other = CertStore.init(root / "other-ca")
    foreign = other.issue_agent("h1", ips=["127.0.0.1"])
    return PKI(root, broker.tls, agents, admin.tls, foreign.tls)


NEWEST_ONLY: dict[str, float] = {
    "any_point_minutes": 0,
    "minute_hours": 0,
    "hourly_hours": 0,
    "daily_days": 0,
    "app_consistent_days": 0,
}
"""``[retention]`` that keeps only the newest point (every tier empty)."""


def make_config(pki: PKI, store: Path, **over: object) -> BrokerConfig:
    """An in-process broker's config: node b1 of cluster c1 on an ephemeral port."""
    data: dict[str, object] = {
        "broker": {
            "node": "b1",
            "cluster": "c1",
            "site": "recovery",
            "listen": "127.0.0.1:0",
            "store": str(store),
            "min_free_bytes": 0,
        },
        "tls": {"ca": str(pki.broker.ca), "cert": str(pki.broker.cert), "key": str(pki.broker.key)},
    }
    data.update(over)
    return BrokerConfig.model_validate(data)


@contextlib.asynccontextmanager
async def running_broker(pki: PKI, store: Path, **over: object) -> AsyncIterator[BrokerService]:
    """An in-process broker (config of :func:`make_config`), started, and stopped on exit."""
    from broker.service import BrokerService

    svc = BrokerService(make_config(pki, store, **over))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


def free_port() -> int:
    """An ephemeral TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def broker_toml(
    path: Path,
    pki: PKI,
    store: Path,
    *,
    port: int,
    min_free_bytes: int = 0,
    extra: str = "",
) -> Path:
    """Write a broker.toml for tests; returns its path."""
    path.write_text(
        f"""
[broker]
node = "b1"
cluster = "c1"
site = "recovery"
listen = "127.0.0.1:{port}"
store = "{store}"
min_free_bytes = {min_free_bytes}

[tls]
ca = "{pki.broker.ca}"
cert = "{pki.broker.cert}"
key = "{pki.broker.key}"
{extra}
"""
    )
    return path


def admin_toml(path: Path, pki: PKI, url: str) -> Path:
    """Write an admin CLI config pointing at one broker."""
    path.write_text(
        f"""
[admin]
brokers = ["{url}"]

[tls]
ca = "{pki.admin.ca}"
cert = "{pki.admin.cert}"
key = "{pki.admin.key}"
"""
    )
    return path


class BrokerProcess:
    """``replikant broker run`` as a real subprocess (for kill -9 and the CLI tests)."""

    def __init__(self, config: Path, store: Path, log: Path) -> None:
        self.config = config
        self.store = store
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> str:
        """Start and wait until it listens; returns its URL."""
        run_file = self.store / ".run" / "broker.json"
        run_file.unlink(missing_ok=True)
        exe = Path(sys.executable).parent / "replikant"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(exe), "--log-json", "broker", "run", "--config", str(self.config)],
                stdout=out,
                stderr=out,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}: see {self.log}")
            if run_file.exists():
                try:
                    info = json.loads(run_file.read_text())
                except ValueError:
                    info = {}
                if info.get("pid") == self.proc.pid:
                    return str(info["url"])
            time.sleep(0.05)
        tail = stacks_and_kill(self.proc, self.log)
        raise TimeoutError(
            f"broker did not start within {timeout}s; the end of {self.log}:\n{tail}"
        )

    def kill9(self) -> None:
        """SIGKILL, and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int:
        """SIGTERM and wait (graceful)."""
        if self.proc is None:
            return 0
        return stop_daemon(self.proc, self.log)


async def admin_cli(config: Path, *args: str) -> tuple[int, str, str]:
    """Run ``replikant --config CONFIG ARGS...``; returns (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "replikant"),
        "--config",
        str(config),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# --------------------------------------------------------------------------------------------
# A client that uploads like an agent


class AgentClient:
    """Uploads batches over mTLS following the agent's rule: after any failure, GET the state
    and go on from ``durable_seq + 1`` (batches at or below it are known durable)."""

    def __init__(self, url: str, tls: TLSFiles) -> None:
        self.url = url
        self.ctx = client_context(tls)
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AgentClient:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.ctx),
            timeout=aiohttp.ClientTimeout(total=60),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session is not None
        await self.session.close()

    def _path(self, src: FakeSource) -> str:
        return f"{self.url}/v1/replicas/{src.vm_uuid}/{src.disk_id}"

    async def enable(self, src: FakeSource, name: str = "web1", **extra: object) -> dict:  # type: ignore[type-arg]
        assert self.session is not None
        body = {
            "vm_name": name,
            "disk_size": src.disk_size,
            "block_size": src.block_size,
            "generation": src.generation,
            "site": "primary",
            "host": "h1",
            **extra,
        }
        async with self.session.put(self._path(src), json=body) as resp:
            data = await resp.json()
            assert resp.status == 200, data
            return data  # type: ignore[no-any-return]

    async def state(self, src: FakeSource) -> dict:  # type: ignore[type-arg]
        assert self.session is not None
        async with self.session.get(self._path(src)) as resp:
            data = await resp.json()
            assert resp.status == 200, data
            return data  # type: ignore[no-any-return]

    async def post(self, src: FakeSource, body: bytes | object, **kw: object) -> tuple[int, dict]:  # type: ignore[type-arg]
        """POST raw bytes (or an async generator); returns (status, json)."""
        assert self.session is not None
        headers = {"Content-Type": BATCH_CONTENT_TYPE}
        if isinstance(body, bytes) and len(body) > 512 * 1024:
            body = io.BytesIO(body)  # aiohttp warns about large raw bytes bodies
        async with self.session.post(
            self._path(src) + "/batches",
            data=body,
            headers=headers,
            **kw,  # type: ignore[arg-type]
        ) as resp:
            return resp.status, await resp.json(content_type=None)

    async def ship(self, src: FakeSource, cut: Cut, retries: int = 200) -> int:
        """Upload ``cut`` until the broker holds it durably; returns the acked seq."""
        last: object = "no answer"
        for _ in range(retries):
            try:
                status, body = await self.post(src, cut.body)
                if status == 200:
                    return int(body["acked_seq"])
                last = (status, body)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                last = exc
            await asyncio.sleep(0.1)
            try:
                state = await self.state(src)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, AssertionError):
                continue
            if state["durable_seq"] >= cut.seq:
                return cut.seq  # durable already: the ack was lost with the broker
        # What the broker said last is what a failing run needs to be understood.
        raise TimeoutError(f"batch {cut.seq} never acked; last answer: {last!r}")
