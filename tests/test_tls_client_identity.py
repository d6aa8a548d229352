"""The client side of mutual TLS, against real servers: clients check the server's identity
(role, and cluster for brokers), and say why TLS failed instead of "ServerDisconnectedError"."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from agents.errors import FencedError, ShipError
from agents.ship import BrokerClient, ReplicaState
from broker.errors import BadRequest
from certs.check import check_identity
from certs.store import CertStore
from common.config import TLSFiles
from common.tls import MutualTLSSite, client_context, server_context
from ops.verify import _repair_line
from tests.fixtures_pki import Pki, make_pki
from tests.support_agent import stand_in_agent
from tests.support_broker import admin_cli


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


Reply = Callable[[web.Request], web.Response]


def _json_reply(_: web.Request) -> web.Response:
    return web.json_response({"vms": [], "broker": None, "durable_seq": 0})


@asynccontextmanager
async def https_server(
    tls: TLSFiles | None, reply: Reply = _json_reply
) -> AsyncIterator[list[str]]:
    """A real aiohttp server on 127.0.0.1, mutual TLS (plain HTTP when ``tls`` is None); yields
    ``[url, *paths it served]``."""
    served: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        served.append(request.path)
        await request.read()
        return reply(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    if tls is None:
        site: web.BaseSite = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    else:
        tls_site = MutualTLSSite(runner, "127.0.0.1", 0, server_context(tls))
        await tls_site.start()
        url = f"https://127.0.0.1:{tls_site.port}"
    try:
        served.append(url)
        yield served
    finally:
        await runner.cleanup()


async def broker_state(url: str, tls: TLSFiles, cluster: str) -> ReplicaState:
    """``GET`` a replica's state with the agent's broker client."""
    client = BrokerClient([url], client_context(tls), cluster=cluster)
    try:
        return await client.state(uuid.uuid4(), "disk0")
    finally:
        await client.close()


def admin_config(path: Path, url: str, tls: TLSFiles, *, ca: Path | None = None) -> Path:
    path.write_text(
        f'[admin]\nbrokers = ["{url}"]\n\n[tls]\nca = "{ca or tls.ca}"\n'
        f'cert = "{tls.cert}"\nkey = "{tls.key}"\n'
    )
    return path


async def test_admin_cli_refuses_an_agent_posing_as_broker(pki: Pki, tmp_path: Path) -> None:
    async with https_server(pki.agent.tls) as served:
        config = admin_config(tmp_path / "admin.toml", served[0], pki.admin.tls)
        rc, _out, err = await admin_cli(config, "status")
    assert rc != 0
    assert "replikant://agent/h1, but we expected a broker" in err, err
    assert "certs issue broker" in err, err
    assert served[1:] == []  # the request never left


async def test_admin_cli_works_against_a_broker_identity(pki: Pki, tmp_path: Path) -> None:
    async with https_server(pki.broker.tls) as served:
        config = admin_config(tmp_path / "admin.toml", served[0], pki.admin.tls)
        rc, _out, err = await admin_cli(config, "status", "--json")
    assert rc == 0, err
    assert served[1:] == ["/v1/status"]


async def test_agent_client_refuses_wrong_role_and_wrong_cluster(pki: Pki) -> None:
    async with https_server(pki.agent.tls) as served:
        with pytest.raises(FencedError) as info:
            await broker_state(served[0], pki.agent.tls, "c1")
        assert served[1:] == []  # nothing was sent to the impostor
    assert info.value.code == "wrong_role"
    assert "replikant://agent/h1" in info.value.message
    assert info.value.fix
    assert "certs issue broker" in info.value.fix
    assert not info.value.retryable

    async with https_server(pki.broker.tls) as served:
        with pytest.raises(FencedError) as info:
            await broker_state(served[0], pki.agent.tls, "c2")
        assert served[1:] == []
        assert info.value.code == "wrong_cluster"
        assert "replikant://broker/c1/b1" in info.value.message
        state = await broker_state(served[0], pki.agent.tls, "c1")
        assert state.durable_seq == 0


async def test_agent_client_names_a_foreign_ca(pki: Pki, tmp_path: Path) -> None:
    other = CertStore.init(tmp_path / "other")
    broker = other.issue_broker("c1", "b1", ips=["127.0.0.1"])
    async with https_server(broker.tls) as served:
        with pytest.raises(ShipError) as info:
            await broker_state(served[0], pki.agent.tls, "c1")
    assert "refused the server's certificate" in info.value.message
    assert info.value.retryable
    assert info.value.fix


async def test_admin_cli_names_a_broker_of_another_ca(pki: Pki, tmp_path: Path) -> None:
    other = CertStore.init(tmp_path / "other")
    broker = other.issue_broker("c1", "b1", ips=["127.0.0.1"])
    async with https_server(broker.tls) as served:
        # We do not trust the broker's CA: our side refuses its certificate.
        config = admin_config(tmp_path / "admin.toml", served[0], pki.admin.tls)
        rc, _, err = await admin_cli(config, "status")
        assert rc != 0
        assert "ServerDisconnectedError" not in err
        assert "refused the server's certificate" in err, err
        # We trust it, but it does not trust our certificate: it hangs up after the handshake.
        config = admin_config(tmp_path / "admin2.toml", served[0], pki.admin.tls, ca=broker.tls.ca)
        rc, _, err = await admin_cli(config, "status")
    assert rc != 0
    assert "ServerDisconnectedError" not in err
    assert "closed the connection right after the TLS handshake" in err, err
    assert "replikant certs check" in err, err
    assert "--role admin" in err, err
    assert "tls_handshake_rejected" in err, err


async def test_admin_cli_says_an_html_server_is_not_a_broker(pki: Pki, tmp_path: Path) -> None:
    def html(_: web.Request) -> web.Response:
        return web.Response(text="<html><body>It works!</body></html>", content_type="text/html")

    async with https_server(pki.broker.tls, html) as served:
        config = admin_config(tmp_path / "admin.toml", served[0], pki.admin.tls)
        rc, _, err = await admin_cli(config, "status")
    assert rc != 0
    assert "did not answer like a Replikant broker" in err, err


async def test_verify_unknown_vm_gives_a_fix(pki: Pki, tmp_path: Path) -> None:
    """An agent that protects no such VM gives a refusal that names the VM and the fix."""

    async def unknown(_: web.Request) -> web.Response:
        return web.json_response({"error": "unknown_vm"}, status=404)

    routes = [web.post("/v1/vms/{vm}/verify", unknown)]
    async with stand_in_agent(tmp_path / "agent.sock", routes) as sock:
        config = admin_config(tmp_path / "admin.toml", "https://127.0.0.1:1", pki.admin.tls)
        config.write_text(
            config.read_text().replace("[admin]\n", f'[admin]\nagents = ["{sock}"]\n')
        )
        rc, _, err = await admin_cli(config, "verify", "nosuchvm")
    assert rc != 0
    assert "no agent protects vm 'nosuchvm'" in err
    assert "replikant status" in err, err
    assert "[admin] agents" in err, err


def test_repair_line_is_a_sentence() -> None:
    line = _repair_line(
        {"agent": "http://127.0.0.1:8741", "ranges": 2, "vm": "web1", "marked_bytes": 8192}
    )
    assert line.startswith("repair: http://127.0.0.1:8741 marked 8.0 KiB of web1 (2 ranges)")
    assert "{" not in line


def test_bad_request_has_a_fix() -> None:
    body = BadRequest("body must be JSON").body()
    assert body["error"] == "bad_request"
    assert body["fix"]
    assert BadRequest("x", fix="do y").body()["fix"] == "do y"


def test_check_identity_uses_the_right_article(pki: Pki) -> None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pki.broker.tls.cert.read_bytes())
    (problem,) = check_identity(cert, "agent", label="broker.crt")
    assert "not an agent" in problem.message
    (problem,) = check_identity(cert, "admin", label="broker.crt")
    assert "not an admin" in problem.message
