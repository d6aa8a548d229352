"""Shared pieces of the broker benchmarks: PKI, broker and agent subprocesses (``replikant broker
run`` / ``replikant agent run`` with configs written here), a shipper that builds and uploads
batches the way the agent does (zstd level 1, zero blocks as ZERO extents, holes skipped), and
image generators."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import http.client
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agents.control import read_status
from common.config import TLSFiles
from common.hrl import (
    BATCH_CONTENT_TYPE,
    BatchEncoder,
    BatchHeader,
    Compression,
    Consistency,
    ExtentKind,
)
from common.tls import client_context
from tests.support_pagecache import drop_from_cache

MiB = 1024 * 1024
GiB = 1024 * MiB
EXTENT = 1 * MiB
REGION = 64 * MiB  # the mixed image's unit of content


def check_free_space(path: Path, needed: int) -> None:
    """Refuse to start when the filesystem of ``path`` has less than ``needed`` bytes free."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise SystemExit(
            f"{probe} has {human(free)} free, this bench needs {human(needed)}: "
            "pass --dir on a larger filesystem or a smaller size"
        )


def add_workdir_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """``--dir`` (one per run by default, so two runs on a shared machine never remove each
    other's files) and ``--keep``."""
    parser.add_argument(
        "--dir",
        default=f"/var/tmp/replikant-bench-{name}-{os.getpid()}",
        help="work directory (removed first, and at the end unless --keep)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")


def free_port() -> int:
    """A free TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Pki:
    """Our certificates for the bench."""

    broker: TLSFiles
    agent: TLSFiles
    admin: TLSFiles


def make_pki(root: Path, broker_ip: str = "127.0.0.1") -> Pki:
    """A CA, a broker (IP SAN ``broker_ip``), an agent and an admin."""
    from certs.store import CertStore

    store = CertStore.init(root, force=True)
    return Pki(
        broker=store.issue_broker("c1", "b1", ips=[broker_ip], overwrite=True).tls,
        agent=store.issue_agent("h1", overwrite=True).tls,
        admin=store.issue_admin("bench", overwrite=True).tls,
    )


def tls_toml(tls: TLSFiles) -> str:
    """The ``[tls]`` section of an agent or broker config."""
    return f'[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'


def _replikant_argv(
    *args: str, cpus: str | None = None, netns: str | None = None, level: str | None = None
) -> list[str]:
    """``replikant ARGS`` with JSON logs, pinned with ``taskset -c CPUS`` and run in the network
    namespace ``netns`` when given (both exec, so the process id stays the daemon's)."""
    level = level or os.environ.get("BENCH_LOG", "warning")
    exe = str(Path(sys.executable).parent / "replikant")
    wrap = (["ip", "netns", "exec", netns] if netns else []) + (
        ["taskset", "-c", cpus] if cpus else []
    )
    return [*wrap, exe, "--log-json", "--log-level", level, *args]


def _stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 60) -> None:
    """SIGTERM, wait, SIGKILL if it does not go."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def holds_writes_before(disk: dict[str, Any], t_ns: int) -> bool:
    """:meth:`Broker.current_after` for one disk record of the broker's status document."""
    return bool((disk["last_cut"] or 0) * 1e9 > t_ns)


def wait_until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.1) -> Any:
    """Call ``check`` every ``every`` seconds until it returns something true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class Broker:
    """``replikant broker run`` as a subprocess."""

    def __init__(
        self,
        workdir: Path,
        pki: Pki,
        store: Path,
        *,
        cpus: str | None = None,
        netns: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.store = store
        self.cpus, self.netns = cpus, netns
        self.port = free_port()
        self.config = workdir / "broker.toml"
        self.config.write_text(
            f"""
[broker]
node = "b1"
cluster = "c1"
listen = "{host}:{self.port}"
store = "{store}"
min_free_bytes = 0
{tls_toml(pki.broker)}[retention]
any_point_minutes = 600
"""
        )
        self.log = workdir / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.admin = client_context(pki.admin)
        self._conn: http.client.HTTPSConnection | None = None

    def start(self, *extra: str) -> str:
        """Start and wait for the run file."""
        run = self.store / ".run" / "broker.json"
        run.unlink(missing_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                _replikant_argv(
                    "broker",
                    "run",
                    "--config",
                    str(self.config),
                    *extra,
                    cpus=self.cpus,
                    netns=self.netns,
                ),
                stdout=out,
                stderr=out,
            )
        for _ in range(600):
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker died, see {self.log}")
            if run.exists():
                info = json.loads(run.read_text())
                if info.get("pid") == self.proc.pid:
                    self.url = str(info["url"])
                    return self.url
            time.sleep(0.05)
        raise TimeoutError("broker did not start")

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        _stop_process(self.proc)

    @property
    def pid(self) -> int:
        """The broker's process id."""
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> dict[str, Any]:
        """``GET /v1/status``."""
        doc: dict[str, Any] = json.loads(self.get("/v1/status"))
        return doc

    def get(self, path: str) -> bytes:
        """GET ``path`` with the admin certificate, on one kept-alive connection (a TLS
        handshake per poll would cost the broker more CPU than the answer)."""
        return self.call("GET", path)

    def call(self, method: str, path: str, doc: dict[str, Any] | None = None) -> bytes:
        """``method`` on ``path`` (with ``doc`` as a JSON body), as :meth:`get` does."""
        body_out = None if doc is None else json.dumps(doc).encode()
        headers = {} if doc is None else {"Content-Type": "application/json"}
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPSConnection(
                    "127.0.0.1", self.port, context=self.admin, timeout=30
                )
            try:
                self._conn.request(method, path, body=body_out, headers=headers)
                resp = self._conn.getresponse()
                body = resp.read()
                if resp.status >= 300:
                    raise RuntimeError(f"broker {method} {path}: HTTP {resp.status} {body[:200]!r}")
                return body
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def disk_status(self, vm_uuid: uuid.UUID, disk_id: str) -> dict[str, Any] | None:
        """One disk's record from the status document (None before the agent announced it)."""
        for vm in self.status()["vms"]:
            if vm["uuid"] == str(vm_uuid):
                for disk in vm["disks"]:
                    if disk["disk_id"] == disk_id:
                        return dict(disk, vm_lag_seconds=vm["lag_seconds"])
        return None

    def synced(self, vm_uuid: uuid.UUID, disk_id: str) -> bool:
        """Initial sync complete and everything durable applied."""
        disk = self.disk_status(vm_uuid, disk_id)
        return bool(
            disk
            and disk["initial_sync"] == "complete"
            and disk["applied_seq"] == disk["durable_seq"]
        )

    def current_after(self, vm_uuid: uuid.UUID, disk_id: str, t_ns: int) -> bool:
        """The replica is known to hold every write made before ``t_ns``: its ``last_cut`` (the
        applied cut, or a later statement that nothing changed since) is later. A disk idle
        after a write ships no further batch, only statements: the applied log alone would wait
        for a cut that never comes if the write's own cut fell just before ``t_ns``."""
        disk = self.disk_status(vm_uuid, disk_id)
        return disk is not None and holds_writes_before(disk, t_ns)

    def applied_log(self, vm_uuid: uuid.UUID, disk_id: str) -> list[dict[str, Any]]:
        """The replica's ``applied.log``: one record per applied batch (cut and apply times)."""
        path = self.store / str(vm_uuid) / disk_id / "applied.log"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class DiskSpec:
    """One protected disk of the bench agent (each in a VM of its own)."""

    vm: str
    image: Path
    disk_id: str = "disk0"
    vm_uuid: uuid.UUID = field(default_factory=uuid.uuid4)

    @property
    def export(self) -> str:
        """The agent's default export name."""
        return f"{self.vm}-{self.disk_id}"


class Agent:
    """``replikant agent run`` as a subprocess, protecting ``disks`` and shipping to ``url``."""

    def __init__(
        self,
        workdir: Path,
        pki: Pki,
        url: str,
        disks: list[DiskSpec],
        *,
        interval: float = 1.0,
        block_size: int = 65536,
        cluster: str = "c1",
        cpus: str | None = None,
        netns: str | None = None,
        log_level: str | None = None,
        rpo: float | None = None,
    ) -> None:
        """``rpo``: the policy's ``rpo_seconds`` (the agent's default when None); a bench that
        holds the lag to a target declares it, as a VM that needs it would (decision 028)."""
        self.workdir = workdir
        self.cpus, self.netns, self.log_level = cpus, netns, log_level
        self.disks = disks
        self.socket_dir = workdir / "nbd"
        self.config = workdir / "agent.toml"
        vms = "".join(
            f'\n[[vms]]\nname = "{d.vm}"\nuuid = "{d.vm_uuid}"\n'
            f'[[vms.disks]]\nid = "{d.disk_id}"\nimage = "{d.image}"\n'
            for d in disks
        )
        self.config.write_text(
            f'[agent]\nhost = "h1"\nstate_dir = "{workdir / "state"}"\n'
            + tls_toml(pki.agent)
            + f'[nbd]\nsocket_dir = "{self.socket_dir}"\n'
            f'[broker]\nurls = ["{url}"]\ncluster = "{cluster}"\n'
            f"[policies.default]\ninterval_seconds = {interval}\nblock_size = {block_size}\n"
            + (f"rpo_seconds = {rpo}\n" if rpo is not None else "")
            + vms
        )
        self.log = workdir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    @property
    def pid(self) -> int:
        """The agent's process id."""
        assert self.proc is not None
        return self.proc.pid

    def nbd_uri(self, disk: DiskSpec) -> str:
        """Where a guest (fio, qemu-io) writes to ``disk``."""
        return f"nbd+unix:///{disk.export}?socket={self.socket_dir / disk.export}.sock"

    def start(self) -> None:
        """Start (``started`` is the perf_counter just before the exec) and wait for status."""
        with self.log.open("ab") as out:
            self.started = time.perf_counter()
            self.proc = subprocess.Popen(
                _replikant_argv(
                    "agent",
                    "run",
                    "--config",
                    str(self.config),
                    cpus=self.cpus,
                    netns=self.netns,
                    level=self.log_level,
                ),
                stdout=out,
                stderr=out,
            )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent died, see {self.log}")
            try:
                self.status()
            except OSError:
                return False
            return True

        wait_until("the agent's status endpoint", up, 60, every=0.02)

    def status(self) -> dict[str, Any]:
        """``GET /v1/status`` on the agent's control socket."""
        return read_status(self.socket_dir / "control" / "agent.sock", timeout=10)

    def stop(self) -> None:
        """SIGTERM (a clean stop saves the exact dirty map) and wait."""
        _stop_process(self.proc)


def children_cpu() -> float:
    """CPU seconds of every child this process has waited for (a tool run to its end)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _stat_cpu(pid: int | str, fields: slice) -> float:
    """Seconds from ``fields`` of ``/proc/PID/stat`` (after the command), 0 once it ended."""
    try:
        values = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[fields]
    except (FileNotFoundError, ProcessLookupError):
        return 0.0  # a descendant that ended meanwhile: its parent's waited-for times have it
    return sum(int(v) for v in values) / os.sysconf("SC_CLK_TCK")


def own_cpu(pid: int | str = "self") -> float:
    """User + system CPU seconds of the process's own threads, none of its descendants'."""
    return _stat_cpu(pid, slice(11, 13))  # utime, stime


def proc_cpu(pid: int | str = "self") -> float:
    """User + system CPU seconds a process and its descendants have used so far: those running
    and those it has waited for (the agent's shipping process is part of the agent's work)."""
    own = _stat_cpu(pid, slice(11, 15))  # utime, stime, cutime, cstime
    children: list[str] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                children += Path(f"/proc/{pid}/task/{task}/children").read_text().split()
    return own + sum(proc_cpu(child) for child in children)


def proc_wchar(pid: int | str = "self") -> int:
    """Bytes the process has written through write(2)-like calls (sockets included)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


class Shipper:
    """Builds batches from a source file and uploads them like an agent would."""

    def __init__(
        self,
        url: str,
        tls: TLSFiles,
        *,
        vm_uuid: uuid.UUID,
        disk_id: str,
        disk_size: int,
        block_size: int,
        level: int = 1,
        threads: int = 2,
    ) -> None:
        self.url = url
        self.ctx = client_context(tls)
        self.vm_uuid = vm_uuid
        self.disk_id = disk_id
        self.disk_size = disk_size
        self.block_size = block_size
        self.level = level
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)
        self.session: aiohttp.ClientSession | None = None
        self.body_bytes = 0

    async def __aenter__(self) -> Shipper:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.ctx),
            timeout=aiohttp.ClientTimeout(total=3600),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session is not None
        await self.session.close()
        self.pool.shutdown()

    @property
    def base(self) -> str:
        """The replica's URL."""
        return f"{self.url}/v1/replicas/{self.vm_uuid}/{self.disk_id}"

    async def enable(self, name: str = "bench") -> dict[str, Any]:
        """PUT the replica."""
        assert self.session is not None
        body = {
            "vm_name": name,
            "disk_size": self.disk_size,
            "block_size": self.block_size,
            "generation": 1,
            "site": "primary",
            "host": "h1",
        }
        async with self.session.put(self.base, json=body) as resp:
            data: dict[str, Any] = await resp.json()
            assert resp.status == 200, data
            return data

    async def state(self) -> dict[str, Any]:
        """GET the replica's state."""
        assert self.session is not None
        async with self.session.get(self.base) as resp:
            data: dict[str, Any] = await resp.json()
            return data

    async def hashes(self, block_size: int) -> bytes:
        """GET the replica's block hashes."""
        assert self.session is not None
        async with self.session.get(
            self.base + "/hashes", params={"block_size": block_size}
        ) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.read()

    async def wait_applied(self, seq: int) -> None:
        """Poll until ``seq`` is applied (the broker has no push; 10 ms granularity)."""
        state = await self.state()
        while state["applied_seq"] < seq:
            await asyncio.sleep(0.01)
            state = await self.state()

    def plan(self, fd: int, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Split ranges into extents of at most EXTENT bytes."""
        out = []
        for start, length in ranges:
            pos, end = start, start + length
            while pos < end:
                n = min(EXTENT, end - pos)
                out.append((pos, n))
                pos += n
        return out

    async def ship(self, fd: int, extents: list[tuple[int, int]], seq: int, *, full: bool) -> int:
        """Encode ``extents`` of ``fd`` as batch ``seq`` and upload it; returns acked seq."""
        loop = asyncio.get_running_loop()

        def read_and_compress(ext: tuple[int, int]) -> tuple[int, int, bytes | None]:
            off, n = ext
            data = os.pread(fd, n, off)
            if data == bytes(n):
                return off, n, None
            return off, n, data

        # Read (and detect zeroes) ahead in the pool; the encoder compresses per extent.
        items = list(extents)
        header = BatchHeader(
            vm_uuid=self.vm_uuid,
            disk_id=self.disk_id,
            generation=1,
            seq=seq,
            base_seq=seq - 1,
            cut_time_ns=time.time_ns(),
            disk_size=self.disk_size,
            block_size=self.block_size,
            consistency=Consistency.CRASH,
            compression=Compression.ZSTD if self.level else Compression.NONE,
            full=full,
            extent_count=len(items),
            data_bytes=sum(n for _, n in items),
            cut_id=seq,
        )
        encoder = BatchEncoder(header, level=self.level)
        import zstandard

        cctxs: dict[int, zstandard.ZstdCompressor] = {}

        def encode_one(ext: tuple[int, int]) -> tuple[int, int, bytes | None, int]:
            import threading

            import xxhash

            off, n, data = read_and_compress(ext)
            if data is None:
                return off, n, None, 0
            tid = threading.get_ident()
            cctx = cctxs.get(tid)
            if cctx is None:
                cctx = cctxs[tid] = zstandard.ZstdCompressor(level=self.level)
            xxh = xxhash.xxh3_64_intdigest(data)
            payload = cctx.compress(data) if self.level else data
            return off, n, payload, xxh

        async def body() -> AsyncIterator[bytes]:
            yield encoder.header_bytes()
            window = 8
            futs: list[asyncio.Future[tuple[int, int, bytes | None, int]]] = []
            i = 0
            pending: list[bytes] = []
            size = 0
            while i < len(items) or futs:
                while i < len(items) and len(futs) < window:
                    futs.append(loop.run_in_executor(self.pool, encode_one, items[i]))
                    i += 1
                off, n, payload, xxh = await futs.pop(0)
                if payload is None:
                    chunk = encoder.zero(off, n)
                else:
                    chunk = encode_precompressed(encoder, off, n, payload, xxh)
                pending.append(chunk)
                size += len(chunk)
                if size >= 4 * MiB:
                    out = b"".join(pending)
                    pending.clear()
                    size = 0
                    self.body_bytes += len(out)
                    yield out
            pending.append(encoder.end())
            out = b"".join(pending)
            self.body_bytes += len(out)
            yield out

        assert self.session is not None
        async with self.session.post(
            self.base + "/batches", data=body(), headers={"Content-Type": BATCH_CONTENT_TYPE}
        ) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"upload refused: {data}")
            return int(data["acked_seq"])


def encode_precompressed(
    self: BatchEncoder, offset: int, length: int, payload: bytes, xxh: int
) -> bytes:
    """A DATA record whose payload the caller compressed and hashed (in a thread pool): the
    encoder's own ``data()`` compresses inline, and records must still be emitted in order."""
    self._check(offset, length, ExtentKind.DATA)
    record = self._record(offset, length, ExtentKind.DATA, len(payload), xxh)
    self._position += len(payload)
    return record + payload


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """Allocated ranges of a file (holes skipped), via SEEK_DATA/SEEK_HOLE."""
    out = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        out.append((data, min(hole, size) - data))
        pos = hole
    return out


def fast_random_file(path: Path, size: int) -> None:
    """``size`` bytes of AES-CTR keystream (incompressible, fast) via openssl."""
    with path.open("wb") as out:
        gen = subprocess.Popen(
            [
                "openssl",
                "enc",
                "-aes-128-ctr",
                "-pass",
                "pass:replikant",
                "-nosalt",
                "-pbkdf2",
                "-in",
                "/dev/zero",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert gen.stdout is not None
        left = size
        while left:
            chunk = gen.stdout.read(min(left, 16 * MiB))
            out.write(chunk)
            left -= len(chunk)
        gen.kill()
        gen.wait()


def corpus(paths: list[str], limit: int, suffixes: tuple[str, ...] | None = None) -> bytes:
    """Up to ``limit`` bytes of real files under ``paths``."""
    out = bytearray()
    for root in paths:
        for dirpath, _dirs, files in os.walk(root):
            for name in sorted(files):
                if suffixes and not name.endswith(suffixes):
                    continue
                p = os.path.join(dirpath, name)
                try:
                    if os.path.islink(p) or not os.path.isfile(p):
                        continue
                    with open(p, "rb") as fh:
                        out += fh.read(8 * MiB)
                except OSError:
                    continue
                if len(out) >= limit:
                    return bytes(out[:limit])
    return bytes(out)


def make_mixed_image(path: Path, size: int, rng: random.Random) -> dict[str, int]:
    """Regions of 64 MiB: 30 % binaries, 30 % text, 10 % random, 15 % zero-filled, 15 % holes;
    left out of the page cache, so that the server under test starts cold and only its own work
    shapes the cache. Left there, it would sit in large folios (ext4, Linux 6.16 and later),
    where each 4 KiB write costs ~25 us of kernel time instead of ~3: a cost neither server's
    work would have caused (docs/bench.md, "Large folios")."""
    binaries = corpus(["/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/lib"], 96 * MiB)
    text = corpus(
        ["/usr/share/doc", "/usr/lib/python3", str(Path(sys.prefix) / "lib")],
        96 * MiB,
        (".py", ".txt", ".md", "copyright", ".html", ".rst", ".c", ".h", ".json"),
    )
    kinds = ["bin"] * 30 + ["text"] * 30 + ["random"] * 10 + ["zero"] * 15 + ["hole"] * 15
    counts: dict[str, int] = {}
    with path.open("wb") as fh:
        fh.truncate(size)
        for off in range(0, size, REGION):
            kind = rng.choice(kinds)
            counts[kind] = counts.get(kind, 0) + 1
            n = min(REGION, size - off)
            if kind == "hole":
                continue
            fh.seek(off)
            if kind == "zero":
                fh.write(bytes(n))
            elif kind == "random":
                fh.write(rng.randbytes(n))
            else:
                src = binaries if kind == "bin" else text
                start = rng.randrange(0, max(1, len(src) - n)) if len(src) > n else 0
                piece = src[start : start + n]
                while len(piece) < n:
                    piece += src[: n - len(piece)]
                fh.write(piece)
    drop_from_cache(path)
    return counts


def copy_file(src: Path, dst: Path) -> None:
    """Copy keeping holes (cp --sparse=always); both left out of the page cache."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    drop_from_cache(src)
    drop_from_cache(dst)


def timed(label: str) -> Any:
    """Context manager printing nothing; use .seconds after."""

    class _T:
        def __enter__(self) -> _T:
            self.start = time.perf_counter()
            return self

        def __exit__(self, *exc: object) -> None:
            self.seconds = time.perf_counter() - self.start

    return _T()


def human(n: float) -> str:
    """Bytes as MiB/GiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def save_result(name: str, doc: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>-<UTC time>.json`` (like the other benches)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    out = Path(__file__).resolve().parent / "results" / f"{name}-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out


def cleanup(path: Path) -> None:
    """Remove a work directory."""
    shutil.rmtree(path, ignore_errors=True)
