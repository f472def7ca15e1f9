"""`vitaserve_asyncio_tasks` (telemetry.py): the sampler run on the server's loop counts live tasks, follows
tasks that start and end, and stops when told to."""

from __future__ import annotations

import asyncio

import pytest

from vitaserve_orchestrator.telemetry import Metrics

pytestmark = [pytest.mark.unit]


def _gauge(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("vitaserve_asyncio_tasks")
    assert value is not None
    return value


def test_the_gauge_follows_the_loops_live_tasks() -> None:
    async def scenario() -> list[float]:
        metrics = Metrics()
        running = True
        sampler = asyncio.get_running_loop().create_task(
            metrics.sample_asyncio_tasks(lambda: running, interval_s=0.01))
        seen = []
        await asyncio.sleep(0.05)
        seen.append(_gauge(metrics))  # this coroutine's task and the sampler
        release = asyncio.Event()
        extra = [asyncio.get_running_loop().create_task(release.wait()) for _ in range(5)]
        await asyncio.sleep(0.05)
        seen.append(_gauge(metrics))
        release.set()
        await asyncio.gather(*extra)
        await asyncio.sleep(0.05)
        seen.append(_gauge(metrics))
        running = False
        await asyncio.wait_for(sampler, timeout=5)  # it ends by itself once keep_going() is false
        return seen

    idle, busy, after = asyncio.run(scenario())
    assert idle == 2
    assert busy == idle + 5
    assert after == idle
