"""Audio front end of VITA-1.5 (spec §3): decoding, mono 16 kHz conversion, Kaldi fbank, global CMVN and
the frame / LLM-token count rules. The network (`AudioEncoder`, spec §4) is in `audio_encoder` and is
re-exported here.

The pipeline for one utterance is::

    samples, sr = decode_audio(data)          # (frames, channels) float32, PCM_16 scaled by 1/32768
    wave = to_mono_16k(samples, sr)           # (n,) float32 at 16 kHz
    validate_waveform(wave)                   # duration limits
    feats = kaldi_fbank(wave)                 # (T, 80) float32; CMVN is applied inside the encoder

Deliberate deviations from the reference processor (`audioEncoderProcessor.process`):
- Multi-channel audio is down-mixed to the mean of its channels; the reference uses channel 0 only.
- Audio that is not 16 kHz is resampled (soxr HQ) and the fbank is computed **at 16 kHz**. The reference
  resamples but then passes the original rate to fbank (spec §8.9), which computes frames and mel edges
  for the wrong rate; that bug is not reproduced. For 16 kHz mono input both agree exactly.
- Dither is always 0 (spec §8.11), so features are deterministic.
"""

from __future__ import annotations

import io
import json
import math
from os import PathLike
from typing import Any

import numpy as np
import soundfile
import soxr
import torch
import torch.nn.functional as F

from vitaserve.errors import CheckpointError, InvalidInput
# The network lives in `audio_encoder`; it is re-exported here so callers import the whole audio stage
# from one module.
from vitaserve.models.audio_encoder import MIN_FBANK_FRAMES, AudioEncoder, encoder_frame_count
from vitaserve.models.configs import AUDIO_SAMPLE_RATE

__all__ = [
    "AudioEncoder",
    "MIN_FBANK_FRAMES",
    "apply_cmvn",
    "audio_token_count",
    "decode_audio",
    "encoder_frame_count",
    "fbank_frame_count",
    "kaldi_fbank",
    "kaldi_mel_banks",
    "load_cmvn_json",
    "min_samples_for_frames",
    "to_mono_16k",
    "validate_waveform",
]

MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192000
# int16 full scale: the reference feeds fbank with samples * 2**15, i.e. the raw int16 values.
_INT16_SCALE = 32768.0
_PREEMPHASIS = 0.97
_POVEY_POWER = 0.85
_LOW_FREQ_HZ = 20.0
_FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


# ---------------------------------------------------------------------------------------------------------
# Decoding and resampling
# ---------------------------------------------------------------------------------------------------------


def decode_audio(data: bytes, *, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC/OGG (anything libsndfile reads from its header) into float32 samples.

    Returns `(samples, sample_rate)` with samples of shape (frames, channels). Integer PCM is scaled to
    [-1, 1) by libsndfile's 1/32768 rule for PCM_16, which is exactly the reference's int16/32768.
    `max_seconds`, if given, is checked from the header before the samples are decoded, so an oversized
    upload is rejected without allocating its samples.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"audio must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidInput("audio is empty (0 bytes)")
    try:
        with soundfile.SoundFile(io.BytesIO(bytes(data))) as f:
            sample_rate = int(f.samplerate)
            if max_seconds is not None and f.frames > max_seconds * sample_rate:
                raise InvalidInput(
                    f"audio is {f.frames / sample_rate:.2f} s long; the limit is {max_seconds:g} s"
                )
            samples = f.read(dtype="float32", always_2d=True)
    except InvalidInput:
        raise
    except (soundfile.SoundFileError, RuntimeError, ValueError, TypeError) as exc:
        raise InvalidInput(f"cannot decode audio (expected WAV, FLAC or OGG): {exc}") from exc
    if samples.shape[0] == 0:
        raise InvalidInput("audio contains no samples")
    return samples, sample_rate


def to_mono_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Down-mix to mono (mean of the channels) and resample to 16 kHz with soxr HQ.

    `samples` is (frames,) or (frames, channels). Returns a contiguous float32 (n,) array.
    """
    sample_rate = _check_sample_rate(sample_rate)
    x = np.asarray(samples)
    if x.ndim not in (1, 2):
        raise InvalidInput(f"audio samples must be (frames,) or (frames, channels), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise InvalidInput(f"audio samples must be floating point in [-1, 1), got dtype {x.dtype}")
    if x.size == 0:
        raise InvalidInput("audio contains no samples")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise InvalidInput("audio contains NaN or infinite samples")
    mono = x.mean(axis=1, dtype=np.float32) if x.ndim == 2 else x
    if sample_rate != AUDIO_SAMPLE_RATE:
        mono = soxr.resample(mono, sample_rate, AUDIO_SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _check_sample_rate(sample_rate: int) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        raise InvalidInput(f"sample rate must be an integer, got {sample_rate!r}")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise InvalidInput(
            f"sample rate {sample_rate} Hz is outside the supported range "
            f"[{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz"
        )
    return int(sample_rate)


def validate_waveform(wave: np.ndarray | torch.Tensor, *, max_seconds: float = 60.0) -> None:
    """Check a 16 kHz mono waveform's duration: at most `max_seconds`, and long enough for the encoder's
    minimum of 7 fbank frames (1360 samples = 85 ms)."""
    if wave.ndim != 1:
        raise InvalidInput(f"waveform must be 1-D mono, got shape {tuple(wave.shape)}")
    n = int(wave.shape[0])
    seconds = n / AUDIO_SAMPLE_RATE
    if seconds > max_seconds:
        raise InvalidInput(f"audio is {seconds:.2f} s long; the limit is {max_seconds:g} s")
    min_samples = min_samples_for_frames(MIN_FBANK_FRAMES)
    if n < min_samples:
        raise InvalidInput(
            f"audio is too short ({n} samples = {1000 * seconds:.1f} ms at 16 kHz); the minimum is "
            f"{1000 * min_samples / AUDIO_SAMPLE_RATE:g} ms ({min_samples} samples)"
        )


# ---------------------------------------------------------------------------------------------------------
# Kaldi fbank (torchaudio.compliance.kaldi.fbank with the reference's parameters, dither 0)
# ---------------------------------------------------------------------------------------------------------


def _frame_geometry(sample_rate: int, frame_length_ms: float, frame_shift_ms: float) -> tuple[int, int, int]:
    """(window length, shift, FFT size) in samples; Kaldi truncates ms*rate and rounds the FFT size up to a
    power of two."""
    length = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    return length, shift, 1 << (length - 1).bit_length()


def fbank_frame_count(
    n_samples: int,
    sample_rate: int = AUDIO_SAMPLE_RATE,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> int:
    """Number of fbank frames with snip_edges: 1 + (n − L) // S, or 0 when n < L."""
    length, shift, _ = _frame_geometry(sample_rate, frame_length_ms, frame_shift_ms)
    return 0 if n_samples < length else 1 + (n_samples - length) // shift


def min_samples_for_frames(n_frames: int, sample_rate: int = AUDIO_SAMPLE_RATE) -> int:
    """Fewest samples that give `n_frames` fbank frames (25/10 ms)."""
    length, shift, _ = _frame_geometry(sample_rate, 25.0, 10.0)
    return length + (n_frames - 1) * shift


def _mel(freq: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(freq, torch.Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


def kaldi_mel_banks(num_bins: int, fft_size: int, sample_rate: int) -> torch.Tensor:
    """Kaldi's triangular mel filters, shape (num_bins, fft_size/2 + 1), float32.

    Kaldi defines the filters over fft_size/2 bins (0 .. Nyquist−1 bin); the Nyquist bin of the power
    spectrum gets weight 0. Filters span low_freq = 20 Hz to the Nyquist frequency, with centres equally
    spaced on the mel scale 1127·ln(1 + f/700), and are triangular in the mel domain.
    """
    num_fft_bins = fft_size // 2
    nyquist = 0.5 * sample_rate
    mel_low, mel_high = _mel(_LOW_FREQ_HZ), _mel(nyquist)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float32).unsqueeze(1)
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    bin_mel = _mel((sample_rate / fft_size) * torch.arange(num_fft_bins, dtype=torch.float32)).unsqueeze(0)
    up = (bin_mel - left) / (center - left)
    down = (right - bin_mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(banks, (0, 1))


def _as_wave_tensor(wave: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(wave)
    if t.ndim != 1:
        raise InvalidInput(f"fbank input must be a 1-D mono waveform, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise InvalidInput(f"fbank input must be floating point in [-1, 1), got dtype {t.dtype}")
    t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise InvalidInput("audio contains NaN or infinite samples")
    return t


def kaldi_fbank(
    wave: np.ndarray | torch.Tensor,
    sample_rate: int = AUDIO_SAMPLE_RATE,
    num_mel_bins: int = 80,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> torch.Tensor:
    """Kaldi-compatible log mel filterbank of a mono waveform in [-1, 1); returns (T, num_mel_bins) float32.

    The wave is scaled by 32768 (int16 range) first. Per frame (snip_edges, window 25 ms, shift 10 ms):
    remove the DC offset → pre-emphasis 0.97 with s[−1] = s[0] → povey window → zero-pad to a power of
    two → |rfft|² → mel filters → log(max(e, float32 eps)). Computed in float32 with the same operation
    order as torchaudio.compliance.kaldi, which reproduces the reference bit for bit.
    """
    x = _as_wave_tensor(wave) * _INT16_SCALE
    length, shift, fft_size = _frame_geometry(sample_rate, frame_length_ms, frame_shift_ms)
    if x.shape[0] < length:
        raise InvalidInput(
            f"audio is too short for one fbank frame: {x.shape[0]} samples, need at least {length}"
        )
    frames = x.unfold(0, length, shift)
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - _PREEMPHASIS * previous
    window = torch.hann_window(length, periodic=False, dtype=torch.float32).pow(_POVEY_POWER)
    frames = F.pad(frames * window, (0, fft_size - length))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    banks = kaldi_mel_banks(num_mel_bins, fft_size, sample_rate)
    energies = torch.mm(power, banks.T)
    return torch.clamp(energies, min=_FLOAT32_EPS).log()


# ---------------------------------------------------------------------------------------------------------
# Global CMVN
# ---------------------------------------------------------------------------------------------------------


def load_cmvn_json(path_or_dict: str | PathLike[str] | dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a whale `global_cmvn` JSON ({mean_stat, var_stat, frame_num}) into float32 (mean, istd).

    mean = Σx / N and istd = 1 / sqrt(max(Σx²/N − mean², 1e−20)), computed in float64 and cast once,
    which reproduces the checkpoint's stored buffers exactly.
    """
    source = "global_cmvn dict"
    if isinstance(path_or_dict, dict):
        d = path_or_dict
    else:
        source = str(path_or_dict)
        try:
            with open(path_or_dict, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{source}: cannot read CMVN JSON: {exc}") from exc
    try:
        sums = np.asarray(d["mean_stat"], dtype=np.float64)
        squares = np.asarray(d["var_stat"], dtype=np.float64)
        count = float(d["frame_num"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{source}: expected numeric mean_stat, var_stat and frame_num ({exc})"
        ) from exc
    if sums.ndim != 1 or sums.shape != squares.shape or sums.size == 0:
        raise CheckpointError(
            f"{source}: mean_stat and var_stat must be equal-length vectors, "
            f"got {sums.shape} and {squares.shape}"
        )
    if not count > 0:
        raise CheckpointError(f"{source}: frame_num must be positive, got {count}")
    mean = sums / count
    var = np.maximum(squares / count - mean * mean, 1e-20)
    istd = 1.0 / np.sqrt(var)
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(istd.astype(np.float32))


def apply_cmvn(feats: torch.Tensor, mean: torch.Tensor, istd: torch.Tensor) -> torch.Tensor:
    """(feats − mean) · istd per mel bin (the last axis)."""
    return (feats - mean) * istd


# ---------------------------------------------------------------------------------------------------------
# Token counts
# ---------------------------------------------------------------------------------------------------------


def audio_token_count(n_frames: int) -> int:
    """LLM audio tokens for `n_frames` fbank frames: len(ones(T)[2::2][2::2][0::2]) = ceil(T2 / 2).

    This equals the adapter's output length. It is 0 below 7 frames, which the encoder rejects.
    """
    if n_frames < 0:
        raise InvalidInput(f"frame count must be non-negative, got {n_frames}")
    t2 = encoder_frame_count(n_frames)
    return (t2 + 1) // 2
