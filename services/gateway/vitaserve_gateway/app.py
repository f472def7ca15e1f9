"""The gateway's ASGI app (Starlette on uvicorn): the Realtime WebSocket, the browser page, probes, metrics.

Routes:
  WS  /v1/realtime?model=M   the OpenAI Realtime (GA) protocol, one orchestrator session per socket
  GET /                      the browser page (static/, no build step)
  GET /healthz               liveness: the process serves HTTP
  GET /readyz                readiness: the orchestrator answers its gRPC health check with SERVING
  GET /metrics               Prometheus

Auth: the key travels to the orchestrator, which owns tenants and keys (`authorization: Bearer KEY` in the
Converse call's metadata). The gateway takes it from the `Authorization: Bearer KEY` header (the SDKs) or,
for browsers, which cannot set headers on a WebSocket, from the subprotocol `openai-insecure-api-key.KEY`
(what OpenAI's own browser clients send). The socket is accepted only once the orchestrator has started the
session, so a refused key is an HTTP 401 on the upgrade (429 over the tenant's stream limit, 503 when the
orchestrator is unavailable), with a JSON body naming the error. Keys are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from vitaserve.api.v1 import orchestrator_pb2_grpc as pb_grpc
from vitaserve.tracing import setup_tracing
from vitaserve_gateway.protocol import ProtocolError, dumps, parse_client_event
from vitaserve_gateway.session import RealtimeSession, error_type
from vitaserve_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

KEY_SUBPROTOCOL = "openai-insecure-api-key."
# A refused session, as the status of the WebSocket upgrade.
HTTP_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 503,
}
# The orchestrator ended an accepted session: WebSocket close codes (RFC 6455 / IANA registry).
CLOSE_CODE = {"OK": 1000, "UNAUTHENTICATED": 1008, "PERMISSION_DENIED": 1008, "RESOURCE_EXHAUSTED": 1013,
              "UNAVAILABLE": 1013, "ABORTED": 1012, "INVALID_ARGUMENT": 1008}


FORWARD_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions = Gauge("vitaserve_gateway_sessions", "Open Realtime WebSockets.",
                              registry=self.registry)
        self.opened = Counter("vitaserve_gateway_sessions_opened", "Realtime sessions by outcome of the upgrade.",
                              ["status"], registry=self.registry)
        self.client_events = Counter("vitaserve_gateway_client_events", "Client events received, by type.",
                                     ["type"], registry=self.registry)
        self.errors = Counter("vitaserve_gateway_errors", "error events sent, by code.", ["code"],
                              registry=self.registry)
        self.forward = Histogram(
            "vitaserve_gateway_forward_seconds",
            "From an orchestrator event's arrival to its Realtime events written to the socket, by the "
            "orchestrator event (first_audio: a reply's first audio, what the gateway adds to its time to "
            "first audio).", ["event"], buckets=FORWARD_BUCKETS, registry=self.registry)


def bearer_key(websocket: WebSocket) -> tuple[str | None, str | None]:
    """(API key, the subprotocol to accept). The Authorization header wins over a key subprotocol."""
    offered = list(websocket.scope.get("subprotocols") or [])
    key = None
    header = websocket.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        key = header[7:].strip() or None
    for protocol in offered:
        if protocol.startswith(KEY_SUBPROTOCOL) and key is None:
            key = protocol[len(KEY_SUBPROTOCOL):] or None
    # A browser fails the handshake unless the server picks one of the subprotocols it offered.
    chosen = "realtime" if "realtime" in offered else (offered[0] if offered else None)
    return key, chosen


def create_app(settings: GatewaySettings | None = None, *,
               tracer_provider: TracerProvider | None = None) -> Starlette:
    """The app; `tracer_provider` overrides the one `settings` configure (tests pass an in-memory one)."""
    settings = settings or GatewaySettings()
    metrics = Metrics()
    provider = tracer_provider or setup_tracing(
        otlp_endpoint=settings.otlp_endpoint, service_name=settings.otel_service_name,
        sample_ratio=settings.trace_sample_ratio, insecure=settings.otlp_insecure)
    tracer = (provider or trace.get_tracer_provider()).get_tracer("vitaserve.gateway")
    state: dict[str, Any] = {"active": 0}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        options = [("grpc.max_send_message_length", settings.grpc_max_message_bytes),
                   ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
                   ("grpc.lb_policy_name", settings.orchestrator_lb_policy)]
        if settings.orchestrator_tls_ca_file is not None:
            credentials = grpc.ssl_channel_credentials(settings.orchestrator_tls_ca_file.read_bytes())
            if settings.orchestrator_server_name:
                options.append(("grpc.ssl_target_name_override", settings.orchestrator_server_name))
            channel = grpc.aio.secure_channel(settings.orchestrator_address, credentials, options=options)
        else:
            channel = grpc.aio.insecure_channel(settings.orchestrator_address, options=options)
        state["stub"] = pb_grpc.OrchestratorStub(channel)
        state["health"] = health_pb2_grpc.HealthStub(channel)
        try:
            yield
        finally:
            await channel.close(grace=1.0)
            if provider is not None and tracer_provider is None:
                provider.shutdown()  # flush the spans still batched

    async def realtime(websocket: WebSocket) -> None:
        if state["active"] >= settings.max_connections:
            metrics.opened.labels("503").inc()
            await websocket.send_denial_response(_error_response(
                503, "server_error", "too_many_sessions",
                f"this gateway replica serves at most {settings.max_connections} sessions: retry"))
            return
        with tracer.start_as_current_span("realtime.session", kind=trace.SpanKind.SERVER,
                                          context=propagate.extract(dict(websocket.headers))) as span:
            await serve_realtime(websocket, span)

    async def serve_realtime(websocket: WebSocket, span: trace.Span) -> None:
        key, subprotocol = bearer_key(websocket)
        metadata: dict[str, str] = {}
        propagate.inject(metadata)  # the orchestrator's session span continues this one
        if key:
            metadata["authorization"] = f"Bearer {key}"
        beta = settings.beta_event_names or websocket.query_params.get("event_names") == "beta"
        closed = asyncio.Event()

        async def send(event: dict[str, Any]) -> None:
            if closed.is_set():
                return
            if event["type"] == "error":
                metrics.errors.labels(str(event["error"].get("code"))).inc()
            try:
                await websocket.send_text(dumps(event))
            except (WebSocketDisconnect, RuntimeError, OSError):
                closed.set()  # the client is gone: the reader sees the disconnect

        session = RealtimeSession(
            stub=state["stub"], metadata=tuple(metadata.items()), send=send,
            model=websocket.query_params.get("model", ""), beta_names=beta,
            playout_lead_ms=settings.playout_lead_ms, connect_timeout_s=settings.connect_timeout_s,
            on_forwarded=lambda kind, seconds: metrics.forward.labels(kind).observe(seconds),
        )
        try:
            await session.open()
        except grpc.aio.AioRpcError as exc:
            session.cancel()
            status = HTTP_STATUS.get(exc.code(), 502)
            metrics.opened.labels(str(status)).inc()
            span.set_attribute("http.response.status_code", status)
            await websocket.send_denial_response(_error_response(
                status, error_type(exc.code().name), exc.code().name.lower(), exc.details() or exc.code().name))
            return
        except (TimeoutError, RuntimeError) as exc:
            session.cancel()
            metrics.opened.labels("503").inc()
            await websocket.send_denial_response(_error_response(
                503, "server_error", "unavailable", f"the orchestrator did not start a session: {exc}"))
            return
        metrics.opened.labels("101").inc()
        span.set_attribute("vitaserve.session_id", session.session_id)
        span.set_attribute("vitaserve.model", session.model)
        state["active"] += 1
        metrics.sessions.inc()
        started = time.monotonic()
        pump = asyncio.create_task(session.pump_upstream(), name=f"gateway-upstream:{session.session_id}")
        reader = asyncio.create_task(_read_client(websocket, session, metrics),
                                     name=f"gateway-client:{session.session_id}")
        try:
            await websocket.accept(subprotocol=subprotocol)
            await session.announce()
            await asyncio.wait({pump, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():  # the client left (or sent a close): end the orchestrator session
                session.end_upstream()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(pump), 2.0)
            else:  # the orchestrator ended the stream: tell the client how, then close
                code, details = session.closed_status or ("UNKNOWN", "")
                closed.set()
                if websocket.client_state == WebSocketState.CONNECTED:
                    with contextlib.suppress(Exception):
                        await websocket.close(CLOSE_CODE.get(code, 1011), reason=f"{code}: {details}"[:120])
        finally:
            for task in (reader, pump):
                task.cancel()
            session.cancel()
            try:  # the handler itself may be cancelled here (server shutdown): the bookkeeping runs anyway
                for outcome in await asyncio.gather(reader, pump, return_exceptions=True):
                    if isinstance(outcome, Exception):
                        log.error("session %s failed", session.session_id, exc_info=outcome)
            finally:
                state["active"] -= 1
                metrics.sessions.dec()
                upstream = (session.closed_status or ("-",))[0]
                span.set_attribute("vitaserve.upstream_status", upstream)
                log.info("session %s closed after %.1f s (upstream %s)", session.session_id,
                         time.monotonic() - started, upstream)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        try:
            reply = await state["health"].Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
        except grpc.aio.AioRpcError as exc:
            return PlainTextResponse(f"orchestrator: {exc.code().name}", status_code=503)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            return PlainTextResponse("orchestrator: not serving", status_code=503)
        return PlainTextResponse("ready")

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def index(request: Request) -> Response:
        return FileResponse(settings.static_dir / "index.html")

    routes = [
        WebSocketRoute("/v1/realtime", realtime),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        Route("/", index),
        Mount("/static", StaticFiles(directory=settings.static_dir, check_dir=False), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    return app


async def _read_client(websocket: WebSocket, session: RealtimeSession, metrics: Metrics) -> None:
    """Client messages -> the session, one at a time, in order, until the client disconnects."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        raw = message.get("text")
        if raw is None:
            raw = message.get("bytes") or b""
        try:
            parsed = parse_client_event(raw)
        except ProtocolError as exc:
            metrics.client_events.labels("invalid").inc()
            await session.report(exc)
            continue
        metrics.client_events.labels(parsed.type).inc()
        await session.on_client_event(parsed.type, parsed.model, parsed.event_id)


def _error_response(status: int, type: str, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": type, "code": code, "message": message}}, status_code=status)
