"""Helpers for the agent's tests: a stand-in broker, a tiny NBD client, config files, hashing.

:class:`Receiver` stands in for the broker (``docs/protocol/http.md``) where a test needs to see
or break individual batches: it serves HTTPS with mutual TLS, decodes every batch with
:mod:`common.hrl`, applies it to a replica image, fsyncs, and only then acks. It can lose acks
after a durable apply, refuse with 503, or be down, on request. End-to-end tests that do not need
that control use the real broker when ``broker/`` has a runnable service.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import xxhash
from aiohttp import web

from common.hrl import NEED_DATA, BatchDecoder, BatchEnd, BatchHeader, Extent, ExtentKind
from common.hrl.errors import BatchFormatError
from common.tls import MutualTLSSite, server_context
from tests.fixtures_pki import Pki

MiB = 1024 * 1024


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def file_digest(path: Path) -> str:
    """SHA-256 of a file's contents."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def make_image(path: Path, size: int, *, fill: Callable[[int], bytes] | None = None) -> Path:
    """A sparse image of ``size`` bytes; ``fill(i)`` may give the contents of MiB number ``i``."""
    with path.open("wb") as fh:
        fh.truncate(size)
        if fill is not None:
            for i in range(size // MiB):
                data = fill(i)
                if data:
                    fh.seek(i * MiB)
                    fh.write(data)
    return path


# -- the stand-in broker -------------------------------------------------------------------


@dataclass
class BatchRecord:
    """What the receiver saw of one accepted batch."""

    header: BatchHeader
    extents: list[tuple[int, int, ExtentKind]]
    wire_bytes: int


@dataclass
class ReplicaRecord:
    """One replica kept by the receiver."""

    vm_uuid: str
    disk_id: str
    vm_name: str
    disk_size: int
    block_size: int
    image: Path
    generation: int = 1
    durable_seq: int = 0
    initial_sync: str = "pending"
    batches: list[BatchRecord] = field(default_factory=list)
    images: dict[int, bytes] = field(default_factory=dict)  # seq -> image (keep_images)
    applying: bool = False  # a batch is being written to the image, not yet recorded

    def state(self) -> dict[str, Any]:
        """The JSON replica state of the HTTP spec."""
        return {
            "vm_uuid": self.vm_uuid,
            "disk_id": self.disk_id,
            "vm_name": self.vm_name,
            "disk_size": self.disk_size,
            "generation": self.generation,
            "applied_seq": self.durable_seq,
            "durable_seq": self.durable_seq,
            "epoch": 1,
            "initial_sync": self.initial_sync,
            "site": "recovery",
        }


def _error(
    status: int, code: str, message: str, fix: str = "", details: dict[str, Any] | None = None
) -> web.Response:
    body = {"error": code, "message": message, "fix": fix, "details": details or {}}
    return web.json_response(body, status=status)


def _forbidden(code: str) -> web.Response:
    return _error(403, code, "agent h1 may not replicate this vm", "add 'h1' to allowed_agents")


class Receiver:
    """A stand-in broker that journals batches by decoding them with :mod:`common.hrl`."""

    def __init__(self, root: Path, pki: Pki) -> None:
        self.root = root
        self.pki = pki
        self.replicas: dict[tuple[str, str], ReplicaRecord] = {}
        self.lose_acks = 0  # apply durably, then drop the connection instead of answering
        self.refuse = False  # answer every request 503 not_owner
        self.redirect: str | None = None  # answer every request 503 not_owner naming this owner
        self.forbid: str | None = None  # answer every PUT and batch 403 with this error code
        self.reject_batches = 0  # answer the next N batches 503 before reading them
        self.ack_delay = 0.0  # seconds between applying a batch and acking it (a slow broker)
        self.lose_only_nonempty = False  # lose_acks spares batches that carry no extents
        self.accept_limit: int | None = None  # refuse (503) batches beyond this many per replica
        self.seed_from: Path | None = None  # next new replica starts as a copy of this image
        self.fail_hashes = 0  # answer the next N hash requests 503
        self.keep_images = False  # remember the replica image after every batch (small disks)
        self.requests: list[tuple[str, str]] = []
        self.batch_ports: list[int] = []  # the client's port of each batch upload
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL agents ship to."""
        return f"https://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> str:
        """Serve on 127.0.0.1 (``port`` 0 picks one); return the URL."""
        app = web.Application(client_max_size=1024**3)
        base = "/v1/replicas/{vm}/{disk}"
        app.router.add_put(base, self._put)
        app.router.add_get(base, self._get)
        app.router.add_post(base + "/batches", self._post)
        app.router.add_get(base + "/hashes", self._hashes)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = MutualTLSSite(self._runner, "127.0.0.1", port, server_context(self.pki.broker.tls))
        await site.start()
        self.port = site.port
        return self.url

    async def stop(self) -> None:
        """Stop serving (connections in flight are cut)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def replica(self, vm_uuid: uuid.UUID | str, disk_id: str) -> ReplicaRecord:
        """The replica of ``(vm_uuid, disk_id)``."""
        return self.replicas[(str(vm_uuid), disk_id)]

    def _find(self, request: web.Request) -> ReplicaRecord | None:
        return self.replicas.get((request.match_info["vm"], request.match_info["disk"]))

    async def _put(self, request: web.Request) -> web.Response:
        self.requests.append(("PUT", request.path))
        if self.refuse:
            return _error(503, "not_owner", "refusing on purpose")
        if self.forbid is not None:
            return _forbidden(self.forbid)
        body = await request.json()
        key = (request.match_info["vm"], request.match_info["disk"])
        rec = self.replicas.get(key)
        if rec is None:
            folder = self.root / key[0]
            folder.mkdir(parents=True, exist_ok=True)
            image = folder / f"{key[1]}.img"
            with image.open("wb") as fh:
                fh.truncate(int(body["disk_size"]))
            rec = ReplicaRecord(
                key[0],
                key[1],
                body["vm_name"],
                int(body["disk_size"]),
                int(body["block_size"]),
                image,
                generation=int(body.get("generation", 1)),
            )
            if self.seed_from is not None:
                image.write_bytes(self.seed_from.read_bytes())
                rec.initial_sync = "seeded"
                self.seed_from = None
            self.replicas[key] = rec
        elif rec.disk_size != int(body["disk_size"]) or rec.vm_name != body["vm_name"]:
            return _error(409, "identity_conflict", "size or name differs")
        return web.json_response(rec.state())

    async def _get(self, request: web.Request) -> web.Response:
        self.requests.append(("GET", request.path))
        if self.refuse:
            return _error(503, "not_owner", "refusing on purpose")
        if self.redirect is not None:
            details = {"owner": "b2", "owner_url": self.redirect, "epoch": 2}
            return _error(503, "not_owner", "b2 serves this VM", details=details)
        rec = self._find(request)
        if rec is None:
            return _error(404, "unknown_vm", "not enabled")
        return web.json_response(rec.state())

    async def _hashes(self, request: web.Request) -> web.Response:
        if self.fail_hashes > 0:
            self.fail_hashes -= 1
            return _error(503, "not_owner", "failing hashes on purpose")
        rec = self._find(request)
        if rec is None:
            return _error(404, "unknown_vm", "not enabled")
        bs = int(request.query["block_size"])
        offset = int(request.query["offset"])
        length = int(request.query["length"])
        out = bytearray()
        with rec.image.open("rb") as fh:
            fh.seek(offset)
            remaining = length
            while remaining > 0:
                block = fh.read(min(bs, remaining))
                out += struct.pack(">Q", xxhash.xxh3_64_intdigest(block))
                remaining -= bs
        return web.Response(
            body=bytes(out),
            content_type="application/octet-stream",
            headers={"X-Replikant-Applied-Seq": str(rec.durable_seq)},
        )

    async def _post(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(("POST", request.path))
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.batch_ports.append(peer[1] if peer else 0)
        if self.refuse:
            return _error(503, "not_owner", "refusing on purpose")
        if self.forbid is not None:
            return _forbidden(self.forbid)
        if self.reject_batches > 0:
            self.reject_batches -= 1
            return _error(503, "not_owner", "rejecting this batch on purpose")
        rec = self._find(request)
        if rec is None:
            return _error(404, "unknown_vm", "not enabled")
        if self.accept_limit is not None and len(rec.batches) >= self.accept_limit:
            return _error(503, "not_owner", "accept limit reached")
        decoder = BatchDecoder()
        header: BatchHeader | None = None
        extents: list[Extent] = []
        wire = 0
        try:
            async for chunk in request.content.iter_any():
                wire += len(chunk)
                decoder.receive_data(chunk)
                header = self._drain(decoder, extents) or header
            decoder.receive_data(b"")
            header = self._drain(decoder, extents) or header
        except BatchFormatError as exc:
            return _error(400, "malformed_batch", str(exc))
        if header is None or not decoder.done:
            return _error(400, "malformed_batch", "incomplete")
        if header.vm_uuid != uuid.UUID(rec.vm_uuid) or header.disk_id != rec.disk_id:
            return _error(403, "wrong_identity", "header names another disk")
        if header.generation != rec.generation:
            return _error(409, "stale_generation", "generation differs")
        if header.seq <= rec.durable_seq:
            return web.json_response({"acked_seq": rec.durable_seq, "duplicate": True})
        if header.seq != rec.durable_seq + 1 or header.base_seq != header.seq - 1:
            return _error(409, "sequence_gap", f"expected {rec.durable_seq + 1}")
        rec.applying = True  # the image changes before the batch is recorded below
        try:
            await asyncio.to_thread(self._apply, rec, extents)
            await asyncio.sleep(self.ack_delay)
        finally:
            rec.applying = False
        rec.durable_seq = header.seq
        if header.full:
            rec.initial_sync = "in_progress"
        elif rec.initial_sync != "complete":
            rec.initial_sync = "complete"
        rec.batches.append(
            BatchRecord(header, [(e.offset, e.length, e.kind) for e in extents], wire)
        )
        if self.keep_images:
            rec.images[header.seq] = rec.image.read_bytes()
        if self.lose_acks > 0 and (header.extent_count or not self.lose_only_nonempty):
            self.lose_acks -= 1
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # aiohttp drops the request without a response
        return web.json_response({"acked_seq": header.seq, "duplicate": False})

    @staticmethod
    def _drain(decoder: BatchDecoder, extents: list[Extent]) -> BatchHeader | None:
        header = None
        while (event := decoder.next_event()) is not NEED_DATA:
            if isinstance(event, BatchHeader):
                header = event
            elif isinstance(event, Extent):
                extents.append(event)
            else:
                assert isinstance(event, BatchEnd)
        return header

    @staticmethod
    def _apply(rec: ReplicaRecord, extents: list[Extent]) -> None:
        fd = os.open(rec.image, os.O_WRONLY)
        try:
            for ext in extents:
                data = ext.data if ext.kind is ExtentKind.DATA else bytes(ext.length)
                assert data is not None
                os.pwrite(fd, data, ext.offset)
            os.fsync(fd)
        finally:
            os.close(fd)


# -- a tiny synchronous NBD client (fixed newstyle, OPT_GO, simple replies) ----------------

_NBDMAGIC = 0x4E42444D41474943
_IHAVEOPT = 0x49484156454F5054
_REPLY_MAGIC = 0x3E889045565A9
_REQ = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")


class NBDClientError(Exception):
    """The NBD server refused a request or broke the protocol."""


class MiniNBD:
    """Blocking NBD client for tests: one request at a time, no structured replies."""

    def __init__(self, sock_path: Path, export: str, *, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._handle = 0
        self.size = -1
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(str(sock_path))
            self._handshake(export)
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self, export: str) -> None:
        magic, opt, _flags = struct.unpack(">QQH", self._recv(18))
        if magic != _NBDMAGIC or opt != _IHAVEOPT:
            raise NBDClientError("not a fixed-newstyle NBD server")
        self.sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", _IHAVEOPT, 7, len(data)) + data)
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length)
            if magic != _REPLY_MAGIC:
                raise NBDClientError("bad option reply magic")
            if rtype & 0x80000000:
                raise NBDClientError(f"export {export!r} refused: {rtype:#x} {payload!r}")
            if rtype == 3 and struct.unpack(">H", payload[:2])[0] == 0:
                self.size = struct.unpack(">Q", payload[2:10])[0]
            if rtype == 1:
                break

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def _request(
        self, cmd: int, offset: int, length: int, data: bytes = b"", flags: int = 0
    ) -> bytes:
        self._handle += 1
        self.sock.sendall(_REQ.pack(0x25609513, flags, cmd, self._handle, offset, length) + data)
        magic, error, handle = _SIMPLE.unpack(self._recv(16))
        if magic != 0x67446698 or handle != self._handle:
            raise NBDClientError("bad reply")
        if error:
            raise NBDClientError(f"NBD error {error} for command {cmd}")
        return self._recv(length) if cmd == 0 else b""

    def read(self, offset: int, length: int) -> bytes:
        """NBD_CMD_READ."""
        return self._request(0, offset, length)

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        """NBD_CMD_WRITE (optionally FUA)."""
        self._request(1, offset, len(data), data, flags=1 if fua else 0)

    def flush(self) -> None:
        """NBD_CMD_FLUSH."""
        self._request(3, 0, 0)

    def trim(self, offset: int, length: int) -> None:
        """NBD_CMD_TRIM."""
        self._request(4, offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        """NBD_CMD_WRITE_ZEROES."""
        self._request(6, offset, length)

    def close(self) -> None:
        """NBD_CMD_DISC, then close."""
        with contextlib.suppress(OSError):
            self.sock.sendall(_REQ.pack(0x25609513, 0, 2, 0, 0, 0))
        self.sock.close()


# -- agent configuration -------------------------------------------------------------------


@dataclass
class DiskSpec:
    """One disk for :func:`write_agent_config`."""

    id: str
    image: Path
    export: str | None = None
    exclude: bool = False


@dataclass
class VMSpec:
    """One VM for :func:`write_agent_config`."""

    name: str
    disks: list[DiskSpec]
    uuid: uuid.UUID = field(default_factory=uuid.uuid4)
    policy: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


def write_agent_config(
    path: Path,
    *,
    pki: Pki,
    broker_urls: list[str],
    vms: list[VMSpec],
    state_dir: Path,
    socket_dir: Path,
    control_socket: Path | None = None,
    interval: float = 1.0,
    policy_extra: str = "",
    extra_policies: str = "",
    tcp_listen: str | None = None,
    tcp_clients: list[str] | None = None,
    mqtt_url: str | None = None,
) -> Path:
    """Write an agent.toml that protects ``vms`` and ships to ``broker_urls`` (and joins the
    control plane at ``mqtt_url`` with its certificate, when given)."""
    agent_tls = pki.agent.tls
    lines = [
        "[agent]",
        'host = "h1"',
        f'state_dir = "{state_dir}"',
        "",
        "[tls]",
        f'ca = "{agent_tls.ca}"',
        f'cert = "{agent_tls.cert}"',
        f'key = "{agent_tls.key}"',
        "",
        "[nbd]",
        f'socket_dir = "{socket_dir}"',
    ]
    if control_socket is not None:
        lines.insert(3, f'control_socket = "{control_socket}"')
    if tcp_listen:
        lines.append(f'tcp_listen = "{tcp_listen}"')
    if tcp_clients is not None:
        lines.append("tcp_clients = [" + ", ".join(f'"{c}"' for c in tcp_clients) + "]")
    lines += [
        "",
        "[broker]",
        "urls = [" + ", ".join(f'"{u}"' for u in broker_urls) + "]",
        'cluster = "c1"',
        *(["", "[mqtt]", f'url = "{mqtt_url}"', "tls = true"] if mqtt_url else []),
        "",
        "[policies.default]",
        f"interval_seconds = {interval}",
        policy_extra,
        extra_policies,
    ]
    for vm in vms:
        lines += ["", "[[vms]]", f'name = "{vm.name}"', f'uuid = "{vm.uuid}"']
        if vm.policy:
            lines.append(f'policy = "{vm.policy}"')
        if vm.labels:
            pairs = ", ".join(f'{k} = "{v}"' for k, v in vm.labels.items())
            lines.append(f"labels = {{ {pairs} }}")
        for d in vm.disks:
            lines += ["[[vms.disks]]", f'id = "{d.id}"', f'image = "{d.image}"']
            if d.export:
                lines.append(f'export = "{d.export}"')
            if d.exclude:
                lines.append("exclude = true")
    path.write_text("\n".join(lines) + "\n")
    return path


def local_agent_config(
    tmp_path: Path, pki: Pki, url: str, vms: list[VMSpec], **options: Any
) -> Path:
    """``tmp_path/agent.toml`` for ``vms``, shipping to the one broker at ``url``: state in
    ``tmp_path/state``, sockets in ``tmp_path/s``; ``options`` as :func:`write_agent_config`'s."""
    return write_agent_config(
        tmp_path / "agent.toml",
        pki=pki,
        broker_urls=[url],
        vms=vms,
        state_dir=tmp_path / "state",
        socket_dir=tmp_path / "s",
        **options,
    )


@contextlib.asynccontextmanager
async def stand_in_agent(sock: Path, routes: list[web.RouteDef]) -> AsyncIterator[Path]:
    """Serve ``routes`` on the unix socket ``sock``, as an agent's control socket would."""
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(sock)).start()
    try:
        yield sock
    finally:
        await runner.cleanup()


async def control_request(
    sock: Path, method: str, path: str, body: Any = None, **kw: Any
) -> tuple[int, Any]:
    """One request to an agent's control socket; returns (status, JSON body)."""
    connector = aiohttp.UnixConnector(path=str(sock))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, f"http://agent{path}", json=body, **kw) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


def replikant_exe() -> str:
    """The ``replikant`` console script of the running interpreter's environment."""
    return str(Path(sys.executable).with_name("replikant"))


def run_tool(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing its text output (no exception on failure)."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


async def wait_until(
    predicate: Callable[[], bool], *, within: float = 10.0, interval: float = 0.02
) -> None:
    """Poll ``predicate`` until it is true; raise TimeoutError after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(interval)


# -- real processes ------------------------------------------------------------------------


def broker_config(
    path: Path, pki: Pki, store: Path, port: int, *, mqtt_url: str | None = None
) -> Path:
    """A broker.toml for ``replikant broker run`` with this PKI's broker certificate (on the
    control plane at ``mqtt_url`` when given)."""
    tls = pki.broker.tls
    mqtt = f'\n[mqtt]\nurl = "{mqtt_url}"\ntls = true\n' if mqtt_url else ""
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
{mqtt}"""
    )
    return path


def admin_config(path: Path, pki: Pki, broker_url: str, agent_sockets: list[str]) -> Path:
    """An admin CLI config: one broker, the agents' control sockets, the admin certificate."""
    tls = pki.admin.tls
    agents = ", ".join(f'"{u}"' for u in agent_sockets)
    path.write_text(
        f'[admin]\nbrokers = ["{broker_url}"]\nagents = [{agents}]\n'
        f'[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n'
    )
    return path


def agent_process(
    tmp_path: Path, *, pki: Pki, broker_urls: list[str], vms: list[VMSpec], **options: Any
) -> ReplikantProc:
    """``replikant agent run`` (not yet started) for ``vms``, laid out the usual way under
    ``tmp_path``: agent.toml, state/, sock/ (export ``vm-disk`` at ``sock/vm-disk.sock``) and
    agent.log; ``options`` go to :func:`write_agent_config`."""
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        pki=pki,
        broker_urls=broker_urls,
        vms=vms,
        state_dir=tmp_path / "state",
        socket_dir=tmp_path / "sock",
        **options,
    )
    return ReplikantProc(["agent", "run", "--config", str(cfg)], tmp_path / "agent.log")


def stop_daemon(proc: subprocess.Popen[bytes], log: Path, within: float = 30.0) -> int:
    """SIGTERM a replikant daemon and wait for its exit status.

    One that has not exited ``within`` seconds is made to write its threads' stacks to its log
    (SIGUSR1, see common/stacks.py), killed, and reported with the end of that log: a hang in a
    stop fails the test that saw it, with the place it hung, and leaves no process behind.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(within)
        except subprocess.TimeoutExpired:
            tail = stacks_and_kill(proc, log)
            raise AssertionError(
                f"{' '.join(map(str, proc.args))} did not stop within {within:.0f} s of SIGTERM; "
                f"the end of {log}:\n{tail}"
            ) from None
    return proc.returncode


def stacks_and_kill(proc: subprocess.Popen[bytes], log: Path) -> str:
    """Make a stuck replikant daemon write its threads' stacks to its log (SIGUSR1, see
    common/stacks.py), kill it, and return the end of that log for the test's failure."""
    proc.send_signal(signal.SIGUSR1)
    time.sleep(1)
    proc.kill()
    proc.wait()
    return "\n".join(log.read_text(errors="replace").splitlines()[-80:])


class ReplikantProc:
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
        """SIGKILL and reap (nothing when it is not running)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int:
        """SIGTERM and wait."""
        assert self.proc is not None
        return stop_daemon(self.proc, self.log)

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


def same_file(a: Path, b: Path) -> bool:
    """Both files exist with the same bytes."""
    return a.exists() and a.read_bytes() == b.read_bytes()


async def wait_for(predicate: Callable[[], bool], what: str, within: float = 30.0) -> None:
    """Poll a blocking ``predicate`` (in a thread) until true; AssertionError naming ``what``."""
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def export_ready(sock: Path, export: str) -> bool:
    """The agent serves ``export`` on ``sock``."""
    try:
        MiniNBD(sock, export, timeout=2).close()
    except (OSError, NBDClientError):
        return False
    return True


def log_events(
    log: Path, name: str, start: int = 0, end: int | None = None
) -> list[dict[str, Any]]:
    """The JSON events called ``name`` in bytes ``start:end`` of a daemon's log."""
    with log.open("rb") as fh:
        fh.seek(start)
        raw = fh.read() if end is None else fh.read(end - start)
    out = []
    for line in raw.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("event") == name:
            out.append(doc)
    return out
