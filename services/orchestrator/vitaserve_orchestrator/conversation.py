"""The policy of one Converse stream: what each client event does to the session.

`Conversation` receives domain client events one at a time (in arrival order) and owns:
- input checks per event (sample rate, sizes, image decoding, reserved tokens); a bad event raises a
  `VitaserveError` that `dispatch` reports as an `ErrorEvent`, and the session goes on;
- what waits for the next turn (text, images, push-to-talk audio) and the camera frame ring;
- turn detection: text turns (a `TextIn` commits unless deferred), push-to-talk (`manual` + `CommitIn`),
  and VAD turns (`vad`: the `Endpointer` reports speech start/stop; the end of an utterance commits it,
  or, with the session's `vad_create_response` off, becomes pending push-to-talk audio for the next
  commit). `ClearInputIn` drops what is pending and the utterance in progress (unannounced: no speech
  stopped);
- turn ordering: one response at a time. A new turn (typed text, a commit) while a response runs
  interrupts it (reason `new_turn`) when the session's barge-in policy is enabled, else it is
  FAILED_PRECONDITION; an utterance the VAD ends while a response still runs is dropped (bargein.py);
  a commit over the tenant's `max_turns_per_minute` (ratelimit.py) is RESOURCE_EXHAUSTED, saying when
  to retry;
- barge-in: in VAD mode, every VAD window also feeds the session's `BargeInPolicy` (bargein.py), which
  holds the reply audio while the user may be interrupting, releases it after a false interruption, and
  interrupts the response (reason `barge_in`) once the speech meets the policy;
- interruption on request (`InterruptIn`), playback reports, settings changes and the end of the session;
- history edits: a playback report for the last response after it finished cuts its history turn to what
  was heard there (`HistoryTruncated`), and `DeleteTurnIn` removes a turn (`TurnDeleted`). An edit stops
  a KV warm-up of the old history and, when no response runs, warms the new one;
- history and persistence: a finished response updates the history (session.py's policy) and the
  session is saved to the store at turn boundaries, on settings changes, after history edits and when
  the stream ends. The transport asks `before_send` before sending a turn's end (response_done,
  interrupted): it goes out once that turn's history is saved, so a turn the client saw completed
  survives a replica crash. A save that fails (store down) is an `ErrorEvent` and the stream goes on;
- the stream's lease on its session (lease.py): when a newer stream claims the session (the client
  reconnected elsewhere), this one stops without writing anything more and `superseded` is set (the
  servicer ends the RPC with ABORTED).

Telemetry: each response gets the stream's session span (its turns link to it) and the server's
`Telemetry`; a barge-in records its stop latency (from the arrival of the audio chunk whose window met
the policy to the response's gate closing: the VAD's and the policy's work on this event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace

from vitaserve.components.base import ComponentClient, ImageInput
from vitaserve.errors import FailedPrecondition, InvalidInput, VitaserveError
from vitaserve.families import get_family
from vitaserve.models.image import decode_image
from vitaserve.models.prompt import check_text
from vitaserve_orchestrator.auth import Tenant
from vitaserve_orchestrator.bargein import BargeInPolicy
from vitaserve_orchestrator.events import (
    AudioIn,
    ClearInputIn,
    ClientEvent,
    CommitIn,
    DeleteTurnIn,
    EndSessionIn,
    Envelope,
    HistoryTruncated,
    ImageIn,
    Interrupted,
    InterruptIn,
    PlaybackIn,
    ResponseDone,
    SessionStarted,
    SpeechStarted,
    SpeechStopped,
    TextIn,
    TurnDeleted,
    TurnStarted,
    UpdateSession,
    VideoFrameIn,
)
from vitaserve_orchestrator.grpc_errors import error_event
from vitaserve_orchestrator.lease import StreamLease
from vitaserve_orchestrator.outbox import Outbox
from vitaserve_orchestrator.ratelimit import TURNS, MemoryRateLimiter, RateLimiter
from vitaserve_orchestrator.session import (
    DEFAULT_TENANT,
    Frame,
    Session,
    SessionSettings,
    SessionStore,
    SessionSuperseded,
    history_reply_text,
)
from vitaserve_orchestrator.settings import OrchestratorSettings
from vitaserve_orchestrator.tasks import TaskSet
from vitaserve_orchestrator.telemetry import Telemetry
from vitaserve_orchestrator.turn import (
    PROMPT_MAX_CHARS,
    Outcome,
    PipelineLimits,
    Response,
    TurnInput,
    turn_system_prompt,
)
from vitaserve_orchestrator.vad import (
    SAMPLE_RATE,
    Endpointer,
    SileroVad,
    SpeechEnd,
    SpeechStart,
    VadConfig,
    VadModel,
)

log = logging.getLogger(__name__)

_VAD_FIELDS = ("turn_detection", "vad_threshold", "vad_min_silence_ms", "vad_min_utterance_ms", "barge_in")


def pcm16_to_float(pcm16: bytes | bytearray) -> np.ndarray:
    """16-bit little-endian PCM -> float32 in [-1, 1)."""
    return np.frombuffer(bytes(pcm16), dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(pcm: np.ndarray) -> bytes:
    """float32 in [-1, 1) -> 16-bit little-endian PCM: the exact inverse of `pcm16_to_float`."""
    return np.clip(np.round(np.asarray(pcm, np.float32) * 32768.0), -32768, 32767).astype("<i2").tobytes()


class Conversation:
    """One Converse stream bound to one session (see the module docstring)."""

    def __init__(
        self,
        *,
        session: Session,
        store: SessionStore,
        components: ComponentClient,
        config: OrchestratorSettings,
        outbox: Outbox,
        vad_factory: Callable[[], VadModel] = SileroVad,
        clock: Callable[[], float] = time.monotonic,
        telemetry: Telemetry | None = None,
        session_span: trace.Span | None = None,
        tenant: Tenant | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self.session = session
        self._tenant = tenant or Tenant(session.tenant)
        self._rate_limiter = rate_limiter or MemoryRateLimiter(clock)
        self._telemetry = telemetry or Telemetry.off()
        self._session_span = session_span
        self._store = store
        self._components = components
        self._config = config
        self._family = get_family(config.model_family)
        self._outbox = outbox
        self._vad_factory = vad_factory
        self._clock = clock
        self._limits = PipelineLimits.from_settings(config)
        self._tasks = TaskSet(f"conversation:{session.id}")
        self._save_lock = asyncio.Lock()
        self._response: Response | None = None
        self._endpointer: Endpointer | None = None
        self._policy: BargeInPolicy | None = None  # lives and dies with the endpointer
        self._vad_base_ms = 0  # input audio received before the current endpointer was created
        self._audio_in_ms = 0.0  # input audio received on this stream
        self._audio_at = 0.0  # when the latest audio chunk arrived (barge-in stop latency)
        self._ended = False
        self._saving: asyncio.Task[None] | None = None  # the save of the last finished turn
        self._warming: asyncio.Task[None] | None = None  # the KV warm-up for the next turn
        self._next_media_kind: str | None = None  # the next turn's media, as the warm-up guesses it
        self.superseded: SessionSuperseded | None = None  # set when a newer stream took the session
        self._lease = StreamLease(
            store, session, interval_s=config.stream_lease_s / 3, on_lost=self._on_superseded
        )
        outbox.session_id = session.id

    @classmethod
    async def open(
        cls,
        update: UpdateSession,
        *,
        store: SessionStore,
        components: ComponentClient,
        config: OrchestratorSettings,
        outbox: Outbox,
        tenant: Tenant | None = None,
        rate_limiter: RateLimiter | None = None,
        vad_factory: Callable[[], VadModel] = SileroVad,
        clock: Callable[[], float] = time.monotonic,
        telemetry: Telemetry | None = None,
        session_span: trace.Span | None = None,
    ) -> Conversation:
        """Create or resume the session named by the stream's first event, in `tenant` (default: the one
        tenant of auth-off) and within its stream limit; this stream takes the session's lease. Raises
        `NotFound` for an unknown session id (or another tenant's), `InvalidInput` for bad settings,
        `ResourceExhausted` over the tenant's limit, `Unavailable` if the store is down. Emits
        `SessionStarted`."""
        tenant = tenant or Tenant(DEFAULT_TENANT)
        settings = None
        if update.settings is not None or not update.session_id:
            settings = SessionSettings.resolve(update.settings, config)  # before taking any lease
        if update.session_id:
            session = await store.claim(update.session_id, tenant=tenant.name, max_streams=tenant.max_streams)
            if settings is not None:
                session.settings = settings
                try:
                    await store.save(session)
                except VitaserveError:
                    with contextlib.suppress(VitaserveError):  # else the lease lapses by itself
                        await store.release(session)
                    raise
        else:
            assert settings is not None
            session = await store.create(settings, tenant=tenant.name, max_streams=tenant.max_streams)
        conversation = cls(
            session=session,
            store=store,
            components=components,
            config=config,
            outbox=outbox,
            vad_factory=vad_factory,
            clock=clock,
            telemetry=telemetry,
            session_span=session_span,
            tenant=tenant,
            rate_limiter=rate_limiter,
        )
        outbox.put(
            SessionStarted(
                resumed=bool(update.session_id),
                settings=session.settings,
                history_turns=len(session.history),
                history=tuple(session.history),
                model_family=conversation._family.name,
            )
        )
        conversation._lease.start()
        return conversation

    # ---- entry points used by the servicer ---------------------------------------------------------

    @property
    def response(self) -> Response | None:
        return self._response

    @property
    def ended(self) -> bool:
        return self._ended

    def report(self, exc: BaseException, event_id: str = "") -> None:
        """Send an `ErrorEvent` for a bad client event; the session goes on."""
        event = error_event(exc, event_id)
        turn_id = self._response.turn_id if self._active() and self._response else ""
        self._outbox.put(event, turn_id=turn_id)

    async def dispatch(self, event: ClientEvent) -> bool:
        """Apply one client event. Returns False once the client ended the session."""
        try:
            await self._handle(event)
        except VitaserveError as exc:
            self.report(exc, event.event_id)
        except Exception as exc:  # noqa: BLE001 - one bad event must not end the session
            log.exception("session %s: event %s failed", self.session.id, type(event).__name__)
            self.report(exc, event.event_id)
        return not self._ended

    async def before_send(self, envelope: Envelope) -> bool:
        """The transport calls this before sending `envelope`, and sends it only if this returns True: the
        end of a turn waits until that turn's history is saved (bounded by the store's own timeout; a save
        that failed is reported after it), and is not sent at all if a newer stream refused the save."""
        if self._saving is not None and isinstance(envelope.event, (ResponseDone, Interrupted)):
            await asyncio.wait({self._saving})
            return self.superseded is None
        return True

    def _on_superseded(self, exc: SessionSuperseded) -> None:
        """A newer stream holds the session: stop, write nothing more; the transport ends the stream with
        the status of `superseded` (ABORTED) once the queued events are sent."""
        if self._ended:
            return
        self.superseded = exc
        self._ended = True
        if self._response is not None:
            self._tasks.spawn(self._response.aclose(), "stop-superseded")
        self._outbox.close()

    async def finish(self) -> None:
        """The client sent its last event: an utterance still in progress ends here (a client may
        stream a recording and half-close without trailing silence); let a running response play out,
        save, end the stream."""
        if self._endpointer is not None and self._endpointer.in_speech and not self._ended:
            try:
                await self._apply_vad_events(self._endpointer.flush())
            except VitaserveError as exc:
                self.report(exc)
        self._release_hold()  # no more input: nothing can interrupt any more
        if self._response is not None and not self._ended:
            await self._response.wait()
        self._stop_warming()  # no next turn on this stream
        await self._tasks.wait_all(self._limits.cancel_timeout_s)
        if not self._ended:
            try:
                await self._save()
            except VitaserveError as exc:
                self.report(exc)
        await self._lease.aclose(self._limits.cancel_timeout_s)
        self._outbox.close()

    async def aclose(self) -> None:
        """The stream is ending (or was cancelled): stop everything, keep what the user received."""
        if self._response is not None:
            await self._response.aclose()
        await self._tasks.cancel_all(self._limits.cancel_timeout_s)
        if not self._ended:
            try:
                await self._save()
            except Exception as exc:  # noqa: BLE001 - the stream is gone; nothing to report to
                log.warning("session %s: saving at stream end failed: %s", self.session.id, exc)
        await self._lease.aclose(self._limits.cancel_timeout_s)
        self._outbox.close()

    # ---- event handling -------------------------------------------------------------------------

    async def _handle(self, event: ClientEvent) -> None:
        if isinstance(event, AudioIn):
            await self._on_audio(event)
        elif isinstance(event, TextIn):
            await self._on_text(event)
        elif isinstance(event, ImageIn):
            await self._on_image(event)
        elif isinstance(event, VideoFrameIn):
            await self._on_frame(event)
        elif isinstance(event, CommitIn):
            await self._commit()
        elif isinstance(event, InterruptIn):
            await self._on_interrupt(event)
        elif isinstance(event, PlaybackIn):
            await self._on_playback(event)
        elif isinstance(event, ClearInputIn):
            self._on_clear_input()
        elif isinstance(event, DeleteTurnIn):
            await self._on_delete_turn(event)
        elif isinstance(event, UpdateSession):
            await self._on_update(event)
        elif isinstance(event, EndSessionIn):
            await self._on_end()
        else:
            raise InvalidInput(f"unsupported event {type(event).__name__}")

    def _active(self) -> bool:
        return self._response is not None and not self._response.finished

    async def _on_update(self, event: UpdateSession) -> None:
        if event.session_id and event.session_id != self.session.id:
            raise InvalidInput("a stream serves one session: open a new stream for another session")
        if event.settings is not None:
            new = SessionSettings.resolve(event.settings, self._config)
            old = self.session.settings
            self.session.settings = new
            if any(getattr(old, f) != getattr(new, f) for f in _VAD_FIELDS):
                self._drop_endpointer()
            await self._save()
        self._outbox.put(
            SessionStarted(
                resumed=True,
                settings=self.session.settings,
                history_turns=len(self.session.history),
                history=tuple(self.session.history),
                model_family=self._family.name,
            )
        )

    async def _on_end(self) -> None:
        self._ended = True  # first: nothing may save the session after it is deleted
        if self._active() and self._response is not None:
            await self._response.interrupt("client")
        await self._store.delete(self.session.id, tenant=self.session.tenant)

    async def _on_interrupt(self, event: InterruptIn) -> None:
        # Interrupting nothing, or a response that already ended, is a harmless race, not an error.
        response = self._response
        if response is None or response.finished:
            return
        if event.response_id and event.response_id != response.id:
            return
        await response.interrupt("client")

    def _on_clear_input(self) -> None:
        self.session.pending.clear()
        # The next audio creates a fresh endpointer: the utterance in progress is forgotten, unannounced.
        self._drop_endpointer(announce=False)

    async def _on_playback(self, event: PlaybackIn) -> None:
        response = self._response
        if response is not None and response.id == event.response_id and not response.finished:
            response.playout.client_played_ms = max(0, int(event.played_ms))
            return
        before = response.outcome if response is not None and response.id == event.response_id else None
        if (
            response is None
            or before is None
            or before.kind not in ("done", "interrupted")
            or self.session.last_turn_id() != response.turn_id
        ):
            raise InvalidInput(
                f"no finished reply of response {event.response_id!r} in history: a playback position after "
                "a response finished can only truncate the last response, while its turn is the last one kept"
            )
        outcome = response.truncate(max(0, int(event.played_ms)))
        if outcome is not before:
            self.session.history[-1] = replace(
                self.session.history[-1], assistant=history_reply_text(outcome.state_mark, outcome.text)
            )
            self._history_edited()
            await self._save()
        self._outbox.put(
            HistoryTruncated(response.turn_id, round(outcome.played_ms), outcome.text),
            turn_id=response.turn_id,
            response_id=response.id,
        )

    async def _on_delete_turn(self, event: DeleteTurnIn) -> None:
        if self._active() and self._response is not None and self._response.turn_id == event.turn_id:
            raise FailedPrecondition(
                f"turn {event.turn_id!r} has a running response: interrupt the response first"
            )
        self.session.delete_turn(event.turn_id)
        self._history_edited()
        await self._save()
        self._outbox.put(TurnDeleted(event.turn_id), turn_id=event.turn_id)

    async def _on_text(self, event: TextIn) -> None:
        check_text(event.text, what="text", max_chars=self._config.max_text_chars)
        pending = self.session.pending
        if pending.text_chars + len(event.text) > self._config.max_text_chars:
            raise InvalidInput(f"the turn's text is longer than {self._config.max_text_chars} characters")
        if not event.defer_commit:
            await self._new_turn_may_start()
        pending.texts.append(event.text)
        if not event.defer_commit:
            await self._commit()

    def _check_image_bytes(self, data: bytes, what: str) -> None:
        if len(data) > self._config.max_image_bytes:
            raise InvalidInput(f"{what} is {len(data)} bytes, at most {self._config.max_image_bytes} allowed")

    async def _decode_check(self, data: bytes) -> None:
        # Decoding proves the bytes are a supported, uncorrupted image within the pixel limit, here,
        # where the error can name this event (not later, inside the turn). Off the event loop.
        await asyncio.to_thread(decode_image, data, max_pixels=self._config.max_image_pixels)

    async def _on_image(self, event: ImageIn) -> None:
        self._check_image_bytes(event.data, "image")
        tiles = event.max_tiles or 1
        if not 1 <= tiles <= self._config.max_image_tiles:
            raise InvalidInput(f"max_tiles must be in 1..{self._config.max_image_tiles}, got {tiles}")
        if len(self.session.pending.images) >= self._config.max_pending_images:
            raise InvalidInput(f"at most {self._config.max_pending_images} images per turn")
        await self._decode_check(event.data)
        self.session.pending.images.append(ImageInput(data=event.data, max_tiles=tiles))

    async def _on_frame(self, event: VideoFrameIn) -> None:
        self._check_image_bytes(event.data, "video frame")
        await self._decode_check(event.data)
        self.session.add_frame(
            Frame(data=event.data, timestamp_s=event.timestamp_s, received_s=self._clock())
        )

    async def _on_audio(self, event: AudioIn) -> None:
        if event.sample_rate != SAMPLE_RATE:
            raise InvalidInput(f"audio sample_rate must be {SAMPLE_RATE}, got {event.sample_rate}")
        size = len(event.pcm16)
        if size % 2:
            raise InvalidInput(f"audio pcm16 has an odd number of bytes ({size}): 16-bit samples expected")
        if size > self._config.max_audio_chunk_bytes:
            raise InvalidInput(
                f"audio chunk is {size} bytes, at most {self._config.max_audio_chunk_bytes} allowed"
            )
        if size == 0:
            return
        self._audio_at = self._clock()
        self._audio_in_ms += size / 2 * 1000.0 / SAMPLE_RATE
        if self.session.settings.turn_detection == "manual":
            self._add_pending_audio(event.pcm16)
            return
        await self._on_vad_audio(pcm16_to_float(event.pcm16), size)

    def _add_pending_audio(self, pcm16: bytes) -> None:
        pending = self.session.pending.audio
        limit = int(self._config.max_turn_audio_s * SAMPLE_RATE) * 2
        if len(pending) + len(pcm16) > limit:
            raise InvalidInput(
                f"the turn's audio would exceed {self._config.max_turn_audio_s:g} s: commit first"
            )
        pending.extend(pcm16)

    async def _endpointer_for_stream(self, new_samples: int) -> Endpointer:
        if self._endpointer is None:
            s = self.session.settings
            vad_config = VadConfig(
                threshold=s.vad_threshold,
                min_silence_ms=s.vad_min_silence_ms,
                speech_pad_ms=self._config.vad_speech_pad_ms,
                min_utterance_ms=s.vad_min_utterance_ms,
                max_utterance_ms=int(self._config.max_turn_audio_s * 1000),
            )
            model = await asyncio.to_thread(self._vad_factory)  # loading the model takes ~70 ms
            self._endpointer = Endpointer(vad_config, model)
            self._policy = BargeInPolicy(s.barge_in)
            # Offsets stay those of the whole stream's input audio, whenever the endpointer was created.
            self._vad_base_ms = int(round(self._audio_in_ms - new_samples * 1000.0 / SAMPLE_RATE))
        return self._endpointer

    def _drop_endpointer(self, *, announce: bool = True) -> None:
        """Forget the endpointer (the next audio creates a fresh one) and its barge-in policy. `announce`:
        an utterance in progress ends with a `SpeechStopped`; else it is dropped silently."""
        if announce and self._endpointer is not None and self._endpointer.in_speech:
            self._outbox.put(
                SpeechStopped(self._vad_base_ms + self._endpointer.position_ms),
                turn_id=self.session.turn_id(),
            )
        self._release_hold()
        self._endpointer = None
        self._policy = None

    def _release_hold(self) -> None:
        if self._policy is not None:
            self._policy.release()
        if self._response is not None:
            self._response.hold_output(False)

    async def _on_vad_audio(self, pcm: np.ndarray, size: int) -> None:
        endpointer = await self._endpointer_for_stream(size // 2)
        vad_events = endpointer.push(pcm)
        # The policy sees this chunk's windows before an utterance it ends is handled: speech that met the
        # policy interrupts the response first, and the utterance then becomes the next turn.
        ends = [i for i, e in enumerate(vad_events) if isinstance(e, SpeechEnd)]
        split = ends[0] if ends else len(vad_events)
        await self._apply_vad_events(vad_events[:split])
        await self._apply_policy(endpointer)
        await self._apply_vad_events(vad_events[split:])

    async def _apply_policy(self, endpointer: Endpointer) -> None:
        policy = self._policy
        if policy is None:
            return
        window_ms = endpointer.window * 1000.0 / SAMPLE_RATE
        for end_ms, probability in endpointer.windows:
            decision = policy.feed(
                probability,
                end_ms=self._vad_base_ms + end_ms,
                window_ms=window_ms,
                assistant_speaking=self._active(),
            )
            if decision is not None and decision.kind == "interrupt" and self._response is not None:
                response = self._response
                if await response.interrupt(
                    "barge_in", trigger_audio_ms=decision.audio_ms, policy_met_ms=self._outbox.now_ms()
                ) and response.stopped_at is not None:
                    self._telemetry.metrics.barge_in_stop.observe(response.stopped_at - self._audio_at)
        if self._active() and self._response is not None:
            self._response.hold_output(policy.holding)

    async def _apply_vad_events(self, vad_events: list[SpeechStart | SpeechEnd]) -> None:
        for vad_event in vad_events:
            turn_id = self.session.turn_id()
            if isinstance(vad_event, SpeechStart):
                self._outbox.put(SpeechStarted(self._vad_base_ms + vad_event.audio_start_ms), turn_id=turn_id)
            elif isinstance(vad_event, SpeechEnd):
                self._outbox.put(SpeechStopped(self._vad_base_ms + vad_event.audio_end_ms), turn_id=turn_id)
                if vad_event.pcm is None:
                    continue  # shorter than the minimum utterance: noise
                if self._active():
                    # The user talked over a response without meeting the barge-in policy (or barge-in
                    # is off): not a turn (bargein.py).
                    log.info("session %s: utterance during a response dropped", self.session.id)
                    continue
                if not self.session.settings.vad_create_response:
                    self._keep_utterance(vad_event.pcm)
                    continue
                await self._commit(audio=vad_event.pcm)

    def _keep_utterance(self, pcm: np.ndarray) -> None:
        """`vad_create_response` off: the utterance waits for the next commit as push-to-talk audio."""
        try:
            self._add_pending_audio(float_to_pcm16(pcm))
        except InvalidInput as exc:  # over the turn's audio limit: this utterance is dropped
            self.report(InvalidInput(f"{exc.message} (an utterance was dropped)"))

    # ---- turns ----------------------------------------------------------------------------------

    def _check_new_turn_allowed(self) -> None:
        if self._active() and not self.session.settings.barge_in.enabled:
            raise FailedPrecondition(
                "a response is running and barge-in is disabled: interrupt it before sending a new turn"
            )

    async def _new_turn_may_start(self) -> None:
        """A new turn while a response runs interrupts it (reason new_turn) if the barge-in policy is
        enabled; else it is refused (FAILED_PRECONDITION)."""
        self._check_new_turn_allowed()
        if self._active() and self._response is not None:
            await self._response.interrupt("new_turn")

    async def _commit(self, *, audio: np.ndarray | None = None) -> None:
        self._check_new_turn_allowed()  # before anything pending is used up
        if audio is not None or not self.session.pending.empty():
            # Over the tenant's turns per minute: RESOURCE_EXHAUSTED, the pending input stays for a retry
            # (a VAD utterance, already cut, is dropped) and a running response is not interrupted.
            await self._rate_limiter.check(self._tenant.name, TURNS, self._tenant.max_turns_per_minute)
        pending = self.session.pending
        if audio is None and pending.audio:
            pcm16 = bytes(pending.audio)
            pending.audio.clear()
            ms = len(pcm16) / 2 * 1000.0 / SAMPLE_RATE
            shortest = self._config.min_turn_audio_ms
            if ms < shortest:
                raise InvalidInput(f"the turn's audio is too short ({ms:.0f} ms, at least {shortest} ms)")
            audio = pcm16_to_float(pcm16)
        text = pending.text
        if not text and not pending.images and audio is None:
            raise FailedPrecondition("nothing to commit: send text, audio or an image first")
        await self._new_turn_may_start()
        frames = self.session.recent_frames(
            self._config.frames_per_turn, now_s=self._clock(), max_age_s=self._config.frame_max_age_s
        )
        turn = TurnInput(
            text=text, images=tuple(pending.images), frames=tuple(f.data for f in frames), audio=audio
        )
        pending.clear()
        self._stop_warming()  # the turn's own request reuses what the warm-up prefilled so far
        self.session.turns += 1
        turn_id = self.session.turn_id(self.session.turns)
        response_id = f"resp-{uuid.uuid4().hex}"
        self._outbox.put(
            TurnStarted(modality=turn.modality, images=len(turn.images), frames=len(turn.frames)),
            turn_id=turn_id,
            response_id=response_id,
        )
        self._response = Response(
            components=self._components,
            family=self._family,
            outbox=self._outbox,
            session_id=self.session.id,
            turn_id=turn_id,
            response_id=response_id,
            turn=turn,
            history=self.session.history,
            settings=self.session.settings,
            limits=self._limits,
            committed_at=self._clock(),
            on_finished=self._on_response_finished,
            clock=self._clock,
            telemetry=self._telemetry,
            session_span=self._session_span,
        )
        self._response.start()

    def _on_response_finished(self, response: Response, outcome: Outcome) -> None:
        if outcome.kind in ("done", "interrupted"):
            self.session.record_turn(
                self._family.history_user_text(response.content),
                history_reply_text(outcome.state_mark, outcome.text),
                turn_id=response.turn_id,
                max_turns=self._config.max_history_turns,
            )
            # The system prompt depends on the next turn's media, so the warm-up guesses it: camera frames
            # keep coming (a turn with frames is followed by one with frames: 'video'); a still image is
            # sent once and follow-up questions come without it (None).
            self._next_media_kind = "video" if response.turn.frames else None
            self._warm_next_turn(f"{response.id}-warm")
        if not self._ended:
            self._saving = self._tasks.spawn(self._save_reporting(), "save")

    # ---- KV-cache warm-up for the next turn -------------------------------------------------------

    def _warm_next_turn(self, request_id: str) -> None:
        """Prefill the start of the next prompt (system prompt + the history as it is now) while the user
        listens and thinks. The next prompt repeats the last turn as text, not the media the model saw, so
        without this the session's cached KV would match only up to that turn's media. Best effort:
        cancelled when the next turn starts, the history is edited or the stream ends; a failure only
        costs the reuse."""
        if not self._config.prefix_warmup or self._ended:
            return
        system = turn_system_prompt(self._family, self.session.settings, self._next_media_kind)
        try:
            prefix = self._family.next_turn_prefix(self.session.history, system=system,
                                                   max_chars=PROMPT_MAX_CHARS)
        except VitaserveError as exc:
            log.debug("session %s: no KV warm-up: %s", self.session.id, exc)
            return
        self._stop_warming()
        self._warming = self._tasks.spawn(self._warm(prefix, request_id), "warm-prefix")

    def _history_edited(self) -> None:
        """The history changed between turns: a warm-up of the old one would prefill a prefix the next
        prompt no longer starts with (the cache reuses only exact prefixes, so it would only waste the
        work): stop it, and warm the new history unless a response runs (its end warms it)."""
        self._stop_warming()
        if not self._active() and self.session.history:
            self._warm_next_turn(f"warm-{uuid.uuid4().hex}")

    async def _warm(self, prefix: str, request_id: str) -> None:
        if self._session_span is not None:  # the warm-up belongs to the session's trace, not the turn's
            otel_context.attach(trace.set_span_in_context(self._session_span))  # this task's own context
        try:
            await asyncio.wait_for(
                self._components.warm_prefix(prefix, session_id=self.session.id, request_id=request_id),
                self._limits.first_token_timeout_s,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - best effort: the next turn just prefills everything
            log.info("session %s: KV warm-up %s failed: %s", self.session.id, request_id, exc)

    def _stop_warming(self) -> None:
        if self._warming is not None and not self._warming.done():
            self._warming.cancel()
        self._warming = None

    async def _save_reporting(self) -> None:
        try:
            await self._save()
        except VitaserveError as exc:  # e.g. Redis down: the client learns it, the stream goes on
            self.report(exc)

    async def _save(self) -> None:
        async with self._save_lock:
            try:
                await self._store.save(self.session)
            except SessionSuperseded as exc:
                self._on_superseded(exc)
                raise
