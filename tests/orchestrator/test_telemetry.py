"""The telemetry instruments: the Prometheus registry scraped over real HTTP, the router's endpoint gauge,
and tracing through an in-memory exporter with the trace context handed to Triton requests; and what the
pipeline records into them, over scripted components (tests/e2e/test_telemetry.py does it through real
Triton and gRPC): a span per component call that never leaks into the caller, errors counted, a turn's
first token / first audio / duration, a component silent past the pipeline's limit."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import numpy as np
import pytest
from conftest import make_config
from fakes import FakeComponents, VirtualClock
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from vitaserve.cluster.discovery import StaticDiscovery
from vitaserve.cluster.routing import Router
from vitaserve.components.base import GenerationParams, ImageInput
from vitaserve.components.triton import trace_headers
from vitaserve.errors import Unavailable
from vitaserve.families import get_family
from vitaserve_orchestrator import events as ev
from vitaserve_orchestrator.instrumented import InstrumentedComponents
from vitaserve_orchestrator.outbox import Outbox
from vitaserve_orchestrator.session import SessionSettings, SettingsUpdate
from vitaserve_orchestrator.settings import OrchestratorSettings
from vitaserve_orchestrator.telemetry import (
    Metrics,
    Telemetry,
    setup_tracing,
    start_metrics_server,
    tracer,
    triton_headers,
)
from vitaserve_orchestrator.turn import PipelineLimits, Response, TurnInput

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
    assert trace_headers() is None  # what TritonComponents sends while tracing is off: no headers

    exported = InMemorySpanExporter()
    provider = setup_tracing(otlp_endpoint=None, exporter=exported, service_name="orch-test")
    assert provider is not None
    with tracer(provider).start_as_current_span("turn") as turn:
        with tracer(provider).start_as_current_span("llm_decoder.generate"):
            headers = triton_headers()
            assert trace_headers() == headers
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


# ---- recording: the component wrapper and the turn pipeline (scripted components, virtual clock) ----

def _telemetry() -> tuple[Telemetry, InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    provider = setup_tracing(otlp_endpoint=None, exporter=exported)
    return Telemetry(provider=provider), exported


def _spans(telemetry: Telemetry, exported: InMemorySpanExporter) -> dict[str, Any]:
    assert telemetry.provider is not None
    telemetry.provider.force_flush()
    return {s.name: s for s in exported.get_finished_spans()}


def test_instrumented_components_span_each_call_count_errors_and_never_leak_their_span() -> None:
    async def body() -> None:
        telemetry, exported = _telemetry()
        fake = FakeComponents(errors={"vision_encoder": Unavailable("vision is down")})
        components = InstrumentedComponents(fake, telemetry)
        with telemetry.tracer.start_as_current_span("turn") as turn:
            await components.encode_audio(np.zeros(16000, np.float32), request_id="r1")
            with pytest.raises(Unavailable):
                await components.encode_images([ImageInput(b"x")], request_id="r1")
            tokens = 0
            async for _delta in components.generate("p", [], GenerationParams(max_tokens=8), request_id="r1"):
                tokens += 1
                assert trace.get_current_span() is turn  # the stream's span is current only inside a step
            speech = components.synthesize("Hello there.", request_id="r1/0")
            await anext(speech)
            await speech.aclose()  # closed early (an interruption): the span ends all the same
        spans = _spans(telemetry, exported)
        assert {"audio_encoder.encode", "vision_encoder.encode", "llm_decoder.generate",
                "speech_synth.synthesize"} <= set(spans)
        for name in ("audio_encoder.encode", "vision_encoder.encode", "llm_decoder.generate",
                     "speech_synth.synthesize"):
            assert spans[name].parent.span_id == turn.get_span_context().span_id, name
        assert spans["llm_decoder.generate"].attributes["vitaserve.tokens"] == tokens > 0
        assert spans["speech_synth.synthesize"].attributes["vitaserve.chunks"] == 1
        assert fake.speech_streams[0].closed
        failed = spans["vision_encoder.encode"]
        assert failed.status.status_code == StatusCode.ERROR and "vision is down" in failed.status.description
        text = telemetry.metrics.exposition().decode()
        assert 'vitaserve_component_errors_total{code="UNAVAILABLE",component="vision_encoder"} 1.0' in text
        assert "audio_encoder" not in text.split("vitaserve_component_errors_total")[-1]

    asyncio.run(asyncio.wait_for(body(), 10))


def _response(fake: FakeComponents, telemetry: Telemetry, **limits: float) -> tuple[Response, Outbox]:
    clock = VirtualClock()
    outbox = Outbox("s", clock=clock, sleep=clock.sleep)
    config = make_config()
    session = SessionSettings.resolve(SettingsUpdate(), config)
    response = Response(components=InstrumentedComponents(fake, telemetry), family=get_family("vita15"),
                        outbox=outbox, session_id="s",
                        turn_id="t1", response_id="r1", turn=TurnInput(text="hi"), history=(),
                        settings=session, limits=PipelineLimits(**limits), committed_at=clock(),
                        on_finished=lambda _r, _o: None, clock=clock, telemetry=telemetry)
    return response, outbox


async def _until_end(outbox: Outbox) -> list[Any]:
    events = []
    while (env := await outbox.get()) is not None:
        events.append(env.event)
        if isinstance(env.event, (ev.ResponseDone, ev.ErrorEvent, ev.Interrupted)):
            return events
    return events


def test_a_turn_records_first_token_first_audio_duration_and_its_span_tree() -> None:
    async def body() -> None:
        telemetry, exported = _telemetry()
        response, outbox = _response(FakeComponents(), telemetry)
        response.start()
        events = await _until_end(outbox)
        assert isinstance(events[-1], ev.ResponseDone)
        m = telemetry.metrics
        text = m.exposition().decode()
        assert "vitaserve_time_to_first_token_seconds_count 1.0" in text
        assert "vitaserve_time_to_first_audio_seconds_count 1.0" in text
        assert 'vitaserve_turn_duration_seconds_count{outcome="done"} 1.0' in text
        spans = _spans(telemetry, exported)
        turn = spans["turn"]
        assert turn.parent is None and turn.attributes["vitaserve.response_id"] == "r1"
        for name in ("llm_decoder.generate", "speech_synth.synthesize"):
            assert spans[name].parent.span_id == turn.context.span_id
            assert spans[name].context.trace_id == turn.context.trace_id

    asyncio.run(asyncio.wait_for(body(), 10))


def test_a_component_silent_past_the_pipeline_limit_is_counted_once() -> None:
    async def body() -> None:
        telemetry, exported = _telemetry()
        fake = FakeComponents(hang={"llm_decoder"})
        response, outbox = _response(fake, telemetry, first_token_timeout_s=0.1)
        response.start()
        events = await _until_end(outbox)
        assert isinstance(events[-1], ev.ErrorEvent) and events[-1].code == "UNAVAILABLE"
        text = telemetry.metrics.exposition().decode()
        assert 'vitaserve_component_errors_total{code="UNAVAILABLE",component="llm_decoder"} 1.0' in text
        assert 'vitaserve_turn_duration_seconds_count{outcome="error"} 1.0' in text
        spans = _spans(telemetry, exported)
        assert spans["turn"].status.status_code == StatusCode.ERROR
        assert spans["llm_decoder.generate"].attributes["vitaserve.cancelled"] is True

    asyncio.run(asyncio.wait_for(body(), 10))
