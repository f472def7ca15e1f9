"""Metrics and traces of real turns through real Triton (the session's `stack`, no second Triton).

- a second orchestrator process with `VITASERVE_METRICS_ADDRESS`, in front of the stack's Triton: its
  `/metrics` is scraped over HTTP before and after a real turn, and the histograms moved (time to first
  token and audio, turn duration by outcome), the sessions gauge went up and back, the router's endpoints
  and the outbox queue depth are there; after a real barge-in (speech streamed in real time over paced
  reply audio) the barge-in stop latency and the interrupted turns moved;
- the same process exports its spans over OTLP/gRPC (`VITASERVE_OTLP_ENDPOINT`) to a real OTLP receiver
  in this test: the session span continues the client's `traceparent` metadata, its turn is linked to it;
- an in-process orchestrator (`create_server` with `TritonComponents` against the same Triton) exporting
  to OpenTelemetry's in-memory exporter: one trace per turn, the `turn` span parent of a span per
  component call (vision and audio encode, generate, each synthesize stream), linked to its session's
  span, and every Triton request carried a `traceparent` naming its component call's span (read back from
  the headers argument the real tritonclient call received).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request
from concurrent import futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.client import Conversation, read_wav_16k, run_turn
from vitaserve.components.triton import TritonComponents
from vitaserve.stack import LocalStack, OrchestratorProcess, free_port
from vitaserve_orchestrator.server import create_server
from vitaserve_orchestrator.settings import OrchestratorSettings
from vitaserve_orchestrator.telemetry import Telemetry, setup_tracing

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

EXAMPLES = Path(__file__).parents[2] / "examples" / "media"
SPEECH = Path(__file__).parents[1] / "orchestrator" / "data" / "speech_question.wav"  # 2.87 s of speech
SETTINGS = pb.SessionSettings(turn_detection="manual", want_audio=True, max_reply_tokens=12, temperature=0.8,
                              seed=5, playout_lead_ms=3_600_000)  # unpaced: nobody plays the audio


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver (what a collector's otlp receiver does): keeps every exported span."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []  # (service.name, opentelemetry.proto Span)
        self._lock = threading.Lock()

    def Export(self, request, context):  # noqa: ANN001, ANN201, N802 - the gRPC method
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, name: str) -> list[object]:
        with self._lock:
            return [span for _, span in self.spans if span.name == name]


@pytest.fixture(scope="module")
def otlp() -> Iterator[tuple[OtlpReceiver, int]]:
    receiver = OtlpReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver, port
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def metrics_orchestrator(stack: LocalStack, otlp: tuple[OtlpReceiver, int],
                         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(gRPC address, metrics URL) of an orchestrator process with the metrics endpoint on, exporting its
    spans to the `otlp` receiver."""
    port = free_port()
    env = {"VITASERVE_BACKEND": "triton", "VITASERVE_TRITON_URL": stack.triton_url,
           "VITASERVE_METRICS_ADDRESS": f"127.0.0.1:{port}",
           "VITASERVE_OTLP_ENDPOINT": f"127.0.0.1:{otlp[1]}",
           "OTEL_BSP_SCHEDULE_DELAY": "200"}  # the SDK's batch processor exports every 200 ms
    proc = OrchestratorProcess(env, log_path=tmp_path_factory.mktemp("metrics") / "orchestrator.log").start()
    try:
        yield proc.address, f"http://127.0.0.1:{port}/metrics"
    finally:
        proc.stop()


def scrape(url: str) -> dict[str, float]:
    """`name{labels}` -> value of every sample of the exposition."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def test_metrics_endpoint_moves_after_a_real_turn(metrics_orchestrator: tuple[str, str]) -> None:
    address, url = metrics_orchestrator
    before = scrape(url)
    assert before["vitaserve_active_sessions"] == 0.0
    for component in ("vision_encoder", "audio_encoder", "llm_decoder", "speech_synth"):
        assert before[f'vitaserve_component_ready_endpoints{{component="{component}"}}'] == 1.0

    async def scenario() -> float:
        async with Conversation.open(address, settings=SETTINGS) as conv:
            _reply, _audio, _rate, events = await run_turn(conv, image=None, pcm16=None, text="Hello there.",
                                                           echo=False)
            assert events[-1].WhichOneof("event") == "response_done", events[-1]
            during = scrape(url)["vitaserve_active_sessions"]
        return during

    assert run(scenario()) == 1.0
    after = scrape(url)
    for name in ("vitaserve_time_to_first_token_seconds", "vitaserve_time_to_first_audio_seconds"):
        assert after[f"{name}_count"] == before[f"{name}_count"] + 1, name
        assert after[f'{name}_bucket{{le="+Inf"}}'] == before[f'{name}_bucket{{le="+Inf"}}'] + 1
        assert after[f"{name}_sum"] > before[f"{name}_sum"]
    done = 'vitaserve_turn_duration_seconds_count{outcome="done"}'
    assert after[done] == before.get(done, 0.0) + 1
    moved = [k for k in after if k.startswith("vitaserve_turn_duration_seconds_bucket{")
             and 'outcome="done"' in k and after[k] > before.get(k, 0.0)]
    assert moved, "no bucket of the turn duration moved"
    assert after["vitaserve_active_sessions"] == 0.0  # the stream is closed
    assert after['vitaserve_queue_depth{queue="outbox"}'] == 0.0
    assert not [k for k in after if k.startswith("vitaserve_component_errors_total{")]


def test_a_real_barge_in_records_its_stop_latency(metrics_orchestrator: tuple[str, str]) -> None:
    address, url = metrics_orchestrator
    before = scrape(url)
    policy = pb.BargeInSettings(enabled=True, min_speech_ms=500, in_flight="pause", resume_silence_ms=300)
    vad = pb.SessionSettings(turn_detection="vad", want_audio=True, max_reply_tokens=24, temperature=0.8,
                             seed=11, barge_in=policy)  # paced at the default 300 ms lead: the reply plays for seconds
    question = read_wav_16k(SPEECH)

    async def scenario() -> list[str]:
        async with Conversation.open(address, settings=vad) as conv:
            seen: list[pb.ServerEvent] = []
            changed = asyncio.Event()

            async def read() -> None:
                async for event in conv.events():
                    seen.append(event)
                    changed.set()

            async def first(predicate) -> pb.ServerEvent:  # noqa: ANN001
                async with asyncio.timeout(40):
                    while True:
                        if found := [e for e in seen if predicate(e)]:
                            return found[0]
                        changed.clear()
                        await changed.wait()

            reader = asyncio.get_running_loop().create_task(read())
            await conv.send_audio(b"\0\0" * 16 * 200, chunk_ms=20)  # the server loads this stream's VAD
            await conv.send_text("Tell me a long story.")
            rid = (await first(lambda e: e.WhichOneof("event") == "audio")).response_id
            mic = asyncio.get_running_loop().create_task(
                conv.send_audio(question + b"\0\0" * 16 * 1000, chunk_ms=20, realtime=True))
            intr = await first(lambda e: e.WhichOneof("event") == "interrupted" and e.response_id == rid)
            turn2 = await first(lambda e: e.WhichOneof("event") == "turn_started" and e.response_id != rid)
            await mic
            await conv.interrupt()  # the utterance's own turn: not played to its end
            await first(lambda e: e.WhichOneof("event") in ("interrupted", "response_done", "error")
                        and e.response_id == turn2.response_id)
            await conv.end_input()
            await asyncio.wait_for(reader, 20)
            return [intr.interrupted.reason]

    assert run(scenario()) == ["barge_in"]
    after = scrape(url)
    count = "vitaserve_barge_in_stop_seconds_count"
    assert after[count] == before[count] + 1
    stop_s = after["vitaserve_barge_in_stop_seconds_sum"] - before["vitaserve_barge_in_stop_seconds_sum"]
    print(f"barge-in stop latency (server side, under contention): {stop_s * 1000:.1f} ms")
    assert 0.0 < stop_s < 2.0
    interrupted = 'vitaserve_turn_duration_seconds_count{outcome="interrupted"}'
    assert after[interrupted] >= before.get(interrupted, 0.0) + 1


def test_spans_are_exported_over_otlp_and_continue_the_clients_trace(
    metrics_orchestrator: tuple[str, str], otlp: tuple[OtlpReceiver, int]
) -> None:
    address, _ = metrics_orchestrator
    receiver, _ = otlp
    client_trace, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"

    async def scenario() -> None:
        metadata = (("traceparent", f"00-{client_trace}-{client_span}-01"),)
        async with Conversation.open(address, settings=SETTINGS, metadata=metadata) as conv:
            *_, events = await run_turn(conv, image=None, pcm16=None, text="Hi.", echo=False)
            assert events[-1].WhichOneof("event") == "response_done"

    run(scenario())
    deadline = time.monotonic() + 20
    while True:  # the session span ends with the stream; the batch processor exports within ~200 ms
        sessions = [s for s in receiver.named("session") if s.trace_id.hex() == client_trace]
        if sessions or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    (session,) = sessions
    assert session.parent_span_id.hex() == client_span  # continues the client's trace
    turns = [t for t in receiver.named("turn") if [link.span_id for link in t.links] == [session.span_id]]
    (turn,) = turns
    assert turn.trace_id != session.trace_id and not turn.parent_span_id
    children = {s.name for _, s in receiver.spans
                if s.trace_id == turn.trace_id and s.parent_span_id == turn.span_id}
    assert {"llm_decoder.generate", "speech_synth.synthesize"} <= children, children
    assert {service for service, _ in receiver.spans} == {"vitaserve-orchestrator"}


class _HeaderSpy:
    """The real tritonclient aio client, recording the `headers` each inference call is given."""

    def __init__(self, client: Any, seen: list[tuple[str, dict[str, str] | None]]) -> None:
        self._client = client
        self._seen = seen

    def infer(self, model_name: str, *args: Any, headers: dict[str, str] | None = None, **kw: Any) -> Any:
        self._seen.append((model_name, headers))
        return self._client.infer(model_name, *args, headers=headers, **kw)

    def stream_infer(self, requests: Any, *args: Any, headers: dict[str, str] | None = None,
                     **kw: Any) -> Any:
        self._seen.append(("stream", headers))
        return self._client.stream_infer(requests, *args, headers=headers, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class _SpiedTriton(TritonComponents):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.seen: list[tuple[str, dict[str, str] | None]] = []

    def _client(self, url: str) -> Any:
        return _HeaderSpy(super()._client(url), self.seen)


def test_one_trace_per_turn_spans_every_component_call_and_reaches_triton(stack: LocalStack) -> None:
    exporter = InMemorySpanExporter()
    provider = setup_tracing(otlp_endpoint=None, exporter=exporter, service_name="orch-e2e")
    assert provider is not None
    components = _SpiedTriton(stack.triton_url)
    config = OrchestratorSettings.model_validate({"triton_url": stack.triton_url,
                                                  "listen_address": "127.0.0.1:0"})

    async def scenario() -> str:
        telemetry = Telemetry(provider=provider)
        server, port = create_server(config, components, "127.0.0.1:0", telemetry=telemetry)
        await server.start()
        try:
            async with Conversation.open(f"127.0.0.1:{port}", settings=SETTINGS) as conv:
                _reply, _audio, _rate, events = await run_turn(
                    conv, image=(EXAMPLES / "camera.png").read_bytes(),
                    pcm16=read_wav_16k(EXAMPLES / "question.wav"), text=None, echo=False)
                assert events[-1].WhichOneof("event") == "response_done", events[-1]
                return events[-1].response_id
        finally:
            await server.stop(1.0)
            await components.close()

    response_id = run(scenario())
    provider.force_flush()
    spans = exporter.get_finished_spans()
    (turn,) = [s for s in spans if s.name == "turn"]
    (session,) = [s for s in spans if s.name == "session"]
    assert turn.attributes["vitaserve.response_id"] == response_id
    assert turn.parent is None and turn.context.trace_id != session.context.trace_id  # a trace per turn
    assert [link.context.span_id for link in turn.links] == [session.context.span_id]
    assert session.attributes["vitaserve.session_id"] == turn.attributes["vitaserve.session_id"]
    in_turn = [s for s in spans if s.context.trace_id == turn.context.trace_id and s is not turn]
    names = sorted(s.name for s in in_turn)
    assert {"vision_encoder.encode", "audio_encoder.encode", "llm_decoder.generate",
            "speech_synth.synthesize"} <= set(names), names
    assert all(s.parent is not None and s.parent.span_id == turn.context.span_id for s in in_turn), names
    assert all(s.resource.attributes["service.name"] == "orch-e2e" for s in spans)
    (generate,) = [s for s in in_turn if s.name == "llm_decoder.generate"]
    assert generate.attributes["vitaserve.tokens"] >= 1
    # every Triton request carried the traceparent of its component call's span, in the turn's trace
    by_span = {s.context.span_id: s.name for s in in_turn}
    # the KV warm-up after the turn (if it started before the server stopped) is the session's, not the turn's
    warm_ups = {s.context.span_id for s in spans if s.name == "llm_decoder.warm_prefix"}
    assert all(s.parent.span_id == session.context.span_id for s in spans if s.name == "llm_decoder.warm_prefix")
    assert len(components.seen) >= 4
    traced = []
    for _call, headers in components.seen:
        traceparent = (headers or {}).get("traceparent", "")
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", traceparent), headers
        _, trace_id, parent_id, _ = traceparent.split("-")
        if int(parent_id, 16) in warm_ups:
            assert int(trace_id, 16) == session.context.trace_id
            continue
        assert int(trace_id, 16) == turn.context.trace_id
        traced.append(by_span[int(parent_id, 16)])
    assert {"vision_encoder.encode", "audio_encoder.encode", "llm_decoder.generate",
            "speech_synth.synthesize"} <= set(traced)
    provider.shutdown()


def test_errors_of_real_triton_calls_are_counted_by_component_and_code(stack: LocalStack) -> None:
    from vitaserve.components.base import ImageInput
    from vitaserve.errors import InvalidInput, Unavailable
    from vitaserve_orchestrator.instrumented import InstrumentedComponents

    telemetry = Telemetry()

    async def scenario() -> None:
        real = InstrumentedComponents(TritonComponents(stack.triton_url), telemetry)
        nowhere = InstrumentedComponents(TritonComponents(f"127.0.0.1:{free_port()}", timeout_s=2), telemetry)
        try:
            with pytest.raises(InvalidInput):  # the model refuses bytes that are no image
                await real.encode_images([ImageInput(b"these bytes are not an image")])
            with pytest.raises(Unavailable):  # nothing listens there
                await nowhere.encode_audio(np.zeros(3200, np.float32))
        finally:
            await real.close()
            await nowhere.close()

    run(scenario())
    text = telemetry.metrics.exposition().decode()
    assert 'vitaserve_component_errors_total{code="INVALID_ARGUMENT",component="vision_encoder"} 1.0' in text
    assert 'vitaserve_component_errors_total{code="UNAVAILABLE",component="audio_encoder"} 1.0' in text
