"""Unit tests of the barge-in policy: the state machine (bargein.py) on scripted VAD probabilities, its
settings, and the policy as `Conversation` applies it (scripted VAD, scripted components, virtual clock):
hold and resume after a backchannel, interruption with the heard text kept in history, new turns while a
response runs. tests/e2e/test_bargein.py runs the same rules through real Triton and gRPC."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from conftest import make_config, run
from fakes import FakeComponents, ScriptedVad, VirtualClock
from PIL import Image

from vitaserve.errors import InvalidInput
from vitaserve_orchestrator import events as ev
from vitaserve_orchestrator.bargein import BargeInConfig, BargeInPolicy, BargeInUpdate, Decision
from vitaserve_orchestrator.conversation import Conversation
from vitaserve_orchestrator.outbox import Outbox
from vitaserve_orchestrator.session import InMemorySessionStore, SettingsUpdate

pytestmark = pytest.mark.unit

W = 32.0  # ms per VAD window (512 samples at 16 kHz)
END = (ev.ResponseDone, ev.Interrupted, ev.ErrorEvent)


def feed(policy: BargeInPolicy, probs: list[float], *, speaking: bool = True, start_ms: float = 0.0):
    """Feed windows; returns [(window index, decision)]."""
    out = []
    for i, p in enumerate(probs):
        d = policy.feed(p, end_ms=start_ms + (i + 1) * W, window_ms=W, assistant_speaking=speaking)
        if d is not None:
            out.append((i, d))
    return out


# ---- the state machine ----------------------------------------------------------------------------


def test_a_backchannel_holds_then_releases_without_interrupting() -> None:
    policy = BargeInPolicy(BargeInConfig(min_speech_ms=500, resume_silence_ms=300))
    got = feed(policy, [0.0] * 5 + [0.9] * 8 + [0.1] * 12)  # 256 ms of speech
    assert [(i, d.kind) for i, d in got] == [(5, "hold"), (22, "release")]  # 10 silent windows = 320 ms
    assert got[0][1].audio_ms == 6 * W
    assert not policy.holding and not policy.in_speech


def test_speech_meeting_the_minimum_interrupts_once() -> None:
    policy = BargeInPolicy(BargeInConfig(min_speech_ms=500))
    got = feed(policy, [0.9] * 40)
    assert [d.kind for _, d in got] == ["hold", "interrupt"]
    i, decision = got[1]
    assert i == 15 and decision == Decision("interrupt", 16 * W, 16 * W)  # 512 ms >= 500 ms
    assert not policy.holding
    # The same stretch of speech goes on over the next response: no second interruption.
    assert feed(policy, [0.9] * 20, start_ms=40 * W) == []
    # After it ended, new speech can interrupt again.
    got = feed(policy, [0.0] * 10 + [0.9] * 16, start_ms=60 * W)
    assert [d.kind for _, d in got] == ["hold", "interrupt"]


def test_hysteresis_and_short_gaps_count_as_speech() -> None:
    policy = BargeInPolicy(BargeInConfig(threshold=0.7, min_speech_ms=500, resume_silence_ms=300))
    # 0.6 >= 0.7 - 0.15 keeps speech going; a 160 ms gap (< 300 ms) does not end it.
    got = feed(policy, [0.9] * 4 + [0.6] * 4 + [0.1] * 5 + [0.9] * 4)
    assert [(i, d.kind) for i, d in got] == [(0, "hold"), (15, "interrupt")]
    assert got[1][1].speech_ms == 16 * W  # 512 ms from the first window, the gap included
    # 0.6 alone does not start speech.
    assert feed(BargeInPolicy(BargeInConfig()), [0.6] * 30) == []


def test_continue_mode_never_holds_and_disabled_never_acts() -> None:
    got = feed(BargeInPolicy(BargeInConfig(in_flight="continue")), [0.9] * 20)
    assert [d.kind for _, d in got] == ["interrupt"]
    assert feed(BargeInPolicy(BargeInConfig(enabled=False)), [0.9] * 40) == []


def test_only_while_the_assistant_speaks_and_speech_counts_from_its_start() -> None:
    policy = BargeInPolicy(BargeInConfig(min_speech_ms=500))
    assert feed(policy, [0.9] * 10, speaking=False) == []
    got = feed(policy, [0.9] * 10, speaking=True, start_ms=10 * W)
    assert [(i, d.kind) for i, d in got] == [(0, "hold"), (5, "interrupt")]  # 16 windows in all


def test_min_speech_zero_interrupts_at_the_first_window() -> None:
    got = feed(BargeInPolicy(BargeInConfig(min_speech_ms=0)), [0.0, 0.9])
    assert [(i, d.kind) for i, d in got] == [(1, "interrupt")]


def test_a_hold_ends_when_the_response_ends() -> None:
    policy = BargeInPolicy(BargeInConfig())
    assert [d.kind for _, d in feed(policy, [0.9] * 3)] == ["hold"]
    assert [d.kind for _, d in feed(policy, [0.9], speaking=False, start_ms=3 * W)] == ["release"]


def test_settings_resolve_defaults_overrides_and_bad_values() -> None:
    config = make_config(barge_in_min_speech_ms=700, barge_in_in_flight="continue")
    assert BargeInConfig.resolve(None, config) == BargeInConfig(min_speech_ms=700, in_flight="continue")
    custom = BargeInConfig.resolve(BargeInUpdate(enabled=False, min_speech_ms=0, threshold=0.5), config)
    assert custom == BargeInConfig(enabled=False, threshold=0.5, min_speech_ms=0, in_flight="continue")
    for bad, words in [
        (BargeInUpdate(threshold=1.5), "threshold"),
        (BargeInUpdate(min_speech_ms=20_000), "min_speech_ms"),
        (BargeInUpdate(in_flight="duck"), "in_flight"),
        (BargeInUpdate(resume_silence_ms=5), "resume_silence_ms"),
    ]:
        with pytest.raises(InvalidInput, match=words):
            BargeInConfig.resolve(bad, config)


# ---- the policy in a conversation ------------------------------------------------------------------


REPLY = ["☜", " Hello", " there", ".", " How", " are", " you", "?", " I", " am", " fine", "."]


class Scripted:
    """A VAD-mode conversation over scripted components and a scripted VAD, on a virtual clock."""

    def __init__(self, fake: FakeComponents, probabilities: list[float], **settings: object) -> None:
        self.fake = fake
        self.vad = ScriptedVad(probabilities)
        self.clock = VirtualClock(realtime=False)
        self.outbox = Outbox(clock=self.clock, sleep=self.clock.sleep)
        self.store = InMemorySessionStore()
        self.settings = SettingsUpdate(**{"turn_detection": "vad", **settings})  # type: ignore[arg-type]
        self.conv: Conversation | None = None
        self.sent: list[ev.Envelope] = []

    async def open(self) -> Conversation:
        self.conv = await Conversation.open(
            ev.UpdateSession(settings=self.settings),
            store=self.store,
            components=self.fake,
            config=make_config(),
            outbox=self.outbox,
            vad_factory=lambda: self.vad,
            clock=self.clock,
        )
        assert isinstance((await self.next()).event, ev.SessionStarted)
        return self.conv

    async def next(self) -> ev.Envelope:
        env = await asyncio.wait_for(self.outbox.get(), 5)
        assert env is not None
        self.sent.append(env)
        return env

    async def until(self, kinds: type | tuple[type, ...] = END) -> list[ev.Envelope]:
        got = []
        while not got or not isinstance(got[-1].event, kinds):
            got.append(await self.next())
        return got

    def drain_now(self) -> list[ev.Envelope]:
        """Everything that may be sent at this instant."""
        got = []
        while (env := self.outbox.poll()) is not None:
            got.append(env)
        self.sent += got
        return got

    async def audio(self, windows: int) -> None:
        """`windows` VAD windows of (silent) input audio, one 32 ms chunk each; the scripted VAD decides
        what they sound like."""
        assert self.conv is not None
        for _ in range(windows):
            await self.conv.dispatch(ev.AudioIn(pcm16=b"\0\0" * 512, sample_rate=16000))


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (20, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def audio_of(envs: list[ev.Envelope], response_id: str) -> list[ev.AudioOut]:
    return [e.event for e in envs if isinstance(e.event, ev.AudioOut) and e.response_id == response_id]


def test_backchannel_pauses_the_audio_and_it_resumes_where_it_stopped() -> None:
    async def body() -> None:
        # 5 silent windows, 8 windows (256 ms) of speech, then silence: shorter than the 500 ms minimum.
        h = Scripted(FakeComponents(reply=REPLY, speech_chunks=4), [0.0] * 5 + [0.9] * 8)
        conv = await h.open()
        await h.audio(1)  # the VAD is loaded before the reply starts
        await h.conv.dispatch(ev.TextIn(text="talk to me"))
        await h.until(ev.AudioOut)
        response = conv.response
        await h.audio(5 + 8)
        assert response.playout.held and not response.finished
        h.drain_now()
        before = len(audio_of(h.sent, response.id))
        h.clock.advance(2.0)
        assert audio_of(h.drain_now(), response.id) == []  # held: nothing goes out, however long
        await h.audio(10)  # 320 ms of silence: a false interruption
        assert not response.playout.held
        events = await h.until()
        assert isinstance(events[-1].event, ev.ResponseDone) and events[-1].response_id == response.id
        frames = audio_of(h.sent, response.id)
        assert len(frames) > before
        assert [a.seq for a in frames] == list(range(len(frames)))  # nothing lost or repeated
        assert sum(a.duration_ms for a in frames) == pytest.approx(events[-1].event.timings.audio_ms, abs=1)
        kinds = [type(e.event) for e in h.sent]
        assert ev.Interrupted not in kinds and kinds.count(ev.TurnStarted) == 1
        assert conv.session.history[-1].assistant == "☜Hello there. How are you? I am fine."

    run(body())


def test_barge_in_interrupts_drops_the_rest_and_history_keeps_what_was_heard() -> None:
    async def body() -> None:
        gate = asyncio.Event()  # the LLM holds after "Hello there. How are you?"
        fake = FakeComponents(reply=REPLY, llm_gate=(8, gate), speech_chunks=4)
        # silence, then 1 s of speech (the policy fires at 512 ms), then silence ending the utterance
        h = Scripted(fake, [0.0] * 4 + [0.9] * 40)
        conv = await h.open()
        await h.audio(1)
        await h.conv.dispatch(ev.TextIn(text="talk to me"))
        await h.until(ev.AudioOut)
        first = conv.response
        h.drain_now()  # 300 ms of the first segment go out at once (the lead)
        h.clock.advance(0.2)  # the client has played 200 ms of it
        await h.audio(3 + 16)
        assert first.finished
        intr = [e for e in h.drain_now() if isinstance(e.event, ev.Interrupted)]
        assert len(intr) == 1 and intr[0].response_id == first.id
        i = intr[0].event
        assert i.reason == "barge_in" and i.trigger_audio_ms == (1 + 3 + 16) * W
        assert i.policy_met_ms > 0
        # 300 ms went out at once; the client played 200 ms of segment 0 ("Hello there.", 400 ms).
        assert i.played_ms == pytest.approx(200, abs=2) and i.heard_text == "Hello"
        assert conv.session.history[0].assistant == "☜Hello"
        assert fake.llm_streams[0].closed
        gate.set()
        # The utterance goes on and becomes the next turn, whose prompt holds only the heard text.
        await h.audio(40)  # the VAD ends the utterance after 500 ms of silence
        events = await h.until()
        assert isinstance(events[-1].event, ev.ResponseDone) and events[-1].response_id != first.id
        turns = [e.event for e in h.sent if isinstance(e.event, ev.TurnStarted)]
        assert [t.modality for t in turns] == ["text", "audio"]
        assert all(e.response_id != first.id for e in h.sent[h.sent.index(intr[0]) + 1 :])
        assert "Hello<|im_end|>" in fake.prompts[1] and "Hello there" not in fake.prompts[1]

    run(body())


def test_a_new_text_turn_interrupts_the_running_response() -> None:
    async def body() -> None:
        gate = asyncio.Event()
        fake = FakeComponents(reply=REPLY, llm_gate=(8, gate))
        h = Scripted(fake, [])
        conv = await h.open()
        await conv.dispatch(ev.TextIn(text="talk to me"))
        await h.until(ev.AudioOut)
        first = conv.response
        await conv.dispatch(ev.TextIn(text="stop, another question"))
        got = h.drain_now()
        intr_env = [e for e in got if isinstance(e.event, ev.Interrupted)]
        intr = [e.event for e in intr_env]
        assert len(intr) == 1 and intr[0].reason == "new_turn" and intr_env[0].response_id == first.id
        assert conv.response is not first and conv.response.turn.text == "stop, another question"
        gate.set()
        await h.until()
        assert all(e.response_id != first.id for e in h.sent[h.sent.index(intr_env[0]) + 1 :])
        assert [t.user for t in conv.session.history] == ["talk to me", "stop, another question"]
        # SessionStarted (on a settings update or a resume) lists the history.
        await conv.dispatch(ev.UpdateSession(settings=h.settings))
        started = (await h.next()).event
        assert isinstance(started, ev.SessionStarted) and len(started.history) == 2
        assert started.history[0].assistant == "☜" + intr[0].heard_text

    run(body())


def test_with_barge_in_disabled_speech_neither_pauses_nor_interrupts() -> None:
    async def body() -> None:
        fake = FakeComponents(reply=REPLY, speech_chunks=4)
        h = Scripted(fake, [0.0] * 2 + [0.9] * 40, barge_in=BargeInUpdate(enabled=False))
        conv = await h.open()
        await h.audio(1)
        await conv.dispatch(ev.TextIn(text="talk to me"))
        await h.until(ev.AudioOut)
        response = conv.response
        await h.audio(41)
        assert not response.playout.held and not response.finished
        await h.audio(20)  # the utterance ends while the response runs: dropped, no new turn
        events = await h.until()
        assert isinstance(events[-1].event, ev.ResponseDone)
        assert [type(e.event) for e in h.sent].count(ev.TurnStarted) == 1

    run(body())


def test_audio_stream_and_frames_are_accepted_while_the_assistant_speaks() -> None:
    async def body() -> None:
        fake = FakeComponents(reply=REPLY)
        h = Scripted(fake, [], turn_detection="manual")
        conv = await h.open()
        await conv.dispatch(ev.TextIn(text="talk to me"))
        await h.until(ev.AudioOut)
        first = conv.response
        await conv.dispatch(ev.AudioIn(pcm16=np.zeros(3200, "<i2").tobytes(), sample_rate=16000))
        await conv.dispatch(ev.TextIn(text="and this", defer_commit=True))
        await conv.dispatch(ev.VideoFrameIn(data=png(), timestamp_s=1.0))
        assert not first.finished and not [e for e in h.drain_now() if isinstance(e.event, ev.ErrorEvent)]
        await conv.dispatch(ev.CommitIn())  # push-to-talk release: a new turn, interrupting the reply
        got = await h.until(ev.TurnStarted)
        assert any(isinstance(e.event, ev.Interrupted) and e.event.reason == "new_turn" for e in got)
        assert got[-1].event == ev.TurnStarted(modality="audio", images=0, frames=1)
        await h.until(ev.TextDelta)  # the new turn reached the LLM
        assert len(fake.prompts) == 2 and "and this" in fake.prompts[-1]

    run(body())


def test_the_client_playback_report_bounds_what_was_heard() -> None:
    async def body() -> None:
        gate = asyncio.Event()
        fake = FakeComponents(reply=REPLY, llm_gate=(8, gate), speech_chunks=4)
        h = Scripted(fake, [], turn_detection="manual")
        conv = await h.open()
        await conv.dispatch(ev.TextIn(text="talk to me"))
        await h.until(ev.AudioOut)
        response = conv.response
        h.drain_now()
        h.clock.advance(0.3)  # paced estimate: the 300 ms sent were played
        assert response.playout.played_ms == pytest.approx(300)
        await conv.dispatch(ev.PlaybackIn(response_id="resp-other", played_ms=10))  # another response: ignored
        await conv.dispatch(ev.PlaybackIn(response_id=response.id, played_ms=120))  # the client is behind
        await conv.dispatch(ev.InterruptIn())
        intr = [e.event for e in h.drain_now() if isinstance(e.event, ev.Interrupted)]
        assert intr == [ev.Interrupted(played_ms=120, heard_text="", reason="client")]  # "Hel" is no word
        assert conv.session.history[0].assistant == "☜"
        gate.set()

    run(body())


def test_session_settings_with_the_policy_survive_a_plain_data_round_trip() -> None:
    import dataclasses

    from vitaserve_orchestrator.session import SessionSettings

    s = SessionSettings.resolve(
        SettingsUpdate(barge_in=BargeInUpdate(min_speech_ms=800, in_flight="continue"), playout_lead_ms=200),
        make_config(),
    )
    assert s.barge_in.min_speech_ms == 800 and s.playout_lead_ms == 200
    assert SessionSettings(**dataclasses.asdict(s)) == s  # as a JSON/Redis store would hand it back
    with pytest.raises(InvalidInput, match="playout_lead_ms"):
        SessionSettings.resolve(SettingsUpdate(playout_lead_ms=-1), make_config())
