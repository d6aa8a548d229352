"""The broker's HTTPS port lets in only TLS 1.3 peers with a valid certificate of our CA.

Each attempt tries to create a replica (a ``PUT`` that a good agent certificate would turn into
a new directory and image) and records what the client saw, the server's
``tls_handshake_rejected`` reason, and that the store did not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import warnings
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import pytest
from structlog.testing import capture_logs

from common.config import TLSFiles
from common.tls import client_context
from tests.security.broker_doors import (
    BrokerWorld,
    enable_body,
    expired,
    https,
    new_replica_url,
    snapshot,
    world,
)
from tests.security.rows import Door

__all__ = ["expired", "world"]

SURFACE = "broker HTTPS"
EVENT = "tls_handshake_rejected"


@contextlib.contextmanager
def server_log() -> Iterator[list[MutableMapping[str, Any]]]:
    """The broker's log events while the block runs."""
    with capture_logs() as logs:
        yield logs


async def rejection(logs: list[MutableMapping[str, Any]]) -> str:
    """The reason of the server's ``tls_handshake_rejected`` event, or ``"none logged"``."""
    for _ in range(250):
        found = [e for e in logs if e["event"] == EVENT]
        if found:
            return str(found[0]["reason"])
        # The server logs from its own task after the client gave up: poll briefly.
        await asyncio.sleep(0.02)
    return "none logged"


def capped(tls: TLSFiles, version: ssl.TLSVersion) -> ssl.SSLContext:
    """Our client context (valid certificate) that offers nothing above ``version``."""
    ctx = client_context(tls)
    with warnings.catch_warnings():
        # Python deprecates TLS 1.1; offering it is the point of the attempt.
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = version
    # OpenSSL 3 refuses to offer TLS 1.1 at its default security level: lower it so the
    # ClientHello really goes out and it is the broker that refuses.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def no_certificate(world: BrokerWorld) -> ssl.SSLContext:
    """A client that trusts our CA but presents no certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(world.pki.broker.ca))
    return ctx


CLIENTS: dict[str, tuple[Callable[[BrokerWorld], ssl.SSLContext], str]] = {
    "no client certificate": (no_certificate, "no_client_certificate"),
    "a certificate of another CA (agent h1)": (
        lambda w: client_context(
            TLSFiles(ca=w.pki.broker.ca, cert=w.pki.foreign_agent.cert, key=w.pki.foreign_agent.key)
        ),
        "unknown_ca",
    ),
    "an expired agent certificate of our CA": (
        lambda w: client_context(w.expired),
        "certificate_expired",
    ),
    "a valid certificate, client capped at TLS 1.2": (
        lambda w: capped(w.pki.agents["h1"], ssl.TLSVersion.TLSv1_2),
        "protocol_version",
    ),
    "a valid certificate, client capped at TLS 1.1": (
        lambda w: capped(w.pki.agents["h1"], ssl.TLSVersion.TLSv1_1),
        "protocol_version",
    ),
}


@pytest.mark.parametrize("client", list(CLIENTS))
async def test_bad_handshakes_reach_nothing(world: BrokerWorld, door: Door, client: str) -> None:
    """A client without a certificate, with another CA's or an expired one, or capped below
    TLS 1.3 never gets an HTTP answer, and its PUT creates nothing."""
    make, want = CLIENTS[client]
    ctx = make(world)
    before = snapshot(world.svc.store.root)
    with server_log() as logs:
        status, seen = await https(ctx, "PUT", new_replica_url(world), json_body=enable_body())
        reason = await rejection(logs)
    damage = world.damage(before)
    door.attempt(
        SURFACE,
        f"PUT a new replica with {client}",
        expected=f"handshake refused ({want}), no HTTP answer, store unchanged",
        observed=f"{seen}; server: {EVENT} reason={reason}; {world.store_text(before)}",
        refused=status is None and reason != "none logged" and not damage,
    )
    assert reason == want, f"refused, but for another reason than {want}"


@pytest.mark.parametrize("version", ["tls1_2", "tls1_1"])
async def test_openssl_s_client_below_tls13_is_refused(
    world: BrokerWorld, door: Door, version: str
) -> None:
    """``openssl s_client`` limited to TLS 1.2 or 1.1, with a valid agent certificate, fails
    its handshake: HTTPS stays TLS 1.3 only."""
    tls = world.pki.agents["h1"]
    port = world.url.rsplit(":", 1)[1]
    before = snapshot(world.svc.store.root)
    with server_log() as logs:
        proc = await asyncio.create_subprocess_exec(
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            f"-{version}",
            # Let OpenSSL 3 offer TLS 1.1 at all, so the broker is what refuses it.
            "-cipher",
            "DEFAULT:@SECLEVEL=0",
            "-cert",
            str(tls.cert),
            "-key",
            str(tls.key),
            "-CAfile",
            str(tls.ca),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        reason = await rejection(logs)
    text = (out + err).decode(errors="replace")
    errors = [line.split(":")[5] for line in text.splitlines() if ":error:" in line]
    cipher = next((line for line in text.splitlines() if "Cipher is" in line), "no cipher line")
    door.attempt(
        SURFACE,
        f"openssl s_client -{version} with a valid agent certificate",
        expected="handshake fails, no cipher negotiated (protocol_version)",
        observed=f"exit {proc.returncode}, {', '.join(errors) or 'no error line'}, {cipher}; "
        f"server: {EVENT} reason={reason}; {world.store_text(before)}",
        refused=proc.returncode != 0
        and "Cipher is (NONE)" in cipher
        and reason == "protocol_version"
        and not world.damage(before),
    )


async def test_plain_http_to_the_tls_port(world: BrokerWorld, door: Door) -> None:
    """A plain-HTTP PUT sent to the HTTPS port gets no HTTP answer and creates nothing."""
    before = snapshot(world.svc.store.root)
    host, port = world.url.removeprefix("https://").rsplit(":", 1)
    body = b'{"vm_name": "plain", "disk_size": 1048576, "block_size": 65536}'
    path = new_replica_url(world).removeprefix(world.url)
    with server_log() as logs:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        try:
            async with asyncio.timeout(10):
                answer = await reader.read(200)
        except ConnectionError as exc:
            answer = f"<{type(exc).__name__}>".encode()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        reason = await rejection(logs)
    door.attempt(
        SURFACE,
        "plain HTTP PUT of a new replica to the TLS port",
        expected="connection closed without an HTTP answer (not_tls)",
        observed=f"answer {answer[:40]!r}; server: {EVENT} reason={reason}; "
        f"{world.store_text(before)}",
        refused=not answer.startswith(b"HTTP") and reason == "not_tls" and not world.damage(before),
    )


def _two_connections(port: int, ctx: ssl.SSLContext) -> tuple[bool, bool]:
    """Connect, make a request (a TLS 1.3 server sends its tickets after the handshake), then
    reconnect offering that session; returns (a ticket was issued, the session was resumed)."""
    request = b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(request)
        while tls.recv(65536):
            pass
        session = tls.session
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls,
    ):
        return bool(session is not None and session.has_ticket), bool(tls.session_reused)


async def test_no_session_is_resumed(world: BrokerWorld, door: Door) -> None:
    """The broker issues no session tickets, so every connection verifies the certificate
    afresh: one that expires or is replaced stops working at once."""
    port = int(world.url.rsplit(":", 1)[1])
    ticket, reused = await asyncio.to_thread(
        _two_connections, port, client_context(world.pki.admin)
    )
    door.attempt(
        SURFACE,
        "reconnect resuming an earlier TLS session (skipping the certificate check)",
        expected="no session ticket issued, a full handshake",
        observed=f"ticket issued: {ticket}, session resumed: {reused}",
        refused=not reused,
    )
    assert not ticket
