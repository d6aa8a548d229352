"""The agent's small persistent state per disk: replication progress that must survive restarts.

Kept in ``<state_dir>/<vm_uuid>/<disk_id>.json`` next to the dirty map, written atomically
(temporary file, fsync, rename, fsync of the folder) after each durable ack that changes it.
The sequence number itself is *not* trusted from here: the broker's ``durable_seq`` is the truth
(see ``docs/agent.md``); this file records what only the agent knows, such as how far the
initial copy got.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agents.errors import TrackingError
from common.fsio import atomic_write, read_json


def _load(path: Path, what: str, fix: str) -> Any:
    """The JSON document in ``path`` (None when absent); unreadable is a :class:`TrackingError`."""
    try:
        return read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise TrackingError(f"cannot read {what} {path}: {exc}", fix=fix) from None


@dataclass
class DiskState:
    """Replication progress of one disk, as last made durable."""

    vm_uuid: str
    disk_id: str
    disk_size: int
    generation: int = 1
    acked_seq: int = 0  # the highest seq the broker acked to us
    initial_cursor: int = 0  # the initial copy has been acked up to this byte offset
    initial_done: bool = False
    last_cut_ns: int = 0  # cut time of the last acked batch
    verify_pending: bool = False  # a hash comparison began and has not finished
    # Offline seeding: an export to media was cut at ``seed_seq`` and the disk waits until the
    # broker shows that seq durable (the import); 0 when no export awaits its import.
    seed_seq: int = 0
    seed_base_seq: int = 0  # the replica's durable seq when the export was cut (still waiting)
    seed_cut_ns: int = 0
    seed_dir: str = ""

    @classmethod
    def load(cls, path: Path) -> DiskState | None:
        """Read the state, or None when there is none (or it is unreadable: start afresh)."""
        raw = _load(
            path, "agent state", "remove the file; the agent then compares hashes with the broker"
        )
        if raw is None:
            return None
        fields = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**fields)

    def save(self, path: Path) -> None:
        """Write atomically and durably."""
        write_state(path, self.encoded())

    def encoded(self) -> bytes:
        """The file's bytes: what :meth:`save` writes, taken at the moment of the call."""
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()


def write_state(path: Path, data: bytes) -> None:
    """Write a state file's bytes (:meth:`DiskState.encoded`) atomically and durably; its two
    fsyncs block, so the replicator calls this off the event loop after each ack."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


class CutClock:
    """The cut ids of one VM: increasing for ever, across restarts and ``kill -9``.

    Every cut of all the VM's disks takes the next id (:meth:`next`). Ids are reserved in
    blocks of ``block`` by writing the block's end to ``path`` (atomically, durably) before the
    first id of the block is handed out, and a start resumes after the recorded end, so a restart
    may skip ids but never hands one out twice or goes back. :meth:`observe` moves the clock past
    an id seen elsewhere (the broker's newest cut of the VM), so a lost state directory cannot
    make the agent repeat the ids its replica already holds.
    """

    def __init__(self, path: Path, block: int = 1024) -> None:
        self.path = path
        self.block = block
        fix = "remove the file; the agent then continues after the broker's newest cut"
        raw = _load(path, "the VM's cut ids from", fix)
        reserved = 0 if raw is None else raw.get("reserved_to") if isinstance(raw, dict) else None
        if isinstance(reserved, bool) or not isinstance(reserved, int) or reserved < 0:
            raise TrackingError(f"{path} holds no cut id reservation ({raw!r:.80})", fix=fix)
        self._reserved = reserved
        self._last = self._reserved  # ids up to here may have been used before a restart

    @property
    def last(self) -> int:
        """The newest id handed out (or the floor the next one must exceed)."""
        return self._last

    def observe(self, cut_id: int) -> None:
        """Never hand out ``cut_id`` or anything before it."""
        self._last = max(self._last, cut_id)

    def next(self) -> int:
        """The next cut id. Synchronous, and called in the loop step of the cut: only when no
        id is left reserved does it write (and fsync) a reservation itself, which
        :meth:`reserve_ahead` off the loop avoids."""
        cut_id = self._last + 1
        if cut_id > self._reserved:
            self._reserve(cut_id + self.block - 1)
        self._last = cut_id
        return cut_id

    @property
    def running_low(self) -> bool:
        """Under half a block of ids is left reserved (always so before the first cut)."""
        return self._reserved - self._last <= self.block // 2

    def reserve_ahead(self) -> None:
        """Reserve the next block before :meth:`next` needs it: the fsynced write, tens of ms on
        a busy disk, then happens on a worker thread instead of in a cut, where every guest
        request of the agent's loop would wait for it. The caller keeps :meth:`next` from
        running meanwhile (the VM's worker lock)."""
        self._reserve(max(self._reserved, self._last) + self.block)

    def _reserve(self, reserved: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps({"reserved_to": reserved}).encode())
        self._reserved = reserved
