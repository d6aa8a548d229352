"""What the broker's HTTP handlers, status views and seed import need from the broker.

Each is a narrow :class:`typing.Protocol` (as :class:`broker.journal.DirectSink` is), so that
those modules never import :mod:`broker.service`: the service satisfies them all, and a test
can hand a handler anything that does. Read-only attributes are properties here so that a
frozen stand-in fits as well as the service.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from aiohttp import web

if TYPE_CHECKING:
    from broker.apply import Condition, ReplicaEngine
    from broker.errors import StorageFullError
    from broker.points import Key, VMPoint
    from broker.store import Replica, Store
    from broker.testcopies import TestCopies
    from common.config import BrokerConfig
    from common.hrl import DecodeLimits
    from common.tls import Identity

T = TypeVar("T")


class TierLabels(Protocol):
    """The retention tiers' view of points: what the points listing shows per point."""

    def tier_label(self, vm_uuid: str, point: VMPoint, now_ns: int) -> str:
        """The tier VM point ``point`` of VM ``vm_uuid`` belongs to at ``now_ns``."""


class Replicas(Protocol):
    """The broker's replicas and their engines: what status views read."""

    @property
    def config(self) -> BrokerConfig:
        """The broker's configuration."""

    @property
    def epoch(self) -> int:
        """The owner epoch this broker holds the store under."""

    @property
    def store(self) -> Store:
        """The replica store."""

    @property
    def engines(self) -> dict[tuple[str, str], ReplicaEngine]:
        """The running apply engines, by replica key."""

    @property
    def conditions(self) -> dict[str, Condition]:
        """Broker-wide conditions (storage full, ...), by code."""

    @property
    def retainer(self) -> TierLabels:
        """Retention passes: which tier each point is in."""

    @property
    def test_copies(self) -> TestCopies:
        """The VMs this site runs as TEST copies (test failover)."""

    def engine_for(self, replica: Replica) -> ReplicaEngine:
        """The apply engine of ``replica``, started if it was not running."""

    def check_space(self, *, needed: int, replica: Replica | None = None) -> None:
        """Raise :class:`StorageFullError` unless ``needed`` bytes fit above the reserve."""

    async def fenced(self, replica: Replica, write: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a blocking write of ``replica`` inside a write section at this broker's epoch
        (a deposed owner is refused before it writes)."""


class Ingest(Replicas, Protocol):
    """What the agents' replication endpoints need besides the replicas."""

    @property
    def limits(self) -> DecodeLimits:
        """Limits the batch decoder enforces."""

    def check_owner(self, vm_uuid: str | None = None, *, stored_epoch: int | None = None) -> None:
        """Raise :class:`broker.errors.NotOwner` unless this broker serves the VM now (the
        refusal names the member that does), or :class:`broker.errors.FencedError`.
        ``stored_epoch``: the store's epoch as the caller just read it (one read for many VMs
        checked in one step), else it is read here."""

    def storage_full(self, exc: StorageFullError) -> None:
        """Raise the broker-wide storage_full condition."""

    def storage_ok(self) -> None:
        """Clear the storage_full condition."""

    async def reannounce(self, replica: Replica, ident: Identity, body: dict[str, Any]) -> None:
        """An agent announced an existing replica again (labels, site, RPO may change)."""

    def hashes(
        self, engine: ReplicaEngine, key: Key | None, offset: int, length: int, block_size: int
    ) -> tuple[bytes, Key]:
        """Block hashes of a replica's range, as of ``key`` (None: applied state)."""


class Admin(Ingest, Protocol):
    """What the operator's endpoints need: everything above, and the operator's acts."""

    def broker_json(self) -> dict[str, Any]:
        """The broker's own entry of ``GET /v1/status``."""

    def hosts_json(self) -> list[dict[str, Any]]:
        """The agent hosts' retained MQTT records this broker heard (``GET /v1/status``)."""

    async def change_source(
        self,
        replicas: list[Replica],
        admin: Identity,
        *,
        host: str | None,
        generation: int | None,
    ) -> None:
        """Rebind a VM's replicas to another source host and/or raise their generation."""

    async def create_exports(
        self, replicas: list[Replica], point: str, keys: list[Key], *, read_only: bool = False
    ) -> list[dict[str, Any]]:
        """Serve every disk of a VM point over NBD."""

    def list_exports(self) -> list[dict[str, Any]]:
        """The point-in-time exports being served."""

    async def remove_export(self, name: str) -> None:
        """Stop serving an export and delete its overlay."""

    async def seed_import(
        self,
        directory: str,
        *,
        expect_vm: str | None,
        image: tuple[str, str, str] | None = None,
    ) -> dict[str, Any]:
        """Load offline seed media (or one raw image) into replicas."""


SERVICE_KEY: web.AppKey[Admin] = web.AppKey("service")
"""Where the HTTP application keeps the broker it serves."""
