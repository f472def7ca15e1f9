"""Tests of the small family's three engines on their real, packaged weights (no download, CPU only):

- `SpeechRecognizer` (Whisper tiny.en) transcribes the shipped question WAV to the question's words;
- `SpeechSynthesizer` (hibari) speaks a sentence that the recogniser transcribes back to the same words,
  streams it in short chunks, stops on cancellation and is reproducible with a seed;
- `ImageDescriber` (EfficientNet-Lite0 + RapidOCR) says the shipped scene shows a cat and reads "PIZZA";
- every engine rejects bad input with InvalidInput.

The media are `examples/media/scene.png` and `small_question.wav` (tools/make_small_demo_media.py). Each
model is loaded once per module (about 1 s in all); the file runs in about 10 s on 2 cores.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import soxr

from vitaserve.components.base import ImageInput
from vitaserve.errors import InvalidInput
from vitaserve.families.small.asr import word_error_rate

pytestmark = [pytest.mark.unit]

REPO = Path(__file__).resolve().parents[2]
MEDIA = REPO / "examples" / "media"
QUESTION = "What animal is in this picture, and what word is written on it?"
# Cat words the real classifier may give for the scene (ImageNet's domestic cat classes and the group name).
CAT_WORDS = ("cat", "tabby", "egyptian mau", "siamese", "persian")


def read_wav_16k(path: Path) -> np.ndarray:
    pcm, rate = soundfile.read(path, dtype="float32")
    assert rate == 16_000 and pcm.ndim == 1, (rate, pcm.shape)
    return pcm


def cancel_after(n: int) -> Any:
    """An is_cancelled() that turns true on its (n+1)-th call."""

    def is_cancelled() -> bool:
        is_cancelled.calls += 1
        return is_cancelled.calls > n

    is_cancelled.calls = 0
    return is_cancelled


@pytest.fixture(scope="module")
def recognizer() -> Any:
    from vitaserve.families.small.asr import SpeechRecognizer

    return SpeechRecognizer(cpu_threads=2)


@pytest.fixture(scope="module")
def synthesizer() -> Iterator[Any]:
    from vitaserve.families.small.tts import SpeechSynthesizer

    tts = SpeechSynthesizer(threads=1)
    yield tts
    tts.close()


@pytest.fixture(scope="module")
def describer() -> Any:
    from vitaserve.families.small.vision import ImageDescriber

    return ImageDescriber(threads=2)


def test_word_error_rate_helper() -> None:
    assert word_error_rate("What is it?", "what is it") == 0.0
    assert word_error_rate("a b c d", "a x c") == 0.5  # one substitution, one deletion
    assert word_error_rate("a b", "a b c") == 0.5  # one insertion


# ---- speech recognition ------------------------------------------------------------------------------


def test_recognizer_transcribes_the_question(recognizer: Any) -> None:
    text = recognizer.transcribe(read_wav_16k(MEDIA / "small_question.wav"))
    assert word_error_rate(QUESTION, text) <= 0.1, text
    assert text == text.strip() and text


def test_recognizer_forward_keeps_order(recognizer: Any) -> None:
    """forward() answers each item in order; the other shipped question is a different sentence."""
    names = ("question.wav", "small_question.wav")
    other, ours = recognizer.forward([recognizer.preprocess(read_wav_16k(MEDIA / name)) for name in names])
    other_question = "What do you see in this picture? Please describe it in one sentence."
    assert word_error_rate(other_question, other) <= 0.1, other
    assert word_error_rate(QUESTION, ours) <= 0.1
    assert recognizer.forward([]) == []


def test_recognizer_is_thread_safe(recognizer: Any) -> None:
    pcm = read_wav_16k(MEDIA / "small_question.wav")
    expected = recognizer.transcribe(pcm)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(recognizer.transcribe(pcm))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected, expected]


def test_recognizer_preprocess_returns_float32(recognizer: Any) -> None:
    pcm = np.zeros(16_000, np.float64)
    out = recognizer.preprocess(pcm)
    assert out.dtype == np.float32 and out.shape == (16_000,) and out.flags.c_contiguous


@pytest.mark.parametrize(
    ("pcm", "message"),
    [
        (np.full(16_000, np.nan, np.float32), "NaN"),
        (np.concatenate([np.zeros(16_000, np.float32), [np.inf]]), "NaN or infinite"),
        (np.zeros((2, 16_000), np.float32), "1-D"),
        (np.zeros(16_000, np.int16), "floating point"),
        (np.zeros(0, np.float32), "too short"),
        (np.zeros(800, np.float32), "too short"),  # 50 ms
        ("not audio", "floating point"),
    ],
    ids=["nan", "inf", "2-d", "int16", "empty", "50ms", "str"],
)
def test_recognizer_rejects_bad_audio(recognizer: Any, pcm: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        recognizer.preprocess(pcm)
    with pytest.raises(InvalidInput):
        recognizer.transcribe(pcm)


def test_recognizer_rejects_too_long_audio(recognizer: Any) -> None:
    too_long = np.zeros(int((recognizer.max_seconds + 1) * 16_000), np.float32)
    with pytest.raises(InvalidInput, match="limit"):
        recognizer.preprocess(too_long)


# ---- speech synthesis --------------------------------------------------------------------------------


def test_synthesized_speech_is_understood(synthesizer: Any, recognizer: Any) -> None:
    sentence = "The cat is sitting next to a white sign that says pizza."
    chunks = list(synthesizer.synthesize(sentence, first_sentence=True, seed=1))
    assert chunks
    for chunk in chunks:
        assert chunk.dtype == np.float32 and chunk.ndim == 1
        assert 0 < chunk.shape[0] <= 0.5 * synthesizer.sample_rate
        assert np.abs(chunk).max() <= 1.0
    audio = np.concatenate(chunks)
    assert synthesizer.sample_rate == 24_000
    assert 1.5 < audio.shape[0] / 24_000 < 8.0
    text = recognizer.transcribe(soxr.resample(audio, 24_000, 16_000).astype(np.float32))
    assert word_error_rate(sentence, text) <= 0.1, text


def test_synthesis_streams_several_sentences(synthesizer: Any) -> None:
    one = np.concatenate(list(synthesizer.synthesize("Hello there.", seed=2)))
    two = np.concatenate(list(synthesizer.synthesize("Hello there. How are you today?", seed=2)))
    assert two.shape[0] > one.shape[0] + 0.5 * 24_000


def test_seeded_synthesis_is_reproducible(synthesizer: Any) -> None:
    def audio(seed: int) -> np.ndarray:
        return np.concatenate(list(synthesizer.synthesize("Same text, same audio.", seed=seed)))

    assert np.array_equal(audio(7), audio(7))
    assert not np.array_equal(audio(7), audio(8))
    assert np.concatenate(list(synthesizer.synthesize("Negative seeds work.", seed=-5))).size > 0


def test_first_sentence_trims_leading_silence(synthesizer: Any) -> None:
    def lead(first: bool) -> int:
        audio = np.concatenate(list(synthesizer.synthesize("Hello there.", first_sentence=first, seed=0)))
        return int(np.flatnonzero(np.abs(audio) > 0.005)[0])

    assert lead(True) < lead(False) <= 0.15 * 24_000


@pytest.mark.parametrize("text", ["", "   \n ", "☞ ", "☜☟"])
def test_blank_text_yields_nothing(synthesizer: Any, text: str) -> None:
    assert list(synthesizer.synthesize(text)) == []


def test_state_marks_are_not_spoken(synthesizer: Any) -> None:
    plain = list(synthesizer.synthesize("Hello there.", seed=3))
    marked = list(synthesizer.synthesize("☞ Hello there.☜", seed=3))
    assert len(plain) == len(marked)
    assert all(np.array_equal(a, b) for a, b in zip(plain, marked))


def test_cancellation_stops_the_chunks(synthesizer: Any) -> None:
    text = "This sentence is long enough to make several chunks of audio, one after another, for the test."
    assert len(list(synthesizer.synthesize(text, seed=0))) >= 4
    # Polled before the sentence and before each chunk: the 3rd poll (before the 2nd chunk) cancels.
    assert len(list(synthesizer.synthesize(text, seed=0, is_cancelled=cancel_after(2)))) == 1
    assert list(synthesizer.synthesize(text, seed=0, is_cancelled=lambda: True)) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": b"bytes"}, "must be a string"),
        ({"text": None}, "must be a string"),
        ({"text": "a" * 4001}, "too long"),
        ({"text": "hello", "seed": 1.5}, "seed"),
        ({"text": "hello", "seed": True}, "seed"),
        ({"text": "hello", "seed": 2**63}, "seed"),
    ],
    ids=["bytes", "none", "4001-chars", "float-seed", "bool-seed", "huge-seed"],
)
def test_synthesizer_rejects_bad_input_at_once(synthesizer: Any, kwargs: dict[str, Any],
                                               message: str) -> None:
    # Raised by the call itself, before any chunk is requested.
    with pytest.raises(InvalidInput, match=message):
        synthesizer.synthesize(**kwargs)


def test_synthesizer_close_is_idempotent(synthesizer: Any) -> None:
    synthesizer.close()
    synthesizer.close()
    assert list(synthesizer.synthesize("Still works.", seed=0))


# ---- image description -------------------------------------------------------------------------------


def test_describer_sees_the_cat_and_reads_the_word(describer: Any) -> None:
    (line,) = describer.describe([ImageInput((MEDIA / "scene.png").read_bytes())])
    assert '"PIZZA"' in line, line
    assert any(word in line.lower() for word in CAT_WORDS), line
    assert "\n" not in line and len(line) < 300


def test_describer_classifier_top_label_is_a_cat(describer: Any) -> None:
    image = describer.preprocess(ImageInput((MEDIA / "scene.png").read_bytes()))
    (top,) = describer.classify([image])
    # 281..285: ImageNet's domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian cat).
    assert 281 <= top[0].index <= 285, top
    assert sum(label.prob for label in top if 281 <= label.index <= 285) > 0.8, top


def test_describer_batches_and_keeps_order(describer: Any) -> None:
    images = [describer.preprocess(ImageInput((MEDIA / name).read_bytes()))
              for name in ("chelsea.png", "scene.png", "camera.png")]
    plain, scene, drawing = describer.forward(images)
    assert "cat" in plain and "written" not in plain, plain
    assert '"PIZZA"' in scene, scene
    assert "cat" not in drawing and "written" not in drawing, drawing
    assert describer.forward([]) == []


def test_description_wording() -> None:
    from vitaserve.families.small.vision import ImageDescriber, Label

    sure = [Label(504, "coffee mug", 0.8), Label(968, "tea cup", 0.1)]
    maybe = [Label(409, "analog clock", 0.3), Label(530, "digital clock", 0.2)]
    unsure = [Label(409, "analog clock", 0.05)]
    dogs = [Label(207, "Golden Retriever", 0.5), Label(208, "Labrador Retriever", 0.3)]
    assert ImageDescriber.describe_parts(sure, []) == "a picture of a coffee mug."
    assert ImageDescriber.describe_parts(maybe, ["OPEN"]) == (
        'a picture of perhaps an analog clock or a digital clock. The word "OPEN" is written in the picture.')
    assert ImageDescriber.describe_parts(sure, ["NO ENTRY"]) == (
        'a picture of a coffee mug. The text "NO ENTRY" is written in the picture.')
    assert ImageDescriber.describe_parts(dogs, []) == (
        "a picture of a dog (a Golden Retriever or a Labrador Retriever).")
    assert ImageDescriber.describe_parts(unsure, ["A", "B", "C"]) == (
        'a picture of something the classifier cannot name. '
        'The text lines "A", "B" and "C" are written in the picture.')
    assert "no readable text" in ImageDescriber.describe_parts(unsure, [])


@pytest.mark.parametrize(
    "image",
    [
        ImageInput(b"definitely not an image"),
        ImageInput(b""),
        ImageInput(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),  # a PNG signature and garbage
        ImageInput("text, not bytes"),  # type: ignore[arg-type]
        b"raw bytes, not an ImageInput",
        None,
    ],
    ids=["garbage", "empty", "bad-png", "str-data", "bare-bytes", "none"],
)
def test_describer_rejects_bad_images(describer: Any, image: Any) -> None:
    with pytest.raises(InvalidInput):
        describer.preprocess(image)
    with pytest.raises(InvalidInput):
        describer.describe([image])


def test_describer_rejects_too_many_pixels(describer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(describer, "max_pixels", 10_000)
    with pytest.raises(InvalidInput, match="too large"):
        describer.preprocess(ImageInput((MEDIA / "scene.png").read_bytes()))
