"""Idle disks: the agent's statement that a VM's unchanged disks are current as of a cut.

A disk with no change since its last acked batch ships nothing (issue 10, point 6). Instead the
agent sends one small request per VM and cycle, ``POST /v1/replicas/{vm_uuid}/current``
(docs/protocol/http.md), naming the cut and, per idle disk, the batch ``(generation, seq)`` it
is still as after. The broker keeps the newest statement of each replica in memory only
(nothing journaled, fsynced or logged at info): it feeds ``lag_seconds`` and makes the idle
disk part of the VM points of later cuts (decision 004, rule 3, :func:`broker.points.pair_by_cut`).
After a broker restart the points of those cuts wait for the next statement or, for the past,
for the disk's next batch (its ``first_change_cut``, rule 2).
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from broker import names
from broker.api import SERVICE_KEY
from broker.authz import authorise_agent, check_source, identity_of
from broker.httperrors import model_body
from broker.unchanged import Unchanged
from broker.undo import StateInfo
from common.config import NAME_PATTERN
from common.logs import get_logger

_log = get_logger("broker.current")

MAX_DISKS = 256


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


async def vm_current(request: web.Request) -> web.Response:
    """POST: note that the listed disks are unchanged through a cut; answers which were taken.

    A disk whose replica holds another durable batch than the one named (a batch the agent
    does not know was acked, or a newer generation) answers ``false``: the agent then asks for
    the replica's state and ships a batch.
    """
    service = request.app[SERVICE_KEY]
    ident = identity_of(request)
    vm_uuid = names.vm_uuid(request.match_info["vm_uuid"])
    authorise_agent(service.config, ident, vm_uuid)
    for bound in service.store.vm_disks(vm_uuid):
        check_source(bound, ident)  # before the body: another host learns nothing from it
    what = f"current-statement body for vm {vm_uuid} is invalid"
    body = await model_body(request, CurrentRequest, what)
    service.check_owner(vm_uuid)
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
    _log.debug("vm_current_noted", vm_uuid=vm_uuid, cut_id=body.cut_id, disks=taken)
    return web.json_response({"disks": taken})


def current_cut_ns(current: Unchanged | None, applied: StateInfo) -> int:
    """When the replica was last known current: its applied cut, or a later statement's."""
    if current is not None and (current.generation, current.seq) == applied.key:
        return max(applied.cut_ns, current.cut_ns)
    return applied.cut_ns
