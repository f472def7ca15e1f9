"""Fakes for the orchestrator's unit tests: a scripted `ComponentClient`, a scripted VAD model and a
virtual clock.

`FakeComponents` answers like the real components (shapes, streaming, errors as `VitaserveError`s) but
from a script, and records what it was asked and whether its streams were closed. Gates (`asyncio.Event`)
let a test hold a stream at a chosen point, so ordering and cancellation are tested without sleeps.
`VirtualClock` is the injected clock of paced output: time moves only when the outbox waits for a paced
frame (or a test advances it), so pacing is tested without real sleeps.
Integration tests run the same scenarios through `InProcessComponents` and a real gRPC server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from vitaserve.components.base import (
    COMPONENTS,
    ComponentClient,
    Encoding,
    GenerationParams,
    Health,
    ImageInput,
    SpeechChunk,
    TokenDelta,
)
from vitaserve.errors import VitaserveError

HIDDEN = 8
TILE_ROWS = 256
SPEECH_RATE = 24_000


@dataclass
class StreamRecord:
    """One stream a fake served: its input, the items it yielded, and whether it was closed early."""

    text: str = ""
    yielded: int = 0
    finished: bool = False  # ran to its end
    closed: bool = False  # its generator was closed/cancelled before the end
    first_sentence: bool = False


@dataclass
class FakeComponents(ComponentClient):
    """A scripted `ComponentClient`.

    reply: the LLM's raw pieces (state mark included), one token each.
    llm_gate: if set, (index, event): the LLM waits for `event` before yielding piece `index`.
    speech_chunks: chunks per segment; each chunk is `chunk_ms` of a sine tone.
    speech_gate: (segment index, chunk index, event): synthesis waits there.
    errors: component name -> error raised by that component's next calls.
    hang: components that never answer (to test timeouts).
    warm_gate: if set, a KV warm-up waits for it (a warm-up still running); one cancelled while waiting is
      recorded in `warm_cancelled`.
    barrier: encode_images and encode_audio each wait until the other has started (proves the two run
      concurrently: run one after the other, they time out).
    """

    reply: list[str] = field(
        default_factory=lambda: ["☜", " Hello", " there", ".", " How", " are", " you", "?"]
    )
    llm_gate: tuple[int, asyncio.Event] | None = None
    speech_chunks: int = 2
    chunk_ms: int = 100
    speech_gate: tuple[int, int, asyncio.Event] | None = None
    errors: dict[str, VitaserveError] = field(default_factory=dict)
    hang: set[str] = field(default_factory=set)
    transcript: str = ""  # what encode_audio "heard" (a text family's transcript)
    descriptions: tuple[str, ...] = ()  # what encode_images "saw", per image (a text family)
    barrier: bool = False
    warm_gate: asyncio.Event | None = None
    ready: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, True))
    # Records.
    warm_prompts: list[tuple[str, str]] = field(default_factory=list)  # (session id, prompt prefix)
    warm_cancelled: list[str] = field(default_factory=list)  # prompt prefixes
    image_calls: list[list[ImageInput]] = field(default_factory=list)
    audio_calls: list[np.ndarray] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    media: list[list[np.ndarray]] = field(default_factory=list)
    params: list[GenerationParams] = field(default_factory=list)
    llm_streams: list[StreamRecord] = field(default_factory=list)
    speech_streams: list[StreamRecord] = field(default_factory=list)
    encoders_started: set[str] = field(default_factory=set)
    closed: bool = False

    def __post_init__(self) -> None:
        self._both_started = asyncio.Event()

    async def _enter(self, component: str) -> None:
        if component in self.errors:
            raise self.errors[component]
        if component in self.hang:
            await asyncio.Event().wait()

    async def _meet(self, name: str) -> None:
        self.encoders_started.add(name)
        if not self.barrier:
            return
        if self.encoders_started >= {"vision_encoder", "audio_encoder"}:
            self._both_started.set()
        await asyncio.wait_for(self._both_started.wait(), timeout=2.0)

    async def encode_images(self, images: Sequence[ImageInput], *, request_id: str = "") -> list[Encoding]:
        await self._enter("vision_encoder")
        self.image_calls.append(list(images))
        await self._meet("vision_encoder")
        return [
            Encoding(embeddings=np.full((TILE_ROWS * max(1, img.max_tiles), HIDDEN), k, np.float32),
                     text=self.descriptions[k % len(self.descriptions)] if self.descriptions else "")
            for k, img in enumerate(images)
        ]

    async def encode_audio(self, pcm: np.ndarray, *, request_id: str = "") -> Encoding:
        await self._enter("audio_encoder")
        self.audio_calls.append(np.asarray(pcm))
        await self._meet("audio_encoder")
        # 12.5 rows per second (VITA-1.5), and the transcript a text family's recogniser would give
        return Encoding(embeddings=np.ones((max(1, len(pcm) // 1280), HIDDEN), np.float32), text=self.transcript)

    async def warm_prefix(self, prompt: str, *, session_id: str, request_id: str = "") -> int:
        """Recorded apart from `generate` (the tests of turns count the LLM streams of turns)."""
        self.warm_prompts.append((session_id, prompt))
        if self.warm_gate is not None:
            try:
                await self.warm_gate.wait()
            except asyncio.CancelledError:
                self.warm_cancelled.append(prompt)
                raise
        return 1

    def generate(
        self,
        prompt: str,
        media: Sequence[np.ndarray],
        params: GenerationParams,
        *,
        request_id: str = "",
        session_id: str = "",
    ) -> AsyncIterator[TokenDelta]:
        self.prompts.append(prompt)
        self.media.append(list(media))
        self.params.append(params)
        record = StreamRecord(text="".join(self.reply))
        self.llm_streams.append(record)
        return self._generate(record, params)

    async def _generate(self, record: StreamRecord, params: GenerationParams) -> AsyncIterator[TokenDelta]:
        try:
            await self._enter("llm_decoder")
            pieces = self.reply[: params.max_tokens]
            for i, piece in enumerate(pieces):
                if self.llm_gate is not None and self.llm_gate[0] == i:
                    await self.llm_gate[1].wait()
                await asyncio.sleep(0)  # a real stream yields to the loop between tokens
                last = i == len(pieces) - 1
                finish = ("length" if len(pieces) < len(self.reply) else "stop") if last else None
                record.yielded += 1
                record.finished = last  # a consumer may close the stream once it has the finish reason
                yield TokenDelta(token_id=1000 + i, text=piece, finish_reason=finish)
            record.finished = True
        finally:
            record.closed = not record.finished

    def synthesize(
        self, text: str, *, first_sentence: bool = False, seed: int | None = None, request_id: str = ""
    ) -> AsyncIterator[SpeechChunk]:
        record = StreamRecord(text=text, first_sentence=first_sentence)
        self.speech_streams.append(record)
        return self._synthesize(record, len(self.speech_streams) - 1)

    async def _synthesize(self, record: StreamRecord, segment: int) -> AsyncIterator[SpeechChunk]:
        try:
            await self._enter("speech_synth")
            n = SPEECH_RATE * self.chunk_ms // 1000
            t = np.arange(n, dtype=np.float32) / SPEECH_RATE
            for c in range(self.speech_chunks):
                if self.speech_gate is not None and self.speech_gate[:2] == (segment, c):
                    await self.speech_gate[2].wait()
                await asyncio.sleep(0)
                record.yielded += 1
                yield SpeechChunk(
                    pcm=0.3 * np.sin(2 * np.pi * 220 * t).astype(np.float32), sample_rate=SPEECH_RATE
                )
            record.finished = True
        finally:
            record.closed = not record.finished

    async def health(self) -> Health:
        return Health(ready=dict(self.ready))

    async def close(self) -> None:
        self.closed = True


class ScriptedVad:
    """A `VadModel` returning probabilities from a script (one per 512-sample window; 0 after it)."""

    window_samples = 512

    def __init__(self, probabilities: Sequence[float]) -> None:
        self.probabilities = list(probabilities)
        self.calls = 0

    def probability(self, window: np.ndarray) -> float:
        assert window.shape == (self.window_samples,) and window.dtype == np.float32
        p = self.probabilities[self.calls] if self.calls < len(self.probabilities) else 0.0
        self.calls += 1
        return p

    def reset(self) -> None:
        self.calls = 0


class VirtualClock:
    """A clock (`clock()` -> seconds) that skips every wait: `sleep(d)` and `advance(d)` move it forward by
    `d` at once. `realtime=True`: it also runs with real time (durations the code under test measures, its
    timings, stay real); False: time moves only by `sleep` and `advance` (exact, whatever the machine's
    load).

    Pass `clock` as the clock and `clock.sleep` as the outbox's sleep: a paced frame due in 0.1 s is then
    sent after a virtual 0.1 s, at once in real time."""

    def __init__(self, *, realtime: bool = True) -> None:
        self.skipped = 1000.0
        self.realtime = realtime
        self.slept: list[float] = []

    def __call__(self) -> float:
        return (time.monotonic() if self.realtime else 0.0) + self.skipped

    def advance(self, seconds: float) -> None:
        self.skipped += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.skipped += max(0.0, seconds)
        await asyncio.sleep(0)
