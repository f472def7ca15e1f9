"""Regenerate the speech fixtures of the VAD tests (needs Debian's `espeak-ng`; the WAVs are committed).

    .venv/bin/python tests/orchestrator/data/make_speech.py

espeak-ng 1.51 (voice en-us, 150 words/min) writes 22.05 kHz WAVs; they are resampled to 16 kHz mono
int16 with the project's own `to_mono_16k`. Synthetic speech is deterministic and has real speech
structure (voiced/unvoiced segments, pauses), which is what Silero's VAD needs; the golden
audio_16k_2.3s.wav is not speech (Silero scores it < 0.05 throughout).
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from vitaserve.models.audio import to_mono_16k

HERE = Path(__file__).parent
PHRASES = {
    "speech_question.wav": "What is in this picture? Please describe it.",
    "speech_short.wav": "Hi.",
}


def main() -> None:
    for name, text in PHRASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.wav"
            subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
            wave, rate = sf.read(raw, dtype="float32")
        pcm = to_mono_16k(wave, rate)
        # espeak pads with silence; trim it so tests place speech exactly where they want it.
        voiced = np.flatnonzero(np.abs(pcm) > 0.01)
        pcm = pcm[voiced[0] : voiced[-1] + 1]
        sf.write(HERE / name, pcm, 16000, subtype="PCM_16")
        print(f"{name}: {len(pcm) / 16000:.2f} s  {text!r}")


if __name__ == "__main__":
    main()
