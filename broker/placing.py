"""Placement on the wire: the owner's rounds and every member's share of them (decision 032).

Every member subscribes to the cluster's membership and placements (retained, so a newcomer
learns both at once). The owner runs a :class:`~broker.placement.Placer` round every
``interval`` seconds over the online members and the VMs in the shared store, records each move
in the store (:meth:`~broker.placements.PlacementBook.assign`, fenced by its owner epoch) and
only then publishes it retained. A member serves a VM when the *store* names it: a placement
heard on MQTT only tells it to look (:meth:`~broker.placements.PlacementBook.adopt`), so a
forged MQTT record can neither give a member a VM nor take one away from the writer the store
names. A member that hears its VM placed elsewhere stops serving it; if it did not hear, the
store's per-VM fence refuses its next write anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Final

from broker.errors import FencedError
from broker.placement import Member, Placer, Plan
from broker.placements import PlacementBook, PlacementRecord
from common import topics
from common.logs import get_logger
from common.mqtt import MQTTLink

_log = get_logger("broker.placing")

ROUND_INTERVAL: Final = 2.0
"""Seconds between the owner's placement rounds (a dead member's VMs wait at most this long
after its death is known)."""

SETTLE_ROUNDS: Final = 3
"""A new owner's first round waits this many intervals, so it has heard every member."""

ServeChange = Callable[[str, bool], Awaitable[None]]
"""``(vm_uuid, mine)``: start serving a VM placed here (after adoption), or stop."""


class ClusterPlacement:
    """One member's placement state; the owner's rounds (module docstring)."""

    def __init__(
        self,
        link: MQTTLink,
        book: PlacementBook,
        *,
        cluster: str,
        url: str,
        owner_epoch: Callable[[], int | None],
        placer: Placer | None = None,
        interval: float = ROUND_INTERVAL,
        settle: float | None = None,
        on_change: ServeChange | None = None,
    ) -> None:
        self.link = link
        self.book = book
        self.node = book.node
        self.cluster = cluster
        self.url = url
        self._owner_epoch = owner_epoch
        self.placer = placer or Placer()
        self.interval = interval
        # A new owner that has not heard the members yet would take every VM as an orphan.
        self.settle = settle if settle is not None else SETTLE_ROUNDS * interval
        self._owned: tuple[int, float] | None = None  # (epoch, since when, monotonic)
        # The owner is the records' only writer: it reads them all once per ownership, then
        # keeps them (10,000 small files every round would load a shared file system).
        self._records: dict[str, PlacementRecord] | None = None
        self._on_change = on_change
        self.sweep: Callable[[], Awaitable[None]] | None = None
        """Called every interval on every member (the broker keeps its appliers in step)."""
        self.members: dict[str, topics.MemberRecord] = {}
        self.placed: dict[str, topics.PlacementMessage] = {}
        self.serving: set[str] = set()
        self._announced: dict[str, topics.PlacementMessage] = {}
        self._held: tuple[str, ...] = ()
        self._pending: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self.rounds = 0
        link.subscribe(topics.members(cluster), topics.MemberRecord, self._member)
        link.subscribe(topics.placements(cluster), topics.PlacementMessage, self._placement)

    # -- what the member hears
    def _member(self, topic: str, record: topics.MemberRecord | None) -> None:
        node = topic.rsplit("/", 1)[-1]
        if record is None:
            self.members.pop(node, None)
        elif record.node == node and record.cluster == self.cluster:
            self.members[node] = record

    def _placement(self, topic: str, message: topics.PlacementMessage | None) -> None:
        vm = topic.rsplit("/", 1)[-1]
        if message is None:
            self.placed.pop(vm, None)
            return
        self.placed[vm] = message
        if (message.node == self.node) != (vm in self.serving):
            task = asyncio.get_running_loop().create_task(self.reconcile(vm))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def reconcile(self, vm: str) -> None:
        """Serve ``vm`` exactly when the store places it here (MQTT only said to look)."""
        async with self._lock:
            record = await asyncio.to_thread(self.book.adopt, vm)
            mine = record is not None
            if mine == (vm in self.serving):
                return
            if mine:
                self.serving.add(vm)
            else:
                self.serving.discard(vm)
            _log.info("vm_serving_changed", vm_uuid=vm, node=self.node, serving=mine)
            if self._on_change is not None:
                await self._on_change(vm, mine)

    async def adopt_stored(self) -> int:
        """At start: serve every VM the store already places here; returns how many."""
        records = await asyncio.to_thread(self.book.all)
        for vm, record in sorted(records.items()):
            if record.node == self.node:
                await self.reconcile(vm)
        return len(self.serving)

    # -- what agents are told
    def online(self) -> list[Member]:
        """The members a round may place on: those online on MQTT, and the owner itself."""
        nodes = {n for n, r in self.members.items() if r.online}
        nodes.add(self.node)
        return [Member(n) for n in sorted(nodes)]

    def route(self, vm_uuid: str) -> tuple[str, str] | None:
        """``(node, url)`` of the member serving ``vm_uuid``, as last heard (None: unplaced)."""
        message = self.placed.get(vm_uuid)
        if message is None:
            return None
        member = self.members.get(message.node)
        return message.node, member.url if member is not None and member.url else message.url

    # -- the owner's rounds
    async def round(self) -> Plan | None:
        """One placement round if this member owns the cluster (None otherwise)."""
        epoch = self._owner_epoch()
        if epoch is None:
            self._owned = None
            self._records = None
            return None
        if self._owned is None or self._owned[0] != epoch:
            self._owned = (epoch, time.monotonic())
            self._records = None
        if time.monotonic() - self._owned[1] < self.settle:
            return None
        if self._records is None:
            self._records = await asyncio.to_thread(self.book.all)
        records = self._records
        vms = await asyncio.to_thread(self.book.vms)
        current = {vm: r.node for vm, r in records.items()}
        plan = self.placer.plan(self.online(), vms, current, exporters=self.exporters())
        self._report_held(plan.held)
        if plan.moves:
            wanted = [(m.vm, m.target) for m in plan.moves]
            try:
                made = await asyncio.to_thread(
                    self.book.assign, wanted, epoch=epoch, owner=self.node
                )
            except FencedError as exc:
                self._records = None
                _log.warning(
                    "placement_round_fenced", node=self.node, epoch=epoch, error=exc.message
                )
                return None
            records.update((r.vm_uuid, r) for r in made)
            _log.info(
                "placement_round",
                node=self.node,
                epoch=epoch,
                moves=len(plan.moves),
                reasons=sorted({m.reason for m in plan.moves}),
                balanced=plan.balanced,
                unplaced=len(plan.unplaced),
            )
        await self._announce(records)
        self.rounds += 1
        return plan

    def exporters(self) -> dict[str, str]:
        """The member each VM is exported by, among the online members, as last heard: the
        exports read through that member's applier, so the VM stays there or, not placed yet,
        goes there (decision 032, rules 1 and 4)."""
        return {
            str(vm): node
            for node, record in self.members.items()
            if record.online
            for vm in record.exporting
        }

    def _report_held(self, held: tuple[str, ...]) -> None:
        """Say once, each time it changes, which exported VMs keep the cluster unbalanced."""
        if held == self._held:
            return
        self._held = held
        if held:
            _log.info(
                "placement_balance_held",
                node=self.node,
                vms=list(held),
                reason="balance would move these VMs, and their point-in-time exports (test "
                "copies included) read through the member that applies them",
                fix="balance resumes by itself once those exports end (stop-test, or DELETE "
                "/v1/exports/NAME on their member)",
            )
        else:
            _log.info("placement_balance_released", node=self.node)

    async def _announce(self, records: dict[str, PlacementRecord]) -> None:
        """Publish every recorded placement the retained view does not show yet (a new owner's
        first round; the link itself re-publishes them after an MQTT server restart)."""
        for vm, record in sorted(records.items()):
            message = topics.PlacementMessage(
                node=record.node,
                url=self._url_of(record.node),
                epoch=record.epoch,
                version=record.version,
            )
            # What we sent may not have come back yet; what a predecessor sent needs no repeat.
            if message not in (self.placed.get(vm), self._announced.get(vm)):
                await self.link.publish_retained(topics.placement(self.cluster, vm), message)
                self._announced[vm] = message

    def _url_of(self, node: str) -> str:
        if node == self.node:
            return self.url
        member = self.members.get(node)
        return member.url if member is not None else ""

    async def run(self) -> None:
        """Adopt what the store places here, then run rounds (on the owner) until cancelled."""
        await self.adopt_stored()
        while True:
            # Sleep first: the retained membership records arrive before the first round.
            await asyncio.sleep(self.interval)
            try:
                if self.link.connected:
                    await self.round()
                if self.sweep is not None:
                    await self.sweep()
            except OSError as exc:
                self._records = None  # a round that failed half-way: read the store again
                _log.error("placement_round_failed", node=self.node, error=str(exc))

    async def close(self) -> None:
        """Cancel reconciliations in flight."""
        for task in list(self._pending):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


__all__ = ["ROUND_INTERVAL", "ClusterPlacement", "ServeChange"]
