"""The batch worker's Prometheus endpoint: a real prefork worker (2 pool processes) with
`VITASERVE_BATCH_METRICS_ADDRESS`, a real job through the batch tests' Triton, `/metrics` scraped over HTTP
from the worker's main process: the items of both pool processes are counted by status, their durations
observed, nothing is left in flight, the queue depth is reported, and the files of an earlier run are
not summed in."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest

from vitaserve_batch.harness import free_port, wait_for, write_manifest
from vitaserve_batch.results import read_results

pytestmark = [pytest.mark.integration]


def submit(env: dict[str, str], *args: str) -> str:
    """`vitaserve batch submit ...` with the worker's environment; returns the job id."""
    proc = subprocess.run([sys.executable, "-m", "vitaserve.cli", "batch", "submit", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def finished(store, job_id: str) -> bool:  # noqa: ANN001
    return (store.job(job_id) or {}).get("status") in ("done", "cancelled", "failed")


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def test_worker_metrics_count_items_of_every_pool_process(
    triton, store, env_factory, processes, tmp_path
) -> None:
    port = free_port()
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"\0" * 16)  # a stale file of an earlier run
    env = env_factory(triton.grpc_url, metrics_address=f"127.0.0.1:{port}", metrics_dir=metrics_dir)
    worker = processes("worker", env, concurrency=2)
    url = f"http://127.0.0.1:{port}/metrics"
    wait_for(lambda: "batch worker metrics on port" in worker.log_tail(200), 30, "the metrics endpoint",
             on_timeout=worker.log_tail)
    assert not (metrics_dir / "counter_999999.db").exists()
    queue = env["VITASERVE_BATCH_QUEUE"]
    before = scrape(url)
    assert before[f'vitaserve_queue_depth{{queue="{queue}"}}'] == 0.0

    lines = [{"id": f"t{k}", "text": f"Say {k}.", "max_tokens": 4} for k in range(4)] + ['{"id": "broken"']
    manifest = write_manifest(tmp_path / "items.jsonl", lines)
    job_id = submit(env, "--manifest", str(manifest), "--out", str(tmp_path / "out"),
                    "--concurrency", "2")
    wait_for(lambda: finished(store, job_id), 120, "the job to finish",
             on_timeout=lambda: json.dumps(store.job(job_id), default=str) + worker.log_tail())
    assert {r["status"] for r in read_results(tmp_path / "out")} == {"ok", "error"}

    after = scrape(url)
    assert after['vitaserve_batch_items_total{status="ok"}'] == 4.0
    assert after['vitaserve_batch_items_total{status="bad-line"}'] == 1.0
    assert after['vitaserve_batch_item_duration_seconds_count{status="ok"}'] == 4.0
    assert after['vitaserve_batch_item_duration_seconds_bucket{le="+Inf",status="ok"}'] == 4.0
    assert after['vitaserve_batch_item_duration_seconds_sum{status="ok"}'] > 0.0
    assert after[f'vitaserve_batch_items_in_flight{{queue="{queue}"}}'] == 0.0
    assert after[f'vitaserve_queue_depth{{queue="{queue}"}}'] == 0.0
    # the samples came from the pool processes' files, not from the main process
    writers = {int(p.stem.rsplit("_", 1)[1]) for p in metrics_dir.glob("counter_*.db")}
    assert writers and worker.pid not in writers and writers <= set(worker.pool_pids())
