"""The operator's endpoints of the broker (docs/protocol/http.md): status, recovery points,
hashes for verify, point-in-time exports, seed import and source changes. Admin certificates
only (:func:`broker.authz.require_admin`)."""

from __future__ import annotations

import json

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker import names
from broker.api import SERVICE_KEY
from broker.authz import json_body, require_admin
from broker.errors import BadRequest, UnknownVM
from broker.httperrors import body_error
from broker.ingest import hashes_response
from broker.views import (
    journal_json,
    resolve_vm_point,
    served_vm,
    state_json,
    status_vms,
    vm_point_list,
)
from common.config import NAME_PATTERN
from common.logs import get_logger

_log = get_logger("broker.adminroutes")


async def status(request: web.Request) -> web.Response:
    """GET /v1/status: every VM with its roles, health, lag and last point."""
    service = request.app[SERVICE_KEY]
    require_admin(request)
    return web.json_response(
        {"vms": status_vms(service), "broker": service.broker_json(), "hosts": service.hosts_json()}
    )


async def vm_points(request: web.Request) -> web.Response:
    """GET /v1/vms/{vm}/points: recovery points, newest first."""
    service = request.app[SERVICE_KEY]
    require_admin(request)
    replicas = served_vm(service, request.match_info["vm"])
    return web.json_response(
        {
            "vm": replicas[0].meta.vm_name,
            "uuid": replicas[0].meta.vm_uuid,
            "points": vm_point_list(service, replicas),
            "journal": [journal_json(service.engine_for(r)) for r in replicas],
        }
    )


async def vm_hashes(request: web.Request) -> web.Response:
    """GET /v1/vms/{vm}/hashes?disk=D: per-disk block hashes (admin, for verify)."""
    service = request.app[SERVICE_KEY]
    require_admin(request)
    replicas = served_vm(service, request.match_info["vm"])
    disk = names.disk_id(request.query.get("disk", replicas[0].meta.disk_id), "disk")
    for replica in replicas:
        if replica.meta.disk_id == disk:
            return await hashes_response(service, replica, request)
    raise UnknownVM(f"vm {request.match_info['vm']} has no disk {disk!r} here")


async def create_exports(request: web.Request) -> web.Response:
    """POST /v1/vms/{vm}/exports {"point": "G:C"|"latest", "read_only": false}: PIT exports."""
    service = request.app[SERVICE_KEY]
    require_admin(request)
    replicas = served_vm(service, request.match_info["vm"])
    try:
        body = await json_body(request) if request.can_read_body else {}
    except json.JSONDecodeError:
        raise BadRequest("body must be JSON") from None
    if not isinstance(body, dict):
        raise BadRequest('body must be a JSON object such as {"point": "1:1042"}')
    point = names.vm_point_id(body.get("point", "latest"))
    point_id, keys = resolve_vm_point(service, replicas, point)
    exports = await service.create_exports(
        replicas, point_id, keys, read_only=bool(body.get("read_only"))
    )
    # The member record now lists the VM as exported: the owner's balance leaves it here.
    await service.test_copies.announce()
    return web.json_response({"exports": exports}, status=201)


async def list_exports(request: web.Request) -> web.Response:
    """GET /v1/exports: the point-in-time exports being served."""
    service = request.app[SERVICE_KEY]
    require_admin(request)
    return web.json_response({"exports": service.list_exports()})


async def delete_export(request: web.Request) -> web.Response:
    """DELETE /v1/exports/{name}: stop serving, delete the overlay."""
    service = request.app[SERVICE_KEY]
    require_admin(request)
    name = names.export_name(request.match_info["name"])
    await service.remove_export(name)
    await service.test_copies.announce()
    return web.json_response({"removed": name})


async def seed_import(request: web.Request) -> web.Response:
    """POST /v1/seed/import {"dir": PATH, "vm": optional}: load an offline-media export."""
    service = request.app[SERVICE_KEY]
    require_admin(request)
    try:
        body = await json_body(request)
        image = body.get("image")
        directory = str(body.get("dir") or "")
        if not directory and not image:
            raise KeyError("dir")
        vm = body.get("vm")
        raw = (str(image), str(body["vm"]), str(body.get("disk", "disk0"))) if image else None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise BadRequest(
            'body must be {"dir": "/media/on/broker/host"} or {"image": PATH, "vm": VM, '
            '"disk": DISK}'
        ) from None
    if vm is not None:
        names.name(vm, "vm")
    if raw is not None:
        names.disk_id(raw[2], "disk")
    service.check_owner()  # a standby member must not write the shared store
    result = await service.seed_import(directory, expect_vm=vm, image=raw)
    return web.json_response(result)


async def set_source(request: web.Request) -> web.Response:
    """POST /v1/vms/{vm}/source {"host": H, "generation": N}: rebind or raise the generation.

    The operator's (or failover's) act that an agent's PUT can never do: bind the VM's replicas
    to another source host, and/or raise their generation (fencing the old primary).
    """
    service = request.app[SERVICE_KEY]
    admin = require_admin(request)
    replicas = served_vm(service, request.match_info["vm"])  # its placed member, or the owner
    try:
        body = SourceChange.model_validate(await json_body(request))
    except ValidationError as exc:
        raise body_error("source change is invalid", exc) from None
    except ValueError as exc:
        raise BadRequest(f"source change is not JSON ({exc})") from None
    if body.host is None and body.generation is None:
        raise BadRequest(
            'the body names nothing to change: give "host", "generation" or both',
            details={"field": "(body)", "rule": "host and/or generation"},
        )
    await service.change_source(replicas, admin, host=body.host, generation=body.generation)
    return web.json_response(
        {"vm": replicas[0].meta.vm_name, "disks": [state_json(service, r) for r in replicas]}
    )


class SourceChange(BaseModel):
    """Body of ``POST /v1/vms/{vm}/source``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str | None = Field(default=None, pattern=NAME_PATTERN)
    generation: int | None = Field(default=None, ge=1)
