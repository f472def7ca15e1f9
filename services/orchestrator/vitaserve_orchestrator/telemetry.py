"""The orchestrator's metrics and traces: one Prometheus registry, the OpenTelemetry tracer setup, and the
trace context handed to Triton.

Metrics (`Metrics`, a registry of its own so tests and several servers in one process never collide):
    vitaserve_time_to_first_token_seconds     histogram  commit of a turn -> its first LLM token
    vitaserve_time_to_first_audio_seconds     histogram  commit of a turn -> its first audio chunk
    vitaserve_barge_in_stop_seconds           histogram  arrival of the user audio that met the barge-in
                                                         policy -> the response's output gate closed (no
                                                         audio of it is sent afterwards)
    vitaserve_turn_duration_seconds           histogram  {outcome}: commit -> the response's end was sent
                                                         (done, noise, error) or it was interrupted
    vitaserve_active_sessions                 gauge      Converse streams open
    vitaserve_component_errors_total          counter    {component, code}: failed component calls
                                                         (instrumented.py), and components that stayed
                                                         silent past the pipeline's limits (turn.py)
    vitaserve_queue_depth                     gauge      {queue}: items waiting ("outbox": events queued
                                                         for the clients of this process, all streams; the
                                                         batch worker reports its Celery queue by name)
    vitaserve_component_ready_endpoints       gauge      {component}: ready Triton endpoints the router sees
    vitaserve_asyncio_tasks                   gauge      live asyncio tasks on the server's event loop (its
                                                         own background tasks included), set every
                                                         ASYNCIO_TASKS_SAMPLE_S by `sample_asyncio_tasks`
`start_metrics_server(metrics, "host:port")` serves them over HTTP (`/metrics`) for Prometheus.

Traces: `setup_tracing(...)` (vitaserve.tracing, shared with the gateway) builds a `TracerProvider` exporting over OTLP/gRPC when an endpoint is
configured (`VITASERVE_OTLP_ENDPOINT`); without one tracing stays the OpenTelemetry no-op (off by default).
`triton_headers()` is the W3C `traceparent` of the current span, for the `headers=` of tritonclient calls, so
a Triton started with `--trace-config mode=opentelemetry` continues the same trace (TritonComponents sends
it on every call).

Spans: `session` (one Converse stream; it continues a client's `traceparent` metadata), and per turn a new
trace: `turn` (the response's pipeline task, linked to its session span) with a child span per component
call (`vision_encoder.encode`, `audio_encoder.encode`, `llm_decoder.generate`, `speech_synth.synthesize`
per text segment; instrumented.py). A turn is a trace of its own so that a long session does not become
one unbounded trace; the link and the `vitaserve.session_id` attribute lead from a turn to its session.
No span per token or audio chunk.

`Telemetry` bundles the registry and the tracer that one server records into; `Telemetry.off()` is the
process-wide default of code built without one (unit tests): its registry is never served.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from vitaserve.tracing import setup_tracing  # noqa: F401 - the orchestrator's tracing setup lives in shared

# Seconds. Real-time voice: first token/audio within ~100 ms-2 s; whole turns up to a minute.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
BARGE_IN_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)
TURN_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TRACER_NAME = "vitaserve.orchestrator"
# The task gauge is set from the loop itself: /metrics is served from another thread, and asyncio's task
# registry must not be read off its loop. Counting a few hundred tasks costs microseconds; once a second
# is enough to see a leak (a slope over minutes) and to see the count return to idle after load.
ASYNCIO_TASKS_SAMPLE_S = 1.0


class Metrics:
    """The orchestrator's Prometheus instruments (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            "vitaserve_time_to_first_token_seconds", "Commit of a turn to its first LLM token.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_audio = Histogram(
            "vitaserve_time_to_first_audio_seconds", "Commit of a turn to its first audio chunk.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.barge_in_stop = Histogram(
            "vitaserve_barge_in_stop_seconds",
            "Arrival of the user audio that met the barge-in policy to the response's output gate closing.",
            buckets=BARGE_IN_BUCKETS, registry=r)
        self.turn_duration = Histogram(
            "vitaserve_turn_duration_seconds",
            "Commit of a turn to its end (done, noise, interrupted, error).",
            ["outcome"], buckets=TURN_BUCKETS, registry=r)
        self.active_sessions = Gauge("vitaserve_active_sessions", "Converse streams open.", registry=r)
        self.component_errors = Counter(
            "vitaserve_component_errors_total", "Errors of component calls by gRPC code name.",
            ["component", "code"], registry=r)
        self.queue_depth = Gauge("vitaserve_queue_depth", "Items waiting in a queue.", ["queue"], registry=r)
        self.ready_endpoints = Gauge(
            "vitaserve_component_ready_endpoints", "Ready Triton endpoints of a component (routing).",
            ["component"], registry=r)
        self.asyncio_tasks = Gauge(
            "vitaserve_asyncio_tasks", "Live asyncio tasks on the server's event loop.", registry=r)

    async def sample_asyncio_tasks(self, keep_going: Callable[[], bool],
                                   interval_s: float = ASYNCIO_TASKS_SAMPLE_S) -> None:
        """Set `vitaserve_asyncio_tasks` to the running loop's live task count (this one included) every
        `interval_s` while `keep_going()`; run it as a tracked task of the server (server.py)."""
        while keep_going():
            self.asyncio_tasks.set(len(asyncio.all_tasks()))
            await asyncio.sleep(interval_s)

    def follow_router(self, router: Any) -> None:
        """Report `router`'s ready endpoints per component at every scrape (a `vitaserve.cluster` Router)."""
        for component in router.components:
            self.ready_endpoints.labels(component).set_function(_counter(router, component))

    def exposition(self) -> bytes:
        """The text exposition format (what /metrics serves)."""
        return generate_latest(self.registry)


class Telemetry:
    """What one orchestrator server records into: `metrics`, and `tracer` (from `provider`, else the
    global tracer provider: the OpenTelemetry no-op unless one was installed)."""

    _off: Telemetry | None = None

    def __init__(self, metrics: Metrics | None = None, provider: TracerProvider | None = None) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self.provider = provider
        self.tracer = tracer(provider)

    @classmethod
    def off(cls) -> Telemetry:
        """The shared default of objects built without telemetry: nothing serves or exports it."""
        if cls._off is None:
            cls._off = cls()
        return cls._off


def _counter(router: Any, component: str) -> Callable[[], float]:
    return lambda: float(len(router.endpoints(component)))


def start_metrics_server(metrics: Metrics, address: str) -> tuple[Any, int]:
    """Serve `metrics` on `host:port` (port 0 = a free one) in a daemon thread; returns (server, port).
    Stop with `server.shutdown(); server.server_close()`."""
    from prometheus_client import start_http_server

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address must be host:port, got {address!r}")
    server, _thread = start_http_server(int(port), addr=host or "0.0.0.0", registry=metrics.registry)
    return server, server.server_address[1]


def tracer(provider: TracerProvider | None = None) -> trace.Tracer:
    """The orchestrator's tracer: from `provider`, else the global one (a no-op unless installed)."""
    return (provider or trace.get_tracer_provider()).get_tracer(TRACER_NAME)


def triton_headers() -> dict[str, str]:
    """W3C trace context of the current span (`traceparent`, `tracestate`) for a Triton request's
    headers; empty when no span is recording."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier
