"""Small asyncio helpers every layer shares: background loops that stop cleanly, and racing tasks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel a background task and wait until it has really stopped."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def first_completed(*coros: Coroutine[Any, Any, Any], reraise: bool = True) -> None:
    """Run coroutines until the first one ends; cancel and await the rest. With `reraise`, an
    exception from one that ended is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if reraise:
            for t in done:
                t.result()
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks)


async def all_of(*coros: Coroutine[Any, Any, Any]) -> list[Any]:
    """Run coroutines side by side and wait for every one of them (so none is still running when
    the caller cleans up after a failure); then raise the first exception, if any."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results
