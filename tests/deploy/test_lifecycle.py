"""What the Kubernetes probes and SIGTERM rely on: the orchestrator's grpc.health.v1 services and its drain.

- service "" (the readiness probe) is NOT_SERVING until every component is ready and while draining;
  "liveness" (the liveness and startup probes) is SERVING while the process serves, Triton ready or not;
- SIGTERM in the middle of a turn: new streams are refused, the running turn still completes within
  VITASERVE_SHUTDOWN_GRACE_S, and the process exits 0 (the chart's terminationGracePeriodSeconds covers it).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.api.v1 import orchestrator_pb2_grpc as pb_grpc
from vitaserve.components.triton import TritonComponents
from vitaserve_orchestrator.server import LIVENESS_SERVICE, create_server
from vitaserve_orchestrator.settings import OrchestratorSettings

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def status(channel: grpc.aio.Channel, service: str = "") -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=5)
    return response.status


def test_readiness_waits_for_triton_while_liveness_serves_and_drain_stops_both() -> None:
    async def body() -> None:
        # Triton is not there (nothing listens): not ready, but alive
        config = OrchestratorSettings.model_validate({"triton_url": f"127.0.0.1:{free_port()}",
                                                      "listen_address": "127.0.0.1:0", "health_poll_s": 0.1})
        components = TritonComponents(config.component_urls(), health_timeout_s=0.5)
        server, port = create_server(config, components, "127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert not await server.check_readiness()
                assert await status(channel) == NOT_SERVING
                assert await status(channel, "vitaserve.v1.Orchestrator") == NOT_SERVING
                assert await status(channel, LIVENESS_SERVICE) == SERVING
                await server.drain()
                assert await status(channel, LIVENESS_SERVICE) == NOT_SERVING
                assert await status(channel) == NOT_SERVING
        finally:
            await server.stop(0.5)
            await components.close()

    asyncio.run(asyncio.wait_for(body(), 30))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITASERVE_")}
    return {**env, **extra}


def test_sigterm_mid_turn_lets_the_turn_finish_within_the_grace(tiny_checkpoint: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    grace_s = 20.0
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitaserve_orchestrator"],
        env=_env(VITASERVE_BACKEND="inprocess", VITASERVE_CHECKPOINT_DIR=str(tiny_checkpoint),
                 VITASERVE_LISTEN_ADDRESS=address, VITASERVE_HEALTH_POLL_S="0.2",
                 VITASERVE_SHUTDOWN_GRACE_S=str(grace_s)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )

    async def body() -> tuple[list[str], float, float]:
        async with grpc.aio.insecure_channel(address) as channel:
            deadline = time.monotonic() + 90
            while True:  # the startup probe's view: wait for SERVING
                try:
                    if await status(channel) == SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "orchestrator did not get ready"
                await asyncio.sleep(0.1)

            queue: asyncio.Queue[pb.ClientEvent | None] = asyncio.Queue()

            async def requests() -> AsyncIterator[pb.ClientEvent]:
                while (event := await queue.get()) is not None:
                    yield event

            call = pb_grpc.OrchestratorStub(channel).Converse(requests())
            await queue.put(pb.ClientEvent(session_update=pb.SessionUpdate(
                # unpaced (a lead of an hour): the tiny model's ~20 s of reply audio would play in real time
                settings=pb.SessionSettings(turn_detection="manual", max_reply_tokens=48,
                                            playout_lead_ms=3_600_000))))
            assert (await call.read()).WhichOneof("event") == "session_started"
            await queue.put(pb.ClientEvent(text=pb.TextInput(text="Tell me a long story.")))
            first = await asyncio.wait_for(call.read(), 30)
            assert first.WhichOneof("event") == "turn_started"
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)  # the turn is running now
            kinds = ["turn_started"]
            while kinds[-1] not in ("response_done", "interrupted", "error"):
                event = await asyncio.wait_for(call.read(), grace_s)
                assert event is not grpc.aio.EOF, f"stream ended mid-turn after {kinds}"
                kinds.append(event.WhichOneof("event"))
            finished = time.monotonic() - signalled
            # a new stream during the drain is refused
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await status(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            await queue.put(None)  # the client ends its stream: the server can stop before the grace
            await call.code()
            code = await asyncio.to_thread(proc.wait, grace_s + 10)
            assert code == 0
            return kinds, finished, time.monotonic() - signalled

    try:
        kinds, finished_s, exit_s = asyncio.run(asyncio.wait_for(body(), 180))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        output = proc.stdout.read() if proc.stdout else ""
        if proc.stdout:
            proc.stdout.close()
    print(f"turn finished {finished_s:.2f} s after SIGTERM, process exited after {exit_s:.2f} s")
    assert kinds[-1] == "response_done", (kinds, output)
    assert "text_delta" in kinds
    assert finished_s < grace_s and exit_s < grace_s, (finished_s, exit_s)
    assert "draining" in output
