"""Our mutual-TLS servers refuse every bad peer with one `tls_handshake_rejected` event that says
which side refused what, and let good peers through with their identity."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import uvloop
from aiohttp import web
from structlog.testing import capture_logs

from certs.records import IssuedCert
from certs.store import CertStore
from common.tls import (
    Identity,
    MutualTLSSite,
    TLSError,
    TLSHandshakeError,
    TLSIdentityError,
    accept_tls,
    client_context,
    describe_tls_error,
    peer_identity,
    require_role,
    server_context,
    start_tls_server,
)
from tests.fixtures_pki import Pki, make_pki
from tests.tls_support import accept_tls_stream, require_role_middleware

EVENT = "tls_handshake_rejected"
Run = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Run a test's scenario on the standard event loop and on uvloop (what services use)."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def runner(scenario: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=factory) as loop:
            loop.run(scenario)

    return runner


@dataclass(frozen=True)
class World:
    """Our PKI, a second CA's agent certificate and an expired broker certificate."""

    pki: Pki
    broker2: IssuedCert
    foreign_agent: IssuedCert
    expired: IssuedCert


@pytest.fixture
def world(tmp_path: Path) -> World:
    pki = make_pki(tmp_path / "pki")
    now = dt.datetime.now(dt.UTC)
    return World(
        pki=pki,
        broker2=pki.store.issue_broker("c1", "b2"),
        foreign_agent=CertStore.init(tmp_path / "other").issue_agent("h1"),
        expired=pki.store.issue_broker(
            "c1", "b3", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
        ),
    )


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as captured:
        yield captured


def rejections(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == EVENT]


async def wait_for_rejection(logs: list[dict[str, Any]]) -> dict[str, Any]:
    """The single rejection event, once the server task has logged it."""
    async with asyncio.timeout(5):
        # Polling: structlog's capture list cannot notify anyone.
        while not rejections(logs):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # a second event would show up now
    (event,) = rejections(logs)
    return event


def no_cert_context(ca: Path) -> ssl.SSLContext:
    """A TLS 1.3 client that trusts our CA but presents no certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca))
    return ctx


async def exchange(port: int, ctx: ssl.SSLContext, host: str = "localhost") -> bytes:
    """Connect, read what the server says (b"" when it hangs up on us), close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=host)
    try:
        async with asyncio.timeout(5):
            return await reader.read(200)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def broker_only_server(world: World, seen: list[Identity]) -> AsyncIterator[int]:
    """A stream server that only brokers may use (like broker-to-broker traffic)."""

    async def greet(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity
    ) -> None:
        seen.append(identity)
        writer.write(f"hello {identity}\n".encode())
        await writer.drain()

    server = await start_tls_server(
        greet,
        "127.0.0.1",
        0,
        server_context(world.pki.broker.tls),
        allowed_roles=["broker"],
        handshake_timeout=2.0,
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def test_a_broker_peer_gets_through_with_its_identity(
    world: World, logs: list[dict[str, Any]], run: Run
) -> None:
    """A broker certificate from our CA completes the handshake; the handler sees its identity."""

    async def scenario() -> None:
        seen: list[Identity] = []
        async with broker_only_server(world, seen) as port:
            reply = await exchange(port, client_context(world.broker2.tls))
        assert reply == b"hello replikant://broker/c1/b2\n"
        assert seen == [Identity.broker("c1", "b2")]
        assert rejections(logs) == []

    run(scenario())


@pytest.mark.parametrize(
    ("client", "reason", "words"),
    [
        ("no_cert", "no_client_certificate", "presented no certificate"),
        ("foreign_ca", "unknown_ca", "signed by a CA we do not trust"),
        ("expired", "certificate_expired", "it has expired"),
        ("agent", "wrong_role", "replikant://agent/h1 has role agent, but only broker peers"),
    ],
)
def test_bad_clients_are_refused_with_a_distinct_reason(
    world: World, logs: list[dict[str, Any]], client: str, reason: str, words: str, run: Run
) -> None:
    """No certificate, another CA, an expired certificate and an agent where a broker is
    required are each refused, logged once as tls_handshake_rejected with their own reason."""

    async def scenario() -> None:
        contexts = {
            "no_cert": lambda: no_cert_context(world.pki.ca),
            "foreign_ca": lambda: client_context(
                (world.pki.ca, world.foreign_agent.cert_path, world.foreign_agent.key_path)
            ),
            "expired": lambda: client_context(world.expired.tls),
            "agent": lambda: client_context(world.pki.agent.tls),
        }
        seen: list[Identity] = []
        async with broker_only_server(world, seen) as port:
            reply = await exchange(port, contexts[client]())
            event = await wait_for_rejection(logs)

        assert reply == b""
        assert seen == []
        assert event["reason"] == reason
        assert event["side"] == "server"
        assert event["rejected_by"] == "us"
        assert event["peer"].startswith("127.0.0.1:")
        assert words in event["detail"]
        assert event["fix"]
        assert event["log_level"] == "warning"

    run(scenario())


def test_a_silent_client_times_out(world: World, logs: list[dict[str, Any]], run: Run) -> None:
    """A peer that connects and never starts TLS is dropped after the handshake timeout."""

    async def scenario() -> None:
        server = await start_tls_server(
            _never_called,
            "127.0.0.1",
            0,
            server_context(world.pki.broker.tls),
            handshake_timeout=0.2,
        )
        try:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            event = await wait_for_rejection(logs)
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()
        assert event["reason"] == "handshake_timeout"

    run(scenario())


def test_tls_1_2_clients_are_refused(world: World, logs: list[dict[str, Any]], run: Run) -> None:
    """A client limited to TLS 1.2 is refused as protocol_version: we only speak TLS 1.3."""

    async def scenario() -> None:
        ctx = client_context(world.pki.agent.tls)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        server = await start_tls_server(
            _never_called, "127.0.0.1", 0, server_context(world.pki.broker.tls)
        )
        try:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
                )
            event = await wait_for_rejection(logs)
        finally:
            server.close()
            await server.wait_closed()
        assert event["reason"] == "protocol_version"

    run(scenario())


async def _never_called(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity
) -> None:
    raise AssertionError(f"handler reached by {identity}")


def test_starttls_upgrade_of_a_plain_stream(world: World, run: Run) -> None:
    """A plain-text stream upgraded with accept_tls_stream (NBD's STARTTLS) yields the peer."""

    async def scenario() -> None:
        identities: list[Identity] = []

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert await reader.readline() == b"STARTTLS\n"
            writer.write(b"GO\n")
            identities.append(await accept_tls_stream(writer, server_context(world.pki.agent.tls)))
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        try:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"STARTTLS\n")
            assert await reader.readline() == b"GO\n"
            await writer.start_tls(client_context(world.pki.broker.tls), server_hostname="h1")
            writer.write(b"ping\n")
            async with asyncio.timeout(5):
                assert await reader.readline() == b"ping\n"
            assert peer_identity(writer) == Identity.agent("h1")
            writer.close()
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.wait_closed()
        finally:
            server.close()
            await server.wait_closed()
        assert identities == [Identity.broker("c1", "b1")]

    run(scenario())


class _StartTLSProtocol(asyncio.Protocol):
    """A protocol-based server with a STARTTLS step, the way the NBD server is built."""

    def __init__(self, ctx: ssl.SSLContext, tasks: set[asyncio.Task[None]]) -> None:
        self.ctx = ctx
        self.tasks = tasks
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not isinstance: uvloop's transports do not derive from asyncio's classes.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if data == b"STARTTLS\n":
            self.transport.write(b"GO\n")
            self.transport.pause_reading()
            task = asyncio.get_running_loop().create_task(self.upgrade(self.transport))
            self.tasks.add(task)

    async def upgrade(self, transport: asyncio.Transport) -> None:
        try:
            tls, identity = await accept_tls(transport, self, self.ctx, allowed_roles=["broker"])
        except TLSHandshakeError:
            return
        self.transport = tls
        tls.write(f"hello {identity}\n".encode())
        tls.close()


def test_protocol_starttls_with_accept_tls(
    world: World, logs: list[dict[str, Any]], run: Run
) -> None:
    """accept_tls upgrades a protocol's transport after STARTTLS, checks the role, and logs a
    refused peer like every other endpoint."""

    async def scenario() -> None:
        tasks: set[asyncio.Task[None]] = set()
        ctx = server_context(world.pki.agent.tls)
        server = await asyncio.get_running_loop().create_server(
            lambda: _StartTLSProtocol(ctx, tasks), "127.0.0.1", 0
        )
        replies = []
        try:
            port = server.sockets[0].getsockname()[1]
            for client in (world.pki.broker, world.pki.admin):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"STARTTLS\n")
                assert await reader.readline() == b"GO\n"
                await writer.start_tls(client_context(client.tls), server_hostname="h1")
                async with asyncio.timeout(5):
                    replies.append(await reader.read())
                writer.close()
                with contextlib.suppress(ssl.SSLError, ConnectionError):
                    await writer.wait_closed()
            await asyncio.gather(*tasks)
        finally:
            server.close()
            await server.wait_closed()
        assert replies == [b"hello replikant://broker/c1/b1\n", b""]
        assert [e["reason"] for e in rejections(logs)] == ["wrong_role"]

    run(scenario())


# -- the client's side


def test_client_refusing_a_foreign_server_explains_why(
    world: World, tmp_path: Path, run: Run
) -> None:
    """A client facing a server from another CA gets unknown_ca; a wrong name hostname_mismatch."""

    async def scenario() -> None:
        foreign = CertStore.init(tmp_path / "foreign").issue_broker("c1", "b1", dns=["localhost"])
        server = await start_tls_server(_never_called, "127.0.0.1", 0, server_context(foreign.tls))
        good = await start_tls_server(
            _never_called, "127.0.0.1", 0, server_context(world.pki.broker.tls)
        )
        ctx = client_context(world.pki.agent.tls)
        try:
            outcomes = []
            for srv, host in ((server, "localhost"), (good, "b9.elsewhere")):
                port = srv.sockets[0].getsockname()[1]
                with pytest.raises(ssl.SSLCertVerificationError) as caught:
                    await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=host)
                outcomes.append(describe_tls_error(caught.value, side="client", peer=host))
        finally:
            for srv in (server, good):
                srv.close()
                await srv.wait_closed()
        assert [(o.reason, o.side, o.rejected_by) for o in outcomes] == [
            ("unknown_ca", "client", "us"),
            ("hostname_mismatch", "client", "us"),
        ]
        assert "b9.elsewhere" in outcomes[1].detail

    run(scenario())


# -- aiohttp


@contextlib.asynccontextmanager
async def ingest_site(world: World) -> AsyncIterator[int]:
    """An HTTPS endpoint like the broker's batch ingest: agents and brokers only."""

    async def ingest(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"peer": peer_identity(request).uri, "bytes": len(body)})

    app = web.Application(middlewares=[require_role_middleware(["agent", "broker"])])
    app.router.add_post("/batches", ingest)
    runner = web.AppRunner(app)
    await runner.setup()
    site = MutualTLSSite(runner, "127.0.0.1", 0, server_context(world.pki.broker.tls))
    await site.start()
    try:
        yield site.port
    finally:
        await runner.cleanup()


async def post(port: int, ctx: ssl.SSLContext, body: bytes) -> tuple[int, dict[str, Any]]:
    connector = aiohttp.TCPConnector(ssl=ctx)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(f"https://localhost:{port}/batches", data=body) as response,
    ):
        return response.status, json.loads(await response.text())


def test_aiohttp_site_serves_agents_with_their_identity(
    world: World, logs: list[dict[str, Any]], run: Run
) -> None:
    """An agent's requests (keep-alive, 1 MiB body) reach the handler, which sees its identity."""

    async def scenario() -> None:
        async with ingest_site(world) as port:
            replies = [
                await post(port, client_context(world.pki.agent.tls), b"x" * (1 << 20))
                for _ in "ab"
            ]
        assert replies == [(200, {"peer": "replikant://agent/h1", "bytes": 1 << 20})] * 2
        assert rejections(logs) == []

    run(scenario())


def test_aiohttp_site_answers_a_wrong_role_with_403(
    world: World, logs: list[dict[str, Any]], run: Run
) -> None:
    """An admin certificate on the ingest endpoint gets a 403 naming the reason, and one event."""

    async def scenario() -> None:
        async with ingest_site(world) as port:
            status, body = await post(port, client_context(world.pki.admin.tls), b"x")
        event = await wait_for_rejection(logs)
        assert status == 403
        assert body["error"] == "wrong_role"
        assert "replikant://admin/alice has role admin" in body["detail"]
        assert event["reason"] == "wrong_role"
        assert event["identity"] == "replikant://admin/alice"

    run(scenario())


def test_aiohttp_site_logs_handshake_rejections(
    world: World, logs: list[dict[str, Any]], run: Run
) -> None:
    """A client without a certificate is refused at the handshake and the site logs it (a plain
    aiohttp TCPSite would drop it silently); the client learns the server hung up."""

    async def scenario() -> None:
        async with ingest_site(world) as port:
            with pytest.raises(aiohttp.ClientError) as caught:
                await post(port, no_cert_context(world.pki.ca), b"x")
            await asyncio.sleep(0.1)
        reasons = {e["reason"] for e in rejections(logs)}
        assert reasons == {"no_client_certificate"}
        client_view = describe_tls_error(caught.value, side="client")
        assert client_view.reason == "connection_closed"
        assert "tls_handshake_rejected" in client_view.fix

    run(scenario())


def test_aiohttp_site_refuses_plain_http(
    world: World, logs: list[dict[str, Any]], run: Run
) -> None:
    """Plain HTTP sent to the TLS port is logged as not_tls."""

    async def scenario() -> None:
        async with ingest_site(world) as port:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /batches HTTP/1.1\r\nHost: x\r\n\r\n")
            event = await wait_for_rejection(logs)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        assert event["reason"] == "not_tls"

    run(scenario())


# -- contexts and identities


def test_contexts_are_tls13_only_and_require_certificates(world: World) -> None:
    """Both contexts demand TLS 1.3 and a verified peer; clients also check host names."""
    server = server_context(world.pki.broker.tls)
    client = client_context(world.pki.agent.tls)
    assert server.minimum_version == client.minimum_version == ssl.TLSVersion.TLSv1_3
    assert server.verify_mode == client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname
    # Only our CA is trusted: no system store.
    assert [c["subject"] for c in server.get_ca_certs()] == [
        ((("organizationName", "Replikant"),), (("commonName", "Replikant CA"),))
    ]


def test_contexts_name_missing_or_mismatched_files(world: World) -> None:
    """A missing file or a key from another certificate is refused with the files named."""
    tls = world.pki.agent.tls
    with pytest.raises(TLSError, match="does not exist") as missing:
        server_context((tls.ca, tls.cert, tls.key.with_name("nope.key")))
    assert missing.value.reason == "missing_file"
    with pytest.raises(TLSError, match="cannot be loaded together") as mismatched:
        client_context((tls.ca, tls.cert, world.pki.broker.key_path))
    assert mismatched.value.reason == "bad_file"


def test_require_role_checks_role_and_cluster() -> None:
    """require_role passes allowed roles, and names role or cluster when it refuses."""
    broker = Identity.broker("c1", "b1")
    assert require_role(broker, ["agent", "broker"], cluster="c1") is broker
    with pytest.raises(TLSIdentityError) as wrong_role:
        require_role(Identity.agent("h1"), "broker")
    with pytest.raises(TLSIdentityError) as wrong_cluster:
        require_role(broker, "broker", cluster="c2")
    assert (wrong_role.value.reason, wrong_cluster.value.reason) == ("wrong_role", "wrong_cluster")


def test_handshake_error_carries_the_rejection() -> None:
    """TLSHandshakeError exposes the same reason and fix as the logged event."""
    rejection = describe_tls_error(TimeoutError(), side="server", peer="127.0.0.1:1")
    error = TLSHandshakeError(rejection)
    assert (error.reason, error.fix) == ("handshake_timeout", rejection.fix)
    assert rejection.fields()["peer"] == "127.0.0.1:1"
