"""The daemons' collector settings (common/heap.py); their effect is measured in bench/."""

from __future__ import annotations

import gc

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
