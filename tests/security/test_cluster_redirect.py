"""A `not_owner` redirect (decision 031) cannot send an agent anywhere but a broker of its own
cluster: the followed URL must be https and its server must present such an identity before a
request goes out."""

from __future__ import annotations

import uuid
from pathlib import Path

from aiohttp import web

from agents.errors import ShipError
from agents.ship import BrokerClient
from common.config import TLSFiles
from common.tls import MutualTLSSite, client_context, server_context
from tests.fixtures_pki import make_pki
from tests.security.rows import Door
from tests.support_agent import Receiver

SURFACE = "agent follows a not_owner redirect"


async def _impostor(tls: TLSFiles, hits: list[str]) -> tuple[web.AppRunner, str]:
    async def any_request(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"vm_uuid": "x"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_request)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = MutualTLSSite(runner, "127.0.0.1", 0, server_context(tls))
    await site.start()
    return runner, f"https://127.0.0.1:{site.port}"


async def test_redirects_lead_only_to_brokers_of_the_agents_cluster(
    tmp_path: Path, door: Door
) -> None:
    """A member's refusal naming an agent's server, another cluster's broker or a plain-http
    URL does not make the agent send its request there."""
    pki = make_pki(tmp_path / "pki")
    local = {"dns": ["localhost"], "ips": ["127.0.0.1"]}
    impostors = {
        "a server with an agent certificate": pki.agent.tls,
        "a broker of cluster c2": pki.store.issue_broker("c2", "b9", **local).tls,
    }
    member = Receiver(tmp_path / "member", pki)
    await member.start()
    try:
        for what, tls in impostors.items():
            hits: list[str] = []
            runner, url = await _impostor(tls, hits)
            member.redirect = url
            client = BrokerClient([member.url], client_context(pki.agent.tls), cluster="c1")
            try:
                codes = []
                for _ in range(2):  # the refusal, then the request the redirect would send
                    try:
                        await client.state(uuid.uuid4(), "disk0")
                    except ShipError as exc:
                        codes.append(exc.code)
            finally:
                await client.close()
                await runner.cleanup()
            door.attempt(
                SURFACE,
                f"the refusal names {what}",
                expected="identity refused before any request (wrong_role / wrong_cluster)",
                observed=f"error codes {codes}; requests that reached it: {len(hits)}",
                refused=not hits and codes[-1] in ("wrong_role", "wrong_cluster"),
            )
        member.redirect = "http://127.0.0.1:9/"
        client = BrokerClient([member.url], client_context(pki.agent.tls), cluster="c1")
        try:
            try:
                await client.state(uuid.uuid4(), "disk0")
            except ShipError as exc:
                code = exc.code
        finally:
            await client.close()
        door.attempt(
            SURFACE,
            "the refusal names a plain http:// URL",
            expected="ignored: the agent stays on its configured brokers",
            observed=f"error {code}; next URL {client.url}",
            refused=client.url == member.url,
        )
    finally:
        await member.stop()
