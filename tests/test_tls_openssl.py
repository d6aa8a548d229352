"""Interoperability with the real `openssl` binary: our certificates complete mutual TLS 1.3 with
`s_server -Verify 1 -verify_return_error` and `s_client -verify_return_error`, in both
directions, and our own server and client interoperate with OpenSSL's."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from certs.records import IssuedCert
from common.tls import Identity, client_context, server_context, start_tls_server
from tests.fixtures_pki import Pki, make_pki

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl binary")
TIMEOUT = 10.0


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A fresh CA with broker c1/b1, agent h1 and admin alice."""
    return make_pki(tmp_path / "pki")


@dataclass
class Finished:
    returncode: int
    output: str


async def run_client(args: list[str], stdin: bytes) -> Finished:
    """Run `openssl s_client ARGS`, feed ``stdin`` (its EOF ends the session), collect output."""
    proc = await asyncio.create_subprocess_exec(
        OPENSSL or "openssl",
        "s_client",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            out, _ = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return Finished(proc.returncode or 0, out.decode(errors="replace"))


@contextlib.asynccontextmanager
async def s_server(cert: IssuedCert) -> AsyncIterator[tuple[int, asyncio.subprocess.Process]]:
    """`openssl s_server` on an ephemeral 127.0.0.1 port, demanding a verified client certificate.

    Its stdin stays open: s_server quits when stdin reaches EOF.
    """
    proc = await asyncio.create_subprocess_exec(
        OPENSSL or "openssl",
        "s_server",
        "-accept",
        "127.0.0.1:0",
        "-naccept",
        "1",
        "-tls1_3",
        "-Verify",
        "1",
        "-verify_return_error",
        "-CAfile",
        str(cert.ca_path),
        "-cert",
        str(cert.cert_path),
        "-key",
        str(cert.key_path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(TIMEOUT):
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, "s_server exited before listening"
                if line.startswith("ACCEPT "):
                    break
        yield int(line.rsplit(":", 1)[1]), proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def server_output(proc: asyncio.subprocess.Process) -> str:
    """What s_server printed after ACCEPT, once its one connection is over."""
    assert proc.stdout is not None
    async with asyncio.timeout(TIMEOUT):
        out = await proc.stdout.read()
        await proc.wait()
    return out.decode(errors="replace")


def client_args(port: int, cert: IssuedCert) -> list[str]:
    return [
        "-connect",
        f"127.0.0.1:{port}",
        "-tls1_3",
        "-verify_return_error",
        "-verify_ip",
        "127.0.0.1",
        "-CAfile",
        str(cert.ca_path),
        "-cert",
        str(cert.cert_path),
        "-key",
        str(cert.key_path),
    ]


@pytest.mark.parametrize(("server_role", "client_role"), [("broker", "agent"), ("agent", "broker")])
async def test_openssl_mutual_tls_handshake(pki: Pki, server_role: str, client_role: str) -> None:
    """s_server (broker, or agent serving NBD) and s_client (the other) verify each other."""
    server_cert = pki.broker if server_role == "broker" else pki.agent
    client_cert = pki.agent if client_role == "agent" else pki.broker
    async with s_server(server_cert) as (port, proc):
        client = await run_client(client_args(port, client_cert), b"hello from the client\n")
        served = await server_output(proc)

    assert client.returncode == 0, client.output
    assert "Verification: OK" in client.output
    assert "Verify return code: 0 (ok)" in client.output
    assert "New, TLSv1.3" in client.output
    assert f"OU = {server_role}" in client.output
    assert "Client certificate" in served
    assert f"subject=O = Replikant, OU = {client_role}" in served
    assert "hello from the client" in served


async def test_openssl_client_refuses_an_admin_certificate_as_server(pki: Pki) -> None:
    """An admin certificate (clientAuth only) cannot serve: s_client rejects its purpose."""
    async with s_server(pki.admin) as (port, _):
        client = await run_client(client_args(port, pki.agent), b"")
    assert client.returncode != 0
    # 26 is X509_V_ERR_INVALID_PURPOSE ("unsuitable certificate purpose" in OpenSSL 3).
    assert "Verify return code: 26 " in client.output


async def test_our_server_accepts_openssl_s_client(pki: Pki) -> None:
    """start_tls_server + server_context accept OpenSSL's client and read its identity."""

    async def greet(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity
    ) -> None:
        writer.write(f"you are {identity}\n".encode())
        await writer.drain()

    server = await start_tls_server(greet, "127.0.0.1", 0, server_context(pki.broker.tls))
    try:
        port = server.sockets[0].getsockname()[1]
        # -ign_eof: keep reading after stdin's EOF until the server hangs up.
        client = await run_client([*client_args(port, pki.agent), "-ign_eof"], b"")
    finally:
        server.close()
        await server.wait_closed()
    assert client.returncode == 0, client.output
    assert "you are replikant://agent/h1" in client.output


async def test_our_client_connects_to_openssl_s_server(pki: Pki) -> None:
    """client_context presents the agent certificate to s_server and verifies the broker's."""
    async with s_server(pki.broker) as (port, proc):
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(pki.agent.tls), server_hostname="b1.c1"
        )
        ssl_object = writer.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject)
        assert ssl_object.version() == "TLSv1.3"
        writer.write(b"hello from python\n")
        await writer.drain()
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()
        served = await server_output(proc)
    assert "subject=O = Replikant, OU = agent, CN = h1" in served
    assert "hello from python" in served
