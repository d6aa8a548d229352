"""Which recovery points to keep: retention tiers under a size bound (sans I/O).

The planner sees a VM's points (one cut of every disk, :func:`broker.points.pair_by_cut`), their
times, and per disk the undo bytes each point costs, and decides which points stay. It never
reads or writes anything: :meth:`broker.service.BrokerService.run_retention` feeds it and turns
the answer into drops and merges (:meth:`broker.points.PointsIndex.apply_retention`).

Arithmetic (docs/broker.md "Recovery points and their bound"). A disk's undo segments form a
chain; keeping points ``k1 < k2 < ...`` merges the segments from ``ki`` up to ``k(i+1)`` into one
run, and drops everything before ``k1``. A merged run keeps the oldest pre-image of each range,
so it costs at most the sum of its parts and at most the disk's size (``cap``). The plan's
estimate of a disk is that upper bound summed over its runs, plus ``fixed`` (bytes no point
decision can free now: files still read by an export). Degrading when the estimate is over the
disk's target: thin the finest tier to the next tier's spacing, then the next, ...; then drop
the oldest points. Pinned points (exported) and the newest point are never given up by thinning;
only pins survive the drops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from broker.undo import cover_bytes

PointKey = tuple[int, int]


@dataclass(frozen=True)
class Tier:
    """Points younger than ``until_seconds`` (and older than the finer tiers) are kept one per
    ``every_seconds`` (the newest of each such clock bucket; 0 keeps every point)."""

    name: str
    every_seconds: float
    until_seconds: float


@dataclass(frozen=True)
class TierPolicy:
    """Tiers, finest first (growing ``until_seconds``), and the app-consistent window."""

    tiers: tuple[Tier, ...]
    app_consistent_seconds: float = 7 * 86400.0

    @property
    def horizon_seconds(self) -> float:
        """How far back the policy asks for points."""
        return max([t.until_seconds for t in self.tiers] + [self.app_consistent_seconds])


DEFAULT_TIERS: Final = (
    Tier("all", 0.0, 10 * 60.0),
    Tier("minute", 60.0, 2 * 3600.0),
    Tier("hour", 3600.0, 2 * 86400.0),
    Tier("day", 86400.0, 30 * 86400.0),
)


@dataclass(frozen=True)
class Candidate:
    """One VM point as the planner sees it."""

    key: PointKey
    cut_ns: int
    app: bool
    pinned: bool
    costs: tuple[int, ...]
    """Per disk: undo bytes of the segments from this point up to the next newer point."""
    cover: tuple[int, ...] = ()
    """Per disk: the grains those segments hold undo for (:meth:`UndoSegment.coverage`), so
    that a merged run is estimated by what it covers, not by the sum of its parts."""


@dataclass(frozen=True)
class Budget:
    """One disk's limits: ``target`` for the points' bytes, ``cap`` for one merged run (the
    disk's size plus index), ``fixed`` bytes no plan can free now."""

    target: int
    cap: int
    fixed: int = 0
    grain: int = 0
    """Bytes per coverage grain (0: the candidates carry no coverage)."""
    limit: int | None = None
    """Where dropping stops (default ``target``): thinning may aim lower than dropping, to make
    room ahead by merging, without giving up points the bound does not force out yet."""

    @property
    def drop_to(self) -> int:
        """The estimate at which dropping stops."""
        return self.target if self.limit is None else self.limit


@dataclass(frozen=True)
class Plan:
    """The planner's answer."""

    keep: dict[PointKey, str]
    """Kept points and the tier that keeps each (``pinned``, ``app``, or a tier's name)."""
    degraded: str | None
    """``None``: the policy fits; ``"thinned"``: finer tiers were merged; ``"dropped"``: old
    points were dropped as well."""
    estimate: tuple[int, ...]
    """Per disk, the upper bound of what the kept points cost."""
    over: tuple[bool, ...]
    """Per disk: still over its target with everything droppable gone (pins alone exceed)."""


def tier_of(age_seconds: float, policy: TierPolicy) -> int | None:
    """Index of the tier a point of this age belongs to; ``None`` past the last tier."""
    for i, tier in enumerate(policy.tiers):
        if age_seconds <= tier.until_seconds:
            return i
    return None


def policy_keep(
    points: Sequence[Candidate], now_ns: int, policy: TierPolicy, coarsen: int = 0
) -> dict[PointKey, str]:
    """The points the tiers keep, with the tiers below ``coarsen`` thinned to the spacing of
    tier ``coarsen`` (0: the policy as written)."""
    ordered = sorted(points, key=lambda p: p.key)
    keep: dict[PointKey, str] = {}
    buckets: dict[tuple[int, int], tuple[Candidate, str]] = {}
    last = len(policy.tiers) - 1
    for p in ordered:
        age = (now_ns - p.cut_ns) / 1e9
        t = tier_of(age, policy)
        if t is not None:
            spacing = min(max(t, coarsen), last)
            every = policy.tiers[spacing].every_seconds
            if every <= 0:
                keep[p.key] = policy.tiers[t].name
            else:
                # Points come oldest first: the newest point of each bucket wins.
                bucket = math.floor(p.cut_ns / (every * 1e9))
                buckets[(spacing, bucket)] = (p, policy.tiers[t].name)
        if p.app and age <= policy.app_consistent_seconds:
            keep.setdefault(p.key, "app")
    for p, name in buckets.values():
        keep[p.key] = name
    for p in ordered:
        if p.pinned:
            keep[p.key] = "pinned"
    if ordered and ordered[-1].key not in keep:
        keep[ordered[-1].key] = "newest"
    return keep


def run_costs(
    points: Sequence[Candidate],
    kept: set[PointKey] | dict[PointKey, str],
    budgets: Sequence[Budget],
) -> list[list[int]]:
    """Per disk, the most each run costs once merged: one run per kept point, oldest first,
    from it up to the next kept point (points before the oldest kept one are dropped)."""
    ordered = sorted(points, key=lambda p: p.key)
    out: list[list[int]] = []
    for d, budget in enumerate(budgets):
        runs: list[int] = []
        total = cover = 0
        started = False
        for p in ordered:
            if p.key in kept:
                if started:
                    runs.append(_run_cost(total, cover, budget))
                started, total, cover = True, 0, 0
            if started:
                total += p.costs[d]
                cover |= p.cover[d] if p.cover else 0
        if started:
            runs.append(_run_cost(total, cover, budget))
        out.append(runs)
    return out


def _run_cost(total: int, cover: int, budget: Budget) -> int:
    cost = min(total, budget.cap)
    return min(cost, cover_bytes(cover, budget.grain)) if budget.grain else cost


def estimate(
    points: Sequence[Candidate],
    kept: set[PointKey] | dict[PointKey, str],
    budgets: Sequence[Budget],
) -> tuple[int, ...]:
    """Per disk, the most the kept points cost once retention has dropped and merged."""
    runs = run_costs(points, kept, budgets)
    return tuple(b.fixed + sum(r) for b, r in zip(budgets, runs, strict=True))


def _fits(est: Sequence[int], budgets: Sequence[Budget]) -> bool:
    return all(e <= b.target for e, b in zip(est, budgets, strict=True))


class _Runs:
    """The kept points' runs, oldest first, with their costs per disk, updated as points go."""

    def __init__(
        self, points: Sequence[Candidate], kept: dict[PointKey, str], budgets: Sequence[Budget]
    ) -> None:
        self.budgets = budgets
        self.keys: list[PointKey] = []
        self.sums: list[list[int]] = []
        self.covers: list[list[int]] = []
        for p in sorted(points, key=lambda c: c.key):
            if p.key in kept:
                self.keys.append(p.key)
                self.sums.append([0] * len(budgets))
                self.covers.append([0] * len(budgets))
            if self.keys:
                for d in range(len(budgets)):
                    self.sums[-1][d] += p.costs[d]
                    self.covers[-1][d] |= p.cover[d] if p.cover else 0
        self.costs = [self._cost(i) for i in range(len(self.keys))]
        self.totals = [b.fixed + sum(c[d] for c in self.costs) for d, b in enumerate(budgets)]

    def _cost(self, i: int) -> list[int]:
        return [
            _run_cost(self.sums[i][d], self.covers[i][d], b) for d, b in enumerate(self.budgets)
        ]

    def fits(self, *, drop: bool = False) -> bool:
        """Every disk's total is within its target (``drop``: within where dropping stops)."""
        return all(
            t <= (b.drop_to if drop else b.target)
            for t, b in zip(self.totals, self.budgets, strict=True)
        )

    def merge_gain(self, key: PointKey) -> float:
        """The share of the younger run's bytes that merging ``key`` into the run before it
        saves (0 for the oldest kept point: it has nothing to merge into)."""
        i = self.keys.index(key)
        if i == 0:
            return 0.0
        before = sum(self.costs[i - 1]) + sum(self.costs[i])
        merged = sum(
            _run_cost(self.sums[i - 1][d] + self.sums[i][d], self.covers[i - 1][d] | c, b)
            for d, (c, b) in enumerate(zip(self.covers[i], self.budgets, strict=True))
        )
        return (before - merged) / max(sum(self.costs[i]), 1)

    def remove(self, key: PointKey) -> None:
        """Give up ``key``: its run merges into the one before, or is dropped if it is first."""
        i = self.keys.index(key)
        for d in range(len(self.budgets)):
            self.totals[d] -= self.costs[i][d]
        if i > 0:
            for d in range(len(self.budgets)):
                self.totals[d] -= self.costs[i - 1][d]
                self.sums[i - 1][d] += self.sums[i][d]
                self.covers[i - 1][d] |= self.covers[i][d]
            self.costs[i - 1] = self._cost(i - 1)
            for d in range(len(self.budgets)):
                self.totals[d] += self.costs[i - 1][d]
        for column in (self.keys, self.sums, self.covers, self.costs):
            del column[i]


MIN_MERGE_GAIN: Final = 0.25
"""Thinning merges a point away only if that saves this share of its run: merging runs that
hardly overlap (random writes all over the disk) costs a rewrite and frees nothing."""


def plan(
    points: Sequence[Candidate], now_ns: int, policy: TierPolicy, budgets: Sequence[Budget]
) -> Plan:
    """Keep what the tiers ask for if it fits every disk's target. Else thin: merge points of
    the finest tier away, oldest first, where that saves bytes, then the next tier's; then drop
    the oldest points until it fits where dropping stops (``Budget.limit``). Reports the disks
    that pins alone keep over that."""
    keep = policy_keep(points, now_ns, policy)
    runs = _Runs(points, keep, budgets)
    if runs.fits():
        return Plan(keep, None, tuple(runs.totals), tuple(False for _ in budgets))
    degraded: str | None = None
    newest = max(keep)
    for tier in policy.tiers:
        for key in sorted(k for k, label in keep.items() if label == tier.name and k != newest):
            if runs.fits():
                break
            if runs.merge_gain(key) >= MIN_MERGE_GAIN:
                runs.remove(key)
                del keep[key]
                degraded = "thinned"
    for key in sorted(keep):
        if runs.fits(drop=True):
            break
        if keep[key] != "pinned":
            runs.remove(key)
            del keep[key]
            degraded = "dropped"
    over = tuple(t > b.drop_to for t, b in zip(runs.totals, budgets, strict=True))
    return Plan(keep, degraded, tuple(runs.totals), over)
