"""Audio between the Realtime wire (PCM16 mono, 24 kHz, base64) and the orchestrator (PCM16 mono, 16 kHz in; the
model family's rate out), resampled by soxr's streaming resampler (one stream per direction, so chunk
boundaries add no clicks), decoded and checked at the gateway so a bad chunk is the client's error."""

from __future__ import annotations

import base64
import binascii

import numpy as np
import soxr

WIRE_RATE = 24000  # the only rate of Realtime's audio/pcm
MODEL_INPUT_RATE = 16000  # what the orchestrator accepts for streamed input


class AudioFormatError(ValueError):
    pass


def decode_pcm16_base64(data: str, *, max_bytes: int) -> bytes:
    """base64 PCM16 -> bytes; raises `AudioFormatError` with what was wrong."""
    if len(data) > (max_bytes * 4) // 3 + 4:
        raise AudioFormatError(f"the audio chunk is over {max_bytes} bytes: send shorter chunks")
    try:
        pcm = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise AudioFormatError("audio is not valid base64") from None
    if len(pcm) % 2:
        raise AudioFormatError(f"audio has an odd number of bytes ({len(pcm)}): PCM16 samples expected")
    return pcm


class Resampler:
    """PCM16 bytes at `in_rate` -> PCM16 bytes at `out_rate`, as a stream (call `push` per chunk)."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = None if in_rate == out_rate else soxr.ResampleStream(
            in_rate, out_rate, 1, dtype="int16", quality="HQ")

    def push(self, pcm16: bytes, *, last: bool = False) -> bytes:
        if self._stream is None:
            return pcm16
        samples = np.frombuffer(pcm16, dtype="<i2")
        return self._stream.resample_chunk(samples, last=last).astype("<i2").tobytes()


def duration_ms(pcm16: bytes, rate: int) -> float:
    return len(pcm16) / 2 * 1000.0 / rate
