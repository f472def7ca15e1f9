"""Speech synthesis for the small family: hibari, a Kokoro-82M-distilled English TTS (24 kHz).

hibari (`hibari-tts`, Apache-2.0; distilled from Kokoro-82M's af_heart voice, Apache-2.0) ships its int8
ONNX acoustic model, lexicons and grapheme-to-phoneme nets in the wheel. Only the bundled default voice
("heart", American English, female) is used: the other voices would be downloaded on first use, and an
engine must never download weights.

hibari synthesises one sentence at once, about 100x faster than real time on one core, so a segment is
streamed sentence by sentence and each sentence's audio is cut into pieces of at most CHUNK_SECONDS:
`is_cancelled()` is polled before every piece (and before every sentence), so a barge-in stops playback
within one piece. Silence is trimmed at the edges of each sentence (hibari pads about 0.27 s before and
0.45 s after the speech); the first sentence of a reply keeps almost no leading silence, for a quick first
sound. The noise component of hibari's vocoder is drawn from a numpy generator: with a `seed` the audio is
bit-identical from call to call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np

from vitaserve.components.base import check_speech_request
from vitaserve.models.prompt import strip_state_marks

IsCancelled = Callable[[], bool]

SAMPLE_RATE = 24_000
CHUNK_SECONDS = 0.5
VOICE = "heart"  # bundled in the wheel (Kokoro's af_heart); every other voice is a download
# Edge trimming: samples below SILENCE_LEVEL are silence; keep this much of it around the speech.
SILENCE_LEVEL = 0.005
FIRST_LEAD_SECONDS = 0.03
LEAD_SECONDS = 0.1
TAIL_SECONDS = 0.2


def _never() -> bool:
    return False


def trim_silence(audio: np.ndarray, lead_s: float, tail_s: float) -> np.ndarray:
    """`audio` with at most `lead_s` seconds of silence before and `tail_s` after the speech (unchanged
    if it is all silence)."""
    loud = np.flatnonzero(np.abs(audio) > SILENCE_LEVEL)
    if loud.size == 0:
        return audio
    start = max(0, int(loud[0]) - int(lead_s * SAMPLE_RATE))
    stop = min(audio.shape[0], int(loud[-1]) + 1 + int(tail_s * SAMPLE_RATE))
    return audio[start:stop]


class SpeechSynthesizer:
    """A text segment -> streamed 24 kHz mono float32 PCM chunks in [-1, 1] (hibari, voice "heart").

    `threads` is the onnxruntime intra-op (and inter-op) thread count of hibari's acoustic model; its
    vocoder (numpy) runs on the calling thread.

    Thread-safe: the onnxruntime session may be run concurrently and each call has its own random
    generator; the grapheme-to-phoneme pipeline (tokenizer, tagger, lexicon caches) runs under a lock.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, *, threads: int = 1, stream_capacity: int = 32) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        if stream_capacity < 1:
            raise ValueError(f"stream_capacity must be >= 1, got {stream_capacity!r}")
        # Segments served at once (a Triton instance's worker threads; its `max_streams`): each segment's
        # synthesis runs on the thread that iterates it.
        self.stream_capacity = stream_capacity
        from hibari import SAMPLE_RATE as HIBARI_RATE
        from hibari import Hibari

        if HIBARI_RATE != SAMPLE_RATE:
            raise RuntimeError(f"hibari's sample rate is {HIBARI_RATE} Hz, expected {SAMPLE_RATE}")
        self.tts = Hibari(voice=VOICE, threads=threads)
        self.tts.g2p  # noqa: B018 - loads the G2P now (it is lazy), not inside the first request
        self._g2p_lock = threading.Lock()
        self.chunk_samples = int(CHUNK_SECONDS * SAMPLE_RATE)

    def close(self) -> None:
        """Nothing to release (no threads or queues); safe to call any number of times."""

    def synthesize(self, text: str, first_sentence: bool = False, seed: int | None = None,
                   is_cancelled: IsCancelled = _never) -> Iterator[np.ndarray]:
        """Validate (raising InvalidInput at once), then return the iterator of PCM chunks.

        The state marks are stripped; text that is blank afterwards yields no chunks. Each sentence's
        audio is cut into equal chunks of at most CHUNK_SECONDS; `is_cancelled()` is polled before every
        chunk and the rest of the audio is dropped once it returns True. `first_sentence` trims the
        leading silence to FIRST_LEAD_SECONDS. The same `seed` gives bit-identical audio; None draws
        fresh noise.
        """
        check_speech_request(text, seed)
        if seed is not None:
            seed = int(seed) & (2**64 - 1)  # numpy seeds must be non-negative
        clean = strip_state_marks(text)[0].strip()
        return self._chunks(clean, bool(first_sentence), seed, is_cancelled)

    def _chunks(self, text: str, first_sentence: bool, seed: int | None,
                is_cancelled: IsCancelled) -> Iterator[np.ndarray]:
        if not text:
            return
        rng = np.random.default_rng(seed)
        lead = FIRST_LEAD_SECONDS if first_sentence else LEAD_SECONDS
        for sentence in self.tts.split_sentences(text):
            if is_cancelled():
                return
            with self._g2p_lock:
                phonemes = self.tts.phonemize(sentence)  # usually one string; long ones split at clauses
            for ps in phonemes:
                audio = self.tts.from_ids(self.tts.ids(ps), 1.0, rng)
                audio = trim_silence(np.clip(audio.astype(np.float32, copy=False), -1.0, 1.0), lead,
                                     TAIL_SECONDS)
                lead = LEAD_SECONDS
                # Equal pieces of at most chunk_samples (no tiny last piece).
                n_pieces = -(-audio.shape[0] // self.chunk_samples)
                size = -(-audio.shape[0] // max(1, n_pieces))
                for start in range(0, audio.shape[0], max(1, size)):
                    if is_cancelled():
                        return
                    yield np.ascontiguousarray(audio[start:start + size])
