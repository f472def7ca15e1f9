"""The batch worker's Prometheus metrics, one endpoint per worker over all its pool processes.

    vitaserve_batch_items_total{status}            counter    item tasks by what happened: ok, error,
                                                              cancelled, already-done, bad-line, retry
                                                              (RetryLater), infra-retry, failed (raised),
                                                              and the rarer jobs.run_item outcomes
    vitaserve_batch_item_duration_seconds{status}  histogram  wall time of an item task, by the same status
    vitaserve_batch_items_in_flight{queue}         gauge      item tasks running now (all pool processes)
    vitaserve_queue_depth{queue}                   gauge      messages waiting in the worker's Celery queue
                                                              (Redis LLEN, read at scrape time)

Prefork: the tasks run in pool processes, the endpoint is served once, by the worker's main process. This
uses prometheus_client's multiprocess mode (its documented pattern for pre-forking servers): every process
writes its samples to memory-mapped files in `PROMETHEUS_MULTIPROC_DIR`, and the main process's endpoint
sums them (`MultiProcessCollector`). The variable must be set before prometheus_client is first imported,
so `app.py` sets it (from `metrics_dir`) when `VITASERVE_BATCH_METRICS_ADDRESS` is set, before the tasks
are imported; `serve()` (at `worker_init`, in the main process, before the pool forks) empties the
directory (files of an earlier run would be summed too) and starts the HTTP endpoint; a pool process that
exits is marked dead (`mark_process_dead`) so the in-flight gauge ("livesum") forgets it. Without the
variable (tests running tasks eagerly, the solo pool without metrics) the instruments are plain
in-process ones.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

# Seconds: an item (encode, generate, speech) takes from ~0.1 s (tiny model) to minutes (long replies).
ITEM_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

ITEMS = Counter("vitaserve_batch_items", "Batch item tasks by what happened.", ["status"])
ITEM_DURATION = Histogram("vitaserve_batch_item_duration_seconds", "Wall time of a batch item task.",
                          ["status"], buckets=ITEM_BUCKETS)
# Every instrument has labels: no sample exists before its first use, so none is written to a file before
# `serve()` empties the directory.
IN_FLIGHT = Gauge("vitaserve_batch_items_in_flight", "Batch item tasks running now.", ["queue"],
                  multiprocess_mode="livesum")


class ItemRecord:
    """What `item()` records when the task ends: set `status` to its outcome."""

    status = "failed"  # an exception nobody classified


@contextmanager
def item(queue: str) -> Iterator[ItemRecord]:
    """Around one item task: counts it in flight, then records its status and duration."""
    record = ItemRecord()
    started = time.monotonic()
    in_flight = IN_FLIGHT.labels(queue)
    in_flight.inc()
    try:
        yield record
    finally:
        in_flight.dec()
        ITEMS.labels(record.status).inc()
        ITEM_DURATION.labels(record.status).observe(time.monotonic() - started)


class QueueDepth:
    """`vitaserve_queue_depth{queue}`: the messages waiting in a Celery queue on the Redis broker."""

    def __init__(self, broker_url: str, queue: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
        self._queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("vitaserve_queue_depth", "Items waiting in a queue.", labels=["queue"])
        try:
            family.add_metric([self._queue], float(self._redis.llen(self._queue)))
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because Redis is away
            log.warning("queue depth of %s: %r", self._queue, exc)
        yield family


def multiprocess_dir() -> Path | None:
    value = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(value) if value else None


def serve(address: str, *, broker_url: str, queue: str) -> tuple[Any, int]:
    """Start the endpoint on `host:port` (port 0 = a free one) in this process; returns (server, port)."""
    from prometheus_client import REGISTRY, start_http_server
    from prometheus_client import multiprocess

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address must be host:port, got {address!r}")
    path = multiprocess_dir()
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(path))
    else:
        registry = REGISTRY
    registry.register(QueueDepth(broker_url, queue))
    server, _thread = start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)
    return server, server.server_address[1]


def process_exited(pid: int) -> None:
    """A pool process ended: its live gauges stop counting."""
    if multiprocess_dir() is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
