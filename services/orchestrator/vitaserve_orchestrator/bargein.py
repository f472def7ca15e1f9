"""The barge-in policy: when user speech interrupts the assistant, and what its audio does meanwhile.

Settings (`BargeInConfig`; server defaults `VITASERVE_BARGE_IN_*` in settings.py, per session through
`SessionSettings.barge_in` in the API):
- `enabled` (default true): user speech may interrupt a response, and a new turn (typed text, a commit)
  that arrives while a response is running interrupts it with reason `new_turn`. False: the assistant
  cannot be interrupted by voice, and a new turn while a response runs is FAILED_PRECONDITION (an explicit
  `Interrupt` event always works).
- `threshold` (0.7): the VAD speech probability of a window (32 ms) that counts as interrupting speech.
  Once speech started it continues while the probability stays >= threshold - 0.15 (Silero's hysteresis).
- `min_speech_ms` (500): speech this long, from its first window to its latest speech window (gaps
  shorter than `resume_silence_ms` included), interrupts the response. Shorter speech — a backchannel
  ("yeah", "mhm"), a cough — does not. 0 interrupts at the first speech window. There is no speech
  recognition in VITA's loop, so there is no minimum-words rule.
- `in_flight` ("pause"): what the reply audio does while the user may be interrupting (speech started,
  shorter than the minimum so far). "pause" holds the response's audio at the server (the LLM and speech
  synthesis go on; at most the playout lead, already sent, is still playing at the client); "continue"
  keeps sending (a client may duck its volume on `speech_started`). After a real interruption the rest of
  the response is dropped either way.
- `resume_silence_ms` (300): silence that ends speech which stayed shorter than the minimum: a false
  interruption. The held audio resumes exactly where it stopped (nothing is lost or repeated: paced
  playout picks up with the next frame).

What counts and when (the rules `Conversation` applies):
- speech is measured in input-audio time (the stream's offsets), not wall-clock time, so the decision does
  not depend on how the client cuts its audio into chunks; it applies in `turn_detection = "vad"` sessions
  (push-to-talk clients decide themselves: a commit is a new turn);
- only while the assistant is speaking (a response is running) does speech hold or interrupt anything;
  speech that began just before a response started counts from its beginning;
- one stretch of speech interrupts at most once; the utterance goes on and, when the VAD ends it, becomes
  the next turn as usual;
- an utterance that ends while a response is still running (barge-in disabled, or speech that never met
  the policy) is dropped: the user talked over the assistant without interrupting it.

`BargeInPolicy` is the state machine over VAD windows; it has no clock and no I/O, so it is unit-tested
with scripted probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from vitaserve.errors import InvalidInput
from vitaserve_orchestrator.settings import OrchestratorSettings

IN_FLIGHT_MODES = ("pause", "continue")
# Silero's hysteresis (as vad.NEG_THRESHOLD_GAP): speech continues until the probability falls this far
# below the threshold.
_HYSTERESIS = 0.15
_MAX_MS = 10_000


@dataclass(frozen=True)
class BargeInUpdate:
    """Barge-in settings as a client sends them: None / zero / empty = the server default."""

    enabled: bool | None = None
    threshold: float = 0.0
    min_speech_ms: int | None = None
    in_flight: str = ""
    resume_silence_ms: int = 0


@dataclass(frozen=True)
class BargeInConfig:
    """The resolved barge-in policy of one session (see the module docstring)."""

    enabled: bool = True
    threshold: float = 0.7
    min_speech_ms: int = 500
    in_flight: Literal["pause", "continue"] = "pause"
    resume_silence_ms: int = 300

    @classmethod
    def resolve(cls, update: BargeInUpdate | None, config: OrchestratorSettings) -> BargeInConfig:
        """Fill defaults from the service config and check every value; raises `InvalidInput`."""
        u = update or BargeInUpdate()
        threshold = u.threshold or config.barge_in_threshold
        if not (math.isfinite(threshold) and 0.0 < threshold < 1.0):
            raise InvalidInput(f"barge_in.threshold must be in (0, 1), got {threshold}")
        min_speech = config.barge_in_min_speech_ms if u.min_speech_ms is None else u.min_speech_ms
        if not 0 <= min_speech <= _MAX_MS:
            raise InvalidInput(f"barge_in.min_speech_ms must be in 0..{_MAX_MS}, got {min_speech}")
        mode = u.in_flight or config.barge_in_in_flight
        if mode not in IN_FLIGHT_MODES:
            raise InvalidInput(f"barge_in.in_flight must be one of {IN_FLIGHT_MODES}, got {mode!r}")
        resume = u.resume_silence_ms or config.barge_in_resume_silence_ms
        if not 32 <= resume <= _MAX_MS:
            raise InvalidInput(f"barge_in.resume_silence_ms must be in 32..{_MAX_MS}, got {resume}")
        return cls(
            enabled=config.barge_in_enabled if u.enabled is None else u.enabled,
            threshold=threshold,
            min_speech_ms=min_speech,
            in_flight=mode,  # type: ignore[arg-type]
            resume_silence_ms=resume,
        )


@dataclass(frozen=True)
class Decision:
    """A change the policy asks for, decided at the end of the window ending at `audio_ms` (input audio
    offset). `kind`: "hold" (pause the reply audio), "release" (resume it), "interrupt". `speech_ms`: the
    user speech counted so far."""

    kind: Literal["hold", "release", "interrupt"]
    audio_ms: float
    speech_ms: float


class BargeInPolicy:
    """The barge-in state machine of one input audio stream, fed one VAD window at a time.

    `feed` returns the transition it causes, if any; `holding` is the level the reply audio should follow
    (True while the user may be interrupting and `in_flight` is "pause")."""

    def __init__(self, config: BargeInConfig) -> None:
        self.config = config
        self._neg = max(config.threshold - _HYSTERESIS, 0.01)
        self._onset_ms: float | None = None  # start of the user speech in progress
        self._speech_end_ms = 0.0  # end of its latest speech window
        self._silence_ms = 0.0  # silence since then
        self._fired = False  # this stretch of speech already interrupted a response
        self.holding = False

    @property
    def in_speech(self) -> bool:
        return self._onset_ms is not None

    @property
    def speech_ms(self) -> float:
        """User speech counted in the stretch in progress (0 outside speech)."""
        return 0.0 if self._onset_ms is None else self._speech_end_ms - self._onset_ms

    def feed(
        self, probability: float, *, end_ms: float, window_ms: float, assistant_speaking: bool
    ) -> Decision | None:
        """One VAD window [end_ms - window_ms, end_ms) of input audio with its speech probability."""
        cfg = self.config
        if probability >= cfg.threshold or (self._onset_ms is not None and probability >= self._neg):
            if self._onset_ms is None:
                self._onset_ms = end_ms - window_ms
                self._fired = False
            self._speech_end_ms = end_ms
            self._silence_ms = 0.0
        elif self._onset_ms is not None:
            self._silence_ms += window_ms
            if self._silence_ms >= cfg.resume_silence_ms:
                self._onset_ms = None  # the stretch of speech is over
        if not cfg.enabled:
            return None
        if (
            self._onset_ms is not None
            and not self._fired
            and assistant_speaking
            and self.speech_ms >= cfg.min_speech_ms
            and self._silence_ms == 0.0
        ):
            self._fired = True
            self.holding = False
            return Decision("interrupt", end_ms, self.speech_ms)
        hold = (
            cfg.in_flight == "pause" and assistant_speaking and self._onset_ms is not None and not self._fired
        )
        if hold != self.holding:
            self.holding = hold
            return Decision("hold" if hold else "release", end_ms, self.speech_ms)
        return None

    def release(self) -> None:
        """Forget a hold (the response it applied to is over, or the input stream ended)."""
        self.holding = False
