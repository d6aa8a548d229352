"""The audit line that makes a batch applied: one record of ``applied.log`` per batch."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from common.hrl import BatchHeader


@dataclass(frozen=True)
class AppliedRecord:
    """One line of ``applied.log``: batch ``(generation, seq)`` is in the replica image."""

    generation: int
    seq: int
    cut_ns: int
    consistency: int
    full: bool
    epoch: int
    applied_ns: int
    seeded: bool = False
    cut_id: int = 0  # the VM cut the batch belongs to (lines before cut ids existed: 0)
    first_change_cut: int = 0

    def line(self) -> bytes:
        """The record as one JSON line."""
        return (json.dumps(asdict(self), separators=(",", ":")) + "\n").encode()


def applied_fields(record: AppliedRecord) -> dict[str, Any]:
    """meta's fields as the apply of ``record``'s batch leaves them: a full batch is part of
    the initial copy, which any other batch completes."""
    return {
        "applied_generation": record.generation,
        "applied_seq": record.seq,
        "applied_cut_ns": record.cut_ns,
        "applied_consistency": record.consistency,
        "applied_full": record.full,
        "applied_cut_id": record.cut_id,
        "applied_first_change_cut": record.first_change_cut,
        "initial_sync": "in_progress" if record.full else "complete",
    }


def applied_record(header: BatchHeader, epoch: int) -> AppliedRecord:
    """The ``applied.log`` record of ``header``'s batch, applied now under owner ``epoch``."""
    return AppliedRecord(
        generation=header.generation,
        seq=header.seq,
        cut_ns=header.cut_time_ns,
        consistency=int(header.consistency),
        full=header.full,
        epoch=epoch,
        applied_ns=time.time_ns(),
        cut_id=header.cut_id,
        first_change_cut=header.first_change_cut,
    )
