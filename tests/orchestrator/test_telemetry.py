"""The telemetry instruments: the Prometheus registry scraped over real HTTP, the router's endpoint gauge,
and tracing through an in-memory exporter with the trace context handed to Triton requests."""

from __future__ import annotations

import urllib.request

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from vitaserve.cluster.discovery import StaticDiscovery
from vitaserve.cluster.routing import Router
from vitaserve_orchestrator.settings import OrchestratorSettings
from vitaserve_orchestrator.telemetry import Metrics, setup_tracing, start_metrics_server, tracer, triton_headers

pytestmark = pytest.mark.unit


def test_metrics_endpoint_serves_the_instruments() -> None:
    metrics = Metrics()
    metrics.follow_router(Router(StaticDiscovery({"llm_decoder": "10.0.0.1:8001,10.0.0.2:8001",
                                                  "vision_encoder": "10.0.0.3:8001"})))
    metrics.time_to_first_token.observe(0.12)
    metrics.time_to_first_audio.observe(0.4)
    metrics.barge_in_stop.observe(0.03)
    metrics.turn_duration.labels("done").observe(2.5)
    metrics.active_sessions.inc()
    metrics.component_errors.labels("llm_decoder", "UNAVAILABLE").inc()
    metrics.queue_depth.labels("outbox").set(3)
    server, port = start_metrics_server(metrics, "127.0.0.1:0")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'vitaserve_time_to_first_token_seconds_bucket{le="0.2"} 1.0' in text
    assert 'vitaserve_time_to_first_token_seconds_bucket{le="0.1"} 0.0' in text
    assert "vitaserve_time_to_first_audio_seconds_count 1.0" in text
    assert "vitaserve_barge_in_stop_seconds_sum 0.03" in text
    assert 'vitaserve_turn_duration_seconds_count{outcome="done"} 1.0' in text
    assert "vitaserve_active_sessions 1.0" in text
    assert 'vitaserve_component_errors_total{code="UNAVAILABLE",component="llm_decoder"} 1.0' in text
    assert 'vitaserve_queue_depth{queue="outbox"} 3.0' in text
    assert 'vitaserve_component_ready_endpoints{component="llm_decoder"} 2.0' in text
    assert 'vitaserve_component_ready_endpoints{component="vision_encoder"} 1.0' in text
    assert Metrics().exposition().count(b"vitaserve_active_sessions 0.0") == 1  # registries are separate


def test_tracing_is_off_by_default_and_exports_spans_with_the_triton_context() -> None:
    settings = OrchestratorSettings.model_validate({"triton_url": "127.0.0.1:1"})
    assert settings.otlp_endpoint is None and settings.metrics_address is None
    assert setup_tracing(otlp_endpoint=settings.otlp_endpoint) is None
    assert triton_headers() == {}  # no span: nothing to propagate

    exported = InMemorySpanExporter()
    provider = setup_tracing(otlp_endpoint=None, exporter=exported, service_name="orch-test")
    assert provider is not None
    with tracer(provider).start_as_current_span("turn") as turn:
        with tracer(provider).start_as_current_span("llm_decoder.generate"):
            headers = triton_headers()
    provider.force_flush()
    trace_id = f"{turn.get_span_context().trace_id:032x}"
    assert headers["traceparent"].split("-")[1] == trace_id
    spans = {s.name: s for s in exported.get_finished_spans()}
    assert spans["llm_decoder.generate"].parent.span_id == turn.get_span_context().span_id
    assert spans["turn"].resource.attributes["service.name"] == "orch-test"
    provider.shutdown()

    # configured: a real OTLP exporter (no collector is needed until a span is exported)
    otlp = setup_tracing(otlp_endpoint="127.0.0.1:4317")
    assert otlp is not None
    otlp.shutdown()
    with pytest.raises(ValueError, match="sample_ratio"):
        setup_tracing(otlp_endpoint="x:4317", sample_ratio=2)
