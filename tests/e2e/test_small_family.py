"""The small model family end to end: real Triton serving Whisper tiny.en, EfficientNet-Lite0 + RapidOCR,
SmolLM2-135M-Instruct and hibari, the real orchestrator process, a real gRPC client (issue 11 §5).

The spoken question is made in the test with hibari (the family's own TTS, a different seed and speed from
the shipped WAV), so the recogniser is checked on audio it has not been tuned on. The reply's audio is
transcribed back with the same recogniser and compared with the reply text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soxr

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.client import Conversation, run_turn
from vitaserve.families.small.asr import word_error_rate, words
from vitaserve.stack import LocalStack

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).parents[2] / "examples" / "media"
QUESTION = "What animal is in this picture, and what word is written on it?"
SETTINGS = pb.SessionSettings(turn_detection="manual", want_audio=True, max_reply_tokens=64, temperature=0.0,
                              playout_lead_ms=3_600_000)


@pytest.fixture(scope="module")
def recognizer():  # noqa: ANN201
    from vitaserve.families.small.asr import SpeechRecognizer

    return SpeechRecognizer(cpu_threads=1)


@pytest.fixture(scope="module")
def spoken_question() -> bytes:
    """QUESTION as 16 kHz PCM16, spoken by hibari (seed and speed unlike the shipped example's)."""
    from vitaserve.families.small.tts import SpeechSynthesizer

    tts = SpeechSynthesizer(threads=1)
    pcm = np.concatenate([np.zeros(4800, np.float32), *tts.synthesize(QUESTION, seed=3),
                          np.zeros(4800, np.float32)])
    pcm16k = soxr.resample(pcm, 24000, 16000)
    return (np.clip(pcm16k, -1, 1) * 32767).astype("<i2").tobytes()


@pytest.fixture(scope="module")
def small_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    # The LLM is converted from its GGUF once into the default cache (~/.cache/vitaserve/small) and reused.
    with LocalStack(None, family="small", work_dir=tmp_path_factory.mktemp("small-stack")) as running:
        yield running


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, timeout=180))


def test_a_spoken_question_about_an_image_is_heard_seen_answered_and_spoken(
        small_stack: LocalStack, spoken_question: bytes, recognizer) -> None:  # noqa: ANN001
    async def scenario() -> tuple:
        async with Conversation.open(small_stack.orchestrator_address, settings=SETTINGS) as conv:
            assert conv.started is not None and conv.started.model_family == "small"
            turn1 = await run_turn(conv, image=(EXAMPLES / "scene.png").read_bytes(), pcm16=spoken_question,
                                   text=None, echo=False)
            turn2 = await run_turn(conv, image=None, pcm16=None, text="Which word did you read in the picture?",
                                   echo=False)
            await conv.send(pb.ClientEvent(session_update=pb.SessionUpdate()))
            started = await conv.next_event()
            return turn1, turn2, started

    (reply, audio, rate, events), (reply2, _, _, events2), started = run(scenario())
    kinds = [e.WhichOneof("event") for e in events]
    assert "error" not in kinds and kinds[-1] == "response_done", kinds
    # 1. The question was heard: the transcript reaches the client before the reply.
    (heard,) = [e.input_transcript for e in events if e.WhichOneof("event") == "input_transcript"]
    assert kinds.index("input_transcript") < kinds.index("text_delta")
    assert word_error_rate(QUESTION, heard.text) <= 0.1, heard.text
    # 2. The image was seen: its description names the animal and the word on the sign.
    (description,) = heard.image_descriptions
    assert "cat" in description.lower() and "PIZZA" in description, description
    # 3. The reply answers from what was seen.
    assert {"cat", "pizza"} & set(words(reply)), reply
    # 4. The reply is spoken: 24 kHz audio whose words are the reply's.
    assert rate == 24000
    pcm = np.frombuffer(audio, "<i2").astype(np.float32) / 32768.0
    assert pcm.size > rate // 2, "less than half a second of reply audio"
    spoken = recognizer.transcribe(soxr.resample(pcm, 24000, 16000).astype(np.float32))
    assert word_error_rate(reply, spoken) <= 0.35, (reply, spoken)
    # History keeps the user's words (not a "[spoken question]" marker) and what the model read.
    assert "error" not in [e.WhichOneof("event") for e in events2] and reply2.strip()
    history = started.session_started.history
    assert [t.assistant for t in history] == [reply, reply2]
    assert heard.text.strip() in history[0].user and description in history[0].user
    assert "[spoken question]" not in history[0].user


def test_bad_input_to_the_small_family_gets_clear_errors_and_the_session_goes_on(small_stack: LocalStack) -> None:
    async def scenario() -> tuple:
        async with Conversation.open(small_stack.orchestrator_address, settings=SETTINGS) as conv:
            silence = bytes(2 * 16000)  # one second of digital silence: nothing to recognise
            _, _, _, quiet = await run_turn(conv, image=None, pcm16=silence, text=None, echo=False)
            await conv.send_image(b"\x89PNG\r\n\x1a\n not really a png")
            bad_image = await conv.next_event()
            reply, _, _, after = await run_turn(conv, image=None, pcm16=None, text="Say hello.", echo=False)
            return quiet, bad_image, reply, after

    quiet, bad_image, reply, after = run(scenario())
    errors = [e.error for e in quiet if e.WhichOneof("event") == "error"]
    assert [e.code for e in errors] == ["INVALID_ARGUMENT"] and "no words were recognised" in errors[0].message
    assert bad_image.WhichOneof("event") == "error" and bad_image.error.code == "INVALID_ARGUMENT"
    assert "error" not in [e.WhichOneof("event") for e in after] and reply.strip()


def test_the_small_triton_models_answer_bad_requests_with_clear_errors(small_stack: LocalStack) -> None:
    """Straight to the Triton models (as the batch worker calls them): one good call of each, then bad
    requests, each an InvalidInput naming the problem; the models keep serving."""
    from vitaserve.components.base import GenerationParams, ImageInput
    from vitaserve.components.triton import TritonComponents
    from vitaserve.errors import InvalidInput

    async def calls() -> tuple:
        client = TritonComponents(small_stack.triton_url)
        try:
            (seen,) = await client.encode_images([ImageInput((EXAMPLES / "scene.png").read_bytes())])
            heard = await client.encode_audio(np.zeros(8000, np.float32))
            errors = []
            for call in (
                lambda: client.encode_images([ImageInput(b"GIF89a truncated")]),
                lambda: client.encode_audio(np.full(16000, np.nan, np.float32)),
                lambda: _drain(client.generate("hi", [np.zeros((4, 576), np.float32)], GenerationParams())),
                lambda: _drain(client.generate("<image> hi", [], GenerationParams())),
                lambda: _drain(client.synthesize("x" * 5000)),
            ):
                with pytest.raises(InvalidInput) as caught:
                    await call()
                errors.append(caught.value.message)
            spoken = [c async for c in client.synthesize("Still here.", seed=1)]
            return seen, heard, errors, spoken
        finally:
            await client.close()

    seen, heard, errors, spoken = run(calls())
    assert seen.embeddings is None and 'The word "PIZZA"' in seen.text
    assert heard.embeddings is None and heard.text == ""  # half a second of silence: no words
    assert "unrecognised image format" in errors[0] or "corrupt" in errors[0]
    assert "NaN" in errors[1] or "finite" in errors[1]
    assert "takes no media" in errors[2] and "takes no media" in errors[3]
    assert "too long" in errors[4]
    assert spoken and all(c.sample_rate == 24000 for c in spoken)


async def _drain(stream) -> None:  # noqa: ANN001
    async for _ in stream:
        pass


def test_an_interruption_stops_a_small_family_reply_and_keeps_what_was_heard(small_stack: LocalStack) -> None:
    """Interruption works alike for both families: the reply (paced to real time, as a client plays it) is
    interrupted ~1.5 s into its audio; history keeps the text the user heard."""
    paced = pb.SessionSettings(turn_detection="manual", want_audio=True, max_reply_tokens=96, temperature=0.0)

    async def scenario() -> tuple:
        async with Conversation.open(small_stack.orchestrator_address, settings=paced) as conv:
            await conv.send_text("Tell me a long story about a cat who finds a pizza.")
            events, first_audio, sent = [], None, False
            async for event in conv.events():
                events.append(event)
                kind = event.WhichOneof("event")
                if kind == "audio":
                    first_audio = first_audio or time.monotonic()
                    if not sent and time.monotonic() - first_audio > 1.5:  # ~1.5 s played (real-time pacing)
                        await conv.interrupt()
                        sent = True
                if kind in ("interrupted", "response_done", "error"):
                    break
            await conv.send(pb.ClientEvent(session_update=pb.SessionUpdate()))
            while (started := await conv.next_event()).WhichOneof("event") != "session_started":
                pass
            return events, started.session_started

    events, started = run(scenario())
    last = events[-1]
    assert last.WhichOneof("event") == "interrupted", [e.WhichOneof("event") for e in events]
    text = "".join(e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta")
    heard = last.interrupted.heard_text
    assert 1000 < last.interrupted.played_ms < 3000, last.interrupted
    assert heard and text.startswith(heard) and len(heard) < len(text), (heard, text)
    assert started.history[-1].assistant == heard
