"""Retention passes: feed each VM's points to the tier planner and carry out its answer.

The planner (:mod:`broker.tiers`) decides without I/O; this module gathers what it needs from
the replicas' point indexes (sizes, pins, the bound of each disk), applies the answer disk by
disk, and turns it into the ``journal_over_policy`` alert: raised once when a disk's bound made
retention keep less than the policy asks (thinned or dropped), or pins alone hold it over;
cleared when the policy fits again. The hard bound itself is enforced by the applier before
every capture (:meth:`broker.points.PointsIndex.room_for`); passes thin early so that it
rarely has to drop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from broker.apply import ReplicaEngine
from broker.points import Key, PointInfo, VMPoint, capture_bound, key_text, pair_by_cut
from broker.tiers import Budget, Candidate, Plan, Tier, TierPolicy, plan, tier_of
from broker.undo import undo_size_bound
from common.config import BrokerConfig, journal_bound_bytes
from common.logs import get_logger

_log = get_logger("broker.retention")

PRESSURE: float = 0.75
"""A disk above this share of its bound gets a retention pass without waiting for the timer."""


def tier_policy(config: BrokerConfig) -> TierPolicy:
    """``[retention]`` as tiers."""
    r = config.retention
    return TierPolicy(
        tiers=(
            Tier("all", 0.0, r.any_point_minutes * 60),
            Tier("minute", 60.0, r.minute_hours * 3600),
            Tier("hour", 3600.0, r.hourly_hours * 3600),
            Tier("day", 86400.0, r.daily_days * 86400),
        ),
        app_consistent_seconds=r.app_consistent_days * 86400,
    )


def bound_for(config: BrokerConfig, vm_uuid: str, disk_size: int) -> int:
    """The journal bound of one disk: its VM's ``[[vms]] journal_bound``, else ``[retention]``."""
    bound: int | str = config.retention.journal_bound
    for vm in config.vms:
        if str(vm.uuid) == vm_uuid and vm.journal_bound is not None:
            bound = vm.journal_bound
    return journal_bound_bytes(bound, disk_size)


def merged_cap(disk_size: int) -> int:
    """The most one merged run of a disk can cost: every byte of it once, plus its index."""
    return undo_size_bound([(0, disk_size)])


def grain_for(disk_size: int) -> int:
    """Coverage grain of a disk: 4 KiB, coarser for disks over 256 MiB (at most 65,536 grains,
    so a segment's coverage takes at most 64 KiB of memory)."""
    return max(4096, -(-disk_size // 65536))


def candidates(
    per_disk: Sequence[Sequence[PointInfo]],
    pins: Sequence[set[Key]],
    covers: Sequence[dict[Key, int]] | None = None,
) -> tuple[list[VMPoint], list[Candidate]]:
    """A VM's points, and each as the planner sees it: per disk, the bytes (and the coverage,
    from ``covers`` by segment base) of its segments from that point's state up to the next
    point's (states between VM points ride along)."""
    points = pair_by_cut(per_disk)  # newest first
    out: list[Candidate] = []
    for j, point in enumerate(points):
        costs, cover = [], []
        for d, infos in enumerate(per_disk):
            lo = point.disks[d].state.key
            hi = points[j - 1].disks[d].state.key if j > 0 else None
            span = [p for p in infos if p.state.key >= lo and (hi is None or p.state.key < hi)]
            costs.append(sum(p.size_bytes for p in span))
            bits = 0
            for p in span:
                bits |= covers[d].get(p.state.key, 0) if covers is not None else 0
            cover.append(bits)
        out.append(
            Candidate(
                key=point.cut,
                cut_ns=point.cut_ns,
                app=point.consistency == 1,
                pinned=any(point.disks[d].state.key in pins[d] for d in range(len(per_disk))),
                costs=tuple(costs),
                cover=tuple(cover) if covers is not None else (),
            )
        )
    return points, out


@dataclass
class Verdict:
    """What one pass found for one disk (applied to its alert on the event loop)."""

    engine: ReplicaEngine
    bound: int
    journal_bytes: int
    degraded: str | None
    over_bound: int
    churn_bps: float
    horizon_seconds: float


class Retainer:
    """Runs retention passes and keeps what the alerts need between them."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.policy = tier_policy(config)
        self.last_pass = time.monotonic()
        """When the last pass ran (monotonic): the first comes one interval after start, as
        before tiers, or sooner under pressure."""
        self.tiers: dict[tuple[str, tuple[int, int]], str] = {}
        """The tier that kept each VM point (by VM uuid and cut) at the last pass."""
        self._captured: dict[tuple[str, str], tuple[float, int]] = {}

    def configure(self, engine: ReplicaEngine) -> None:
        """Give a new engine its disk's bound."""
        m = engine.replica.meta
        engine.journal_bound = bound_for(self.config, m.vm_uuid, m.disk_size)

    def tier_label(self, vm_uuid: str, point: VMPoint, now_ns: int) -> str:
        """The tier of a VM point: the last pass's answer, or by age for newer points."""
        label = self.tiers.get((vm_uuid, point.cut))
        if label is not None:
            return label
        t = tier_of((now_ns - point.cut_ns) / 1e9, self.policy)
        return self.policy.tiers[t].name if t is not None else "app"

    def under_pressure(self, engines: Sequence[ReplicaEngine]) -> bool:
        """Some disk's recovery points fill most of its bound."""
        return any(e.points.journal_bytes() > PRESSURE * e.journal_bound for e in engines)

    def run(self, engines: Sequence[ReplicaEngine], now_ns: int) -> list[Verdict]:
        """One pass over every VM whose disks all have engines (blocking)."""
        self.last_pass = time.monotonic()
        by_vm: dict[str, list[ReplicaEngine]] = {}
        for engine in engines:
            by_vm.setdefault(engine.replica.meta.vm_uuid, []).append(engine)
        verdicts: list[Verdict] = []
        tiers: dict[tuple[str, tuple[int, int]], str] = {}
        for vm_engines in by_vm.values():
            verdicts.extend(self._run_vm(vm_engines, now_ns, tiers))
        self.tiers = tiers
        return verdicts

    def _run_vm(
        self,
        engines: list[ReplicaEngine],
        now_ns: int,
        tiers: dict[tuple[str, tuple[int, int]], str],
    ) -> list[Verdict]:
        per_disk = [e.points.points(e.state(), include_hidden=True) for e in engines]
        grains = [grain_for(e.replica.meta.disk_size) for e in engines]
        covers = [e.points.coverage(g) for e, g in zip(engines, grains, strict=True)]
        points, cands = candidates(per_disk, [e.points.pinned() for e in engines], covers)
        budgets = []
        churn = [self._churn(e) for e in engines]
        for e, grain, (_rate, since) in zip(engines, grains, churn, strict=True):
            # Thin ahead by twice what the last interval brought (at most half the bound): the
            # next pass may come late, and merging, not the applier's drops, should make room.
            # Drop only what is over the bound now: the applier drops for room itself, and
            # dropping ahead would lose points a quiet guest never needs to give up.
            fixed = e.points.journal_bytes() - e.points.undo_bytes()
            cap = merged_cap(e.replica.meta.disk_size)
            bound = capture_bound(e.journal_bound)
            target = max(0, bound - min(2 * since, bound // 2))
            budgets.append(Budget(target=target, cap=cap, fixed=fixed, grain=grain, limit=bound))
        answer = plan(cands, now_ns, self.policy, budgets) if cands else None
        if answer is not None:
            vm = engines[0].replica.meta.vm_uuid
            tiers.update(((vm, cut), label) for cut, label in answer.keep.items())
        verdicts = []
        for d, engine in enumerate(engines):
            keep = disk_keep(per_disk[d], points, d, answer)
            bound = engine.journal_bound
            # A pass deletes and rewrites undo segments: a write section like an apply.
            dropped, merged = engine.store.fenced(
                engine.replica,
                engine.epoch(),
                engine.points.apply_retention,
                keep,
                bound=bound,
                grain=grains[d],
            )
            journal = engine.points.journal_bytes()
            if dropped or merged:
                _log.info(
                    "retention_applied",
                    vm=engine.replica.meta.vm_name,
                    disk=engine.replica.meta.disk_id,
                    dropped=dropped,
                    merged=merged,
                    journal_bytes=journal,
                    bound_bytes=bound,
                )
            verdicts.append(
                Verdict(
                    engine=engine,
                    bound=bound,
                    journal_bytes=journal,
                    degraded=_degraded(answer, engine),
                    over_bound=max(engine.over_bound, 0),
                    churn_bps=churn[d][0],
                    horizon_seconds=self.policy.horizon_seconds,
                )
            )
        return verdicts

    def _churn(self, engine: ReplicaEngine) -> tuple[float, int]:
        """Undo bytes per second captured since the last pass, and how many bytes."""
        key = engine.replica.key
        now, total = time.monotonic(), engine.points.churn_bytes
        then, before = self._captured.get(key, (now, total))
        self._captured[key] = (now, total)
        return ((total - before) / (now - then) if now > then else 0.0), total - before


def _degraded(answer: Plan | None, engine: ReplicaEngine) -> str | None:
    drops = engine.points.take_forced_drops()
    if drops:
        return "dropped"
    return answer.degraded if answer is not None else None


def disk_keep(
    infos: Sequence[PointInfo], points: Sequence[VMPoint], d: int, answer: Plan | None
) -> set[Key]:
    """One disk's states to keep: its state at every kept VM point, its newest state, and every
    state after the newest VM point (a lagging disk may still complete those cuts)."""
    kept = answer.keep if answer is not None else {}
    newest_cut = points[0].cut if points else (0, 0)
    keep = {p.disks[d].state.key for p in points if p.cut in kept}
    keep.update(p.state.key for p in infos if p.state.listed and p.state.cut > newest_cut)
    if infos:
        keep.add(max(p.state.key for p in infos))
    return keep


def publish(verdicts: Sequence[Verdict], now_ns: int) -> None:
    """Raise or clear each disk's ``journal_over_policy`` alert (on the event loop: the alert
    hooks publish to MQTT from there)."""
    for v in verdicts:
        e = v.engine
        if v.degraded is None and not v.over_bound:
            e.clear_condition("journal_over_policy")
            continue
        listed = e.points.points(e.state())
        oldest = listed[-1].state if listed else None
        age = (now_ns - oldest.cut_ns) / 1e9 if oldest is not None else 0.0
        held = f"{key_text(oldest.key)} ({age:.0f} s old)" if oldest is not None else "none"
        m = e.replica.meta
        if v.over_bound and e.points.pinned():
            why = f"exports pin {v.over_bound} bytes beyond it"
        elif v.over_bound:
            why = f"one batch's undo alone needs {v.over_bound} bytes more than it leaves"
        else:
            why = f"undo churn {v.churn_bps / 1e6:.1f} MB/s"
        e.raise_condition(
            "journal_over_policy",
            "warning",
            f"vm {m.vm_name} disk {m.disk_id}: recovery points hit the journal bound of "
            f"{v.bound} bytes ({why}); the policy asks for points back {v.horizon_seconds:.0f} s, "
            f"the oldest point held is {held}",
            fix="raise [retention] journal_bound (or the VM's [[vms]] journal_bound) and give "
            "the store the space, or keep fewer points; end exports nobody reads",
            vm_name=m.vm_name,
            oldest_point=held,
            policy_seconds=v.horizon_seconds,
            churn_bytes_per_second=round(v.churn_bps),
            journal_bytes=v.journal_bytes,
            bound_bytes=v.bound,
        )


def free_store_space(
    engines: Sequence[ReplicaEngine], enough: Callable[[], bool]
) -> dict[str, Any]:
    """Drop the oldest recovery points of the whole store, oldest first, until ``enough()``:
    points yield before replication does. Returns what went, for the log."""
    freed = 0
    count = 0
    while not enough():
        owners = [(e.points.oldest(), e) for e in engines]
        ranked = sorted(((o.cut_ns, e) for o, e in owners if o is not None), key=lambda x: x[0])
        for _ns, engine in ranked:
            got = engine.store.fenced(
                engine.replica, engine.epoch(), engine.points.drop_oldest, reason="store_low"
            )
            if got:
                freed += got
                count += 1
                break
        else:
            break
    return {"points_dropped": count, "bytes_freed": freed}
