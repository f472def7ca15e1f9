"""The outgoing side of one stream: the ordered event queue, the response id gate and playout accounting.

`Outbox` is the only way events reach the client. It keeps one FIFO and is drained by the servicer. Its
gate makes interruption safe: `close_response(id)` drops that response's queued data events (text, audio,
done, its error) and every one put later, in the same event-loop step, so no audio of a cancelled response can be
sent after the interruption, whatever the producers are still doing. Producers never wait on the queue
(it is unbounded; a response is bounded by its token limit), so cancellation never waits behind a slow
client.

`Playout` counts what was actually handed to the transport, per response: audio milliseconds sent and,
per text segment, how much of its audio went out. `heard_text` aligns the reply text to the played audio
by segment spans (a segment's audio speaks the span [start, end) of the reply).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vitaserve_orchestrator.events import GATED_EVENTS, AudioOut, Envelope, ServerEvent, TextDelta

# Interrupted responses whose ids the gate remembers; producers of older ones are long gone.
_GATE_MEMORY = 256


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
    """Playout accounting of one response (filled by the producer and by the `Outbox` as it sends)."""

    def __init__(self) -> None:
        self.segments: dict[int, SegmentPlayout] = {}
        self.sent_ms = 0.0
        self.sent_text_end = 0  # reply text sent so far, in code points
        self.client_played_ms: int | None = None  # the client's own PlaybackPosition report

    def segment_started(self, index: int, start: int, end: int, start_ms: float) -> None:
        self.segments[index] = SegmentPlayout(start, end, start_ms)

    def segment_finished(self, index: int, total_ms: float) -> None:
        self.segments[index].total_ms = total_ms

    def on_sent(self, event: ServerEvent) -> None:
        if isinstance(event, AudioOut):
            self.sent_ms += event.duration_ms
            seg = self.segments.get(event.segment)
            if seg is not None:
                seg.sent_ms += event.duration_ms
        elif isinstance(event, TextDelta):
            self.sent_text_end = max(self.sent_text_end, event.offset + len(event.text))

    @property
    def played_ms(self) -> float:
        """Audio the user heard: what was sent, or less if the client reported its playback position
        (real playback pacing is the client's; the server only knows what it sent)."""
        if self.client_played_ms is None:
            return self.sent_ms
        return min(self.sent_ms, float(self.client_played_ms))

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
    """The ordered queue of `Envelope`s of one stream, with the response id gate."""

    def __init__(self, session_id: str = "", *, clock: Callable[[], float] = time.monotonic) -> None:
        self.session_id = session_id
        self._clock = clock
        self._origin = clock()
        self._queue: deque[Envelope] = deque()
        self._ready = asyncio.Event()
        self._closed = False
        self._gated: deque[str] = deque(maxlen=_GATE_MEMORY)
        self._playouts: dict[str, Playout] = {}
        self._on_sent: dict[str, Callable[[ServerEvent], None]] = {}

    def now_ms(self) -> float:
        return (self._clock() - self._origin) * 1000.0

    def put(self, event: ServerEvent, *, turn_id: str = "", response_id: str = "") -> bool:
        """Queue an event; returns False if it was dropped (stream closed, or a data event of a closed
        response)."""
        if self._closed or (response_id and isinstance(event, GATED_EVENTS) and response_id in self._gated):
            return False
        self._queue.append(Envelope(event, self.session_id, turn_id, response_id, self.now_ms()))
        self._ready.set()
        return True

    def watch(self, response_id: str, playout: Playout, on_sent: Callable[[ServerEvent], None]) -> None:
        """Account this response's events as they are sent: `playout.on_sent`, then `on_sent`."""
        self._playouts[response_id] = playout
        self._on_sent[response_id] = on_sent

    def unwatch(self, response_id: str) -> None:
        self._playouts.pop(response_id, None)
        self._on_sent.pop(response_id, None)

    def close_response(self, response_id: str) -> None:
        """The gate: drop every queued and future data event of `response_id`."""
        if response_id in self._gated:
            return
        self._gated.append(response_id)
        self._queue = deque(
            env
            for env in self._queue
            if not (env.response_id == response_id and isinstance(env.event, GATED_EVENTS))
        )
        self.unwatch(response_id)

    def close(self) -> None:
        """No more events are accepted; `get` returns what is queued, then None."""
        self._closed = True
        self._ready.set()

    @property
    def closed(self) -> bool:
        return self._closed

    def pending(self) -> int:
        return len(self._queue)

    async def get(self) -> Envelope | None:
        """The next event to send (None once closed and drained). Sending is accounted here."""
        while not self._queue:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        env = self._queue.popleft()
        playout = self._playouts.get(env.response_id)
        if playout is not None:
            playout.on_sent(env.event)
            self._on_sent[env.response_id](env.event)
        return env

    def __aiter__(self) -> Outbox:
        return self

    async def __anext__(self) -> Envelope:
        env = await self.get()
        if env is None:
            raise StopAsyncIteration
        return env
