"""Where each VM of a cluster is applied: the owner's placement plan, with no I/O (decision 032).

:class:`Placer` is a pure function of its inputs, the online members and the current placement
of every VM, so a new owner that reads its predecessor's placements (retained on MQTT, recorded
in the store) continues the same plan instead of reshuffling. One call is one *round*; the
owner runs a round every few seconds and records each :class:`Move` before announcing it.

The rules, in order:

1. **Orphans first, all at once.** A VM with no placement, or placed on a member that is not
   online, goes to the least loaded member that has room (load divided by weight; ties by node
   name). Orphans are never rate-limited: a dead member's VMs must be served again at once.
   An orphan that an online member with room exports goes to that member instead: a VM not
   placed yet is served, and may be exported, by the owner, and its exports read through the
   owner's applier, which a placement elsewhere would stop.
2. **Sticky.** A VM on an online member stays there, except for a balance move.
3. **Balance, rate-limited.** A round that re-placed no orphan may move up to
   ``max_moves`` VMs, each from the most loaded member to the least loaded one, and only while
   the spread exceeds the threshold: a member's load is *out of balance* when it is outside
   ``[floor(share * (1 - tolerance)), ceil(share * (1 + tolerance))]``, where ``share`` is its
   weighted share of the VMs (capped by its capacity). A move is made only when it narrows the
   gap (donor load - 1 >= receiver load + 1, in weighted terms), so rounds converge and stop.
   A round that re-placed orphans makes no balance move: a member's death moves only its VMs.
4. **Exported VMs are held.** A balance move never takes a *pinned* VM, one whose member serves
   point-in-time exports of it (a test copy's disks, an operator's export): they read through
   that member's applier and would end with the move. Balance then uses the other VMs, or waits
   for the exports to end. A pinned VM whose member is gone is an orphan like any other (its
   exports went with the member).

Which VM a balance move takes is decided by a hash of ``(vm, receiver)`` (rendezvous), so the
choice is deterministic and spread over the donor's VMs rather than always the first by name.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

DEFAULT_TOLERANCE: Final = 0.10
"""A member may carry up to 10 % more (or less) than its weighted share before VMs move."""
DEFAULT_MAX_MOVES: Final = 16
"""Balance moves per round: with a round every 5 s, a returning member takes ~3 VMs a second."""

MoveReason = Literal["new", "orphan", "balance"]


@dataclass(frozen=True)
class Member:
    """An online cluster member that can apply VMs."""

    node: str
    weight: float = 1.0
    capacity: int | None = None  # most VMs it may carry (None: no limit)

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"member {self.node}: weight must be > 0, not {self.weight}")
        if self.capacity is not None and self.capacity < 0:
            raise ValueError(f"member {self.node}: capacity must be >= 0, not {self.capacity}")


@dataclass(frozen=True)
class Move:
    """One VM's new placement; ``source`` is where it was (None: nowhere yet)."""

    vm: str
    source: str | None
    target: str
    reason: MoveReason


@dataclass(frozen=True)
class Plan:
    """The outcome of a round: the moves to record, the resulting placement, what stays unplaced
    (no member had room) and whether the cluster is now within the balance threshold."""

    moves: tuple[Move, ...]
    placement: Mapping[str, str]
    unplaced: tuple[str, ...] = ()
    balanced: bool = True
    loads: Mapping[str, int] = field(default_factory=dict)
    held: tuple[str, ...] = ()
    """Pinned VMs on a member that balance would have given VMs (rule 4): why it did not."""


class Placer:
    """The owner's placement rule (module docstring); holds only its tuning, no state."""

    def __init__(
        self, *, tolerance: float = DEFAULT_TOLERANCE, max_moves: int = DEFAULT_MAX_MOVES
    ) -> None:
        if not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), not {tolerance}")
        if max_moves < 0:
            raise ValueError(f"max_moves must be >= 0, not {max_moves}")
        self.tolerance = tolerance
        self.max_moves = max_moves

    def plan(
        self,
        members: Iterable[Member],
        vms: Iterable[str],
        current: Mapping[str, str],
        exporters: Mapping[str, str] | None = None,
    ) -> Plan:
        """One round: ``current`` maps a VM to the member it is placed on now (absent: none),
        ``exporters`` a VM to the member that serves point-in-time exports of it: an orphan goes
        there (rule 1), and balance leaves a VM exported by its own member there (rule 4)."""
        exporters = exporters or {}
        online = {m.node: m for m in members}
        loads = dict.fromkeys(online, 0)
        placement: dict[str, str] = {}
        orphans: list[str] = []
        for vm in sorted(set(vms)):
            node = current.get(vm)
            if node in online and _has_room(online[node], loads[node]):
                placement[vm] = node
                loads[node] += 1
            else:
                orphans.append(vm)
        moves: list[Move] = []
        unplaced: list[str] = []
        for vm in orphans:
            exporter = exporters.get(vm)
            if exporter in online and _has_room(online[exporter], loads[exporter]):
                target: str | None = exporter
            else:
                target = _least_loaded(online.values(), loads)
            if target is None:
                unplaced.append(vm)
                continue
            placement[vm] = target
            loads[target] += 1
            source = current.get(vm)
            moves.append(Move(vm, source, target, "orphan" if source else "new"))
        held: list[str] = []
        if not moves:
            pinned = {vm for vm, node in exporters.items() if current.get(vm) == node}
            moves, held = self._balance(online, placement, loads, pinned)
        return Plan(
            moves=tuple(moves),
            placement=placement,
            unplaced=tuple(unplaced),
            balanced=self.within_threshold(online.values(), loads),
            loads=loads,
            held=tuple(held),
        )

    def bounds(self, members: Iterable[Member], total: int) -> dict[str, tuple[int, int]]:
        """Each member's balanced load range ``(low, high)`` for ``total`` placed VMs."""
        shares = _shares(list(members), total)
        t = self.tolerance
        return {
            node: (math.floor(share * (1 - t)), math.ceil(share * (1 + t)))
            for node, share in shares.items()
        }

    def within_threshold(self, members: Iterable[Member], loads: Mapping[str, int]) -> bool:
        """Whether every member's load is inside its :meth:`bounds`, or no move could help
        (the spread is one VM at most in weighted terms)."""
        ms = list(members)
        bounds = self.bounds(ms, sum(loads.values()))
        if all(low <= loads[n] <= high for n, (low, high) in bounds.items()):
            return True
        return _best_move(ms, loads) is None

    def _balance(
        self,
        online: Mapping[str, Member],
        placement: dict[str, str],
        loads: dict[str, int],
        pinned: Collection[str],
    ) -> tuple[list[Move], list[str]]:
        """The balance moves of a round, and the pinned VMs that stopped one."""
        moves: list[Move] = []
        members = list(online.values())
        movable = {m.node: 0 for m in members}
        for vm, node in placement.items():
            movable[node] += vm not in pinned
        while len(moves) < self.max_moves and not self.within_threshold(members, loads):
            pair = _best_move(members, loads)
            if pair is None:
                break
            if not movable[pair[0]]:
                # The member balance would take from holds only pinned VMs: the next most
                # loaded one gives instead, if a move from it still narrows the gap.
                blocked = pair[0]
                pair = _best_move(members, loads, donors={n for n, c in movable.items() if c})
                if pair is None:
                    return moves, sorted(v for v, n in placement.items() if n == blocked)
            donor, receiver = pair
            candidates = [v for v, n in placement.items() if n == donor and v not in pinned]
            vm = max(candidates, key=lambda v: _score(v, receiver))
            placement[vm] = receiver
            loads[donor] -= 1
            loads[receiver] += 1
            movable[donor] -= 1
            movable[receiver] += 1
            moves.append(Move(vm, donor, receiver, "balance"))
        return moves, []


def _has_room(member: Member, load: int) -> bool:
    return member.capacity is None or load < member.capacity


def _least_loaded(members: Iterable[Member], loads: Mapping[str, int]) -> str | None:
    open_ = [m for m in members if _has_room(m, loads[m.node])]
    if not open_:
        return None
    return min(open_, key=lambda m: ((loads[m.node] + 1) / m.weight, m.node)).node


def _best_move(
    members: list[Member], loads: Mapping[str, int], donors: Collection[str] | None = None
) -> tuple[str, str] | None:
    """The (donor, receiver) pair whose move narrows the weighted spread most, if any does;
    the donor one of ``donors`` if given."""
    givers = [m for m in members if loads[m.node] > 0 and (donors is None or m.node in donors)]
    receivers = [m for m in members if _has_room(m, loads[m.node])]
    if not givers or not receivers:
        return None
    donor = max(givers, key=lambda m: (loads[m.node] / m.weight, m.node))
    receiver = min(receivers, key=lambda m: ((loads[m.node] + 1) / m.weight, m.node))
    if donor.node == receiver.node:
        return None
    # Move only if the donor stays at least as loaded as the receiver becomes: no ping-pong.
    if (loads[donor.node] - 1) / donor.weight < (loads[receiver.node] + 1) / receiver.weight:
        return None
    return donor.node, receiver.node


def _shares(members: list[Member], total: int) -> dict[str, float]:
    """Weighted shares of ``total``, capped by capacity (the excess spread over the others)."""
    shares: dict[str, float] = {}
    left = float(total)
    open_ = list(members)
    while open_:
        weight = sum(m.weight for m in open_)
        capped = [
            m for m in open_ if m.capacity is not None and left * m.weight / weight > m.capacity
        ]
        if not capped:
            for m in open_:
                shares[m.node] = left * m.weight / weight
            break
        for m in capped:
            shares[m.node] = float(m.capacity or 0)
            left -= shares[m.node]
            open_.remove(m)
    return shares


def _score(vm: str, node: str) -> bytes:
    return hashlib.blake2b(f"{vm}\0{node}".encode(), digest_size=8).digest()


__all__ = ["DEFAULT_MAX_MOVES", "DEFAULT_TOLERANCE", "Member", "Move", "Placer", "Plan"]
