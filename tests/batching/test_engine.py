"""Unit tests of the continuous-batching engine (`vitaserve.batching`) on the tiny golden LLM.

Most tests drive `BatchEngine.step()` themselves (no engine thread), so step counts are exact; the
cancellation test runs the engine thread with callers on other threads, as Triton does.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vitaserve.batching import BatchEngine, EngineConfig, KVPool, PrefixCache, sequence_keys
from vitaserve.batching.prefix_cache import media_keys
from vitaserve.batching.scheduler import wait_until
from vitaserve.errors import InvalidInput, ResourceExhausted, Unavailable
from vitaserve.models.checkpoint import CheckpointDir
from vitaserve.models.configs import IMAGE_TOKEN_ID
from vitaserve.models.llm import SamplingParams

pytestmark = pytest.mark.unit


class Sink:
    """Collects one request's results; optionally cancels its handle after `cancel_after` tokens."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.finish: tuple[str, object] | None = None
        self.done = threading.Event()

    def on_token(self, token_id: int) -> None:
        self.ids.append(token_id)

    def on_finish(self, reason: str, error) -> None:  # noqa: ANN001
        assert self.finish is None, "on_finish called twice"
        self.finish = (reason, error)
        self.done.set()


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path):  # noqa: ANN201
    return CheckpointDir(tiny_checkpoint).load_llm("float32", "cpu")


def greedy(n: int, stops: tuple[int, ...] = ()) -> SamplingParams:
    return SamplingParams.checked(n, 0.0, 0, 1.0, None, stops)


def text_prompts(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 70, (n,), generator=gen)
    return [torch.randint(0, 1000, (int(k),), generator=gen) for k in lengths]


def submit(engine: BatchEngine, model, ids: torch.Tensor, params: SamplingParams, **kw):  # noqa: ANN001, ANN201
    sink = Sink()
    handle = engine.submit(model.splice_embeddings(ids), ids.numpy(), params, sink, **kw)
    return handle, sink


def drain(engine: BatchEngine, limit: int = 10_000) -> int:
    steps = 0
    while engine.step():
        steps += 1
        assert steps < limit
    return steps


def run_alone(model, ids: torch.Tensor, params: SamplingParams) -> list[int]:  # noqa: ANN001
    engine = BatchEngine(model, EngineConfig(prefix_cache=False), start=False)
    _, sink = submit(engine, model, ids, params)
    drain(engine)
    return sink.ids


# ---- results equal a lone run ----------------------------------------------------------------------


def test_golden_greedy_ids(model, golden_dir: Path) -> None:
    golden = load_file(golden_dir / "golden_outputs.safetensors")
    embeds = model.splice_embeddings(golden["llm_input_ids"][0], golden["projector_out"][1:3],
                                     [golden["audio_adapter_out"]])
    engine = BatchEngine(model, EngineConfig(prefill_chunk=100), start=False)  # a 570-row prompt in 6 chunks
    sink = Sink()
    engine.submit(embeds, np.arange(len(embeds)), greedy(16), sink)
    drain(engine)
    assert sink.ids == golden["llm_generated_ids"].tolist() and sink.finish == ("length", None)


def test_batched_greedy_equals_unbatched_and_generate_stream(model) -> None:
    prompts = text_prompts(12)
    params = greedy(40)
    alone = [run_alone(model, p, params) for p in prompts]
    reference = [list(model.generate_stream(model.splice_embeddings(p), max_new_tokens=40)) for p in prompts]
    assert alone == reference

    engine = BatchEngine(model, EngineConfig(prefill_chunk=64), start=False)
    sinks = [submit(engine, model, p, params)[1] for p in prompts]
    drain(engine)
    assert engine.max_batch_seen == 12
    assert [s.ids for s in sinks] == alone


def test_prefill_pieces_of_several_prompts_share_one_forward(model) -> None:
    prompts = text_prompts(6, seed=3)
    params = greedy(12)
    alone = [run_alone(model, p, params) for p in prompts]
    engine = BatchEngine(model, EngineConfig(prefill_chunk=4096), start=False)
    forwards = []
    real = engine._prefill_forward
    engine._prefill_forward = lambda pieces: (forwards.append(len(pieces)), real(pieces))[1]
    sinks = [submit(engine, model, p, params)[1] for p in prompts]
    drain(engine)
    assert forwards == [6], "all six prompts fit the chunk: one padded prefill forward"
    assert [s.ids for s in sinks] == alone


def test_a_prefill_that_fails_fails_only_its_request(model) -> None:
    prompts = text_prompts(4, seed=4)
    params = greedy(8)
    engine = BatchEngine(model, start=False)
    handles_sinks = [submit(engine, model, p, params) for p in prompts]
    bad = handles_sinks[2][0].id
    real = engine._prefill_forward

    def flaky(pieces):  # noqa: ANN001, ANN202
        if any(r.id == bad for r, _, _ in pieces):
            raise RuntimeError("a bad prompt")
        return real(pieces)

    engine._prefill_forward = flaky
    drain(engine)
    for i, (_, sink) in enumerate(handles_sinks):
        if i == 2:
            assert sink.finish[0] == "error" and "a bad prompt" in str(sink.finish[1])
        else:
            assert sink.finish == ("length", None) and sink.ids == run_alone(model, prompts[i], params)


def test_seeded_sampling_does_not_depend_on_batch_mates(model) -> None:
    prompts = text_prompts(8, seed=1)
    settings = [SamplingParams.checked(30, t, k, p, seed, ())
                for t, k, p, seed in [(0.9, 0, 1.0, 1), (1.3, 5, 1.0, 2), (0.7, 0, 0.8, 3), (1.0, 20, 0.9, 4),
                                      (0.0, 0, 1.0, None), (1.1, 0, 0.95, 5), (0.8, 3, 1.0, 6), (1.0, 0, 1.0, 7)]]
    alone = [run_alone(model, p, s) for p, s in zip(prompts, settings)]
    engine = BatchEngine(model, start=False)
    sinks = [submit(engine, model, p, s)[1] for p, s in zip(prompts, settings)]
    drain(engine)
    assert [s.ids for s in sinks] == alone
    # other batch mates, another order: still the same ids per request
    engine = BatchEngine(model, start=False)
    sinks = [submit(engine, model, p, s)[1] for p, s in list(zip(prompts, settings))[::-1][:5]]
    drain(engine)
    assert [s.ids for s in sinks] == alone[::-1][:5]


# ---- scheduling ----------------------------------------------------------------------------------


def test_a_long_request_does_not_starve_short_ones(model) -> None:
    engine = BatchEngine(model, start=False)
    long_handle, long_sink = submit(engine, model, text_prompts(1)[0], greedy(400))
    for _ in range(10):
        engine.step()
    short = [submit(engine, model, p, greedy(8)) for p in text_prompts(4, seed=2)]
    steps_to_finish = []
    while not all(h.done for h, _ in short):
        assert engine.step()
    for handle, sink in short:
        assert sink.finish == ("length", None) and len(sink.ids) == 8
        steps_to_finish.append(handle.finished_step - handle.submitted_step)
    # each short request takes its own 8 tokens' worth of steps (1 prefill step gives the first token)
    assert max(steps_to_finish) <= 8 + 1, steps_to_finish
    assert not long_handle.done and len(long_sink.ids) < 40


def test_prefill_is_bounded_per_step_so_running_streams_keep_flowing(model) -> None:
    engine = BatchEngine(model, EngineConfig(prefill_chunk=16), start=False)
    _, running = submit(engine, model, text_prompts(1)[0], greedy(200))
    while not running.ids:  # its own prompt first
        engine.step()
    before = len(running.ids)
    long_prompt = torch.randint(0, 1000, (100,), generator=torch.Generator().manual_seed(5))
    handle, newcomer = submit(engine, model, long_prompt, greedy(5))
    steps = 0
    while not newcomer.ids:
        engine.step()
        steps += 1
    assert steps == 7  # ceil(100 / 16) prefill steps
    assert len(running.ids) == before + 7  # one token per step meanwhile
    drain(engine)
    assert newcomer.ids == run_alone(model, long_prompt, greedy(5))


def test_cancellation_under_load_frees_slots(model) -> None:
    engine = BatchEngine(model, EngineConfig(max_batch=16))
    try:
        prompts = text_prompts(12, seed=3)
        flags = [threading.Event() for _ in prompts]
        started = [submit(engine, model, p, greedy(300 if i % 3 == 0 else 30),
                          is_cancelled=flags[i].is_set) for i, p in enumerate(prompts)]
        victims = [i for i in range(len(prompts)) if i % 3 == 0]  # the long ones
        assert wait_until(lambda: all(len(started[i][1].ids) >= 3 for i in victims), 30)
        for k, i in enumerate(victims):
            started[i][0].cancel() if k % 2 else flags[i].set()  # handle.cancel() or the is_cancelled poll
        assert wait_until(lambda: all(s.done.is_set() for _, s in started), 60)
        for i, (handle, sink) in enumerate(started):
            if i in victims:
                assert sink.finish == ("cancelled", None) and len(sink.ids) < 300
            else:
                assert sink.finish == ("length", None)
                assert sink.ids == run_alone(model, prompts[i], greedy(30))
        assert engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
        assert engine.pool.free_blocks == engine.pool.n_blocks  # no session ids: nothing is kept
    finally:
        engine.close()


def test_cancelled_while_waiting_never_runs(model) -> None:
    engine = BatchEngine(model, EngineConfig(max_batch=1), start=False)
    submit(engine, model, text_prompts(1)[0], greedy(50))
    engine.step()
    handle, sink = submit(engine, model, text_prompts(1, seed=9)[0], greedy(5))
    handle.cancel()
    engine.step()
    assert sink.finish == ("cancelled", None) and sink.ids == [] and handle.admitted_step is None


# ---- memory budget ---------------------------------------------------------------------------------


def test_kv_budget_queues_then_rejects_and_never_overallocates(model) -> None:
    # 16 blocks of 16 tokens; each request needs 40 + 60 = 100 tokens = 7 blocks: two fit at once.
    engine = BatchEngine(model, EngineConfig(kv_cache_tokens=256, max_batch=8, max_queue=2), start=False)
    prompts = [torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(i)) for i in range(5)]
    started = [submit(engine, model, p, greedy(60)) for p in prompts[:2]]
    engine.step()  # both admitted: the pool holds 14 of 16 blocks
    started += [submit(engine, model, p, greedy(60)) for p in prompts[2:4]]  # they wait
    assert engine.stats()["waiting"] == 2
    with pytest.raises(ResourceExhausted, match="at capacity.*max_queue 2") as caught:
        submit(engine, model, prompts[4], greedy(60))
    assert caught.value.retryable
    with pytest.raises(InvalidInput, match="needs 340 KV-cache tokens.*budget is 256 tokens"):
        submit(engine, model, prompts[0], greedy(300))
    used_max = 0
    while engine.step():
        stats = engine.stats()
        used_max = max(used_max, stats["total_blocks"] - stats["free_blocks"])
        assert stats["running"] <= 2
    assert used_max == 14
    assert all(sink.finish == ("length", None) for _, sink in started)
    assert [s.ids for _, s in started] == [run_alone(model, p, greedy(60)) for p in prompts[:4]]
    # the queue has room again
    submit(engine, model, prompts[4], greedy(60))
    drain(engine)
    assert engine.pool.free_blocks == engine.pool.n_blocks


def test_budget_in_bytes(model) -> None:
    per_token = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, head size 16, float32
    config = EngineConfig(kv_cache_bytes=per_token * 1024)
    assert BatchEngine(model, config, start=False).pool.capacity_tokens == 1024
    with pytest.raises(ValueError, match="below one block"):
        BatchEngine(model, EngineConfig(kv_cache_bytes=per_token * 8), start=False)


def test_close_ends_unfinished_requests_with_unavailable(model) -> None:
    engine = BatchEngine(model, EngineConfig(max_batch=1))
    first = submit(engine, model, text_prompts(1)[0], greedy(2000))
    second = submit(engine, model, text_prompts(1, seed=4)[0], greedy(10))
    assert wait_until(lambda: len(first[1].ids) > 2, 30)
    engine.close()
    for _, sink in (first, second):
        assert sink.finish[0] == "error" and isinstance(sink.finish[1], Unavailable)
    with pytest.raises(Unavailable):
        submit(engine, model, text_prompts(1)[0], greedy(4))


def test_submit_rejects_bad_requests(model) -> None:
    engine = BatchEngine(model, start=False)
    rows = model.splice_embeddings([1, 2, 3])
    with pytest.raises(InvalidInput, match="L keys"):
        engine.submit(rows, np.arange(2), greedy(4), Sink())
    with pytest.raises(InvalidInput, match="context too long"):
        engine.submit(rows, np.arange(3), greedy(40_000), Sink())


# ---- prefix reuse ----------------------------------------------------------------------------------


def test_second_turn_reuses_the_session_cache_and_gives_the_same_ids(model) -> None:
    engine = BatchEngine(model, start=False)
    turn1 = text_prompts(1, seed=6)[0]
    handle1, sink1 = submit(engine, model, turn1, greedy(12), session_id="s1")
    drain(engine)
    assert handle1.reused_tokens == 0 and "s1" in engine.prefix
    # turn 2 = turn 1's prompt + its reply + new user text
    turn2 = torch.cat([turn1, torch.tensor(sink1.ids), torch.randint(0, 1000, (9,))])
    handle2, sink2 = submit(engine, model, turn2, greedy(20), session_id="s1")
    drain(engine)
    # the reply's last id was sampled but never fed, so it is recomputed with the new text
    assert handle2.reused_tokens == len(turn1) + len(sink1.ids) - 1
    assert sink2.ids == run_alone(model, turn2, greedy(20))
    # a prompt that diverges early reuses only the common part
    turn3 = torch.cat([turn2[:5], torch.tensor([7, 7, 7]), turn2[5:]])
    handle3, sink3 = submit(engine, model, turn3, greedy(10), session_id="s1")
    drain(engine)
    assert handle3.reused_tokens == 5 and sink3.ids == run_alone(model, turn3, greedy(10))


def test_prefix_reuse_requires_identical_media_rows(model) -> None:
    engine = BatchEngine(model, start=False)
    ids = [5, 6, IMAGE_TOKEN_ID, 8, 9]
    image_a = torch.randn(1, 256, 64, generator=torch.Generator().manual_seed(1))
    image_b = image_a.clone()
    image_b[0, 100, 3] += 1e-3

    def run(image: torch.Tensor, session: str):  # noqa: ANN202
        sink = Sink()
        rows = model.splice_embeddings(ids, image)
        handle = engine.submit(rows, sequence_keys(ids, [image[0].numpy()]), greedy(6), sink, session_id=session)
        drain(engine)
        return handle, sink

    run(image_a, "m")
    same, same_sink = run(image_a, "m")
    assert same.reused_tokens == 2 + 256 + 2 - 1
    changed, changed_sink = run(image_b, "m")
    assert changed.reused_tokens == 2  # a changed medium breaks the match at its first row
    fresh = BatchEngine(model, EngineConfig(prefix_cache=False), start=False)
    for image, sink in ((image_a, same_sink), (image_b, changed_sink)):
        expect = Sink()
        fresh.submit(model.splice_embeddings(ids, image), np.zeros(260, np.int64), greedy(6), expect)
        drain(fresh)
        assert sink.ids == expect.ids


def test_cached_prefixes_are_evicted_lru_when_new_requests_need_blocks(model) -> None:
    # 12 blocks; a 40-row prompt + 8 tokens keeps 3 blocks per session
    engine = BatchEngine(model, EngineConfig(kv_cache_tokens=192, max_batch=4), start=False)
    prompts = {s: torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(i))
               for i, s in enumerate("abcd")}
    for s in "abc":
        submit(engine, model, prompts[s], greedy(8), session_id=s)
        drain(engine)
    assert engine.stats()["cached_blocks"] == 9
    submit(engine, model, prompts["a"][:20], greedy(2), session_id="a")  # touch a: b is now the oldest
    drain(engine)
    handle, sink = submit(engine, model, prompts["d"], greedy(100), session_id="d")  # needs 9 of 12 blocks
    drain(engine)
    assert sink.finish == ("length", None)
    assert "b" not in engine.prefix and "c" not in engine.prefix and "a" in engine.prefix and "d" in engine.prefix


def test_sequence_keys() -> None:
    rows = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    keys = sequence_keys([1, IMAGE_TOKEN_ID, 2], [rows])
    assert keys.shape == (6,) and keys[0] == 1 and keys[-1] == 2 and (keys[1:5] < 0).all()
    assert len(set(keys[1:5].tolist())) == 4
    assert np.array_equal(media_keys(rows), media_keys(rows.copy()))
    assert not np.array_equal(media_keys(rows), media_keys(rows[::-1].copy()))
    with pytest.raises(ValueError, match="placeholders"):
        sequence_keys([1, IMAGE_TOKEN_ID], [])


def test_pool_and_prefix_cache_bookkeeping(model) -> None:
    pool = KVPool(model.config, 64, block_size=16)
    cache = PrefixCache(pool)
    blocks = pool.allocate(4)
    assert pool.free_blocks == 0
    with pytest.raises(MemoryError):
        pool.allocate(1)
    cache.put("s", np.arange(20), blocks)  # 20 positions keep 2 blocks
    assert pool.free_blocks == 2 and cache.held("s") == 2
    assert cache.match("s", np.arange(30)) == 20 and cache.match("s", np.arange(20)) == 19
    assert cache.match("s", np.array([0, 1, 9])) == 2 and cache.match("t", np.arange(5)) == 0
    assert len(cache.take("s", 5)) == 1 and pool.free_blocks == 3 and len(cache) == 0
