"""The audit line that makes a batch applied: one record of ``applied.log`` per batch."""

from __future__ import annotations

import time

from broker.store import AppliedRecord
from common.hrl import BatchHeader


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
