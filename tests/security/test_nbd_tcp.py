"""The agent's NBD TCP listener (``nbd.tcp_listen``): STARTTLS first, then a certificate of our
CA over TLS, or no export, no name and no byte of the disk.

The agent runs as a real process (``replikant agent run``) serving one VM's disk with
``nbd.tcp_clients`` naming one admin identity; that certificate reads the disk through the
listener first, so each refusal is of a listener that works. A certificate of our CA that is not
listed (a broker's, the agent's own) is refused too: the CA signs more than disk readers.
TLS 1.2 is not attempted here: the NBD spec requires it, so whether NBD accepts it
is the NBD layer's decision; TLS 1.1 and below must never get in.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
import struct
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.nbd.client import NBDClient, NBDClientError
from common.nbd.constants import IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC, ClientFlag, Opt, Rep
from common.tls import client_context
from tests.fixtures_pki import Pki, issue_expired, make_pki
from tests.security.rows import Door
from tests.support_agent import (
    DiskSpec,
    ReplikantProc,
    VMSpec,
    free_port,
    make_image,
    write_agent_config,
)

pytestmark = pytest.mark.timeout(60)

SURFACE = "agent NBD TCP"
EXPORT = "web1-disk0"
SIZE = 4 * 1024 * 1024
EVENT = "tls_handshake_rejected"


@dataclass
class Agent:
    """The running agent, its listener's port, its PKI and the disk it serves."""

    proc: ReplikantProc
    port: int
    pki: Pki
    foreign: Pki
    image: Path

    def rejections(self) -> list[str]:
        """The reasons of every ``tls_handshake_rejected`` the agent logged so far."""
        return [str(e.get("reason")) for e in self.proc.events(EVENT)]

    async def new_rejection(self, seen: int) -> str:
        """The reason of the first rejection after the ``seen`` earlier ones."""
        for _ in range(200):
            reasons = self.rejections()
            if len(reasons) > seen:
                return reasons[seen]
            # The agent logs to its file from its own process: poll it.
            await asyncio.sleep(0.025)
        return "none logged"

    def digest(self) -> str:
        """sha256 of the served image."""
        return hashlib.sha256(self.image.read_bytes()).hexdigest()


def _greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return len(s.recv(18)) == 18
    except OSError:
        return False


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """``replikant agent run`` serving one disk on a loopback ``nbd.tcp_listen`` port."""
    tmp = tmp_path_factory.mktemp("nbd-tcp")
    pki = make_pki(tmp / "pki")
    foreign = make_pki(tmp / "other-pki")
    image = make_image(tmp / "disk0.img", SIZE, fill=lambda i: bytes([i + 1]) * 1024 * 1024)
    port = free_port()
    cfg = write_agent_config(
        tmp / "agent.toml",
        pki=pki,
        # Nothing listens there: this test needs the agent's exports, not its shipping.
        broker_urls=[f"https://127.0.0.1:{free_port()}"],
        vms=[VMSpec("web1", [DiskSpec("disk0", image)])],
        state_dir=tmp / "state",
        socket_dir=tmp / "s",
        tcp_listen=f"127.0.0.1:{port}",
        tcp_clients=[pki.admin.identity.uri],
    )
    proc = ReplikantProc(["agent", "run", "--config", str(cfg)], tmp / "agent.log")
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while not _greets(port):
            assert proc.proc is not None
            assert proc.proc.poll() is None, proc.log.read_text()
            assert time.monotonic() < deadline, "the agent's NBD TCP listener never came up"
            time.sleep(0.05)
        yield Agent(proc, port, pki, foreign, image)
    finally:
        proc.stop()


@contextlib.asynccontextmanager
async def plain(agent: Agent) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A TCP connection past the NBD greeting, fixed newstyle, no TLS."""
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
    try:
        magic, opt_magic, _flags = struct.unpack(">QQH", await reader.readexactly(18))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        writer.write(struct.pack(">I", ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES))
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def option(opt: int, data: bytes = b"") -> bytes:
    """One client option request."""
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go_payload(name: str) -> bytes:
    """The payload of ``NBD_OPT_GO`` / ``NBD_OPT_INFO`` for export ``name``, no info requests."""
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)


async def reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One option reply: its type and payload."""
    magic, _opt, rep, length = struct.unpack(">QIII", await reader.readexactly(20))
    assert magic == OPTION_REPLY_MAGIC
    return rep, await reader.readexactly(length)


def rep_name(rep: int) -> str:
    """``ERR_TLS_REQD (0x80000005)`` for a reply type."""
    try:
        return f"{Rep(rep).name} ({rep:#x})"
    except ValueError:
        return f"{rep:#x}"


async def test_the_listener_serves_a_valid_certificate(agent: Agent) -> None:
    """The control: the listed admin certificate gets through STARTTLS and reads the disk."""
    tls = client_context(agent.pki.admin.tls)
    async with await NBDClient.open_tcp("127.0.0.1", agent.port, EXPORT, tls=tls) as client:
        assert client.info.size == SIZE
        assert await client.read(SIZE - 4096, 4096) == bytes([SIZE // (1024 * 1024)]) * 4096


@pytest.mark.parametrize(
    ("what", "opt", "payload"),
    [
        (f"NBD_OPT_GO {EXPORT}", Opt.GO, go_payload(EXPORT)),
        (f"NBD_OPT_INFO {EXPORT}", Opt.INFO, go_payload(EXPORT)),
        ("NBD_OPT_LIST (the export names)", Opt.LIST, b""),
    ],
)
async def test_options_without_starttls(
    agent: Agent, door: Door, what: str, opt: int, payload: bytes
) -> None:
    """Every option but STARTTLS sent in the clear is answered ERR_TLS_REQD, with no data."""
    async with plain(agent) as (reader, writer):
        writer.write(option(opt, payload))
        rep, data = await reply(reader)
    door.attempt(
        SURFACE,
        f"{what} without STARTTLS",
        expected="NBD_REP_ERR_TLS_REQD, no export data",
        observed=f"{rep_name(rep)} with {len(data)} bytes: {data[:60]!r}",
        refused=rep == Rep.ERR_TLS_REQD and EXPORT.encode() not in data,
    )


async def test_export_name_without_starttls(agent: Agent, door: Door) -> None:
    """NBD_OPT_EXPORT_NAME (which has no error reply) in the clear ends the connection."""
    async with plain(agent) as (reader, writer):
        writer.write(option(Opt.EXPORT_NAME, EXPORT.encode()))
        try:
            async with asyncio.timeout(10):
                got = await reader.read()
        except ConnectionError as exc:
            got = f"<{type(exc).__name__}>".encode()
    door.attempt(
        SURFACE,
        f"NBD_OPT_EXPORT_NAME {EXPORT} without STARTTLS",
        expected="connection closed, no export size or data",
        observed=f"server sent {len(got)} bytes ({got[:20]!r}) and closed",
        refused=len(got) < 10 and not got.startswith(struct.pack(">Q", SIZE)),
    )


def _no_certificate(agent: Agent) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(agent.pki.ca))
    return ctx


def _foreign(agent: Agent) -> ssl.SSLContext:
    other = agent.foreign.broker
    return client_context((agent.pki.ca, other.cert_path, other.key_path))


def _expired(agent: Agent) -> ssl.SSLContext:
    return client_context(issue_expired(agent.pki.store).tls)


def _tls11(agent: Agent) -> ssl.SSLContext:
    ctx = client_context(agent.pki.broker.tls)
    with warnings.catch_warnings():
        # Python deprecates TLS 1.0/1.1; offering them is the point of the attempt.
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    # OpenSSL 3 will not offer TLS 1.1 at its default security level; lower it so the
    # ClientHello goes out and the agent is what refuses it.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def _broker(agent: Agent) -> ssl.SSLContext:
    return client_context(agent.pki.broker.tls)


def _own_agent(agent: Agent) -> ssl.SSLContext:
    return client_context(agent.pki.agent.tls)


CLIENTS = {
    "no client certificate": (_no_certificate, "no_client_certificate"),
    "a valid broker certificate of our CA, not in nbd.tcp_clients": (_broker, "not_listed"),
    "the agent's own certificate, not in nbd.tcp_clients": (_own_agent, "not_listed"),
    "a broker certificate of another CA": (_foreign, "unknown_ca"),
    "an expired agent certificate of our CA": (_expired, "certificate_expired"),
    "a valid broker certificate, client capped at TLS 1.1": (_tls11, "protocol_version"),
}


@pytest.mark.parametrize("client", list(CLIENTS))
async def test_starttls_with_a_bad_client(agent: Agent, door: Door, client: str) -> None:
    """After STARTTLS, a client without a certificate, with another CA's, an expired one, one
    of our CA that nbd.tcp_clients does not list, or limited to TLS 1.1 never negotiates the
    export nor reads a byte of it."""
    make, want = CLIENTS[client]
    seen = len(agent.rejections())
    before = agent.digest()
    try:
        async with asyncio.timeout(20):
            nbd = await NBDClient.open_tcp("127.0.0.1", agent.port, EXPORT, tls=make(agent))
        async with nbd:
            data = await nbd.read(0, 4096)
        outcome = f"export opened, read {len(data)} bytes"
        got_in = True
    except (OSError, EOFError, ssl.SSLError, NBDClientError) as exc:
        outcome = f"{type(exc).__name__}: {str(exc)[:100]}"
        got_in = False
    reason = await agent.new_rejection(seen)
    door.attempt(
        SURFACE,
        f"STARTTLS then NBD_OPT_GO {EXPORT} with {client}",
        expected=f"TLS refused ({want}), no export, image unchanged",
        observed=f"client: {outcome}; agent: {EVENT} reason={reason}; image "
        f"{'unchanged' if agent.digest() == before else 'CHANGED'}",
        refused=not got_in and reason != "none logged" and agent.digest() == before,
    )
    assert reason == want, f"refused, but for another reason than {want}"
