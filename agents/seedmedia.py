"""Seed media files, agent side: the directory, the images and their block hashes.

The format ``broker/seed.py`` reads (docs/protocol/http.md, "Offline seed media")::

    DIR/manifest.json                written last, atomically: the media is complete
    DIR/.replikant-export.json       which export wrote here (lets ``--resume`` recognise it)
    DIR/<vm-name>/<disk-id>.img      the disk at the export's cut, sparse (holes, zero blocks)
    DIR/<vm-name>/<disk-id>.xxh3     its hash list (:mod:`common.blockhash`: XXH3-64 per block)

The agent may run as root and the media directory is named by whoever may use the control
socket, so every write is made safe against links planted there: ``DIR`` is opened once without
following a link (:class:`MediaDir`) and must belong to the agent's user or to the requester,
writable by nobody else; everything below it is created or opened relative to that descriptor
with ``O_NOFOLLOW``; new files are created exclusively, mode 0600, directories 0700 (a copy of
a disk is as secret as the disk). ``--resume`` reuses only regular files the agent itself wrote
and listed in its marker.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.errors import SeedError
from agents.replicate import DiskReplicator
from common.blockhash import block_hash
from common.fsio import atomic_write, data_extents, is_zero, punch_hole, pwrite_all, write_all
from common.logs import get_logger

if TYPE_CHECKING:
    pass


log = get_logger("agents.seedmedia")

MANIFEST = "manifest.json"
MARKER = ".replikant-export.json"
SEED_FORMAT = "replikant-seed"
_HASH_FLUSH = 64 * 1024  # hash entries buffered before they are written (512 KiB)

Progress = Callable[[DiskReplicator, int, int], None]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


def _unsafe(what: str, why: str, fix: str, code: str = "media_unsafe") -> SeedError:
    return SeedError(f"{what} {why}", code=code, status=403, fix=fix)


def _check_owner(st: os.stat_result, what: str, owners: set[int]) -> None:
    """Refuse a directory that others may write to or that belongs to someone not in ``owners``."""
    if st.st_uid not in owners:
        raise _unsafe(
            what,
            f"belongs to user id {st.st_uid}; the agent (user id {os.geteuid()}) writes media "
            "only into a directory of its own user or of the user who asked",
            "create the directory yourself (mkdir -m 0700 DIR) or name a new one for the agent "
            "to create",
            code="media_not_owned",
        )
    if st.st_mode & 0o022:
        raise _unsafe(
            what,
            f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): another "
            "user could plant links there",
            "chmod go-w the directory, or name one only you can write to",
        )


class MediaDir:
    """The media directory, opened once without following a link: every name below it is
    resolved from this descriptor (blocking calls: run them in a worker thread)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.uid = os.geteuid()

    @classmethod
    def open(cls, path: Path, *, peer_uid: int | None, create: bool) -> MediaDir | None:
        """Open (``create``: make, mode 0700) ``path``; None when it does not exist."""
        if create:
            os.makedirs(path, mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, _DIR_FLAGS)
        except FileNotFoundError:
            if create:
                raise
            return None
        except OSError as exc:
            # O_NOFOLLOW|O_DIRECTORY on a link fails with ELOOP or ENOTDIR.
            if exc.errno == errno.ELOOP or os.path.islink(path):
                raise _unsafe(
                    str(path), "is a symbolic link", "name the real directory, not a link"
                ) from None
            if exc.errno == errno.ENOTDIR:
                raise SeedError(
                    f"{path} exists and is not a directory",
                    code="media_not_directory",
                    fix="name a new or empty directory for the media",
                ) from None
            raise
        try:
            owners = {os.geteuid()} | ({peer_uid} if peer_uid is not None else set())
            _check_owner(os.fstat(fd), str(path), owners)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def entries(self) -> list[str]:
        """The names in the directory, sorted."""
        return sorted(os.listdir(self.fd))

    def read_json(self, name: str) -> dict[str, Any] | None:
        """A JSON file the agent wrote here; None if absent or written by another user."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SeedError(
                f"{self.path / name} cannot be opened ({exc.strerror}): the directory holds "
                "damaged or foreign seed media",
                code="media_damaged",
                fix="use an empty directory",
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != self.uid:
                return None
            raw = os.read(fd, max(st.st_size, 1) + 1)
        finally:
            os.close(fd)
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise SeedError(
                f"{self.path / name} is unreadable ({exc}): the directory holds damaged seed media",
                code="media_damaged",
                fix="use an empty directory",
            ) from None
        return doc if isinstance(doc, dict) else None

    def write_json(self, name: str, doc: dict[str, Any]) -> None:
        """Replace ``name`` atomically and durably (a new 0600 file renamed over it)."""
        atomic_write(name, json.dumps(doc, indent=1).encode(), dir_fd=self.fd)

    def subdir(self, name: str) -> int:
        """Make (mode 0700) or open the agent's own subdirectory ``name``; returns its fd."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=self.fd)
        what = str(self.path / name)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            raise _unsafe(
                what, f"is not a directory the agent can use ({exc.strerror})", "remove it"
            ) from None
        try:
            _check_owner(os.fstat(fd), what, {self.uid})
        except BaseException:
            os.close(fd)
            raise
        return fd

    def foreign(self, listed: set[str]) -> list[str]:
        """Entries the agent did not write: anything but its own regular files named by
        ``listed`` (paths relative to the directory), its marker, manifest and their temps."""
        out = []
        for name in self.entries():
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                own = name in (MARKER, MANIFEST) or (
                    name.startswith((f".{MARKER}.", f".{MANIFEST}.")) and name.endswith(".tmp")
                )
                if not (own and st.st_uid == self.uid):
                    out.append(name)
                continue
            if not (stat.S_ISDIR(st.st_mode) and st.st_uid == self.uid):
                out.append(name)
                continue
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
            try:
                for child in os.listdir(fd):
                    cst = os.stat(child, dir_fd=fd, follow_symlinks=False)
                    ours = stat.S_ISREG(cst.st_mode) and cst.st_uid == self.uid
                    if not (ours and cst.st_nlink == 1 and f"{name}/{child}" in listed):
                        out.append(f"{name}/{child}")
            finally:
                os.close(fd)
        return out


@dataclass
class MediaStats:
    """What one image write did, in bytes."""

    written: int = 0  # data blocks written to the media
    zero: int = 0  # data blocks that read all zero: left as holes
    reused: int = 0  # blocks the media already held (``--resume``)
    holes: int = 0  # unallocated or zeroed at the cut: never read


class MediaImage:
    """The sparse image and block-hash file of one disk on the media (blocking calls: run them
    in a worker thread). Extents arrive in offset order; what lies between them is zero."""

    def __init__(
        self,
        vm_dir: int,
        where: str,
        disk_id: str,
        size: int,
        block_size: int,
        *,
        reuse: set[str] | None,
    ) -> None:
        self.vm_dir = vm_dir
        self.where = where  # "<vm-name>": the files' directory relative to the media
        self.image = f"{disk_id}.img"
        self.hashes = f"{disk_id}.xxh3"
        self.size = size
        self.bs = block_size
        self.nblocks = -(-size // block_size)
        self.allowed = reuse  # --resume: the files the marker lists (None: new files only)
        self.reuse = False
        self.stats = MediaStats()
        self._next = 0  # the first block whose hash is not yet recorded
        self._pending = bytearray()
        self._zero_hash = block_hash(bytes(block_size))
        tail = size % block_size
        self._last_zero_hash = block_hash(bytes(tail)) if tail else self._zero_hash
        self._fd = -1
        self._hfd = -1

    def open(self) -> None:
        """Create the files (mode 0600, exclusively), or, to resume, reopen the agent's own."""
        self._fd, self.reuse = self._open(self.image)
        os.ftruncate(self._fd, self.size)
        self._hfd, _ = self._open(self.hashes)
        os.ftruncate(self._hfd, 0)

    def _open(self, name: str) -> tuple[int, bool]:
        """(fd, whether it existed); never through a link, never a file the agent did not
        write and list in its marker."""
        rel = f"{self.where}/{name}"
        if self.allowed is not None:
            try:
                fd = os.open(name, _FILE_FLAGS, dir_fd=self.vm_dir)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _unsafe(rel, f"cannot be reused ({exc.strerror})", "remove it") from None
            else:
                st = os.fstat(fd)
                ours = stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
                if ours and st.st_nlink == 1 and rel in self.allowed:
                    return fd, True
                os.close(fd)
                raise _unsafe(
                    rel,
                    "was not written by this agent's export (not its own regular file)",
                    "remove it, or name a new or empty directory for the media",
                )
        flags = os.O_CREAT | os.O_EXCL | _FILE_FLAGS
        try:
            return os.open(name, flags, 0o600, dir_fd=self.vm_dir), False
        except FileExistsError:
            raise SeedError(
                f"{rel} already exists on the media and this export did not write it",
                code="media_not_empty",
                fix="name a new or empty directory, or pass --resume to continue an export",
            ) from None

    def data(self, offset: int, data: bytes | bytearray) -> None:
        """Store a DATA extent read from the cut: hash every block, write the non-zero ones
        that the media does not already hold."""
        self._zero_to(offset)
        view = memoryview(data)
        old = os.pread(self._fd, len(data), offset) if self.reuse else None
        run = -1  # start (relative) of blocks to write in one go
        for i in range(0, len(view), self.bs):
            block = view[i : i + self.bs]
            self._pending += block_hash(block)
            if old is not None and old[i : i + len(block)] == block:
                self.stats.reused += len(block)
                keep = False
            elif is_zero(block):
                self.stats.zero += len(block)
                if old is not None:
                    self._clear(offset + i, len(block))
                keep = False
            else:
                self.stats.written += len(block)
                keep = True
            if keep and run < 0:
                run = i
            elif not keep and run >= 0:
                pwrite_all(self._fd, view[run:i], offset + run)
                run = -1
        if run >= 0:
            pwrite_all(self._fd, view[run:], offset + run)
        self._next = (offset + len(data) + self.bs - 1) // self.bs
        self._flush_hashes(force=False)

    def zero(self, offset: int, length: int) -> None:
        """A ZERO or TRIM extent of the cut (the guest zeroed it): nothing to read."""
        self._zero_to(offset + length)

    def finish(self) -> None:
        """Everything after the last extent is a hole; make both files durable."""
        self._zero_to(self.size)
        self._flush_hashes(force=True)
        os.fdatasync(self._fd)
        os.fsync(self._hfd)

    def close(self) -> None:
        """Close the files (idempotent)."""
        for fd in (self._fd, self._hfd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._hfd = -1

    def _zero_to(self, offset: int) -> None:
        """Blocks from the last one recorded up to ``offset`` are zero at the cut."""
        b1 = min(-(-offset // self.bs), self.nblocks)
        if b1 <= self._next:
            return
        start = self._next * self.bs
        self.stats.holes += min(b1 * self.bs, self.size) - start
        if self.reuse:
            self._clear(start, min(b1 * self.bs, self.size) - start)
        while self._next < b1:
            n = min(b1, self._next + _HASH_FLUSH) - self._next
            self._pending += self._zero_hash * n
            self._next += n
            if self._next == self.nblocks:
                self._pending[-8:] = self._last_zero_hash
            self._flush_hashes(force=False)

    def _clear(self, offset: int, length: int) -> None:
        """Make media bytes read as zero where an earlier export left data (resume only)."""
        for lo, hi in data_extents(self._fd, offset, offset + length):
            punch_hole(self._fd, lo, hi - lo)

    def _flush_hashes(self, *, force: bool) -> None:
        if self._pending and (force or len(self._pending) >= 8 * _HASH_FLUSH):
            write_all(self._hfd, self._pending)
            self._pending.clear()
