"""Status views of the broker's replicas: the JSON documents of docs/protocol/http.md (replica
state, VM status, VM points) and the lookups behind them, read through the narrow
:class:`broker.api.Replicas` interface."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from broker import names
from broker.api import Ingest, Replicas
from broker.current import current_cut_ns
from broker.errors import BrokerError, UnknownPoint, UnknownVM
from broker.points import (
    CutKey,
    Key,
    VMPoint,
    cut_text,
    key_text,
    pair_by_cut,
    parse_cut,
)
from broker.store import Replica
from common import topics

if TYPE_CHECKING:
    from broker.apply import ReplicaEngine


def replica_of(service: Replicas, vm_uuid: str, disk_id: str) -> Replica:
    """The replica of one disk; :class:`UnknownVM` when it is not enabled here."""
    replica = service.store.get(vm_uuid, disk_id)
    if replica is None:
        raise UnknownVM(
            f"vm {vm_uuid} disk {disk_id} is not enabled for replication on broker "
            f"{service.config.broker.node}",
            fix="enable it first (PUT /v1/replicas/{vm_uuid}/{disk_id}; the agent does this)",
            details={"vm_uuid": vm_uuid, "disk_id": disk_id},
        )
    return replica


def state_json(service: Replicas, replica: Replica) -> dict[str, Any]:
    """The replica state document of http.md."""
    m = replica.meta
    applied = m.applied_seq if m.applied_generation == m.generation else 0
    engine = service.engines.get(replica.key)
    return {
        "vm_uuid": m.vm_uuid,
        "disk_id": m.disk_id,
        "vm_name": m.vm_name,
        "disk_size": m.disk_size,
        "block_size": m.block_size,
        "generation": m.generation,
        "applied_seq": applied,
        "durable_seq": m.durable_seq,
        "durable_cut_id": m.durable_cut_id,
        "epoch": service.epoch,
        "initial_sync": m.initial_sync,
        "site": service.config.broker.site,
        "source_host": m.source_host,
        "health": engine.health() if engine is not None else "ok",
    }


def disk_key_at_cut(engine: ReplicaEngine, replica: Replica, cut: CutKey) -> Key:
    """This disk's state at VM cut ``cut``; :class:`UnknownPoint` if it has none."""
    for info in engine.points.points(engine.state(), include_hidden=True):
        if info.state.cut == cut:
            return info.state.key
    raise UnknownPoint(
        f"disk {replica.meta.disk_id} of {replica.meta.vm_name} has no state at VM point "
        f"{cut_text(cut)} (its batch of that cut did not arrive, or retention dropped it)",
        fix="`replikant points VM` lists the VM points every disk has",
        details={"point": cut_text(cut), "disk": replica.meta.disk_id},
    )


def cut_pending(engine: ReplicaEngine, cut: CutKey) -> bool:
    """True when VM cut ``cut`` is durable on this disk but not yet applied (worth waiting
    for); False when the applied state is at or past it; :class:`UnknownPoint` when this disk
    can never reach it."""
    m = engine.replica.meta
    if cut <= engine.state().cut:
        return False
    if cut[0] == m.generation and cut[1] <= m.durable_cut_id:
        return True
    raise UnknownPoint(
        f"VM point {cut_text(cut)} is beyond what {engine.replica.label} holds durably "
        f"(generation {m.generation}, cut {m.durable_cut_id}): it may never exist",
        fix="ask for a point the VM has (`replikant points VM`)",
        details={"point": cut_text(cut), "durable": cut_text((m.generation, m.durable_cut_id))},
    )


def point_pending(engine: ReplicaEngine, key: Key) -> bool:
    """True when ``key`` is durable but not yet applied (worth waiting for); False when it is a
    point of this replica now; :class:`UnknownPoint` when it can never become one."""
    m = engine.replica.meta
    state = engine.state()
    if key > state.key:
        if key[0] == m.generation and key[1] <= m.durable_seq:
            return True
        raise UnknownPoint(
            f"point {key_text(key)} of {engine.replica.label} is beyond what is durable "
            f"(generation {m.generation}, durable seq {m.durable_seq}): it may never exist",
            fix="ask for a point the replica holds (`replikant points VM`)",
            details={"point": key_text(key), "durable": key_text((m.generation, m.durable_seq))},
        )
    kept = [p.state.key for p in engine.points.points(state, include_hidden=True)]
    if key not in kept:
        raise UnknownPoint(
            f"point {key_text(key)} is not a point of {engine.replica.label}: it was never "
            "cut or is older than what retention keeps",
            fix="ask for a point the replica holds (`replikant points VM`)",
            details={"point": key_text(key), "oldest": key_text(min(kept)) if kept else None},
        )
    return False


def journal_json(engine: ReplicaEngine) -> dict[str, Any]:
    """One disk's recovery-point data against its bound, as status and ``points`` show it."""
    listed = engine.points.points(engine.state())
    oldest = listed[-1].state if listed else None
    m = engine.replica.meta
    return {
        "disk": m.disk_id,
        "bytes": engine.points.journal_bytes(),
        "bound_bytes": engine.journal_bound,
        "disk_bytes": m.disk_size,
        "oldest_point": key_text(oldest.key) if oldest is not None else None,
        "oldest_time": oldest.cut_ns / 1e9 if oldest is not None and oldest.cut_ns else None,
    }


def _disk_json(service: Replicas, replica: Replica) -> dict[str, Any]:
    engine = service.engine_for(replica)
    m = replica.meta
    state = engine.state()
    return {
        **state_json(service, replica),
        "backlog": engine.backlog(),
        "undo_bytes": engine.points.undo_bytes(),
        "journal": journal_json(engine),
        "replica_image": str(replica.image),
        "last_cut": (current_cut_ns(engine.current, state) / 1e9) if state.cut_ns else None,
        "conditions": [
            {"code": c.code, "level": c.level, "message": c.message}
            for c in engine.conditions.values()
        ],
        "rpo_seconds": m.rpo_seconds,
        "labels": m.labels,
    }


def vm_status(service: Replicas, replicas: list[Replica], now: float) -> dict[str, Any]:
    """One VM's entry of ``GET /v1/status``."""
    first = replicas[0].meta
    disks = [_disk_json(service, r) for r in replicas]
    levels = [d["health"] for d in disks]
    health = "critical" if "critical" in levels else "warning" if "warning" in levels else "ok"
    if service.conditions and health != "critical":
        health = max(
            (c.level for c in service.conditions.values()),
            key=["ok", "warning", "critical"].index,
        )
    cuts = [d["last_cut"] for d in disks]
    lag = None if any(c is None for c in cuts) else max(0.0, now - min(c for c in cuts if c))
    rpo = min((r.meta.rpo_seconds or 60.0) for r in replicas)
    if health == "ok" and (lag is None or lag > rpo):
        health = "warning"
    if health == "ok" and any(d["initial_sync"] != "complete" for d in disks):
        health = "warning"
    roles: dict[str, str] = {}
    if first.handed_over:
        # The image belongs to this site's agent now (decision 041); the old primary's role is
        # what its own site reports.
        here = "FAILED-OVER" if first.handed_over == "uncommitted" else "PRIMARY"
        roles[service.config.broker.site] = here
    else:
        if first.source_site:
            roles[first.source_site] = "PRIMARY"
        roles[service.config.broker.site] = "REPLICA"
    last = _vm_latest_point(service, replicas)
    if service.test_copies.is_test(first.vm_name):
        roles[service.config.broker.site] = "TEST"
    return {
        "name": first.vm_name,
        "uuid": first.vm_uuid,
        "roles": roles,
        "generation": first.generation,
        "health": health,
        "lag_seconds": None if lag is None else round(lag, 3),
        "rpo_seconds": rpo,
        "last_point": last,
        "source_host": first.source_host,
        "disks": disks,
    }


def _vm_latest_point(service: Replicas, replicas: list[Replica]) -> dict[str, Any] | None:
    points = vm_point_list(service, replicas)
    return points[0] if points else None


def _vm_points(service: Replicas, replicas: list[Replica]) -> list[VMPoint]:
    per_disk = []
    current = []
    for replica in replicas:
        engine = service.engine_for(replica)
        per_disk.append(engine.points.points(engine.state()))
        current.append(engine.current)
    return pair_by_cut(per_disk, current)


def vm_point_list(service: Replicas, replicas: list[Replica]) -> list[dict[str, Any]]:
    """A VM's points, newest first: the cuts every disk of it has (never a join of seqs)."""
    disk_ids = [r.meta.disk_id for r in replicas]
    now, vm = time.time_ns(), replicas[0].meta.vm_uuid
    tier = service.retainer.tier_label
    return [
        {**p.to_json(disk_ids), "tier": tier(vm, p, now)} for p in _vm_points(service, replicas)
    ]


def resolve_vm_point(
    service: Replicas, replicas: list[Replica], point: str
) -> tuple[str, list[Key]]:
    """The id of VM point ``point`` (``"G:C"`` or ``"latest"``) and each disk's state at it, in
    replica order.

    ``latest`` is the newest VM point, not each disk's newest state: those may belong to
    different cuts (a batch of one disk still on its way).
    """
    points = _vm_points(service, replicas)
    if point == "latest":
        if not points:
            raise UnknownPoint(
                f"vm {replicas[0].meta.vm_name} has no recovery point yet: no cut has reached "
                "every one of its disks",
                fix="wait for the initial copy and the first delta cycle of every disk",
            )
        return points[0].id, [d.state.key for d in points[0].disks]
    cut = parse_cut(point)
    for p in points:
        if p.cut == cut:
            return p.id, [d.state.key for d in p.disks]
    raise UnknownPoint(
        f"vm {replicas[0].meta.vm_name} has no recovery point {point}",
        fix="`replikant points VM` lists the retained points",
        details={"point": point},
    )


def status_vms(service: Replicas) -> list[dict[str, Any]]:
    """Every replicated VM's status entry, sorted by name (the body of GET /v1/status)."""
    now = time.time()
    by_vm: dict[str, list[Replica]] = {}
    for replica in service.store.replicas():
        by_vm.setdefault(replica.meta.vm_uuid, []).append(replica)
    vms = [vm_status(service, reps, now) for reps in by_vm.values()]
    vms.sort(key=lambda v: v["name"])
    return vms


def vm_replicas(service: Replicas, vm: str) -> list[Replica]:
    """Every replica of VM ``vm`` (name or UUID); :class:`UnknownVM` when there is none."""
    names.name(vm, "vm")
    found = service.store.find_vm(vm)
    if not found:
        raise UnknownVM(
            f"no VM named or with UUID {vm!r} is replicated to broker {service.config.broker.node}",
            fix="`replikant status` lists the VMs",
            details={"vm": vm},
        )
    return found


def served_vm(service: Ingest, vm: str) -> list[Replica]:
    """Every replica of VM ``vm`` when this member serves it; otherwise 503 ``not_owner`` naming
    the member that does (for a VM this member does not know, the owner, who routes on), so the
    operator's client follows it as an agent would."""
    names.name(vm, "vm")
    found = service.store.find_vm(vm)
    # A VM named by UUID routes to its placed member; by an unknown name, to the owner.
    service.check_owner(found[0].meta.vm_uuid if found else _as_uuid(vm))
    return vm_replicas(service, vm)


def _as_uuid(vm: str) -> str | None:
    try:
        return names.vm_uuid(vm)
    except BrokerError:
        return None


def vm_site_records(service: Replicas) -> list[tuple[uuid.UUID, str, topics.VMSiteRecord]]:
    """Every VM's retained record per site, as the control plane publishes them."""
    out: list[tuple[uuid.UUID, str, topics.VMSiteRecord]] = []
    for vm in status_vms(service):
        last = vm.get("last_point")
        for site, role in vm["roles"].items():
            record = topics.VMSiteRecord(
                name=vm["name"],
                role=role,
                generation=vm["generation"],
                health=vm["health"],
                lag_seconds=vm["lag_seconds"],
                last_point=last["id"] if last else None,
            )
            out.append((uuid.UUID(vm["uuid"]), site, record))
    return out
