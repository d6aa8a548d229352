"""The daemons' heap settings (common/heap.py); their effect is measured in bench/."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

from common.heap import YOUNG_THRESHOLD, settle_heap


def test_settling_freezes_what_exists_and_spaces_young_collections_out() -> None:
    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 10_000  # at least this process's imported modules
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


_FREE_AND_MEASURE = """
import os, sys
from common.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory(64 << 20)
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
copies = [os.urandom(1) * 16384 for _ in range(2000)]  # 31 MiB, as a cut's copies
held = rss()
del copies
print(held - rss())
"""


def _freed(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _FREE_AND_MEASURE, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return int(out.stdout)


def test_the_agent_keeps_freed_copies_for_reuse() -> None:
    """With the default the allocator hands a cut's freed copies back to the kernel (the end of
    the cut pays for it on the NBD loop); kept, they stay with the process for the next cut."""
    assert _freed("default") > 24 << 20
    assert _freed("keep") < 4 << 20
