"""Tests of `vitaserve.models.tts` (the speech decoder, spec §6) against the tiny reference outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitaserve.errors import InvalidInput
from vitaserve.models.configs import TTSDecoderConfig
from vitaserve.models.tts import SpeechDecoder

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1] / "golden"
GOLDEN = ROOT / "vita15-tiny"


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "golden_outputs.safetensors")


@pytest.fixture(scope="module")
def cfg() -> TTSDecoderConfig:
    configs = json.loads((GOLDEN / "tiny_configs.json").read_text())
    return TTSDecoderConfig.from_reference(configs["tts_decoder_args"])


def _load(cfg: TTSDecoderConfig) -> SpeechDecoder:
    """The checkpoint prefix of the decoder is empty: keys map 1:1."""
    model = SpeechDecoder(cfg)
    model.load_state_dict(load_file(GOLDEN / "tiny_tts_decoder.safetensors"), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def decoder(cfg: TTSDecoderConfig) -> SpeechDecoder:
    return _load(cfg)


@pytest.fixture(scope="module")
def hidden(decoder: SpeechDecoder, golden: dict[str, torch.Tensor]) -> torch.Tensor:
    table = load_file(GOLDEN / "tiny_main.safetensors")["model.embed_tokens.weight"]
    return decoder.text_to_hidden(table[golden["tts_text_ids"][0]])


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def test_text_to_hidden_matches_golden(hidden: torch.Tensor, golden: dict[str, torch.Tensor]) -> None:
    assert hidden.shape == (1, 24, 32)
    assert _rel_err(hidden[0], golden["tts_hidden_in"]) <= 1e-4


def test_text_to_hidden_keeps_token_subvectors_consecutive(decoder: SpeechDecoder) -> None:
    rows = torch.arange(3 * 64, dtype=torch.float32).reshape(3, 64)
    out = decoder.text_to_hidden(rows)
    assert torch.equal(out[0, 2], rows[1, :32]) and torch.equal(out[0, 3], rows[1, 32:])


@pytest.mark.parametrize(
    "rows", [torch.zeros(0, 64), torch.zeros(3, 48), torch.zeros(64), "not a tensor"], ids=str
)
def test_text_to_hidden_rejects_bad_rows(decoder: SpeechDecoder, rows: object) -> None:
    with pytest.raises(InvalidInput):
        decoder.text_to_hidden(rows)  # type: ignore[arg-type]


def test_prenet_matches_golden(
    decoder: SpeechDecoder, hidden: torch.Tensor, golden: dict[str, torch.Tensor]
) -> None:
    with torch.no_grad():
        out = decoder.prenet(hidden)
    assert _rel_err(out[0], golden["tts_prenet_out"]) <= 1e-4


def test_prenet_is_bidirectional(decoder: SpeechDecoder, hidden: torch.Tensor) -> None:
    """Changing the last input vector must change the first output (a causal pre-net would not)."""
    changed = hidden.clone()
    changed[0, -1] += 1.0
    with torch.no_grad():
        a, b = decoder.prenet(hidden), decoder.prenet(changed)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4


def test_greedy_ids_and_step_logits_match_golden(
    decoder: SpeechDecoder, hidden: torch.Tensor, golden: dict[str, torch.Tensor]
) -> None:
    steps = list(decoder.generate(hidden, max_tokens=20, greedy=True, return_logits=True))
    ids = [i for i, _ in steps]
    logits = torch.stack([row for _, row in steps])
    assert ids == golden["tts_ar_tokens_argmax"].tolist()
    assert logits.shape == (20, 1028)
    assert _rel_err(logits, golden["tts_ar_step_logits"]) <= 1e-4


def test_generate_yields_lazily_and_can_stop_early(decoder: SpeechDecoder, hidden: torch.Tensor) -> None:
    gen = decoder.generate(hidden, max_tokens=20, greedy=True)
    first = [next(gen) for _ in range(3)]
    gen.close()
    assert first == list(decoder.generate(hidden, max_tokens=3, greedy=True))


def test_seeded_sampling_is_reproducible(decoder: SpeechDecoder, hidden: torch.Tensor) -> None:
    def run(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return list(decoder.generate(hidden, max_tokens=30, top_k=2, generator=gen))

    a = run(123)
    assert a == run(123)
    assert len(a) == 30 and all(0 <= i < 1024 for i in a)


def test_sampling_with_top_k_1_is_greedy(decoder: SpeechDecoder, hidden: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(0)
    sampled = list(decoder.generate(hidden, max_tokens=20, top_k=1, generator=gen))
    assert sampled == list(decoder.generate(hidden, max_tokens=20, greedy=True))


def test_special_ids_are_never_yielded(cfg: TTSDecoderConfig, hidden: torch.Tensor) -> None:
    """Guard of §8.17: make BOS/SOS/PAD the overwhelming favourites; they must still not come out."""
    model = _load(cfg)
    with torch.no_grad():
        model.out_fnn.bias[[cfg.bos_id, cfg.sos_id, cfg.pad_id]] = 1e4
    greedy = list(model.generate(hidden, max_tokens=10, greedy=True))
    sampled = list(model.generate(hidden, max_tokens=10, top_k=4, generator=torch.Generator().manual_seed(1)))
    assert len(greedy) == len(sampled) == 10
    assert all(0 <= i < cfg.odim for i in greedy + sampled)


def test_eos_stops_generation_and_is_not_yielded(cfg: TTSDecoderConfig, hidden: torch.Tensor) -> None:
    model = _load(cfg)
    with torch.no_grad():
        model.out_fnn.bias[cfg.eos_id] = 1e4
    assert list(model.generate(hidden, max_tokens=10, greedy=True)) == []


def test_repetition_penalty_divides_recent_logits(decoder: SpeechDecoder, hidden: torch.Tensor) -> None:
    """Replay the greedy choices from the raw logits with the spec's plain division (history starts
    at SOS)."""
    window, penalty = 4, 3.0
    steps = list(
        decoder.generate(
            hidden, max_tokens=20, greedy=True, penalty_window=window, penalty=penalty, return_logits=True
        )
    )
    history = [decoder.cfg.sos_id]
    for token, logits in steps:
        scores = logits.clone()
        for i in set(history[-window:]):
            scores[i] = scores[i] / penalty
        scores[[1024, 1025, 1027]] = float("-inf")
        assert token == int(scores.argmax())
        history.append(token)
    # The golden greedy run repeats 368 three steps apart; the penalty must break that repeat.
    unpenalised = list(decoder.generate(hidden, max_tokens=20, greedy=True))
    assert unpenalised[13] == unpenalised[16] == 368
    assert [t for t, _ in steps][:16] == unpenalised[:16] and steps[16][0] != 368


def test_generate_rejects_bad_arguments(decoder: SpeechDecoder, hidden: torch.Tensor) -> None:
    with pytest.raises(InvalidInput):
        decoder.generate(hidden[0])
    with pytest.raises(InvalidInput):
        decoder.generate(torch.cat([hidden, hidden]))
    with pytest.raises(InvalidInput):
        decoder.generate(hidden, top_k=0)
    with pytest.raises(InvalidInput):
        decoder.generate(hidden.new_full(hidden.shape, float("nan")))


def test_real_size_builds_on_meta_with_manifest_names_and_shapes() -> None:
    manifest = json.loads((ROOT / "vita15_manifest.json").read_text())["tts_decoder"]
    cfg = TTSDecoderConfig.from_reference(manifest["args"])
    with torch.device("meta"):
        model = SpeechDecoder(cfg)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = {t["name"]: t["shape"] for t in manifest["tensors"]}
    assert got == expected
    assert list(got) == [t["name"] for t in manifest["tensors"]]
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["num_parameter_elements"]
