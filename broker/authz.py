"""Who may use which endpoint of the broker's HTTP API.

Who the peer is comes from its certificate (:func:`common.tls.peer_identity`), never from its
address: admin endpoints take admin certificates; replication endpoints take agents the broker's
configuration allows, writing only to replicas bound to them, at the replica's generation. A
browser cannot change state: writes that a web page made it send are refused, and bodies are
taken only as ``application/json``.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler

from broker.errors import BadRequest, GenerationAhead, NotAuthorised, StaleGeneration
from broker.store import Replica
from common.config import BrokerConfig
from common.tls import Identity, TLSIdentityError, peer_identity


def identity_of(request: web.Request) -> Identity:
    """The peer's identity from its certificate; :class:`NotAuthorised` if it carries none."""
    try:
        return peer_identity(request)
    except TLSIdentityError as exc:
        raise NotAuthorised(
            f"the client certificate carries no usable identity: {exc.message}",
            fix=exc.fix,
            details={"reason": exc.reason},
        ) from None


def require_admin(request: web.Request) -> Identity:
    """Admin endpoints: only ``replikant://admin/...`` certificates."""
    ident = identity_of(request)
    if ident.role != "admin":
        raise NotAuthorised(
            f"{ident} may not use {request.path}: admin endpoints need an admin certificate",
            fix="run the CLI with an admin certificate (`replikant certs issue admin`)",
            details={"identity": ident.uri, "rule": "role admin"},
        )
    return ident


def require_agent(ident: Identity) -> None:
    """Replication endpoints: only ``replikant://agent/...`` certificates."""
    if ident.role != "agent":
        raise NotAuthorised(
            f"{ident} may not replicate: replication endpoints need an agent certificate",
            fix="only agents upload batches; admins use the admin endpoints",
            details={"identity": ident.uri, "rule": "role agent"},
        )


def authorise_agent(cfg: BrokerConfig, ident: Identity, vm_uuid: str) -> None:
    """Replication endpoints: an agent allowed for this VM by the broker's configuration.

    The most specific rule wins: a ``[[vms]]`` entry with ``allowed_agents`` for this VM, else
    ``[authorization]`` (``mode = "any"``: every agent of our CA; ``"listed"``: ``agents``).
    """
    require_agent(ident)
    for vm in cfg.vms:
        if str(vm.uuid) == vm_uuid and vm.allowed_agents:
            if ident.name not in vm.allowed_agents:
                raise NotAuthorised(
                    f"agent {ident.name} may not replicate vm {vm_uuid}: the broker allows only "
                    f"{', '.join(vm.allowed_agents)} for it",
                    fix=f"add {ident.name!r} to allowed_agents of this VM in broker.toml",
                    details={
                        "identity": ident.uri,
                        "rule": "vms.allowed_agents",
                        "allowed": list(vm.allowed_agents),
                    },
                )
            return
    auth = cfg.authorization
    if auth.mode == "listed" and ident.name not in auth.agents:
        raise NotAuthorised(
            f"agent {ident.name} is not in this broker's list of agents allowed to replicate",
            fix=f"add {ident.name!r} to [authorization] agents in broker.toml",
            details={"identity": ident.uri, "rule": "authorization.listed"},
        )


def check_source(replica: Replica, ident: Identity) -> None:
    """Only the source host a replica is bound to may write to it (or read its hashes)."""
    src = replica.meta.source_host
    if src and src != ident.name:
        m = replica.meta
        raise NotAuthorised(
            f"agent {ident.name} may not write to the replica of {replica.identity_text()}: "
            f"it is bound to source host {src}",
            fix=f"if the VM really moved, an operator rebinds it: `replikant replica rebind "
            f"{m.vm_name} --host {ident.name}`",
            details={"identity": ident.uri, "rule": "replica.source_host", "source_host": src},
        )


def check_generation(replica: Replica, ident: Identity, announced: int) -> None:
    """An agent announces the replica's own generation: never an older one, never a newer one."""
    m = replica.meta
    if announced < m.generation:
        raise StaleGeneration(
            f"{ident} announces vm {m.vm_name} at generation {announced} but the replica is at "
            f"generation {m.generation}",
            fix="the VM was failed over since; this source is fenced until reversed",
            details={"announced": announced, "replica_generation": m.generation},
        )
    if announced > m.generation:
        raise GenerationAhead(
            f"{ident} announces vm {m.vm_name} at generation {announced} but the replica is at "
            f"generation {m.generation}: an agent cannot raise a generation",
            fix=f"raising a generation is a failover act: `replikant replica set-generation "
            f"{m.vm_name} {announced}` if this source is the VM's new primary",
            details={
                "announced": announced,
                "replica_generation": m.generation,
                "rule": "replica.generation",
            },
        )


_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})


@web.middleware
async def no_browser_writes(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a state change that a web page made a browser send.

    A browser that holds an admin certificate (for a dashboard, say) presents it to any page's
    request, and a ``text/plain`` POST needs no CORS preflight: without this, any web site the
    admin opens could create exports or import seeds. Our clients send neither header; browsers
    always send one of them on a cross-origin write, and a page cannot forge either.
    """
    if request.method not in _SAFE_METHODS:
        site = request.headers.get("Sec-Fetch-Site")
        origin = request.headers.get("Origin")
        why = None
        if site is not None and site not in ("same-origin", "none"):
            why = f"Sec-Fetch-Site: {site}"
        elif origin is not None and urlsplit(origin).netloc != request.host:
            why = f"Origin: {origin}"
        if why is not None:
            raise NotAuthorised(
                f"{request.method} {request.path} came from a web page ({why}): a browser "
                "cannot change state on a broker",
                fix="use the replikant CLI (or any client that is not a browser)",
                details={"rule": "no_cross_site_writes", "header": why},
            )
    response: web.StreamResponse = await handler(request)
    return response


async def json_body(request: web.Request) -> Any:
    """The request's JSON body; only as ``application/json``, which a page cannot send
    cross-origin without a CORS preflight that we never answer."""
    if request.content_type != "application/json":
        raise BadRequest(
            f"{request.method} {request.path} needs a JSON body sent as application/json, "
            f"not {request.content_type!r}",
            fix="send Content-Type: application/json",
        )
    return await request.json()
