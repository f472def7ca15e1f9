"""Unit tests of `InProcessComponents`: the async interface over the engines, error propagation, and
cancellation (closing the iterator or cancelling the consuming task stops the engine early)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from vitaserve.components.base import GenerationParams, ImageInput, SpeechChunk, TokenDelta
from vitaserve.components.inprocess import InProcessComponents
from vitaserve.errors import InvalidInput, Unavailable

pytestmark = pytest.mark.unit


class CountingLLM:
    """The real LLM engine, counting the tokens it produces on the worker thread."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.produced = 0
        self.finished = threading.Event()

    def generate(self, prompt, media, params, is_cancelled, session_id="") -> Iterator[TokenDelta]:  # noqa: ANN001
        inner = self.engine.generate(prompt, media, params, is_cancelled, session_id=session_id)

        def run() -> Iterator[TokenDelta]:
            try:
                for delta in inner:
                    self.produced += delta.token_id is not None
                    yield delta
            finally:
                self.finished.set()

        return run()


@pytest.fixture()
def client(family_engines) -> Iterator[InProcessComponents]:
    client = InProcessComponents(engines=family_engines)
    yield client
    asyncio.run(client.close())


def test_encoders_and_health(client, engines, images, speech_pcm) -> None:
    async def run() -> tuple:
        embeds = await client.encode_images([ImageInput(images["wide"]), ImageInput(images["tall"], 4)])
        audio = await client.encode_audio(speech_pcm)
        return embeds, audio, await client.health()

    embeds, audio, health = asyncio.run(run())
    assert [e.embeddings.shape for e in embeds] == [(256, 64), (5 * 256, 64)]
    assert [e.text for e in (*embeds, audio)] == ["", "", ""]  # VITA-1.5's encoders give rows only
    np.testing.assert_array_equal(audio.embeddings, engines["audio_encoder"].encode([speech_pcm])[0])
    assert health.all_ready and set(health.ready) == {"vision_encoder", "audio_encoder", "llm_decoder",
                                                       "speech_synth"}


def test_generate_and_synthesize_stream(client, engines, make_prompt, images) -> None:
    async def run() -> tuple[list[TokenDelta], list[SpeechChunk]]:
        embeds = await client.encode_images([ImageInput(images["square"])])
        deltas = [d async for d in client.generate(make_prompt(1), [embeds[0].embeddings],
                                                   GenerationParams(max_tokens=6))]
        chunks = [c async for c in client.synthesize("Hi there.", first_sentence=True, seed=5)]
        return deltas, chunks

    deltas, chunks = asyncio.run(run())
    assert len(deltas) == 7 and deltas[-1].finish_reason == "length"
    direct_embeds = engines["vision_encoder"].encode([ImageInput(images["square"])])
    direct = engines["llm_decoder"].generate(make_prompt(1), direct_embeds, GenerationParams(max_tokens=6))
    assert [d.token_id for d in deltas] == [d.token_id for d in direct]
    assert chunks and all(c.sample_rate == 24000 and c.pcm.dtype == np.float32 for c in chunks)
    expected = np.concatenate(list(engines["speech_synth"].synthesize("Hi there.", True, 5)))
    np.testing.assert_array_equal(np.concatenate([c.pcm for c in chunks]), expected)


def test_errors_propagate_as_vitaserve_errors(client, make_prompt, images) -> None:
    async def run() -> None:
        with pytest.raises(InvalidInput, match="unrecognised image format"):
            await client.encode_images([ImageInput(b"junk")])
        with pytest.raises(InvalidInput, match="too short"):
            await client.encode_audio(np.zeros(10, np.float32))
        with pytest.raises(InvalidInput, match="1 media placeholder"):
            async for _ in client.generate(make_prompt(1), [], GenerationParams(max_tokens=4)):
                pass
        with pytest.raises(InvalidInput, match="max_tokens"):
            async for _ in client.generate(make_prompt(0, text="hi"), [], GenerationParams(max_tokens=0)):
                pass

    asyncio.run(run())


def _cancellation_client(engines: Any) -> tuple[InProcessComponents, CountingLLM]:
    counting = CountingLLM(engines["llm_decoder"])
    return InProcessComponents(engines={**engines, "llm_decoder": counting}), counting  # LLM calls only


def test_aclose_stops_the_engine_before_the_next_token(engines, make_prompt) -> None:
    client, counting = _cancellation_client(engines)

    async def run() -> int:
        stream = client.generate(make_prompt(0, text="hi"), [], GenerationParams(max_tokens=8192))
        received = 0
        async for _ in stream:
            received += 1
            if received == 3:
                break
        await stream.aclose()
        return received

    try:
        received = asyncio.run(run())
        assert counting.finished.wait(5), "the engine thread did not stop"
    finally:
        asyncio.run(client.close())
    # The worker may run ahead of the consumer by the tokens already queued (4 here); nowhere near 8192.
    assert received == 3 and counting.produced < 200


def test_task_cancel_stops_the_engine(engines, make_prompt) -> None:
    client, counting = _cancellation_client(engines)
    first_token = asyncio.Event()

    async def consume() -> None:
        async for _ in client.generate(make_prompt(0, text="hi"), [], GenerationParams(max_tokens=8192)):
            first_token.set()

    async def run() -> None:
        task = asyncio.create_task(consume())
        await asyncio.wait_for(first_token.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        started = time.monotonic()
        asyncio.run(run())
        assert counting.finished.wait(5), "the engine thread did not stop"
        elapsed = time.monotonic() - started
    finally:
        asyncio.run(client.close())
    assert counting.produced < 200
    assert elapsed < 5


def test_missing_component_is_unavailable(engines) -> None:
    client = InProcessComponents(engines=engines, components=["vision_encoder"])
    try:
        with pytest.raises(Unavailable, match="llm_decoder"):
            client.generate("x", [], GenerationParams())
        health = asyncio.run(client.health())
        assert health.ready == {"vision_encoder": True}
    finally:
        asyncio.run(client.close())
    with pytest.raises(Unavailable, match="closed"):
        client.engine("vision_encoder")


def test_loads_only_the_requested_components(tiny_checkpoint) -> None:
    client = InProcessComponents(tiny_checkpoint, components=["audio_encoder"])
    try:
        assert asyncio.run(client.health()).ready == {"audio_encoder": True}
        with pytest.raises(Unavailable):
            client.engine("speech_synth")
    finally:
        asyncio.run(client.close())
    with pytest.raises(ValueError, match="unknown component"):
        InProcessComponents(tiny_checkpoint, components=["nope"])
