"""The Converse gRPC servicer: protobuf <-> domain events, nothing else.

Per stream: the caller's API key (metadata) names its tenant (auth.py; a missing or wrong key ends the
RPC with UNAUTHENTICATED); the first `ClientEvent` must be a `session_update` (else INVALID_ARGUMENT); an
unknown session id, or another tenant's, ends it with NOT_FOUND; over the tenant's stream limit,
RESOURCE_EXHAUSTED, as is an open over its `max_streams_per_minute` (ratelimit.py; trailing metadata
`retry-after` says when, in seconds); a session store that cannot be reached, UNAVAILABLE; a newer stream that resumed
the same session (the client reconnected elsewhere) ends this one with ABORTED. An event over the
tenant's message size limit is a RESOURCE_EXHAUSTED `ErrorEvent`. Each event goes out only once
`Conversation.before_send` allows it (a turn's end waits for its history to be saved). Then a reader
task turns each protobuf event into a domain event for the `Conversation`, while this handler sends the
`Outbox`'s events as protobuf. Errors about one event come back as `ErrorEvent`s and the stream goes on.
The stream ends after `EndSession`, when the client half-closes (once a running response has played
out), or when either side cancels; a client that does not read is ended with RESOURCE_EXHAUSTED once one
write waits `client_write_timeout_s` or its outbox holds more than `max_pending_events` (settings.py).

Telemetry: each stream is a `session` span (continuing a W3C `traceparent` in the call's metadata) and
counts in `vitaserve_active_sessions`; the events waiting in the open streams' outboxes are the
`vitaserve_queue_depth{queue="outbox"}` gauge, read at scrape time.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable

import grpc
from opentelemetry import propagate
from opentelemetry.trace import Status, StatusCode

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.api.v1 import orchestrator_pb2_grpc as pb_grpc
from vitaserve.components.base import ComponentClient
from vitaserve.errors import InvalidInput, RateLimited, ResourceExhausted, VitaserveError
from vitaserve.models.prompt import STATE_MARKS, Turn
from vitaserve_orchestrator import events as ev
from vitaserve_orchestrator.auth import Authenticator, Tenant
from vitaserve_orchestrator.bargein import BargeInConfig, BargeInUpdate
from vitaserve_orchestrator.conversation import Conversation
from vitaserve_orchestrator.grpc_errors import abort
from vitaserve_orchestrator.outbox import Outbox
from vitaserve_orchestrator.ratelimit import STREAMS, RateLimiter, for_store
from vitaserve_orchestrator.session import SessionSettings, SessionStore, SettingsUpdate
from vitaserve_orchestrator.settings import OrchestratorSettings
from vitaserve_orchestrator.tasks import cancel_and_wait
from vitaserve_orchestrator.telemetry import Telemetry
from vitaserve_orchestrator.vad import SileroVad, VadModel

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# protobuf -> domain


def barge_in_from_proto(msg: pb.BargeInSettings) -> BargeInUpdate:
    return BargeInUpdate(
        enabled=msg.enabled if msg.HasField("enabled") else None,
        threshold=msg.threshold,
        min_speech_ms=msg.min_speech_ms if msg.HasField("min_speech_ms") else None,
        in_flight=msg.in_flight,
        resume_silence_ms=msg.resume_silence_ms,
    )


def settings_from_proto(msg: pb.SessionSettings) -> SettingsUpdate:
    return SettingsUpdate(
        turn_detection=msg.turn_detection,
        vad_threshold=msg.vad_threshold,
        vad_min_silence_ms=msg.vad_min_silence_ms,
        vad_min_utterance_ms=msg.vad_min_utterance_ms,
        want_audio=msg.want_audio,
        max_reply_tokens=msg.max_reply_tokens,
        temperature=msg.temperature,
        seed=msg.seed,
        system_prompt=msg.system_prompt,
        text_only=msg.text_only,
        barge_in=barge_in_from_proto(msg.barge_in) if msg.HasField("barge_in") else None,
        playout_lead_ms=msg.playout_lead_ms if msg.HasField("playout_lead_ms") else None,
        vad_create_response=msg.vad_create_response if msg.HasField("vad_create_response") else None,
    )


def client_event_from_proto(msg: pb.ClientEvent) -> ev.ClientEvent:
    """Raises `InvalidInput` for an event with no payload."""
    eid = msg.event_id
    kind = msg.WhichOneof("event")
    if kind == "session_update":
        u = msg.session_update
        return ev.UpdateSession(
            session_id=u.session_id,
            settings=settings_from_proto(u.settings) if u.HasField("settings") else None,
            event_id=eid,
        )
    if kind == "audio":
        return ev.AudioIn(pcm16=msg.audio.pcm16, sample_rate=msg.audio.sample_rate, event_id=eid)
    if kind == "image":
        return ev.ImageIn(data=msg.image.data, max_tiles=msg.image.max_tiles, event_id=eid)
    if kind == "video_frame":
        return ev.VideoFrameIn(
            data=msg.video_frame.data, timestamp_s=msg.video_frame.timestamp_s, event_id=eid
        )
    if kind == "text":
        return ev.TextIn(text=msg.text.text, defer_commit=msg.text.defer_commit, event_id=eid)
    if kind == "commit":
        return ev.CommitIn(event_id=eid)
    if kind == "interrupt":
        return ev.InterruptIn(response_id=msg.interrupt.response_id, event_id=eid)
    if kind == "playback":
        return ev.PlaybackIn(
            response_id=msg.playback.response_id, played_ms=msg.playback.played_ms, event_id=eid
        )
    if kind == "end_session":
        return ev.EndSessionIn(event_id=eid)
    if kind == "clear_input":
        return ev.ClearInputIn(event_id=eid)
    if kind == "delete_turn":
        return ev.DeleteTurnIn(turn_id=msg.delete_turn.turn_id, event_id=eid)
    raise InvalidInput("the ClientEvent carries no event")


# ------------------------------------------------------------------------------------------------
# domain -> protobuf


def barge_in_to_proto(b: BargeInConfig) -> pb.BargeInSettings:
    return pb.BargeInSettings(
        enabled=b.enabled,
        threshold=b.threshold,
        min_speech_ms=b.min_speech_ms,
        in_flight=b.in_flight,
        resume_silence_ms=b.resume_silence_ms,
    )


def history_to_proto(turn: Turn) -> pb.HistoryTurn:
    mark = turn.assistant[:1] if turn.assistant[:1] in STATE_MARKS else ""
    return pb.HistoryTurn(
        user=turn.user, assistant=turn.assistant[len(mark) :], state_mark=mark, turn_id=turn.turn_id
    )


def settings_to_proto(s: SessionSettings) -> pb.SessionSettings:
    return pb.SessionSettings(
        turn_detection=s.turn_detection,
        vad_threshold=s.vad_threshold,
        vad_min_silence_ms=s.vad_min_silence_ms,
        vad_min_utterance_ms=s.vad_min_utterance_ms,
        want_audio=s.speech_out,
        max_reply_tokens=s.max_reply_tokens,
        temperature=s.temperature,
        seed=s.seed or 0,
        system_prompt=s.system_prompt or "",
        text_only=not s.speech_out,
        barge_in=barge_in_to_proto(s.barge_in),
        playout_lead_ms=s.playout_lead_ms,
        vad_create_response=s.vad_create_response,
    )


def server_event_to_proto(env: ev.Envelope) -> pb.ServerEvent:
    out = pb.ServerEvent(
        session_id=env.session_id, turn_id=env.turn_id, response_id=env.response_id, t_ms=env.t_ms
    )
    e = env.event
    if isinstance(e, ev.SessionStarted):
        out.session_started.CopyFrom(
            pb.SessionStarted(
                resumed=e.resumed,
                settings=settings_to_proto(e.settings),
                history_turns=e.history_turns,
                history=[history_to_proto(t) for t in e.history],
                model_family=e.model_family,
            )
        )
    elif isinstance(e, ev.SpeechStarted):
        out.speech_started.audio_start_ms = e.audio_start_ms
    elif isinstance(e, ev.SpeechStopped):
        out.speech_stopped.audio_end_ms = e.audio_end_ms
    elif isinstance(e, ev.TurnStarted):
        out.turn_started.CopyFrom(pb.TurnStarted(modality=e.modality, images=e.images, frames=e.frames))
    elif isinstance(e, ev.InputTranscript):
        out.input_transcript.CopyFrom(
            pb.InputTranscript(text=e.text, image_descriptions=list(e.image_descriptions))
        )
    elif isinstance(e, ev.TextDelta):
        out.text_delta.CopyFrom(pb.TextDelta(text=e.text, offset=e.offset))
    elif isinstance(e, ev.AudioOut):
        out.audio.CopyFrom(
            pb.AudioOut(
                pcm16=e.pcm16,
                sample_rate=e.sample_rate,
                text_start=e.text_start,
                text_end=e.text_end,
                seq=e.seq,
                start_ms=e.start_ms,
            )
        )
    elif isinstance(e, ev.ResponseDone):
        t = e.timings
        out.response_done.CopyFrom(
            pb.ResponseDone(
                text=e.text,
                state_mark=e.state_mark,
                timings=pb.Timings(
                    encode_ms=t.encode_ms,
                    first_token_ms=t.first_token_ms,
                    first_audio_ms=t.first_audio_ms,
                    total_ms=t.total_ms,
                    tokens=t.tokens,
                    audio_ms=t.audio_ms,
                    holds=t.holds,
                    held_ms=t.held_ms,
                ),
            )
        )
    elif isinstance(e, ev.Interrupted):
        out.interrupted.CopyFrom(
            pb.Interrupted(
                played_ms=e.played_ms,
                heard_text=e.heard_text,
                reason=e.reason,
                trigger_audio_ms=e.trigger_audio_ms,
                policy_met_ms=e.policy_met_ms,
            )
        )
    elif isinstance(e, ev.HistoryTruncated):
        out.history_truncated.CopyFrom(
            pb.HistoryTruncated(turn_id=e.turn_id, played_ms=e.played_ms, heard_text=e.heard_text)
        )
    elif isinstance(e, ev.TurnDeleted):
        out.turn_deleted.turn_id = e.turn_id
    elif isinstance(e, ev.ErrorEvent):
        out.error.CopyFrom(
            pb.ErrorEvent(code=e.code, message=e.message, event_id=e.event_id, retryable=e.retryable)
        )
    else:  # pragma: no cover - every ServerEvent is handled above
        raise TypeError(f"no protobuf form for {type(e).__name__}")
    return out


# ------------------------------------------------------------------------------------------------


class OrchestratorServicer(pb_grpc.OrchestratorServicer):
    """Serves Converse streams over a `ComponentClient` and a `SessionStore`."""

    def __init__(
        self,
        *,
        config: OrchestratorSettings,
        components: ComponentClient,
        store: SessionStore,
        auth: Authenticator | None = None,
        rate_limiter: RateLimiter | None = None,
        vad_factory: Callable[[], VadModel] = SileroVad,
        clock: Callable[[], float] = time.monotonic,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._config = config
        self._telemetry = telemetry or Telemetry.off()
        self._outboxes: weakref.WeakSet[Outbox] = weakref.WeakSet()
        self._telemetry.metrics.queue_depth.labels("outbox").set_function(
            lambda: float(sum(o.pending() for o in list(self._outboxes))))
        self._components = components
        self._store = store
        self._auth = auth or Authenticator.from_settings(config)
        self._rate_limiter = rate_limiter or for_store(store)
        self._vad_factory = vad_factory
        self._clock = clock
        self.open_streams = 0

    async def Converse(  # noqa: N802 - the gRPC method name
        self, request_iterator: AsyncIterator[pb.ClientEvent], context: grpc.aio.ServicerContext
    ) -> None:
        # Events go out with `context.write` (not `yield`), so each write can be bounded in time.
        requests = aiter(request_iterator)
        try:
            async with asyncio.timeout(self._config.first_event_timeout_s):
                first = await anext(requests, None)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no session_update within {self._config.first_event_timeout_s:g} s",
            )
        # Authenticated after the first event is read, not before: aborting while the client's first
        # write is still in flight makes grpc report that write's failure ("Internal error from Core",
        # INTERNAL) to the client instead of this status. The read is bounded by the timeout above and
        # by grpc_max_message_bytes.
        try:
            tenant = self._auth.authenticate(context.invocation_metadata())
        except VitaserveError as exc:
            await abort(context, exc)
        if first is None or first.WhichOneof("event") != "session_update":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first event must be session_update")

        # pacing: each response brings its session's playout lead
        outbox = Outbox(clock=self._clock, max_pending=self._config.max_pending_events)
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        span = self._telemetry.tracer.start_span("session", context=propagate.extract(metadata))
        try:
            tenant.check_message(first.ByteSize())
            await self._rate_limiter.check(tenant.name, STREAMS, tenant.max_streams_per_minute)
            update = client_event_from_proto(first)
            assert isinstance(update, ev.UpdateSession)
            conversation = await Conversation.open(
                update,
                store=self._store,
                components=self._components,
                config=self._config,
                outbox=outbox,
                tenant=tenant,
                rate_limiter=self._rate_limiter,
                vad_factory=self._vad_factory,
                clock=self._clock,
                telemetry=self._telemetry,
                session_span=span,
            )
        except VitaserveError as exc:
            span.set_status(Status(StatusCode.ERROR, f"{exc.code}: {exc.message}"))
            span.end()
            if isinstance(exc, RateLimited):
                context.set_trailing_metadata((("retry-after", f"{exc.retry_after_s:g}"),))
            await abort(context, exc)
        span.set_attribute("vitaserve.session_id", conversation.session.id)
        span.set_attribute("vitaserve.tenant", tenant.name)

        self.open_streams += 1
        self._telemetry.metrics.active_sessions.inc()
        self._outboxes.add(outbox)
        reader = asyncio.get_running_loop().create_task(
            self._read(requests, conversation, tenant), name=f"converse-reader:{conversation.session.id}"
        )
        stalled: ResourceExhausted | None = None
        try:
            async for envelope in outbox:
                if await conversation.before_send(envelope):
                    stalled = await self._write(context, server_event_to_proto(envelope), outbox)
                    if stalled is not None:
                        break
            stalled = outbox.overflow or stalled  # an overflow is the first cause when both happened
            if stalled is None and conversation.superseded is not None:  # a newer stream holds the session
                await abort(context, conversation.superseded)
        finally:
            self.open_streams -= 1
            self._telemetry.metrics.active_sessions.dec()
            await cancel_and_wait(reader, self._config.cancel_timeout_s)
            await conversation.aclose()
            span.set_attribute("vitaserve.turns", conversation.session.turns)
            span.end()
        if stalled is not None:  # the client does not read; the session is saved and released by now
            log.warning("session %s: %s", conversation.session.id, stalled.message)
            await self._end_unread(context, stalled)

    async def _write(self, context: grpc.aio.ServicerContext, message: pb.ServerEvent,
                     outbox: Outbox) -> ResourceExhausted | None:
        """Hand one event to the transport; the error that ends the stream if the transport did not take
        it within `client_write_timeout_s` (the client stopped reading: gRPC flow control blocks the
        write, and without this bound the stream would hold its queue and session forever)."""
        timeout_s = self._config.client_write_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await context.write(message)
        except TimeoutError:
            return ResourceExhausted(
                f"the client did not read the stream for {timeout_s:g} s ({outbox.pending()} events waiting, "
                "VITASERVE_CLIENT_WRITE_TIMEOUT_S); the stream is closed, the session is saved")
        return None

    async def _end_unread(self, context: grpc.aio.ServicerContext, exc: ResourceExhausted) -> None:
        """End a stream whose client does not read with `exc`'s status. The status travels behind the
        events already in the transport, so sending it completes only once the client reads them: the
        wait is bounded too, and the handler returns either way (gRPC delivers the status if the client
        ever reads on, and cancels the call if it goes away)."""
        try:
            async with asyncio.timeout(self._config.client_write_timeout_s):
                await abort(context, exc)
        except TimeoutError:
            pass

    async def _read(
        self, requests: AsyncIterator[pb.ClientEvent], conversation: Conversation, tenant: Tenant
    ) -> None:
        """Feed client events to the conversation until the client stops or ends the session."""
        try:
            async for msg in requests:
                try:
                    tenant.check_message(msg.ByteSize())
                    event = client_event_from_proto(msg)
                except VitaserveError as exc:
                    conversation.report(exc, msg.event_id)
                    continue
                if not await conversation.dispatch(event):
                    break
            await conversation.finish()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - e.g. the transport failed; end this stream cleanly
            log.exception("session %s: reading the stream failed", conversation.session.id)
            await conversation.aclose()
