"""Doors of the per-VM fence (decision 032): who may place a VM, who may write it, and what an
MQTT placement can make a member do. Two members on one shared store, as two processes see it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from broker.errors import BrokerError
from broker.placements import PlacementBook
from broker.placing import ClusterPlacement
from broker.store import Store, placement_fence
from common import topics
from common.mqtt import MQTTLink
from tests.security.rows import Door
from tests.support_broker import FakeSource
from tests.test_broker_store import enable, engine, image, journal

SURFACE = "store placement records"


def _outcome(call: object) -> tuple[bool, str]:
    """Run ``call``; ``(refused, what happened)``."""
    assert callable(call)
    try:
        call()
    except BrokerError as exc:
        return True, f"{type(exc).__name__} {exc.code}"
    return False, "done"


async def test_placement_records_and_fence(tmp_path: Path, door: Door) -> None:
    """A deposed owner cannot place, a member whose VM moved cannot journal or apply it, and a
    forged MQTT placement does not make a member serve a VM the store gives another."""
    root = tmp_path / "store"
    a, b = Store(root), Store(root)
    a.claim_epoch(1, "a")
    book_a, book_b = PlacementBook(a, "a"), PlacementBook(b, "b")
    a.vm_fence, b.vm_fence = book_a.check, book_b.check
    src = FakeSource()
    replica = enable(a, src)
    vm = replica.meta.vm_uuid
    book_a.assign([(vm, "a")], epoch=1, owner="a")
    book_a.adopt(vm)
    src.mutate()
    journal(a, replica, src.cut().body)
    b.claim_epoch(2, "b")  # b becomes the owner

    refused, observed = _outcome(lambda: book_a.assign([(vm, "a")], epoch=1, owner="a"))
    door.attempt(
        SURFACE,
        "deposed owner a (epoch 1) places a VM after b claimed epoch 2",
        expected="FencedError fenced, record unchanged",
        observed=f"{observed}, record names {book_b.get(vm).node if book_b.get(vm) else None}",
        refused=refused and (rec := book_b.get(vm)) is not None and rec.token == (1, 1),
    )
    book_b.assign([(vm, "b")], epoch=2, owner="b")
    before = image(replica)
    refused, observed = _outcome(lambda: engine(a, replica).apply_pending())
    door.attempt(
        SURFACE,
        "member a applies a batch of a VM the owner moved to b",
        expected="NotPlacedHere not_owner, image and audit unchanged",
        observed=f"{observed}, image changed: {image(replica) != before}, "
        f"audit lines {len(replica.applied_records())}",
        refused=refused and image(replica) == before and not replica.applied_records(),
    )
    refused, observed = _outcome(lambda: placement_fence(a, replica))
    door.attempt(
        SURFACE,
        "member a journals a batch of a VM the owner moved to b",
        expected="NotPlacedHere not_owner",
        observed=observed,
        refused=refused,
    )

    # A forged placement on MQTT naming a: a looks at the store, which names b.
    link = MQTTLink("mqtt://127.0.0.1:1", client_id="unused")
    placing = ClusterPlacement(
        link, book_a, cluster="c1", url="https://a", owner_epoch=lambda: None
    )
    forged = topics.PlacementMessage(node="a", url="https://a", epoch=9, version=99)
    placing._placement(topics.placement("c1", vm), forged)
    await asyncio.gather(*placing._pending)
    door.attempt(
        "MQTT placements",
        "a placement naming member a, while the store names b",
        expected="a does not serve the VM and holds no token",
        observed=f"serving {sorted(placing.serving)}, token {book_a.held(vm)}",
        refused=vm not in placing.serving and book_a.held(vm) is None,
    )
