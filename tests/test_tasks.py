"""common.tasks: a stop ends its tasks even when one lost its cancel."""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from common.tasks import cancel_and_wait


async def _deaf_once() -> None:
    # Lost, as Python 3.11's asyncio.wait_for loses a cancel that meets its result.
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(30)
    await asyncio.sleep(30)


async def _fails() -> None:
    raise OSError("disk gone")


async def test_a_task_that_lost_its_cancel_is_cancelled_again() -> None:
    """A task that swallowed the first cancel is cancelled again after the grace and ends; the
    repeat is logged with the task's name."""
    deaf = asyncio.create_task(_deaf_once(), name="membership")
    plain = asyncio.create_task(asyncio.sleep(30), name="retention")
    await asyncio.sleep(0)  # both started: the cancel lands inside their sleep
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        async with asyncio.timeout(10):
            await cancel_and_wait([deaf, plain], grace=0.2)
    assert deaf.cancelled()
    assert plain.cancelled()
    assert time.monotonic() - started < 5
    repeated = [e for e in logs if e["event"] == "task_cancel_repeated"]
    assert [e["task"] for e in repeated] == ["membership"]


async def test_a_failed_task_is_logged_and_the_others_still_end() -> None:
    """An error in one task does not stop the others from being cancelled and awaited."""
    failed = asyncio.create_task(_fails(), name="link")
    await asyncio.sleep(0)
    other = asyncio.create_task(asyncio.sleep(30), name="cluster")
    with structlog.testing.capture_logs() as logs:
        await cancel_and_wait([failed, other], grace=0.2)
    assert other.cancelled()
    (event,) = [e for e in logs if e["event"] == "task_failed"]
    assert event["task"] == "link"
    assert "disk gone" in event["error"]
