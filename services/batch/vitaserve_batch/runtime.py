"""Per-process state of a batch worker: one event loop, the component client, the job store.

Celery tasks are synchronous; the component clients are asyncio (gRPC aio channels belong to the loop that
created them). So each worker process owns one event loop for its whole life, created when the process
starts (`worker_process_init` for prefork children, `worker_init` for the solo pool) and closed at shutdown,
and every task runs its coroutine on it with `run()`. Nothing is created before the fork: a prefork child
never inherits the parent's sockets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from vitaserve.components.base import ComponentClient
from vitaserve_batch.settings import BatchSettings
from vitaserve_batch.store import JobStore

log = logging.getLogger(__name__)
T = TypeVar("T")


def build_components(settings: BatchSettings) -> ComponentClient:
    """`TritonComponents` over the configured URLs (production), or the models in this process."""
    if settings.backend == "triton":
        from vitaserve.components.triton import TritonComponents

        return TritonComponents(
            settings.component_urls(),
            timeout_s=settings.encode_timeout_s,
            first_response_timeout_s=settings.first_token_timeout_s,
            stream_timeout_s=settings.item_timeout_s,
        )
    from vitaserve.components.inprocess import InProcessComponents

    # the settings checked that the family has the checkpoint it needs
    return InProcessComponents(settings.checkpoint_dir, family=settings.model_family)


class WorkerRuntime:
    """What one worker process holds. `components` is built on first use (the CLI and beat never do)."""

    def __init__(self, settings: BatchSettings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.store = JobStore.from_url(settings.redis_url, ttl_s=settings.job_ttl_s)
        self._components: ComponentClient | None = None

    @property
    def components(self) -> ComponentClient:
        if self._components is None:
            self._components = build_components(self.settings)
        return self._components

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        try:
            if self._components is not None:
                self.loop.run_until_complete(self._components.close())
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        except Exception:  # noqa: BLE001 - shutting down: log and go on closing
            log.exception("closing the batch worker runtime failed")
        finally:
            self.loop.close()
            self.store.r.close()


_runtime: WorkerRuntime | None = None
_lock = threading.Lock()


def start(settings: BatchSettings) -> WorkerRuntime:
    """Create this process's runtime (a forked child discards the parent's, never uses it)."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = WorkerRuntime(settings)
        return _runtime


def get(settings: BatchSettings) -> WorkerRuntime:
    """This process's runtime, created on first use if no signal created it (e.g. eager tests)."""
    runtime = _runtime
    if runtime is None or runtime.pid != os.getpid():
        return start(settings)
    return runtime


def stop() -> None:
    global _runtime
    with _lock:
        runtime, _runtime = _runtime, None
    if runtime is not None and runtime.pid == os.getpid():
        runtime.close()
