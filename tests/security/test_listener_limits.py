"""The batch worker's /metrics listener (`vitaserve_batch.metrics.serve`, what the worker's main process
serves on VITASERVE_BATCH_METRICS_ADDRESS) with a real redis-server for its queue gauge: oversized requests
are refused (414 / 431, the standard library's bounds) and it goes on serving. The orchestrator's listeners:
tests/security/test_limits_and_rotation.py; the gateway's: test_gateway_security.py and
tests/gateway/test_bad_input.py (WebSocket 1009); Triton's: reachable only from the orchestrator and the
batch worker (tests/deploy/test_network_policy.py), which bound what they send."""

from __future__ import annotations

from pathlib import Path

import pytest
from oversize import assert_refused_and_still_serving

from vitaserve.redis_server import RedisServer, redis_server_binary

pytestmark = pytest.mark.integration


def test_the_batch_metrics_listener_refuses_oversized_requests_and_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if redis_server_binary() is None:
        pytest.fail("redis-server is not installed: `apt-get install -y redis-server` (the Makefile does)")
    from vitaserve_batch import metrics

    # multiprocess mode, as in the worker: a registry of its own (the global one stays untouched)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "prometheus"))
    with RedisServer(work_dir=tmp_path) as redis_server:
        server, port = metrics.serve("127.0.0.1:0", broker_url=redis_server.url, queue="vitaserve-batch")
        try:
            got = assert_refused_and_still_serving(port, "/metrics")
            assert got == {"header line": 431, "request line": 414, "header count": 431}
        finally:
            server.shutdown()
            server.server_close()
