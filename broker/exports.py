"""The point-in-time exports a broker serves, and what keeps them true when it stops owning.

:class:`Exports` makes, lists and removes the NBD exports of VM points (each disk through its
applier's :class:`~broker.pointview.PointView`, with a private overlay). A VM's exports read the
replica image through the view, which is right only while every change of that image passes
through this broker's applier (it hands the view the undo before the image changes).

So when the owner steps down (it lost MQTT for a lease; the default ``placement = "owner"``) its
exported VMs are *kept* (decision 043): their appliers pause, the exports go on, and
:class:`StepDownGuard` lets a request read the replica only inside a section of the store's
fence at the epoch the broker owned it with. Another broker's claim is the one thing that could
change the image under the view: its load waits for such a section to end, and any request after
the claim is refused with ``EIO`` (``pit_export_lost``). When this broker is elected again with
no other claim in between, the appliers resume and the exports never noticed; otherwise they end.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Final, Protocol

from broker.apply import ReplicaEngine
from broker.errors import UnknownPoint
from broker.pitexport import PointInTimeExport
from broker.points import Key, key_text
from broker.store import Replica, Store
from common.logs import get_logger
from common.nbd.constants import Errno
from common.nbd.errors import ExportError
from common.nbd.server import NBDServer

_log = get_logger("broker.exports")


_NOTHING: Final = contextlib.nullcontext()
EXPORT_AGAIN: Final = "create the export again on the owner (POST /v1/vms/VM/exports)"


class Owner(Protocol):
    """What the guard reads of the broker (``broker/service.py:BrokerService``)."""

    def kept_epoch(self, vm_uuid: str) -> int | None:
        """The owner epoch the VM's exports were kept through a step-down at (None: they were
        not; the broker serves the VM as its owner, or as the member it is placed on)."""


class StepDownGuard:
    """Entered around every request of one export (module docstring): nothing to check while
    the broker serves the VM; once its exports were kept through a step-down, a section of the
    store's fence, inside which no other broker may have claimed the store since, or ``EIO``."""

    def __init__(self, store: Store, replica: Replica, owner: Owner, node: str, name: str) -> None:
        self.store = store
        self.replica = replica
        self.owner = owner
        self.node = node
        self.name = name
        self.lost = ""

    def __call__(self) -> AbstractContextManager[None]:
        if self.lost:
            self._refuse(self.lost)
        epoch = self.owner.kept_epoch(self.replica.meta.vm_uuid)
        # Nothing to enter in the common case: a request is a few microseconds, of which a
        # generator-based context manager would be a good part.
        return _NOTHING if epoch is None else self._kept(epoch)

    @contextlib.contextmanager
    def _kept(self, epoch: int) -> Iterator[None]:
        # A section, although only the overlay is written: a new owner's load waits for it,
        # so nothing changes the image while this request reads it.
        with self.store.section(self.replica):
            if not self.store.owned_since(epoch, self.node):
                self._refuse(f"another broker claimed the store after epoch {epoch}")
            yield

    def _refuse(self, why: str) -> None:
        if not self.lost:
            self.lost = why
            _log.warning(
                "pit_export_lost",
                export=self.name,
                reason=f"{why}: the replica may change under this export, so its requests "
                "fail with EIO",
                fix=f"{EXPORT_AGAIN}; DELETE /v1/exports/{self.name} removes this one",
            )
        raise ExportError(Errno.EIO, f"export {self.name}: {self.lost}")


class Exports:
    """This broker's point-in-time exports and their descriptions (module docstring)."""

    def __init__(self, nbd: NBDServer, socket: Path, overlays: Callable[[], Path]) -> None:
        self.nbd = nbd
        self.socket = socket
        self._overlays = overlays
        self._live: dict[str, PointInTimeExport] = {}
        self._docs: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._live)

    def vms(self) -> set[str]:
        """The uuids of the VMs exported here."""
        return {str(doc["uuid"]) for doc in self._docs.values()}

    def names_of(self, vms: set[str]) -> list[str]:
        """The names of the exports of ``vms``."""
        return [name for name, doc in self._docs.items() if doc["uuid"] in vms]

    async def create(
        self,
        engines: Sequence[ReplicaEngine],
        point: str,
        keys: Sequence[Key],
        guard: Callable[[ReplicaEngine, str], StepDownGuard],
        *,
        read_only: bool = False,
    ) -> list[dict[str, Any]]:
        """Serve each disk of a VM as of VM point ``point`` over NBD, disk ``i`` (through
        ``engines[i]``) at its state ``keys[i]``; returns their descriptions."""
        made: list[dict[str, Any]] = []
        try:
            for engine, key in zip(engines, keys, strict=True):
                view = engine.open_view(key)
                m = engine.replica.meta
                name = f"pit-{m.vm_name}-{m.disk_id}-{key_text(view.key)}-{secrets.token_hex(3)}"
                overlay = self._overlays() / f"{name}.cow"
                try:
                    export = PointInTimeExport(
                        name,
                        view,
                        m.disk_size,
                        overlay,
                        read_only=read_only,
                        description=f"{m.vm_name}/{m.disk_id} as of point {point}",
                        guard=guard(engine, name),
                        image_fd=engine.image_fd,
                    )
                except BaseException:
                    view.close()
                    raise
                self._live[name] = export
                self.nbd.add_export(export)
                doc = {
                    "name": name,
                    "vm": m.vm_name,
                    "uuid": m.vm_uuid,
                    "disk": m.disk_id,
                    "point": point,
                    "disk_point": key_text(view.key),
                    "size": m.disk_size,
                    "read_only": read_only,
                    "socket": str(self.socket),
                    "nbd_uri": f"nbd+unix:///{name}?socket={self.socket}",
                    "overlay": str(overlay),
                }
                self._docs[name] = doc
                made.append(doc)
                _log.info("pit_export_created", export=name, point=point, vm=m.vm_name)
        except BaseException:
            for doc in made:
                await self.remove(str(doc["name"]))
            raise
        return made

    def list(self) -> list[dict[str, Any]]:
        """The exports being served, with their client counts (and why one refuses requests)."""
        out = []
        for name, doc in self._docs.items():
            export = self._live[name]
            lost = export.guard.lost if isinstance(export.guard, StepDownGuard) else ""
            out.append({**doc, "clients": export.clients, **({"lost": lost} if lost else {})})
        return out

    async def remove(self, name: str) -> None:
        """Stop serving an export and delete its overlay."""
        export = self._live.pop(name, None)
        if export is None:
            raise UnknownPoint(f"no export named {name!r}", fix="GET /v1/exports lists them")
        self._docs.pop(name, None)
        with contextlib.suppress(KeyError):
            await self.nbd.remove_export(name)
        export.close()


__all__ = ["EXPORT_AGAIN", "Exports", "Owner", "StepDownGuard"]
