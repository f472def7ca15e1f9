"""Tests of `vitaserve.models.codec` (TiCodec decoder and streaming, spec §7) against the tiny reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vitaserve.errors import CheckpointError, InvalidInput
from vitaserve.models.codec import (
    CodecDecoder,
    StreamingDecoder,
    find_min_sum_index,
    generator_receptive_radius,
    pcm_to_int16,
)
from vitaserve.models.configs import CodecConfig

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1] / "golden"
GOLDEN = ROOT / "vita15-tiny"
SPT = 600  # samples per token


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "golden_outputs.safetensors")


@pytest.fixture(scope="module")
def cfg() -> CodecConfig:
    configs = json.loads((GOLDEN / "tiny_configs.json").read_text())
    return CodecConfig.from_reference(configs["codec_model_json"])


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """`generator.*` / `quantizer.*` in weight-norm form, as in the reference final.pt."""
    return load_file(GOLDEN / "tiny_codec.safetensors")


@pytest.fixture(scope="module")
def codec(cfg: CodecConfig, state: dict[str, torch.Tensor]) -> CodecDecoder:
    return CodecDecoder.from_state_dict(cfg, state)


@pytest.fixture(scope="module")
def stream_codes() -> list[int]:
    return torch.randint(0, 1024, (137,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.fixture(scope="module")
def one_shot(codec: CodecDecoder, stream_codes: list[int]) -> np.ndarray:
    return codec.decode(torch.tensor([stream_codes]))[0].numpy()


def _rel_err(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------------------------- one-shot


def test_codebook_lookup_and_gst_match_golden(codec: CodecDecoder, golden: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        quant = codec.quantizer.embed(golden["codec_codes"])
        gst = codec.gst()
    assert quant.shape == (1, 512, 60)
    assert _rel_err(quant[0], golden["codec_quant_emb"]) <= 1e-4
    assert gst.shape == (128,)
    assert _rel_err(gst, golden["codec_gst_emb"]) <= 1e-4


def test_wave_matches_golden(codec: CodecDecoder, golden: dict[str, torch.Tensor]) -> None:
    wave = codec.decode(golden["codec_codes"])
    assert wave.shape == (1, 36000)
    assert _rel_err(wave[0], golden["codec_wave"]) <= 1e-4


def test_unfolded_weight_norm_module_gives_the_same_wave(
    cfg: CodecConfig, state: dict[str, torch.Tensor], golden: dict[str, torch.Tensor]
) -> None:
    model = CodecDecoder(cfg)
    assert set(model.state_dict()) == set(state)  # fresh build = checkpoint names (weight_g / weight_v)
    model.load_state_dict(state, strict=True)
    assert _rel_err(model.decode(golden["codec_codes"])[0], golden["codec_wave"]) <= 1e-4


def test_load_checkpoint_state_folds_in_place(
    cfg: CodecConfig, state: dict[str, torch.Tensor], golden: dict[str, torch.Tensor]
) -> None:
    model = CodecDecoder(cfg)
    assert model.load_checkpoint_state(state, "tiny_codec.safetensors") is model
    assert "generator.conv_pre.weight" in model.state_dict()
    assert not any(k.endswith(("weight_g", "weight_v")) for k in model.state_dict())
    assert _rel_err(model.decode(golden["codec_codes"])[0], golden["codec_wave"]) <= 1e-4


def test_folded_state_dict_loads_and_gives_the_same_wave(
    cfg: CodecConfig, state: dict[str, torch.Tensor], golden: dict[str, torch.Tensor]
) -> None:
    """Fold with torch's own weight-norm kernel (norm over all axes but 0) to get the `.weight` form that
    `remove_weight_norm` leaves behind."""
    folded = {}
    for key, value in state.items():
        if key.endswith(".weight_g"):
            base = key[: -len("_g")]
            folded[base] = torch._weight_norm(state[base + "_v"], value, 0)
        elif not key.endswith(".weight_v"):
            folded[key] = value
    model = CodecDecoder.from_state_dict(cfg, folded)
    assert set(model.state_dict()) == set(folded)
    assert _rel_err(model.decode(golden["codec_codes"])[0], golden["codec_wave"]) <= 1e-4


def test_transposed_conv_weight_norm_is_per_input_channel(
    codec: CodecDecoder, state: dict[str, torch.Tensor]
) -> None:
    weight = codec.generator.ups[0].weight  # (in, out, k)
    g = state["generator.ups.0.weight_g"]
    assert g.shape == (weight.shape[0], 1, 1)
    assert torch.allclose(weight.flatten(1).norm(dim=1), g.flatten().abs(), rtol=1e-5)


def test_mismatched_state_dict_is_a_checkpoint_error(
    cfg: CodecConfig, state: dict[str, torch.Tensor]
) -> None:
    broken = dict(state)
    del broken["generator.conv_post.bias"]
    with pytest.raises(CheckpointError, match="conv_post.bias"):
        CodecDecoder.from_state_dict(cfg, broken)
    renamed = {("extra." + k if k.startswith("quantizer.") else k): v for k, v in state.items()}
    with pytest.raises(CheckpointError, match="missing tensor 'quantizer"):
        CodecDecoder.from_state_dict(cfg, renamed)
    reshaped = dict(state, **{"generator.ups.0.weight_g": torch.ones(128, 1, 1)})
    with pytest.raises(CheckpointError, match=r"final\.pt: tensor 'generator\.ups\.0\.weight_g' has shape"):
        CodecDecoder(cfg).load_checkpoint_state(reshaped, "final.pt")


@pytest.mark.parametrize(
    "codes",
    [
        torch.tensor([[0, 1024]]),
        torch.tensor([[-1, 3]]),
        torch.tensor([[1.0, 2.0]]),
        torch.tensor([1, 2]),
        torch.zeros(1, 0, dtype=torch.long),
        [[1, 2]],
    ],
    ids=["too-large", "negative", "float", "1-D", "empty", "list"],
)
def test_bad_codes_are_invalid_input(codec: CodecDecoder, codes: object) -> None:
    with pytest.raises(InvalidInput):
        codec.decode(codes)  # type: ignore[arg-type]


def test_real_size_builds_on_meta_with_manifest_names_and_shapes() -> None:
    manifest = json.loads((ROOT / "vita15_manifest.json").read_text())["codec"]
    cfg = CodecConfig.from_reference(manifest["model_json"])
    with torch.device("meta"):
        model = CodecDecoder(cfg)
    for part in ("generator", "quantizer"):
        module = getattr(model, part)
        got = [(k, list(v.shape)) for k, v in module.state_dict().items()]
        expected = [(t["name"], t["shape"]) for t in manifest["tensors"][part]]
        assert got == expected, part
        n_elements = sum(v.numel() for v in module.state_dict().values())
        assert n_elements == manifest["num_parameter_elements"][part]


# --------------------------------------------------------------------------------------------- streaming


def _stream(decoder: StreamingDecoder, codes: list[int]) -> tuple[list[np.ndarray], list[int]]:
    """Push all codes, then flush; return the pieces and, per piece, how many codes had been pushed."""
    pieces: list[np.ndarray] = []
    when: list[int] = []
    for n, code in enumerate(codes, start=1):
        out = decoder.push(code)
        pieces += out
        when += [n] * len(out)
    out = decoder.flush()
    return pieces + out, when + [len(codes)] * len(out)


def test_tiny_codec_receptive_field_fits_in_the_overlap(cfg: CodecConfig) -> None:
    """Why the whole stream can be compared with one-shot decode below: every kept sample is at least
    overlap·600 = 6000 samples from an artificial window edge, more than the generator's reach."""
    assert generator_receptive_radius(cfg) < 10 * SPT
    # The real configuration reaches farther (resblock kernels 3/7/11): streaming there is not bit-equal.
    assert generator_receptive_radius(CodecConfig()) > 10 * SPT


def test_pieces_come_out_as_soon_as_windows_complete(
    codec: CodecDecoder, stream_codes: list[int], one_shot: np.ndarray
) -> None:
    """With an infinite threshold every join succeeds: the first piece comes after first_chunk + overlap
    = 30 codes, then one per 20 new codes; nothing is lost or duplicated."""
    decoder = StreamingDecoder(codec, first_threshold=float("inf"))
    pieces, when = _stream(decoder, stream_codes)
    assert when == [30, 50, 70, 90, 110, 130, 137]
    audio = np.concatenate(pieces)
    assert audio.dtype == np.float32 and audio.shape == (SPT * 137,)
    assert _rel_err(audio, one_shot) <= 1e-5


def test_pieces_are_cut_in_the_second_half_of_their_chunk(
    codec: CodecDecoder, stream_codes: list[int]
) -> None:
    """Window i keeps samples [12000i, 12000(i+1)) and find_min_sum_index cuts at a quiet sample in a join
    window starting at or after the middle minus 2401//2, so every boundary lies in
    [12000i + 6000 - 1200, 12000(i+1))."""
    pieces, _ = _stream(StreamingDecoder(codec, first_threshold=float("inf")), stream_codes)
    boundaries = np.cumsum([len(p) for p in pieces])[:-1]
    assert len(boundaries) == 6
    for i, b in enumerate(boundaries):
        assert 12000 * i + 6000 - 1200 <= b < 12000 * (i + 1)


def test_default_thresholds_preserve_every_sample(
    codec: CodecDecoder, stream_codes: list[int], one_shot: np.ndarray
) -> None:
    pieces, _ = _stream(StreamingDecoder(codec), stream_codes)
    audio = np.concatenate(pieces)
    assert audio.shape == (SPT * 137,)
    assert _rel_err(audio, one_shot) <= 1e-5


def test_nothing_is_emitted_before_flush_when_no_join_point_is_quiet(
    codec: CodecDecoder, stream_codes: list[int], one_shot: np.ndarray
) -> None:
    pieces, when = _stream(StreamingDecoder(codec, first_threshold=float("-inf")), stream_codes)
    assert when == [137] and pieces[0].shape == (SPT * 137,)
    assert _rel_err(pieces[0], one_shot) <= 1e-5


def test_short_sentence_is_decoded_whole_at_flush(codec: CodecDecoder, stream_codes: list[int]) -> None:
    decoder = StreamingDecoder(codec)
    assert all(decoder.push(c) == [] for c in stream_codes[:29])
    (piece,) = decoder.flush()
    expected = codec.decode(torch.tensor([stream_codes[:29]]))[0].numpy()
    assert _rel_err(piece, expected) <= 1e-5
    assert decoder.flush() == []  # an empty sentence yields nothing


def test_later_sentences_use_the_later_chunk_and_threshold(
    codec: CodecDecoder, stream_codes: list[int]
) -> None:
    decoder = StreamingDecoder(codec, first_threshold=float("inf"), later_threshold=float("inf"))
    _, first_when = _stream(decoder, stream_codes[:60])
    assert first_when == [30, 50, 60]
    pieces, later_when = _stream(decoder, stream_codes)
    assert later_when == [50, 90, 130, 137]
    assert sum(len(p) for p in pieces) == SPT * 137


@pytest.mark.parametrize("overlap", [0, 2])
def test_stream_equals_one_shot_away_from_window_edges(
    cfg: CodecConfig, codec: CodecDecoder, stream_codes: list[int], one_shot: np.ndarray, overlap: int
) -> None:
    """With an overlap shorter than the generator's reach, the window edges leak into the kept audio.

    Compared region: samples at least `generator_receptive_radius` away from every artificial edge of the
    window they were decoded in (the edges at code 0 and at the stream's end are real ones). Window j >= 1
    spans codes [jC - P, (j+1)C + P) and keeps samples [600jC, 600(j+1)C); the final flush window spans
    [jC - P, T) and keeps [600jC, 600T). With P = 0 the edges fall right on the kept audio, and the
    excluded samples next to them must really differ (so the compared region is not vacuous)."""
    chunk, total = 20, len(stream_codes)
    radius = generator_receptive_radius(cfg)
    decoder = StreamingDecoder(codec, first_chunk=chunk, overlap=overlap, first_threshold=float("inf"))
    pieces, _ = _stream(decoder, stream_codes)
    audio = np.concatenate(pieces)
    assert audio.shape == (SPT * total,)

    interior = np.zeros(SPT * total, dtype=bool)
    j = 0
    while True:
        full = (j + 1) * chunk + overlap <= total
        start_tok, end_tok = max(0, j * chunk - overlap), min((j + 1) * chunk + overlap, total)
        kept = np.arange(SPT * j * chunk, SPT * ((j + 1) * chunk if full else total))
        left_ok = (start_tok == 0) | (kept - SPT * start_tok >= radius)
        right_ok = (end_tok == total) | (SPT * end_tok - 1 - kept >= radius)
        interior[kept] = left_ok & right_ok
        if not full:
            break
        j += 1
    assert 0.2 < interior.mean() < 0.9
    assert _rel_err(audio[interior], one_shot[interior]) <= 1e-5
    if overlap == 0:
        assert np.abs(audio[~interior] - one_shot[~interior]).max() > 0.1 * np.abs(one_shot).max()


def test_first_sentence_pieces_are_silence_trimmed(codec: CodecDecoder, stream_codes: list[int]) -> None:
    plain = StreamingDecoder(codec, first_threshold=float("inf"))
    trimmed = StreamingDecoder(codec, first_threshold=float("inf"), trim_silence=True)
    raw, _ = _stream(plain, stream_codes[:60])
    cut, _ = _stream(trimmed, stream_codes[:60])
    assert len(raw) == len(cut)
    for r, c in zip(raw, cut):
        loud = np.flatnonzero(np.abs(r) > 0.03)
        np.testing.assert_array_equal(c, r[loud[0]:] if loud.size else r)
        if loud.size:
            assert abs(c[0]) > 0.03
    # The second sentence is not trimmed.
    later_plain, _ = _stream(plain, stream_codes[:60])
    later_trim, _ = _stream(trimmed, stream_codes[:60])
    assert all(np.array_equal(a, b) for a, b in zip(later_plain, later_trim))


def test_bad_stream_input_is_invalid_input(codec: CodecDecoder) -> None:
    decoder = StreamingDecoder(codec)
    for bad in (1024, -1, 3.0, True, "7"):
        with pytest.raises(InvalidInput):
            decoder.push(bad)  # type: ignore[arg-type]
    assert decoder.push(np.int64(5)) == []
    with pytest.raises(InvalidInput):
        StreamingDecoder(codec, first_chunk=3)  # 1800 samples cannot hold a 2401-sample join window
    with pytest.raises(InvalidInput):
        StreamingDecoder(codec, overlap=-1)


# ------------------------------------------------------------------------------------------ join, int16


def test_find_min_sum_index_splits_at_the_quietest_sample_of_the_second_half() -> None:
    rng = np.random.default_rng(0)
    s = (0.5 + 0.1 * rng.random(10000)).astype(np.float32)
    s[1000:3000] = 0.001  # quiet but in the first half: never searched (m >= 5000 - 50)
    s[7000:7100] = 0.01
    s[7042] = 0.0
    buf = np.ones(5, dtype=np.float32)
    new_buf, out = find_min_sum_index(buf, s, 101, 0.1)
    assert out is not None
    np.testing.assert_array_equal(out, np.concatenate([buf, s[:7042]]))
    np.testing.assert_array_equal(new_buf, s[7042:])


def test_find_min_sum_index_holds_back_everything_above_threshold() -> None:
    s = np.full(10000, 0.5, dtype=np.float32)
    buf = np.zeros(3, dtype=np.float32)
    new_buf, out = find_min_sum_index(buf, s, 101, 0.1)
    assert out is None
    assert new_buf.shape == (10003,)


def test_pcm_to_int16_truncates_and_clips() -> None:
    x = np.array([0.5, -0.5, 0.99999, -1.0, 1.0, 2.0, -3.0, 1e-5, -1e-5, 0.000061], dtype=np.float32)
    out = pcm_to_int16(x)
    assert out.dtype == np.int16
    assert out.tolist() == [16384, -16384, 32767, -32768, 32767, 32767, -32768, 0, 0, 1]
