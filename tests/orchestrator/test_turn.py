"""Unit tests of the turn pipeline (`turn.Response`) over scripted components: event order, concurrency
of encoders and of speech with the LLM, state marks, interruption and the response id gate, errors and
timeouts. The same paths run through a real gRPC server and the tiny model in test_server.py."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence

import numpy as np
import pytest
from conftest import make_config, run
from fakes import FakeComponents, VirtualClock

from vitaserve.components.base import ImageInput
from vitaserve.errors import Unavailable
from vitaserve.families import get_family
from vitaserve.models.prompt import Turn, strip_state_marks, system_prompt
from vitaserve_orchestrator.events import (
    AudioOut,
    Envelope,
    ErrorEvent,
    InputTranscript,
    Interrupted,
    ResponseDone,
    TextDelta,
)
from vitaserve_orchestrator.outbox import Outbox
from vitaserve_orchestrator.session import SessionSettings, SettingsUpdate
from vitaserve_orchestrator.turn import Outcome, PipelineLimits, ReplyCleaner, Response, TurnInput

pytestmark = pytest.mark.unit

END_EVENTS = (ResponseDone, ErrorEvent, Interrupted)


def settings(**update: object) -> SessionSettings:
    return SessionSettings.resolve(SettingsUpdate(**update), make_config())  # type: ignore[arg-type]


class Harness:
    """A Response on an Outbox, with its outcome recorded."""

    def __init__(
        self,
        fake: FakeComponents,
        turn: TurnInput,
        *,
        history: Sequence[Turn] = (),
        session: SessionSettings | None = None,
        limits: PipelineLimits | None = None,
        family: str = "vita15",
    ) -> None:
        self.fake = fake
        self.clock = VirtualClock()  # paced audio goes out in virtual time
        self.outbox = Outbox("sess-test", clock=self.clock, sleep=self.clock.sleep)
        self.outcomes: list[Outcome] = []
        self.response = Response(
            components=fake,
            family=get_family(family),
            outbox=self.outbox,
            session_id="sess-test",
            turn_id="turn-1",
            response_id="resp-1",
            turn=turn,
            history=history,
            settings=session or settings(),
            limits=limits or PipelineLimits(),
            committed_at=self.clock(),
            on_finished=lambda _r, o: self.outcomes.append(o),
            clock=self.clock,
        )

    async def until_end(self) -> list[Envelope]:
        events = []
        while (env := await self.outbox.get()) is not None:
            events.append(env)
            if isinstance(env.event, END_EVENTS):
                break
        return events

    async def until(self, kind: type) -> list[Envelope]:
        events = []
        while (env := await self.outbox.get()) is not None:
            events.append(env)
            if isinstance(env.event, kind):
                return events
        raise AssertionError(f"no {kind.__name__}")


async def settle(predicate, steps: int = 1000) -> None:
    """Let the loop run until `predicate()` holds (no wall-clock sleeps)."""
    for _ in range(steps):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def of(events: list[Envelope], kind: type) -> list:
    return [e.event for e in events if isinstance(e.event, kind)]


def test_text_turn_streams_text_then_audio_in_order() -> None:
    async def body() -> None:
        h = Harness(FakeComponents(), TurnInput(text="Hi"))
        h.response.start()
        events = await h.until_end()
        assert isinstance(events[-1].event, ResponseDone)
        assert all(
            e.session_id == "sess-test" and e.turn_id == "turn-1" and e.response_id == "resp-1"
            for e in events
        )
        assert [e.t_ms for e in events] == sorted(e.t_ms for e in events)

        deltas = of(events, TextDelta)
        text = "".join(d.text for d in deltas)
        assert text == "Hello there. How are you?"  # ☜ and the space after it stripped
        assert [d.offset for d in deltas] == [
            sum(len(x.text) for x in deltas[:i]) for i in range(len(deltas))
        ]

        # Every audio chunk speaks text that was already sent; spans and positions only move forward.
        sent_text = 0
        audio = []
        for env in events:
            if isinstance(env.event, TextDelta):
                sent_text = env.event.offset + len(env.event.text)
            elif isinstance(env.event, AudioOut):
                assert env.event.text_end <= sent_text
                audio.append(env.event)
        assert [a.seq for a in audio] == list(range(4))
        assert [a.start_ms for a in audio] == [0, 100, 200, 300]
        assert [(a.text_start, a.text_end) for a in audio] == [(0, 12), (0, 12), (12, 25), (12, 25)]
        assert all(a.sample_rate == 24000 and len(a.pcm16) == 2400 * 2 for a in audio)
        pcm = np.frombuffer(audio[0].pcm16, "<i2")
        assert 9000 < np.abs(pcm).max() <= int(0.3 * 32768)  # pcm_to_int16 of a 0.3 sine

        assert [(s.text, s.first_sentence) for s in h.fake.speech_streams] == [
            ("Hello there.", True),
            (" How are you?", False),
        ]
        done = events[-1].event
        assert done.text == text and done.state_mark == "☜"
        t = done.timings
        assert t.tokens == 8 and t.audio_ms == 400
        assert 0 < t.first_token_ms <= t.first_audio_ms <= t.total_ms
        assert h.outcomes == [Outcome("done", text, "☜", played_ms=400)]  # all of its audio
        # Where the client stopped playing the finished reply: the outcome is cut to what it heard.
        assert h.response.truncate(400) is h.outcomes[0] and h.response.truncate(10_000) is h.outcomes[0]
        assert h.response.truncate(250) == Outcome("done", "Hello there.", "☜", played_ms=250)
        assert h.response.outcome == Outcome("done", "Hello there.", "☜", played_ms=250)
        assert not h.fake.llm_streams[0].closed and h.fake.llm_streams[0].finished

    run(body())


def test_speech_is_synthesised_while_the_llm_goes_on() -> None:
    async def body() -> None:
        gate = asyncio.Event()
        fake = FakeComponents(llm_gate=(4, gate))  # the LLM stops after "Hello there."
        h = Harness(fake, TurnInput(text="Hi"))
        h.response.start()
        first = await h.until(AudioOut)
        assert not gate.is_set() and fake.llm_streams[0].yielded == 4
        assert first[-1].event.text_end == 12
        gate.set()
        rest = await h.until_end()
        assert isinstance(rest[-1].event, ResponseDone)

    run(body())


def test_encoders_run_in_parallel_and_prompt_has_the_media(question_pcm: np.ndarray) -> None:
    async def body() -> None:
        fake = FakeComponents(barrier=True)  # each encoder waits for the other one to have started
        turn = TurnInput(
            text="", images=(ImageInput(b"png", max_tiles=2),), frames=(b"f1",), audio=question_pcm
        )
        h = Harness(fake, turn, history=[Turn("[image] What?", "☜A cat.")])
        h.response.start()
        events = await h.until_end()
        assert isinstance(events[-1].event, ResponseDone), events[-1]
        assert fake.encoders_started == {"vision_encoder", "audio_encoder"}
        assert [(i.data, i.max_tiles) for i in fake.image_calls[0]] == [(b"png", 2), (b"f1", 1)]
        prompt = fake.prompts[0]
        # 2 tiles of the image + 1 frame, then the spoken question; a still image selects 'image'.
        assert prompt.endswith(
            "<|im_start|>user\n<image><image><image>\n<audio><|im_end|>\n<|im_start|>assistant\n"
        )
        assert system_prompt("image", realtime=True) in prompt
        assert "<|im_start|>user\n[image] What?<|im_end|>\n<|im_start|>assistant\n☜A cat.<|im_end|>" in prompt
        # one media array per placeholder: the image's two tiles separately, then the frame, then audio
        media = fake.media[0]
        assert [m.shape[0] for m in media] == [256, 256, 256, len(question_pcm) // 1280]
        assert events[-1].event.timings.encode_ms > 0

    run(body())


def test_a_text_family_turn_sends_what_was_heard_and_prompts_with_text_only(question_pcm: np.ndarray) -> None:
    """The small family: the encoders' text (transcript, descriptions) goes to the client first, then into
    a ChatML text prompt with no media."""

    async def body() -> None:
        fake = FakeComponents(transcript="What is in the picture?", descriptions=("a photo of a tabby cat",),
                              reply=["It", " is", " a", " cat", ",", " sitting", " still", "."])
        turn = TurnInput(text="", images=(ImageInput(b"png"),), frames=(b"f1",), audio=question_pcm)
        h = Harness(fake, turn, history=[Turn("Question: Hi", "Hello!")], family="small")
        h.response.start()
        events = await h.until_end()
        assert isinstance(events[-1].event, ResponseDone), events[-1]
        (heard,) = of(events, InputTranscript)
        assert heard == InputTranscript("What is in the picture?", ("a photo of a tabby cat",) * 2)
        kinds = [type(e.event) for e in events]
        assert kinds.index(InputTranscript) < kinds.index(TextDelta)
        assert fake.media == [[]]  # the LLM reads text only
        small = get_family("small")
        assert fake.prompts[0] == (
            f"<|im_start|>system\n{small.system_prompt(None, realtime=True)}<|im_end|>\n"
            "<|im_start|>user\nQuestion: Hi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
            "<|im_start|>user\nImage: a photo of a tabby cat\nCamera: a photo of a tabby cat\n"
            "Question: What is in the picture?<|im_end|>\n<|im_start|>assistant\n")
        # English segments: the first cut at a comma once 12 characters are in, commas kept as they are
        assert [(s.text, s.first_sentence) for s in fake.speech_streams] == [
            ("It is a cat,", True), (" sitting still.", False)]
        assert small.history_user_text(h.response.content) == (
            "Image: a photo of a tabby cat\nCamera: a photo of a tabby cat\nQuestion: What is in the picture?")

    run(body())


def test_a_text_family_turn_with_nothing_recognised_is_a_clear_error(question_pcm: np.ndarray) -> None:
    async def body() -> None:
        h = Harness(FakeComponents(transcript="  "), TurnInput(audio=question_pcm), family="small")
        h.response.start()
        events = await h.until_end()
        error = events[-1].event
        assert isinstance(error, ErrorEvent) and error.code == "INVALID_ARGUMENT"
        assert "no words were recognised" in error.message
        assert not h.fake.prompts  # nothing reached the LLM

    run(body())


def test_encoders_of_another_model_family_are_a_clear_error(question_pcm: np.ndarray) -> None:
    """An orchestrator and Triton models set to different families (VITASERVE_MODEL_FAMILY) say so."""

    async def body() -> None:
        rows_only = FakeComponents()  # VITA-1.5's answers: rows, no text
        h = Harness(rows_only, TurnInput(text="Hi", images=(ImageInput(b"png"),)), family="small")
        h.response.start()
        error = (await h.until_end())[-1].event
        assert isinstance(error, ErrorEvent) and "vision_encoder answered without a description" in error.message
        assert "VITASERVE_MODEL_FAMILY" in error.message and not rows_only.prompts

    run(body())


def test_camera_frames_use_the_video_prompt() -> None:
    async def body() -> None:
        fake = FakeComponents()
        h = Harness(fake, TurnInput(text="What do you see?", frames=(b"a", b"b", b"c")))
        h.response.start()
        await h.until_end()
        assert system_prompt("video", realtime=True) in fake.prompts[0]
        assert "<image><image><image>\nWhat do you see?<|im_end|>" in fake.prompts[0]
        assert all(i.max_tiles == 1 for i in fake.image_calls[0])

    run(body())


def test_noise_reply_is_dropped_silently() -> None:
    async def body() -> None:
        fake = FakeComponents(reply=["☟", " um", " noise", ".", " more", "."])
        h = Harness(fake, TurnInput(text="hmm"))
        h.response.start()
        events = await h.until_end()
        assert [type(e.event) for e in events] == [ResponseDone]
        assert events[0].event.text == "" and events[0].event.state_mark == "☟"
        assert fake.llm_streams[0].yielded == 1 and fake.llm_streams[0].closed  # stopped at the mark
        assert fake.speech_streams == []
        assert h.outcomes[0].kind == "noise"

    run(body())


def test_text_only_session_synthesises_nothing() -> None:
    async def body() -> None:
        fake = FakeComponents()
        h = Harness(fake, TurnInput(text="Hi"), session=settings(text_only=True))
        h.response.start()
        events = await h.until_end()
        assert of(events, AudioOut) == [] and fake.speech_streams == []
        assert events[-1].event.text == "Hello there. How are you?"

    run(body())


def test_interrupt_closes_llm_and_speech_and_reports_what_was_heard() -> None:
    async def body() -> None:
        llm_gate, speech_gate = asyncio.Event(), asyncio.Event()
        # The LLM holds after "Hello there. How are you?", segment 1 holds before its first chunk.
        fake = FakeComponents(
            reply=["☜", " Hello", " there", ".", " How", " are", " you", "?", " Fine", "."],
            llm_gate=(8, llm_gate),
            speech_gate=(1, 0, speech_gate),
        )
        h = Harness(fake, TurnInput(text="Hi"))
        h.response.start()
        got = await h.until(AudioOut)
        got += await h.until(AudioOut)  # both chunks of segment 0 were sent
        await settle(lambda: len(fake.speech_streams) == 2)
        h.clock.advance(0.2)  # the client has played the 200 ms it was sent (paced playout)
        assert await h.response.interrupt("client")
        assert fake.llm_streams[0].closed and fake.speech_streams[1].closed
        assert not fake.speech_streams[0].closed  # segment 0 had finished
        llm_gate.set()
        speech_gate.set()
        await asyncio.sleep(0)
        h.outbox.close()
        rest = [env async for env in h.outbox]
        assert [type(e.event) for e in rest] == [Interrupted]
        intr = rest[0].event
        assert intr.played_ms == 200 and intr.heard_text == "Hello there." and intr.reason == "client"
        assert h.outcomes == [Outcome("interrupted", "Hello there.", "☜", played_ms=200)]
        assert not await h.response.interrupt("client")  # already finished
        # A later position cuts what was heard further, never lengthens it.
        assert h.response.truncate(100) == Outcome("interrupted", "Hello", "☜", played_ms=100)
        assert h.response.truncate(300).text == "Hello"

    run(body())


def test_interrupt_drops_queued_audio_without_waiting_for_the_client() -> None:
    async def body() -> None:
        gate = asyncio.Event()
        fake = FakeComponents(llm_gate=(6, gate), speech_chunks=5)
        h = Harness(fake, TurnInput(text="Hi"))
        h.response.start()
        # Nobody reads the outbox: text and audio pile up while the LLM is held.
        await settle(
            lambda: sum(s.yielded for s in fake.speech_streams) >= 5 and fake.llm_streams[0].yielded == 6
        )
        queued = h.outbox.pending()
        assert queued >= 8
        started = time.monotonic()
        await h.response.interrupt("barge_in")
        assert time.monotonic() - started < 0.5
        assert fake.llm_streams[0].closed
        h.outbox.close()
        rest = [env.event async for env in h.outbox]
        assert [type(e) for e in rest] == [Interrupted]  # every queued delta and chunk was dropped
        assert rest[0].played_ms == 0 and rest[0].heard_text == "" and rest[0].reason == "barge_in"
        # A late put of the cancelled response is refused by the gate.
        assert not h.outbox.put(TextDelta("late", 0), response_id="resp-1")

    run(body())


def test_component_unavailable_ends_the_turn_with_a_retryable_error() -> None:
    async def body() -> None:
        fake = FakeComponents(errors={"llm_decoder": Unavailable("llm_decoder is down")})
        h = Harness(fake, TurnInput(text="Hi"))
        h.response.start()
        events = await h.until_end()
        err = events[-1].event
        assert isinstance(err, ErrorEvent) and err.code == "UNAVAILABLE" and err.retryable
        assert "down" in err.message and h.outcomes == [Outcome("error")]
        with pytest.raises(RuntimeError, match="no finished reply"):
            h.response.truncate(0)

    run(body())


@pytest.mark.parametrize("component", ["llm_decoder", "audio_encoder", "speech_synth"])
def test_a_stuck_component_times_out(component: str, question_pcm: np.ndarray) -> None:
    async def body() -> None:
        fake = FakeComponents(hang={component})
        limits = PipelineLimits(
            encode_timeout_s=0.2,
            first_token_timeout_s=0.2,
            token_timeout_s=0.2,
            speech_timeout_s=0.2,
            cancel_timeout_s=0.2,
        )
        h = Harness(fake, TurnInput(audio=question_pcm), limits=limits)
        started = time.monotonic()
        h.response.start()
        events = await h.until_end()
        assert time.monotonic() - started < 1.5
        err = events[-1].event
        assert isinstance(err, ErrorEvent) and err.code == "UNAVAILABLE" and err.retryable
        assert component in err.message or "encoders" in err.message
        if component == "speech_synth":
            assert fake.llm_streams[0].finished or fake.llm_streams[0].closed

    run(body())


def test_speech_failure_stops_the_llm() -> None:
    async def body() -> None:
        gate = asyncio.Event()
        fake = FakeComponents(llm_gate=(6, gate), errors={"speech_synth": Unavailable("tts gone")})
        h = Harness(fake, TurnInput(text="Hi"))
        h.response.start()
        events = await h.until_end()
        assert isinstance(events[-1].event, ErrorEvent) and "tts gone" in events[-1].event.message
        assert fake.llm_streams[0].closed and not gate.is_set()

    run(body())


def test_reply_cleaner_matches_strip_state_marks_for_any_split() -> None:
    rng = random.Random(0)
    replies = [
        "☞ Hello, world.",
        "☜Hi<unk> there<|im_end|>",
        "  ☟ noise",
        "no mark ☞ inside",
        "☞",
        "☞ ",
        "<|im_end|>",
        "a<unk",
        "☜ 你好，世界。",
    ]
    for reply in replies:
        for _ in range(30):
            cuts = sorted(rng.sample(range(1, len(reply)), k=min(len(reply) - 1, rng.randint(0, 4))))
            pieces = [reply[a:b] for a, b in zip([0, *cuts], [*cuts, len(reply)], strict=True)]
            cleaner = ReplyCleaner()
            out = "".join(cleaner.push(p) for p in pieces) + cleaner.finish()
            assert (out, cleaner.mark) == strip_state_marks(reply), (reply, pieces)
