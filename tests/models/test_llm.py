"""Tests of `vitaserve.models.llm` against the reference's tiny-model outputs (spec §5.2–§5.4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from vitaserve.errors import InvalidInput
from vitaserve.models.llm import (
    SamplingParams,
    StreamDetokenizer,
    VitaLLM,
    detokenize_stream,
    llm_config_from_reference,
    sample_token,
)
from vitaserve.models.prompt import build_prompt, tokenize_with_placeholders

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "vita15-tiny"
MANIFEST = ROOT / "tests" / "golden" / "vita15_manifest.json"
TINY_TOKENIZER = ROOT / "shared" / "vitaserve" / "models" / "assets" / "tiny_tokenizer"
LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(GOLDEN / "golden_outputs.safetensors")


@pytest.fixture(scope="module")
def tiny_config() -> dict:
    return json.loads((GOLDEN / "tiny_configs.json").read_text())["main_config"]


def load_tiny_llm(config: dict, attn: str) -> VitaLLM:
    weights = load_file(GOLDEN / "tiny_main.safetensors")
    state = {k: v for k, v in weights.items() if k.startswith(LLM_PREFIXES)}  # LLM prefix is ""
    with torch.device("meta"):
        model = VitaLLM(llm_config_from_reference(config, attn_implementation=attn))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def llm(request, tiny_config) -> VitaLLM:
    return load_tiny_llm(tiny_config, request.param)


@pytest.fixture(scope="module")
def embeds(llm, golden) -> torch.Tensor:
    # projector_out rows are the max_num=1 tiles of image0/1/2; the golden prompt uses image1 and image2.
    return llm.splice_embeddings(golden["llm_input_ids"][0], golden["projector_out"][1:3],
                                 [golden["audio_adapter_out"]])


# ---- structure -------------------------------------------------------------------------------------
def test_real_size_meta_model_matches_manifest() -> None:
    manifest = json.loads(MANIFEST.read_text())["main_model"]
    with torch.device("meta"):
        model = VitaLLM(llm_config_from_reference(manifest["config"]))
    groups = manifest["groups"]
    names = ("llm.embed_tokens", "llm.layers", "llm.norm", "lm_head")
    expected = {t["name"]: tuple(t["shape"]) for g in names for t in groups[g]}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert len(expected) == 2 + 28 * 12 + 1
    assert model.model.rotary_emb.inv_freq.shape == (64,)  # non-persistent, not in the state dict


def test_config_drops_reference_only_keys(tiny_config) -> None:
    cfg = llm_config_from_reference(tiny_config)
    assert not hasattr(cfg, "mm_vision_tower") and not hasattr(cfg, "mm_hidden_size")
    assert cfg.rope_parameters["rope_theta"] == 1e6 and cfg.vocab_size == 1024
    assert cfg.tie_word_embeddings is False and cfg.num_key_value_heads == 2
    with pytest.raises(ValueError, match="rope scaling"):
        llm_config_from_reference({**tiny_config, "rope_scaling": {"type": "linear", "factor": 2.0}})


def test_rope_table_is_rebuilt_after_meta_load(llm) -> None:
    assert not llm.model.rotary_emb.inv_freq.is_meta
    head_dim = llm.config.hidden_size // llm.config.num_attention_heads
    expected = 1.0 / (1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    torch.testing.assert_close(llm.model.rotary_emb.inv_freq, expected, rtol=0, atol=0)


# ---- splicing (§5.2) -------------------------------------------------------------------------------
def test_splice_matches_golden(embeds, golden) -> None:
    assert embeds.shape == (570, 64)
    assert rel_err(embeds, golden["llm_inputs_embeds"]) <= 1e-4


def test_splice_accepts_list_ids(llm, golden, embeds) -> None:
    ids = golden["llm_input_ids"][0].tolist()
    got = llm.splice_embeddings(ids, golden["projector_out"][1:3], [golden["audio_adapter_out"]])
    assert torch.equal(got, embeds)


def test_splice_text_only_needs_no_dummy_media(llm) -> None:
    got = llm.splice_embeddings([1, 2, 3])
    assert torch.equal(got, llm.model.embed_tokens.weight[[1, 2, 3]])


def test_splice_rejects_bad_input(llm, golden) -> None:
    ids, img, aud = golden["llm_input_ids"][0], golden["projector_out"][1:3], [golden["audio_adapter_out"]]
    with pytest.raises(InvalidInput, match="2 image placeholder"):
        llm.splice_embeddings(ids, img[:1], aud)
    with pytest.raises(InvalidInput, match="2 image placeholder"):
        llm.splice_embeddings(ids, None, aud)
    with pytest.raises(InvalidInput, match="1 audio placeholder"):
        llm.splice_embeddings(ids, img, aud * 2)
    with pytest.raises(InvalidInput, match="1 audio placeholder"):
        llm.splice_embeddings(ids, img, None)
    with pytest.raises(InvalidInput, match="outside the vocabulary"):
        llm.splice_embeddings([5, 1024], None, None)
    with pytest.raises(InvalidInput, match="outside the vocabulary"):
        llm.splice_embeddings([5, -1], None, None)
    with pytest.raises(InvalidInput, match="image_features"):
        llm.splice_embeddings(ids, torch.zeros(2, 256, 32), aud)
    with pytest.raises(InvalidInput, match=r"audio_features\[0\]"):
        llm.splice_embeddings(ids, img, [torch.zeros(28)])
    with pytest.raises(InvalidInput, match="non-empty 1-D"):
        llm.splice_embeddings([], None, None)
    with pytest.raises(InvalidInput, match="integers"):
        llm.splice_embeddings(torch.tensor([1.0, 2.0]), None, None)


# ---- forward and generation (§5.3, §5.4) -----------------------------------------------------------
def test_first_forward_logits_match_golden(llm, embeds, golden) -> None:
    logits = llm.logits(embeds)
    assert logits.shape == (570, 1024)
    assert rel_err(logits, golden["llm_first_forward_logits"]) <= 1e-4


def test_greedy_generation_matches_golden(llm, embeds, golden) -> None:
    stream = llm.generate_stream(embeds, max_new_tokens=16, return_logits=True)
    out = list(stream)
    ids = [i for i, _ in out]
    assert ids == golden["llm_generated_ids"].tolist()
    assert rel_err(torch.stack([lg for _, lg in out]), golden["llm_generation_step_logits"]) <= 1e-4
    st = stream.state
    assert st.finish_reason == "length" and st.generated == ids
    # The 16th id was never fed: the cache holds the prompt and the first 15 ids.
    assert st.pending_ids == [ids[-1]] and st.cached_len == 570 + 15


def test_stop_id_is_not_yielded(llm, embeds, golden) -> None:
    ref = golden["llm_generated_ids"].tolist()  # [69, 685, 238, ...]
    stream = llm.generate_stream(embeds, max_new_tokens=16, stop_ids={ref[2]})
    assert list(stream) == ref[:2]
    assert stream.state.finish_reason == "stop" and stream.state.pending_ids == [ref[2]]
    assert stream.state.cached_len == 570 + 2


def test_close_cancels_between_tokens(llm, embeds, golden) -> None:
    stream = llm.generate_stream(embeds, max_new_tokens=16)
    got = [next(stream) for _ in range(3)]
    stream.close()
    assert got == golden["llm_generated_ids"].tolist()[:3]
    assert stream.state.finish_reason == "cancelled" and stream.state.cached_len == 570 + 2
    assert list(stream) == []


def test_cache_reuse_continues_positions(llm, embeds) -> None:
    first = llm.generate_stream(embeds, max_new_tokens=5)
    ids = list(first)
    state = first.state
    follow_ids = [17, 391, 5]
    new = llm.splice_embeddings(state.pending_ids + follow_ids)
    cont = llm.generate_stream(new, max_new_tokens=4, past=state.cache, return_logits=True)
    got = list(cont)
    # Same as one fresh pass over the whole sequence.
    full = torch.cat([embeds, llm.splice_embeddings(ids + follow_ids)])
    fresh = list(llm.generate_stream(full, max_new_tokens=4, return_logits=True))
    assert [i for i, _ in got] == [i for i, _ in fresh]
    assert rel_err(torch.stack([lg for _, lg in got]), torch.stack([lg for _, lg in fresh])) <= 1e-4
    assert cont.state.cached_len == 570 + 5 + 3 + 3


def test_seeded_sampling_is_reproducible(llm, embeds) -> None:
    def run(seed: int) -> list[int]:
        return list(llm.generate_stream(embeds, max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95,
                                        seed=seed))

    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c
    assert all(0 <= i < 1024 for i in a + c)


def test_top_k_one_is_greedy(llm, embeds, golden) -> None:
    got = list(llm.generate_stream(embeds, max_new_tokens=16, temperature=0.7, top_k=1, seed=3))
    assert got == golden["llm_generated_ids"].tolist()


def test_sample_token_rules() -> None:
    greedy = SamplingParams.checked(1, 0.0, 0, 1.0, None, ())
    assert sample_token(torch.tensor([1.0, 3.0, 3.0, 2.0]), greedy, None) == 1  # tie → lowest id
    nucleus = SamplingParams.checked(1, 1.0, 0, 0.5, None, ())
    logits = torch.log(torch.tensor([0.1, 0.6, 0.3]))
    g = torch.Generator().manual_seed(0)
    assert {sample_token(logits, nucleus, g) for _ in range(50)} == {1}
    top2 = SamplingParams.checked(1, 1.0, 2, 1.0, None, ())
    assert {sample_token(logits, top2, g) for _ in range(200)} == {1, 2}


def test_generation_rejects_bad_arguments(llm, embeds) -> None:
    for kwargs, match in [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 4, "temperature": -0.1}, "temperature"),
        ({"max_new_tokens": 4, "temperature": float("nan")}, "temperature"),
        ({"max_new_tokens": 4, "top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 4, "top_k": -2}, "top_k"),
        ({"max_new_tokens": 40000}, "context too long"),
    ]:
        with pytest.raises(InvalidInput, match=match):
            llm.generate_stream(embeds, **kwargs)
    with pytest.raises(InvalidInput, match="inputs_embeds"):
        llm.generate_stream(embeds[:, :32], max_new_tokens=1)
    with pytest.raises(InvalidInput, match="finite"):
        llm.generate_stream(torch.full((3, 64), float("nan")), max_new_tokens=1)


def test_zero_new_tokens_only_prefills(llm, embeds) -> None:
    stream = llm.generate_stream(embeds, max_new_tokens=0)
    assert list(stream) == [] and stream.state.cached_len == 570 and stream.state.finish_reason == "length"


# ---- prompt → ids → embeddings, detokenization ------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def test_prompt_to_embeddings_end_to_end(llm, tok, golden) -> None:
    prompt = build_prompt([], "What is in the picture?", n_images=2, has_audio=True, media="image")
    ids = tokenize_with_placeholders(tok, prompt)
    emb = llm.splice_embeddings(ids, golden["projector_out"][1:3], [golden["audio_adapter_out"]])
    assert emb.shape == (len(ids) - 3 + 2 * 256 + 28, 64)
    stream = llm.generate_stream(emb, max_new_tokens=4, stop_ids={tok.convert_tokens_to_ids("<|im_end|>")})
    assert len(list(stream)) <= 4


def test_detokenize_never_emits_broken_utf8(tok) -> None:
    text = "☞ 你好，世界！鬱😀 émigré <|im_end|>"
    ids = tok.encode(text, add_special_tokens=False)
    deltas = list(detokenize_stream(tok, ids))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # "鬱" is three byte-level tokens: nothing is emitted until the last one.
    det = StreamDetokenizer(tok)
    pieces = [det.push(i) for i in tok.encode("鬱", add_special_tokens=False)]
    assert pieces == ["", "", "鬱"] and det.flush() == ""


def test_detokenize_flushes_incomplete_bytes(tok) -> None:
    det = StreamDetokenizer(tok)
    assert [det.push(i) for i in tok.encode("鬱", add_special_tokens=False)[:2]] == ["", ""]
    tail = det.flush()
    assert tail and set(tail) == {"\ufffd"} and det.flush() == ""
    assert "".join(detokenize_stream(tok, [1023], skip_special_tokens=True)) == ""
