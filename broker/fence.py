"""The owner-epoch fence of a replica store (invariant 7, decisions 012 and 031).

``store.json`` holds the highest owner epoch ever claimed on the store, the node that claimed
it, and the claim it replaced. :class:`OwnerFence` (a part of :class:`broker.store.Store`)
raises it with a locked read-compare-write, and runs every store write inside a *write section*:
the replica's ``.fence`` lock held shared, the caller's epoch checked inside it. A new owner takes
that lock exclusively after its claim, so a deposed owner's section has ended by then and its
next one is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

from broker.errors import FencedError
from common.fsio import atomic_write_json, read_json
from common.logs import get_logger

_log = get_logger("broker.store")

WRITER_FIX: Final = (
    "a deposed owner is still writing this replica (or is frozen): resume or kill that broker "
    "process and its takeover completes"
)
NO_FENCE: Final = "REPLIKANT_TEST_NO_FENCE"
"""Test hook (docs/security.md): ``1`` turns the owner-epoch fence off, so that a test can show
the damage it prevents. Never set in production."""
T = TypeVar("T")


class _Meta(Protocol):
    @property
    def epoch(self) -> int:
        """The highest owner epoch that wrote the replica."""


class FencedReplica(Protocol):
    """What the fence needs of a replica (``broker/store.py:Replica``)."""

    @property
    def path(self) -> Path:
        """The replica's directory."""

    @property
    def meta(self) -> _Meta:
        """Its ``meta.json``."""

    def update_meta(self, **changes: Any) -> None:
        """Change ``meta.json`` durably."""


class OwnerFence:
    """The fence's half of :class:`broker.store.Store` (module docstring)."""

    root: Path
    fence_enabled: bool
    vm_fence: Callable[[Any], bool] | None
    """The per-VM fence of a cluster that spreads VMs over members (broker/placements.py):
    True when it governs the replica (and let it write), raising when it refuses."""

    @property
    def _fence_path(self) -> Path:
        return self.root / "store.json"

    @contextlib.contextmanager
    def fence_lock(self) -> Iterator[None]:
        """The exclusive lock of every read-compare-write of the fences (owner and per-VM)."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def stored_epoch(self) -> int:
        """The highest owner epoch claimed on this store (read fresh from disk)."""
        try:
            return int(read_json(self._fence_path).get("epoch", 0))
        except FileNotFoundError:
            return 0

    def stored_owner(self) -> str | None:
        """The node that claimed :meth:`stored_epoch`."""
        try:
            owner = read_json(self._fence_path).get("owner")
        except FileNotFoundError:
            return None
        return str(owner) if owner is not None else None

    def claim_epoch(self, epoch: int, node: str) -> int:
        """Claim ownership at ``epoch``: refused unless higher than the stored one.

        Re-claiming the stored epoch by the node that holds it is allowed (idempotent restart of
        a claim). Returns ``epoch``.
        """
        with self.fence_lock():
            stored = self.stored_epoch()
            owner = self.stored_owner()
            if epoch < stored or (epoch == stored and owner not in (None, node)):
                raise FencedError(
                    f"cannot claim owner epoch {epoch} for {node} on store {self.root}: "
                    f"epoch {stored} is held by {owner}",
                    fix="another broker owns this store; take max(stored, announced) + 1",
                    details={"claimed": epoch, "stored": stored, "owner": owner},
                )
            self._write_claim(epoch, node, stored, owner)
        return epoch

    def owned_since(self, epoch: int, node: str) -> bool:
        """Whether no other node claimed the store since ``node`` held ``epoch``: it still
        does, or its own claim replaced exactly that one."""
        try:
            doc = read_json(self._fence_path)
        except FileNotFoundError:
            return False
        previous = doc.get("previous") or {}
        return doc.get("owner") == node and (
            doc.get("epoch") == epoch
            or (previous.get("epoch"), previous.get("owner")) == (epoch, node)
        )

    def claim_next_epoch(self, node: str) -> int:
        """Claim ``max(stored) + 1``: what a single broker does at startup."""
        with self.fence_lock():
            stored = self.stored_epoch()
            epoch = stored + 1
            self._write_claim(epoch, node, stored, self.stored_owner())
        return epoch

    def _write_claim(self, epoch: int, node: str, stored: int, owner: str | None) -> None:
        """Record ``node``'s claim of ``epoch`` under :meth:`fence_lock`, with the claim it
        replaces: whether anyone owned the store in between (:meth:`owned_since`) is then known
        without a history."""
        previous = {"epoch": stored, "owner": owner}
        atomic_write_json(
            self._fence_path,
            {"epoch": epoch, "owner": node, "claimed_ns": time.time_ns(), "previous": previous},
        )
        _log.info("epoch_claimed", epoch=epoch, node=node, store=str(self.root))

    @contextlib.contextmanager
    def writing(self, replica: FencedReplica, epoch: int) -> Iterator[None]:
        """A write section on ``replica`` under owner ``epoch``: holds the replica's ``.fence``
        lock shared and checks the fence inside it. A new owner takes that lock exclusively
        after its claim (:meth:`load`), so a section that began before the claim has ended by
        then, and one that begins after it sees the new epoch and is refused (decision 031)."""
        if not self.fence_enabled:
            yield
            return
        with self.section(replica):
            self.check_epoch(epoch, replica)
            yield

    @contextlib.contextmanager
    def section(self, replica: FencedReplica) -> Iterator[None]:
        """The replica's ``.fence`` lock held shared, no check: a new owner's load waits until
        the section ends."""
        fd = _open_fence(replica.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def fenced(
        self, replica: FencedReplica, epoch: int, write: Callable[..., T], *args: Any, **kw: Any
    ) -> T:
        """Run ``write(*args, **kw)`` inside a write section (:meth:`writing`): every store write
        outside the apply and journal paths (meta changes, retention, seeds, failover) goes
        through here, so a deposed owner is refused before it writes anything."""
        with self.writing(replica, epoch):
            return write(*args, **kw)

    @staticmethod
    def _barrier(disk_dir: Path, *, wait: bool) -> bool:
        """Wait out (or, without ``wait``, test for) a write section on the replica."""
        fd = _open_fence(disk_dir)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if not wait:
                    return False
                _log.warning("takeover_waiting_for_writer", replica=str(disk_dir), fix=WRITER_FIX)
                fcntl.flock(fd, fcntl.LOCK_EX)
                return True
        finally:
            os.close(fd)

    def check_epoch(self, epoch: int, replica: FencedReplica | None = None) -> None:
        """Refuse (:class:`FencedError`) a write stamped with an epoch older than the store's.

        With ``replica``, also compare against the epoch that last wrote it, and adopt a higher
        one durably *before* the caller writes anything (a fenced owner then finds the higher
        epoch next to the data even if ``store.json`` were lost). A VM placed on a member
        (:attr:`vm_fence`, decision 032) is fenced by its placement token instead.
        """
        if not self.fence_enabled:
            return
        if replica is not None and self.vm_fence is not None and self.vm_fence(replica):
            return
        stored = self.stored_epoch()
        floor = max(stored, replica.meta.epoch if replica is not None else 0)
        if epoch < floor:
            raise FencedError(
                f"write stamped with owner epoch {epoch} refused: store {self.root} is at "
                f"epoch {floor} (owner {self.stored_owner()})",
                fix="this broker no longer owns the cluster; it must stop applying",
                details={"epoch": epoch, "stored_epoch": floor},
            )
        if replica is not None and epoch > replica.meta.epoch:
            replica.update_meta(epoch=epoch)


def _open_fence(disk_dir: Path) -> int:
    """The replica's ``.fence`` lock file, never through a link planted in its place."""
    return os.open(
        disk_dir / ".fence", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )


__all__ = ["NO_FENCE", "WRITER_FIX", "FencedReplica", "OwnerFence", "T"]
