"""The cut a journal file is of, read from its batch header (start-up's counter recovery)."""

from __future__ import annotations

import os
from pathlib import Path

from common.hrl import DEFAULT_LIMITS, BatchDecoder, BatchFormatError, BatchHeader

_HEAD_BYTES = 4096  # more than the largest header (113 bytes + a 64-byte disk id)


def journal_cut(path: Path) -> tuple[int, int] | None:
    """``(cut_id, cut_time_ns)`` of the batch in journal file ``path``, from its checksummed
    header; None if the file has no valid header (the applier then names the corruption)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        head = os.pread(fd, _HEAD_BYTES, 0)
    finally:
        os.close(fd)
    decoder = BatchDecoder(DEFAULT_LIMITS)
    decoder.receive_data(head)
    try:
        event = decoder.next_event()
    except BatchFormatError:
        return None
    if not isinstance(event, BatchHeader):
        return None
    return event.cut_id, event.cut_time_ns
