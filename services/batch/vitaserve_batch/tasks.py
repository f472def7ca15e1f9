"""The Celery tasks: thin wrappers over `jobs.py` that turn `RetryLater` into `Task.retry`.

- `vitaserve_batch.start_job(job_id, spec)`: parse the manifest, store the items, send each lane's head;
- `vitaserve_batch.run_item(job_id, index, retries=0)`: one item, exactly once (`jobs.run_item`);
- `vitaserve_batch.scheduled_job(name, spec)`: a beat firing; the job id comes from the message id.

All are `acks_late` and rejected on worker loss (app defaults, repeated here for the reader).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vitaserve_batch import jobs, runtime
from vitaserve_batch.spec import ITEM_TASK, START_TASK
from vitaserve_batch.app import app, settings

log = logging.getLogger(__name__)
_TASK = {"bind": True, "acks_late": True, "reject_on_worker_lost": True, "max_retries": None}


def send_item(job_id: str, index: int) -> None:
    run_item.apply_async(args=(job_id, index), queue=settings.queue)


@app.task(name=START_TASK, **_TASK)
def start_job(self: Any, job_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    job = jobs.start_job(runtime.get(settings), job_id, jobs.JobSpec(**spec), send_item)
    return {"job_id": job_id, "status": job.get("status"), "total": job.get("total")}


# The outcome of an item lives in the job store; Celery's result backend would only duplicate it.
@app.task(name=ITEM_TASK, ignore_result=True, **_TASK)
def run_item(self: Any, job_id: str, index: int, retries: int = 0) -> str:
    try:
        return jobs.run_item(runtime.get(settings), job_id, index, send_item, retries=retries,
                             attempt_id=(self.request.id or "")[:8])
    except jobs.RetryLater as later:
        raise self.retry(args=(job_id, index), kwargs={"retries": later.retries},
                         countdown=later.countdown_s, max_retries=None) from None


@app.task(name="vitaserve_batch.scheduled_job", **_TASK)
def scheduled_job(self: Any, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    rid = (self.request.id or "").replace("-", "")
    job_id = f"{name}-{rid[:12]}"
    spec = {**spec, "out_dir": str(Path(spec["out_dir"]) / job_id)}
    job = jobs.start_job(runtime.get(settings), job_id, jobs.JobSpec(**spec), send_item)
    log.info("schedule %s fired: job %s (%s items)", name, job_id, job.get("total"))
    return {"job_id": job_id, "status": job.get("status"), "total": job.get("total")}
