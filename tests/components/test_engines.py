"""Unit tests of the component engines on the tiny golden checkpoint: shapes, batching, validation,
streaming, cancellation and the speech output format."""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np
import pytest

from vitaserve.components.base import GenerationParams, ImageInput
from vitaserve.components.engines import (
    SPEECH_MAX_CODES,
    LLMEngine,
    SpeechEngine,
    check_generation_params,
    speech_code_limit,
)
from vitaserve.errors import InvalidInput
from vitaserve.models.configs import CODEC_SAMPLES_PER_TOKEN, SPEECH_SAMPLE_RATE

pytestmark = pytest.mark.unit

H = 64  # hidden size of the tiny LLM


def cancel_after(n: int) -> Any:
    """An is_cancelled() that turns true on its (n+1)-th call; `.calls` counts the calls."""

    def is_cancelled() -> bool:
        is_cancelled.calls += 1
        return is_cancelled.calls > n

    is_cancelled.calls = 0
    return is_cancelled


# ---- vision ----------------------------------------------------------------------------------------


def test_vision_rows_per_tile(engines, images) -> None:
    vision = engines["vision_encoder"]
    one, wide, tall = vision.encode([ImageInput(images["wide"], 1), ImageInput(images["wide"], 12),
                                     ImageInput(images["tall"], 4)])
    assert one.shape == (256, H) and one.dtype == np.float32
    # 800x600 with up to 12 tiles: a 4x3 grid + thumbnail; 300x1200 with up to 4: 1x4 + thumbnail.
    assert wide.shape == (13 * 256, H)
    assert tall.shape == (5 * 256, H)
    assert np.isfinite(wide).all()


def test_vision_batch_equals_one_by_one(engines, images) -> None:
    vision = engines["vision_encoder"]
    inputs = [ImageInput(images["wide"], 2), ImageInput(images["square"], 1), ImageInput(images["tall"], 1)]
    batched = vision.encode(inputs)
    for image, rows in zip(inputs, batched):
        np.testing.assert_allclose(rows, vision.encode([image])[0], rtol=1e-5, atol=1e-5)


def test_vision_forward_chunks_give_the_same_rows(checkpoint, engines, images) -> None:
    from vitaserve.components.engines import VisionEngine

    small = VisionEngine(checkpoint, max_forward_tiles=2)
    image = ImageInput(images["wide"], 4)  # 5 tiles: chunks of 2, 2, 1
    np.testing.assert_allclose(small.encode([image])[0], engines["vision_encoder"].encode([image])[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("data, match", [
    (b"", "empty"),
    (b"not an image at all", "unrecognised image format"),
])
def test_vision_rejects_bad_bytes(engines, data: bytes, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        engines["vision_encoder"].encode([ImageInput(data)])


def test_vision_rejects_truncated_png(engines, images) -> None:
    with pytest.raises(InvalidInput, match="corrupt or truncated"):
        engines["vision_encoder"].encode([ImageInput(images["wide"][: len(images["wide"]) // 2])])


@pytest.mark.parametrize("max_tiles", [0, 13, -1, True, 1.5])
def test_vision_rejects_max_tiles(engines, images, max_tiles: Any) -> None:
    with pytest.raises(InvalidInput, match="max_tiles"):
        engines["vision_encoder"].preprocess(ImageInput(images["wide"], max_tiles))


def test_vision_pixel_limit(checkpoint, images) -> None:
    from vitaserve.components.engines import VisionEngine

    with pytest.raises(InvalidInput, match="too large"):
        VisionEngine(checkpoint, max_pixels=1000).encode([ImageInput(images["wide"])])


# ---- audio -----------------------------------------------------------------------------------------


def test_audio_tokens_per_second(engines, speech_pcm) -> None:
    rows = engines["audio_encoder"].encode([speech_pcm])[0]
    # 2.3 s -> 228 fbank frames -> 56 encoder frames -> 28 tokens (12.5 per second).
    assert rows.shape == (28, H) and rows.dtype == np.float32


def test_audio_batch_equals_one_by_one(engines, speech_pcm) -> None:
    audio = engines["audio_encoder"]
    waves = [speech_pcm, speech_pcm[:8000], speech_pcm[5000:30000]]
    batched = audio.encode(waves)
    assert [b.shape[0] for b in batched] == [28, 6, 19]
    for wave, rows in zip(waves, batched):
        np.testing.assert_allclose(rows, audio.encode([wave])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pcm, match", [
    (np.zeros(100, np.float32), "too short"),
    (np.zeros((2, 16000), np.float32), "1-D"),
    (np.zeros(16000, np.int16), "floating point"),
    (np.full(16000, np.nan, np.float32), "NaN"),
    (np.zeros(16000 * 61, np.float32), "limit is 60"),
])
def test_audio_rejects_bad_pcm(engines, pcm: np.ndarray, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        engines["audio_encoder"].encode([pcm])


# ---- LLM -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(engines, images, speech_pcm) -> list[np.ndarray]:
    return [engines["vision_encoder"].encode([ImageInput(images["wide"])])[0],
            engines["audio_encoder"].encode([speech_pcm])[0]]


def test_llm_greedy_stream(engines, make_prompt, media) -> None:
    llm: LLMEngine = engines["llm_decoder"]
    prompt = make_prompt(1, has_audio=True)
    deltas = list(llm.generate(prompt, media, GenerationParams(max_tokens=12)))
    again = list(llm.generate(prompt, media, GenerationParams(max_tokens=12)))
    assert deltas == again, "greedy decoding is deterministic"
    tokens = [d.token_id for d in deltas[:-1]]
    assert len(tokens) == 12 and all(isinstance(t, int) for t in tokens)
    assert deltas[-1].token_id is None and deltas[-1].finish_reason == "length"
    assert all(d.finish_reason is None for d in deltas[:-1])
    text = "".join(d.text for d in deltas)
    assert text == llm.tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_llm_seeded_sampling_is_reproducible(engines, make_prompt, media) -> None:
    llm = engines["llm_decoder"]
    params = GenerationParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    first = [d.token_id for d in llm.generate(make_prompt(1, has_audio=True), media, params)]
    assert first == [d.token_id for d in llm.generate(make_prompt(1, has_audio=True), media, params)]


def test_llm_stops_on_a_stop_id(checkpoint, make_prompt, media) -> None:
    llm = LLMEngine.from_checkpoint(checkpoint)
    prompt = make_prompt(1, has_audio=True)
    first = next(iter(llm.generate(prompt, media, GenerationParams(max_tokens=5)))).token_id
    llm.stop_ids = frozenset({first})
    deltas = list(llm.generate(prompt, media, GenerationParams(max_tokens=5)))
    assert [(d.token_id, d.finish_reason) for d in deltas] == [(None, "stop")]


def test_llm_stop_ids_include_im_end(engines) -> None:
    llm = engines["llm_decoder"]
    assert llm.tokenizer.token_id("<|im_end|>") in llm.stop_ids


def test_llm_cancellation_stops_before_the_next_token(engines, make_prompt, media) -> None:
    is_cancelled = cancel_after(3)
    deltas = list(engines["llm_decoder"].generate(make_prompt(1, has_audio=True), media,
                                                  GenerationParams(max_tokens=8192), is_cancelled))
    assert [d.token_id is not None for d in deltas] == [True, True, True, False]
    assert deltas[-1].finish_reason == "cancelled"
    assert is_cancelled.calls >= 4  # also polled while waiting for the batch engine


def test_llm_closing_the_stream_stops_generation(engines, make_prompt, media) -> None:
    stream = engines["llm_decoder"].generate(make_prompt(1, has_audio=True), media,
                                             GenerationParams(max_tokens=8192))
    assert len(list(itertools.islice(stream, 2))) == 2
    stream.close()
    assert list(stream) == []


@pytest.mark.parametrize("n_images, has_audio, n_media, match", [
    (1, True, 1, r"2 media placeholder\(s\) \(<image>, <audio>\) but 1 media array"),
    (0, False, 1, r"0 media placeholder\(s\) \(none\) but 1"),
    (2, False, 1, "2 media placeholder"),
])
def test_llm_placeholder_count_mismatch(engines, make_prompt, media, n_images, has_audio, n_media, match) -> None:
    with pytest.raises(InvalidInput, match=match):
        engines["llm_decoder"].generate(make_prompt(n_images, has_audio=has_audio, text="hi"), media[:n_media],
                                        GenerationParams(max_tokens=4))


def test_llm_image_placeholder_needs_256_rows(engines, make_prompt, media) -> None:
    llm = engines["llm_decoder"]
    with pytest.raises(InvalidInput, match=r"media\[0\] fills an <image> placeholder and must have 256 rows"):
        llm.generate(make_prompt(1), [media[0][:200]], GenerationParams(max_tokens=4))
    with pytest.raises(InvalidInput, match=r"media\[0\] .* must be a float \(rows, 64\) array"):
        llm.generate(make_prompt(1), [np.zeros((256, 32), np.float32)], GenerationParams(max_tokens=4))
    with pytest.raises(InvalidInput, match="finite"):
        llm.generate(make_prompt(1), [np.full((256, H), np.inf, np.float32)], GenerationParams(max_tokens=4))


@pytest.mark.parametrize("params, match", [
    (GenerationParams(max_tokens=0), "max_tokens"),
    (GenerationParams(max_tokens=8193), "max_tokens"),
    (GenerationParams(temperature=-0.1), "temperature"),
    (GenerationParams(temperature=float("nan")), "temperature"),
    (GenerationParams(top_p=0.0), "top_p"),
    (GenerationParams(top_p=1.5), "top_p"),
    (GenerationParams(top_k=-1), "top_k"),
    (GenerationParams(seed=2**64), "seed"),
])
def test_llm_rejects_bad_params(engines, make_prompt, params: GenerationParams, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        check_generation_params(params)
    with pytest.raises(InvalidInput, match=match):
        engines["llm_decoder"].generate(make_prompt(0, text="hi"), [], params)


def test_llm_rejects_bad_prompts(engines) -> None:
    llm = engines["llm_decoder"]
    for prompt in ("", None, "x" * 300_000):
        with pytest.raises(InvalidInput, match="prompt"):
            llm.generate(prompt, [], GenerationParams(max_tokens=4))  # type: ignore[arg-type]


# ---- speech ----------------------------------------------------------------------------------------


def test_speech_chunks_are_24khz_float32_whole_codes(engines) -> None:
    speech: SpeechEngine = engines["speech_synth"]
    chunks = list(speech.synthesize("☞ Hello there, how are you today?", first_sentence=False, seed=3))
    assert speech.sample_rate == SPEECH_SAMPLE_RATE == 24000
    assert chunks and all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    total = sum(len(c) for c in chunks)
    assert total > 0 and total % CODEC_SAMPLES_PER_TOKEN == 0
    assert all(np.abs(c).max() <= 1.0 for c in chunks)


def test_speech_first_sentence_streams_early_chunks(engines) -> None:
    chunks = list(engines["speech_synth"].synthesize("Hello there.", first_sentence=True, seed=3))
    # 20-code first window + silence trim: several chunks before the end of the segment.
    assert len(chunks) > 1
    assert sum(len(c) for c in chunks) <= speech_code_limit(8) * CODEC_SAMPLES_PER_TOKEN


def test_speech_is_reproducible_for_a_seed(engines) -> None:
    speech = engines["speech_synth"]
    a = np.concatenate(list(speech.synthesize("Good morning.", seed=11)))
    b = np.concatenate(list(speech.synthesize("Good morning.", seed=11)))
    np.testing.assert_array_equal(a, b)
    greedy = np.concatenate(list(speech.synthesize("Good morning.", greedy=True)))
    assert np.array_equal(greedy, np.concatenate(list(speech.synthesize("Good morning.", greedy=True))))


@pytest.mark.parametrize("text", ["", "   ", "☞", "☜ ", "<unk>"])
def test_speech_empty_text_gives_no_chunks(engines, text: str) -> None:
    assert list(engines["speech_synth"].synthesize(text)) == []


def test_speech_cancellation_ends_the_stream_at_once(engines) -> None:
    speech = engines["speech_synth"]
    full = cancel_after(10**9)
    list(speech.synthesize("Hello there, how are you?", seed=1, is_cancelled=full))
    assert full.calls >= 2, "the consumer polls while it waits for codes and between codec windows"
    is_cancelled = cancel_after(1)
    started = time.perf_counter()
    stream = speech.synthesize("Hello there, how are you?", seed=1, is_cancelled=is_cancelled)
    chunks = list(stream)
    assert is_cancelled.calls == 2, "the generator ends as soon as it sees the cancellation"
    assert chunks == [], "a cancelled segment's undecoded audio is dropped"
    assert stream.handle.cancel_requested
    assert time.perf_counter() - started < 1.0


def test_speech_code_limit() -> None:
    assert speech_code_limit(1) == 45
    assert speech_code_limit(10) == 180
    assert speech_code_limit(10_000) == SPEECH_MAX_CODES


def test_speech_rejects_bad_input(engines) -> None:
    speech = engines["speech_synth"]
    with pytest.raises(InvalidInput, match="string"):
        speech.synthesize(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="too long"):
        speech.synthesize("a" * 5000)
    with pytest.raises(InvalidInput, match="seed"):
        speech.synthesize("hello", seed=2**64)


class RecordingCheckpoint:
    """Builds a CheckpointDir that records the main-checkpoint tensors each engine reads."""

    @staticmethod
    def open(path):
        from vitaserve.models.checkpoint import CheckpointDir

        class Recording(CheckpointDir):
            def read(self, names):
                self.names_read.update(names)
                return super().read(names)

        ckpt = Recording(path)
        ckpt.names_read = set()
        return ckpt


@pytest.mark.parametrize("engine, allowed", [
    ("VisionEngine", ("model.vision_tower.", "model.mm_projector.")),
    ("AudioEngine", ("model.audio_encoder.",)),
    ("SpeechEngine", ("model.embed_tokens.weight",)),
])
def test_engines_load_only_their_weights(tiny_checkpoint, engine: str, allowed: tuple[str, ...]) -> None:
    from vitaserve.components import engines as module

    ckpt = RecordingCheckpoint.open(tiny_checkpoint)
    getattr(module, engine)(ckpt)
    assert ckpt.names_read and all(name.startswith(allowed) for name in ckpt.names_read)


def test_llm_engine_reads_no_encoder_weights(tiny_checkpoint) -> None:
    ckpt = RecordingCheckpoint.open(tiny_checkpoint)
    LLMEngine.from_checkpoint(ckpt)
    encoders = ("model.vision_tower.", "model.mm_projector.", "model.audio_encoder.")
    assert ckpt.names_read and not any(name.startswith(encoders) for name in ckpt.names_read)


def test_speech_cancellation_takes_the_segment_out_of_the_batch(engines) -> None:
    import threading
    import time

    speech = engines["speech_synth"]
    cancelled = threading.Event()
    stream = speech.synthesize("one two three four five six seven eight nine ten " * 6, seed=1,
                               is_cancelled=cancelled.is_set)
    done = threading.Event()
    threading.Thread(target=lambda: (list(stream), done.set()), daemon=True).start()
    assert not done.wait(0.3), "the segment should still be decoding (~900 codes)"
    cancelled.set()
    set_at = time.monotonic()
    assert done.wait(5)
    # the consumer saw the flag within its poll interval and the batcher dropped the segment
    assert time.monotonic() - set_at < 1.0
    from vitaserve.batching.scheduler import wait_until

    assert wait_until(lambda: stream.handle.done, 2), "the batcher did not drop the cancelled segment"
    assert stream.handle.finish_reason == "cancelled"
    assert stream.handle.codes < speech_code_limit(60)


def test_concurrent_segments_equal_each_alone(engines) -> None:
    from concurrent.futures import ThreadPoolExecutor

    speech = engines["speech_synth"]
    texts = [f"Reply number {i}, with some words." for i in range(6)]
    alone = [np.concatenate(list(speech.synthesize(t, i % 2 == 0, seed=i))) for i, t in enumerate(texts)]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda a: np.concatenate(list(speech.synthesize(a[1], a[0] % 2 == 0, seed=a[0]))),
                                 enumerate(texts)))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)
