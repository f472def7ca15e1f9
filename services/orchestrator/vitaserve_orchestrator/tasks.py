"""Tracked asyncio tasks: every background task has an owner that cancels it, with a timeout.

`TaskSet.spawn` replaces bare `asyncio.create_task`: the set keeps a strong reference (the event loop
only keeps a weak one), logs an exception nobody awaited, and `cancel_all` cancels what is left and waits
a bounded time for it to finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Task[Any], timeout_s: float) -> bool:
    """Cancel `task` and wait up to `timeout_s` for it to end; True if it ended. Never raises the task's
    own exception (the caller decided to stop it)."""
    if not task.done():
        task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        log.warning("task %s did not stop within %.1f s of being cancelled", task.get_name(), timeout_s)
        return False
    if not task.cancelled() and task.exception() is not None:
        log.debug("cancelled task %s ended with %r", task.get_name(), task.exception())
    return True


class TaskSet:
    """The background tasks of one owner (a conversation, a server)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait_all(self, timeout_s: float) -> None:
        """Let the running tasks finish (bounded); they are not cancelled."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def cancel_all(self, timeout_s: float) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                log.warning(
                    "task %s did not stop within %.1f s of being cancelled", task.get_name(), timeout_s
                )
