"""Who may use which broker route: agents their own replicas, admins the admin routes.

The routes come from the broker's own router (:func:`broker.app.build_app`), so a route
added later is attempted here without anyone writing a test for it: every route outside
``/v1/replicas/`` (and the shared idle statement, ``/v1/current``) is an admin route and must
refuse an agent certificate; every agent route must refuse a broker certificate, every
replication route another agent's; the agent routes that change state must refuse an admin
certificate.
"""

from __future__ import annotations

from broker.app import build_app
from common.hrl import BATCH_CONTENT_TYPE
from common.tls import client_context
from tests.security.broker_doors import (
    REPLICATION_PREFIX,
    BrokerWorld,
    enable_body,
    expired,
    https,
    is_agent_route,
    route_url,
    snapshot,
    world,
)
from tests.security.rows import Door

__all__ = ["expired", "world"]

SURFACE = "broker HTTPS"
READS = {"GET", "HEAD"}


def routes(world: BrokerWorld) -> list[tuple[str, str]]:
    """``(method, path template)`` of every route the broker serves."""
    out = []
    for route in build_app(world.svc).router.routes():
        info = route.resource.canonical if route.resource is not None else ""
        out.append((route.method, info))
    assert out, "the broker's router lists no routes"
    return sorted(set(out))


async def attempt(
    world: BrokerWorld, door: Door, who: str, tls_name: str, method: str, template: str
) -> None:
    """One request by ``who`` to one route, with a body that would succeed for the right
    identity; recorded as refused when the answer is 403 and the store did not change."""
    tls = {
        "agent h1": world.pki.agents["h1"],
        "agent h2": world.pki.agents["h2"],
        "admin alice": world.pki.admin,
        "broker c1/b1": world.pki.broker,
    }[tls_name]
    data: bytes | None = None
    headers: dict[str, str] | None = None
    body: object = None
    if template.endswith("/batches"):
        world.src.mutate(2)
        data = world.src.cut().body
        world.src.seq -= 1  # the batch was not taken: the next attempt cuts the same seq
        headers = {"Content-Type": BATCH_CONTENT_TYPE}
    elif method in ("PUT", "POST"):
        # Enough for any handler that got past authorisation to act on it.
        body = {**enable_body(name="web1"), "point": "latest", "dir": "/nonexistent", "vm": "web1"}
    before = snapshot(world.svc.store.root)
    status, seen = await https(
        client_context(tls),
        method,
        route_url(world, template),
        json_body=body,
        data=data,
        headers=headers,
    )
    door.attempt(
        SURFACE,
        f"{who} certificate: {method} {template}",
        expected="403 not_authorised, store unchanged",
        observed=f"{seen}; {world.store_text(before)}",
        refused=status == 403 and not world.damage(before),
    )


async def test_an_agent_certificate_on_every_admin_route(world: BrokerWorld, door: Door) -> None:
    """The replicating agent's own certificate is refused on every admin route."""
    admin_routes = [r for r in routes(world) if not is_agent_route(r[1])]
    assert admin_routes
    for method, template in admin_routes:
        await attempt(world, door, "agent h1", "agent h1", method, template)


async def test_a_broker_certificate_on_every_replication_route(
    world: BrokerWorld, door: Door
) -> None:
    """A broker's certificate (a valid identity of our CA, the wrong role) is refused on every
    agent route."""
    for method, template in routes(world):
        if is_agent_route(template):
            await attempt(world, door, "broker c1/b1", "broker c1/b1", method, template)


async def test_an_admin_certificate_on_replication_writes(world: BrokerWorld, door: Door) -> None:
    """An admin certificate cannot create a replica or upload a batch (admins may read a
    replica's state and hashes, as they read every status)."""
    writes = [r for r in routes(world) if is_agent_route(r[1]) and r[0] not in READS]
    assert writes
    for method, template in writes:
        await attempt(world, door, "admin alice", "admin alice", method, template)


async def test_another_agent_on_this_agents_replica(world: BrokerWorld, door: Door) -> None:
    """Under the shipped default (``[authorization] mode = "any"``) agent h2 can neither upload
    to, nor read the state or block hashes of, the replica agent h1 replicates to."""
    assert world.svc.config.authorization.mode == "any"
    for method, template in routes(world):
        # PUT (re-binding the replica to another host) is proven in the rebinding tests.
        if template.startswith(REPLICATION_PREFIX) and method != "PUT":
            await attempt(world, door, "agent h2 (for h1's VM)", "agent h2", method, template)
