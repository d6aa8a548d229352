"""MQTT topic names and message schemas of the control plane.

Retained topics carry state that a newcomer must see at once (membership, the owner and its epoch,
each VM's role per site, health); alerts are plain messages. Payloads are JSON validated by the
models below so that a broker from another release fails loudly, not subtly.
"""

from __future__ import annotations

import uuid
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from common.tls.identities import Identity
from common.tls.identities import Role as PeerRole

ROOT = "replikant/v1"

Role = Literal["PRIMARY", "REPLICA", "TEST", "FAILED-OVER", "FENCED"]
Health = Literal["ok", "warning", "critical"]


def member(cluster: str, node: str) -> str:
    """Retained: one broker's membership record in its cluster."""
    return f"{ROOT}/clusters/{cluster}/members/{node}"


def members(cluster: str) -> str:
    """Wildcard over every member of a cluster."""
    return f"{ROOT}/clusters/{cluster}/members/+"


def owner(cluster: str) -> str:
    """Retained: who owns the cluster, with the owner epoch."""
    return f"{ROOT}/clusters/{cluster}/owner"


def vm_site(vm_uuid: uuid.UUID, site: str) -> str:
    """Retained: a VM's role, generation and health at one site."""
    return f"{ROOT}/vms/{vm_uuid}/sites/{site}"


def placement(cluster: str, vm_uuid: uuid.UUID | str) -> str:
    """Retained: the member a VM of the cluster is placed on (decision 032)."""
    return f"{ROOT}/clusters/{cluster}/placements/{vm_uuid}"


def placements(cluster: str) -> str:
    """Wildcard over every placement of a cluster."""
    return f"{ROOT}/clusters/{cluster}/placements/+"


def alerts(cluster: str) -> str:
    """Not retained: alerts raised by the cluster's brokers (storage full, fenced, ...)."""
    return f"{ROOT}/clusters/{cluster}/alerts"


def host(name: str) -> str:
    """Retained: an agent host's presence (online, VMs, disks), cleared by its last will."""
    return f"{ROOT}/hosts/{name}"


def requests(name: str) -> str:
    """Not retained: command requests to the agent on host ``name``."""
    return f"{ROOT}/hosts/{name}/requests"


def replies(requester: Identity) -> str:
    """Not retained: answers to ``requester``'s requests (one topic per requester)."""
    return f"{ROOT}/replies/{requester.role}/{requester.label}"


PUBLISHERS: Final[tuple[tuple[PeerRole, str], ...]] = (
    ("broker", "clusters/{cluster}/#"),
    ("broker", "vms/#"),
    ("broker", "hosts/+/requests"),
    ("broker", "replies/#"),
    ("agent", "hosts/{name}"),
    ("agent", "replies/#"),
    ("admin", "hosts/+/requests"),
)
"""Who may publish where, below :data:`ROOT`: ``{cluster}`` and ``{name}`` are the publisher's
own. The receivers' check (:func:`may_publish`) and Mosquitto's ACL
(:func:`common.mqttbroker.mosquitto_acl`) are both made from this one table."""


def publish_filters(identity: Identity) -> list[str]:
    """The topic filters ``identity`` may publish on."""
    return [
        f"{ROOT}/" + pattern.format(cluster=identity.cluster, name=identity.name)
        for role, pattern in PUBLISHERS
        if role == identity.role
    ]


def matches(topic: str, topic_filter: str) -> bool:
    """Whether ``topic`` matches the MQTT ``topic_filter`` (``+`` one level, ``#`` the rest)."""
    levels = topic.split("/")
    for i, want in enumerate(topic_filter.split("/")):
        if want == "#":
            return True
        if i >= len(levels) or (want != "+" and want != levels[i]):
            return False
    return len(levels) == len(topic_filter.split("/"))


def may_publish(identity: Identity, topic: str) -> bool:
    """Whether a record on ``topic`` signed by ``identity`` is believable."""
    return any(matches(topic, f) for f in publish_filters(identity))


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemberRecord(_Message):
    """What a broker announces about itself; an empty retained payload means it left."""

    node: str
    cluster: str
    site: str
    url: str
    online: bool
    epoch: int = Field(ge=0)
    since: float
    exporting: tuple[uuid.UUID, ...] = ()
    """The VMs whose point-in-time exports (test copies' disks included) this member serves:
    the owner's balance moves leave them where they are (decision 032)."""


class OwnerRecord(_Message):
    """The owner of a cluster, its fencing epoch, where agents reach it, and its renewal count
    (the owner re-publishes every ``[election] renew`` seconds with ``seq`` + 1; a record that
    stops changing for ``lease`` seconds is a dead owner's)."""

    node: str
    epoch: int = Field(ge=1)
    url: str = Field(pattern=r"^https://")
    seq: int = Field(ge=1)


class VMSiteRecord(_Message):
    """A VM's state as seen at one site."""

    name: str
    role: Role
    generation: int = Field(ge=0)
    health: Health
    lag_seconds: float | None
    last_point: str | None


class AlertRecord(_Message):
    """An operator-facing alert: what, where, and what to do."""

    node: str
    kind: str
    message: str
    fix: str = Field(min_length=1)
    at: float


class HostVM(_Message):
    """One VM an agent protects, as that agent knows it."""

    name: str
    uuid: uuid.UUID
    role: Role
    """The VM's role at this host's site as its agent holds it (``FENCED`` included: the old
    primary's agent is the only one that knows it is fenced)."""
    generation: int = Field(ge=1)
    disks: list[str]


class HostRecord(_Message):
    """An agent host's presence; its last will says ``online: false``."""

    host: str
    site: str
    online: bool
    since: float
    vms: list[HostVM]


class Request(_Message):
    """A command to one daemon; the answer goes to :func:`replies` of the signer."""

    id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    command: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    args: dict[str, Any] = Field(default_factory=dict)
    expires: float
    """Seconds since the epoch after which the request is ignored (a captured request cannot be
    replayed to a daemon that restarted)."""


class Response(_Message):
    """The answer to :class:`Request` ``id``: a result, or an error with its fix."""

    id: str
    ok: bool
    result: dict[str, Any] | None = None
    error: str | None = None
    fix: str | None = None


class PlacementMessage(_Message):
    """Which member applies a VM and serves its agent; ``epoch``/``version`` are the placement's
    fencing token, which the store checks (MQTT only tells members and agents where to go)."""

    node: str
    url: str
    epoch: int = Field(ge=1)
    version: int = Field(ge=1)
