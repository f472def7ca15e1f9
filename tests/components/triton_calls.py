"""Helpers of the Triton integration tests: one client per call of `run`, and a model's per-request log line."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from vitaserve.components.triton import TritonComponents
from vitaserve.triton.launcher import TritonServer


def run(coro_fn: Callable[[TritonComponents], Awaitable[Any]], url: str, component: str) -> Any:
    """Run `coro_fn(client)` with a fresh client of `component` on a fresh event loop, closing it after."""

    async def main() -> Any:
        client = TritonComponents(url, components=[component])
        try:
            return await coro_fn(client)
        finally:
            await client.close()

    return asyncio.run(main())


def request_log_line(server: TritonServer, model: str, request_id: str, timeout: float = 10.0) -> str:
    """The line `model` logs when it closes `request_id` (waits for it up to `timeout` s)."""
    pattern = re.compile(rf"{model} request_id='{re.escape(request_id)}' [^\n]*")
    deadline = time.monotonic() + timeout
    while True:
        match = pattern.search(server.log_path.read_text(errors="replace"))
        if match:
            return match.group(0)
        assert time.monotonic() < deadline, f"no log line for {request_id}:\n{server.log_tail()}"
        time.sleep(0.02)
