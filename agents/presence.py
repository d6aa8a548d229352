"""The agent on the MQTT control plane (``[mqtt]`` in agent.toml): presence, requests, the owner.

- Presence: ``replikant/v1/hosts/{host}`` retained (online, each VM's role and generation here,
  disks), re-published on every reconnect and on every role change (:meth:`Presence.announce`
  watches the agent's role table); the last will says offline, a clean stop says so itself.
- Requests: answers ``status`` (host, VMs, disks, roles as this agent knows them) over
  :mod:`common.mqttrpc`; more commands are one ``self.rpc.command(...)`` each.
- The owner: follows its cluster's retained owner record and hands the owner's URL to the
  broker client (:meth:`agents.ship.BrokerClient.follow`), so no agent needs a config change
  when the owner moves. Only signed, verified records count (:mod:`common.signedrecord`), and an
  owner record never moves the agent back to a lower epoch than one it has seen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from agents.roles import RoleRecord, RoleTable
from common import topics
from common.config import AgentConfig, VMConfig
from common.logs import get_logger
from common.mqtt import MQTTLink
from common.mqttrpc import RPCServer
from common.tls.identities import Identity

log = get_logger("agents.presence")


class Follower(Protocol):
    """Whoever ships to the owner: told the owner's URL when a verified owner record moves."""

    def follow(self, url: str) -> bool:
        """Send from now on to the broker at ``url``; whether it is followed."""


class Presence:
    """One agent's MQTT link, presence record, request server and owner following."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        status: Callable[[], dict[str, Any]],
        roles: RoleTable,
        follower: Follower | None,
    ) -> None:
        assert config.mqtt.url is not None
        self.config = config
        self.host = config.agent.host
        self.link = MQTTLink.for_daemon(
            config.mqtt.url,
            client_id=f"replikant-agent-{self.host}",
            tls=config.tls,
            use_tls=config.mqtt.use_tls,
        )
        self._since = time.time()
        self._status = status
        self._roles = roles  # by VM uuid; the agent's own, read at each publication
        roles.watchers.append(self.announce)
        self._announcing: set[asyncio.Task[bool]] = set()
        self._follower = follower
        self.owner: topics.OwnerRecord | None = None
        self.link.set_will(topics.host(self.host), self.record(online=False))
        self.rpc = RPCServer(self.link, topics.requests(self.host))
        self.rpc.command("status", self._answer_status)
        cluster = config.broker.cluster
        self.link.subscribe(topics.owner(cluster), topics.OwnerRecord, self._on_owner)

    def record(self, *, online: bool) -> topics.HostRecord:
        """This host's presence record."""
        return topics.HostRecord(
            host=self.host,
            site=self.config.agent.site,
            online=online,
            since=self._since,
            vms=[
                topics.HostVM(
                    name=vm.name,
                    uuid=vm.uuid,
                    role=self._role(vm).role,
                    generation=self._role(vm).generation,
                    disks=[d.id for d in vm.disks if not d.exclude],
                )
                for vm in self.config.vms
            ],
        )

    def _role(self, vm: VMConfig) -> RoleRecord:
        return self._roles.get(str(vm.uuid)) or RoleRecord(vm.initial_role)

    def announce(self) -> None:
        """Publish the record again now (a role changed); offline, the link sends it on
        reconnect."""
        task = asyncio.get_running_loop().create_task(
            self.link.publish_retained(topics.host(self.host), self.record(online=True))
        )
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _answer_status(self, _args: dict[str, Any], _requester: Identity) -> dict[str, Any]:
        vms = [vm.model_dump(mode="json") for vm in self.record(online=True).vms]
        return {**self._status(), "vms": vms}

    def _on_owner(self, _topic: str, record: topics.OwnerRecord | None) -> None:
        if record is None:
            return
        known = self.owner
        if known is not None and record.epoch < known.epoch:
            log.info("owner_record_ignored", node=record.node, epoch=record.epoch,
                     known_epoch=known.epoch, reason="older epoch")  # fmt: skip
            return
        self.owner = record
        if known is not None and (known.url, known.epoch) == (record.url, record.epoch):
            return  # a renewal
        following = self._follower is not None and self._follower.follow(record.url)
        log.info("owner_learned", node=record.node, epoch=record.epoch, url=record.url,
                 following=following)  # fmt: skip

    async def run(self) -> None:
        """Publish presence and stay connected until cancelled."""
        await self.link.publish_retained(topics.host(self.host), self.record(online=True))
        await self.link.run()

    async def leave(self) -> None:
        """A clean stop: presence offline (the last will covers the unclean ones)."""
        await self.link.publish_retained(topics.host(self.host), self.record(online=False))
