"""The outgoing side of one stream: the event queue with paced audio, the response id gate and playout.

`Outbox` is the only way events reach the client. It keeps one queue and is drained by the servicer. Events
leave in the order they were put, except that a response's audio frames are paced (pacing.py): a frame
waits until the client's buffer has room under the playout lead (or while the barge-in policy holds the
response), and the events that must follow that audio (the response's done or error event, its later
frames) wait with it. Everything else — text deltas, speech started/stopped, interrupted, errors about
client events — passes paced audio at once.

Its gate makes interruption safe: `close_response(id)` drops that response's queued data events (text, audio,
done, its error) and every one put later, in the same event-loop step, so no audio of a cancelled response can be
sent after the interruption, whatever the producers are still doing. Producers never wait on the queue
(a response is bounded by its token limit; the whole queue by `max_pending`, beyond which the stream is
ended), so cancellation never waits behind a slow client.

`Playout` counts what was actually handed to the transport, per response: audio milliseconds sent and,
per text segment, how much of its audio went out; its `PlaybackModel` infers what the client has played
by now. `heard_text` aligns the reply text to the played audio by segment spans (a segment's audio speaks
the span [start, end) of the reply).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from vitaserve.errors import ResourceExhausted
from vitaserve_orchestrator.events import (
    GATED_EVENTS,
    AudioOut,
    Envelope,
    ErrorEvent,
    ResponseDone,
    ServerEvent,
    TextDelta,
)
from vitaserve_orchestrator.pacing import PlaybackModel

# Interrupted responses whose ids the gate remembers; producers of older ones are long gone.
_GATE_MEMORY = 256
# Events of a response that keep their place behind its paced audio.
_AFTER_AUDIO = (AudioOut, ResponseDone, ErrorEvent)


@dataclass
class SegmentPlayout:
    """One text segment of a reply and its audio: `start_ms` where it begins in the reply audio,
    `total_ms` its full duration once synthesis finished (None while running), `sent_ms` how much was
    sent."""

    start: int
    end: int
    start_ms: float
    total_ms: float | None = None
    sent_ms: float = 0.0


class Playout:
    """Playout accounting of one response (filled by the producer and by the `Outbox` as it sends).

    `lead_ms`: the playout lead of the session (pacing.py). `clock`: the stream's clock; `Outbox.watch`
    sets it to the outbox's own, so pacing and the played estimate use one time base."""

    def __init__(self, lead_ms: float = 300.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.segments: dict[int, SegmentPlayout] = {}
        self.sent_ms = 0.0
        self.sent_text_end = 0  # reply text sent so far, in code points
        self.client_played_ms: int | None = None  # the client's own PlaybackPosition report
        self.playback = PlaybackModel(lead_ms)
        self.clock = clock
        # Barge-in holds of this response's audio: how many, and for how long (seconds, the stream's clock).
        self.holds = 0
        self._held_s = 0.0
        self._held_since: float | None = None

    def segment_started(self, index: int, start: int, end: int, start_ms: float) -> None:
        self.segments[index] = SegmentPlayout(start, end, start_ms)

    def segment_finished(self, index: int, total_ms: float) -> None:
        self.segments[index].total_ms = total_ms

    @property
    def held(self) -> bool:
        return self.playback.held

    @held.setter
    def held(self, value: bool) -> None:
        if value == self.playback.held:
            return
        now = self.clock()
        if value:
            self.holds += 1
            self._held_since = now
        elif self._held_since is not None:
            self._held_s += now - self._held_since
            self._held_since = None
        self.playback.held = value

    @property
    def held_ms(self) -> float:
        """How long the barge-in policy has held this response's audio so far (a running hold included)."""
        running = 0.0 if self._held_since is None else self.clock() - self._held_since
        return (self._held_s + running) * 1000.0

    def on_sent(self, event: ServerEvent) -> None:
        if isinstance(event, AudioOut):
            self.playback.on_sent(event.duration_ms, self.clock())
            self.sent_ms += event.duration_ms
            seg = self.segments.get(event.segment)
            if seg is not None:
                seg.sent_ms += event.duration_ms
        elif isinstance(event, TextDelta):
            self.sent_text_end = max(self.sent_text_end, event.offset + len(event.text))

    @property
    def played_ms(self) -> float:
        """Audio the user heard by now: what was sent minus what the client still has buffered (paced
        playout), or less if the client reported an earlier playback position."""
        estimate = max(0.0, self.sent_ms - self.playback.buffered_ms(self.clock()))
        if self.client_played_ms is None:
            return estimate
        return min(estimate, float(self.client_played_ms))

    def heard_text(self, text: str, played_ms: float) -> str:
        """The prefix of the reply `text` spoken by the first `played_ms` of its audio.

        Whole segments count when all their audio was played. In a partly played segment whose total
        duration is known, a share of its characters proportional to the played share of its audio is
        kept, cut back to a word boundary; a partly played segment still being synthesised counts for
        nothing (its length is unknown)."""
        end = 0
        for index in sorted(self.segments):
            seg = self.segments[index]
            if seg.start_ms >= played_ms:
                break
            heard = played_ms - seg.start_ms
            if seg.total_ms is not None and heard >= seg.total_ms - 1e-6:
                end = seg.end
                continue
            if seg.total_ms:
                cut = seg.start + math.floor((seg.end - seg.start) * heard / seg.total_ms)
                cut = _word_boundary(text, seg.start, cut)
                while cut > seg.start and text[cut - 1].isspace():
                    cut -= 1
                end = max(end, cut)
            break
        return text[:end]


def _word_boundary(text: str, start: int, cut: int) -> int:
    """`cut` moved back to the end of the last whole word when it falls inside a word of a script
    written with spaces; other scripts (Chinese) are cut at `cut` as they are."""
    if cut <= start or cut >= len(text) or not (text[cut - 1].isalnum() and text[cut].isalnum()):
        return cut
    if not text[cut].isascii():
        return cut
    space = text.rfind(" ", start, cut)
    return space if space >= start else start


class Outbox:
    """The ordered queue of `Envelope`s of one stream, with paced audio and the response id gate.

    `lead_ms`: the default playout lead (a response's `Playout` brings its session's own). `sleep`: how to
    wait for the next paced frame; None waits on the event loop (real time). Tests pass a virtual clock's
    sleep, so pacing runs without real waits. `max_pending`: more queued events than this overflow the
    outbox (the client does not read what it asks for): it drops its queue, closes, and `overflow` says why."""

    def __init__(
        self,
        session_id: str = "",
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        max_pending: int | None = None,
    ) -> None:
        self.session_id = session_id
        self._clock = clock
        self._sleep = sleep
        self._origin = clock()
        self._queue: deque[Envelope] = deque()
        self._ready = asyncio.Event()
        self._closed = False
        self._gated: deque[str] = deque(maxlen=_GATE_MEMORY)
        self._playouts: dict[str, Playout] = {}
        self._on_sent: dict[str, Callable[[ServerEvent], None]] = {}
        # When the client finishes playing the last audio sent (a finished response's tail still plays).
        self._play_end: float | None = None
        self._max_pending = max_pending
        self.overflow: ResourceExhausted | None = None  # set once `max_pending` was exceeded

    def now_ms(self) -> float:
        return (self._clock() - self._origin) * 1000.0

    def put(self, event: ServerEvent, *, turn_id: str = "", response_id: str = "") -> bool:
        """Queue an event; returns False if it was dropped (stream closed, or a data event of a closed
        response)."""
        if self._closed or (response_id and isinstance(event, GATED_EVENTS) and response_id in self._gated):
            return False
        if self._max_pending is not None and len(self._queue) >= self._max_pending:
            # Only a client that does not read its stream lets this many wait: end it instead of growing.
            self.overflow = ResourceExhausted(
                f"the client did not read the stream: more than {self._max_pending} events were waiting "
                "(VITASERVE_MAX_PENDING_EVENTS); the stream is closed, the session is saved")
            self._queue.clear()
            self.close()
            return False
        self._queue.append(Envelope(event, self.session_id, turn_id, response_id, self.now_ms()))
        self._ready.set()
        return True

    def watch(self, response_id: str, playout: Playout, on_sent: Callable[[ServerEvent], None]) -> None:
        """Pace and account this response's events as they are sent: `playout.on_sent`, then `on_sent`.
        Its audio plays after what the client still has of an earlier response."""
        playout.clock = self._clock
        playout.playback.continue_after(self._play_end, self._clock())
        self._playouts[response_id] = playout
        self._on_sent[response_id] = on_sent

    def unwatch(self, response_id: str) -> None:
        self._playouts.pop(response_id, None)
        self._on_sent.pop(response_id, None)

    def kick(self) -> None:
        """Re-check paced audio now (a response was held or released)."""
        self._ready.set()

    def close_response(self, response_id: str) -> None:
        """The gate: drop every queued and future data event of `response_id`. The client drops what it
        has buffered of it when it gets `interrupted`, so nothing of it plays any more."""
        if response_id in self._gated:
            return
        self._gated.append(response_id)
        self._queue = deque(
            env
            for env in self._queue
            if not (env.response_id == response_id and isinstance(env.event, GATED_EVENTS))
        )
        if response_id in self._playouts:
            self._play_end = None
        self.unwatch(response_id)
        self._ready.set()

    def close(self) -> None:
        """No more events are accepted; `get` returns what is queued (paced), then None."""
        self._closed = True
        self._ready.set()

    @property
    def closed(self) -> bool:
        return self._closed

    def pending(self) -> int:
        return len(self._queue)

    def _take(self, now: float) -> tuple[Envelope | None, float | None]:
        """The first event that may be sent at `now`; else None and the time the next paced frame is
        due (None: nothing is due until something changes)."""
        waiting: set[str] = set()  # responses whose next audio frame is not due
        next_due: float | None = None
        for i, env in enumerate(self._queue):
            rid = env.response_id
            if rid in waiting and isinstance(env.event, _AFTER_AUDIO):
                continue
            if isinstance(env.event, AudioOut) and (playout := self._playouts.get(rid)) is not None:
                if not playout.playback.is_due(env.event.duration_ms, now):
                    waiting.add(rid)
                    due = playout.playback.due_at(env.event.duration_ms)
                    if due is not None:
                        next_due = due if next_due is None else min(next_due, due)
                    continue
            del self._queue[i]
            return env, None
        return None, next_due

    async def _wait(self, timeout_s: float | None) -> None:
        if timeout_s is None:
            await self._ready.wait()
        elif self._sleep is not None:
            await self._sleep(timeout_s)
        else:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._ready.wait()
            except TimeoutError:
                pass

    def poll(self) -> Envelope | None:
        """The next event that may be sent now, without waiting (None if nothing may); accounted as sent."""
        now = self._clock()
        env, _ = self._take(now)
        return None if env is None else self._sent(env, now)

    async def get(self) -> Envelope | None:
        """The next event to send (None once closed and drained), waiting for paced audio to be due.
        Sending is accounted here."""
        while True:
            now = self._clock()
            env, due = self._take(now)
            if env is not None:
                return self._sent(env, now)
            if self._closed and not self._queue:
                return None
            self._ready.clear()
            await self._wait(None if due is None else max(0.0, due - now))

    def _sent(self, env: Envelope, now: float) -> Envelope:
        # Stamped when sent, so t_ms rises along the stream although paced audio is passed by other events.
        env = dataclasses.replace(env, t_ms=(now - self._origin) * 1000.0)
        playout = self._playouts.get(env.response_id)
        if playout is not None and isinstance(env.event, ResponseDone):
            # Its timings are final only now: the response's audio, held or not, has all gone out before it.
            timings = dataclasses.replace(env.event.timings, holds=playout.holds, held_ms=playout.held_ms)
            env = dataclasses.replace(env, event=dataclasses.replace(env.event, timings=timings))
        if playout is not None:
            playout.on_sent(env.event)
            if isinstance(env.event, AudioOut):
                self._play_end = playout.playback.play_end
            self._on_sent[env.response_id](env.event)
        return env

    def __aiter__(self) -> Outbox:
        return self

    async def __anext__(self) -> Envelope:
        env = await self.get()
        if env is None:
            raise StopAsyncIteration
        return env
