"""Issue 8, finding 3: every name of every broker route is checked before it becomes a path.

Each route of the live aiohttp app is listed in ``ROUTES`` with every name it takes (URL
parameter, query parameter, JSON body field); a route missing from the table fails the suite, so
a new route cannot ship without its traversal attempts. Each name gets every variant of the
finding (``%2F`` inside, ``..``, ``%2e%2e``, an absolute path, NUL, overlong, leading dot) while
every other name of the request is valid: the answer must be 400 ``bad_request`` naming that
field, and nothing may appear inside or outside the store.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from broker.app import build_app
from broker.service import BrokerService
from tests.security.broker_support import raw_request, tree
from tests.security.rows import Door
from tests.support_broker import (
    PKI,
    AgentClient,
    FakeSource,
    MiB,
    make_config,
    running_broker,
)

SURFACE = "broker HTTPS"
VM_UUID = uuid.UUID("0f3c1c2e-1a2b-4c3d-8e9f-001122334455")
EXPORT = "pit-web1-disk0-1-1-abcdef"


@dataclass(frozen=True)
class Name:
    """One name a route takes: where it travels and the field the refusal must name."""

    where: str  # "path", "query" or "body"
    key: str
    field: str


@dataclass(frozen=True)
class Route:
    """A route's caller and names; ``body`` holds valid values of its body fields."""

    role: str  # "agent" or "admin"
    names: tuple[Name, ...]
    body: dict[str, object] | None = None


def _p(key: str) -> Name:
    return Name("path", key, key)


_PUT_BODY: dict[str, object] = {"vm_name": "web1", "disk_size": MiB, "block_size": 65536}
_REPLICA = "/v1/replicas/{vm_uuid}/{disk_id}"
ROUTES: dict[tuple[str, str], Route] = {
    ("PUT", _REPLICA): Route(
        "agent",
        (
            _p("vm_uuid"),
            _p("disk_id"),
            Name("body", "vm_name", "vm_name"),
            Name("body", "site", "site"),
        ),
        _PUT_BODY,
    ),
    ("GET", _REPLICA): Route("agent", (_p("vm_uuid"), _p("disk_id"))),
    ("POST", _REPLICA + "/batches"): Route("agent", (_p("vm_uuid"), _p("disk_id"))),
    ("GET", _REPLICA + "/hashes"): Route(
        "agent", (_p("vm_uuid"), _p("disk_id"), Name("query", "point", "point"))
    ),
    ("POST", "/v1/replicas/{vm_uuid}/current"): Route(
        "agent",
        (_p("vm_uuid"),),
        {"cut_id": 5, "cut_time_ns": 1, "disks": [{"disk_id": "disk0", "generation": 1, "seq": 1}]},
    ),
    # Its names sit inside the body's list: tests/security/test_broker_current.py attacks them.
    ("POST", "/v1/current"): Route("agent", ()),
    ("GET", "/v1/status"): Route("admin", ()),
    ("GET", "/v1/vms/{vm}/points"): Route("admin", (_p("vm"),)),
    ("GET", "/v1/vms/{vm}/hashes"): Route(
        "admin", (_p("vm"), Name("query", "disk", "disk"), Name("query", "point", "point"))
    ),
    ("POST", "/v1/vms/{vm}/source"): Route(
        "admin", (_p("vm"), Name("body", "host", "host")), {"host": "h1"}
    ),
    ("POST", "/v1/vms/{vm}/exports"): Route(
        "admin", (_p("vm"), Name("body", "point", "point")), {"point": "latest"}
    ),
    ("GET", "/v1/exports"): Route("admin", ()),
    ("POST", "/v1/vms/{vm}/promote"): Route(
        "admin", (_p("vm"), Name("body", "point", "point")), {"generation": 2, "point": "1:1"}
    ),
    ("POST", "/v1/vms/{vm}/failover"): Route(
        "admin", (_p("vm"), Name("body", "action", "action")), {"action": "commit"}
    ),
    ("POST", "/v1/vms/{vm}/adopt"): Route(
        "admin",
        (
            _p("vm"),
            Name("body", "vm_uuid", "vm_uuid"),
            Name("body", "source_host", "source_host"),
            Name("body", "source_site", "source_site"),
        ),
        {
            "vm_uuid": str(uuid.uuid4()),
            "generation": 2,
            "source_host": "h2",
            "source_site": "recovery",
            "disks": [
                {
                    "disk_id": "disk0",
                    "image": "/nonexistent.img",
                    "disk_size": MiB,
                    "block_size": 65536,
                }
            ],
        },
    ),
    ("POST", "/v1/vms/{vm}/test"): Route(
        "admin", (_p("vm"), Name("body", "point", "point")), {"point": "latest"}
    ),
    ("DELETE", "/v1/vms/{vm}/test"): Route("admin", (_p("vm"),)),
    ("GET", "/v1/tests"): Route("admin", ()),
    ("DELETE", "/v1/exports/{name}"): Route("admin", (_p("name"),)),
    ("POST", "/v1/seed/import"): Route(
        "admin",
        (Name("body", "vm", "vm"), Name("body", "disk", "disk")),
        {"image": "/nonexistent/copy.img", "vm": "web1", "disk": "disk0"},
    ),
}

# (label, the name as the handler sees it, how it is written in a URL path)
VARIANTS: list[tuple[str, str, str]] = [
    ("slash inside (a%2Fb)", "a/b", "a%2Fb"),
    ("climbing out (%2F..%2F..%2Fescape)", "/../../escape", "%2F..%2F..%2Fescape"),
    ("dot-dot", "..", ".."),
    ("encoded dot-dot (%2e%2e)", "..", "%2e%2e"),
    ("absolute path", "/ABS/escape", "%2FABS%2Fescape"),
    ("NUL", "a\0b", "a%00b"),
    ("overlong (65 characters)", "x" * 65, "x" * 65),
    ("leading dot", ".hidden", ".hidden"),
]


@pytest.fixture
async def broker(pki: PKI, tmp_path: Path) -> AsyncIterator[BrokerService]:
    async with running_broker(pki, tmp_path / "store") as svc:
        src = FakeSource(disk_size=MiB, vm_uuid=VM_UUID)
        async with AgentClient(svc.url, pki.agents["h1"]) as agent:
            await agent.enable(src)
            src.mutate()
            await agent.ship(src, src.cut())
        engine = next(iter(svc.engines.values()))
        async with asyncio.timeout(20):
            await engine.wait_for_state((1, 1))  # applied: the tree snapshot below stays still
        yield svc


def _request(
    template: str, route: Route, bad: Name, value: str, path_form: str
) -> tuple[str, bytes]:
    params = {"vm_uuid": str(VM_UUID), "disk_id": "disk0", "vm": "web1", "name": EXPORT}
    path = template
    for key, good in params.items():
        written = path_form if bad == Name("path", key, key) else good
        path = path.replace("{" + key + "}", written)
    query = {"point": "1-1", "disk": "disk0"}
    wanted = [n.key for n in route.names if n.where == "query"]
    parts = [
        f"{k}={quote(value, safe='') if bad.where == 'query' and bad.key == k else v}"
        for k, v in query.items()
        if k in wanted
    ]
    if parts:
        path += "?" + "&".join(parts)
    body = dict(route.body or {})
    if bad.where == "body":
        body[bad.key] = value
    return path, json.dumps(body).encode() if route.body is not None else b""


def test_every_route_is_in_the_table(pki: PKI, tmp_path: Path) -> None:
    """The table covers exactly the app's routes: a new route fails here until its names are
    listed (and so attacked)."""
    app = build_app(BrokerService(make_config(pki, tmp_path / "store")))
    served = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    assert served == set(ROUTES)


async def test_traversal_in_every_name_of_every_route(
    broker: BrokerService, pki: PKI, tmp_path: Path, door: Door
) -> None:
    """Every traversal variant in every name is a 400 bad_request naming the field, never a
    500, and leaves nothing behind inside or outside the store."""
    store = broker.store.root
    before = tree(store)
    outside = tmp_path / "outside"
    outside.mkdir()
    certs = {"agent": pki.agents["h1"], "admin": pki.admin}
    for (method, template), route in ROUTES.items():
        for name in route.names:
            for label, raw_value, raw_path_form in VARIANTS:
                value = raw_value.replace("/ABS", str(outside))
                path_form = raw_path_form.replace("%2FABS", quote(str(outside), safe=""))
                target, body = _request(template, route, name, value, path_form)
                answer = await raw_request(
                    broker.url,
                    certs[route.role],
                    method,
                    target,
                    body=body,
                    content_type="application/x-replikant-hrl"
                    if template.endswith("/batches")
                    else "application/json",
                )
                door.attempt(
                    SURFACE,
                    f"{method} {template}: {name.where} {name.key} = {label}",
                    expected=f"400 bad_request field={name.field}",
                    observed=answer.text(),
                    refused=400 <= answer.status < 500,
                )
                assert (answer.status, answer.error, answer.field) == (
                    400,
                    "bad_request",
                    name.field,
                ), (method, target, answer.body)
    created = tree(store) - before
    door.attempt(
        SURFACE,
        "all of the above: anything created in the store",
        expected="nothing",
        observed=", ".join(sorted(created)) or "nothing",
        refused=not created,
    )
    escaped = tree(outside) | {p for p in tree(tmp_path) if p.endswith(".creating")}
    door.attempt(
        SURFACE,
        "all of the above: anything created outside the store (or a *.creating anywhere)",
        expected="nothing",
        observed=", ".join(sorted(escaped)) or "nothing",
        refused=not escaped,
    )


async def test_names_in_seed_media_are_checked(
    broker: BrokerService, pki: PKI, tmp_path: Path, door: Door
) -> None:
    """Seed media is outside input: a manifest whose VM name, UUID, disk id or image path would
    climb out is refused with 400 naming the manifest field, and nothing is imported."""
    media = tmp_path / "media"
    (media / "web2").mkdir(parents=True)
    (media / "web2" / "disk0.img").write_bytes(bytes(MiB))
    secret = tmp_path / "secret.img"
    secret.write_bytes(b"s" * MiB)
    good_vm = {"name": "web2", "uuid": str(uuid.uuid4()), "generation": 1}
    good_disk = {"id": "disk0", "disk_size": MiB, "block_size": 65536, "image": "web2/disk0.img"}
    attempts = [
        ("vm name '../x'", {**good_vm, "name": "../x"}, good_disk, "manifest vms[].name"),
        ("vm uuid '../../x'", {**good_vm, "uuid": "../../x"}, good_disk, "manifest vms[].uuid"),
        (
            "disk id '../../escape'",
            good_vm,
            {**good_disk, "id": "../../escape"},
            "manifest disks[].id",
        ),
        ("disk id '.hidden'", good_vm, {**good_disk, "id": ".hidden"}, "manifest disks[].id"),
        (
            "image '../secret.img'",
            good_vm,
            {**good_disk, "image": "../secret.img"},
            "manifest disks[].image",
        ),
        (
            "image absolute",
            good_vm,
            {**good_disk, "image": str(secret)},
            "manifest disks[].image",
        ),
        (
            "labels of 900 KiB",
            {**good_vm, "labels": {f"k{i}": "v" * 200 for i in range(4600)}},
            good_disk,
            "manifest vms[].labels",
        ),
    ]
    before = tree(broker.store.root)
    for label, vm, disk, field in attempts:
        manifest = {
            "format": "replikant-seed",
            "version": 1,
            "source": {"host": "h1", "site": "primary"},
            "vms": [{**vm, "disks": [disk]}],
        }
        (media / "manifest.json").write_text(json.dumps(manifest))
        answer = await raw_request(
            broker.url,
            pki.admin,
            "POST",
            "/v1/seed/import",
            body=json.dumps({"dir": str(media)}).encode(),
        )
        door.attempt(
            "broker seed media",
            f"manifest with {label}",
            expected=f"400 bad_request field={field}",
            observed=answer.text(),
            refused=400 <= answer.status < 500,
        )
        assert (answer.status, answer.error, answer.field) == (400, "bad_request", field)
    assert tree(broker.store.root) == before
