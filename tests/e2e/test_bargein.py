"""Barge-in end to end: real Triton, the real orchestrator process and a real gRPC client, with the reply
audio paced to real time (the server default: 300 ms lead) and the user's speech streamed in real time while
the reply plays (issue 4).

- a backchannel shorter than the policy pauses the reply, which then resumes and completes with all its
  audio (nothing lost or repeated);
- a real barge-in stops the audio, `interrupted` reports what was played, no audio of that response follows,
  the history keeps only the heard text, and the utterance becomes the next turn;
- a typed turn while a response plays interrupts it (reason new_turn).

The tiny model has random weights: replies are noise text, but ~1 s of speech per 3 characters, so a
reply of 4 tokens plays for ~3 s and one of 48 tokens for much longer than any test here waits.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.client import Conversation, read_wav_16k
from vitaserve.stack import LocalStack

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

DATA = Path(__file__).parents[1] / "orchestrator" / "data"
SILENCE_MS = 1000
# The default policy of the server (min speech 500 ms, pause in flight), spelled out for the reader.
POLICY = pb.BargeInSettings(enabled=True, min_speech_ms=500, in_flight="pause", resume_silence_ms=300)


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, timeout=90))


def silence(ms: int) -> bytes:
    return b"\0\0" * (16 * ms)


def settings(tokens: int, policy: pb.BargeInSettings = POLICY) -> pb.SessionSettings:
    return pb.SessionSettings(turn_detection="vad", want_audio=True, max_reply_tokens=tokens, temperature=0.8,
                              seed=11, barge_in=policy)


class Recorder:
    """Reads the stream in the background, stamping each event with its arrival time (client clock)."""

    def __init__(self, conv: Conversation) -> None:
        self.conv = conv
        self.events: list[tuple[float, pb.ServerEvent]] = []
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for event in self.conv.events():
            self.events.append((time.monotonic(), event))
            self._changed.set()

    async def wait_for(self, predicate, timeout: float = 30.0) -> pb.ServerEvent:  # noqa: ANN001
        """The first event (from the start) matching `predicate`."""
        async with asyncio.timeout(timeout):
            while True:
                for _, event in self.events:
                    if predicate(event):
                        return event
                self._changed.clear()
                await self._changed.wait()

    def of(self, kind: str, response_id: str | None = None) -> list[tuple[float, pb.ServerEvent]]:
        return [(t, e) for t, e in self.events
                if e.WhichOneof("event") == kind and (response_id is None or e.response_id == response_id)]

    async def stop(self) -> None:
        """Half-close and read to the end of the stream (cancelling a read would cancel the call)."""
        await self.conv.end_input()
        try:
            await asyncio.wait_for(self._task, 20)
        except TimeoutError:
            self._task.cancel()


def kind_is(kind: str, response_id: str | None = None):  # noqa: ANN201
    return lambda e: e.WhichOneof("event") == kind and (response_id is None or e.response_id == response_id)


def test_a_backchannel_pauses_the_reply_which_resumes_and_completes(stack: LocalStack) -> None:
    backchannel = read_wav_16k(DATA / "speech_short.wav")  # "Hi.", 0.42 s: shorter than the 500 ms minimum
    # Checked through what the server reports (events, their order, server-side t_ms and the response's
    # hold counters), not through gaps in the client's arrival times, which a loaded machine changes.

    async def scenario() -> None:
        async with Conversation.open(stack.orchestrator_address, settings=settings(6)) as conv:
            rec = Recorder(conv)
            try:
                await conv.send_audio(silence(200), chunk_ms=20)  # the server loads this stream's VAD
                await conv.send_text("Tell me a story.")
                first = await rec.wait_for(kind_is("audio"))
                rid = first.response_id
                await conv.send_audio(silence(200) + backchannel + silence(SILENCE_MS), chunk_ms=20,
                                      realtime=True)
                done = (await rec.wait_for(kind_is("response_done", rid))).response_done
                await rec.wait_for(kind_is("speech_stopped"))
            finally:
                await rec.stop()
            events = [e for _, e in rec.events]
            kinds = [e.WhichOneof("event") for e in events]
            assert "interrupted" not in kinds and kinds.count("turn_started") == 1, kinds
            assert "speech_started" in kinds, "the VAD must have heard the backchannel"
            audio = [e for e in events if e.WhichOneof("event") == "audio" and e.response_id == rid]
            # Full audio, in order, nothing lost or repeated.
            assert [e.audio.seq for e in audio] == list(range(len(audio)))
            total_ms = sum(len(e.audio.pcm16) // 2 for e in audio) / 24
            assert abs(total_ms - done.timings.audio_ms) <= 1 and done.timings.audio_ms > 2000
            assert all(abs(e.audio.start_ms - sum(len(a.audio.pcm16) // 2 for a in audio[:k]) / 24) <= 1
                       for k, e in enumerate(audio))
            # The reply was held while the user spoke (the policy's pause), once, then released: it resumed,
            # so frames of it follow speech_started.
            assert done.timings.holds == 1, done.timings
            assert done.timings.held_ms > 0, done.timings
            started_at = kinds.index("speech_started")
            assert any(e.WhichOneof("event") == "audio" and e.response_id == rid for e in events[started_at:])
            # Paced at the server: the frames left over about the reply's own duration (not the second it
            # takes to make), plus the hold.
            assert audio[-1].t_ms - audio[0].t_ms >= done.timings.audio_ms - 400

    run(scenario())


def test_a_real_barge_in_stops_the_audio_and_history_keeps_what_was_heard(stack: LocalStack) -> None:
    question = read_wav_16k(DATA / "speech_question.wav")  # 2.87 s of speech

    async def scenario() -> None:
        async with Conversation.open(stack.orchestrator_address, settings=settings(48)) as conv:
            rec = Recorder(conv)
            try:
                await conv.send_audio(silence(200), chunk_ms=20)
                await conv.send_text("Tell me a long story.")
                first = await rec.wait_for(kind_is("audio"))
                rid = first.response_id
                await asyncio.sleep(0.3)  # a little of the reply plays
                mic = asyncio.create_task(
                    conv.send_audio(question + silence(SILENCE_MS), chunk_ms=20, realtime=True))
                intr_event = await rec.wait_for(kind_is("interrupted", rid))
                intr_at = [t for t, e in rec.events if e is intr_event][0]
                # The history holds the heard text only (a settings update answers with the session).
                await conv.send(pb.ClientEvent(session_update=pb.SessionUpdate(settings=settings(48))))
                resumed = await rec.wait_for(lambda e: e.WhichOneof("event") == "session_started"
                                             and len(e.session_started.history) == 1)
                history = resumed.session_started.history
                # The utterance goes on and becomes the next turn.
                turn2 = await rec.wait_for(lambda e: e.WhichOneof("event") == "turn_started"
                                           and e.response_id != rid, timeout=30)
                await mic
                await rec.wait_for(kind_is("audio", turn2.response_id))
                await conv.interrupt()  # lets the stream close without playing turn 2 to its end
                await rec.wait_for(kind_is("interrupted", turn2.response_id))
            finally:
                await rec.stop()
            intr = intr_event.interrupted
            assert intr.reason == "barge_in"
            speech = rec.of("speech_started")
            assert speech and intr.trigger_audio_ms >= speech[0][1].speech_started.audio_start_ms + 400
            assert 0 < intr.policy_met_ms <= intr_event.t_ms + 1
            # No audio of the cancelled response after `interrupted`.
            audio = rec.of("audio", rid)
            assert all(t <= intr_at for t, _ in audio)
            assert all(e.response_id != rid for t, e in rec.events if t > intr_at and e is not intr_event)
            received_ms = sum(len(e.audio.pcm16) // 2 for _, e in audio) / 24
            assert received_ms - 401 <= intr.played_ms <= received_ms + 1 and intr.played_ms > 0
            text = "".join(e.text_delta.text for _, e in rec.of("text_delta", rid))
            assert text.startswith(intr.heard_text) and len(text) > len(intr.heard_text)
            assert history[0].assistant == intr.heard_text and history[0].user == "Tell me a long story."
            assert turn2.turn_started.modality == "audio"

    run(scenario())


def test_a_typed_turn_while_a_reply_plays_interrupts_it(stack: LocalStack) -> None:
    async def scenario() -> None:
        async with Conversation.open(stack.orchestrator_address, settings=settings(48)) as conv:
            rec = Recorder(conv)
            try:
                await conv.send_text("Tell me a long story.")
                first = await rec.wait_for(kind_is("audio"))
                await conv.send_text("Stop. Something else.")
                intr = await rec.wait_for(kind_is("interrupted", first.response_id))
                turn2 = await rec.wait_for(lambda e: e.WhichOneof("event") == "turn_started"
                                           and e.response_id != first.response_id)
                await conv.interrupt()
                await rec.wait_for(lambda e: e.WhichOneof("event") in ("interrupted", "response_done")
                                   and e.response_id == turn2.response_id)
            finally:
                await rec.stop()
            assert intr.interrupted.reason == "new_turn"
            assert not [e for _, e in rec.of("error")]
            assert turn2.turn_started.modality == "text"

    run(scenario())
