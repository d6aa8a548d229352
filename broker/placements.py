"""The per-VM fence: which member may write each VM's replicas, in the store (decision 032).

Layout under the store root, beside the owner-epoch fence of decision 012::

    .placements/<vm-uuid>.json      {"vm_uuid", "node", "epoch", "version", "placed_ns"}

Only the cluster's owner writes a record, through :meth:`PlacementBook.assign`, under the store's
fence lock and only while its owner epoch is the store's (a deposed owner cannot place). Each
record carries a token ``(epoch, version)`` that only grows: ``epoch`` is the owner epoch that
placed it, ``version`` counts the VM's placements.

A member serves a VM only after it *adopted* the record naming it (:meth:`PlacementBook.adopt`:
the token is held in memory, and the caller re-reads the replicas from the store, which another
member may have written). Before every journal write and every apply, :meth:`PlacementBook.check`
re-reads the record and refuses unless it still names this member with the held token: a member
whose VM was moved away (or moved away and back: a newer token) is refused before it writes.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from broker import names
from broker.errors import BrokerError, FencedError, NotOwner
from broker.store import Replica, Store
from common.fsio import atomic_write_json, fsync_dir, read_json
from common.logs import get_logger

_log = get_logger("broker.placements")

Token = tuple[int, int]
"""``(owner epoch that placed, placement version)``: compared as a tuple, only ever grows."""


class NotPlacedHere(NotOwner):
    """This member may not write the VM: the store places it on another member (503 not_owner,
    so the agent tries the member the refusal names)."""


@dataclass(frozen=True)
class PlacementRecord:
    """One VM's placement as the store records it."""

    vm_uuid: str
    node: str
    epoch: int
    version: int
    placed_ns: int

    @property
    def token(self) -> Token:
        """The fencing token of this placement."""
        return self.epoch, self.version

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PlacementRecord:
        """Load, ignoring keys a newer broker may have added."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class PlacementBook:
    """The store's placement records, and this member's held tokens (module docstring)."""

    def __init__(self, store: Store, node: str) -> None:
        self.store = store
        self.node = node
        self.dir = store.root / ".placements"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self._held: dict[str, Token] = {}
        self._lock = threading.Lock()

    def _path(self, vm_uuid: str) -> Path:
        return names.inside(self.dir, f"{names.vm_uuid(vm_uuid)}.json")

    def get(self, vm_uuid: str) -> PlacementRecord | None:
        """The VM's placement, read fresh from the store (None: never placed)."""
        try:
            return PlacementRecord.from_json(read_json(self._path(vm_uuid)))
        except FileNotFoundError:
            return None

    def all(self) -> dict[str, PlacementRecord]:
        """Every recorded placement by VM UUID (what a new owner continues from)."""
        out: dict[str, PlacementRecord] = {}
        for entry in os.scandir(self.dir):
            if entry.name.endswith(".json") and entry.is_file(follow_symlinks=False):
                record = self.get(entry.name[: -len(".json")])
                if record is not None:
                    out[record.vm_uuid] = record
        return out

    def vms(self) -> list[str]:
        """Every VM with a directory in the store, whichever member created it."""
        out = []
        for entry in os.scandir(self.store.root):
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                try:
                    out.append(names.vm_uuid(entry.name))
                except BrokerError:
                    continue  # not a VM: Store._load logs what it ignores
        return out

    def assign(
        self, moves: list[tuple[str, str]], *, epoch: int, owner: str
    ) -> list[PlacementRecord]:
        """Record ``(vm_uuid, node)`` placements as owner ``owner`` at owner epoch ``epoch``.

        Refused (:class:`FencedError`, nothing written) unless ``epoch`` is the store's owner
        epoch held by ``owner``: checked and written under the fence lock, so a deposed owner can
        never place a VM after its successor claimed the store.
        """
        made: list[PlacementRecord] = []
        with self.store.fence_lock():
            stored, holder = self.store.stored_epoch(), self.store.stored_owner()
            if (epoch, owner) != (stored, holder):
                raise FencedError(
                    f"{owner} may not place VMs at owner epoch {epoch}: store {self.store.root} "
                    f"is at epoch {stored} held by {holder}",
                    fix="only the cluster's current owner places VMs; this broker must stop",
                    details={"epoch": epoch, "stored_epoch": stored, "owner": holder},
                )
            for vm_uuid, node in moves:
                old = self.get(vm_uuid)
                record = PlacementRecord(
                    vm_uuid=names.vm_uuid(vm_uuid),
                    node=names.name(node, "node"),
                    epoch=epoch,
                    version=(old.version + 1) if old is not None else 1,
                    placed_ns=time.time_ns(),
                )
                atomic_write_json(self._path(vm_uuid), asdict(record))
                made.append(record)
            if made:
                fsync_dir(self.dir)
        for record in made:
            _log.info(
                "vm_placed",
                vm_uuid=record.vm_uuid,
                node=record.node,
                epoch=record.epoch,
                version=record.version,
            )
        return made

    # -- the member's side
    def adopt(self, vm_uuid: str) -> PlacementRecord | None:
        """Hold the token of the record naming this member (None: it names another, or none).
        The caller re-reads the VM's replicas from the store before serving them."""
        record = self.get(vm_uuid)
        with self._lock:
            if record is None or record.node != self.node:
                self._held.pop(vm_uuid, None)
                return None
            self._held[vm_uuid] = record.token
        return record

    def release(self, vm_uuid: str) -> None:
        """Stop serving a VM: drop its held token."""
        with self._lock:
            self._held.pop(vm_uuid, None)

    def held(self, vm_uuid: str) -> Token | None:
        """The token this member holds for the VM, if it serves it."""
        with self._lock:
            return self._held.get(vm_uuid)

    def check(self, replica: Replica) -> bool:
        """The per-VM fence, run before every journal write and apply of ``replica``.

        Returns False when the VM has no placement record (a cluster that does not spread VMs:
        the owner-epoch fence alone applies). Raises :class:`NotPlacedHere` unless the record
        names this member with the token it holds; returns True when it does.
        """
        vm_uuid = replica.meta.vm_uuid
        record = self.get(vm_uuid)
        if record is None:
            return False
        held = self.held(vm_uuid)
        if record.node == self.node and record.token == held:
            return True
        _log.warning(
            "placement_fenced",
            vm=replica.meta.vm_name,
            vm_uuid=vm_uuid,
            node=self.node,
            placed_on=record.node,
            token=list(record.token),
            held=list(held) if held else None,
        )
        raise NotPlacedHere(
            f"vm {replica.meta.vm_name} ({vm_uuid}) is placed on broker {record.node} "
            f"(placement {record.epoch}.{record.version}); broker {self.node} "
            + (f"holds placement {held[0]}.{held[1]}" if held else "does not serve it"),
            fix=f"send this VM's batches to broker {record.node}",
            details={"placed_on": record.node, "token": list(record.token), "node": self.node},
        )


__all__ = ["NotPlacedHere", "PlacementBook", "PlacementRecord", "Token"]
