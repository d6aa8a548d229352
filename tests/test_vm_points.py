"""The pairing rule of VM points, VM-level retention and the agent's cut ids, without processes.

A model VM writes an increasing counter to disk0, then to disk1, ..., cuts all its disks at one
instant now and then, and ships each disk's batch of a cut with one of three outcomes: acked,
durable but the ack lost (the broker has it, the agent does not know), or failed (the agent
merges it into the next cut). The broker's per-disk chains that result are fed to the real
pairing function; every VM point must hold the counters of one instant.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.errors import TrackingError
from agents.state import CutClock
from broker.errors import UnknownPoint
from broker.points import PointInfo, StateInfo, cut_text, pair_by_cut, parse_cut
from broker.retention import candidates, disk_keep
from broker.tiers import Budget, Tier, TierPolicy, plan
from broker.unchanged import Unchanged

HOUR = 3600 * 10**9


def _chains(
    disks: int, outcomes: list[list[str]], writes: list[int]
) -> tuple[list[list[PointInfo]], dict[tuple[int, int, int], int]]:
    """Each disk's broker chain, and the counter every disk state holds.

    ``outcomes[c][d]`` is how disk ``d``'s batch of cut ``c + 1`` went; ``writes[c]`` how many
    counter rounds the guest wrote before that cut. Returns the listed states per disk (newest
    first, as PointsIndex.points gives them) and ``(disk, generation, seq) -> counter``.
    """
    counter = 0
    chains: list[list[StateInfo]] = [[] for _ in range(disks)]
    held: dict[tuple[int, int, int], int] = {}
    for c, (row, n) in enumerate(zip(outcomes, writes, strict=True), start=1):
        # The guest writes disk0 then disk1 ... for each round: at a cut every disk holds the
        # last completed round, and the round in progress is on a prefix of the disks.
        counter += n
        partial = (c * 7) % (disks + 1)  # disks that already hold counter + 1
        for d, outcome in enumerate(row):
            if outcome == "failed":
                continue  # not durable: the changes go into the next cut of this disk
            seq = len(chains[d]) + 1
            chains[d].append(StateInfo(1, seq, c * 10**9, 0, False, cut_id=c))
            held[(d, 1, seq)] = counter + (1 if d < partial else 0)
        counter += 1 if partial else 0
    infos = [[PointInfo(s, 0, latest=False) for s in reversed(chain)] for chain in chains]
    return infos, held


_outcome = st.sampled_from(["acked", "acked", "acked", "lost_ack", "failed"])


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    disks=st.integers(2, 4),
    cuts=st.integers(1, 40),
)
def test_every_vm_point_holds_one_instant_of_every_disk(
    data: st.DataObject, disks: int, cuts: int
) -> None:
    """Whatever acks are lost or batches fail, each VM point's disks keep the write order."""
    outcomes = data.draw(
        st.lists(st.lists(_outcome, min_size=disks, max_size=disks), min_size=cuts, max_size=cuts)
    )
    writes = data.draw(st.lists(st.integers(0, 5), min_size=cuts, max_size=cuts))
    infos, held = _chains(disks, outcomes, writes)
    points = pair_by_cut(infos)
    durable_everywhere = {
        c for c, row in enumerate(outcomes, start=1) if all(o != "failed" for o in row)
    }
    assert {p.cut[1] for p in points} == durable_everywhere
    for p in points:
        assert len({d.state.cut_id for d in p.disks}) == 1
        values = [held[(i, *d.state.key)] for i, d in enumerate(p.disks)]
        # Written disk0 first: along the disks the counter never grows, and drops by at most one.
        assert all(a - b in (0, 1) for a, b in itertools.pairwise(values)), values


def test_pairing_by_seq_after_one_lost_ack_breaks_write_order_and_pairing_by_cut_does_not() -> None:
    """One failed disk1 batch shifts its seqs for good: pairing by seq joins different cuts."""
    outcomes = [["acked", "acked"], ["lost_ack", "failed"], ["acked", "acked"], ["acked", "acked"]]
    infos, held = _chains(2, outcomes, [3, 3, 3, 3])
    # The old rule: the (generation, seq) every disk has.
    by_seq = [{p.state.key: p for p in disk} for disk in infos]
    broken = [
        key
        for key in by_seq[0].keys() & by_seq[1].keys()
        if held[(0, *key)] - held[(1, *key)] not in (0, 1)
    ]
    assert broken, "the scenario should break the old pairing"
    points = pair_by_cut(infos)
    assert [p.id for p in points] == ["1:4", "1:3", "1:1"]
    for p in points:
        assert held[(0, *p.disks[0].state.key)] - held[(1, *p.disks[1].state.key)] in (0, 1)
    # disk0 is one seq ahead from cut 2 on: its VM point 1:4 is its seq 4, disk1's seq 3.
    assert [d.id for d in points[0].disks] == ["1-4", "1-3"]


def test_states_without_a_cut_id_or_hidden_are_never_vm_points() -> None:
    """A state from before cut ids (cut id 0) or a FULL batch's state pairs with nothing."""
    legacy = PointInfo(StateInfo(1, 5, 1, 0, False), 0, latest=True)
    full = PointInfo(StateInfo(1, 6, 2, 0, True, cut_id=9), 0, latest=True)
    other = PointInfo(StateInfo(1, 6, 2, 0, False, cut_id=9), 0, latest=True)
    assert pair_by_cut([[legacy], [legacy]]) == []
    assert pair_by_cut([[full], [other]]) == []
    assert [p.id for p in pair_by_cut([[other], [other]])] == ["1:9"]


def _state(seq: int, cut: int, first_change: int = 0) -> PointInfo:
    return PointInfo(
        StateInfo(1, seq, cut, 0, False, cut_id=cut, first_change_cut=first_change), 0, latest=False
    )


def test_an_unchanged_disk_joins_the_points_of_cuts_it_has_no_batch_of() -> None:
    """Decision 004 rules 2 and 3: a disk known unchanged at a cut pairs with its prior state."""
    busy = [_state(s, s) for s in range(1, 11)]  # cuts 1..10, one batch each
    # The idle disk: batch 1 at cut 1, then batch 2 at cut 8 whose first change came at cut 6.
    idle = [_state(1, 1), _state(2, 8, first_change=6)]
    ids = [p.id for p in pair_by_cut([busy, idle])]
    assert ids == ["1:8", "1:5", "1:4", "1:3", "1:2", "1:1"]  # 6, 7: changed, no batch of them
    by_id = {p.id: p for p in pair_by_cut([busy, idle])}
    assert by_id["1:5"].disks[1].id == "1-1"
    # Rule 3: the agent said batch 2 still holds through cut 9 (not 10): 1:9 exists, 1:10 not.
    stated = Unchanged(generation=1, seq=2, cut_id=9, cut_ns=9)
    ids = [p.id for p in pair_by_cut([busy, idle], [None, stated])]
    assert ids[:2] == ["1:9", "1:8"]
    # A statement about another batch than the disk's newest says nothing.
    stale = Unchanged(generation=1, seq=1, cut_id=10, cut_ns=10)
    assert next(p.id for p in pair_by_cut([busy, idle], [None, stale])) == "1:8"
    # No first-change statement (0: unknown age): only exact cuts pair.
    unknown = [_state(1, 1), _state(2, 8)]
    assert [p.id for p in pair_by_cut([busy, unknown])] == ["1:8", "1:1"]


@pytest.mark.parametrize("text", ["1-42", "42", "1:", ":4", "1:0", "a:b", "1:2:3", "1:" + "9" * 50])
def test_vm_point_ids_are_generation_colon_cut(text: str) -> None:
    """A VM point id is ``G:C`` with C >= 1; anything else is refused, naming the form."""
    with pytest.raises(UnknownPoint) as info:
        parse_cut(text)
    assert "1:1042" in (info.value.fix or "")
    assert parse_cut(cut_text((3, 17))) == (3, 17)


def test_vm_retention_keeps_every_disks_state_of_a_kept_point() -> None:
    """Retention picks VM points (the hourly one too), and each disk keeps its own state of it."""
    now = 100 * HOUR
    policy = TierPolicy((Tier("hour", 3600.0, 48 * 3600),), app_consistent_seconds=0)
    # disk0 lost an ack at cut 2 (so it is one seq ahead); disk1's batch of cut 2 failed.
    d0 = [
        StateInfo(1, s, now - (10 - c) * HOUR // 4, 0, False, cut_id=c)
        for s, c in enumerate([1, 2, 3, 4, 5, 6], 1)
    ]
    d1 = [
        StateInfo(1, s, now - (10 - c) * HOUR // 4, 0, False, cut_id=c)
        for s, c in enumerate([1, 3, 4, 5], 1)
    ]
    infos = [
        [PointInfo(s, 1, latest=s is chain[-1]) for s in reversed(chain)] for chain in (d0, d1)
    ]
    vm_points, cands = candidates(infos, [set(), set()])
    answer = plan(cands, now, policy, [Budget(target=1 << 40, cap=1 << 40)] * 2)
    keep0, keep1 = (disk_keep(infos[d], vm_points, d, answer) for d in (0, 1))
    points = {p.cut[1]: p for p in pair_by_cut(infos)}
    assert set(points) == {1, 3, 4, 5}
    kept_cuts = {c for c, p in points.items() if p.disks[0].state.key in keep0}
    assert kept_cuts, "the hourly window keeps some VM point"
    for c in kept_cuts:  # every disk keeps its state of each kept VM point
        assert points[c].disks[1].state.key in keep1
    assert {c for c, p in points.items() if p.disks[1].state.key in keep1} == kept_cuts
    # disk0's cut 6 is newer than every VM point: disk1 may still bring it, so it stays.
    assert (1, 6) in keep0
    # disk0's cut 2 will never be a VM point (disk1 skipped it) and is older than the newest.
    assert (1, 2) not in keep0


def test_cut_ids_grow_across_restarts_and_never_repeat(tmp_path: Path) -> None:
    """A restarted CutClock continues after every id it may have handed out; observe() skips."""
    path = tmp_path / "_cuts.json"
    clock = CutClock(path, block=4)
    first = [clock.next() for _ in range(6)]
    assert first == [1, 2, 3, 4, 5, 6]
    again = CutClock(path, block=4)  # as after kill -9: ids 7 and 8 were reserved, maybe used
    assert again.next() == 9
    again.observe(100)  # the broker holds cut 100 for some disk of this VM
    assert again.next() == 101
    assert CutClock(path, block=4).next() > 101
    rng = random.Random(3)
    seen: list[int] = []
    for _ in range(20):
        c = CutClock(path, block=rng.choice([1, 2, 8]))
        seen += [c.next() for _ in range(rng.randrange(0, 5))]
    assert seen == sorted(set(seen)), "a cut id repeated or went back"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_ids_reserved_ahead_leave_the_cuts_nothing_to_write(tmp_path: Path) -> None:
    """Reserved ahead whenever it runs low (as the VM's worker does off the loop), the clock's
    cuts never write the file themselves, and a restart still resumes past every id."""
    path = tmp_path / "_cuts.json"
    clock = CutClock(path, block=8)
    handed: list[int] = []
    writes = 0
    for _ in range(40):
        if clock.running_low:
            clock.reserve_ahead()
            writes += 1
        stamp = path.stat().st_mtime_ns, path.stat().st_ino
        handed.append(clock.next())
        assert (path.stat().st_mtime_ns, path.stat().st_ino) == stamp  # the cut wrote nothing
    assert handed == list(range(1, 41))
    assert writes <= 40 // 4 + 1  # one write per half block, not per cut
    assert CutClock(path, block=8).next() > 40
    clock.observe(1_000)  # a jump past the reservation: the cut reserves for itself
    assert clock.next() == 1_001
    assert CutClock(path, block=8).next() > 1_001


@pytest.mark.parametrize("content", ['{"reserved_to": "9"}', "[1]", '{"reserved_to": -1}', "{"])
def test_an_unreadable_cut_id_file_is_refused_naming_it(tmp_path: Path, content: str) -> None:
    """A damaged ``_cuts.json`` stops the agent with an error naming the file and the fix."""
    path = tmp_path / "_cuts.json"
    path.write_text(content)
    with pytest.raises(TrackingError) as info:
        CutClock(path)
    assert str(path) in info.value.message
    assert "remove the file" in (info.value.fix or "")
