"""Take group and world access off a replica store made by an older broker or a looser umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def tighten_permissions(root: Path, *, skip: Path | None = None) -> tuple[int, int]:
    """Take group and world access off every file and directory of the store at ``root`` (one
    made by an older broker or under a looser umask); returns ``(files, dirs)`` changed.

    ``skip`` (the NBD socket directory, whose modes the service sets itself) is left alone,
    and so is every member's default socket directory (``.nbd``, ``.nbd-<node>``).
    Links are never followed: a planted link cannot make us chmod something else.
    """
    files = dirs = 0
    for top, subdirs, filenames in os.walk(root):
        here = Path(top)
        subdirs[:] = [
            d for d in subdirs if here / d != skip and not (here == root and d.startswith(".nbd"))
        ]
        dirs += _tighten(here, os.O_RDONLY | os.O_DIRECTORY)
        for name in filenames:
            mode = os.lstat(here / name).st_mode
            # Only loose regular files are opened: a store of many segments starts fast.
            if stat.S_ISREG(mode) and mode & 0o077:
                files += _tighten(here / name, os.O_RDONLY | os.O_NONBLOCK)
    return files, dirs


def _tighten(path: Path, flags: int) -> int:
    """Drop group/world bits of ``path`` through a descriptor opened without following a link;
    returns 1 when it changed."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not mode & 0o077:
            return 0
        os.fchmod(fd, stat.S_IMODE(mode) & 0o700)
        return 1
    finally:
        os.close(fd)
