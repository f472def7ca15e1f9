"""Paced output: reply audio reaches the client no faster than real time plus a lead.

The rule: a frame of reply audio is sent only once the audio the client still has to play, including that
frame, is at most `lead_ms` (default 300 ms, `VITASERVE_PLAYOUT_LEAD_MS`, per session
`SessionSettings.playout_lead_ms`); a frame longer than the lead goes once the client's buffer is empty.
Audio is cut into frames of at most `VITASERVE_PLAYOUT_FRAME_MS` (100 ms) before it is queued (speech
synthesis hands over seconds at once), so the lead is what bounds the client's buffer.

So the server always knows what the client has heard: `PlaybackModel` assumes the client plays each frame
as soon as it arrives and the previous one is over (a stall, when synthesis is slower than real time,
delays the rest), and `played_ms(now)` is the audio sent minus what is still buffered. A client may also
report its playback position (`PlaybackPosition`); the server then uses the smaller of the two. A client
stops playing, and drops its buffer, when it receives `interrupted`.

What is paced: only audio frames, and the events that must follow a response's audio (its done or error
event). Text deltas run ahead of the audio (a reply is shown as it is generated); what the user *heard*
is the text aligned to the played audio (`outbox.Playout.heard_text`), not the text sent. Control events
(speech started, interrupted, errors about client events, session events) never wait behind paced audio.
While the barge-in policy holds a response (the user may be interrupting), its audio waits and resumes
where it stopped.

Everything here takes the time as an argument (`now`, seconds of the stream's clock): no sleeps, no clock.
"""

from __future__ import annotations

# Frames due within this much of now are sent now (float error, and the event loop's own timer slack).
DUE_SLACK_S = 0.001


def split_frames(pcm16: bytes, sample_rate: int, frame_ms: int) -> list[bytes]:
    """Cut int16 PCM into frames of at most `frame_ms` (whole samples)."""
    step = max(1, sample_rate * frame_ms // 1000) * 2
    return [pcm16[i : i + step] for i in range(0, len(pcm16), step)]


class PlaybackModel:
    """The client's playback of one stream's reply audio, as the server infers it from what it sent.

    `play_end`: the time (seconds, the stream's clock) at which the client will have played all audio sent
    so far; None before the first frame. `held`: the barge-in policy holds the audio (no frame is due)."""

    def __init__(self, lead_ms: float = 300.0) -> None:
        if lead_ms < 0:
            raise ValueError("lead_ms must be >= 0")
        self.lead_ms = float(lead_ms)
        self.play_end: float | None = None
        self.held = False

    def buffered_ms(self, now: float) -> float:
        """Audio sent that the client has not played yet."""
        if self.play_end is None:
            return 0.0
        return max(0.0, (self.play_end - now) * 1000.0)

    def due_at(self, duration_ms: float) -> float | None:
        """The earliest time a frame of `duration_ms` may be sent (None while held)."""
        if self.held:
            return None
        if self.play_end is None:
            return float("-inf")
        return self.play_end - max(0.0, self.lead_ms - duration_ms) / 1000.0

    def is_due(self, duration_ms: float, now: float) -> bool:
        due = self.due_at(duration_ms)
        return due is not None and due <= now + DUE_SLACK_S

    def on_sent(self, duration_ms: float, now: float) -> None:
        """A frame was handed to the transport at `now`: it plays after what is buffered."""
        start = now if self.play_end is None else max(now, self.play_end)
        self.play_end = start + duration_ms / 1000.0

    def continue_after(self, play_end: float | None, now: float) -> None:
        """Start after the previous response's audio that the client is still playing (if any)."""
        if play_end is not None and play_end > now and self.play_end is None:
            self.play_end = play_end
