"""The Celery app of the batch service: `celery -A vitaserve_batch.app worker|beat`.

Configuration comes from `BatchSettings` (environment variables, see `settings.py`):

- Redis is the broker and the result backend. Tasks are acknowledged late (`task_acks_late`) and rejected
  back to the queue when their worker process dies (`task_reject_on_worker_lost`), and each worker process
  takes one message at a time (`worker_prefetch_multiplier=1`), so a crash loses no message and strands at
  most one per process. When the whole worker dies (SIGKILL, node loss) its unacknowledged messages stay in
  Redis and another worker delivers them again once `visibility_timeout_s` has passed (checked every
  `redelivery_check_s`). Redelivery may run an item twice; `jobs.run_item` makes that harmless.
- beat runs the sweep for stalled jobs every `sweep_interval_s` (`jobs.sweep`: messages the Redis transport
  lost) and the entries of `schedules_file` (TOML, see `schedules.py`) when one is configured.
- Each prefork child starts its event loop and clients at `worker_process_init` and closes them at
  `worker_process_shutdown`; the solo pool creates them at its first task and closes them at
  `worker_shutdown` (`runtime.py`). Nothing is created in a prefork parent, so no child inherits sockets.
- Metrics (`metrics_address`): prometheus_client's multiprocess mode, its directory set here before the
  tasks (and prometheus_client) are imported; the main process serves the endpoint from `worker_init`,
  and a pool process that exits is marked dead (metrics.py).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from celery import Celery, signals

from vitaserve_batch import runtime
from vitaserve_batch.settings import BatchSettings


def create_app(settings: BatchSettings) -> Celery:
    app = Celery("vitaserve_batch", broker=settings.broker, backend=settings.backend_url,
                 include=["vitaserve_batch.tasks"])
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        # Sweep for messages of dead workers every redelivery_check_s (kombu's default is ~100 s).
        "unacked_restore_interval": settings.redelivery_check_s,
        "unacked_restore_throttle": 1,
    }
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=settings.job_ttl_s,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_track_started=True,
        timezone="UTC",
        enable_utc=True,
        worker_hijack_root_logger=False,
    )
    from vitaserve_batch.spec import SWEEP_TASK

    # The sweep for stalled jobs always runs with beat; the recurring jobs come from the schedules file.
    entries: dict[str, Any] = {"vitaserve-batch-sweep": {
        "task": SWEEP_TASK, "schedule": settings.sweep_interval_s, "options": {"queue": settings.queue}}}
    if settings.schedules_file is not None:
        from vitaserve_batch.schedules import beat_schedule, load_schedules

        entries.update(beat_schedule(load_schedules(settings.schedules_file), queue=settings.queue))
    app.conf.beat_schedule = entries
    app.conf.vitaserve_settings = settings
    return app


settings = BatchSettings()
if settings.metrics_address:  # before anything imports prometheus_client (metrics.py)
    port = settings.metrics_address.rpartition(":")[2]
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(
        settings.metrics_dir or Path(tempfile.gettempdir()) / f"vitaserve-batch-metrics-{port}"))
    # Exists before any process writes to it, even if the endpoint then fails to start.
    Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
app = create_app(settings)


def _start_runtime(**_: Any) -> None:
    logging.getLogger("vitaserve_batch").setLevel(settings.log_level)
    runtime.start(settings)


def _stop_runtime(**_: Any) -> None:
    runtime.stop()


def _serve_metrics(**_: Any) -> None:
    if settings.metrics_address:
        from vitaserve_batch import metrics

        _server, port = metrics.serve(settings.metrics_address, broker_url=settings.broker,
                                      queue=settings.queue)
        print(f"batch worker metrics on port {port}", flush=True)


def _process_exited(**_: Any) -> None:
    from vitaserve_batch import metrics

    metrics.process_exited(os.getpid())


signals.worker_process_init.connect(_start_runtime, weak=False)
signals.worker_process_shutdown.connect(_stop_runtime, weak=False)
signals.worker_process_shutdown.connect(_process_exited, weak=False)
signals.worker_init.connect(_serve_metrics, weak=False)
# Solo pool: the runtime is made by the first task (runtime.get); stop() only closes this process's own.
signals.worker_shutdown.connect(_stop_runtime, weak=False)
