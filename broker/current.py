"""Idle disks: the agent's statement that a VM's unchanged disks are current as of a cut.

A disk with no change since its last acked batch ships nothing (issue 10, point 6). Instead the
agent states, per VM and cut, the batch ``(generation, seq)`` each idle disk is still as after:
for all its idle VMs of one tick in one request, ``POST /v1/current`` (so 100 idle VMs cost the
broker one request a second, not 100), or per VM, ``POST /v1/replicas/{vm_uuid}/current``
(older agents, and VMs that another cluster member than the agent's current one serves;
docs/protocol/http.md). Both take a VM's statement by the same checks (:func:`_authorise`,
:func:`_take`). The broker keeps the newest statement of each replica in memory only (nothing
journaled, fsynced or logged at info): it feeds ``lag_seconds`` and makes the idle disk part of
the VM points of later cuts (decision 004, rule 3, :func:`broker.points.pair_by_cut`). After a
broker restart the points of those cuts wait for the next statement or, for the past, for the
disk's next batch (its ``first_change_cut``, rule 2).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from broker import names
from broker.api import SERVICE_KEY, Ingest
from broker.authz import authorise_agent, check_source, identity_of, require_agent
from broker.errors import BadRequest, BrokerError
from broker.httperrors import model_body
from broker.store import Replica
from broker.unchanged import Unchanged
from broker.undo import StateInfo
from common.config import NAME_PATTERN
from common.logs import get_logger
from common.tls import Identity

_log = get_logger("broker.current")

MAX_DISKS = 256
MAX_VMS = 1024  # per POST /v1/current: ~100 KiB of body, far below the 1 MiB request limit


class IdleDisk(BaseModel):
    """One disk of the statement: unchanged since batch ``(generation, seq)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    disk_id: str = Field(pattern=NAME_PATTERN)
    generation: int = Field(ge=1)
    seq: int = Field(ge=1)


class CurrentRequest(BaseModel):
    """Body of ``POST /v1/replicas/{vm_uuid}/current``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cut_id: int = Field(ge=1)
    cut_time_ns: int = Field(ge=0)
    disks: list[IdleDisk] = Field(min_length=1, max_length=MAX_DISKS)


class VMStatement(CurrentRequest):
    """One VM's statement inside ``POST /v1/current``."""

    vm_uuid: str = Field(max_length=45)  # checked by broker.names before any lookup


class AgentCurrentRequest(BaseModel):
    """Body of ``POST /v1/current``: the statements of one agent's idle VMs at one tick."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vms: list[VMStatement] = Field(min_length=1, max_length=MAX_VMS)


async def agent_current(request: web.Request) -> web.Response:
    """POST: the per-VM statement for many VMs at once; answers, per VM, which disks were taken
    or why the VM's statement was refused (the other VMs' statements still count).

    The whole request is refused (400) when a VM UUID is malformed or named twice, and (403)
    for a caller that is no agent; a VM the caller may not speak for is refused on its own with
    the refusal the per-VM endpoint would give, and nothing of it is noted.
    """
    service = request.app[SERVICE_KEY]
    ident = identity_of(request)
    require_agent(ident)  # before the body
    body = await model_body(request, AgentCurrentRequest, "current-statements body")
    vms = [names.vm_uuid(s.vm_uuid, f"vms.{i}.vm_uuid") for i, s in enumerate(body.vms)]
    if len(set(vms)) != len(vms):
        raise BadRequest(
            "current-statements body: vms: a VM is named twice",
            fix="send one statement per VM (docs/protocol/http.md)",
            details={"field": "vms", "rule": "each vm_uuid once"},
        )
    # One pass over the store, not one per VM: the request names every VM of the agent.
    bound: dict[str, list[Replica]] = {}
    for replica in service.store.replicas():
        bound.setdefault(replica.meta.vm_uuid, []).append(replica)
    answers: dict[str, dict[str, Any]] = {}
    # The fence's epoch read once for all of them: the loop below is one step, no await.
    stored = service.store.stored_epoch()
    for vm_uuid, statement in zip(vms, body.vms, strict=True):
        try:
            _authorise(service, ident, vm_uuid, bound.get(vm_uuid, []))
            answers[vm_uuid] = {"disks": _take(service, ident, vm_uuid, statement, stored)}
        except BrokerError as exc:
            _log.warning("current_statement_refused", vm_uuid=vm_uuid, error=exc.code)
            answers[vm_uuid] = {"status": exc.status, **exc.body()}
    _log.debug(
        "agent_current_noted",
        vms=len(vms),
        refused=len(vms) - sum("disks" in a for a in answers.values()),
    )
    return web.json_response({"vms": answers})


async def vm_current(request: web.Request) -> web.Response:
    """POST: note that the listed disks are unchanged through a cut; answers which were taken.

    A disk whose replica holds another durable batch than the one named (a batch the agent
    does not know was acked, or a newer generation) answers ``false``: the agent then asks for
    the replica's state and ships a batch.
    """
    service = request.app[SERVICE_KEY]
    ident = identity_of(request)
    vm_uuid = names.vm_uuid(request.match_info["vm_uuid"])
    # before the body: another host learns nothing from it
    _authorise(service, ident, vm_uuid, service.store.vm_disks(vm_uuid))
    what = f"current-statement body for vm {vm_uuid} is invalid"
    body = await model_body(request, CurrentRequest, what)
    taken = _take(service, ident, vm_uuid, body)
    _log.debug("vm_current_noted", vm_uuid=vm_uuid, cut_id=body.cut_id, disks=taken)
    return web.json_response({"disks": taken})


def _authorise(service: Ingest, ident: Identity, vm_uuid: str, disks: list[Replica]) -> None:
    """The caller is an agent allowed for the VM and the source of each of its replicas
    (``disks``: every replica of the VM in the store)."""
    authorise_agent(service.config, ident, vm_uuid)
    for replica in disks:
        check_source(replica, ident)


def _take(
    service: Ingest,
    ident: Identity,
    vm_uuid: str,
    body: CurrentRequest,
    stored_epoch: int | None = None,
) -> dict[str, bool]:
    """Note the statement of each disk the replica of which holds the batch named."""
    service.check_owner(vm_uuid, stored_epoch=stored_epoch)
    taken: dict[str, bool] = {}
    for disk in body.disks:
        replica = service.store.get(vm_uuid, disk.disk_id)
        if replica is None:
            taken[disk.disk_id] = False
            continue
        check_source(replica, ident)
        m = replica.meta
        engine = service.engine_for(replica)
        ok = (
            m.generation == disk.generation
            and m.durable_seq == disk.seq
            and body.cut_id > m.durable_cut_id
        )
        if ok:
            engine.current = Unchanged(disk.generation, disk.seq, body.cut_id, body.cut_time_ns)
        taken[disk.disk_id] = ok
    return taken


def current_cut_ns(current: Unchanged | None, applied: StateInfo) -> int:
    """When the replica was last known current: its applied cut, or a later statement's."""
    if current is not None and (current.generation, current.seq) == applied.key:
        return max(applied.cut_ns, current.cut_ns)
    return applied.cut_ns
