"""The orchestrator's gRPC server: Converse, `grpc.health.v1` with real readiness, graceful shutdown.

`create_server(settings, components, address)` builds the server and binds it (port 0 = a free port, as
tests do) and returns `(server, port)`; `await server.start()` starts serving. Health (service "" and
"vitaserve.v1.Orchestrator") is NOT_SERVING until `components.health()` reports every component ready,
follows it afterwards (probed every `health_poll_s`), and is NOT_SERVING for good once draining starts.
Service "liveness" is SERVING from start until draining, whatever the components' state: a liveness
probe on it restarts a stuck process, never one that merely waits for Triton (Kubernetes probes, see
helm/vitaserve).
`stop(grace)`: NOT_SERVING first (load balancers stop routing new streams), then `grpc.aio.Server.stop`,
which gives running streams `grace` seconds before cancelling them. `serve()` runs it until SIGTERM.

The session store follows the settings (`build_store`: in memory, or Redis); readiness also requires the
store to answer (NOT_SERVING while Redis is unreachable), and the server closes a store it built when it
stops. With `tls_cert_file`/`tls_key_file` the port serves TLS only (`server_credentials`), and with
`tls_client_ca_file` clients must present a certificate that CA signed (mTLS).

Telemetry (telemetry.py): `create_server(..., telemetry=)` records into that `Telemetry` (default: a
registry of its own) and serves the components through `InstrumentedComponents` (a span per call, errors
counted). `serve()` installs the OTLP tracer provider when `VITASERVE_OTLP_ENDPOINT` is set (else tracing
stays the no-op) and serves `/metrics` on `VITASERVE_METRICS_ADDRESS` when set. A started server keeps
`vitaserve_asyncio_tasks` up to date from its own loop (a tracked task, stopped with the server).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from vitaserve.api.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from vitaserve.components.base import ComponentClient
from vitaserve.errors import Unavailable
from vitaserve_orchestrator.auth import Authenticator
from vitaserve_orchestrator.instrumented import InstrumentedComponents
from vitaserve_orchestrator.servicer import OrchestratorServicer
from vitaserve_orchestrator.session import InMemorySessionStore, SessionStore
from vitaserve_orchestrator.settings import OrchestratorSettings
from vitaserve_orchestrator.tasks import TaskSet
from vitaserve_orchestrator.telemetry import Telemetry, setup_tracing, start_metrics_server
from vitaserve_orchestrator.vad import SileroVad, VadModel

log = logging.getLogger(__name__)

SERVICE_NAME = orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name
HEALTH_SERVICES = ("", SERVICE_NAME)
LIVENESS_SERVICE = "liveness"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class OrchestratorServer:
    """A bound, not yet started orchestrator gRPC server (see the module docstring)."""

    def __init__(
        self,
        *,
        server: grpc.aio.Server,
        port: int,
        servicer: OrchestratorServicer,
        health: health_aio.HealthServicer,
        components: ComponentClient,
        config: OrchestratorSettings,
        store: SessionStore | None = None,
        owns_store: bool = False,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.telemetry = telemetry or Telemetry.off()
        self.store = store
        self._owns_store = owns_store
        self.grpc_server = server
        self.port = port
        self.servicer = servicer
        self.health = health
        self.components = components
        self.config = config
        self.ready = False
        self.draining = False
        self._tasks = TaskSet("orchestrator-server")

    async def start(self) -> None:
        for service in HEALTH_SERVICES:
            await self.health.set(service, _NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, _SERVING)
        await self.grpc_server.start()
        self._tasks.spawn(self._watch_readiness(), "readiness")
        # vitaserve_asyncio_tasks: a leak of tasks shows as a count that does not return to idle
        self._tasks.spawn(self.telemetry.metrics.sample_asyncio_tasks(lambda: not self.draining),
                          "asyncio-tasks")
        log.info("orchestrator listening on port %d", self.port)

    async def check_readiness(self) -> bool:
        """Probe the components once and publish the result (never raises)."""
        try:
            async with asyncio.timeout(max(self.config.health_poll_s, 1.0) * 2):
                ready = (await self.components.health()).all_ready
        except Exception as exc:  # noqa: BLE001 - an unhealthy backend is a state, not an error here
            log.warning("component health check failed: %r", exc)
            ready = False
        if ready and self.store is not None:
            try:
                await self.store.check()
            except Exception as exc:  # noqa: BLE001 - as above
                if self.ready:
                    log.warning("session store check failed: %s", exc)
                ready = False
        if ready != self.ready:
            log.info("components %s", "ready: SERVING" if ready else "not ready: NOT_SERVING")
        self.ready = ready
        if not self.draining:
            for service in HEALTH_SERVICES:
                await self.health.set(service, _SERVING if ready else _NOT_SERVING)
        return ready

    async def _watch_readiness(self) -> None:
        while not self.draining:
            await self.check_readiness()
            await asyncio.sleep(self.config.health_poll_s)

    async def drain(self) -> None:
        """NOT_SERVING from now on, for every health service."""
        self.draining = True
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float | None = None) -> None:
        """Drain, then stop serving; running streams get `grace` seconds (default: the settings')."""
        await self.drain()
        await self._tasks.cancel_all(self.config.cancel_timeout_s)
        await self.grpc_server.stop(self.config.shutdown_grace_s if grace is None else grace)
        if self._owns_store and self.store is not None:
            await self.store.close()

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def build_store(settings: OrchestratorSettings) -> SessionStore:
    """The session store the settings ask for (Redis is imported only when chosen)."""
    if settings.session_store == "redis":
        from vitaserve_orchestrator.redis_store import RedisSessionStore

        return RedisSessionStore.from_settings(settings)
    return InMemorySessionStore.from_settings(settings)


def server_credentials(settings: OrchestratorSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files, or None without TLS."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def create_server(
    settings: OrchestratorSettings,
    components: ComponentClient,
    address: str | None = None,
    *,
    store: SessionStore | None = None,
    auth: Authenticator | None = None,
    vad_factory: Callable[[], VadModel] = SileroVad,
    clock: Callable[[], float] = time.monotonic,
    telemetry: Telemetry | None = None,
) -> tuple[OrchestratorServer, int]:
    """Build the server bound to `address` (default `settings.listen_address`); returns it and the port
    actually bound. `store` and `auth` default to what the settings say (a store passed in stays the
    caller's to close); `telemetry` to a registry of this server's own. Call from the event loop that
    will run it."""
    telemetry = telemetry or Telemetry()
    if getattr(components, "router", None) is not None:
        telemetry.metrics.follow_router(components.router)  # type: ignore[attr-defined]
    options = [
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
    ]
    if settings.grpc_max_connection_age_s > 0:
        options += [("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age_s * 1000)),
                    ("grpc.max_connection_age_grace_ms", 2**31 - 1)]  # streams on an old connection go on
    server = grpc.aio.server(options=options)
    owns_store = store is None
    store = store or build_store(settings)
    servicer = OrchestratorServicer(
        config=settings,
        components=InstrumentedComponents(components, telemetry),
        store=store,
        auth=auth or Authenticator.from_settings(settings),
        vad_factory=vad_factory,
        clock=clock,
        telemetry=telemetry,
    )
    orchestrator_pb2_grpc.add_OrchestratorServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = address or settings.listen_address
    credentials = server_credentials(settings)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise Unavailable(f"cannot bind {address}: {exc}") from exc
    if port == 0:
        raise Unavailable(f"cannot bind {address}")
    return OrchestratorServer(
        server=server,
        port=port,
        servicer=servicer,
        health=health,
        components=components,
        config=settings,
        store=store,
        owns_store=owns_store,
        telemetry=telemetry,
    ), port


async def serve(
    settings: OrchestratorSettings | None = None, components: ComponentClient | None = None
) -> None:
    """Run the orchestrator until SIGTERM or SIGINT, then shut down gracefully."""
    from vitaserve_orchestrator.components import build_components

    from opentelemetry import trace

    settings = settings or OrchestratorSettings()
    provider = setup_tracing(otlp_endpoint=settings.otlp_endpoint, service_name=settings.otel_service_name,
                             sample_ratio=settings.trace_sample_ratio, insecure=settings.otlp_insecure)
    if provider is not None:
        trace.set_tracer_provider(provider)
    telemetry = Telemetry(provider=provider)
    if components is None:
        components = await asyncio.to_thread(build_components, settings)
    server, port = create_server(settings, components, telemetry=telemetry)
    metrics_server = None
    if settings.metrics_address:
        metrics_server, metrics_port = start_metrics_server(telemetry.metrics, settings.metrics_address)
        print(f"orchestrator metrics on {settings.metrics_address.rpartition(':')[0]}:{metrics_port}/metrics",
              flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        print(f"orchestrator serving on {settings.listen_address.rpartition(':')[0]}:{port}", flush=True)
        await stop.wait()
        log.info("shutting down: draining for up to %.1f s", settings.shutdown_grace_s)
        await server.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await components.close()
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        if provider is not None:
            provider.shutdown()  # flushes the spans still queued
