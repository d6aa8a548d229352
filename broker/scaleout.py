"""A cluster member that serves the VMs placed on it (``[broker] placement = "spread"``,
decision 032), beside the owner's role of decision 031.

:meth:`ScaleOut.attach` gives a broker with MQTT its placement state (:class:`broker.placing.
ClusterPlacement`), installs the store's per-VM fence and routes agents to the member each VM is
placed on (:class:`PlacementRouter`, through the routing seam). :class:`ScaleOut` keeps the
broker's appliers in step with the store's records: it starts a VM's engines once this member
adopted the VM's placement (after re-reading its replicas, which another member may have
written) and stops them once the VM is placed elsewhere. A VM not placed yet (enabled a moment
ago) is the owner's, under the owner-epoch fence, until the owner's next round places it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final, Protocol

from broker.apply import ReplicaEngine
from broker.cluster import ClusterMember
from broker.placements import PlacementBook
from broker.placing import ClusterPlacement
from broker.routing import ClusterView, MemberRef
from broker.store import Replica, Store
from common.config import BrokerConfig
from common.logs import get_logger
from common.mqtt import MQTTLink

_log = get_logger("broker.scaleout")

RECHECK_SWEEPS: Final = 5
"""Every this many sweeps a member re-reads the records of all the VMs it serves."""


class Member(Protocol):
    """What scale-out needs of the broker (``broker/service.py:BrokerService``)."""

    config: BrokerConfig
    store: Store
    engines: dict[tuple[str, str], ReplicaEngine]
    epoch: int
    serving: bool
    cluster: ClusterMember | None

    @property
    def advertised_url(self) -> str:
        """Where other members send agents to reach this broker."""

    def engine_for(self, replica: Replica) -> ReplicaEngine:
        """The live engine of a replica (created and started on first use)."""

    def list_exports(self) -> list[dict[str, Any]]:
        """The point-in-time exports being served."""

    async def remove_export(self, name: str) -> None:
        """Stop serving an export and delete its overlay."""


class PlacementRouter:
    """Routing seam (:mod:`broker.routing`): the member a VM is placed on while it is online;
    an unplaced VM, or one whose member is gone, goes to the owner."""

    def __init__(self, placement: ClusterPlacement) -> None:
        self.placement = placement

    def route(self, vm_uuid: str, view: ClusterView) -> MemberRef | None:
        """The member the VM is placed on, else the owner."""
        placed = self.placement.route(vm_uuid)
        if placed is None:
            return view.owner
        node, url = placed
        member = view.members.get(node)
        if node != view.self_node and (member is None or not member.online):
            return view.owner  # its member is gone: the owner's next round moves it
        epoch = view.owner.epoch if view.owner is not None else 0
        return MemberRef(node, member.url if member is not None and member.url else url, epoch)


class ScaleOut:
    """Starts and stops this member's appliers as placements come and go (module docstring)."""

    def __init__(self, service: Member, link: MQTTLink) -> None:
        self.service = service
        b = service.config.broker
        self.book = PlacementBook(service.store, b.node)
        service.store.vm_fence = self.book.check
        # A placed VM is loaded (and applied) only through adoption here, never by the owner's
        # load of the whole store.
        service.store.placed_apart = self._placed_apart
        self.placement = ClusterPlacement(
            link,
            self.book,
            cluster=b.cluster,
            url=service.advertised_url,
            owner_epoch=self._owner_epoch,
            on_change=self._changed,
        )
        self.placement.sweep = self.sweep
        self._changing = asyncio.Lock()
        self._sweeps = 0

    @classmethod
    def attach(cls, service: Member, link: MQTTLink) -> ScaleOut:
        """Give ``service`` the placement of decision 032 (once its cluster member exists)."""
        scale = cls(service, link)
        if service.cluster is not None:
            service.cluster.router = PlacementRouter(scale.placement)
        return scale

    async def run(self) -> None:
        """The placement rounds and sweeps, until cancelled."""
        await self.placement.run()

    def serves(self, vm_uuid: str | None) -> bool:
        """Whether this member serves ``vm_uuid`` as its placed member (its engines run)."""
        return (
            vm_uuid is not None
            and vm_uuid in self.placement.serving
            and any(k[0] == vm_uuid for k in self.service.engines)
        )

    def _placed_apart(self, vm_uuid: str) -> bool:
        return self.book.get(vm_uuid) is not None

    def _owner_epoch(self) -> int | None:
        s = self.service
        if not s.serving or s.epoch < 1:
            return None
        return s.epoch

    async def _changed(self, vm_uuid: str, mine: bool) -> None:
        # One change at a time: two interleaved reloads would leave an engine on one copy of a
        # replica's meta and the store on another.
        async with self._changing:
            if mine and any(k[0] == vm_uuid for k in self.service.engines):
                # Already applied here (the owner, before it placed the VM on itself): this
                # member has been its only writer, its replicas in memory are current.
                self.service.store.hold_vm(vm_uuid)
                return
            await self._end_exports(vm_uuid)
            await self._stop_engines(vm_uuid)
            if not mine:
                self.service.store.forget_vm(vm_uuid)
                return
            replicas = await asyncio.to_thread(self.service.store.reload_vm, vm_uuid)
            for replica in replicas:
                self.service.engine_for(replica)
            _log.info("placed_vm_served", vm_uuid=vm_uuid, disks=len(replicas))

    async def _end_exports(self, vm_uuid: str) -> None:
        """End the VM's point-in-time exports, which read through the engines stopping now,
        with the reason and where to export it again (left alone, every read fails with EIO)."""
        docs = [d for d in self.service.list_exports() if d["uuid"] == vm_uuid]
        if not docs:
            return
        record = await asyncio.to_thread(self.book.get, vm_uuid)
        node = record.node if record is not None else "the owner"
        for doc in docs:
            await self.service.remove_export(str(doc["name"]))
            _log.warning(
                "pit_export_ended",
                export=doc["name"],
                vm_uuid=vm_uuid,
                placed_on=node,
                reason=f"the VM's placement changed and broker {self.book.node} stopped "
                "applying it; the export read through that applier",
                fix=f"create the export again on broker {node} (POST /v1/vms/{vm_uuid}/exports)",
            )

    async def _stop_engines(self, vm_uuid: str) -> None:
        engines = self.service.engines
        for key in [k for k in engines if k[0] == vm_uuid]:
            engine = engines.pop(key)
            await engine.stop()
            async with engine.ingest_lock:  # an upload in flight still uses its descriptors
                engine.close()

    async def sweep(self) -> None:
        """Bring the appliers in line with the store: engines of VMs placed elsewhere stop (an
        owner loads every replica when elected), VMs placed here get theirs back (a reload
        that failed is tried again)."""
        local = {k[0] for k in self.service.engines}
        serving = self.placement.serving
        for vm in sorted(serving - local):
            await self._changed(vm, mine=True)
        for vm in sorted(local - serving):
            record = await asyncio.to_thread(self.book.get, vm)
            if record is None:
                continue  # not placed yet: the owner's, under the owner-epoch fence
            if record.node == self.book.node:
                await self.placement.reconcile(vm)
            else:
                await self._changed(vm, mine=False)
        await self._recheck(serving & local)

    async def _recheck(self, served: set[str]) -> None:
        """A VM whose placement changed under us (a move away and back we did not hear of)
        is refused by the fence: serve it afresh. Checked for VMs whose apply is failing every
        sweep, for all every ``RECHECK_SWEEPS`` sweeps."""
        self._sweeps += 1
        failing = {k[0] for k, e in self.service.engines.items() if "apply_failed" in e.conditions}
        look = served if self._sweeps % RECHECK_SWEEPS == 0 else served & failing
        for vm in sorted(look):
            record = await asyncio.to_thread(self.book.get, vm)
            if record is not None and (record.node, record.token) == (
                self.book.node,
                self.book.held(vm),
            ):
                continue
            await self._changed(vm, mine=False)
            self.placement.serving.discard(vm)
            self.book.release(vm)
            await self.placement.reconcile(vm)  # adopts again if the VM is still ours


__all__ = ["PlacementRouter", "ScaleOut"]
