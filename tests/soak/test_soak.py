"""A short soak through the real stack (bench/soak.py's own code: real Triton on the tiny checkpoint, a
real redis-server, a real orchestrator process with /metrics), 6 clients for 20 s of multimodal turns
(text, images, spoken audio, interrupts, reconnects with the same session id, EndSession or abandonment):
no error of any kind, every turn started ends (done or interrupted), and once every session has ended
(deleted, or expired: the orchestrator runs with a 5 s session TTL) the orchestrator is back at its idle
state: live asyncio tasks (`vitaserve_asyncio_tasks`, scraped), its open fds other than the Redis pool's
connections (which stay within the concurrency), Triton's fds, and Redis keys (DBSIZE 0).
Slopes are not asserted here: 20 s is too short to tell growth from warm-up; bench/soak.py runs long."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from vitaserve.redis_server import redis_server_binary

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed"),
]

CLIENTS = 6


def test_a_short_soak_has_no_errors_and_returns_to_idle(bench_soak: ModuleType, tiny_checkpoint: Path,
                                                        tmp_path: Path) -> None:
    report = bench_soak.soak(CLIENTS, 20 / 60, sample_s=2.0, seed=1, session_ttl_s=5.0,
                             checkpoint_dir=tiny_checkpoint, work_dir=tmp_path)
    samples = report.pop("_samples")

    assert report["warm_up_errors"] == {}
    assert report["errors_total"] == 0, report["error_examples"]
    turns = report["turns"]
    assert turns["started"] == turns["done"] + turns["interrupted"], turns
    assert turns["started"] >= 2 * CLIENTS, turns
    assert set(turns["by_kind"]) == {"text", "image", "audio", "interrupt"}, turns
    assert turns["interrupted"] >= 1 and report["reconnects"] >= 1, report
    assert report["sessions_opened"] == report["sessions_deleted"] + report["sessions_abandoned"]
    assert report["model_processes"] == ["audio_encoder_0_0", "llm_decoder_0_0", "speech_synth_0_0",
                                         "vision_encoder_0_0"] and report["model_restarts"] == 0

    # the series saw the load (the gauge counts the streams' tasks; sessions wrote Redis) ...
    peak = {name: max(values[name] for _, values in samples) for name in samples[0][1]}
    baseline, after = report["baseline"], report["after"]
    assert peak["asyncio_tasks"] > baseline["asyncio_tasks"] and peak["active_sessions"] >= 1, peak
    assert peak["redis_keys"] > baseline["redis_keys"] == 0, peak
    # ... and came back to idle once every session had ended
    assert report["back_to_baseline"] == dict.fromkeys(bench_soak.IDLE_SERIES, True), (baseline, after)
    assert after["asyncio_tasks"] <= baseline["asyncio_tasks"]
    assert after["redis_keys"] == 0
    assert report["redis_pool_bounded"], report["redis_pool_conns_after"]
