"""Which member of the cluster should serve one VM's agent: the routing seam (issue 12).

The API (stable; the placement work replaces the default router, nothing else):

- :class:`MemberRef` ``(node, url, epoch)``: a member an agent can be sent to.
- :class:`ClusterView`: what this member knows right now (``self_node``, ``owner`` as a
  :class:`MemberRef` or ``None``, ``members``: node -> :class:`MemberInfo` ``(node, url,
  online)``), a snapshot taken by the cluster driver (:mod:`broker.cluster`).
- :class:`Router`, a ``typing.Protocol`` with one method,
  ``route(vm_uuid: str, view: ClusterView) -> MemberRef | None``: the member that should serve
  this VM's agent, or ``None`` when nobody is known to (the agent is then refused and retries).
- :class:`OwnerRouter`, the default: every VM goes to the cluster's owner.

The broker calls ``route`` for every agent request (:meth:`broker.service.BrokerService.
check_owner`); when the answer is another member, the request is refused with 503 ``not_owner``
whose details carry ``owner_url``, ``owner`` (node) and ``epoch`` of that member, and the agent
follows it (``agents.ship.BrokerClient.follow``). Routing is advisory like all of MQTT: who may
*write* the store is decided by the owner-epoch fence (decision 031), never here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class MemberRef:
    """A member an agent can be sent to."""

    node: str
    url: str
    epoch: int


@dataclass(frozen=True)
class MemberInfo:
    """One member of the cluster as its retained membership record shows it."""

    node: str
    url: str
    online: bool


@dataclass(frozen=True)
class ClusterView:
    """This member's view of its cluster at one instant."""

    self_node: str
    owner: MemberRef | None
    members: Mapping[str, MemberInfo] = field(default_factory=dict)


class Router(Protocol):
    """Decides which member serves a VM's agent."""

    def route(self, vm_uuid: str, view: ClusterView) -> MemberRef | None:
        """The member that should serve ``vm_uuid``'s agent, or ``None`` if none is known."""


class OwnerRouter:
    """The default: the cluster's owner serves every VM."""

    def route(self, vm_uuid: str, view: ClusterView) -> MemberRef | None:
        """The owner, whatever the VM."""
        return view.owner
