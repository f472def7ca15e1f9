"""Unit tests of paced output (pacing.py and the outbox's paced queue) with a virtual clock: audio leaves no
faster than real time plus the lead, control events and text pass paced audio, a held response resumes
where it stopped, the played estimate follows the paced playout and the client's own report."""

from __future__ import annotations

import pytest
from conftest import run
from fakes import VirtualClock

from vitaserve_orchestrator.events import (
    AudioOut,
    ErrorEvent,
    Interrupted,
    ResponseDone,
    SpeechStarted,
    TextDelta,
    Timings,
)
from vitaserve_orchestrator.outbox import Outbox, Playout
from vitaserve_orchestrator.pacing import PlaybackModel, split_frames

pytestmark = pytest.mark.unit

FRAME_MS = 100.0


def frame(seq: int, ms: float = FRAME_MS) -> AudioOut:
    samples = int(24 * ms)
    return AudioOut(b"\1\0" * samples, 24000, 0, 6, seq, int(seq * ms), ms, 0)


def test_split_frames_keeps_every_sample_in_order() -> None:
    pcm = bytes(range(256)) * 50  # 6400 samples
    frames = split_frames(pcm, 24000, 100)  # 2400 samples per frame
    assert [len(f) for f in frames] == [4800, 4800, 3200]
    assert b"".join(frames) == pcm


def test_playback_model_lead_and_stalls() -> None:
    m = PlaybackModel(lead_ms=300)
    assert m.is_due(100, now=0.0)  # nothing buffered
    for _ in range(3):
        assert m.is_due(100, now=0.0)
        m.on_sent(100, now=0.0)
    assert m.buffered_ms(0.0) == pytest.approx(300)
    assert not m.is_due(100, now=0.0)  # 400 ms would be buffered
    assert m.due_at(100) == pytest.approx(0.1)  # once 100 ms have played
    assert m.buffered_ms(0.25) == pytest.approx(50)
    # A stall: nothing sent for a while; the client's buffer ran dry, the next frame plays from now.
    m.on_sent(100, now=2.0)
    assert m.play_end == pytest.approx(2.1) and m.buffered_ms(2.0) == pytest.approx(100)
    # A frame longer than the lead waits for an empty buffer.
    assert not m.is_due(500, now=2.05) and m.is_due(500, now=2.1)
    m.held = True
    assert m.due_at(100) is None and not m.is_due(100, now=100.0)


def test_audio_leaves_no_faster_than_real_time_plus_the_lead() -> None:
    async def body() -> None:
        clock = VirtualClock(realtime=False)
        box = Outbox("s", clock=clock, sleep=clock.sleep)
        playout = Playout(300)
        box.watch("r1", playout, lambda _e: None)
        t0 = clock()
        for seq in range(20):  # 2 s of audio, all queued at once
            box.put(frame(seq), response_id="r1")
        sent_at = []
        for _ in range(20):
            await box.get()
            sent_at.append(clock() - t0)
            # Invariant: the client never has more than the lead buffered.
            assert playout.playback.buffered_ms(clock()) <= 300 + 1e-6
        # The first 300 ms go at once, then one 100 ms frame per 100 ms.
        assert sent_at[:3] == pytest.approx([0, 0, 0], abs=0.01)
        assert sent_at[-1] == pytest.approx(1.7, abs=0.02)
        assert playout.sent_ms == pytest.approx(2000)
        assert playout.played_ms == pytest.approx(1700, abs=20)  # 300 ms still buffered at the client

    run(body())


def test_control_events_and_text_never_wait_behind_paced_audio() -> None:
    async def body() -> None:
        clock = VirtualClock(realtime=False)
        box = Outbox("s", clock=clock, sleep=clock.sleep)
        box.watch("r1", Playout(300), lambda _e: None)
        for seq in range(6):
            box.put(frame(seq), response_id="r1")
        box.put(ResponseDone("Hello.", "☜", Timings()), response_id="r1")
        sent = [box.poll() for _ in range(3)]
        assert all(isinstance(e.event, AudioOut) for e in sent)
        assert box.poll() is None  # the 4th frame is not due yet, nor the done event behind it
        box.put(TextDelta("Hello.", 0), response_id="r1")
        box.put(SpeechStarted(1200))
        box.put(ErrorEvent("INVALID_ARGUMENT", "bad chunk"), turn_id="t1")
        sent += [box.poll() for _ in range(3)]
        assert [type(e.event) for e in sent[3:]] == [TextDelta, SpeechStarted, ErrorEvent]
        assert box.poll() is None
        box.close()
        sent += [e async for e in box]
        # the done event follows the last frame
        assert [type(e.event) for e in sent[6:]] == [AudioOut, AudioOut, AudioOut, ResponseDone]
        stamps = [e.t_ms for e in sent]
        assert stamps == sorted(stamps)  # stamped when sent
        assert stamps[-1] - stamps[0] == pytest.approx(300, abs=20)

    run(body())


def test_hold_stops_audio_and_release_resumes_where_it_stopped() -> None:
    async def body() -> None:
        clock = VirtualClock(realtime=False)
        box = Outbox("s", clock=clock, sleep=clock.sleep)
        playout = Playout(300)
        box.watch("r1", playout, lambda _e: None)
        for seq in range(10):
            box.put(frame(seq), response_id="r1")
        first = [(await box.get()).event.seq for _ in range(4)]
        playout.held = True
        clock.advance(5.0)  # however long the user may be interrupting
        assert box.poll() is None
        box.put(Interrupted(0, "", "client"), response_id="r0")  # control events still pass
        assert isinstance(box.poll().event, Interrupted)
        assert playout.played_ms == pytest.approx(400)  # the client drained its buffer meanwhile
        playout.held = False
        box.kick()
        rest = [(await box.get()).event.seq for _ in range(6)]
        assert first + rest == list(range(10))  # nothing lost, nothing repeated
        assert playout.sent_ms == pytest.approx(1000)

    run(body())


def test_gate_drops_held_audio_and_resets_the_client_buffer() -> None:
    async def body() -> None:
        clock = VirtualClock(realtime=False)
        box = Outbox("s", clock=clock, sleep=clock.sleep)
        box.watch("r1", Playout(300), lambda _e: None)
        for seq in range(8):
            box.put(frame(seq), response_id="r1")
        for _ in range(3):
            await box.get()
        box.close_response("r1")
        assert box.pending() == 0 and not box.put(frame(9), response_id="r1")
        # The next response starts at once: the client dropped r1's buffer on `interrupted`.
        p2 = Playout(300)
        box.watch("r2", p2, lambda _e: None)
        for seq in range(4):
            box.put(frame(seq), response_id="r2")
        assert [box.poll() is not None for _ in range(4)] == [True, True, True, False]

    run(body())


def test_a_new_response_plays_after_the_tail_of_the_previous_one() -> None:
    async def body() -> None:
        clock = VirtualClock(realtime=False)
        box = Outbox("s", clock=clock, sleep=clock.sleep)
        p1 = Playout(300)
        box.watch("r1", p1, lambda _e: None)
        for seq in range(3):
            box.put(frame(seq), response_id="r1")
            await box.get()
        box.unwatch("r1")  # r1 is done; 300 ms of it still play at the client
        p2 = Playout(300)
        box.watch("r2", p2, lambda _e: None)
        box.put(frame(0), response_id="r2")
        assert box.poll() is None  # the client's buffer is full of r1
        await box.get()
        assert p2.played_ms == 0.0  # r1's tail plays first
        clock.advance(0.5)
        assert p2.played_ms == pytest.approx(100, abs=5)

    run(body())


def test_played_estimate_uses_the_smaller_of_paced_and_reported() -> None:
    clock = VirtualClock(realtime=False)
    p = Playout(300, clock=clock)
    p.playback.on_sent(400, clock())
    p.sent_ms = 400
    clock.advance(0.3)
    assert p.played_ms == pytest.approx(300, abs=2)
    p.client_played_ms = 120  # the client is behind (its own buffer, a slow device)
    assert p.played_ms == 120
    p.client_played_ms = 10_000  # a client cannot have played more than the paced estimate
    assert p.played_ms == pytest.approx(300, abs=2)
