"""Audio front end (`vitaserve.models.audio`) and whale encoder + adapter (`vitaserve.models.audio_encoder`)
against the tiny-model golden outputs, the token-count tables and the real-size manifest."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file

from vitaserve.errors import CheckpointError, InvalidInput
from vitaserve.models.audio import (
    apply_cmvn,
    audio_token_count,
    decode_audio,
    fbank_frame_count,
    kaldi_fbank,
    load_cmvn_json,
    to_mono_16k,
    validate_waveform,
)
from vitaserve.models.audio_encoder import AudioEncoder, encoder_frame_count
from vitaserve.models.configs import AudioEncoderConfig

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
TINY = GOLDEN / "vita15-tiny"
PREFIX = "model.audio_encoder."


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(TINY / "golden_outputs.safetensors"))


@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, torch.Tensor]:
    weights = load_file(str(TINY / "tiny_main.safetensors"))
    return {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def tiny_cfg() -> AudioEncoderConfig:
    configs = json.loads((TINY / "tiny_configs.json").read_text())
    return AudioEncoderConfig.from_reference(configs["audio_encoder_config"])


@pytest.fixture(scope="module")
def model(tiny_cfg: AudioEncoderConfig, tiny_weights: dict[str, torch.Tensor]) -> AudioEncoder:
    m = AudioEncoder(tiny_cfg).eval()
    m.load_state_dict(tiny_weights, strict=True)
    return m


@pytest.fixture(scope="module")
def wav_bytes() -> bytes:
    return (TINY / "audio_16k_2.3s.wav").read_bytes()


def sine(freq: float, seconds: float, sr: int) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def encode_wav(samples: np.ndarray, sr: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


# --- decoding and resampling --------------------------------------------------------------------------


def test_decode_golden_wav_is_int16_over_32768(wav_bytes: bytes) -> None:
    samples, sr = decode_audio(wav_bytes)
    raw, _ = soundfile.read(io.BytesIO(wav_bytes), dtype="int16", always_2d=True)
    assert sr == 16000 and samples.shape == (36800, 1) and samples.dtype == np.float32
    np.testing.assert_array_equal(samples, raw.astype(np.float32) / 32768.0)


def test_decode_flac_and_ogg() -> None:
    stereo = np.stack([sine(440, 0.5, 22050), sine(880, 0.5, 22050)], axis=1)
    flac, sr = decode_audio(encode_wav(stereo, 22050, "FLAC"))
    assert sr == 22050 and flac.shape == stereo.shape
    np.testing.assert_allclose(flac, stereo, atol=1 / 32768)
    ogg, sr = decode_audio(encode_wav(stereo, 22050, "OGG", "VORBIS"))
    assert sr == 22050 and ogg.shape[1] == 2 and abs(ogg.shape[0] - stereo.shape[0]) < 2048


def test_golden_fbank_from_wav_bytes(wav_bytes: bytes, golden: dict[str, torch.Tensor]) -> None:
    wave = to_mono_16k(*decode_audio(wav_bytes))
    validate_waveform(wave)
    feats = kaldi_fbank(wave)
    assert feats.dtype == torch.float32 and feats.shape == golden["fbank"].shape == (228, 80)
    assert rel_err(feats, golden["fbank"]) <= 1e-5


def test_resample_48k_stereo_to_16k_mono_keeps_1khz() -> None:
    left = sine(1000, 1.0, 48000)
    mono = to_mono_16k(np.stack([left, 0.5 * left], axis=1), 48000)
    assert mono.shape == (16000,) and mono.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(mono))
    assert np.argmax(spectrum) * 16000 / len(mono) == pytest.approx(1000.0, abs=1.0)
    # Mean of the channels: amplitude 0.75 * 0.5; the steady state away from the filter edges.
    assert np.abs(mono[800:-800]).max() == pytest.approx(0.375, rel=1e-3)


def test_16k_mono_passes_through_unchanged() -> None:
    wave = sine(300, 0.2, 16000)
    np.testing.assert_array_equal(to_mono_16k(wave, 16000), wave)
    np.testing.assert_array_equal(to_mono_16k(wave[:, None], 16000), wave)


def test_fbank_frame_count_matches_fbank() -> None:
    rng = np.random.default_rng(0)
    for n in (400, 559, 560, 1360, 16000, 36800):
        wave = rng.uniform(-0.5, 0.5, n).astype(np.float32)
        assert kaldi_fbank(wave).shape == (fbank_frame_count(n), 80)
    assert fbank_frame_count(399) == 0 and fbank_frame_count(36800) == 228


# --- CMVN -------------------------------------------------------------------------------------------------


def test_cmvn_json_equals_checkpoint_buffers(tiny_weights: dict[str, torch.Tensor]) -> None:
    mean, istd = load_cmvn_json(TINY / "global_cmvn.json")
    assert mean.dtype == istd.dtype == torch.float32 and mean.shape == (80,)
    torch.testing.assert_close(mean, tiny_weights["encoder.global_cmvn.mean"], rtol=0, atol=0)
    torch.testing.assert_close(istd, tiny_weights["encoder.global_cmvn.istd"], rtol=0, atol=0)


def test_golden_fbank_cmvn(golden: dict[str, torch.Tensor], tiny_weights: dict[str, torch.Tensor]) -> None:
    from_ckpt = apply_cmvn(
        golden["fbank"], tiny_weights["encoder.global_cmvn.mean"], tiny_weights["encoder.global_cmvn.istd"]
    )
    cmvn_dict = json.loads((TINY / "global_cmvn.json").read_text())
    from_json = apply_cmvn(golden["fbank"], *load_cmvn_json(cmvn_dict))
    assert rel_err(from_ckpt, golden["fbank_cmvn"]) <= 1e-6
    assert rel_err(from_json, golden["fbank_cmvn"]) <= 1e-6


@pytest.mark.parametrize(
    "bad",
    [{"mean_stat": [1.0], "var_stat": [2.0]}, {"mean_stat": [1.0, 2.0], "var_stat": [2.0], "frame_num": 3},
     {"mean_stat": [1.0], "var_stat": [2.0], "frame_num": 0}],
)
def test_cmvn_json_rejects_malformed(bad: dict) -> None:
    with pytest.raises(CheckpointError):
        load_cmvn_json(bad)


# --- token counts ---------------------------------------------------------------------------------------


def test_token_count_rule_matches_reference_table() -> None:
    table = np.load(TINY / "audio_token_counts.npz")
    ours = [audio_token_count(int(n)) for n in table["frames"]]
    np.testing.assert_array_equal(ours, table["processor_rule"])
    assert table["frames"][0] == 1 and table["frames"][-1] == 2000


def test_token_count_matches_actual_module(model: AudioEncoder) -> None:
    table = json.loads((TINY / "audio_token_counts_actual_module.json").read_text())
    expected = {int(k): v for k, v in table.items()}
    gen = torch.Generator().manual_seed(0)
    for frames, n_tokens in expected.items():
        feats = 10 + 3 * torch.randn(1, frames, 80, generator=gen)
        with torch.no_grad():
            embeds, n = model(feats, torch.tensor([frames]))
        assert audio_token_count(frames) == n_tokens == int(n[0]) == embeds.shape[1]


# --- encoder and adapter --------------------------------------------------------------------------------


def test_golden_encoder_and_adapter(model: AudioEncoder, golden: dict[str, torch.Tensor]) -> None:
    feats, lengths = golden["fbank"][None], torch.tensor([228])
    with torch.no_grad():
        enc, enc_lengths = model.encode(feats, lengths)
        embeds, n_tokens = model(feats, lengths)
    assert enc.shape == (1, 56, 64) and enc_lengths.tolist() == [encoder_frame_count(228)] == [56]
    assert rel_err(enc[0], golden["audio_encoder_out"]) <= 1e-4
    assert embeds.shape == (1, 28, 64) and n_tokens.dtype == torch.int64
    assert n_tokens.tolist() == golden["audio_num_llm_tokens"].tolist() == [28]
    assert rel_err(embeds[0], golden["audio_adapter_out"]) <= 1e-4


def test_batched_equals_unbatched(model: AudioEncoder, golden: dict[str, torch.Tensor]) -> None:
    long_feats = golden["fbank"]
    short_feats = golden["fbank"][37:37 + 131] + 0.5
    batch = torch.zeros(2, 228, 80)
    batch[0], batch[1, :131] = long_feats, short_feats
    with torch.no_grad():
        embeds, n_tokens = model(batch, torch.tensor([228, 131]))
        enc, enc_lengths = model.encode(batch, torch.tensor([228, 131]))
        single = [model(f[None], torch.tensor([f.shape[0]])) for f in (long_feats, short_feats)]
        single_enc = model.encode(short_feats[None], torch.tensor([131]))
    assert n_tokens.tolist() == [28, audio_token_count(131)] and embeds.shape == (2, 28, 64)
    assert enc_lengths.tolist() == [56, single_enc[0].shape[1]]
    assert rel_err(enc[1, : enc_lengths[1]], single_enc[0][0]) <= 1e-5
    for b, (ref, n_ref) in enumerate(single):
        n = int(n_tokens[b])
        assert n == int(n_ref[0])
        assert rel_err(embeds[b, :n], ref[0]) <= 1e-5
        assert torch.count_nonzero(embeds[b, n:]) == 0


def test_real_size_meta_matches_manifest() -> None:
    manifest = json.loads((GOLDEN / "vita15_manifest.json").read_text())
    groups = manifest["main_model"]["groups"]
    expected = {
        t["name"][len(PREFIX):]: tuple(t["shape"])
        for group in ("audio_encoder.encoder", "audio_encoder.adapter")
        for t in groups[group]
    }
    with torch.device("meta"):
        m = AudioEncoder(AudioEncoderConfig())
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    buffers = {name for name, _ in m.named_buffers()}
    assert buffers == {"encoder.global_cmvn.mean", "encoder.global_cmvn.istd"}


def test_meta_built_model_loads_and_runs(
    tiny_cfg: AudioEncoderConfig, tiny_weights: dict[str, torch.Tensor], golden: dict[str, torch.Tensor]
) -> None:
    """Build on meta, materialise empty, load strictly: nothing derived is lost (the position table is
    computed per call)."""
    with torch.device("meta"):
        m = AudioEncoder(tiny_cfg)
    m = m.to_empty(device="cpu").eval()
    m.load_state_dict(tiny_weights, strict=True)
    with torch.no_grad():
        embeds, _ = m(golden["fbank"][None], torch.tensor([228]))
    assert rel_err(embeds[0], golden["audio_adapter_out"]) <= 1e-4


def test_bf16_build_keeps_cmvn_float32(
    tiny_cfg: AudioEncoderConfig, tiny_weights: dict[str, torch.Tensor], golden: dict[str, torch.Tensor]
) -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        m = AudioEncoder(tiny_cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    m.load_state_dict(tiny_weights, strict=True)
    assert m.encoder.global_cmvn.mean.dtype == torch.float32
    assert m.adpter.project.weight.dtype == torch.bfloat16
    torch.testing.assert_close(m.encoder.global_cmvn.mean, tiny_weights["encoder.global_cmvn.mean"])
    with torch.no_grad():
        embeds, n_tokens = m(golden["fbank"][None], torch.tensor([228]))
    assert embeds.dtype == torch.bfloat16 and n_tokens.tolist() == [28]
    assert rel_err(embeds[0].float(), golden["audio_adapter_out"]) <= 5e-2


# --- bad inputs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"RIFF\x00\x00garbage", b"\x00" * 1000, "not bytes"])
def test_decode_rejects_bad_bytes(data) -> None:
    with pytest.raises(InvalidInput):
        decode_audio(data)


def test_decode_rejects_too_long_from_header() -> None:
    with pytest.raises(InvalidInput, match="limit is 1 s"):
        decode_audio(encode_wav(sine(100, 1.5, 8000), 8000), max_seconds=1.0)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_to_mono_rejects_non_finite(bad_value: float) -> None:
    wave = sine(200, 0.2, 16000)
    wave[100] = bad_value
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        to_mono_16k(wave, 16000)
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        kaldi_fbank(wave)


@pytest.mark.parametrize("sr", [0, 7999, 192001, -16000, 16000.0, True])
def test_to_mono_rejects_bad_sample_rate(sr) -> None:
    with pytest.raises(InvalidInput, match="sample rate"):
        to_mono_16k(sine(200, 0.2, 16000), sr)


def test_to_mono_rejects_empty_and_bad_shape() -> None:
    with pytest.raises(InvalidInput, match="no samples"):
        to_mono_16k(np.zeros((0, 2), np.float32), 16000)
    with pytest.raises(InvalidInput, match="shape"):
        to_mono_16k(np.zeros((2, 2, 2), np.float32), 16000)
    with pytest.raises(InvalidInput, match="floating point"):
        to_mono_16k(np.zeros(2000, np.int16), 16000)


def test_validate_waveform_limits() -> None:
    validate_waveform(np.zeros(1360, np.float32))
    with pytest.raises(InvalidInput, match="minimum is 85 ms"):
        validate_waveform(np.zeros(1359, np.float32))
    validate_waveform(np.zeros(16000 * 60, np.float32))
    with pytest.raises(InvalidInput, match="limit is 60 s"):
        validate_waveform(np.zeros(16000 * 60 + 1, np.float32))
    with pytest.raises(InvalidInput, match="limit is 2 s"):
        validate_waveform(np.zeros(16000 * 3, np.float32), max_seconds=2)
    with pytest.raises(InvalidInput, match="1-D"):
        validate_waveform(np.zeros((1360, 2), np.float32))


def test_fbank_rejects_short_and_multichannel() -> None:
    with pytest.raises(InvalidInput, match="at least 400"):
        kaldi_fbank(np.zeros(399, np.float32))
    with pytest.raises(InvalidInput, match="1-D"):
        kaldi_fbank(np.zeros((2, 1000), np.float32))


def test_encoder_rejects_bad_inputs(model: AudioEncoder) -> None:
    feats = torch.zeros(1, 50, 80)
    with pytest.raises(InvalidInput, match="at least 7"):
        model(feats[:, :6], torch.tensor([6]))
    with pytest.raises(InvalidInput, match="at least 7"):
        model(torch.zeros(2, 50, 80), torch.tensor([50, 6]))
    with pytest.raises(InvalidInput, match="exceeds"):
        model(feats, torch.tensor([51]))
    with pytest.raises(InvalidInput, match="integers"):
        model(feats, torch.tensor([50.0], dtype=torch.float16))
    with pytest.raises(InvalidInput, match=r"\(1,\)"):
        model(feats, torch.tensor([50, 50]))
    with pytest.raises(InvalidInput, match="80"):
        model(torch.zeros(1, 50, 40), torch.tensor([50]))
    with pytest.raises(InvalidInput, match="NaN"):
        model(torch.full((1, 50, 80), float("nan")), torch.tensor([50]))
    with pytest.raises(InvalidInput, match="too long"):
        model(torch.zeros(1, 20011, 80), torch.tensor([20011]))
