"""A broker's presence on the control plane: membership, ownership and per-VM state over MQTT.

The retained records let any newcomer (another broker, the dashboard, `replikant status` on a
machine without HTTPS access) see at once who is in the cluster, who owns it with which epoch,
and every VM's role per site. MQTT is advisory (see docs/decisions): the epoch that fences writes
is enforced by the replica store, not by these messages.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from common import topics
from common.logs import get_logger
from common.mqtt import MQTTLink

log = get_logger("replikant.membership")

VMSnapshot = Callable[[], list[tuple[uuid.UUID, str, topics.VMSiteRecord]]]
Exporting = Callable[[], Iterable[str]]
"""The uuids of the VMs this broker serves point-in-time exports of."""


class Membership:
    """Publishes this broker's membership, its ownership claim and VM states; raises alerts."""

    def __init__(
        self,
        link: MQTTLink,
        *,
        node: str,
        cluster: str,
        site: str,
        url: str,
        epoch: Callable[[], int],
        snapshot: VMSnapshot,
        exporting: Exporting = tuple,
        interval: float = 2.0,
    ) -> None:
        self.link = link
        self.node = node
        self.cluster = cluster
        self.site = site
        self.url = url
        self._epoch = epoch
        self._snapshot = snapshot
        self._exporting = exporting
        self._interval = interval
        self._since = time.time()
        self._published: dict[str, topics.VMSiteRecord] = {}
        self.hosts: dict[str, topics.HostRecord] = {}
        """Every agent host's retained record (roles as each agent holds them: a FENCED old
        primary is known only there), for status readers that cannot reach the agents."""
        link.subscribe(topics.host("+"), topics.HostRecord, self._host_record)

    def _host_record(self, topic: str, record: topics.HostRecord | None) -> None:
        host = topic.rsplit("/", 1)[-1]  # the signer's own topic: never another host's name
        if record is None:
            self.hosts.pop(host, None)
        elif record.host == host:
            self.hosts[host] = record

    def hosts_json(self) -> list[dict[str, Any]]:
        """The agent hosts' records, as ``GET /v1/status`` lists them."""
        return [self.hosts[h].model_dump(mode="json") for h in sorted(self.hosts)]

    def member_record(self, *, online: bool) -> topics.MemberRecord:
        """This broker's membership record."""
        return topics.MemberRecord(
            node=self.node,
            cluster=self.cluster,
            site=self.site,
            url=self.url,
            online=online,
            epoch=self._epoch(),
            since=self._since,
            exporting=tuple(sorted({uuid.UUID(vm) for vm in self._exporting()})),
        )

    async def publish_once(self) -> int:
        """Publish membership and every VM record that changed; return how many. (The owner
        record is the election's: :mod:`broker.cluster`.)"""
        await self.link.publish_retained(
            topics.member(self.cluster, self.node), self.member_record(online=True)
        )
        changed = 0
        for vm_uuid, site, record in self._snapshot():
            topic = topics.vm_site(vm_uuid, site)
            # The lag alone moves with every cut: re-published only with another change (health
            # turns warning once the lag passes the RPO), an idle VM's record stays put.
            material = record.model_copy(update={"lag_seconds": None})
            if self._published.get(topic) != material:
                await self.link.publish_retained(topic, record)
                self._published[topic] = material
                changed += 1
        return changed

    async def run(self) -> None:
        """Keep the records fresh until cancelled; re-publish everything after a reconnect."""
        self.link.on_connect.append(self._published.clear)
        # Remembered by the link while it connects, and sent first thing: the other members
        # must see us before they settle on who stands first (decision 031).
        await self.link.publish_retained(
            topics.member(self.cluster, self.node), self.member_record(online=True)
        )
        while True:
            if self.link.connected:
                await self.publish_once()
            await asyncio.sleep(self._interval)

    async def alert(self, kind: str, message: str, *, fix: str) -> None:
        """Raise an operator alert on the cluster's alert topic (and in the log); every alert
        says what to do about it."""
        log.warning("alert_raised", kind=kind, message=message, fix=fix)
        await self.link.publish(
            topics.alerts(self.cluster),
            topics.AlertRecord(node=self.node, kind=kind, message=message, fix=fix, at=time.time()),
        )

    async def leave(self) -> None:
        """Announce a clean leave: membership offline (the Last Will covers unclean exits)."""
        await self.link.publish_retained(
            topics.member(self.cluster, self.node), self.member_record(online=False)
        )
