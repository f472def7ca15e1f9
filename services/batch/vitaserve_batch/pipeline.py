"""One batch item through the four components: the offline counterpart of the orchestrator's turn.

The steps are the orchestrator's (`vitaserve_orchestrator.turn`), built from the same library functions,
without streaming to a client:

1. encode: images (tiled, up to `max_tiles`) or video frames (one tile each) through the vision encoder
   and the audio through the audio encoder, in parallel; what they return is the model family's
   (`vitaserve.families`): LLM rows (VITA-1.5) or text (the small family: descriptions, a transcript);
2. prompt: the family renders the item (`ModelFamily.llm_request`) with its offline system prompt for the
   media ('image' or 'video') unless the item gives its own;
3. generate: the whole reply is collected; `strip_state_marks` removes the leading state mark. A ☟ (noise)
   reply has no text and no audio;
4. speak (want_audio): the text is cut with the family's segmenter and each segment synthesised in
   order; the PCM pieces are concatenated into one 24 kHz waveform.

Every wait is bounded (`encode_timeout_s`, `first_token_timeout_s`, the whole item `item_timeout_s`); a
timeout is `Unavailable` (retryable), like a component that cannot be reached.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vitaserve.components.base import ComponentClient, GenerationParams
from vitaserve.errors import Unavailable, VitaserveError
from vitaserve.families import ModelFamily, TurnContent, get_family
from vitaserve.models.configs import SPEECH_SAMPLE_RATE
from vitaserve.models.prompt import DEFAULT_MAX_USER_CHARS, MARK_NOISE, strip_state_marks
from vitaserve_batch.media import ItemMedia


@dataclass(frozen=True)
class PipelineConfig:
    max_tokens: int = 128
    temperature: float = 0.0
    seed: int | None = None
    want_audio: bool = False
    system_prompt: str | None = None
    family: str = ""  # the model family (`vitaserve.families`); empty = the default
    encode_timeout_s: float = 60.0
    first_token_timeout_s: float = 120.0
    item_timeout_s: float = 300.0


@dataclass
class Answer:
    """What one item produced. `pcm`: float32 mono at `sample_rate` (empty without audio). `transcript`:
    the family's transcript of the item's audio (empty if it gives none)."""

    text: str
    state_mark: str
    tokens: int
    pcm: np.ndarray
    sample_rate: int = SPEECH_SAMPLE_RATE
    timings: dict[str, float] = field(default_factory=dict)
    transcript: str = ""


async def answer_item(
    components: ComponentClient,
    media: ItemMedia,
    prompt_text: str,
    config: PipelineConfig,
    *,
    request_id: str,
    clock: Callable[[], float] = time.monotonic,
) -> Answer:
    """Run one item; raises `VitaserveError` (InvalidInput for bad media, Unavailable when a component is
    down or too slow)."""
    try:
        async with asyncio.timeout(config.item_timeout_s):
            return await _answer(components, media, prompt_text, config, request_id, clock)
    except TimeoutError:
        raise Unavailable(f"the item did not finish within {config.item_timeout_s:g} s") from None


async def _answer(components: ComponentClient, media: ItemMedia, prompt_text: str, config: PipelineConfig,
                  request_id: str, clock: Callable[[], float]) -> Answer:
    t0 = clock()
    timings: dict[str, float] = {}

    def ms() -> float:
        return round((clock() - t0) * 1000.0, 1)

    family = get_family(config.family)
    content = await _encode(components, family, media, prompt_text, config.encode_timeout_s, request_id)
    timings["encode_ms"] = ms()
    system = config.system_prompt or family.system_prompt(content.media_kind, realtime=False)
    request = family.llm_request([], content, system=system, max_chars=DEFAULT_MAX_USER_CHARS)
    params = GenerationParams(max_tokens=config.max_tokens, temperature=config.temperature, seed=config.seed)
    pieces: list[str] = []
    tokens = 0
    stream = aiter(components.generate(request.prompt, list(request.media), params, request_id=request_id))
    try:
        while True:
            try:
                timeout = config.first_token_timeout_s if tokens == 0 else config.item_timeout_s
                async with asyncio.timeout(timeout):
                    delta = await anext(stream)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise Unavailable(f"llm_decoder sent nothing for {timeout:g} s") from None
            if delta.token_id is not None:
                tokens += 1
                timings.setdefault("first_token_ms", ms())
            pieces.append(delta.text)
            if delta.finish_reason:
                break
    finally:
        await stream.aclose()
    timings["generate_ms"] = ms()
    text, mark = strip_state_marks("".join(pieces))
    if mark == MARK_NOISE:
        text = ""
    pcm = np.zeros(0, dtype=np.float32)
    rate = SPEECH_SAMPLE_RATE
    if config.want_audio and text.strip():
        pcm, rate = await _speak(components, family, text, config.seed, request_id)
        timings["speech_ms"] = ms()
    timings["total_ms"] = ms()
    return Answer(text=text, state_mark=mark or "", tokens=tokens, pcm=pcm, sample_rate=rate, timings=timings,
                  transcript=content.transcript)


async def _encode(components: ComponentClient, family: ModelFamily, media: ItemMedia, text: str,
                  timeout_s: float, request_id: str) -> TurnContent:
    pictures = [*media.images, *media.frames]
    try:
        async with asyncio.timeout(timeout_s), asyncio.TaskGroup() as group:
            vision = group.create_task(components.encode_images(pictures, request_id=request_id)) \
                if pictures else None
            audio = group.create_task(components.encode_audio(media.audio, request_id=request_id)) \
                if media.audio is not None else None
    except TimeoutError:
        raise Unavailable(f"the encoders did not answer within {timeout_s:g} s") from None
    except BaseExceptionGroup as group_error:
        raise _first_error(group_error) from None
    encodings = vision.result() if vision is not None else []
    return family.turn_content(text, media.images, media.frames, encodings,
                               audio.result() if audio is not None else None)


async def _speak(components: ComponentClient, family: ModelFamily, text: str, seed: int | None,
                 request_id: str) -> tuple[np.ndarray, int]:
    segmenter = family.segmenter()
    segments = segmenter.push(text)
    if (tail := segmenter.flush()) is not None:
        segments.append(tail)
    pieces: list[np.ndarray] = []
    rate = SPEECH_SAMPLE_RATE
    for index, seg in enumerate(segments):
        async for chunk in components.synthesize(seg.text, first_sentence=seg.first, seed=seed,
                                                 request_id=f"{request_id}/{index}"):
            pcm = np.asarray(chunk.pcm, dtype=np.float32).reshape(-1)
            if pcm.size == 0:
                continue
            if chunk.sample_rate != rate:
                raise VitaserveError(f"speech_synth returned sample rate {chunk.sample_rate}, "
                                     f"expected {rate}")
            pieces.append(pcm)
    return (np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)), rate


def _first_error(group: BaseExceptionGroup) -> BaseException:
    leaves = list(_leaves(group))
    return next((e for e in leaves if isinstance(e, VitaserveError)), leaves[0])


def _leaves(exc: BaseException):  # noqa: ANN202 - generator of the leaf exceptions of a group
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc
