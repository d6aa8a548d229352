"""Test failover at the recovery site's broker (docs/failover.md, decision 040).

``POST /v1/vms/{vm}/test {"point": "G:C"|"latest"}`` turns the VM's REPLICA here into TEST and
serves each disk as of that point over NBD with a private overlay (broker/pitexport.py);
replication keeps applying meanwhile. ``DELETE /v1/vms/{vm}/test`` removes the exports and their
overlays and returns the role to REPLICA. Any other role refuses with the state and the command
that would fix it. Admin certificates only; the guest itself runs on a recovery-site agent.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from aiohttp import web

from broker import names
from broker.api import SERVICE_KEY, Admin
from broker.authz import json_body, require_admin
from broker.errors import BadRequest, BrokerError, UnknownPoint
from broker.store import Replica
from broker.testcopies import TestCopy
from broker.views import resolve_vm_point, vm_replicas, vm_status
from common.logs import get_logger
from common.roles import Command, Facts, RoleRefused, State, VMRole

_log = get_logger("broker.testroutes")


class WrongRole(BrokerError):
    """The VM's role at this site does not allow the command (names the role and the fix)."""

    status = 409
    code = "wrong_role"


def _refused(exc: RoleRefused) -> WrongRole:
    _log.warning(
        "failover_refused",
        vm=exc.role.vm,
        state=exc.role.state.value,
        command=exc.command.value,
        reason=exc.reason,
    )
    return WrongRole(
        f"{exc.role.describe()}: {exc.reason}",
        fix=exc.fix,
        details={"state": exc.role.state.value, "command": exc.command.value},
    )


def _current_role(service: Admin, replicas: list[Replica]) -> VMRole:
    """The VM's role here as the status shows it, unless a command on it is in flight."""
    tests = service.test_copies
    doc = vm_status(service, replicas, 0.0)
    name = doc["name"]
    known = tests.book.get(name)
    if known is not None and known.pending is not None:
        return known
    site = service.config.broker.site
    role = VMRole(
        name,
        site,
        State(doc["roles"].get(site, "REPLICA")),
        doc["generation"],
        point=tests.copies[name].point if name in tests.copies else None,
    )
    tests.book.set(role)
    return role


async def start_test(request: web.Request) -> web.Response:
    """POST /v1/vms/{vm}/test: REPLICA -> TEST with point-in-time exports of every disk."""
    service = request.app[SERVICE_KEY]
    require_admin(request)
    replicas = vm_replicas(service, request.match_info["vm"])
    try:
        body: Any = await json_body(request) if request.can_read_body else {}
    except json.JSONDecodeError:
        raise BadRequest("body must be JSON") from None
    if not isinstance(body, dict):
        raise BadRequest('body must be a JSON object such as {"point": "latest"}')
    point = names.vm_point_id(body.get("point", "latest"))
    tests = service.test_copies
    role = _current_role(service, replicas)
    try:
        transition = tests.book.begin(role.vm, Command.TEST, Facts(point=point))
    except RoleRefused as exc:
        raise _refused(exc) from None
    try:
        point_id, keys = resolve_vm_point(service, replicas, point)
        exports = await service.create_exports(replicas, point_id, keys)
    except BaseException:
        tests.book.abort(transition)
        raise
    m = replicas[0].meta
    tests.copies[role.vm] = TestCopy(role.vm, m.vm_uuid, point_id, exports)
    after = tests.book.finish(transition)
    await tests.announce()
    _log.info("test_failover_started", vm=role.vm, point=point_id, exports=len(exports))
    return web.json_response(
        {
            **tests.copies[role.vm].json(),
            "site": after.site,
            "role": after.state.value,
            "generation": after.generation,
        },
        status=201,
    )


async def stop_test(request: web.Request) -> web.Response:
    """DELETE /v1/vms/{vm}/test: remove the exports and overlays; TEST -> REPLICA."""
    service = request.app[SERVICE_KEY]
    require_admin(request)
    replicas = vm_replicas(service, request.match_info["vm"])
    tests = service.test_copies
    role = _current_role(service, replicas)
    try:
        transition = tests.book.begin(role.vm, Command.STOP_TEST)
    except RoleRefused as exc:
        raise _refused(exc) from None
    copy = tests.copies[role.vm]
    try:
        for export in copy.exports:
            # One that ended already (its VM moved, or another broker took the store over
            # while this one was cut off) must not keep the test from stopping.
            with contextlib.suppress(UnknownPoint):
                await service.remove_export(str(export["name"]))
    except BaseException:
        tests.book.abort(transition)
        raise
    del tests.copies[role.vm]
    after = tests.book.finish(transition)
    await tests.announce()
    _log.info("test_failover_stopped", vm=role.vm, point=copy.point)
    return web.json_response(
        {
            "vm": role.vm,
            "site": after.site,
            "role": after.state.value,
            "removed": [e["name"] for e in copy.exports],
            "overlays": [e["overlay"] for e in copy.exports],
        }
    )


async def list_tests(request: web.Request) -> web.Response:
    """GET /v1/tests: every test copy this broker serves."""
    service = request.app[SERVICE_KEY]
    require_admin(request)
    return web.json_response({"tests": [c.json() for c in service.test_copies.copies.values()]})


ROUTES = [
    web.post("/v1/vms/{vm}/test", start_test),
    web.delete("/v1/vms/{vm}/test", stop_test),
    web.get("/v1/tests", list_tests),
]
