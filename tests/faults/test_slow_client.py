"""A client that never reads (issue 14 §2): it sends a turn and then does not read the response stream, so
gRPC flow control blocks the orchestrator's writes. The orchestrator ends that stream with
RESOURCE_EXHAUSTED after `VITASERVE_CLIENT_WRITE_TIMEOUT_S` (the session saved and released, its queue
dropped) while the client still has not read; a client that floods events it never reads the answers of
overflows `VITASERVE_MAX_PENDING_EVENTS`. The orchestrator's memory stays flat, and another session on the
same orchestrator is unaffected."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from fault_servers import Tritons, orchestrator

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.client import Conversation
from vitaserve.faults import RssSampler, StalledClient, rss_kib, turn_until_done
from vitaserve.stack import OrchestratorProcess, free_port
from vitaserve_orchestrator.events import ErrorEvent
from vitaserve_orchestrator.outbox import Outbox

WRITE_TIMEOUT_S = 3
MAX_PENDING = 5000  # above the ~2,600 events of a whole 2048-token spoken reply
# A long spoken reply, unpaced (the whole reply is sent as fast as it is made): far more than the
# client's 64 KiB receive window.
SPOKEN = pb.SessionSettings(turn_detection="manual", want_audio=True, max_reply_tokens=2048, temperature=0.8,
                            seed=5, playout_lead_ms=3_600_000)
SHORT = pb.SessionSettings(turn_detection="manual", text_only=True, max_reply_tokens=8, seed=3)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


@pytest.mark.unit
def test_an_outbox_over_its_bound_drops_its_queue_and_closes() -> None:
    outbox = Outbox("sess-x", max_pending=100)
    for i in range(100):
        assert outbox.put(ErrorEvent(code="INVALID_ARGUMENT", message=f"bad {i}"))
    assert outbox.overflow is None and outbox.pending() == 100
    assert not outbox.put(ErrorEvent(code="INVALID_ARGUMENT", message="one too many"))
    assert outbox.overflow is not None and outbox.overflow.code == "RESOURCE_EXHAUSTED"
    assert "more than 100 events" in outbox.overflow.message
    assert outbox.closed and outbox.pending() == 0
    assert asyncio.run(outbox.get()) is None  # the stream's sender stops at once


@pytest.fixture(scope="module")
def slow_orchestrator(tritons: Tritons, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[tuple[OrchestratorProcess, str]]:
    tritons.ensure_running()
    metrics = f"127.0.0.1:{free_port()}"
    base = tritons.base.grpc_url
    proc = orchestrator(tmp_path_factory.mktemp("slow"), "slow", base, base,
                        VITASERVE_CLIENT_WRITE_TIMEOUT_S=str(WRITE_TIMEOUT_S),
                        VITASERVE_MAX_PENDING_EVENTS=str(MAX_PENDING), VITASERVE_METRICS_ADDRESS=metrics)
    yield proc, f"http://{metrics}/metrics"
    proc.stop()


def gauge(metrics_url: str, name: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def wait_gauge(metrics_url: str, name: str, value: float, timeout_s: float) -> float:
    """Seconds until the gauge reads `value` (polled; bounded)."""
    t0 = time.monotonic()
    while (current := await asyncio.to_thread(gauge, metrics_url, name)) != value:
        assert time.monotonic() - t0 < timeout_s, f"{name} still {current} after {timeout_s} s"
        await asyncio.sleep(0.1)
    return time.monotonic() - t0


@pytest.mark.integration
def test_a_client_that_never_reads_is_closed_with_resource_exhausted_and_others_go_on(
        slow_orchestrator: tuple[OrchestratorProcess, str]) -> None:
    proc, metrics = slow_orchestrator
    sessions = 'vitaserve_active_sessions'
    outbox_depth = 'vitaserve_queue_depth{queue="outbox"}'

    async def scenario() -> None:
        baseline = rss_kib(proc.pid)
        stalled = StalledClient(proc.address, SPOKEN)
        try:
            with RssSampler(proc.pid) as rss:
                await stalled.start("Tell me a very long story.")
                await wait_gauge(metrics, sessions, 1, 10)
                # Another session meanwhile: its turns complete as usual.
                async with Conversation.open(proc.address, settings=SHORT) as other:
                    for text in ("Hello?", "Still fine?"):
                        result = await turn_until_done(other, text, attempts=1)
                        assert result.done.WhichOneof("event") == "response_done"
                # The never-reading stream is closed and released by the server while its client still
                # has not read a single event: no open stream, nothing queued.
                await wait_gauge(metrics, sessions, 0, WRITE_TIMEOUT_S * 3 + 10)
                assert await asyncio.to_thread(gauge, metrics, outbox_depth) == 0
            growth_mib = (rss.peak_kib - baseline) / 1024
            assert growth_mib < 32, f"orchestrator RSS grew {growth_mib:.1f} MiB"
            events, code, details = await stalled.drain(30)  # what the transport held, then the status
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            assert f"did not read the stream for {WRITE_TIMEOUT_S} s" in details
            assert events and events[0].WhichOneof("event") == "session_started"
            assert not any(e.WhichOneof("event") == "response_done" for e in events)
        finally:
            await stalled.close()

    run(scenario())


@pytest.mark.integration
def test_a_client_flooding_events_without_reading_overflows_the_bound(
        slow_orchestrator: tuple[OrchestratorProcess, str]) -> None:
    proc, metrics = slow_orchestrator

    async def scenario() -> None:
        stalled = StalledClient(proc.address, SHORT)
        try:
            await stalled.start(flood=MAX_PENDING * 4)  # each empty event is answered by an error event
            events, code, details = await stalled.drain(WRITE_TIMEOUT_S * 3 + 20)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
            assert f"more than {MAX_PENDING} events were waiting" in details
            errors = [e for e in events if e.WhichOneof("event") == "error"]
            assert errors and all(e.error.code == "INVALID_ARGUMENT" for e in errors)
            assert len(events) < MAX_PENDING * 4  # the rest was dropped, never queued
        finally:
            await stalled.close()
        assert await asyncio.to_thread(gauge, metrics, "vitaserve_active_sessions") == 0

    run(scenario())
