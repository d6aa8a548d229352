"""MQTT topic names and message schemas of the control plane.

Retained topics carry state that a newcomer must see at once (membership, the owner and its epoch,
each VM's role per site, health); alerts are plain messages. Payloads are JSON validated by the
models below so that a broker from another release fails loudly, not subtly.
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ROOT = "replikant/v1"

Role = Literal["PRIMARY", "REPLICA", "TEST"]
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


class PlacementMessage(_Message):
    """Which member applies a VM and serves its agent; ``epoch``/``version`` are the placement's
    fencing token, which the store checks (MQTT only tells members and agents where to go)."""

    node: str
    url: str
    epoch: int = Field(ge=1)
    version: int = Field(ge=1)
