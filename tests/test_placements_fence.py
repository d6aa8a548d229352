"""The per-VM fence (broker/placements.py, decision 032): two members on one shared store, each
with its own view of it as two processes would have, without sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import FencedError
from broker.placements import NotPlacedHere, PlacementBook
from broker.store import Store, placement_fence
from tests.support_broker import FakeSource
from tests.test_broker_store import enable, engine, image, journal


def _members(tmp_path: Path) -> tuple[Store, PlacementBook, Store, PlacementBook]:
    root = tmp_path / "store"
    a = Store(root)
    a.claim_epoch(1, "a")
    b = Store(root)
    book_a, book_b = PlacementBook(a, "a"), PlacementBook(b, "b")
    a.vm_fence, b.vm_fence = book_a.check, book_b.check
    return a, book_a, b, book_b


@pytest.mark.parametrize("fence", [True, False])
def test_a_member_whose_vm_moved_away_is_refused_before_it_writes(
    tmp_path: Path, fence: bool
) -> None:
    """Once the owner moves a VM from member a to member b, a's pending apply is refused with
    nothing written and b applies it; with the per-VM fence off, a would have written (so the
    fence is what stops it)."""
    a, book_a, b, book_b = _members(tmp_path)
    src = FakeSource()
    replica = enable(a, src)
    vm = replica.meta.vm_uuid
    book_a.assign([(vm, "a")], epoch=1, owner="a")
    assert book_a.adopt(vm) is not None
    src.mutate()
    journal(a, replica, src.cut().body)
    assert engine(a, replica).apply_pending() == 1
    src.mutate()
    journal(a, replica, src.cut().body)  # durable on a, not applied yet
    moved = book_a.assign([(vm, "b")], epoch=1, owner="a")
    assert moved[0].token == (1, 2)
    if not fence:
        a.vm_fence = None
        assert engine(a, replica).apply_pending() == 1
        return
    before = image(replica)
    with pytest.raises(NotPlacedHere) as refused:
        engine(a, replica).apply_pending()
    assert refused.value.details["placed_on"] == "b"
    assert refused.value.code == "not_owner"
    assert image(replica) == before
    assert [r.seq for r in replica.applied_records()] == [1]
    with pytest.raises(NotPlacedHere):
        placement_fence(a, replica)  # the journal path is refused too
    # b is refused until it adopts the placement and re-reads the replica from the store.
    with pytest.raises(NotPlacedHere):
        placement_fence(b, replica)
    assert book_b.adopt(vm) is not None
    (fresh,) = b.reload_vm(vm)
    assert engine(b, fresh).apply_pending() == 1
    assert image(fresh) == src.image
    assert [r.seq for r in fresh.applied_records()] == [1, 2]


def test_moved_away_and_back_needs_a_fresh_adoption(tmp_path: Path) -> None:
    """A VM moved away and back carries a newer token: the member's old token is refused until
    it adopts the new placement (another member may have written in between)."""
    a, book_a, _b, _ = _members(tmp_path)
    replica = enable(a, FakeSource())
    vm = replica.meta.vm_uuid
    book_a.assign([(vm, "a")], epoch=1, owner="a")
    book_a.adopt(vm)
    book_a.assign([(vm, "b")], epoch=1, owner="a")
    book_a.assign([(vm, "a")], epoch=1, owner="a")
    with pytest.raises(NotPlacedHere) as refused:
        placement_fence(a, replica)
    assert "holds placement 1.1" in refused.value.message
    assert book_a.adopt(vm) is not None
    assert book_a.held(vm) == (1, 3)
    placement_fence(a, replica)


def test_a_deposed_owner_cannot_place(tmp_path: Path) -> None:
    """After another member claims a higher owner epoch, the old owner's placement is refused
    and the record keeps the new owner's word; the token keeps growing across owners."""
    a, book_a, b, book_b = _members(tmp_path)
    replica = enable(a, FakeSource())
    vm = replica.meta.vm_uuid
    book_a.assign([(vm, "a")], epoch=1, owner="a")
    b.claim_epoch(2, "b")
    with pytest.raises(FencedError) as refused:
        book_a.assign([(vm, "a")], epoch=1, owner="a")
    assert refused.value.details["stored_epoch"] == 2
    (record,) = book_b.assign([(vm, "b")], epoch=2, owner="b")
    assert record.token == (2, 2)
    assert book_a.get(vm) == record
    assert book_a.all() == {vm: record}


def test_a_vm_without_placement_keeps_the_owner_fence(tmp_path: Path) -> None:
    """A cluster that does not spread VMs writes no record, and the owner-epoch fence alone
    decides (decision 012 unchanged): a member with an old epoch is refused."""
    a, _book_a, b, _ = _members(tmp_path)
    src = FakeSource()
    replica = enable(a, src)
    src.mutate()
    journal(a, replica, src.cut().body)
    placement_fence(a, replica)  # no record: nothing to refuse
    b.claim_epoch(2, "b")
    with pytest.raises(FencedError):
        engine(a, replica, epoch=1).apply_pending()
    assert replica.applied_records() == []


def test_an_owners_load_and_forget_keep_the_vms_placed_on_the_member(tmp_path: Path) -> None:
    """A member that becomes the owner (load) or stops owning (forget) keeps in memory the VMs it
    adopted as a member, whose writer the per-VM token decides; the owner's own VMs go and come
    back with ownership, and a broker that stops drops all."""
    a, book_a, b, book_b = _members(tmp_path)
    placed, owned = enable(a, FakeSource(seed=1)), enable(a, FakeSource(seed=2))
    vm = placed.meta.vm_uuid
    a.placed_apart = b.placed_apart = lambda v: book_b.get(v) is not None
    book_a.assign([(vm, "b")], epoch=1, owner="a")
    assert book_b.adopt(vm) is not None
    (adopted,) = b.reload_vm(vm)
    for step in (b.load, b.forget, b.load):
        step()
        assert b.get(vm, placed.meta.disk_id) is adopted, step
    assert b.get(owned.meta.vm_uuid, owned.meta.disk_id) is not None  # loaded as the owner's
    b.forget()
    assert b.get(owned.meta.vm_uuid, owned.meta.disk_id) is None
    b.forget(held=True)
    assert not b.holds_vm(vm)
    assert b.replicas() == []
