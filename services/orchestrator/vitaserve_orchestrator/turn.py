"""The turn pipeline: one assistant response from a committed user turn, and its interruption.

`Response` is the handle of one response (like livekit's `SpeechHandle`): `start()`, `interrupt(reason)`,
`aclose()`, `wait()`. Its task runs, with every wait bounded (`PipelineLimits`):

1. encode: the vision encoder (still images, then up to 4 camera frames as one tile each) and the audio
   encoder (a spoken turn) run in parallel; if one fails the other is cancelled. What they return is the
   model family's (`vitaserve.families`): LLM rows (VITA-1.5) or text; text (a transcript, image
   descriptions) is sent to the client at once as `InputTranscript`;
2. prompt: the family renders the turn after the session history (`ModelFamily.llm_request`); its
   real-time system prompt for the turn's media ('image' for still images, 'video' for camera frames)
   unless the session sets its own;
3. generate: the LLM streams tokens; the leading state mark is stripped on the fly (`ReplyCleaner`). A ☟
   (noise) reply is stopped at once and produces no text and no audio, only a done event with mark ☟;
4. speak: text deltas are sent in order and cut into sentences (the family's `TextSegmenter`); a
   concurrent task synthesises the segments one after the other while the LLM goes on; its audio is cut
   into frames of at most `audio_frame_ms` (the outbox paces them, pacing.py), each carrying its
   segment's text span, a running `seq` and `start_ms`;
5. done: `ResponseDone` with the timings (from the commit: encode, first token, first audio queued,
   total; tokens, audio ms).

A response ends with exactly one of `ResponseDone`, `Interrupted` or `ErrorEvent`, and counts as
finished once that event was handed to the transport (or at the interruption). Interruption closes the
response id gate of the `Outbox` first (no data event of this response is sent afterwards), emits
`Interrupted` with the audio the client played (the paced playout's estimate, or its own report) and the
reply text aligned to it, then cancels the task, which closes the LLM and speech iterators. While the
barge-in policy holds the response (`hold_output`), its audio waits in the outbox; generation goes on.
Component errors end the turn with an `ErrorEvent` (a stuck component becomes `UNAVAILABLE` after its
timeout); the session stays usable. A finished handle keeps its reply text and playout accounting, so a
position where the client stopped playing the finished reply cuts its outcome as an interruption would
(`truncate`).

Telemetry (telemetry.py): the task runs in a `turn` span, the root of a trace of its own linked to the
session's span; the component calls are its children (instrumented.py). Time to first token and first
audio are recorded where they happen, the turn's duration (by outcome) when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import numpy as np
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode

from vitaserve.components.base import ComponentClient, Encoding, GenerationParams, ImageInput
from vitaserve.errors import Unavailable, VitaserveError
from vitaserve.families import ModelFamily, TurnContent
from vitaserve.models.codec import pcm_to_int16
from vitaserve.models.prompt import (
    IM_END,
    MARK_NOISE,
    STATE_MARKS,
    UNK,
    Segment,
    TextSegmenter,
    Turn,
)
from vitaserve_orchestrator.events import (
    AudioOut,
    ErrorEvent,
    InputTranscript,
    Interrupted,
    ResponseDone,
    ServerEvent,
    TextDelta,
    Timings,
)
from vitaserve_orchestrator.outbox import Outbox, Playout
from vitaserve_orchestrator.pacing import split_frames
from vitaserve_orchestrator.session import SessionSettings
from vitaserve_orchestrator.settings import OrchestratorSettings
from vitaserve_orchestrator.tasks import cancel_and_wait
from vitaserve_orchestrator.telemetry import Telemetry

log = logging.getLogger(__name__)
T = TypeVar("T")

# The prompt's user text is checked where it arrives (settings.max_text_chars); history replies can be
# longer than one user message, so the template's own per-text limit is lifted.
PROMPT_MAX_CHARS = 1_000_000
_JUNK = (UNK, IM_END)


class ComponentTimeout(Unavailable):
    """A component accepted the call but sent nothing within its time limit (retryable)."""

    def __init__(self, component: str, message: str) -> None:
        super().__init__(message)
        self.component = component


@dataclass(frozen=True)
class PipelineLimits:
    encode_timeout_s: float = 30.0
    first_token_timeout_s: float = 60.0
    token_timeout_s: float = 30.0
    speech_timeout_s: float = 30.0
    cancel_timeout_s: float = 2.0
    audio_frame_ms: int = 100  # reply audio is queued in frames of at most this duration (pacing)

    @classmethod
    def from_settings(cls, config: OrchestratorSettings) -> PipelineLimits:
        return cls(
            config.encode_timeout_s,
            config.first_token_timeout_s,
            config.token_timeout_s,
            config.speech_timeout_s,
            config.cancel_timeout_s,
            config.playout_frame_ms,
        )


@dataclass(frozen=True)
class TurnInput:
    """A committed user turn. `audio`: 16 kHz mono float32 of a spoken turn; `frames`: encoded camera
    frames, oldest first."""

    text: str = ""
    images: tuple[ImageInput, ...] = ()
    frames: tuple[bytes, ...] = ()
    audio: np.ndarray | None = None

    @property
    def modality(self) -> str:
        return "audio" if self.audio is not None else "text"


@dataclass(frozen=True)
class Outcome:
    """How a response ended. `text`: the whole reply (done) or what the user heard (interrupted, or a done
    reply the client stopped playing: `Response.truncate`). `played_ms`: the reply audio `text` covers
    (all that was sent, or what was played)."""

    kind: Literal["done", "noise", "interrupted", "error"]
    text: str = ""
    state_mark: str = ""
    played_ms: float = 0.0


class ReplyCleaner:
    """Streams a raw reply into user-visible text: drops the leading state mark (and one space after it),
    any other state mark, `<unk>` and `<|im_end|>`. The concatenated output equals
    `strip_state_marks(whole reply)[0]`; text that may begin a `<unk>`/`<|im_end|>` is held back until it
    can be decided. `mark` is known as soon as the first non-blank character arrived."""

    def __init__(self) -> None:
        self._buf = ""
        self._lead_done = False
        self.mark: str | None = None

    def push(self, raw: str) -> str:
        self._buf += raw
        if not self._lead_done and not self._strip_lead(final=False):
            return ""
        return self._drain(final=False)

    def finish(self) -> str:
        if not self._lead_done:
            self._strip_lead(final=True)
        return self._drain(final=True)

    def _strip_lead(self, *, final: bool) -> bool:
        body = self._buf.lstrip()
        if not body:
            return final
        if body[0] not in STATE_MARKS:
            self._lead_done = True  # no mark: the text is kept as it is, leading blanks included
            return True
        self.mark = body[0]
        rest = body[1:]
        if not rest and not final:
            return False  # a space after the mark may still come
        self._buf = rest[1:] if rest.startswith(" ") else rest
        self._lead_done = True
        return True

    def _drain(self, *, final: bool) -> str:
        text = self._buf
        for junk in (*STATE_MARKS, *_JUNK):
            text = text.replace(junk, "")
        hold = 0 if final else _partial_junk_suffix(text)
        self._buf = text[len(text) - hold :]
        return text[: len(text) - hold]


def _partial_junk_suffix(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `<unk>` or `<|im_end|>`."""
    best = 0
    for junk in _JUNK:
        for n in range(min(len(junk) - 1, len(text)), best, -1):
            if text.endswith(junk[:n]):
                best = n
                break
    return best


def turn_system_prompt(family: ModelFamily, settings: SessionSettings, media_kind: str | None) -> str:
    """The system prompt of a live turn with `media_kind`: the session's own, else the family's."""
    return settings.system_prompt or family.system_prompt(media_kind, realtime=True)


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The exception to report from a task group: the first `VitaserveError`, else the first one."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                walk(sub)
        else:
            leaves.append(exc)

    walk(group)
    for exc in leaves:
        if isinstance(exc, VitaserveError):
            return exc
    return leaves[0]


async def _next(it: AsyncIterator[T], timeout_s: float, component: str) -> T | None:
    """The next item of a component stream (None at its end), bounded by `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            return await anext(it)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise ComponentTimeout(component, f"{component} sent nothing for {timeout_s:g} s") from None


async def _aclose(it: Any, timeout_s: float) -> None:
    """Close a component stream (ends the remote call); bounded, and never raises."""
    close = getattr(it, "aclose", None)
    if close is None:
        return
    try:
        async with asyncio.timeout(timeout_s):
            await close()
    except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - best effort on a dead stream
        if isinstance(exc, asyncio.CancelledError) and asyncio.current_task().cancelling():
            raise
        log.debug("closing a component stream failed: %r", exc)


class Response:
    """One assistant response to a committed turn (see the module docstring)."""

    def __init__(
        self,
        *,
        components: ComponentClient,
        family: ModelFamily,
        outbox: Outbox,
        session_id: str,
        turn_id: str,
        response_id: str,
        turn: TurnInput,
        history: Sequence[Turn],
        settings: SessionSettings,
        limits: PipelineLimits,
        committed_at: float,
        on_finished: Callable[[Response, Outcome], None],
        clock: Callable[[], float] = time.monotonic,
        telemetry: Telemetry | None = None,
        session_span: trace.Span | None = None,
    ) -> None:
        self.id = response_id
        self.turn_id = turn_id
        self.session_id = session_id
        self.turn = turn
        self.content = TurnContent(text=turn.text, images=turn.images)  # what the encoders made of it
        self.playout = Playout(settings.playout_lead_ms, clock=clock)
        self._components = components
        self._family = family
        self._outbox = outbox
        self._history = list(history)
        self._settings = settings
        self._limits = limits
        self._t0 = committed_at
        self._clock = clock
        self._on_finished = on_finished
        self._telemetry = telemetry or Telemetry.off()
        self._session_span = session_span
        self.stopped_at: float | None = None  # when the output gate closed (interrupted)
        self._task: asyncio.Task[None] | None = None
        self._outcome: Outcome | None = None
        self._finished = asyncio.Event()
        # Reply state, written by the task.
        self._pieces: list[str] = []
        self._offset = 0
        self._mark: str | None = None
        self._tokens = 0
        self._seq = 0
        self._audio_ms = 0.0
        self._first_token_ms: float | None = None
        self._first_audio_ms: float | None = None

    # ---- handle -------------------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """The reply text produced so far (state mark removed)."""
        return "".join(self._pieces)

    @property
    def finished(self) -> bool:
        return self._outcome is not None

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("response already started")
        self._outbox.watch(self.id, self.playout, self._on_sent)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"response:{self.id}")

    async def wait(self) -> Outcome:
        await self._finished.wait()
        assert self._outcome is not None
        return self._outcome

    async def interrupt(
        self, reason: str, *, trigger_audio_ms: float = 0, policy_met_ms: float = 0.0
    ) -> bool:
        """Stop this response at every hop; emits `Interrupted` (at once: it never waits for the streams to
        close). False if it had already finished. `trigger_audio_ms` / `policy_met_ms`: see `Interrupted`."""
        if self.finished:
            return False
        played, heard = self._stop_output()
        self._emit(
            Interrupted(
                played_ms=int(round(played)),
                heard_text=heard,
                reason=reason,
                trigger_audio_ms=int(round(trigger_audio_ms)),
                policy_met_ms=policy_met_ms,
            )
        )
        await self._cancel_task()
        return True

    def truncate(self, played_ms: float) -> Outcome:
        """The client stopped playing this finished response (done or interrupted) at `played_ms`: its
        outcome is cut to the reply text heard by then, aligned as an interruption aligns it. Never
        lengthened: a position at or past what the outcome covers (`Outcome.played_ms`) changes nothing.
        Returns the outcome now in force."""
        outcome = self._outcome
        if outcome is None or outcome.kind not in ("done", "interrupted"):
            raise RuntimeError(f"response {self.id} has no finished reply to truncate")
        if played_ms >= outcome.played_ms:
            return outcome
        heard = self.playout.heard_text(self.text, played_ms)
        self._outcome = replace(outcome, text=heard, played_ms=played_ms)
        return self._outcome

    def hold_output(self, held: bool) -> None:
        """Hold (True) or release this response's audio in the outbox; text and generation go on."""
        if self.finished or self.playout.held == held:
            return
        self.playout.held = held
        self._outbox.kick()

    async def aclose(self) -> None:
        """Stop without telling the client (the stream is closing); history keeps what was sent."""
        if not self.finished:
            self._stop_output()
        await self._cancel_task()

    def _stop_output(self) -> tuple[float, str]:
        # The gate first, in this event-loop step: from here on nothing of this response is sent, so the
        # playout accounting below is final.
        self._outbox.close_response(self.id)
        self.stopped_at = self._clock()
        played = self.playout.played_ms
        if self._settings.speech_out:
            heard = self.playout.heard_text(self.text, played)
        else:
            heard = self.text[: self.playout.sent_text_end]
        self._finish(Outcome("interrupted", heard, self._mark or "", played))
        return played, heard

    async def _cancel_task(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task, self._limits.cancel_timeout_s)

    def _finish(self, outcome: Outcome) -> None:
        if self._outcome is not None:
            return
        self._outcome = outcome
        self._telemetry.metrics.turn_duration.labels(outcome.kind).observe(self._clock() - self._t0)
        self._outbox.unwatch(self.id)
        self._finished.set()
        try:
            self._on_finished(self, outcome)
        except Exception:  # noqa: BLE001 - a bookkeeping failure must not break the stream
            log.exception("on_finished of response %s failed", self.id)

    def _on_sent(self, event: ServerEvent) -> None:
        if isinstance(event, ResponseDone):
            kind = "noise" if event.state_mark == MARK_NOISE else "done"
            # Sent after the response's last audio frame: the playout holds all of it.
            self._finish(Outcome(kind, event.text, event.state_mark, self.playout.sent_ms))
        elif isinstance(event, ErrorEvent):
            self._finish(Outcome("error"))

    def _emit(self, event: ServerEvent) -> None:
        sent = self._outbox.put(event, turn_id=self.turn_id, response_id=self.id)
        if not sent and isinstance(event, (ResponseDone, ErrorEvent)):
            self._on_sent(event)  # the stream is gone: the response is over all the same

    def _ms_since_commit(self) -> float:
        return (self._clock() - self._t0) * 1000.0

    # ---- pipeline -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        session = self._session_span.get_span_context() if self._session_span is not None else None
        with self._telemetry.tracer.start_as_current_span(
            "turn",
            context=Context(),  # a trace per turn, linked to its session
            links=[trace.Link(session)] if session is not None and session.is_valid else None,
            attributes={"vitaserve.session_id": self.session_id, "vitaserve.turn_id": self.turn_id,
                        "vitaserve.response_id": self.id, "vitaserve.modality": self.turn.modality},
            record_exception=False, set_status_on_exception=False,
        ) as span:
            try:
                await self._pipeline()
            except asyncio.CancelledError:
                span.set_attribute("vitaserve.cancelled", True)
                raise
            except VitaserveError as exc:
                log.info("response %s failed: %s %s", self.id, exc.code, exc.message)
                span.set_status(Status(StatusCode.ERROR, f"{exc.code}: {exc.message}"))
                if isinstance(exc, ComponentTimeout):  # the other component errors: instrumented.py
                    self._telemetry.metrics.component_errors.labels(exc.component, exc.code).inc()
                self._emit(ErrorEvent(exc.code, exc.message, retryable=exc.retryable))
            except Exception as exc:  # noqa: BLE001 - reported to the client, the session goes on
                log.exception("response %s failed", self.id)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                self._emit(ErrorEvent("INTERNAL", f"{type(exc).__name__}: {exc}"))
            span.set_attribute("vitaserve.tokens", self._tokens)

    async def _pipeline(self) -> None:
        self.content, encode_ms = await self._encode()
        if self.content.transcript or self.content.descriptions:
            self._emit(InputTranscript(self.content.transcript, self.content.descriptions))
        system = turn_system_prompt(self._family, self._settings, self.content.media_kind)
        request = self._family.llm_request(self._history, self.content, system=system,
                                           max_chars=PROMPT_MAX_CHARS)
        params = GenerationParams(
            max_tokens=self._settings.max_reply_tokens,
            temperature=self._settings.temperature,
            seed=self._settings.seed,
        )
        segments: asyncio.Queue[Segment | None] | None = (
            asyncio.Queue() if self._settings.speech_out else None
        )
        try:
            async with asyncio.TaskGroup() as group:
                if segments is not None:
                    group.create_task(self._speak(segments), name=f"speak:{self.id}")
                noise = await self._generate(request.prompt, list(request.media), params, segments)
        except BaseExceptionGroup as group_error:
            raise _first_error(group_error) from None
        timings = Timings(
            encode_ms=encode_ms,
            first_token_ms=self._first_token_ms or 0.0,
            first_audio_ms=self._first_audio_ms or 0.0,
            total_ms=self._ms_since_commit(),
            tokens=self._tokens,
            audio_ms=int(round(self._audio_ms)),
        )
        self._emit(
            ResponseDone(text="" if noise else self.text, state_mark=self._mark or "", timings=timings)
        )

    async def _encode(self) -> tuple[TurnContent, float]:
        """Vision and audio encoders in parallel; returns what they made of the turn, and the ms."""
        started = self._clock()
        turn = self.turn
        pictures = [*turn.images, *(ImageInput(data=f, max_tiles=1) for f in turn.frames)]
        if not pictures and turn.audio is None:
            return TurnContent(text=turn.text), 0.0
        vision: asyncio.Task[list[Encoding]] | None = None
        audio: asyncio.Task[Encoding] | None = None
        try:
            async with asyncio.timeout(self._limits.encode_timeout_s), asyncio.TaskGroup() as group:
                if pictures:
                    vision = group.create_task(self._components.encode_images(pictures, request_id=self.id))
                if turn.audio is not None:
                    audio = group.create_task(self._components.encode_audio(turn.audio, request_id=self.id))
        except BaseExceptionGroup as group_error:
            raise _first_error(group_error) from None
        except TimeoutError:
            late = ",".join(name for name, task in (("vision_encoder", vision), ("audio_encoder", audio))
                            if task is not None and task.cancelled())
            raise ComponentTimeout(
                late, f"the encoders did not answer within {self._limits.encode_timeout_s:g} s"
            ) from None
        frames = pictures[len(turn.images):]
        content = self._family.turn_content(turn.text, turn.images, frames,
                                            vision.result() if vision is not None else [],
                                            audio.result() if audio is not None else None)
        return content, (self._clock() - started) * 1000.0

    async def _generate(
        self,
        prompt: str,
        media: list[np.ndarray],
        params: GenerationParams,
        segments: asyncio.Queue[Segment | None] | None,
    ) -> bool:
        """Stream the LLM into text deltas and segments; returns True for a noise (☟) reply."""
        cleaner = ReplyCleaner()
        segmenter = self._family.segmenter()
        noise = False
        stream = aiter(
            self._components.generate(prompt, media, params, request_id=self.id, session_id=self.session_id)
        )
        try:
            while True:
                timeout = (
                    self._limits.first_token_timeout_s
                    if self._first_token_ms is None
                    else self._limits.token_timeout_s
                )
                delta = await _next(stream, timeout, "llm_decoder")
                if delta is None:
                    break
                if delta.token_id is not None:
                    self._tokens += 1
                    if self._first_token_ms is None:
                        self._first_token_ms = self._ms_since_commit()
                        self._telemetry.metrics.time_to_first_token.observe(self._first_token_ms / 1000.0)
                clean = cleaner.push(delta.text)
                self._mark = cleaner.mark
                if cleaner.mark == MARK_NOISE:
                    noise = True
                    break
                self._publish(clean, segmenter, segments)
                if delta.finish_reason:
                    break
        finally:
            await _aclose(stream, self._limits.cancel_timeout_s)
        if not noise:
            self._publish(cleaner.finish(), segmenter, segments)
            self._mark = cleaner.mark
            if segments is not None and (tail := segmenter.flush()) is not None:
                segments.put_nowait(tail)
        if segments is not None:
            segments.put_nowait(None)
        return noise

    def _publish(
        self, clean: str, segmenter: TextSegmenter, segments: asyncio.Queue[Segment | None] | None
    ) -> None:
        if not clean:
            return
        self._emit(TextDelta(text=clean, offset=self._offset))
        self._offset += len(clean)
        self._pieces.append(clean)
        if segments is not None:
            for seg in segmenter.push(clean):
                segments.put_nowait(seg)

    async def _speak(self, segments: asyncio.Queue[Segment | None]) -> None:
        """Synthesise segments in order, each as soon as it is cut, while the LLM goes on."""
        index = 0
        while (seg := await segments.get()) is not None:
            self.playout.segment_started(index, seg.start, seg.end, self._audio_ms)
            seg_ms = 0.0
            stream = aiter(
                self._components.synthesize(
                    seg.text,
                    first_sentence=seg.first,
                    seed=self._settings.seed,
                    request_id=f"{self.id}/{index}",
                )
            )
            try:
                while (
                    chunk := await _next(stream, self._limits.speech_timeout_s, "speech_synth")
                ) is not None:
                    pcm = np.asarray(chunk.pcm, dtype=np.float32).reshape(-1)
                    if pcm.size == 0:
                        continue
                    if chunk.sample_rate <= 0:
                        raise VitaserveError(f"speech_synth returned sample rate {chunk.sample_rate}")
                    rate = int(chunk.sample_rate)
                    pcm16 = pcm_to_int16(pcm).astype("<i2", copy=False).tobytes()
                    for frame in split_frames(pcm16, rate, self._limits.audio_frame_ms):
                        duration = len(frame) / 2 * 1000.0 / rate
                        self._emit(
                            AudioOut(
                                pcm16=frame,
                                sample_rate=rate,
                                text_start=seg.start,
                                text_end=seg.end,
                                seq=self._seq,
                                start_ms=int(round(self._audio_ms)),
                                duration_ms=duration,
                                segment=index,
                            )
                        )
                        if self._first_audio_ms is None:
                            self._first_audio_ms = self._ms_since_commit()
                            self._telemetry.metrics.time_to_first_audio.observe(self._first_audio_ms / 1000.0)
                        self._seq += 1
                        self._audio_ms += duration
                        seg_ms += duration
            finally:
                await _aclose(stream, self._limits.cancel_timeout_s)
            self.playout.segment_finished(index, seg_ms)
            index += 1
