"""A VM's role at one site and every legal way to change it: a state machine without I/O.

Agents, brokers and the operator's CLI share this module so that all of them agree on what a
command may do in which state, and so that every refusal reads the same wherever an operator
meets it: it names the VM, the site, the state it is in and the command that would fix it.

A role change is two-phase (:meth:`RoleBook.begin` then :meth:`RoleBook.finish` or
:meth:`RoleBook.abort`) because the I/O a failover needs (booting a guest, shipping the final cut)
takes time: while one is in flight the VM carries an in-progress marker and a second command on it
is refused instead of racing the first. The states, the diagram and the preconditions are in
docs/failover.md.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace

CLI = "replikant failover"


class State(enum.StrEnum):
    """A VM's role at one site; the value is the name published and shown everywhere."""

    PRIMARY = "PRIMARY"
    REPLICA = "REPLICA"
    TEST = "TEST"
    FAILED_OVER = "FAILED-OVER"
    FENCED = "FENCED"


class Command(enum.StrEnum):
    """Everything that may change a VM's role at a site."""

    TEST = "test"
    STOP_TEST = "stop-test"
    PLANNED = "planned"
    HAND_OVER = "hand-over"
    UNPLANNED = "unplanned"
    COMMIT = "commit"
    CANCEL = "cancel"
    REVERSE = "reverse"
    FENCE = "fence"


@dataclass(frozen=True)
class VMRole:
    """One VM's role at one site.

    ``generation`` is the VM's replication generation (it rises by one at each promotion);
    ``prior_generation`` is kept during an uncommitted failover so that cancel can return to it;
    ``point`` is the recovery point a TEST or FAILED-OVER copy was started from; ``pending`` is
    the command in flight, if any.
    """

    vm: str
    site: str
    state: State
    generation: int
    point: str | None = None
    prior_generation: int | None = None
    pending: Command | None = None

    def describe(self) -> str:
        """``vm web1 is REPLICA at site dr (generation 3)``: the words every message starts with."""
        return (
            f"vm {self.vm} is {self.state.value} at site {self.site} (generation {self.generation})"
        )


@dataclass(frozen=True)
class Facts:
    """What the orchestrator observed before asking for a transition (the machine does no I/O).

    ``source_stopped``: the VM is shut down at its primary site (planned failover, hand-over).
    ``lag_zero``: the replica holds every byte the source wrote (hash compare after the final
    cut). ``peer_generation``/``peer_state``: what the other site says of the same VM (fence,
    hand-over, reverse); ``None`` when it was not reached.
    """

    point: str | None = None
    source_stopped: bool = False
    lag_zero: bool = False
    peer_generation: int | None = None
    peer_state: State | None = None


class RoleRefused(Exception):
    """A command that is illegal in the VM's current role; ``fix`` is what to run instead."""

    def __init__(self, role: VMRole, command: Command, reason: str, fix: str) -> None:
        self.role = role
        self.command = command
        self.reason = reason
        self.fix = fix
        super().__init__(f"{role.describe()}: {reason}; {fix}")


@dataclass(frozen=True)
class Transition:
    """An accepted command: the role before and the role it leads to once its I/O is done."""

    command: Command
    before: VMRole
    after: VMRole


def _refuse(role: VMRole, command: Command, reason: str, fix: str) -> RoleRefused:
    return RoleRefused(role, command, reason, fix)


def _state_fix(role: VMRole) -> str:
    """What an operator can do from this state, named as the command to run."""
    vm, site = role.vm, role.site
    return {
        State.PRIMARY: (
            f"it already runs here: to move it, run `{CLI} planned {vm}` (the site holding "
            f"its REPLICA takes it over)"
        ),
        State.REPLICA: f"run `{CLI} test {vm}` or `{CLI} unplanned {vm}` at site {site}",
        State.TEST: f"run `{CLI} stop-test {vm}` at site {site} first",
        State.FAILED_OVER: f"run `{CLI} commit {vm}` or `{CLI} cancel {vm}` at site {site} first",
        State.FENCED: f"run `replikant reverse {vm}` to make site {site} its replica",
    }[role.state]


def _need(role: VMRole, command: Command, *states: State) -> None:
    if role.state not in states:
        wanted = " or ".join(s.value for s in states)
        raise _refuse(role, command, f"`{command.value}` needs it {wanted} here", _state_fix(role))


def _test(role: VMRole, f: Facts) -> VMRole:
    _need(role, Command.TEST, State.REPLICA)
    return replace(role, state=State.TEST, point=f.point)


def _stop_test(role: VMRole, f: Facts) -> VMRole:
    if role.state is not State.TEST:
        raise _refuse(
            role,
            Command.STOP_TEST,
            "it has no test copy here to stop",
            f"`{CLI} test {role.vm}` at the site holding its REPLICA starts one",
        )
    return replace(role, state=State.REPLICA, point=None)


def _planned(role: VMRole, f: Facts) -> VMRole:
    _need(role, Command.PLANNED, State.REPLICA)
    if not f.source_stopped:
        raise _refuse(
            role,
            Command.PLANNED,
            "its source is still running at the primary site",
            f"shut the guest down there (`{CLI} planned {role.vm}` does this), then retry",
        )
    if not f.lag_zero:
        raise _refuse(
            role,
            Command.PLANNED,
            "the replica does not yet hold every byte the source wrote",
            f"let the final cut reach site {role.site}, then retry `{CLI} planned {role.vm}`",
        )
    return replace(role, state=State.PRIMARY, generation=role.generation + 1, point=None)


def _hand_over(role: VMRole, f: Facts) -> VMRole:
    _need(role, Command.HAND_OVER, State.PRIMARY)
    if not f.source_stopped:
        raise _refuse(
            role,
            Command.HAND_OVER,
            "the guest still runs here",
            f"stop it first; `{CLI} planned {role.vm}` does both",
        )
    if f.peer_generation is None or f.peer_generation <= role.generation:
        raise _refuse(
            role,
            Command.HAND_OVER,
            "no peer site holds it at a newer generation yet",
            f"run `{CLI} planned {role.vm}` at the site holding its REPLICA",
        )
    return replace(role, state=State.REPLICA, generation=f.peer_generation)


def _unplanned(role: VMRole, f: Facts) -> VMRole:
    _need(role, Command.UNPLANNED, State.REPLICA)
    return replace(
        role,
        state=State.FAILED_OVER,
        generation=role.generation + 1,
        prior_generation=role.generation,
        point=f.point,
    )


def _commit(role: VMRole, f: Facts) -> VMRole:
    if role.state is not State.FAILED_OVER:
        fix = (
            f"`{CLI} unplanned {role.vm}` at site {role.site} fails it over first"
            if role.state is State.REPLICA
            else _state_fix(role)
        )
        raise _refuse(role, Command.COMMIT, "there is no uncommitted failover here to commit", fix)
    return replace(role, state=State.PRIMARY, prior_generation=None, point=None)


def _cancel(role: VMRole, f: Facts) -> VMRole:
    if role.state is not State.FAILED_OVER:
        raise _refuse(
            role,
            Command.CANCEL,
            "there is no uncommitted failover here to cancel",
            _state_fix(role),
        )
    prior = role.prior_generation if role.prior_generation is not None else role.generation - 1
    return replace(role, state=State.REPLICA, generation=prior, prior_generation=None, point=None)


def _reverse(role: VMRole, f: Facts) -> VMRole:
    _need(role, Command.REVERSE, State.FENCED)
    if f.peer_state is None or f.peer_generation is None:
        raise _refuse(
            role,
            Command.REVERSE,
            "the peer site holding the VM cannot be reached, so reverse replication cannot start",
            "bring the peer site's broker and agent back, then retry "
            f"`replikant reverse {role.vm}`",
        )
    if f.peer_state is not State.PRIMARY or f.peer_generation <= role.generation:
        raise _refuse(
            role,
            Command.REVERSE,
            f"the peer holds it as {f.peer_state.value} at generation {f.peer_generation}, "
            "not as a committed PRIMARY at a newer generation",
            f"run `{CLI} commit {role.vm}` at the peer site first",
        )
    return replace(role, state=State.REPLICA, generation=f.peer_generation, point=None)


def _fence(role: VMRole, f: Facts) -> VMRole:
    _need(role, Command.FENCE, State.PRIMARY, State.FENCED)
    if f.peer_generation is None or f.peer_generation <= role.generation:
        raise _refuse(
            role,
            Command.FENCE,
            f"the peer's generation {f.peer_generation} is not newer than {role.generation}",
            "nothing to fence: this site still holds the newest generation "
            f"(`replikant status {role.vm}` shows both sites)",
        )
    return replace(role, state=State.FENCED)


_RULES: dict[Command, Callable[[VMRole, Facts], VMRole]] = {
    Command.TEST: _test,
    Command.STOP_TEST: _stop_test,
    Command.PLANNED: _planned,
    Command.HAND_OVER: _hand_over,
    Command.UNPLANNED: _unplanned,
    Command.COMMIT: _commit,
    Command.CANCEL: _cancel,
    Command.REVERSE: _reverse,
    Command.FENCE: _fence,
}


def plan(role: VMRole, command: Command, facts: Facts | None = None) -> Transition:
    """The transition ``command`` makes from ``role``, or :class:`RoleRefused` naming why not.

    Pure: it changes nothing. :class:`RoleBook` adds the in-progress marker around it.
    """
    return Transition(command, role, _RULES[command](role, facts or Facts()))


class RoleBook:
    """The roles one site holds, with the in-progress marker that refuses concurrent commands.

    The owner of the book (a broker for its site, an agent for its VMs) persists and publishes
    roles; the book only decides.
    """

    def __init__(self, site: str) -> None:
        self.site = site
        self._roles: dict[str, VMRole] = {}

    def set(self, role: VMRole) -> None:
        """Record a role learnt from disk or from the control plane."""
        if role.site != self.site:
            raise ValueError(f"role of site {role.site} given to the book of site {self.site}")
        self._roles[role.vm] = role

    def get(self, vm: str) -> VMRole | None:
        """The VM's role here, or None if this site does not know it."""
        return self._roles.get(vm)

    def roles(self) -> list[VMRole]:
        """Every role this site holds, by VM name."""
        return [self._roles[k] for k in sorted(self._roles)]

    def begin(self, vm: str, command: Command, facts: Facts | None = None) -> Transition:
        """Accept ``command`` on ``vm`` and mark it in progress, or refuse."""
        role = self._roles.get(vm)
        if role is None:
            raise RoleRefused(
                VMRole(vm, self.site, State.REPLICA, 0),
                command,
                "this site does not know the VM",
                "check the VM's name (`replikant status`) and the site you asked",
            )
        if role.pending is not None:
            raise _refuse(
                role,
                command,
                f"`{role.pending.value}` of it is already in progress here",
                f"wait for it to finish (or fail) before running `{command.value}`",
            )
        transition = plan(role, command, facts)
        self._roles[vm] = replace(role, pending=command)
        return transition

    def finish(self, transition: Transition) -> VMRole:
        """The command's I/O succeeded: the VM takes its new role."""
        self._check_pending(transition)
        self._roles[transition.before.vm] = transition.after
        return transition.after

    def abort(self, transition: Transition) -> VMRole:
        """The command's I/O failed: the VM keeps the role it had."""
        self._check_pending(transition)
        self._roles[transition.before.vm] = transition.before
        return transition.before

    def _check_pending(self, transition: Transition) -> None:
        role = self._roles.get(transition.before.vm)
        if role is None or role.pending is not transition.command:
            raise ValueError(
                f"no `{transition.command.value}` in progress for {transition.before.vm}"
            )


def check_start(role: VMRole) -> None:
    """Refuse to start the VM's guest at this site unless its role lets it run here.

    A FENCED or REPLICA site must never boot the guest from its disks: that is how an old
    primary comes back beside its promoted replica (the field report's split brain).
    """
    if role.state in (State.PRIMARY, State.FAILED_OVER, State.TEST):
        return
    if role.state is State.FENCED:
        raise RoleRefused(
            role,
            Command.FENCE,
            "another site promoted it to a newer generation, so it must not start here",
            f"run `replikant reverse {role.vm}` to make this site its replica",
        )
    raise RoleRefused(
        role,
        Command.TEST,
        "this site holds its replica, which only the failover commands may start",
        f"run `{CLI} test {role.vm}` (isolated copy) or `{CLI} unplanned {role.vm}`",
    )
