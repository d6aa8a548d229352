"""The store's free space: the reserve a broker keeps, and ENOSPC turned into a refusal.

Every check of free space against ``[broker] min_free_bytes`` and every mapping of a full file
system (ENOSPC, EDQUOT) to :class:`~broker.errors.StorageFullError` goes through
:class:`StoreSpace`, so the refusal reads the same wherever the store runs out.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from broker.errors import StorageFullError

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_FIX = "free space on the store's file system or move the store; the broker resumes by itself"


def free_bytes(path: Path) -> int:
    """Bytes available to an unprivileged writer on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def is_full(exc: OSError) -> bool:
    """True when ``exc`` says the file system (or the quota) is full."""
    return exc.errno in FULL_ERRNOS


class StoreSpace:
    """Free space of the store at ``root``, which keeps ``reserve`` bytes for itself."""

    def __init__(self, root: Path, reserve: int) -> None:
        self.root = root
        self.reserve = reserve

    def free(self) -> int:
        """Bytes available to the broker on the store's file system now."""
        return free_bytes(self.root)

    def check(self, needed: int, doing: str) -> None:
        """Refuse ``doing`` (e.g. "journaling batch 7 of web1/disk0") unless ``needed`` bytes
        fit above the reserve."""
        free = self.free()
        if free - needed < self.reserve:
            raise self.full(free, needed, doing)

    def full(self, free: int, needed: int, doing: str) -> StorageFullError:
        """The refusal of ``doing`` on a store with ``free`` bytes that needed ``needed``."""
        total = self.reserve + needed
        return StorageFullError(
            f"store {self.root} has {free} bytes free; {doing} needs {total} "
            f"(reserve {self.reserve} + {needed})",
            fix=_FIX,
            details={
                "store": str(self.root),
                "free_bytes": free,
                "needed_bytes": total,
                "min_free_bytes": self.reserve,
            },
        )

    @contextmanager
    def refusing_when_full(self, needed: int, doing: str) -> Iterator[None]:
        """Turn ENOSPC/EDQUOT raised inside the block into :class:`StorageFullError`."""
        try:
            yield
        except OSError as exc:
            if is_full(exc):
                raise self.full(self.free(), needed, doing) from None
            raise
