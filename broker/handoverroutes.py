"""The operator's failover endpoints of the broker (decision 041, docs/protocol/http.md): promote
a replica (hand its image to this site's agent), commit or cancel that failover, and adopt an old
primary's image for reverse replication. Admin certificates only."""

from __future__ import annotations

from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from broker import names
from broker.api import SERVICE_KEY
from broker.authz import json_body, require_admin
from broker.errors import BadRequest
from broker.handover import AdoptRequest, PromoteRequest, SettleRequest, adopt, promote, settle
from broker.httperrors import body_error
from broker.views import state_json, vm_replicas
from common.regions import total

M = TypeVar("M", bound=BaseModel)


async def _body(request: web.Request, model: type[M], what: str) -> M:
    try:
        return model.model_validate(await json_body(request))
    except ValidationError as exc:
        raise body_error(f"{what} is invalid", exc) from None
    except ValueError as exc:
        raise BadRequest(f"{what} is not JSON ({exc})") from None


def _answer(request: web.Request, replicas: list[Any], **extra: Any) -> web.Response:
    service = request.app[SERVICE_KEY]
    return web.json_response(
        {
            **extra,
            "vm": replicas[0].meta.vm_name,
            "uuid": replicas[0].meta.vm_uuid,
            "failover": replicas[0].meta.handed_over,
            "disks": [{**state_json(service, r), "image": str(r.image)} for r in replicas],
        }
    )


async def promote_vm(request: web.Request) -> web.Response:
    """POST /v1/vms/{vm}/promote {"generation": N}: hand the replica images to this site."""
    service = request.app[SERVICE_KEY]
    admin = require_admin(request)
    service.check_owner()  # before the lookup: a standby names the owner (the CLI follows)
    replicas = vm_replicas(service, request.match_info["vm"])
    body = await _body(request, PromoteRequest, "promotion")
    rolled = await promote(service, replicas, admin, body.generation, point=body.point)
    return _answer(
        request,
        replicas,
        point=body.point,
        rolled_back_bytes={d: total(r) for d, r in rolled.items()},
        rolled_back_regions={d: [list(x) for x in r] for d, r in rolled.items()},
    )


async def settle_vm(request: web.Request) -> web.Response:
    """POST /v1/vms/{vm}/failover {"action": "commit"|"cancel"}."""
    service = request.app[SERVICE_KEY]
    admin = require_admin(request)
    service.check_owner()  # before the lookup: a standby names the owner (the CLI follows)
    replicas = vm_replicas(service, request.match_info["vm"])
    body = await _body(request, SettleRequest, "failover action")
    await settle(service, replicas, admin, body.action)
    for replica in replicas:
        if not replica.meta.handed_over:
            service.engine_for(replica)
    return _answer(request, replicas)


async def adopt_vm(request: web.Request) -> web.Response:
    """POST /v1/vms/{vm}/adopt: the old primary's images become the VM's replicas here."""
    service = request.app[SERVICE_KEY]
    admin = require_admin(request)
    vm = names.name(request.match_info["vm"], "vm")
    body = await _body(request, AdoptRequest, "adoption")
    names.vm_uuid(body.vm_uuid)
    service.check_owner()
    replicas = await adopt(service, vm, body, admin)
    return _answer(request, replicas)
