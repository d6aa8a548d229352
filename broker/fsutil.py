"""Free space on the file system that holds the broker's store.

The crash-safe file primitives the store, journal and points use live in :mod:`common.fsio`.
"""

from __future__ import annotations

import os
from pathlib import Path


def free_bytes(path: Path) -> int:
    """Bytes available to an unprivileged writer on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
