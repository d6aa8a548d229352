"""The owner election as a sans-I/O machine: events in, actions out (broker/election.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from broker.election import (
    Action,
    Claim,
    ClaimAnswered,
    ClearOwner,
    Election,
    ElectionTimings,
    Event,
    MemberSeen,
    MQTTDown,
    MQTTUp,
    OwnerCleared,
    OwnerPublished,
    OwnerSeen,
    PublishOwner,
    ReadStore,
    Role,
    StartServing,
    StopServing,
    StoreRead,
    StoreReadFailed,
    Tick,
)

T = ElectionTimings()


def _connected(node: str, others: dict[str, bool], now: float = 0.0) -> Election:
    e = Election(node)
    e.handle(MQTTUp(now))
    for n, online in {node: True, **others}.items():
        e.handle(MemberSeen(now, n, online))
    return e


def _claims(actions: list[Action]) -> list[int]:
    return [a.epoch for a in actions if isinstance(a, Claim)]


def _own(e: Election, epoch: int, now: float) -> list[Action]:
    return e.handle(ClaimAnswered(now, epoch, granted=True, stored=epoch))


def test_first_in_line_claims_after_settling_and_others_wait_their_stagger() -> None:
    """With no owner, the first sorted name claims after `settle`; the second waits one stagger."""
    a = _connected("a", {"b": True})
    b = _connected("b", {"a": True})
    assert _claims(a.handle(Tick(T.settle / 2))) == []
    assert _claims(a.handle(Tick(T.settle))) == [1]
    assert _claims(b.handle(Tick(T.settle))) == []
    assert _claims(b.handle(Tick(T.settle + T.stagger))) == [1]


def test_claim_is_one_above_the_highest_epoch_announced_or_stored() -> None:
    """A claim asks for max(stored, announced) + 1."""
    e = _connected("a", {"b": False})
    e.handle(MemberSeen(0, "b", False, epoch=7))
    e.handle(ClaimAnswered(0, 3, granted=False, stored=9))  # a stray answer: only learns
    e._retry_after = 0
    assert _claims(e.handle(Tick(5))) == [10]


def test_granted_claim_starts_serving_and_publishes_then_renews_and_checks_the_store() -> None:
    """A granted claim serves and publishes the record; every `renew` it renews and reads the
    store."""
    e = _connected("a", {})
    e.handle(Tick(T.settle))
    acts = _own(e, 1, T.settle)
    assert acts == [StartServing(1), PublishOwner(1, 1)]
    assert e.handle(Tick(T.settle + T.renew)) == [PublishOwner(1, 2), ReadStore()]


def test_an_owner_whose_records_are_not_acknowledged_steps_down_within_its_lease() -> None:
    """A link that failed without noticing (MQTT still up as far as the client knows) keeps
    accepting renewals and acknowledges none: the lease runs from the last acknowledged one."""
    e = _connected("a", {})
    e.handle(Tick(T.settle))
    _own(e, 1, T.settle)
    e.handle(OwnerPublished(T.settle, 1, 1, T.settle))
    t = T.settle
    while e.role is Role.OWNER:
        t += T.tick
        acts = e.handle(Tick(t))
        assert t - T.settle < T.lease, "still owner past its lease"
    assert any(isinstance(a, StopServing) and "not renewed" in a.reason for a in acts)
    assert t - T.settle >= T.lease - T.renew


def test_tie_is_decided_by_the_store_and_the_loser_follows() -> None:
    """Two members claiming the same epoch: the store grants one; the refused one stays
    standby, follows the winner's record and does not stand again while it lives."""
    a = _connected("a", {"b": True})
    b = _connected("b", {"a": True})
    now = T.settle + T.stagger
    assert _claims(a.handle(Tick(now))) == [1]
    assert _claims(b.handle(Tick(now))) == [1]
    _own(a, 1, now)
    assert b.handle(ClaimAnswered(now, 1, granted=False, stored=1)) == []
    assert b.role is Role.STANDBY
    b.handle(OwnerSeen(now + 0.1, "a", 1, "https://a", 1))
    for step in range(1, 20):
        t = now + step * T.renew
        b.handle(OwnerSeen(t, "a", 1, "https://a", step + 1))
        assert _claims(b.handle(Tick(t))) == []


def test_a_live_owner_is_not_preempted_by_a_returning_member() -> None:
    """A member that returns with a name first in line does not claim while the owner renews."""
    a = Election("a")
    a.handle(MQTTUp(100))
    a.handle(MemberSeen(100, "a", True))
    a.handle(MemberSeen(100, "z", True))
    a.handle(OwnerSeen(100, "z", 4, "https://z", 50))
    for step in range(40):
        t = 100 + step * T.renew
        a.handle(OwnerSeen(t, "z", 4, "https://z", 51 + step))
        assert _claims(a.handle(Tick(t))) == []


def test_owner_dead_by_last_will_is_replaced_at_once_and_by_lease_after_it() -> None:
    """An owner marked offline by its last will is replaced at once; a silent one
    once its lease runs out."""
    e = _connected("b", {"a": True})
    e.handle(OwnerSeen(0, "a", 3, "https://a", 1))
    assert _claims(e.handle(Tick(T.settle))) == []
    assert _claims(e.handle(MemberSeen(T.settle + 0.05, "a", False, epoch=3))) == [4]
    s = _connected("b", {"a": True})
    s.handle(OwnerSeen(0, "a", 3, "https://a", 1))
    assert _claims(s.handle(Tick(T.lease - 0.01))) == []
    assert _claims(s.handle(Tick(T.lease))) == [4]


def test_hold_down_after_stepping_down() -> None:
    """A member that stepped down does not stand again before `hold_down`."""
    e = _connected("a", {})
    e.handle(Tick(T.settle))
    _own(e, 1, T.settle)
    t = T.settle + 0.2
    acts = e.handle(StoreRead(t, 2, "b"))
    assert StopServing(1, "the store is at epoch 2 (b)") in acts
    assert not any(isinstance(x, ClearOwner) for x in acts)  # b's record may be there
    assert _claims(e.handle(Tick(t + T.hold_down - 0.01))) == []
    assert _claims(e.handle(Tick(t + T.hold_down))) == [3]


def test_owner_steps_down_when_mqtt_is_lost_for_its_lease() -> None:
    """An owner that cannot renew for `lease - renew` stops serving by itself."""
    e = _connected("a", {})
    e.handle(Tick(T.settle))
    _own(e, 1, T.settle)
    e.handle(MQTTDown(T.settle + 0.1))
    assert e.handle(Tick(T.settle + T.renew)) == []
    acts = e.handle(Tick(T.settle + T.lease - T.renew))
    assert [type(x) for x in acts] == [StopServing]
    assert e.role is Role.STANDBY


def test_owner_steps_down_on_store_failure_and_hands_over() -> None:
    """A failed store read makes the owner stop and clear its record for a quick successor."""
    e = _connected("a", {})
    e.handle(Tick(T.settle))
    _own(e, 1, T.settle)
    acts = e.handle(StoreReadFailed(T.settle + 0.5, "EIO"))
    assert acts == [StopServing(1, "the store cannot be read: EIO"), ClearOwner(1)]


def test_frozen_owner_steps_down_before_renewing() -> None:
    """An owner whose process was frozen past its lease steps down at its first tick, before
    it would publish a renewal of its stale epoch."""
    e = _connected("a", {})
    e.handle(Tick(T.settle))
    _own(e, 1, T.settle)
    acts = e.handle(Tick(T.settle + 30))
    assert [type(x) for x in acts] == [StopServing]


def test_owner_yields_to_a_higher_epoch_and_ignores_stale_records() -> None:
    """An owner steps down on a record with a higher epoch; a lower one changes nothing, and a
    cleared record is restored."""
    e = _connected("b", {})
    e.handle(Tick(T.settle))
    _own(e, 5, T.settle)
    t = T.settle + 0.1
    assert e.handle(OwnerSeen(t, "a", 4, "https://a", 9)) == []
    assert e.handle(OwnerCleared(t)) == [PublishOwner(5, 2)]
    assert [type(x) for x in e.handle(OwnerSeen(t, "c", 6, "https://c", 1))] == [StopServing]


def test_standby_ignores_a_deposed_owners_late_renewal() -> None:
    """A renewal with a lower epoch than the live owner's does not replace it."""
    e = _connected("c", {"a": True, "b": True})
    e.handle(OwnerSeen(0, "b", 6, "https://b", 1))
    e.handle(OwnerSeen(0.1, "a", 5, "https://a", 99))
    assert e.owner is not None
    assert (e.owner.node, e.owner.epoch) == ("b", 6)


def test_timings_are_validated() -> None:
    """A renew interval over half the lease is refused with the reason."""
    with pytest.raises(ValidationError, match="half the lease"):
        ElectionTimings(lease=1.0, renew=0.8)


# -- every interleaving: a small cluster, a shared store, a lossy, reordering bus


@dataclass
class _Sim:
    nodes: list[str]
    store_epoch: int = 0
    store_owner: str | None = None
    now: float = 0.0
    members: dict[str, Election] = field(default_factory=dict)
    bus: list[tuple[str, Event]] = field(default_factory=list)
    grants: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for n in self.nodes:
            self.members[n] = Election(n)
            self.run(n, MQTTUp(self.now))
            self.broadcast(MemberSeen(self.now, n, True))

    def broadcast(self, ev: Event) -> None:
        for n in self.nodes:
            self.bus.append((n, ev))

    def run(self, node: str, ev: Event) -> None:
        pending = self.members[node].handle(ev)
        while pending:
            act = pending.pop(0)
            if isinstance(act, Claim):
                granted = act.epoch > self.store_epoch
                if granted:
                    self.store_epoch, self.store_owner = act.epoch, node
                    assert act.epoch not in self.grants
                    self.grants[act.epoch] = node
                answer = ClaimAnswered(self.now, act.epoch, granted, self.store_epoch)
                pending += self.members[node].handle(answer)
            elif isinstance(act, PublishOwner):
                self.broadcast(OwnerSeen(self.now, node, act.epoch, node, act.seq))
                pending += self.members[node].handle(
                    OwnerPublished(self.now, act.epoch, act.seq, self.now)
                )
            elif isinstance(act, ClearOwner):
                self.broadcast(OwnerCleared(self.now))
            elif isinstance(act, ReadStore):
                pending += self.members[node].handle(
                    StoreRead(self.now, self.store_epoch, self.store_owner)
                )

    def fenced_owners(self) -> list[str]:
        """Members that believe they own *and* would pass the store's fence."""
        return [
            n
            for n, e in self.members.items()
            if e.role is Role.OWNER
            and e.epoch == self.store_epoch
            and self.grants.get(e.epoch) == n
        ]


_STEP = st.one_of(
    st.tuples(st.just("tick"), st.integers(0, 2), st.floats(0.01, 3.0)),
    st.tuples(st.just("deliver"), st.integers(0, 40), st.just(0.0)),
    st.tuples(st.just("drop"), st.integers(0, 40), st.just(0.0)),
    st.tuples(st.just("mqtt_down"), st.integers(0, 2), st.just(0.0)),
    st.tuples(st.just("mqtt_up"), st.integers(0, 2), st.just(0.0)),
    st.tuples(st.just("will"), st.integers(0, 2), st.just(0.0)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_STEP, min_size=1, max_size=80))
def test_no_two_owners_in_any_interleaving(steps: list[tuple[str, int, float]]) -> None:
    """Whatever the order, loss and delay of messages and ticks, the store grants each epoch
    to one member, and at most one member at a time owns with the store's current epoch."""
    sim = _Sim(["a", "b", "c"])
    for kind, i, dt in steps:
        node = sim.nodes[i % 3] if kind not in {"deliver", "drop"} else ""
        if kind == "tick":
            sim.now += dt
            sim.run(node, Tick(sim.now))
        elif kind in ("deliver", "drop") and sim.bus:
            target, ev = sim.bus.pop(i % len(sim.bus))
            if kind == "deliver":
                sim.run(target, ev)
        elif kind == "mqtt_down":
            sim.run(node, MQTTDown(sim.now))
        elif kind == "mqtt_up":
            sim.run(node, MQTTUp(sim.now))
        elif kind == "will":
            sim.broadcast(MemberSeen(sim.now, node, False))
        assert len(sim.fenced_owners()) <= 1


@settings(max_examples=100, deadline=None)
@given(st.lists(_STEP, min_size=1, max_size=40))
def test_a_quiet_cluster_settles_on_exactly_one_owner(steps: list[tuple[str, int, float]]) -> None:
    """After any turmoil, once MQTT is up everywhere and every message is delivered, time
    brings exactly one owner that every other member follows."""
    sim = _Sim(["a", "b", "c"])
    for kind, i, dt in steps:
        if kind == "tick":
            sim.now += dt
            sim.run(sim.nodes[i % 3], Tick(sim.now))
        elif kind == "mqtt_down":
            sim.run(sim.nodes[i % 3], MQTTDown(sim.now))
        elif kind == "drop" and sim.bus:
            sim.bus.pop(i % len(sim.bus))
    for n in sim.nodes:
        if sim.members[n]._connected_since is None:
            sim.run(n, MQTTUp(sim.now))
        sim.broadcast(MemberSeen(sim.now, n, True))
    for _ in range(200):
        sim.now += 0.1
        while sim.bus:
            target, ev = sim.bus.pop(0)
            sim.run(target, ev)
        for n in sim.nodes:
            sim.run(n, Tick(sim.now))
    owners = [n for n, e in sim.members.items() if e.role is Role.OWNER]
    assert len(owners) == 1
    assert sim.fenced_owners() == owners
    for n, e in sim.members.items():
        if n != owners[0]:
            assert e.owner is not None
            assert e.owner.node == owners[0]
