"""The gateway's configuration, read from `VITASERVE_GATEWAY_*` variables (one field, one variable: e.g.
`orchestrator_address` is `VITASERVE_GATEWAY_ORCHESTRATOR_ADDRESS`). The gateway is stateless: sessions,
barge-in, tenants and their keys live in the orchestrator, which the gateway reaches over gRPC."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VITASERVE_GATEWAY_", extra="ignore", frozen=True)

    # --- listener -------------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="Address the HTTP/WebSocket server binds.")
    port: int = Field(8080, ge=0, le=65535, description="Port of the HTTP/WebSocket server (0 = any free).")
    tls_cert_file: Path | None = Field(None, description="PEM certificate: serve HTTPS/WSS (with the key).")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    max_message_bytes: int = Field(
        8 * MiB, ge=64 * 1024,
        description="Largest WebSocket message accepted; a bigger one closes the socket with code 1009.",
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=4096,
        description="Largest HTTP request head (request line + headers, the WebSocket upgrade's too) still "
        "incomplete after a socket read (so at most this plus one read, <= 256 kB, is buffered); a bigger one is "
        "refused with 400 and the connection closed (uvicorn's h11 parser; httptools has no bound).",
    )
    ws_ping_interval_s: float = Field(20.0, gt=0, description="WebSocket keep-alive ping interval.")
    ws_ping_timeout_s: float = Field(20.0, gt=0, description="A ping unanswered this long closes the socket.")
    max_connections: int = Field(
        256, ge=1, description="Concurrent WebSocket sessions per replica; more are refused with HTTP 503."
    )

    # --- the orchestrator -----------------------------------------------------------------------
    orchestrator_address: str = Field(
        "127.0.0.1:50051",
        description="The Converse gRPC API: host:port, or dns:///name:port to balance over every address the "
        "name resolves to (a headless Kubernetes Service: the Helm chart's default).",
    )
    orchestrator_lb_policy: str = Field(
        "round_robin", description="gRPC load-balancing policy over the orchestrator's addresses: each new "
        "socket's stream goes to the next replica (round_robin) or all to the first (pick_first).",
    )
    orchestrator_tls_ca_file: Path | None = Field(
        None, description="PEM CA that signed the orchestrator's certificate: connect over TLS."
    )
    orchestrator_server_name: str | None = Field(
        None, description="TLS name to check on the orchestrator's certificate (default: its host)."
    )
    grpc_max_message_bytes: int = Field(16 * MiB, ge=64 * 1024, description="Largest gRPC message.")
    connect_timeout_s: float = Field(
        10.0, gt=0, description="How long a new WebSocket waits for the orchestrator's session before 503."
    )

    # --- protocol -------------------------------------------------------------------------------
    beta_event_names: bool = Field(
        False,
        description="Send the beta API's event names (response.audio.delta, ...) instead of the GA names, "
        "for every connection (one connection can ask with ?event_names=beta).",
    )
    playout_lead_ms: int | None = Field(
        None, ge=0,
        description="How far ahead of real time the orchestrator may send reply audio to Realtime "
        "clients (their playback buffer); unset = the orchestrator's default.",
    )
    static_dir: Path = Field(
        Path(__file__).resolve().parent / "static", description="The browser page's files, served at /."
    )
    log_level: str = Field("info", description="Python logging level.")

    # --- traces ---------------------------------------------------------------------------------
    otlp_endpoint: str | None = Field(
        None, description="OTLP/gRPC collector (host:port) for traces; unset = tracing off. Each socket is a "
        "`realtime.session` span (continuing a client's `traceparent` header) and the parent of the "
        "orchestrator's `session` span.",
    )
    otlp_insecure: bool = Field(True, description="Plain-text OTLP (no TLS) to the collector.")
    otel_service_name: str = Field("vitaserve-gateway", description="service.name of the gateway's spans.")
    trace_sample_ratio: float = Field(1.0, ge=0, le=1, description="Share of new traces sampled.")
