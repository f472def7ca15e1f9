"""Unit tests of the per-stream policy (`Conversation`) over scripted components, without gRPC: turn
kinds, input checks per event, ordering rules, VAD turns and barge-in with the real Silero VAD, clearing
the input, history (its edits: a finished reply truncated, turns deleted) and persistence. test_server.py
runs the same rules through a real server and the tiny model."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import make_config, run
from fakes import FakeComponents, VirtualClock
from PIL import Image

from vitaserve.families.vita15 import AUDIO_MARKER, IMAGE_MARKER
from vitaserve_orchestrator import events as ev
from vitaserve_orchestrator.conversation import Conversation, pcm16_to_float
from vitaserve_orchestrator.outbox import Outbox
from vitaserve_orchestrator.session import InMemorySessionStore, SettingsUpdate
from vitaserve_orchestrator.settings import OrchestratorSettings
from vitaserve_orchestrator.vad import SileroVad

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parents[1] / "golden" / "vita15-tiny"
END = (ev.ResponseDone, ev.Interrupted, ev.ErrorEvent)


def png(size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def pcm16(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()


class Harness:
    def __init__(self, fake: FakeComponents, config: OrchestratorSettings | None = None, **settings: object):
        self.fake = fake
        self.config = config or make_config()
        self.settings = SettingsUpdate(**{"turn_detection": "manual", **settings})  # type: ignore[arg-type]
        self.store = InMemorySessionStore()
        self.clock = VirtualClock()  # paced audio goes out in virtual time
        self.outbox = Outbox(clock=self.clock, sleep=self.clock.sleep)
        self.conv: Conversation | None = None

    async def open(self) -> Conversation:
        self.conv = await Conversation.open(
            ev.UpdateSession(settings=self.settings),
            store=self.store,
            components=self.fake,
            config=self.config,
            outbox=self.outbox,
            vad_factory=SileroVad,
            clock=self.clock,
        )
        started = await self.next()
        assert isinstance(started.event, ev.SessionStarted)
        return self.conv

    async def send(self, event: ev.ClientEvent) -> bool:
        assert self.conv is not None
        return await self.conv.dispatch(event)

    async def next(self) -> ev.Envelope:
        env = await asyncio.wait_for(self.outbox.get(), 5)
        assert env is not None
        return env

    async def until(self, kinds: type | tuple[type, ...] = END) -> list[ev.Envelope]:
        got = []
        while True:
            got.append(await self.next())
            if isinstance(got[-1].event, kinds):
                return got

    def queued(self) -> list[ev.ServerEvent]:
        return [env.event for env in self.outbox._queue]  # noqa: SLF001 - inspection only

    async def stream_audio(
        self, pcm: np.ndarray, chunk_ms: int = 100, stop: Callable[[], bool] | None = None
    ) -> None:
        step = 16 * chunk_ms
        for i in range(0, len(pcm), step):
            assert await self.send(ev.AudioIn(pcm16=pcm16(pcm[i : i + step]), sample_rate=16000))
            if stop is not None and stop():
                return


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 16000), np.float32)


def test_text_turn_updates_history_and_store() -> None:
    async def body() -> None:
        h = Harness(FakeComponents())
        conv = await h.open()
        await h.send(ev.TextIn(text="Hi there"))
        events = await h.until()
        turn = events[0]
        assert isinstance(turn.event, ev.TurnStarted) and turn.event.modality == "text"
        assert turn.turn_id == "turn-1" and turn.response_id.startswith("resp-")
        assert {e.response_id for e in events} == {turn.response_id}
        assert isinstance(events[-1].event, ev.ResponseDone)
        assert conv.session.history[-1].user == "Hi there"
        assert conv.session.history[-1].assistant == "☜Hello there. How are you?"
        await conv.finish()
        stored = await h.store.load(conv.session.id)
        assert stored.turns == 1 and len(stored.history) == 1
        # The next turn's prompt carries the history.
        assert h.outbox.closed

    run(body())


def test_after_a_turn_the_next_prompts_prefix_is_warmed_in_the_llm_cache() -> None:
    async def body() -> None:
        h = Harness(FakeComponents())
        conv = await h.open()
        await h.send(ev.TextIn(text="Hi there"))
        await h.until()
        await h.send(ev.TextIn(text="And then?"))
        await h.until()
        await conv.finish()
        assert [sid for sid, _ in h.fake.warm_prompts] == [conv.session.id] * 2
        first_warm = h.fake.warm_prompts[0][1]
        # exactly the start of the next turn's prompt: system prompt, turn 1 as history, the user header
        assert h.fake.prompts[1].startswith(first_warm) and first_warm.endswith("<|im_start|>user\n")
        assert "Hi there" in first_warm and "Hello there. How are you?" in first_warm
        assert "And then?" not in first_warm and len(h.fake.prompts) == 2  # warm-ups are not turns

        # a camera session: a turn with frames is followed by one with frames, so the warm-up uses the
        # video system prompt and the next turn's prompt starts with it
        cam = Harness(FakeComponents())
        conv = await cam.open()
        for t in (1.0, 2.0):
            await cam.send(ev.VideoFrameIn(data=png(), timestamp_s=t))
            await cam.send(ev.TextIn(text=f"What now at {t}?"))
            await cam.until()
        await conv.finish()
        assert len(cam.fake.image_calls) == 2, "both turns carried the camera frame"
        assert len(cam.fake.prompts) == 2 and cam.fake.prompts[1].startswith(cam.fake.warm_prompts[0][1])

        off = Harness(FakeComponents(), make_config(prefix_warmup=False))
        conv = await off.open()
        await off.send(ev.TextIn(text="Hi there"))
        await off.until()
        await conv.finish()
        assert off.fake.warm_prompts == []

    run(body())


def test_push_to_talk_turn_with_deferred_text_and_image(question_pcm: np.ndarray) -> None:
    async def body() -> None:
        h = Harness(FakeComponents())
        conv = await h.open()
        await h.send(ev.TextIn(text="Look:", defer_commit=True))
        await h.send(ev.ImageIn(data=(GOLDEN / "image0_800x600.png").read_bytes()))
        await h.stream_audio(question_pcm)
        assert h.queued() == []  # nothing happens before the commit
        await h.send(ev.CommitIn())
        events = await h.until()
        assert events[0].event == ev.TurnStarted(modality="audio", images=1, frames=0)
        assert isinstance(events[-1].event, ev.ResponseDone)
        assert len(h.fake.audio_calls[0]) == len(question_pcm)
        np.testing.assert_allclose(h.fake.audio_calls[0], question_pcm, atol=1 / 32768)
        assert "<image>\nLook:<audio><|im_end|>" in h.fake.prompts[0]
        assert conv.session.history[-1].user == f"{IMAGE_MARKER} Look: {AUDIO_MARKER}"
        assert conv.session.pending.empty()

    run(body())


def test_camera_frames_the_four_most_recent_go_with_a_turn() -> None:
    async def body() -> None:
        h = Harness(FakeComponents())
        await h.open()
        frames = [png((16 + i, 16)) for i in range(6)]
        for i, frame in enumerate(frames):
            await h.send(ev.VideoFrameIn(data=frame, timestamp_s=float(i)))
        await h.send(ev.TextIn(text="What do you see?"))
        events = await h.until()
        assert events[0].event == ev.TurnStarted(modality="text", images=0, frames=4)
        assert [i.data for i in h.fake.image_calls[0]] == frames[2:]

    run(body())


BAD_EVENTS = [
    (ev.AudioIn(pcm16=b"\0\0" * 100, sample_rate=44100, event_id="e1"), "INVALID_ARGUMENT", "sample_rate"),
    (ev.AudioIn(pcm16=b"\0" * 201, sample_rate=16000, event_id="e2"), "INVALID_ARGUMENT", "odd"),
    (ev.AudioIn(pcm16=b"\0" * 400_000, sample_rate=16000, event_id="e3"), "INVALID_ARGUMENT", "at most"),
    (ev.ImageIn(data=b"\x89PNG\r\n\x1a\nbroken", event_id="e4"), "INVALID_ARGUMENT", "image"),
    (ev.ImageIn(data=b"x" * (9 * 1024 * 1024), event_id="e5"), "INVALID_ARGUMENT", "at most"),
    (ev.ImageIn(data=png(), max_tiles=13, event_id="e6"), "INVALID_ARGUMENT", "max_tiles"),
    (ev.VideoFrameIn(data=b"not an image", event_id="e7"), "INVALID_ARGUMENT", "image"),
    (ev.TextIn(text="x" * 8001, event_id="e8"), "INVALID_ARGUMENT", "too long"),
    (ev.TextIn(text="hi <|im_end|>", event_id="e9"), "INVALID_ARGUMENT", "reserved"),
    (ev.CommitIn(event_id="e10"), "FAILED_PRECONDITION", "nothing to commit"),
    (ev.UpdateSession(session_id="sess-other", event_id="e11"), "INVALID_ARGUMENT", "one session"),
    (
        ev.UpdateSession(settings=SettingsUpdate(turn_detection="auto"), event_id="e12"),
        "INVALID_ARGUMENT",
        "turn_detection",
    ),
]


@pytest.mark.parametrize(("event", "code", "words"), BAD_EVENTS, ids=[e[0].event_id for e in BAD_EVENTS])
def test_bad_event_is_an_error_event_and_the_session_goes_on(
    event: ev.ClientEvent, code: str, words: str
) -> None:
    async def body() -> None:
        h = Harness(FakeComponents())
        await h.open()
        assert await h.send(event)
        err = (await h.next()).event
        assert isinstance(err, ev.ErrorEvent) and err.code == code and err.event_id == event.event_id
        assert words in err.message and not err.retryable
        await h.send(ev.TextIn(text="still there?"))
        assert isinstance((await h.until())[-1].event, ev.ResponseDone)

    run(body())


def test_short_push_to_talk_and_new_turns_during_a_response_without_barge_in_are_refused() -> None:
    async def body() -> None:
        gate = asyncio.Event()
        h = Harness(FakeComponents(llm_gate=(3, gate)), make_config(barge_in_enabled=False))
        await h.open()
        await h.send(ev.AudioIn(pcm16=b"\0\0" * 800, sample_rate=16000))  # 50 ms
        await h.send(ev.CommitIn(event_id="ptt"))
        err = (await h.next()).event
        assert err.code == "INVALID_ARGUMENT" and "too short" in err.message
        await h.send(ev.TextIn(text="first"))
        await h.until(ev.TextDelta)
        await h.send(ev.CommitIn(event_id="c"))
        await h.send(ev.TextIn(text="second", event_id="t"))
        await h.send(ev.TextIn(text="later", defer_commit=True))  # allowed: kept for the next turn
        errors = [e.event for e in await h.until(ev.ErrorEvent) + await h.until(ev.ErrorEvent)]
        errs = [e for e in errors if isinstance(e, ev.ErrorEvent)]
        assert [(e.code, e.event_id) for e in errs] == [
            ("FAILED_PRECONDITION", "c"),
            ("FAILED_PRECONDITION", "t"),
        ]
        gate.set()
        assert isinstance((await h.until())[-1].event, ev.ResponseDone)
        await h.send(ev.CommitIn())
        await h.until()
        assert "later" in h.fake.prompts[-1] and "second" not in h.fake.prompts[-1]

    run(body())


def test_client_interrupt_truncates_history_and_ignores_stale_ids() -> None:
    async def body() -> None:
        llm_gate = asyncio.Event()
        fake = FakeComponents(
            reply=["☜", " Hello", " there", ".", " How", " are", " you", "?", " Fine", "."],
            llm_gate=(8, llm_gate),
        )
        h = Harness(fake)
        conv = await h.open()
        await h.send(ev.TextIn(text="talk"))
        await h.until(ev.AudioOut)
        await h.until(ev.AudioOut)  # segment 0 sent whole
        h.clock.advance(0.3)  # ... and played by the client (paced playout)
        response_id = conv.response.id
        await h.send(ev.InterruptIn(response_id="resp-stale"))
        assert not conv.response.finished
        await h.send(ev.InterruptIn(response_id=response_id))
        rest = await h.until(ev.Interrupted)
        assert not any(
            isinstance(e.event, (ev.AudioOut, ev.TextDelta)) for e in rest[:-1] if e.t_ms > rest[-1].t_ms
        )
        intr = rest[-1].event
        assert (
            intr.reason == "client" and intr.played_ms >= 200 and intr.heard_text.startswith("Hello there.")
        )
        assert conv.session.history[-1].assistant == "☜" + intr.heard_text
        assert fake.llm_streams[0].closed
        await h.send(ev.InterruptIn())  # nothing running: ignored
        assert h.queued() == []

    run(body())


def test_vad_turn_with_silero(question_pcm: np.ndarray) -> None:
    async def body() -> None:
        h = Harness(FakeComponents(), turn_detection="vad")
        conv = await h.open()
        await h.stream_audio(np.concatenate([silence(0.5), question_pcm, silence(1.0)]))
        events = await h.until()
        kinds = [type(e.event) for e in events]
        assert kinds[:3] == [ev.SpeechStarted, ev.SpeechStopped, ev.TurnStarted]
        start, stop, turn = (e.event for e in events[:3])
        assert 400 <= start.audio_start_ms <= 560
        assert abs(stop.audio_end_ms - (500 + len(question_pcm) / 16)) < 150
        assert turn.modality == "audio" and events[0].turn_id == events[2].turn_id == "turn-1"
        assert abs(len(h.fake.audio_calls[0]) - len(question_pcm)) < 0.25 * 16000
        assert isinstance(events[-1].event, ev.ResponseDone)
        assert conv.session.history[-1].user == AUDIO_MARKER

    run(body())


def test_half_close_mid_utterance_commits_it(question_pcm: np.ndarray) -> None:
    async def body() -> None:
        h = Harness(FakeComponents(), turn_detection="vad")
        conv = await h.open()
        await h.stream_audio(np.concatenate([silence(0.3), question_pcm]))  # no trailing silence
        finishing = asyncio.create_task(conv.finish())
        events = await h.until()
        await finishing
        assert [type(e.event) for e in events[:3]] == [ev.SpeechStarted, ev.SpeechStopped, ev.TurnStarted]
        assert isinstance(events[-1].event, ev.ResponseDone) and h.outbox.closed

    run(body())


def test_barge_in_interrupts_and_the_utterance_becomes_the_next_turn(question_pcm: np.ndarray) -> None:
    async def body() -> None:
        gate = asyncio.Event()
        fake = FakeComponents(llm_gate=(6, gate))
        h = Harness(fake, turn_detection="vad")
        conv = await h.open()
        await h.send(ev.TextIn(text="tell me a story"))
        await h.until(ev.AudioOut)
        first = conv.response
        await h.stream_audio(np.concatenate([silence(0.3), question_pcm, silence(1.0)]))
        events = await h.until(ev.Interrupted)
        assert isinstance(events[0].event, ev.SpeechStarted)
        intr = events[-1]
        assert intr.response_id == first.id and intr.event.reason == "barge_in"
        assert fake.llm_streams[0].closed
        gate.set()  # lets the next response run to its end
        # Barge-in happened once speech lasted 500 ms, long before the utterance ended.
        assert intr.t_ms < [e for e in await h.until(ev.SpeechStopped)][-1].t_ms
        events = await h.until()
        turn = [e for e in events if isinstance(e.event, ev.TurnStarted)][0]
        assert turn.event.modality == "audio" and turn.response_id != first.id
        assert isinstance(events[-1].event, ev.ResponseDone) and events[-1].response_id == turn.response_id
        assert conv.session.history[0].assistant.startswith("☜")  # the interrupted turn, truncated

    run(body())


def test_a_short_backchannel_neither_interrupts_nor_starts_a_turn(short_pcm: np.ndarray) -> None:
    async def body() -> None:
        gate = asyncio.Event()
        fake = FakeComponents(llm_gate=(6, gate))
        h = Harness(fake, make_config(barge_in_min_speech_ms=800), turn_detection="vad")
        conv = await h.open()
        await h.send(ev.TextIn(text="tell me a story"))
        await h.until(ev.AudioOut)
        await h.stream_audio(np.concatenate([silence(0.3), short_pcm, silence(1.0)]))
        seen = await h.until(ev.SpeechStopped)
        assert not any(isinstance(e.event, (ev.Interrupted, ev.TurnStarted)) for e in seen)
        assert not conv.response.finished and not fake.llm_streams[0].closed
        gate.set()
        assert isinstance((await h.until())[-1].event, ev.ResponseDone)

    run(body())


def test_settings_update_and_end_session() -> None:
    async def body() -> None:
        gate = asyncio.Event()
        h = Harness(FakeComponents(llm_gate=(3, gate)))
        conv = await h.open()
        await h.send(ev.UpdateSession(settings=SettingsUpdate(turn_detection="vad", max_reply_tokens=5)))
        started = (await h.next()).event
        assert isinstance(started, ev.SessionStarted) and started.resumed
        assert started.settings.turn_detection == "vad" and started.settings.max_reply_tokens == 5
        assert (await h.store.load(conv.session.id)).settings.max_reply_tokens == 5
        await h.send(ev.TextIn(text="go"))
        await h.until(ev.TextDelta)
        assert not await h.send(ev.EndSessionIn())  # ends the stream
        assert isinstance((await h.until(ev.Interrupted))[-1].event, ev.Interrupted)
        await conv.finish()
        await asyncio.sleep(0)
        with pytest.raises(Exception, match="does not exist"):
            await h.store.load(conv.session.id)

    run(body())


# ---- clearing the input, VAD turns that wait for a commit ----------------------------------------------


def test_clear_input_drops_what_waits_for_the_next_turn_but_not_a_running_response() -> None:
    async def body() -> None:
        gate = asyncio.Event()
        h = Harness(FakeComponents(llm_gate=(3, gate)))
        conv = await h.open()
        await h.send(ev.TextIn(text="first"))
        await h.until(ev.TextDelta)
        await h.send(ev.TextIn(text="forget this", defer_commit=True))
        await h.send(ev.ImageIn(data=png()))
        await h.send(ev.AudioIn(pcm16=b"\1\0" * 8000, sample_rate=16000))
        assert not conv.session.pending.empty()
        await h.send(ev.ClearInputIn())
        assert conv.session.pending.empty() and not conv.response.finished
        gate.set()
        assert isinstance((await h.until())[-1].event, ev.ResponseDone)  # the response went on
        assert [t.user for t in conv.session.history] == ["first"]
        await h.send(ev.CommitIn(event_id="c"))
        err = (await h.next()).event
        assert isinstance(err, ev.ErrorEvent) and err.code == "FAILED_PRECONDITION" and err.event_id == "c"
        await h.send(ev.TextIn(text="fresh"))
        assert (await h.next()).event == ev.TurnStarted(modality="text", images=0, frames=0)
        await h.until()
        assert "forget this" not in h.fake.prompts[-1] and "fresh" in h.fake.prompts[-1]
        assert h.fake.audio_calls == [] and h.fake.image_calls == []

    run(body())


def test_clear_input_drops_the_utterance_in_progress_without_speech_stopped(question_pcm: np.ndarray) -> None:
    async def body() -> None:
        h = Harness(FakeComponents(), turn_detection="vad")
        conv = await h.open()
        half = question_pcm[: len(question_pcm) // 2]
        await h.stream_audio(np.concatenate([silence(0.5), half]))
        assert isinstance((await h.next()).event, ev.SpeechStarted)
        assert h.queued() == []
        await h.send(ev.ClearInputIn())
        await h.stream_audio(silence(1.5))
        assert h.queued() == [], "no speech_stopped and no turn for a cleared utterance"
        # The next utterance is detected afresh, at its place in the stream's input audio.
        at_ms = 500 + len(half) / 16 + 1500
        await h.stream_audio(np.concatenate([question_pcm, silence(1.0)]))
        events = await h.until()
        assert [type(e.event) for e in events[:3]] == [ev.SpeechStarted, ev.SpeechStopped, ev.TurnStarted]
        assert at_ms - 100 <= events[0].event.audio_start_ms <= at_ms + 100
        assert abs(events[1].event.audio_end_ms - (at_ms + len(question_pcm) / 16)) < 150
        assert abs(len(h.fake.audio_calls[0]) - len(question_pcm)) < 0.25 * 16000
        assert isinstance(events[-1].event, ev.ResponseDone) and conv.session.turns == 1

    run(body())


def test_vad_create_response_off_keeps_utterances_for_the_next_commit(question_pcm: np.ndarray) -> None:
    async def body() -> None:
        gate = asyncio.Event()
        fake = FakeComponents(llm_gate=(3, gate))
        config = make_config(barge_in_enabled=False, max_turn_audio_s=5.0)
        h = Harness(fake, config, turn_detection="vad", vad_create_response=False)
        conv = await h.open()
        assert conv.session.settings.vad_create_response is False
        utterance = np.concatenate([silence(0.5), question_pcm, silence(1.0)])
        await h.stream_audio(utterance)
        got = [(await h.next()).event, (await h.next()).event]
        assert [type(e) for e in got] == [ev.SpeechStarted, ev.SpeechStopped]
        assert h.queued() == [] and conv.response is None, "no turn at the end of the utterance"
        kept = pcm16_to_float(conv.session.pending.audio)
        assert abs(len(kept) - len(question_pcm)) < 0.25 * 16000
        # A second utterance would pass the turn's audio limit (5 s): dropped, with an error.
        await h.stream_audio(utterance)
        got = [e.event for e in await h.until(ev.ErrorEvent)]
        assert [type(e) for e in got] == [ev.SpeechStarted, ev.SpeechStopped, ev.ErrorEvent]
        assert got[-1].code == "INVALID_ARGUMENT" and "utterance was dropped" in got[-1].message
        assert len(pcm16_to_float(conv.session.pending.audio)) == len(kept)
        # A typed question that commits takes the kept audio along.
        await h.send(ev.TextIn(text="Look:"))
        assert (await h.next()).event == ev.TurnStarted(modality="audio", images=0, frames=0)
        await h.until(ev.TextDelta)
        np.testing.assert_array_equal(fake.audio_calls[0], kept)  # exactly the utterance's samples
        assert "Look:<audio>" in fake.prompts[0]
        # An utterance that ends while a response runs is dropped, as when responses start by themselves.
        await h.stream_audio(utterance)
        await h.until(ev.SpeechStopped)
        assert conv.session.pending.empty()
        gate.set()
        await h.until()
        # A commit starts the turn with an utterance kept since.
        await h.stream_audio(utterance)
        await h.until(ev.SpeechStopped)
        await h.send(ev.CommitIn())
        events = await h.until()
        assert events[0].event.modality == "audio" and isinstance(events[-1].event, ev.ResponseDone)
        assert len(fake.audio_calls) == 2 and conv.session.pending.empty()

    run(body())


# ---- history edits: truncating a finished reply, deleting a turn ------------------------------------


async def _text_turn(h: Harness, text: str) -> ev.Envelope:
    """A text turn to its end; returns its ResponseDone."""
    await h.send(ev.TextIn(text=text))
    done = (await h.until())[-1]
    assert isinstance(done.event, ev.ResponseDone)
    return done


def test_playback_position_of_a_finished_reply_truncates_its_history_turn() -> None:
    async def body() -> None:
        # Two segments of 200 ms of audio each: "Hello there." and "How are you?"
        h = Harness(FakeComponents())
        conv = await h.open()
        done = await _text_turn(h, "Greet me")
        rid, tid = done.response_id, done.turn_id

        async def truncate(played_ms: int) -> ev.Envelope:
            await h.send(ev.PlaybackIn(response_id=rid, played_ms=played_ms))
            env = await h.next()
            assert isinstance(env.event, ev.HistoryTruncated)
            assert (env.turn_id, env.response_id, env.event.turn_id) == (tid, rid, tid)
            return env

        # Played to the end (or past it): nothing changes, the answer has the whole reply.
        assert (await truncate(10_000)).event == ev.HistoryTruncated(tid, 400, "Hello there. How are you?")
        assert conv.session.history[-1].assistant == "☜Hello there. How are you?"
        assert len(h.fake.warm_prompts) == 1, "nothing changed: the warm-up stands"
        # Stopped after the first sentence: history keeps it (state mark included), and it is saved.
        assert (await truncate(250)).event == ev.HistoryTruncated(tid, 250, "Hello there.")
        assert conv.session.history[-1].assistant == "☜Hello there."
        assert conv.session.history[-1].turn_id == tid and conv.session.history[-1].user == "Greet me"
        assert (await h.store.load(conv.session.id)).history == conv.session.history
        # Cut further; never lengthened again.
        assert (await truncate(100)).event == ev.HistoryTruncated(tid, 100, "Hello")
        assert (await truncate(300)).event == ev.HistoryTruncated(tid, 100, "Hello")
        assert conv.session.history[-1].assistant == "☜Hello"
        # The next prompt holds the truncated reply and starts with the latest warm-up.
        assert len(h.fake.warm_prompts) == 3
        warm = h.fake.warm_prompts[-1][1]
        assert "☜Hello<|im_end|>" in warm and "there" not in warm
        await _text_turn(h, "And then?")
        assert h.fake.prompts[-1].startswith(warm) and "How are you" not in h.fake.prompts[-1]

    run(body())


def test_playback_position_after_an_interruption_cuts_the_heard_text_further() -> None:
    async def body() -> None:
        gate = asyncio.Event()
        fake = FakeComponents(llm_gate=(8, gate),
                              reply=["☜", " Hello", " there", ".", " How", " are", " you", "?", " Fine", "."])
        h = Harness(fake)
        conv = await h.open()
        await h.send(ev.TextIn(text="talk"))
        await h.until(ev.AudioOut)
        await h.until(ev.AudioOut)
        h.clock.advance(0.3)
        rid, tid = conv.response.id, conv.response.turn_id
        # While the response runs, a position is only the client's report: no history change.
        await h.send(ev.PlaybackIn(response_id=rid, played_ms=5000))
        assert not any(isinstance(e, ev.HistoryTruncated) for e in h.queued())
        await h.send(ev.InterruptIn())
        intr = (await h.until(ev.Interrupted))[-1].event
        assert intr.heard_text == "Hello there." and conv.session.history[-1].assistant == "☜Hello there."
        await h.send(ev.PlaybackIn(response_id=rid, played_ms=120))
        env = await h.next()
        assert env.event == ev.HistoryTruncated(tid, 120, "Hello") and env.response_id == rid
        assert conv.session.history[-1].assistant == "☜Hello"

    run(body())


def test_playback_position_of_an_unknown_or_older_response_is_an_error() -> None:
    async def body() -> None:
        h = Harness(FakeComponents())
        conv = await h.open()
        await h.send(ev.PlaybackIn(response_id="resp-none", played_ms=10, event_id="p0"))  # no response yet
        errors = [(await h.next()).event]
        first = await _text_turn(h, "one")
        await _text_turn(h, "two")
        for rid in ("resp-unknown", first.response_id, ""):
            await h.send(ev.PlaybackIn(response_id=rid, played_ms=10, event_id="p"))
        errors += [(await h.next()).event for _ in range(3)]
        assert all(isinstance(e, ev.ErrorEvent) and e.code == "INVALID_ARGUMENT" for e in errors)
        assert "can only truncate the last response" in errors[0].message
        assert [e.event_id for e in errors] == ["p0", "p", "p", "p"]
        assert [t.assistant for t in conv.session.history] == ["☜Hello there. How are you?"] * 2
        # The last response's turn no longer last in history (deleted): nothing to truncate either.
        last = conv.response
        await h.send(ev.DeleteTurnIn(turn_id=last.turn_id))
        assert isinstance((await h.next()).event, ev.TurnDeleted)
        await h.send(ev.PlaybackIn(response_id=last.id, played_ms=10))
        assert (await h.next()).event.code == "INVALID_ARGUMENT"
        await _text_turn(h, "still there?")

    run(body())


def test_delete_turn_removes_it_from_history_store_and_later_prompts() -> None:
    async def body() -> None:
        h = Harness(FakeComponents(reply=["☜", " Noted", "."]))
        conv = await h.open()
        for text in ("apples", "bananas", "cherries"):
            await _text_turn(h, text)
        assert [t.turn_id for t in conv.session.history] == ["turn-1", "turn-2", "turn-3"]
        await h.send(ev.DeleteTurnIn(turn_id="turn-2", event_id="d"))
        env = await h.next()
        assert env.event == ev.TurnDeleted("turn-2") and env.turn_id == "turn-2"
        assert [t.user for t in conv.session.history] == ["apples", "cherries"]
        stored = await h.store.load(conv.session.id)
        assert [(t.user, t.turn_id) for t in stored.history] == [("apples", "turn-1"), ("cherries", "turn-3")]
        # A settings update (or a resume) lists the history with the ids.
        await h.send(ev.UpdateSession())
        started = (await h.next()).event
        assert [t.turn_id for t in started.history] == ["turn-1", "turn-3"]
        # Unknown, already deleted, or no id: NOT_FOUND, and the session goes on.
        for turn_id in ("turn-2", "turn-9", ""):
            await h.send(ev.DeleteTurnIn(turn_id=turn_id, event_id=f"x{turn_id}"))
            err = (await h.next()).event
            assert isinstance(err, ev.ErrorEvent) and (err.code, err.event_id) == ("NOT_FOUND", f"x{turn_id}")
        await _text_turn(h, "what fruit?")
        assert "apples" in h.fake.prompts[-1] and "bananas" not in h.fake.prompts[-1]
        assert conv.session.history[-1].turn_id == "turn-4"  # ids keep counting

    run(body())


def test_deleting_the_last_turn_stops_its_warm_up_and_warms_the_remaining_history() -> None:
    async def body() -> None:
        fake = FakeComponents(reply=["☜", " Noted", "."], warm_gate=asyncio.Event())
        h = Harness(fake)
        conv = await h.open()
        await _text_turn(h, "apples")
        await _text_turn(h, "bananas")
        while len(fake.warm_prompts) < 2:  # the warm-up of [apples, bananas] is running
            await asyncio.sleep(0)
        running = fake.warm_prompts[-1][1]
        assert "bananas" in running
        await h.send(ev.DeleteTurnIn(turn_id="turn-2"))
        assert (await h.next()).event == ev.TurnDeleted("turn-2")
        await asyncio.sleep(0)
        assert fake.warm_cancelled[-1] == running, "the warm-up of the old history was stopped"
        warm = fake.warm_prompts[-1][1]
        assert "apples" in warm and "bananas" not in warm
        fake.warm_gate.set()
        await _text_turn(h, "what fruit?")
        assert fake.prompts[-1].startswith(warm) and "bananas" not in fake.prompts[-1]
        # Deleting an older turn changes the prefix too; deleting every turn leaves nothing to warm.
        await h.send(ev.DeleteTurnIn(turn_id="turn-1"))
        assert (await h.next()).event == ev.TurnDeleted("turn-1")
        assert len(fake.warm_prompts) == 5
        assert "what fruit?" in fake.warm_prompts[-1][1] and "apples" not in fake.warm_prompts[-1][1]
        await h.send(ev.DeleteTurnIn(turn_id="turn-3"))
        assert (await h.next()).event == ev.TurnDeleted("turn-3")
        assert conv.session.history == [] and len(fake.warm_prompts) == 5

    run(body())


def test_the_turn_whose_response_runs_cannot_be_deleted_but_earlier_ones_can() -> None:
    async def body() -> None:
        h = Harness(FakeComponents())
        conv = await h.open()
        await _text_turn(h, "apples")
        gate = asyncio.Event()
        h.fake.llm_gate = (3, gate)
        await h.send(ev.TextIn(text="bananas"))
        await h.until(ev.TextDelta)
        await h.send(ev.DeleteTurnIn(turn_id=conv.response.turn_id, event_id="del"))
        err = (await h.until(ev.ErrorEvent))[-1].event
        assert err.code == "FAILED_PRECONDITION" and "interrupt the response first" in err.message
        assert err.event_id == "del" and not conv.response.finished
        # An earlier turn can go while the response runs; the running one's prompt already had it.
        await h.send(ev.DeleteTurnIn(turn_id="turn-1"))
        assert (await h.until(ev.TurnDeleted))[-1].event == ev.TurnDeleted("turn-1")
        gate.set()
        await h.until()
        assert [t.turn_id for t in conv.session.history] == ["turn-2"]
        warm = h.fake.warm_prompts[-1][1]
        assert "bananas" in warm and "apples" not in warm
        await h.send(ev.DeleteTurnIn(turn_id="turn-2"))  # finished now
        assert (await h.next()).event == ev.TurnDeleted("turn-2") and conv.session.history == []

    run(body())
