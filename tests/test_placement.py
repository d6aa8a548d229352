"""The owner's placement rule (broker/placement.py), without sockets: properties over random
clusters, and the scenarios decision 032 names (a death, a return, weights, capacity)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.placement import Member, Placer, Plan

NODES = [f"b{i}" for i in range(6)]


def _converge(
    placer: Placer, members: list[Member], vms: list[str], current: dict[str, str]
) -> tuple[dict[str, str], int]:
    """Run rounds until one moves nothing; returns the placement and how many rounds moved."""
    rounds = 0
    while True:
        plan = placer.plan(members, vms, current)
        if not plan.moves:
            return dict(plan.placement), rounds
        current = dict(plan.placement)
        rounds += 1
        assert rounds < 1000, "placement never settles"


clusters = st.builds(
    lambda nodes, weights, n: (
        [Member(node, weight=w) for node, w in zip(nodes, weights, strict=False)],
        [f"vm-{i:04d}" for i in range(n)],
    ),
    st.lists(st.sampled_from(NODES), min_size=1, max_size=6, unique=True),
    st.lists(st.sampled_from([1.0, 1.0, 2.0, 0.5]), min_size=6, max_size=6),
    st.integers(min_value=0, max_value=200),
)


@settings(max_examples=60, deadline=None)
@given(clusters, st.data())
def test_every_vm_is_placed_once_on_an_online_member(
    cluster: tuple[list[Member], list[str]], data: st.DataObject
) -> None:
    """Whatever the current placement (stale, on dead nodes, missing), one round places every VM
    on exactly one online member, and no VM moves twice in a round."""
    members, vms = cluster
    chosen = data.draw(st.lists(st.sampled_from(vms), unique=True)) if vms else []
    current = {vm: data.draw(st.sampled_from([*NODES, "gone"])) for vm in chosen}
    plan = Placer(max_moves=data.draw(st.integers(0, 20))).plan(members, vms, current)
    online = {m.node for m in members}
    assert set(plan.placement) == set(vms)
    assert set(plan.placement.values()) <= online
    assert sum(plan.loads.values()) == len(vms)
    assert len({m.vm for m in plan.moves}) == len(plan.moves)
    for move in plan.moves:
        assert plan.placement[move.vm] == move.target
        assert current.get(move.vm) == move.source
    # Sticky: a VM already on an online member moves only for balance.
    for vm, node in current.items():
        if node in online and plan.placement[vm] != node:
            assert any(m.vm == vm and m.reason == "balance" for m in plan.moves)


@settings(max_examples=40, deadline=None)
@given(clusters, st.data())
def test_a_death_moves_only_the_dead_members_vms(
    cluster: tuple[list[Member], list[str]], data: st.DataObject
) -> None:
    """From a settled placement, a member's death moves its VMs and no other, and the survivors
    end within the balance threshold."""
    members, vms = cluster
    if len(members) < 2:
        members = [*members, Member("extra")]
    placer = Placer()
    settled, _ = _converge(placer, members, vms, {})
    dead = data.draw(st.sampled_from(members))
    survivors = [m for m in members if m != dead]
    plan = placer.plan(survivors, vms, settled)
    assert {m.vm for m in plan.moves} == {vm for vm, n in settled.items() if n == dead.node}
    assert all(m.reason == "orphan" for m in plan.moves)
    assert all(node != dead.node for node in plan.placement.values())
    final, _ = _converge(placer, survivors, vms, dict(plan.placement))
    loads = {m.node: 0 for m in survivors}
    loads.update(Counter(final.values()))
    assert placer.within_threshold(survivors, loads)


@settings(max_examples=40, deadline=None)
@given(clusters, st.randoms(use_true_random=False))
def test_the_same_inputs_give_the_same_plan(
    cluster: tuple[list[Member], list[str]], rnd: object
) -> None:
    """The plan depends on the inputs only, not on their order: a new owner reading the same
    placements continues the same plan."""
    members, vms = cluster
    assert isinstance(rnd, random.Random)
    current = {vm: members[i % len(members)].node for i, vm in enumerate(vms) if i % 3}
    a = Placer(max_moves=5).plan(members, vms, current)
    shuffled_members, shuffled_vms = members[:], vms[:]
    rnd.shuffle(shuffled_members)
    rnd.shuffle(shuffled_vms)
    items = list(current.items())
    rnd.shuffle(items)
    b = Placer(max_moves=5).plan(shuffled_members, shuffled_vms, dict(items))
    assert _same(a, b)


def _same(a: Plan, b: Plan) -> bool:
    return set(a.moves) == set(b.moves) and dict(a.placement) == dict(b.placement)


def test_a_returning_member_is_filled_at_the_rate_limit() -> None:
    """A member that comes back takes VMs at most ``max_moves`` a round, until every load is
    within 10 % of its share: no storm."""
    placer = Placer(max_moves=16, tolerance=0.10)
    vms = [f"vm-{i:04d}" for i in range(1000)]
    three = [Member("a"), Member("b"), Member("c")]
    two, _ = _converge(placer, three[:2], vms, {})
    assert Counter(two.values()) == {"a": 500, "b": 500}
    current, rounds = dict(two), 0
    while True:
        plan = placer.plan(three, vms, current)
        assert len(plan.moves) <= 16
        assert all(m.reason == "balance" and m.target == "c" for m in plan.moves)
        if not plan.moves:
            break
        current, rounds = dict(plan.placement), rounds + 1
    loads = Counter(current.values())
    assert all(300 <= load <= 367 for load in loads.values()), loads
    assert rounds == pytest.approx(300 / 16, abs=2)
    assert placer.plan(three, vms, current).moves == ()


def test_balance_never_moves_an_exported_vm() -> None:
    """A returning member is filled from the VMs that are not exported: a pinned VM stays on
    its member (its exports read through that member's applier), a busier member gives
    instead when the busiest holds only pinned VMs, a cluster whose donors are all pinned
    reports the VMs that hold balance back, and a pinned VM whose member died moves anyway."""
    placer = Placer(max_moves=100)
    a, b, c = Member("a"), Member("b"), Member("c")
    vms = [f"vm-{i}" for i in range(6)]
    on_a = dict.fromkeys(vms, "a")
    pinned = set(vms[:4])
    plan = placer.plan([a, b], vms, on_a, exporters=dict.fromkeys(pinned, "a"))
    moved = {m.vm for m in plan.moves}
    assert moved
    assert not moved & pinned
    assert all(plan.placement[vm] == "a" for vm in pinned)
    # Without the pins the same round takes a pinned VM: the pins, not luck, kept them.
    assert {m.vm for m in placer.plan([a, b], vms, on_a).moves} & pinned
    # Exported by a member it is not placed on (a stale record): no pin.
    assert {m.vm for m in placer.plan([a, b], vms, on_a, dict.fromkeys(vms, "b")).moves}

    # The busiest member's VMs are all pinned: the next one gives, while that narrows the gap.
    current = {**dict.fromkeys(vms[:4], "a"), **dict.fromkeys(vms[4:], "b")}
    plan = placer.plan([a, b, c], vms, current, exporters=dict.fromkeys(vms[:4], "a"))
    assert [(m.source, m.target) for m in plan.moves] == [("b", "c")]
    assert plan.held == tuple(vms[:4])
    assert not plan.balanced

    # Every VM pinned: nothing moves, and the plan says which VMs hold it.
    plan = placer.plan([a, b], vms, on_a, exporters=dict.fromkeys(vms, "a"))
    assert (plan.moves, plan.held, plan.balanced) == ((), tuple(vms), False)
    # Once the exports end, balance resumes.
    assert placer.plan([a, b], vms, on_a, exporters={}).moves

    # A dead member's pinned VM is an orphan: its exports died with the member.
    plan = placer.plan([b], vms, on_a, exporters=dict.fromkeys(vms, "a"))
    assert {m.reason for m in plan.moves} == {"orphan"}
    assert set(plan.placement.values()) == {"b"}


def test_a_vm_not_placed_yet_goes_to_the_member_that_exports_it() -> None:
    """The owner serves (and may export) a VM before its first placement; that placement keeps
    the VM with its exporter, where least-loaded would have sent it elsewhere, unless the
    exporter is gone or full."""
    placer = Placer()
    a, b = Member("a"), Member("b")
    vms = ["vm-new", "vm-other"]
    # Least loaded, ties by name: without exports both new VMs would be spread, vm-new to a.
    assert placer.plan([a, b], vms, {}).placement == {"vm-new": "a", "vm-other": "b"}
    plan = placer.plan([a, b], vms, {}, exporters={"vm-new": "b"})
    assert plan.placement["vm-new"] == "b"
    assert [(m.vm, m.source, m.target, m.reason) for m in plan.moves if m.vm == "vm-new"] == [
        ("vm-new", None, "b", "new")
    ]
    # The exporter is not online: least loaded, as for any orphan.
    assert placer.plan([a], vms, {}, exporters={"vm-new": "b"}).placement["vm-new"] == "a"
    # The exporter has no room: least loaded among those that have.
    full = Member("b", capacity=0)
    assert placer.plan([a, full], vms, {}, exporters={"vm-new": "b"}).placement == {
        "vm-new": "a",
        "vm-other": "a",
    }


def test_weights_and_capacity_shape_the_shares() -> None:
    """A member of weight 2 carries twice the VMs of one of weight 1; a full member takes no
    more, and VMs beyond every member's capacity stay unplaced (and are reported)."""
    placer = Placer(max_moves=1000)
    vms = [f"vm-{i:03d}" for i in range(300)]
    placed, _ = _converge(placer, [Member("big", weight=2.0), Member("small")], vms, {})
    assert Counter(placed.values()) == {"big": 200, "small": 100}
    full = placer.plan([Member("x", capacity=10), Member("y", capacity=20)], vms, {})
    assert Counter(full.placement.values()) == {"x": 10, "y": 20}
    assert len(full.unplaced) == 270
    assert not set(full.unplaced) & set(full.placement)


def test_bad_tuning_is_refused() -> None:
    """A weight, capacity, tolerance or rate that cannot work is refused with its name."""
    with pytest.raises(ValueError, match="weight"):
        Member("a", weight=0)
    with pytest.raises(ValueError, match="capacity"):
        Member("a", capacity=-1)
    with pytest.raises(ValueError, match="tolerance"):
        Placer(tolerance=1.5)
    with pytest.raises(ValueError, match="max_moves"):
        Placer(max_moves=-1)
