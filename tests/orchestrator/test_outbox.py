"""Unit tests of the outbox (order, the response id gate, closing) and of playout accounting (played
audio, heard text aligned by segment spans)."""

from __future__ import annotations

import pytest
from conftest import run

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

pytestmark = pytest.mark.unit


def audio(seq: int, segment: int, ms: float = 100.0) -> AudioOut:
    return AudioOut(b"\0\0", 24000, 0, 0, seq, int(seq * ms), ms, segment)


def test_gate_drops_queued_and_later_data_events_of_the_closed_response_only() -> None:
    async def body() -> None:
        box = Outbox("s")
        box.put(TextDelta("a", 0), turn_id="t1", response_id="r1")
        box.put(audio(0, 0), response_id="r1")
        box.put(SpeechStarted(10), turn_id="t2")
        box.put(TextDelta("b", 0), response_id="r2")
        box.close_response("r1")
        assert not box.put(audio(1, 0), response_id="r1")
        assert not box.put(ResponseDone("a", "", Timings()), response_id="r1")
        assert not box.put(ErrorEvent("UNAVAILABLE", "x"), response_id="r1")  # the response's own error
        assert box.put(Interrupted(0, "", "client"), response_id="r1")  # system events pass the gate
        assert box.put(ErrorEvent("INVALID_ARGUMENT", "bad chunk"), turn_id="t1")  # about a client event
        box.close()
        assert not box.put(SpeechStarted(0))
        got = [(type(e.event).__name__, e.response_id) async for e in box]
        assert got == [
            ("SpeechStarted", ""),
            ("TextDelta", "r2"),
            ("Interrupted", "r1"),
            ("ErrorEvent", ""),
        ]

    run(body())


def test_sent_events_are_accounted_to_their_response() -> None:
    async def body() -> None:
        box = Outbox("s")
        playout, seen = Playout(), []
        box.watch("r1", playout, seen.append)
        playout.segment_started(0, 0, 6, 0.0)
        box.put(TextDelta("Hello.", 0), response_id="r1")
        box.put(audio(0, 0), response_id="r1")
        box.put(audio(1, 0), response_id="r1")
        assert playout.sent_ms == 0  # queued is not sent
        await box.get()
        await box.get()
        assert playout.sent_ms == 100 and playout.sent_text_end == 6 and len(seen) == 2
        box.unwatch("r1")
        await box.get()
        assert playout.sent_ms == 100

    run(body())


def _playout(segments: list[tuple[int, int, float | None]], sent_ms: float) -> Playout:
    p = Playout()
    start_ms = 0.0
    for i, (start, end, total) in enumerate(segments):
        p.segment_started(i, start, end, start_ms)
        if total is not None:
            p.segment_finished(i, total)
            start_ms += total
    p.sent_ms = sent_ms
    return p


TEXT = "Hello there. How are you today? Fine."  # segments [0,12) [12,31) [31,37)


@pytest.mark.parametrize(
    ("played", "heard"),
    [
        (0, ""),
        (399, "Hello there"),  # 399/400 of segment 0 (12 chars): 11 chars, the "." is not yet heard
        (200, "Hello"),  # 6 chars: "Hello " -> trailing blank dropped
        (150, ""),  # 4 chars: "Hell" is no whole word
        (400, "Hello there."),  # segment 0 whole
        (999, "Hello there. How"),  # 599/2000 of segment 1's 19 chars = 5: " How "
        (1500, "Hello there. How are"),  # 1100/2000 -> 10 chars: " How are y" -> back to a word end
        (3000, "Hello there. How are you today?"),  # segment 2 still synthesising: its length is unknown
    ],
)
def test_heard_text_is_aligned_to_played_audio(played: float, heard: str) -> None:
    p = _playout([(0, 12, 400.0), (12, 31, 2000.0), (31, 37, None)], sent_ms=played)
    assert p.heard_text(TEXT, p.played_ms) == heard


def test_heard_text_without_spaces_is_cut_by_characters() -> None:
    p = _playout([(0, 6, 600.0)], sent_ms=300)
    assert p.heard_text("你好，世界。", p.played_ms) == "你好，"


def test_client_playback_report_lowers_played_ms() -> None:
    p = _playout([(0, 12, 400.0)], sent_ms=400)
    p.client_played_ms = 250
    assert p.played_ms == 250
    p.client_played_ms = 10_000  # a client cannot have played more than it was sent
    assert p.played_ms == 400


def test_response_done_reports_the_holds_of_its_audio_when_sent() -> None:
    async def body() -> None:
        now = [0.0]
        box = Outbox("s", clock=lambda: now[0])
        playout = Playout(lead_ms=1000.0)
        box.watch("r1", playout, lambda _e: None)
        box.put(audio(0, 0), response_id="r1")
        box.put(ResponseDone("a", "", Timings(tokens=3)), response_id="r1")
        playout.held = True  # the user may be interrupting: nothing of r1 is due
        playout.held = True  # a repeated level is not a second hold
        assert box.poll() is None
        now[0] = 0.75
        assert playout.held_ms == pytest.approx(750.0)  # a running hold counts
        playout.held = False
        now[0] = 2.0
        sent = [box.poll(), box.poll()]
        assert isinstance(sent[0].event, AudioOut)
        done = sent[1].event
        assert isinstance(done, ResponseDone)
        assert (done.timings.tokens, done.timings.holds) == (3, 1)
        assert done.timings.held_ms == pytest.approx(750.0)

    run(body())
