"""When a disk with no batch of a VM cut is still known at that cut (decision 004, rules 2, 3).

An idle disk ships no batch (issue 10, point 6), and a failed upload merges its changes into the
disk's next cut, so a VM cut may lack some disk's batch. The disk's contents at that cut are
still known when its next batch says its first change came later (``first_change_cut``, rule 2)
or when its agent stated that it is still as after its newest batch (:class:`Unchanged`, kept in
memory by :mod:`broker.current`, rule 3). :func:`broker.points.pair_by_cut` asks here.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from broker.undo import CutKey, StateInfo


@dataclass(frozen=True)
class Unchanged:
    """An agent's statement: the disk is as after batch ``seq`` through VM cut ``cut_id``."""

    generation: int
    seq: int
    cut_id: int
    cut_ns: int


class _HasState(Protocol):
    @property
    def state(self) -> StateInfo: ...


P = TypeVar("P", bound=_HasState)


@dataclass(frozen=True)
class Span(Generic[P]):
    """Cut ids ``first..last`` of ``generation`` at which the disk is as after ``point``."""

    generation: int
    first: int
    last: int
    point: P


def unchanged_spans(infos: Sequence[P], current: Unchanged | None) -> list[Span[P]]:
    """The spans of cuts a disk has no batch of but is known at, sorted.

    Rule 2: batch ``S+1`` says it holds no change before ``first_change_cut``, so the cuts after
    ``S``'s and below that are ``S``'s contents (0, unknown age, says nothing). Rule 3: the agent
    said the newest state still held at a later cut.
    """
    chain = sorted(
        (p for p in infos if p.state.listed and p.state.cut_id > 0), key=lambda p: p.state.key
    )
    spans: list[Span[P]] = []
    for a, b in itertools.pairwise(chain):
        sa, sb = a.state, b.state
        adjacent = sb.generation == sa.generation and sb.seq == sa.seq + 1
        if adjacent and sb.first_change_cut > sa.cut_id + 1:
            spans.append(Span(sa.generation, sa.cut_id + 1, sb.first_change_cut - 1, a))
    if chain and current is not None:
        last = chain[-1].state
        if (current.generation, current.seq) == last.key and current.cut_id > last.cut_id:
            spans.append(Span(last.generation, last.cut_id + 1, current.cut_id, chain[-1]))
    return spans


def span_at(spans: list[Span[P]], cut: CutKey) -> P | None:
    """The state a disk is known to hold at ``cut`` by one of ``spans`` (None: unknown)."""
    i = bisect.bisect_right(spans, cut, key=lambda s: (s.generation, s.first)) - 1
    if i >= 0 and spans[i].generation == cut[0] and spans[i].first <= cut[1] <= spans[i].last:
        return spans[i].point
    return None
