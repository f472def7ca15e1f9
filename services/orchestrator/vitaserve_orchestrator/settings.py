"""The orchestrator's configuration: one pydantic-settings object, read from `VITASERVE_*` variables.

This module is the one place that lists the orchestrator's environment variables: every field of
`OrchestratorSettings` is read from `VITASERVE_<FIELD NAME IN UPPER CASE>` (e.g. `VITASERVE_TRITON_URL`).
Construction fails fast (pydantic `ValidationError`) when an address the chosen backend needs is missing,
so a misconfigured pod dies at start instead of failing the first user turn.

Backends:
- `triton`: `VITASERVE_TRITON_URL` serves all four components, or each component has its own URL
  (`VITASERVE_VISION_ENCODER_URL`, ...), which overrides the common one;
- `inprocess`: the models run in this process from `VITASERVE_CHECKPOINT_DIR` (tests, single host).

Sessions (`VITASERVE_SESSION_STORE`): `memory` (this process only: the embedded default) or `redis`
(shared by every replica; needs `VITASERVE_REDIS_URL`). Auth is on when `VITASERVE_API_KEYS_FILE` names a
keys file (auth.py); TLS when `VITASERVE_TLS_CERT_FILE` and `VITASERVE_TLS_KEY_FILE` are set.

Discovery of the Triton servers (backend=triton): `static` = the URLs above, each may list several
`host:port,host:port`; `kubernetes` = the ready pods of one Service per component, from its EndpointSlices
(`VITASERVE_TRITON_SERVICE` or `VITASERVE_<COMPONENT>_SERVICE`, in `VITASERVE_KUBERNETES_NAMESPACE`).
Either way a session's LLM calls stay on one server (consistent hashing), other calls go round-robin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vitaserve.cluster.discovery import parse_endpoints
from vitaserve.components.base import COMPONENTS
from vitaserve.families import DEFAULT_FAMILY, FAMILIES, get_family

ENV_PREFIX = "VITASERVE_"
MiB = 1024 * 1024


class OrchestratorSettings(BaseSettings):
    """Everything an orchestrator replica needs to know. Defaults follow the reference real-time server
    (`tests/golden/vita15_prompt_format.json`) where it has one."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # --- transport ------------------------------------------------------------------------------
    listen_address: str = Field(
        "0.0.0.0:50051", description="host:port the Converse gRPC server binds (port 0 = any free port)."
    )
    grpc_max_message_bytes: int = Field(
        16 * MiB, ge=64 * 1024, description="Largest gRPC message accepted or sent (both directions)."
    )
    grpc_max_connection_age_s: float = Field(
        300.0, ge=0,
        description="A client connection older than this is asked to reconnect (GOAWAY) for its next calls, "
        "so clients balancing over the replicas (the gateway: round_robin over a headless Service) see new "
        "replicas; open Converse streams are never cut by it. 0 = connections live forever.",
    )

    # --- component backend --------------------------------------------------------------------------
    model_family: str = Field(
        DEFAULT_FAMILY,
        description="The model family the components serve (vitaserve.families: " + ", ".join(FAMILIES)
        + "): how turns become prompts, history and speech segments. The Triton models read the same "
        "VITASERVE_MODEL_FAMILY (or their `family` parameter); the two must agree.",
    )
    backend: Literal["triton", "inprocess"] = Field(
        "triton", description="Where the four models run: a Triton deployment, or in this process."
    )
    triton_url: str | None = Field(
        None, description="host:port of the Triton gRPC endpoint serving every component (backend=triton)."
    )
    vision_encoder_url: str | None = Field(
        None, description="Triton URL of vision_encoder (overrides triton_url)."
    )
    audio_encoder_url: str | None = Field(
        None, description="Triton URL of audio_encoder (overrides triton_url)."
    )
    llm_decoder_url: str | None = Field(None, description="Triton URL of llm_decoder (overrides triton_url).")
    speech_synth_url: str | None = Field(
        None, description="Triton URL of speech_synth (overrides triton_url)."
    )
    checkpoint_dir: Path | None = Field(
        None, description="Checkpoint directory in the released layout (backend=inprocess; the small family "
        "needs none)."
    )

    # --- per-event input limits -----------------------------------------------------------------------
    max_image_bytes: int = Field(8 * MiB, ge=1, description="Largest encoded image or video frame accepted.")
    max_image_pixels: int = Field(
        25_000_000, ge=1, description="Largest decoded image (width x height), checked from the header."
    )
    max_image_tiles: int = Field(12, ge=1, le=12, description="Largest Image.max_tiles a client may ask for.")
    max_pending_images: int = Field(8, ge=1, description="Images that may wait for one turn.")
    max_audio_chunk_bytes: int = Field(
        320_000, ge=2, description="Largest AudioChunk payload (320 000 bytes = 10 s of 16 kHz int16)."
    )
    max_turn_audio_s: float = Field(
        60.0, gt=0, description="Longest spoken turn; VAD ends a longer utterance, manual turns reject more."
    )
    min_turn_audio_ms: int = Field(
        100, ge=90, description="Shortest push-to-talk audio (the audio encoder needs >= 85 ms)."
    )
    max_text_chars: int = Field(
        8000, ge=1, description="Longest typed text of one turn (all deferred parts)."
    )

    # --- turn detection (defaults of the reference real-time server) ------------------------------------
    default_turn_detection: Literal["vad", "manual"] = Field(
        "vad", description="Turn detection of a session that does not choose one."
    )
    vad_threshold: float = Field(0.7, gt=0, lt=1, description="Speech probability that starts speech.")
    vad_min_silence_ms: int = Field(500, ge=0, description="Silence that ends an utterance.")
    vad_speech_pad_ms: int = Field(30, ge=0, description="Audio kept before the start and after the end.")
    vad_min_utterance_ms: int = Field(
        1000, ge=0, description="Utterances shorter than this (pads included) are discarded as noise."
    )

    # --- barge-in policy (bargein.py; sessions override each through SessionSettings.barge_in) -----------
    barge_in_enabled: bool = Field(
        True,
        description="User speech may interrupt a response (VAD sessions), and a new turn interrupts a "
        "running response (reason new_turn); false: neither (a new turn is FAILED_PRECONDITION).",
    )
    barge_in_threshold: float = Field(
        0.7, gt=0, lt=1, description="VAD speech probability that counts as interrupting speech."
    )
    barge_in_min_speech_ms: int = Field(
        500,
        ge=0,
        le=10_000,
        description="User speech this long (short gaps included) interrupts a running response; shorter "
        "speech (a backchannel) does not (0 = the first speech window interrupts).",
    )
    barge_in_in_flight: Literal["pause", "continue"] = Field(
        "pause",
        description="Reply audio while the user may be interrupting: 'pause' holds it (it resumes where it "
        "stopped after a false interruption), 'continue' keeps sending (a client may duck on "
        "speech_started). After a real interruption the rest is dropped either way.",
    )
    barge_in_resume_silence_ms: int = Field(
        300,
        ge=32,
        le=10_000,
        description="Silence that ends speech shorter than the minimum: a false interruption, the paused "
        "reply resumes.",
    )

    # --- paced output (pacing.py) ------------------------------------------------------------------
    playout_lead_ms: int = Field(
        300,
        ge=0,
        le=3_600_000,
        description="Reply audio is sent no faster than real time plus this lead (the client's playback "
        "buffer), so the server knows what the client has heard. Sessions may set their own "
        "(SessionSettings.playout_lead_ms).",
    )
    playout_frame_ms: int = Field(
        100, ge=10, le=1000, description="Reply audio is sent in frames of at most this duration."
    )

    # --- camera frames ----------------------------------------------------------------------------------
    frames_kept: int = Field(16, ge=1, description="Recent camera frames kept per session.")
    frames_per_turn: int = Field(4, ge=0, le=4, description="Most recent frames sent with a turn (<= 4).")
    frame_max_age_s: float = Field(
        10.0, gt=0, description="Frames received longer ago than this are not sent with a turn."
    )

    # --- replies --------------------------------------------------------------------------------------
    max_reply_tokens: int = Field(512, ge=1, description="Reply length when the session does not choose.")
    max_reply_tokens_limit: int = Field(2048, ge=1, description="Largest max_reply_tokens a session may set.")
    max_history_turns: int = Field(20, ge=0, description="Earlier turns kept and put into the prompt.")
    prefix_warmup: bool = Field(
        True,
        description="After each turn, prefill the start of the session's next prompt (system prompt and "
        "history) into the LLM's KV cache, so the next turn prefills only its new input.",
    )

    # --- bounded waits on components (a stuck component becomes UNAVAILABLE, never a hang) ---------------
    encode_timeout_s: float = Field(30.0, gt=0, description="Vision + audio encoding of one turn.")
    first_token_timeout_s: float = Field(60.0, gt=0, description="Commit of the prompt -> first LLM token.")
    token_timeout_s: float = Field(30.0, gt=0, description="Between two LLM tokens.")
    speech_timeout_s: float = Field(30.0, gt=0, description="Between two speech chunks of one segment.")
    cancel_timeout_s: float = Field(2.0, gt=0, description="Waiting for cancelled streams to close.")
    first_event_timeout_s: float = Field(30.0, gt=0, description="Stream open -> the first SessionUpdate.")

    # --- a client that does not read (servicer.py): bounded memory per stream ---------------------------
    client_write_timeout_s: float = Field(
        30.0,
        gt=0,
        description="An event the transport does not take within this time (the client stopped reading "
        "and gRPC flow control blocks the write) ends the stream with RESOURCE_EXHAUSTED; the session "
        "is saved and released.",
    )
    max_pending_events: int = Field(
        20_000,
        ge=100,
        description="Events that may wait in one stream's outbox (a long reply's paced 100 ms audio frames "
        "wait there legitimately: 10 minutes are 6,000); more ends the stream with RESOURCE_EXHAUSTED, "
        "so a client that floods events and never reads their answers cannot grow the queue without bound.",
    )

    # --- sessions and lifecycle -------------------------------------------------------------------------
    max_sessions: int = Field(10_000, ge=1, description="Sessions the in-memory store holds.")
    session_idle_ttl_s: float = Field(
        3600.0, gt=0, description="Sessions idle this long expire (both stores; in Redis, the keys' TTL)."
    )
    health_poll_s: float = Field(2.0, gt=0, description="Interval of the component readiness probe.")
    shutdown_grace_s: float = Field(10.0, ge=0, description="SIGTERM: time running streams get to finish.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Logging level.")

    # --- session store, tenants and auth, TLS (README: "Sessions, tenants and auth") ----------------------
    session_store: Literal["memory", "redis"] = Field(
        "memory",
        description="Where sessions live: this process only (one replica, the embedded default) or Redis "
        "(every replica serves every session).",
    )
    redis_url: str | None = Field(
        None, description="redis:// (or rediss:// for TLS) URL of the session store (session_store=redis)."
    )
    redis_key_prefix: str = Field(
        "vitaserve",
        pattern=r"^[A-Za-z0-9_.-]{1,32}$",
        description="First part of every Redis key (redis_keys.py), so deployments can share one Redis.",
    )
    redis_timeout_s: float = Field(
        2.0, gt=0, description="Bound on one Redis operation, connecting included; past it: UNAVAILABLE."
    )
    stream_lease_s: float = Field(
        15.0,
        ge=1.0,
        description="A live stream's lease on its session, renewed every third of it: a replica that died "
        "stops counting against its tenant's max_streams this long after its last renewal.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="JSON or YAML file of API-key hashes, tenants and limits (auth.py; e.g. a mounted "
        "Kubernetes Secret, re-read when it changes). Unset: auth off, every stream is tenant 'default'.",
    )
    api_keys_reload_s: float = Field(
        5.0,
        gt=0,
        description="How often, at most, the keys file is checked for changes (a rotated Secret): a removed "
        "key stops opening streams within this long, without a restart; open streams go on.",
    )
    tenant_max_streams: int = Field(
        100, ge=0, description="Concurrent Converse streams per tenant unless its entry says (0 = no limit)."
    )
    tenant_max_message_bytes: int = Field(
        0,
        ge=0,
        description="Largest ClientEvent a tenant may send unless its entry says (0 = only "
        "grpc_max_message_bytes applies).",
    )
    tenant_max_turns_per_minute: int = Field(
        0,
        ge=0,
        description="Responses a tenant may start per minute (sliding window, counted across replicas in "
        "Redis with the Redis store) unless its entry says; over it a commit gets a RESOURCE_EXHAUSTED "
        "error event saying when to retry, and the session goes on (0 = no limit).",
    )
    tenant_max_streams_per_minute: int = Field(
        0,
        ge=0,
        description="Converse streams (new or resumed sessions) a tenant may open per minute unless its "
        "entry says; over it the open ends with RESOURCE_EXHAUSTED (0 = no limit).",
    )
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain of the gRPC server (TLS on).")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: when set, clients must present a certificate it signed (mTLS)."
    )
    tls_probe_ca_file: Path | None = Field(
        None,
        description="CA that signed tls_cert_file, trusted by the exec probe `python -m "
        "vitaserve_orchestrator.healthcheck` (native gRPC probes cannot speak TLS); unset: tls_cert_file.",
    )
    tls_probe_server_name: str = Field(
        "localhost", description="A name on tls_cert_file that the exec probe checks (healthcheck.py)."
    )

    @model_validator(mode="after")
    def _check_sessions_and_tls(self) -> OrchestratorSettings:
        if self.session_store == "redis" and not self.redis_url:
            raise ValueError(f"session_store=redis needs {ENV_PREFIX}REDIS_URL (e.g. redis://redis:6379/0)")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{ENV_PREFIX}REDIS_URL must be a redis://, rediss:// or unix:// URL")
        if self.api_keys_file is not None and not self.api_keys_file.is_file():
            raise ValueError(f"{ENV_PREFIX}API_KEYS_FILE is not a file: {self.api_keys_file}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(f"TLS needs both {ENV_PREFIX}TLS_CERT_FILE and {ENV_PREFIX}TLS_KEY_FILE")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(f"{ENV_PREFIX}TLS_CLIENT_CA_FILE (mTLS) needs TLS_CERT_FILE and TLS_KEY_FILE")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{ENV_PREFIX}{name.upper()} is not a file: {path}")
        return self
    # --- Triton discovery and routing (vitaserve.cluster) -------------------------------------------------
    discovery: Literal["static", "kubernetes"] = Field(
        "static", description="static: the *_URL lists; kubernetes: watch each component's Service endpoints."
    )
    kubernetes_namespace: str | None = Field(
        None, description="Namespace of the Triton Services (default: this pod's own namespace)."
    )
    triton_service: str | None = Field(
        None, description="Service of the Triton pods serving every component (discovery=kubernetes)."
    )
    vision_encoder_service: str | None = Field(
        None, description="Service of vision_encoder's Triton pods (overrides triton_service)."
    )
    audio_encoder_service: str | None = Field(
        None, description="Service of audio_encoder's Triton pods (overrides triton_service)."
    )
    llm_decoder_service: str | None = Field(
        None, description="Service of llm_decoder's Triton pods (overrides triton_service)."
    )
    speech_synth_service: str | None = Field(
        None, description="Service of speech_synth's Triton pods (overrides triton_service)."
    )
    triton_port_name: str = Field("grpc", description="Name of the Triton gRPC port in the EndpointSlices.")
    discovery_watch_timeout_s: int = Field(
        300, ge=10, description="Server-side timeout of one EndpointSlice watch before it is resumed."
    )
    routing_vnodes: int = Field(
        160, ge=1, description="Virtual nodes per Triton pod on the session hash ring (LLM affinity)."
    )

    # --- metrics and traces (vitaserve_orchestrator.telemetry) ---------------------------------------------
    metrics_address: str | None = Field(
        None, description="host:port of the Prometheus /metrics endpoint (unset = no endpoint)."
    )
    otlp_endpoint: str | None = Field(
        None, description="OTLP/gRPC collector for traces, e.g. otel-collector:4317 (unset = tracing off)."
    )
    otlp_insecure: bool = Field(True, description="Plain-text OTLP (no TLS) to the collector.")
    otel_service_name: str = Field("vitaserve-orchestrator", description="service.name of the traces.")
    trace_sample_ratio: float = Field(
        1.0, ge=0, le=1, description="Share of new traces sampled (a parent's decision is followed)."
    )

    @model_validator(mode="after")
    def _check_backend(self) -> OrchestratorSettings:
        get_family(self.model_family)  # ValueError naming the known families
        host, sep, port = self.listen_address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{ENV_PREFIX}LISTEN_ADDRESS must be host:port, got {self.listen_address!r}")
        if self.backend == "triton" and self.discovery == "kubernetes":
            missing = [name for name, service in self._services().items() if not service]
            if missing:
                raise ValueError(
                    f"discovery=kubernetes needs {ENV_PREFIX}TRITON_SERVICE or a Service for every component; "
                    "missing: " + ", ".join(f"{ENV_PREFIX}{name.upper()}_SERVICE" for name in missing)
                )
        elif self.backend == "triton":
            missing = [name for name, url in self._urls().items() if not url]
            if missing:
                raise ValueError(
                    f"backend=triton needs {ENV_PREFIX}TRITON_URL or a URL for every component; missing: "
                    + ", ".join(f"{ENV_PREFIX}{name.upper()}_URL" for name in missing)
                )
            for name, url in self._urls().items():
                try:
                    parse_endpoints(url or "")
                except ValueError as exc:
                    raise ValueError(f"{ENV_PREFIX}{name.upper()}_URL (or TRITON_URL): {exc}") from None
        elif self.checkpoint_dir is None:
            if get_family(self.model_family).needs_checkpoint:
                raise ValueError(f"backend=inprocess needs {ENV_PREFIX}CHECKPOINT_DIR")
        elif not self.checkpoint_dir.is_dir():
            raise ValueError(f"{ENV_PREFIX}CHECKPOINT_DIR is not a directory: {self.checkpoint_dir}")
        if self.max_reply_tokens > self.max_reply_tokens_limit:
            raise ValueError("max_reply_tokens must be <= max_reply_tokens_limit")
        return self

    def _urls(self) -> dict[str, str | None]:
        return {name: getattr(self, f"{name}_url") or self.triton_url for name in COMPONENTS}

    def _services(self) -> dict[str, str | None]:
        return {name: getattr(self, f"{name}_service") or self.triton_service for name in COMPONENTS}

    def component_services(self) -> dict[str, str]:
        """Kubernetes Service of each component (discovery=kubernetes)."""
        return {name: service for name, service in self._services().items() if service}

    def component_urls(self) -> dict[str, str]:
        """Triton URL of each component (backend=triton)."""
        return {name: url for name, url in self._urls().items() if url}
