"""The election's asyncio driver: MQTT records and the store in, ownership of the service out.

:class:`ClusterMember` subscribes to its cluster's membership and owner records, feeds them and
the clock to the sans-I/O :class:`broker.election.Election`, and performs what it decides:
conditional claims at the store (:meth:`broker.store.Store.claim_epoch`: the store decides a
tie), the retained owner record with its renewals, periodic reads of the store's fence, and the
service's start and stop of serving (:class:`Owning`). It also answers, for every agent
request, whether this member serves that VM (:mod:`broker.routing`) and, if not, which member
does: the refusal an agent follows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from broker.api import Replicas
from broker.election import (
    Action,
    Claim,
    ClaimAnswered,
    ClearOwner,
    Election,
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
from broker.errors import BrokerError, NotOwner
from broker.routing import ClusterView, MemberInfo, MemberRef, OwnerRouter, Router
from broker.store import Store
from common import topics
from common.logs import get_logger
from common.mqtt import MQTTLink

_log = get_logger("broker.cluster")


class Owning(Replicas, Protocol):
    """What the driver needs of the broker service (its configuration and store, and:)."""

    @property
    def serving(self) -> bool:
        """Whether journals are replayed and agents accepted (owner, fully taken over)."""

    @property
    def advertised_url(self) -> str:
        """Where other members send agents to reach this one."""

    async def begin_owning(self, epoch: int) -> None:
        """Reload the store, replay its journals and start applying under ``epoch``."""

    async def end_owning(self) -> None:
        """Stop ingest and apply (the store's fence catches stragglers)."""


class ClusterMember:
    """One member's part in its cluster's election (see the module docstring)."""

    def __init__(self, service: Owning, link: MQTTLink, *, router: Router | None = None) -> None:
        b = service.config.broker
        self.service = service
        self.link = link
        self.node = b.node
        self.cluster = b.cluster
        self.router: Router = router or OwnerRouter()
        self.timings = service.config.election
        self.election = Election(b.node, self.timings)
        self.members: dict[str, MemberInfo] = {}
        self._connected = False
        self._transition = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        link.subscribe(topics.members(b.cluster), topics.MemberRecord, self._member_record)
        link.subscribe(topics.owner(b.cluster), topics.OwnerRecord, self._owner_record)

    # -- what agents are told
    def view(self) -> ClusterView:
        """This member's view of the cluster now (for routing and `cluster status`)."""
        e = self.election
        owner: MemberRef | None = None
        if e.role is Role.OWNER:
            owner = MemberRef(self.node, self.service.advertised_url, e.epoch)
        elif e.owner is not None and e.owner_live(time.monotonic()):
            owner = MemberRef(e.owner.node, e.owner.url, e.owner.epoch)
        return ClusterView(self.node, owner, dict(self.members))

    def check_serving(self, vm_uuid: str | None) -> None:
        """Refuse (503 ``not_owner``, naming the member to use) unless this member serves the
        VM now."""
        view = self.view()
        target = self.router.route(vm_uuid or "", view)
        if target is not None and target.node == self.node and self.service.serving:
            return
        if target is None:
            raise NotOwner(
                f"cluster {self.cluster} has no owner right now (an election is under way)",
                fix="retry in a few seconds; a new owner is in place within seconds",
                details={"node": self.node, "role": self.election.role.value},
            )
        raise NotOwner(
            f"broker {self.node} does not serve this VM now: {target.node} (epoch "
            f"{target.epoch}) does"
            + (" and is still taking over" if target.node == self.node else ""),
            fix=f"send requests to {target.url} (agents and the CLI follow it by themselves)",
            details={
                "node": self.node,
                "owner": target.node,
                "owner_url": target.url,
                "epoch": target.epoch,
            },
        )

    def json(self) -> dict[str, Any]:
        """The view as the status document shows it."""
        view = self.view()
        owner = view.owner
        return {
            "role": self.election.role.value,
            "serving": self.service.serving,
            "owner": None
            if owner is None
            else {"node": owner.node, "epoch": owner.epoch, "url": owner.url},
            "members": [
                {"node": m.node, "online": m.online, "url": m.url}
                for m in sorted(view.members.values(), key=lambda m: m.node)
            ],
        }

    # -- inputs
    def _member_record(self, topic: str, record: topics.MemberRecord | None) -> None:
        node = topic.rsplit("/", 1)[-1]
        if record is None or record.cluster != self.cluster or record.node != node:
            self.members[node] = MemberInfo(node, self.members.get(node, _NONE).url, False)
            self.feed(MemberSeen(time.monotonic(), node, False))
            return
        self.members[node] = MemberInfo(node, record.url, record.online)
        self.feed(MemberSeen(time.monotonic(), node, record.online, record.url, record.epoch))

    def _owner_record(self, _topic: str, record: topics.OwnerRecord | None) -> None:
        now = time.monotonic()
        if record is None:
            self.feed(OwnerCleared(now))
        else:
            self.feed(OwnerSeen(now, record.node, record.epoch, record.url, record.seq))

    def feed(self, event: Event) -> None:
        """Hand one event to the election and start what it decides."""
        for action in self.election.handle(event):
            self._perform(action)

    # -- outputs
    def _perform(self, action: Action) -> None:
        match action:
            case Claim(epoch=epoch):
                self._spawn(self._claim(epoch))
            case PublishOwner(epoch=epoch, seq=seq):
                record = topics.OwnerRecord(
                    node=self.node, epoch=epoch, url=self.service.advertised_url, seq=seq
                )
                self._spawn(self._publish_owner(record))
            case ClearOwner(epoch=epoch):
                _log.info("owner_record_cleared", node=self.node, epoch=epoch)
                self._spawn(self.link.publish_retained(topics.owner(self.cluster), None))
            case ReadStore():
                self._spawn(self._read_store())
            case StartServing(epoch=epoch):
                _log.warning("owner_elected", node=self.node, cluster=self.cluster, epoch=epoch)
                self._spawn(self._begin(epoch))
            case StopServing(epoch=epoch, reason=reason):
                # Our record must not come back with the next reconnect (Mosquitto restarted).
                self.link.forget_retained(topics.owner(self.cluster))
                _log.warning(
                    "owner_stepped_down",
                    node=self.node,
                    cluster=self.cluster,
                    epoch=epoch,
                    reason=reason,
                )
                self._spawn(self._end())

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish_owner(self, record: topics.OwnerRecord) -> None:
        # Only an acknowledged record renews the lease (broker/election.py, OwnerPublished).
        sent = time.monotonic()
        if await self.link.publish_retained(topics.owner(self.cluster), record):
            self.feed(OwnerPublished(time.monotonic(), record.epoch, record.seq, sent))

    async def _claim(self, epoch: int) -> None:
        store = self.service.store
        try:
            await asyncio.to_thread(store.claim_epoch, epoch, self.node)
            answer = ClaimAnswered(time.monotonic(), epoch, granted=True, stored=epoch)
        except (BrokerError, OSError) as exc:
            stored = await asyncio.to_thread(_stored_or_zero, store)
            _log.info("owner_claim_refused", node=self.node, epoch=epoch, stored=stored, why=exc)
            answer = ClaimAnswered(time.monotonic(), epoch, granted=False, stored=stored)
        self.feed(answer)

    async def _read_store(self) -> None:
        store = self.service.store
        try:
            # A hung shared file system must not hang the owner: no answer within the lease is
            # a failure (the thread is abandoned).
            async with asyncio.timeout(self.timings.lease):
                epoch, owner = await asyncio.to_thread(
                    lambda: (store.stored_epoch(), store.stored_owner())
                )
        except (OSError, ValueError, TimeoutError) as exc:
            self.feed(StoreReadFailed(time.monotonic(), f"{type(exc).__name__}: {exc}"))
            return
        self.feed(StoreRead(time.monotonic(), epoch, owner))

    async def _begin(self, epoch: int) -> None:
        async with self._transition:
            if self.election.epoch != epoch:
                return  # stepped down meanwhile
            await self.service.begin_owning(epoch)
            if self.election.epoch != epoch:
                await self.service.end_owning()

    async def _end(self) -> None:
        # Agents are refused from the step-down on (the election's role is what routing reads);
        # this stops the appliers once any take-over in progress has finished.
        async with self._transition:
            if self.election.role is not Role.OWNER:
                await self.service.end_owning()

    # -- the loop
    async def run(self) -> None:
        """Look at the clock and the link every tick until cancelled."""
        while True:
            now = time.monotonic()
            if self.link.connected != self._connected:
                self._connected = self.link.connected
                self.feed(MQTTUp(now) if self._connected else MQTTDown(now))
            self.feed(Tick(now))
            await asyncio.sleep(self.timings.tick)

    async def leave(self) -> None:
        """A clean shutdown: hand ownership over at once (clear our record) and stop serving."""
        for action in self.election.resign(time.monotonic()):
            if isinstance(action, ClearOwner) and self.link.connected:
                await self.link.publish_retained(topics.owner(self.cluster), None)
        async with self._transition:
            if self.service.serving:
                await self.service.end_owning()


_NONE = MemberInfo("", "", False)


def _stored_or_zero(store: Store) -> int:
    try:
        return store.stored_epoch()
    except (OSError, ValueError):
        return 0
