"""The tier planner (broker/tiers.py): which VM points stay under a size bound, property-tested."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.tiers import (
    DEFAULT_TIERS,
    Budget,
    Candidate,
    TierPolicy,
    estimate,
    plan,
    policy_keep,
)
from broker.undo import cover_bytes

S = 10**9
MIN = 60 * S
HOUR = 3600 * S
NOW = 1000 * 24 * HOUR
POLICY = TierPolicy(DEFAULT_TIERS, app_consistent_seconds=7 * 86400.0)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Candidate], list[Budget]]:
    """A VM with 1-3 disks and up to 60 points spread over seconds to weeks."""
    disks = draw(st.integers(1, 3))
    n = draw(st.integers(0, 60))
    ages = sorted(draw(st.lists(st.integers(0, 40 * 24 * 3600), min_size=n, max_size=n)))
    points = []
    for i, age in enumerate(reversed(ages)):  # oldest first, keys grow
        costs = tuple(draw(st.integers(0, 100_000)) for _ in range(disks))
        cover = tuple(
            int.from_bytes(bytes(draw(st.lists(st.integers(0, 1), max_size=16))), "little")
            for _ in range(disks)
        )
        points.append(
            Candidate(
                key=(1, i + 1),
                cut_ns=NOW - age * S,
                app=draw(st.booleans()),
                pinned=draw(st.integers(0, 20)) == 0,
                costs=costs,
                cover=cover,
            )
        )
    grain = draw(st.sampled_from([0, 512, 4096]))
    budgets = [
        Budget(
            target=(target := draw(st.integers(0, 2_000_000))),
            cap=draw(st.integers(1, 500_000)),
            grain=grain,
            limit=draw(st.one_of(st.none(), st.integers(target, 3_000_000))),
        )
        for _ in range(disks)
    ]
    return points, budgets


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_plan_keeps_pins_and_fits_or_says_why(case: tuple[list[Candidate], list[Budget]]) -> None:
    """Pins always stay; a plan that is not over fits where every disk's dropping stops; over
    means only pins are left; the estimate never exceeds the parts or the cap per run."""
    points, budgets = case
    answer = plan(points, NOW, POLICY, budgets)
    assert {p.key for p in points if p.pinned} <= set(answer.keep)
    assert answer.estimate == estimate(points, answer.keep, budgets)
    for d, budget in enumerate(budgets):
        if answer.over[d]:
            assert all(p.pinned for p in points if p.key in answer.keep)
        else:
            assert answer.estimate[d] <= budget.drop_to
        runs = sum(1 for p in points if p.key in answer.keep)
        assert answer.estimate[d] <= min(sum(p.costs[d] for p in points), runs * budget.cap)
        if budget.grain:  # a merged run never costs more than what it covers
            every = 0
            for p in points:
                every |= p.cover[d]
            assert answer.estimate[d] <= runs * cover_bytes(every, budget.grain)


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_degrading_thins_before_it_drops(case: tuple[list[Candidate], list[Budget]]) -> None:
    """Without pressure the plan is the policy; thinning only merges points away (the oldest
    kept point stays); dropping starts with the oldest unpinned point."""
    points, budgets = case
    answer = plan(points, NOW, POLICY, budgets)
    policy = policy_keep(points, NOW, POLICY)
    pinned = {p.key for p in points if p.pinned}
    assert set(answer.keep) <= set(policy)
    if answer.degraded is None:
        assert answer.keep == policy
    if answer.degraded == "thinned":
        assert min(policy) in answer.keep
    if answer.degraded == "dropped":
        assert min(k for k in policy if k not in pinned) not in answer.keep
    unbounded = [Budget(target=1 << 60, cap=b.cap) for b in budgets]
    assert plan(points, NOW, POLICY, unbounded).degraded is None


def test_policy_windows_keep_every_minute_hour_and_day() -> None:
    """Every point of the last 10 minutes, one per minute to 2 h, one per hour to 2 days, one per
    day to 30 days; app-consistent points for their own window; the newest always."""
    ages = list(range(0, 40 * 24 * 3600, 20))  # a point every 20 s for 40 days
    points = [
        Candidate((1, i + 1), NOW - a * S, app=(i % 5000 == 0), pinned=False, costs=(1,))
        for i, a in enumerate(reversed(ages))
    ]
    keep = policy_keep(points, NOW, POLICY)
    by_age = {p.key: (NOW - p.cut_ns) // S for p in points}
    assert all(k in keep for k, a in by_age.items() if a <= 600)

    def in_tier(lo: int, hi: int) -> list[tuple[int, int]]:
        return [k for k in keep if lo < by_age[k] <= hi and keep[k] != "app"]

    assert 105 <= len(in_tier(600, 7200)) <= 111  # one per clock minute of 110 minutes
    assert 45 <= len(in_tier(7200, 2 * 86400)) <= 47  # one per clock hour
    assert 27 <= len(in_tier(2 * 86400, 30 * 86400)) <= 29  # one per clock day
    assert not in_tier(30 * 86400, 10**9)
    apps = [p.key for p in points if p.app and by_age[p.key] <= 7 * 86400]
    assert apps
    assert all(k in keep for k in apps)
    assert keep[points[-1].key] == "all"


def test_pressure_thins_the_finest_tier_first() -> None:
    """Points that rewrite the same blocks: a bound the every-point tier overflows merges that
    tier to one per minute before any older point goes, so the oldest point is still held."""
    ages = list(range(0, 3 * 3600, 10))
    same_blocks = (int.from_bytes(b"\x01" * 10, "little"),)
    points = [
        Candidate((1, i + 1), NOW - a * S, False, False, costs=(100_000,), cover=same_blocks)
        for i, a in enumerate(reversed(ages))
    ]
    policy = policy_keep(points, NOW, POLICY)
    budget = Budget(target=1 << 60, cap=10**9, grain=4096)
    full = estimate(points, policy, [budget])[0]
    answer = plan(points, NOW, POLICY, [Budget(target=full - 100, cap=10**9, grain=4096)])
    assert answer.degraded == "thinned"
    assert min(answer.keep) == min(policy)  # nothing old dropped
    assert sum(1 for k in answer.keep if answer.keep[k] == "all") < sum(
        1 for k in policy if policy[k] == "all"
    )
