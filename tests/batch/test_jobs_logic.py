"""`vitaserve_batch.jobs` without Celery: lanes, idempotent redelivery, claims, retries, job failure and
resume, against the session's real Redis. Components are a real `TritonComponents` pointed at a port where
nothing listens (every call is UNAVAILABLE), so no item here needs a model."""

from __future__ import annotations

import json
import os
import time
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vitaserve_batch.harness import free_port, write_manifest
from vitaserve_batch.jobs import JobSpec, RetryLater, resume_job, run_item, start_job, sweep
from vitaserve_batch.results import read_results
from vitaserve_batch.runtime import WorkerRuntime
from vitaserve_batch.spec import create_job
from vitaserve_batch.settings import BatchSettings

pytestmark = [pytest.mark.integration]


@pytest.fixture
def rt(redis_server) -> Iterator[WorkerRuntime]:  # noqa: ANN001
    settings = BatchSettings(redis_url=redis_server.url, triton_url=f"127.0.0.1:{free_port()}", max_retries=2,
                             item_lease_s=30, item_timeout_s=5, results_flush_s=0.001)
    runtime = WorkerRuntime(settings)
    yield runtime
    runtime.close()


class Sent:
    """A `send` that records (job, index) and can run the queue to its end like a worker would."""

    def __init__(self) -> None:
        self.log: list[int] = []
        self.queue: list[tuple[str, int]] = []

    def __call__(self, job_id: str, index: int) -> None:
        self.log.append(index)
        self.queue.append((job_id, index))

    def drain(self, rt: WorkerRuntime) -> list[str]:
        outcomes = []
        while self.queue:
            job_id, index = self.queue.pop(0)
            outcomes.append(run_item(rt, job_id, index, self))
        return outcomes


def new_id() -> str:
    return f"logic-{uuid.uuid4().hex[:8]}"


def test_lanes_send_every_item_once_and_redelivery_changes_nothing(rt: WorkerRuntime, tmp_path: Path) -> None:
    lines = ['{"id": "bad-json"', *[json.dumps({"id": f"x{k}", "prompt": "p", "nope": 1}) for k in range(6)]]
    manifest = write_manifest(tmp_path / "m.jsonl", lines)
    job_id, sent = new_id(), Sent()
    job = start_job(rt, job_id, JobSpec(out_dir=str(tmp_path / "out"), manifest=str(manifest), concurrency=3),
                    sent)
    assert job["status"] == "running" and int(job["total"]) == 7
    assert sent.log == [0, 1, 2], "one head per lane"
    outcomes = sent.drain(rt)
    assert outcomes == ["bad-line"] * 7
    assert sorted(sent.log) == list(range(7)), "every item sent exactly once"
    rows = read_results(tmp_path / "out")
    assert [r["id"] for r in rows] == ["line-1", *[f"x{k}" for k in range(6)]]
    assert all(r["status"] == "error" for r in rows) and "unknown field 'nope'" in rows[1]["error"]
    assert rt.store.job(job_id)["status"] == "done"
    # A redelivered start and redelivered items: nothing is sent or recorded again.
    before = (tmp_path / "out" / "results.jsonl").read_bytes()
    start_job(rt, job_id, JobSpec(out_dir=str(tmp_path / "out"), manifest=str(manifest)), sent)
    assert run_item(rt, job_id, 4, sent) == "already-done"
    assert sent.queue == [] and (tmp_path / "out" / "results.jsonl").read_bytes() == before
    assert rt.store.counts(job_id) == {"error": 7}


def test_claims_retries_and_unavailable(rt: WorkerRuntime, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", [{"id": "a", "prompt": "hello"}])
    job_id, sent = new_id(), Sent()
    start_job(rt, job_id, JobSpec(out_dir=str(tmp_path / "out"), manifest=str(manifest)), sent)
    # Another attempt (maybe on a dead worker) holds the claim: wait for its lease.
    assert rt.store.claim(job_id, "a", "dead-worker", 20.0)
    with pytest.raises(RetryLater) as later:
        run_item(rt, job_id, 0, sent)
    assert later.value.reason == "claimed by another attempt" and 19.0 < later.value.countdown_s <= 21.0
    assert later.value.retries == 0, "waiting for a claim does not use up the retry budget"
    rt.store.r.delete(rt.store.key(job_id, "claim:a"))
    # A claim of a process of this host that is gone (or of this very process) is taken over at once.
    gone = subprocess.Popen(["true"])
    gone.wait()
    for holder in (f"{socket.gethostname()}|{gone.pid}|task|x", f"{socket.gethostname()}|{os.getpid()}|t|y"):
        assert rt.store.claim(job_id, "a", holder, 20.0)
        with pytest.raises(RetryLater) as later:
            run_item(rt, job_id, 0, sent)
        assert later.value.retries == 1, "it ran: the component is UNAVAILABLE"
        assert rt.store.claim_holder(job_id, "a") is None, "and released its claim to retry"
    # The component is unreachable: retried with exponential backoff, then an UNAVAILABLE error.
    delays = []
    for retries in range(2):
        with pytest.raises(RetryLater) as later:
            run_item(rt, job_id, 0, sent, retries=retries)
        assert later.value.retries == retries + 1
        delays.append(later.value.countdown_s)
    assert 0.8 <= delays[0] <= 1.2 and 1.6 <= delays[1] <= 2.4
    assert rt.store.claim_ttl_s(job_id, "a") == 0, "a retrying attempt releases its claim"
    assert run_item(rt, job_id, 0, sent, retries=2) == "error"
    [row] = read_results(tmp_path / "out")
    assert row["error_code"] == "UNAVAILABLE" and row["retries"] == 2
    assert rt.store.job(job_id)["status"] == "done"


def test_a_job_whose_manifest_cannot_be_read_fails(rt: WorkerRuntime, tmp_path: Path) -> None:
    job_id, sent = new_id(), Sent()
    job = start_job(rt, job_id, JobSpec(out_dir=str(tmp_path / "out"), manifest=str(tmp_path / "nope.jsonl")),
                    sent)
    assert job["status"] == "failed" and "No such file" in job["error"] and sent.log == []
    job_id = new_id()
    spec = JobSpec(out_dir=str(tmp_path / "o2"), folder=str(tmp_path / "none"), prompt="p")
    job = start_job(rt, job_id, spec, sent)
    assert job["status"] == "failed" and "does not exist" in job["error"]


def test_resume_resends_the_first_unfinished_item_of_each_lane(rt: WorkerRuntime, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", [json.dumps({"id": f"i{k}"}) for k in range(5)])
    job_id, sent = new_id(), Sent()
    start_job(rt, job_id, JobSpec(out_dir=str(tmp_path / "out"), manifest=str(manifest), concurrency=2), sent)
    job_id_, index = sent.queue.pop(0)
    run_item(rt, job_id_, index, sent)  # lane 0: item 0 done, item 2 sent
    sent.queue.clear()  # ... and then the broker loses every message
    sent.log.clear()
    assert resume_job(rt.store, job_id, sent) == 2
    assert sent.log == [2, 1]
    sent.drain(rt)
    assert rt.store.job(job_id)["status"] == "done" and len(read_results(tmp_path / "out")) == 5


def test_cancelled_job_records_cancelled_items(rt: WorkerRuntime, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", [{"id": f"i{k}", "prompt": "p"} for k in range(4)])
    job_id, sent = new_id(), Sent()
    start_job(rt, job_id, JobSpec(out_dir=str(tmp_path / "out"), manifest=str(manifest)), sent)
    assert rt.store.cancel(job_id)
    assert set(sent.drain(rt)) == {"cancelled"}
    assert [r["status"] for r in read_results(tmp_path / "out")] == ["cancelled"] * 4
    assert rt.store.job(job_id)["status"] == "cancelled"


def test_sweep_resends_lanes_and_starts_whose_messages_were_lost(rt: WorkerRuntime, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", [json.dumps({"id": f"i{k}"}) for k in range(5)])
    job_id, sent = new_id(), Sent()
    start_job(rt, job_id, JobSpec(out_dir=str(tmp_path / "out"), manifest=str(manifest), concurrency=2), sent)
    job_id_, index = sent.queue.pop(0)
    run_item(rt, job_id_, index, sent)  # lane 0: item 0 done, item 2 sent
    sent.queue.clear()  # every message in flight is lost
    sent.log.clear()
    starts: list[str] = []

    def send_start(job: str, spec: dict) -> None:
        starts.append(job)

    now = time.time()
    assert sweep(rt.store, sent, send_start, stall_after_s=60, now=now) == {"lanes": 0, "starts": 0}
    assert rt.store.claim(job_id, "i1", "somebody", 30)  # lane 1's item is being run: left alone
    assert sweep(rt.store, sent, send_start, stall_after_s=60, now=now + 61) == {"lanes": 1, "starts": 0}
    assert sent.log == [2]
    assert sweep(rt.store, sent, send_start, stall_after_s=60, now=now + 62) == {"lanes": 0, "starts": 0}, \
        "a lane just sent again waits another stall_after_s"
    rt.store.r.delete(rt.store.key(job_id, "claim:i1"))
    sent.queue.append((job_id, 1))
    sent.drain(rt)
    assert rt.store.job(job_id)["status"] == "done" and len(read_results(tmp_path / "out")) == 5
    # A job whose start message was lost stays queued: its start is sent again.
    lost = new_id()
    create_job(rt.store, lost, JobSpec(out_dir=str(tmp_path / "o2"), manifest=str(manifest)),
               default_concurrency=1, max_concurrency=4)
    assert sweep(rt.store, sent, send_start, stall_after_s=60, now=time.time() + 61)["starts"] == 1
    assert starts == [lost]
