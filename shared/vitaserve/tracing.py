"""OpenTelemetry setup shared by the services (the orchestrator, the gateway): a `TracerProvider` that exports
over OTLP/gRPC when an endpoint is configured; without one, tracing stays the OpenTelemetry no-op."""

from __future__ import annotations

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased


def setup_tracing(
    *,
    otlp_endpoint: str | None,
    service_name: str = "vitaserve",
    sample_ratio: float = 1.0,
    insecure: bool = True,
    exporter: SpanExporter | None = None,
) -> TracerProvider | None:
    """A TracerProvider exporting to `otlp_endpoint` (or to `exporter`, e.g. an in-memory one in tests);
    None when neither is given: tracing stays off. The caller installs it (`trace.set_tracer_provider`)
    or passes it to `tracer()`. Sampling follows the parent's decision, else `sample_ratio`."""
    if exporter is None and not otlp_endpoint:
        return None
    if not 0.0 <= sample_ratio <= 1.0:
        raise ValueError(f"sample_ratio must be in [0, 1], got {sample_ratio}")
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}),
                              sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=insecure)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
