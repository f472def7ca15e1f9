"""The Celery tasks: thin wrappers over `jobs.py` that turn `RetryLater` into `Task.retry`.

- `vitaserve_batch.start_job(job_id, spec)`: parse the manifest, store the items, send each lane's head;
- `vitaserve_batch.run_item(job_id, index, retries=0)`: one item, exactly once (`jobs.run_item`);
- `vitaserve_batch.scheduled_job(name, spec)`: a beat firing; the job id comes from the message id;
- `vitaserve_batch.sweep()`: re-send the tasks of stalled jobs (beat, every `sweep_interval_s`).

All are `acks_late` and rejected on worker loss (app defaults, repeated here for the reader).

Errors of the infrastructure itself (Redis unreachable, the output folder not writable) are retried with
exponential backoff, `INFRA_RETRIES` times: a task that failed for good would be acknowledged and its lane
would stop. If they persist, the job stays `running` and `vitaserve batch resume JOB` continues it once
the cause is fixed. Errors of an item (bad input, a component down) never get here: `jobs.run_item`
records them as the item's result.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import redis

from vitaserve_batch import jobs, metrics, runtime
from vitaserve_batch.app import app, settings
from vitaserve_batch.schedules import SCHEDULED_TASK
from vitaserve_batch.spec import ITEM_TASK, START_TASK, SWEEP_TASK

log = logging.getLogger(__name__)
_TASK = {"bind": True, "acks_late": True, "reject_on_worker_lost": True, "max_retries": None}
INFRA_RETRIES = 12
_INFRA_ERRORS = (redis.RedisError, OSError)


def _infra_retry(task: Any, exc: BaseException, **retry: Any) -> Exception:
    attempt = task.request.retries
    if attempt >= INFRA_RETRIES:
        log.error("%s %s: giving up after %d retries: %r", task.name, task.request.id, attempt, exc)
        raise exc
    delay = min(settings.retry_backoff_max_s, settings.retry_backoff_s * 2**min(attempt, 16))
    log.warning("%s %s: %r; retry in %.1f s", task.name, task.request.id, exc, delay)
    return task.retry(exc=exc, countdown=delay * random.uniform(0.8, 1.2), max_retries=None, **retry)


def send_item(job_id: str, index: int) -> None:
    run_item.apply_async(args=(job_id, index), queue=settings.queue)


@app.task(name=START_TASK, **_TASK)
def start_job(self: Any, job_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    try:
        job = jobs.start_job(runtime.get(settings), job_id, jobs.JobSpec(**spec), send_item)
    except _INFRA_ERRORS as exc:
        raise _infra_retry(self, exc) from None
    return {"job_id": job_id, "status": job.get("status"), "total": job.get("total")}


# The outcome of an item lives in the job store; Celery's result backend would only duplicate it.
@app.task(name=ITEM_TASK, ignore_result=True, **_TASK)
def run_item(self: Any, job_id: str, index: int, retries: int = 0) -> str:
    with metrics.item(settings.queue) as record:
        try:
            record.status = jobs.run_item(runtime.get(settings), job_id, index, send_item, retries=retries,
                                          attempt_id=(self.request.id or "")[:8])
            return record.status
        except jobs.RetryLater as later:
            record.status = "retry"
            raise self.retry(args=(job_id, index), kwargs={"retries": later.retries},
                             countdown=later.countdown_s, max_retries=None) from None
        except _INFRA_ERRORS as exc:
            record.status = "infra-retry"
            raise _infra_retry(self, exc, args=(job_id, index), kwargs={"retries": retries}) from None


@app.task(name=SCHEDULED_TASK, **_TASK)
def scheduled_job(self: Any, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    rid = (self.request.id or "").replace("-", "")
    job_id = f"{name}-{rid[:12]}"
    spec = {**spec, "out_dir": str(Path(spec["out_dir"]) / job_id)}
    try:
        job = jobs.start_job(runtime.get(settings), job_id, jobs.JobSpec(**spec), send_item)
    except _INFRA_ERRORS as exc:
        raise _infra_retry(self, exc) from None
    log.info("schedule %s fired: job %s (%s items)", name, job_id, job.get("total"))
    return {"job_id": job_id, "status": job.get("status"), "total": job.get("total")}


def send_start(job_id: str, spec: dict[str, Any]) -> None:
    start_job.apply_async(args=(job_id, spec), task_id=job_id, queue=settings.queue)


@app.task(name=SWEEP_TASK, ignore_result=True, bind=True)
def sweep(self: Any) -> dict[str, int]:
    store = runtime.get(settings).store
    resent = jobs.sweep(store, send_item, send_start, stall_after_s=settings.stall_after)
    if any(resent.values()):
        log.warning("sweep re-sent %s", resent)
    return resent
