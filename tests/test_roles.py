"""The VM role state machine: every state against every command (common/roles.py)."""

from __future__ import annotations

import typing

import pytest

from common import topics
from common.roles import (
    Command,
    Facts,
    RoleBook,
    RoleRefused,
    State,
    VMRole,
    check_start,
    plan,
)

GEN = 3

# Facts that satisfy every precondition a command can have, so that the only reason left to
# refuse is the state itself.
GOOD = Facts(
    point="p-1",
    source_stopped=True,
    lag_zero=True,
    peer_generation=GEN + 1,
    peer_state=State.PRIMARY,
)

LEGAL: dict[tuple[State, Command], tuple[State, int]] = {
    (State.REPLICA, Command.TEST): (State.TEST, GEN),
    (State.TEST, Command.STOP_TEST): (State.REPLICA, GEN),
    (State.REPLICA, Command.PLANNED): (State.PRIMARY, GEN + 1),
    (State.PRIMARY, Command.HAND_OVER): (State.REPLICA, GEN + 1),
    (State.REPLICA, Command.UNPLANNED): (State.FAILED_OVER, GEN + 1),
    (State.FAILED_OVER, Command.COMMIT): (State.PRIMARY, GEN),
    (State.FAILED_OVER, Command.CANCEL): (State.REPLICA, GEN - 1),
    (State.FENCED, Command.REVERSE): (State.REPLICA, GEN + 1),
    (State.PRIMARY, Command.FENCE): (State.FENCED, GEN),
    (State.FENCED, Command.FENCE): (State.FENCED, GEN),
}


def _role(state: State) -> VMRole:
    prior = GEN - 1 if state is State.FAILED_OVER else None
    return VMRole("web1", "dr", state, GEN, prior_generation=prior)


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("command", list(Command))
def test_every_state_and_command(state: State, command: Command) -> None:
    """A legal pair leads to its documented role; every other pair refuses naming the state."""
    role = _role(state)
    if (state, command) in LEGAL:
        want_state, want_gen = LEGAL[(state, command)]
        t = plan(role, command, GOOD)
        assert (t.after.state, t.after.generation) == (want_state, want_gen)
        assert t.before == role
        return
    with pytest.raises(RoleRefused) as info:
        plan(role, command, GOOD)
    text = str(info.value)
    assert f"vm web1 is {state.value} at site dr" in text
    assert "`replikant " in info.value.fix, text


def test_published_names_match_the_schema() -> None:
    """Every state's published name is a valid role of the retained VM record."""
    assert {s.value for s in State} == set(typing.get_args(topics.Role))
    assert State.FAILED_OVER.value == "FAILED-OVER"


@pytest.mark.parametrize(
    ("command", "facts", "needle"),
    [
        (Command.PLANNED, Facts(lag_zero=True), "still running"),
        (Command.PLANNED, Facts(source_stopped=True), "final cut"),
    ],
)
def test_planned_preconditions(command: Command, facts: Facts, needle: str) -> None:
    """A planned failover refuses while the source runs or the replica lags."""
    with pytest.raises(RoleRefused, match=needle):
        plan(_role(State.REPLICA), command, facts)


def test_hand_over_needs_newer_peer_and_stopped_guest() -> None:
    """The old primary hands over only once stopped and once the peer holds a newer generation."""
    role = _role(State.PRIMARY)
    with pytest.raises(RoleRefused, match="still runs here"):
        plan(role, Command.HAND_OVER, Facts(peer_generation=GEN + 1))
    with pytest.raises(RoleRefused, match="newer generation"):
        plan(role, Command.HAND_OVER, Facts(source_stopped=True, peer_generation=GEN))


def test_fence_needs_a_newer_generation() -> None:
    """Learning an equal or older generation never fences a primary."""
    for gen in (None, GEN - 1, GEN):
        with pytest.raises(RoleRefused, match="nothing to fence"):
            plan(_role(State.PRIMARY), Command.FENCE, Facts(peer_generation=gen))


def test_reverse_needs_a_reachable_committed_peer() -> None:
    """Reverse refuses at once when the peer is unreachable or its failover is uncommitted."""
    role = _role(State.FENCED)
    with pytest.raises(RoleRefused, match="cannot be reached") as info:
        plan(role, Command.REVERSE, Facts())
    assert "replikant reverse web1" in info.value.fix
    with pytest.raises(RoleRefused, match="FAILED-OVER") as info:
        plan(
            role,
            Command.REVERSE,
            Facts(peer_state=State.FAILED_OVER, peer_generation=GEN + 1),
        )
    assert "replikant failover commit web1" in info.value.fix


def test_cancel_returns_to_the_prior_generation_and_test_keeps_the_point() -> None:
    """Unplanned then cancel is a round trip; a test copy remembers its point until stopped."""
    start = _role(State.REPLICA)
    failed = plan(start, Command.UNPLANNED, Facts(point="p-7")).after
    assert failed.point == "p-7"
    assert failed.prior_generation == GEN
    assert plan(failed, Command.CANCEL).after == start
    tested = plan(start, Command.TEST, Facts(point="p-2")).after
    assert tested.point == "p-2"
    assert plan(tested, Command.STOP_TEST).after == start


def test_second_concurrent_command_is_refused() -> None:
    """While one failover of a VM is in progress, a second one is refused naming the first."""
    book = RoleBook("dr")
    book.set(_role(State.REPLICA))
    first = book.begin("web1", Command.UNPLANNED, Facts(point="latest"))
    with pytest.raises(RoleRefused, match="`unplanned` of it is already in progress"):
        book.begin("web1", Command.UNPLANNED, Facts(point="latest"))
    with pytest.raises(RoleRefused, match="already in progress"):
        book.begin("web1", Command.TEST)
    assert book.finish(first).state is State.FAILED_OVER
    assert book.get("web1") == first.after
    again = book.begin("web1", Command.COMMIT)
    assert book.abort(again).state is State.FAILED_OVER
    with pytest.raises(ValueError, match="no `commit` in progress"):
        book.finish(again)


def test_book_refuses_unknown_vm_and_foreign_site() -> None:
    """A VM the site does not know and a role of another site are refused, not invented."""
    book = RoleBook("dr")
    with pytest.raises(RoleRefused, match="does not know the VM"):
        book.begin("ghost", Command.TEST)
    with pytest.raises(ValueError, match="site prod"):
        book.set(VMRole("web1", "prod", State.PRIMARY, 1))
    book.set(_role(State.TEST))
    assert [r.vm for r in book.roles()] == ["web1"]


@pytest.mark.parametrize("state", list(State))
def test_start_allowed_only_where_the_guest_may_run(state: State) -> None:
    """The guest may start where it is PRIMARY, FAILED-OVER or a TEST copy; never when FENCED."""
    role = _role(state)
    if state in (State.PRIMARY, State.FAILED_OVER, State.TEST):
        check_start(role)
        return
    with pytest.raises(RoleRefused) as info:
        check_start(role)
    assert state.value in str(info.value)
    fix = "replikant reverse web1" if state is State.FENCED else "replikant failover test web1"
    assert fix in info.value.fix
