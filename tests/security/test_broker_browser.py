"""A web page cannot make a browser that holds a certificate change state on the broker.

A browser presents an installed client certificate to every page's requests, and a cross-origin
``text/plain`` POST needs no CORS preflight. Each state-changing route of the broker's router is
sent such a request with the certificate that is authorised for it (so only the browser-ness can
refuse it): with the ``Origin`` or ``Sec-Fetch-Site`` a browser adds, and, for JSON routes, as
``text/plain`` alone.
"""

from __future__ import annotations

import json

import pytest

from broker.app import build_app
from common.hrl import BATCH_CONTENT_TYPE
from common.tls import client_context
from tests.security.broker_doors import (
    BrokerWorld,
    enable_body,
    expired,
    https,
    is_agent_route,
    quiesce,
    route_url,
    snapshot,
    world,
)
from tests.security.rows import Door
from tests.support_broker import AgentClient

__all__ = ["expired", "world"]

SURFACE = "broker HTTPS"
SAFE = {"GET", "HEAD", "OPTIONS"}
EVIL = "https://evil.example"


def writes(world: BrokerWorld) -> list[tuple[str, str]]:
    """``(method, path template)`` of every route that can change state."""
    out = sorted(
        {
            (r.method, r.resource.canonical)
            for r in build_app(world.svc).router.routes()
            if r.method not in SAFE and r.resource is not None
        }
    )
    assert out, "the broker's router lists no state-changing routes"
    return out


async def with_a_point(world: BrokerWorld) -> None:
    """A second batch, so the VM has a listed recovery point an export could serve."""
    async with AgentClient(world.url, world.pki.agents["h1"]) as h1:
        world.src.mutate(2)
        await h1.ship(world.src, world.src.cut())
    await quiesce(world.svc, world.src)


HEADERS = {
    "Origin of another site": {"Origin": EVIL},
    "Sec-Fetch-Site cross-site": {"Sec-Fetch-Site": "cross-site"},
    "Origin null (sandboxed frame)": {"Origin": "null"},
}


async def attempt(
    world: BrokerWorld,
    door: Door,
    what: str,
    method: str,
    template: str,
    headers: dict[str, str],
    want: int,
) -> None:
    """Send one route a request with the certificate authorised for it and a body that would
    succeed, marked by ``headers``; refused when answered ``want`` with nothing changed."""
    replication = is_agent_route(template)
    tls = world.pki.agents["h1"] if replication else world.pki.admin
    if template.endswith("/batches"):
        world.src.mutate(2)
        body = world.src.cut().body
        world.src.seq -= 1  # not taken: the next attempt cuts the same seq
        headers = {**headers, "Content-Type": BATCH_CONTENT_TYPE}
    else:
        body = json.dumps(
            {**enable_body(name="web1"), "point": "latest", "dir": "/nonexistent"}
        ).encode()
    before = snapshot(world.svc.store.root)
    exports = len(world.svc.exports)
    status, seen = await https(
        client_context(tls), method, route_url(world, template), data=body, headers=headers
    )
    door.attempt(
        SURFACE,
        f"{method} {template} {what}, with the {'agent' if replication else 'admin'} certificate",
        expected=f"{want} {'not_authorised' if want == 403 else 'bad_request'}, nothing changed",
        observed=f"{seen}; exports {exports} -> {len(world.svc.exports)}; "
        f"{world.store_text(before)}",
        refused=status == want and not world.damage(before) and len(world.svc.exports) == exports,
    )


@pytest.mark.parametrize("marker", list(HEADERS))
async def test_cross_site_writes_are_refused(world: BrokerWorld, door: Door, marker: str) -> None:
    """Every state-changing route refuses a request that a browser marked as cross-site, even
    with the right certificate, and nothing changes."""
    await with_a_point(world)
    for method, template in writes(world):
        headers = {"Content-Type": "text/plain", **HEADERS[marker]}
        await attempt(world, door, f"from a web page ({marker})", method, template, headers, 403)


async def test_json_routes_refuse_text_plain(world: BrokerWorld, door: Door) -> None:
    """A JSON body sent as text/plain (what an HTML form or a simple fetch sends) is refused,
    so no page can reach a JSON route without a preflight we never answer."""
    await with_a_point(world)
    for method, template in writes(world):
        if template.endswith("/batches") or method == "DELETE":
            continue  # batches have their own type; DELETE is never a simple request
        headers = {"Content-Type": "text/plain"}
        await attempt(
            world, door, "with its JSON body as text/plain", method, template, headers, 400
        )
