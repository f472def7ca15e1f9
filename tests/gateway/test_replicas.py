"""The gateway balances its sockets' streams over orchestrator replicas (gRPC round_robin over every address
of its upstream; in Kubernetes a headless Service's DNS, here a static list of two loopback replicas on the
same Triton). Sessions live in the orchestrators' shared store, so any replica can take any socket."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest
from realtime_events import realtime

from vitaserve.stack import GatewayProcess, LocalStack, OrchestratorProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]


def active_sessions(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("vitaserve_active_sessions "):
                return float(line.split()[1])
    raise AssertionError("no vitaserve_active_sessions metric")


def test_sockets_are_spread_over_the_orchestrator_replicas(gateway_stack: LocalStack, tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    replicas = [OrchestratorProcess({"VITASERVE_BACKEND": "triton", "VITASERVE_TRITON_URL": gateway_stack.triton_url,
                                     "VITASERVE_MODEL_FAMILY": "small",
                                     "VITASERVE_METRICS_ADDRESS": f"127.0.0.1:{port}"},
                                    log_path=tmp_path / f"orchestrator-{i}.log")
                for i, port in enumerate(ports)]
    try:
        for replica in replicas:
            replica.start()
        upstream = "ipv4:" + ",".join(r.address for r in replicas)
        gateway = GatewayProcess(upstream, log_path=tmp_path / "gateway.log").start()
        try:
            async def scenario() -> list[float]:
                async with realtime(gateway.url):  # the gateway's channel connects to both replicas
                    pass
                await asyncio.sleep(0.5)
                async with realtime(gateway.url), realtime(gateway.url), realtime(gateway.url), \
                        realtime(gateway.url):
                    return [active_sessions(port) for port in ports]

            per_replica = asyncio.run(asyncio.wait_for(scenario(), 60))
        finally:
            gateway.stop()
    finally:
        for replica in replicas:
            replica.stop()
    assert per_replica == [2.0, 2.0], per_replica
