"""Ending asyncio tasks for certain, on the Python this project runs on (3.11).

Python 3.11's ``asyncio.wait_for`` returns the awaited result when a cancel arrives in the loop
step in which that result comes in: the cancel is lost and the task runs on (CPython gh-86296,
fixed in 3.12). aiomqtt waits for every acknowledgement that way, so a membership or presence
task cancelled just as its PUBACK lands went back to sleep and a stop that awaited it waited
forever (a broker in ``tests/test_scaleout.py`` hung in CI like this). Our own code bounds
waits with ``asyncio.timeout``, which keeps a cancel; this module ends the tasks a library may
still make deaf to one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from common.logs import get_logger

log = get_logger("replikant.tasks")

#: How long a cancelled task may take to end before it is taken to have lost the cancel: above
#: any cleanup a cancelled task of ours awaits (each is bounded far below a second).
CANCEL_GRACE = 2.0


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], *, grace: float = CANCEL_GRACE
) -> None:
    """Cancel ``tasks`` and return once every one has ended.

    One still running ``grace`` seconds after its cancel is cancelled again, with a
    ``task_cancel_repeated`` event. A task that ends with an error other than the cancel is
    logged (``task_failed``), not raised: the stop that calls this goes on with the rest.
    """
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=grace)
        for task in pending:
            log.warning("task_cancel_repeated", task=task.get_name(), grace_s=grace)
            task.cancel()
    for task in tasks:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("task_failed", task=task.get_name(), error=repr(exc))


__all__ = ["CANCEL_GRACE", "cancel_and_wait"]
