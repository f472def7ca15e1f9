"""Traces through the gateway: each socket is a `realtime.session` span that continues the client's W3C
`traceparent` and is handed on to the orchestrator in the Converse call's metadata (whose `session` span
continues it: tests/orchestrator/test_telemetry.py). The app runs in-process here (Starlette's test
client) in front of the real orchestrator, with an in-memory span exporter."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

from vitaserve.stack import LocalStack
from vitaserve_gateway.app import create_app
from vitaserve_gateway.settings import GatewaySettings

pytestmark = [pytest.mark.integration]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def test_a_socket_is_a_session_span_continuing_the_clients_trace(gateway_stack: LocalStack) -> None:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    app = create_app(GatewaySettings(orchestrator_address=gateway_stack.orchestrator_address),
                     tracer_provider=provider)
    with TestClient(app) as client:
        with client.websocket_connect("/v1/realtime?model=traced", headers={"traceparent": TRACEPARENT}) as ws:
            created = ws.receive_json()
            assert created["type"] == "session.created"
        assert client.get("/readyz").status_code == 200
    (span,) = [s for s in exported.get_finished_spans() if s.name == "realtime.session"]
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert span.attributes["vitaserve.session_id"] == created["session"]["id"]
    assert span.attributes["vitaserve.model"] == "traced"
    assert span.attributes["vitaserve.upstream_status"] in ("OK", "CANCELLED")
