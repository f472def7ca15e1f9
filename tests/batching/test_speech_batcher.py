"""Unit tests of the speech decoder's continuous batching (`vitaserve.batching.SpeechBatcher`) on the tiny
golden speech decoder.

The reference for every segment is `SpeechDecoder.generate` run alone with the same seed (the code path
checked against the golden outputs in tests/models). Most tests drive `step()` themselves, so step counts
are exact; the cancellation test runs the engine thread with callers on other threads, as Triton does.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from vitaserve.batching import CodeSampling, SpeechBatchConfig, SpeechBatcher
from vitaserve.batching.scheduler import wait_until
from vitaserve.errors import InvalidInput, ResourceExhausted, Unavailable
from vitaserve.models.checkpoint import CheckpointDir

pytestmark = pytest.mark.unit


class Sink:
    def __init__(self) -> None:
        self.codes: list[int] = []
        self.finish: tuple[str, object] | None = None
        self.done = threading.Event()

    def on_code(self, code: int) -> None:
        self.codes.append(code)

    def on_finish(self, reason: str, error) -> None:  # noqa: ANN001
        assert self.finish is None, "on_finish called twice"
        self.finish = (reason, error)
        self.done.set()


@pytest.fixture(scope="module")
def parts(tiny_checkpoint: Path):  # noqa: ANN201
    checkpoint = CheckpointDir(tiny_checkpoint)
    return checkpoint.load_speech_decoder("float32", "cpu"), checkpoint.load_embedding_table("float32", "cpu")


@pytest.fixture(scope="module")
def decoder(parts):  # noqa: ANN001, ANN201
    return parts[0]


def segments(parts, lengths: list[int], seed: int = 0) -> list[torch.Tensor]:  # noqa: ANN001
    decoder, table = parts
    g = torch.Generator().manual_seed(seed)
    return [
        decoder.text_to_hidden(table[torch.randint(0, table.shape[0], (n,), generator=g)]) for n in lengths
    ]


def alone(
    decoder, hidden: torch.Tensor, max_tokens: int, seed: int | None, greedy: bool = False
) -> list[int]:  # noqa: ANN001
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return list(decoder.generate(hidden, max_tokens=max_tokens, greedy=greedy, generator=generator))


def submit(
    batcher: SpeechBatcher,
    hidden: torch.Tensor,
    max_tokens: int,
    seed: int | None,
    greedy: bool = False,
    **kwargs,
) -> tuple[Sink, object]:  # noqa: ANN003
    sink = Sink()
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    handle = batcher.submit(
        hidden, CodeSampling(max_tokens=max_tokens, greedy=greedy), sink, generator=generator, **kwargs
    )
    return sink, handle


def run_to_end(batcher: SpeechBatcher, limit: int = 10_000) -> int:
    steps = 0
    while batcher.step():
        steps += 1
        assert steps < limit
    return steps


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_batched_codes_equal_each_segment_alone(parts, decoder, greedy: bool) -> None:
    """Different prompt lengths, different limits (rows leave at different steps, so rows move), and
    segments joining while others run: every segment's codes are exactly its codes alone."""
    lengths = [3, 7, 12, 5, 9, 20, 4, 15, 6, 11]
    limits = [40, 120, 75, 120, 33, 120, 90, 120, 60, 100]
    hidden = segments(parts, lengths, seed=1)
    expected = [alone(decoder, h, n, seed=i, greedy=greedy) for i, (h, n) in enumerate(zip(hidden, limits))]
    batcher = SpeechBatcher(decoder, SpeechBatchConfig(max_batch=6, prompts_per_step=2), start=False)
    sinks = [
        submit(batcher, h, n, seed=i, greedy=greedy)[0] for i, (h, n) in enumerate(zip(hidden[:7], limits))
    ]
    for _ in range(10):
        batcher.step()
    sinks += [
        submit(batcher, h, n, seed=7 + i, greedy=greedy)[0]
        for i, (h, n) in enumerate(zip(hidden[7:], limits[7:]))
    ]
    run_to_end(batcher)
    assert batcher.max_batch_seen == 6
    for i, (sink, codes) in enumerate(zip(sinks, expected)):
        assert sink.codes == codes, f"segment {i} differs from its run alone"
        assert sink.finish == ("length" if len(codes) == limits[i] else "stop", None)
    assert batcher.stats()["rows"] == 0, "the KV buffers are released when the batch empties"


def test_rows_with_a_repetition_penalty_or_another_top_k_beside_plain_ones(parts, decoder) -> None:
    hidden = segments(parts, [5, 8, 6, 9], seed=2)
    settings = [
        CodeSampling(max_tokens=60),
        CodeSampling(max_tokens=60, penalty_window=10, penalty=1.3),
        CodeSampling(max_tokens=60, top_k=5),
        CodeSampling(max_tokens=60, greedy=True, penalty_window=4),
    ]
    expected = [
        list(
            decoder.generate(
                h,
                max_tokens=60,
                top_k=c.top_k,
                greedy=c.greedy,
                generator=torch.Generator().manual_seed(i),
                penalty_window=c.penalty_window,
                penalty=c.penalty,
            )
        )
        for i, (h, c) in enumerate(zip(hidden, settings))
    ]
    batcher = SpeechBatcher(decoder, start=False)
    sinks = [Sink() for _ in hidden]
    for i, (h, c, sink) in enumerate(zip(hidden, settings, sinks)):
        batcher.submit(h, c, sink, generator=torch.Generator().manual_seed(i))
    run_to_end(batcher)
    assert [s.codes for s in sinks] == expected


def test_one_step_serves_every_running_segment(parts, decoder) -> None:
    hidden = segments(parts, [5] * 8)
    batcher = SpeechBatcher(decoder, SpeechBatchConfig(max_batch=8, prompts_per_step=8), start=False)
    handles = [submit(batcher, h, 30, seed=i)[1] for i, h in enumerate(hidden)]
    steps = run_to_end(batcher)
    assert all(h.peak_batch == 8 for h in handles)
    assert steps == max(h.codes for h in handles) + (
        0 if all(h.finish_reason == "length" for h in handles) else 1
    )


def test_a_long_segment_does_not_starve_short_ones(parts, decoder) -> None:
    long_hidden, *short = segments(parts, [30, 4, 4, 4, 4], seed=3)
    batcher = SpeechBatcher(decoder, SpeechBatchConfig(max_batch=4, prompts_per_step=1), start=False)
    _, long_handle = submit(batcher, long_hidden, 600, seed=0, greedy=True)
    for _ in range(5):
        batcher.step()
    shorts = [submit(batcher, h, 20, seed=i, greedy=True)[1] for i, h in enumerate(short)]
    run_to_end(batcher)
    for i, handle in enumerate(shorts):
        # the long one holds one row for 600 steps; three shorts run beside it at one code per step, and
        # the fourth takes the first row a short one frees (20 steps) instead of waiting for the long one
        rounds = 1 if i < 3 else 2
        assert handle.finished_step - handle.submitted_step <= rounds * (20 + 1) + len(shorts), i
    assert long_handle.finished_step > max(h.finished_step for h in shorts)


def test_cancellation_frees_the_row_at_once_and_spares_the_others(parts, decoder) -> None:
    hidden = segments(parts, [6, 9, 4], seed=4)
    expected = [alone(decoder, h, 80, seed=i) for i, h in enumerate(hidden)]
    flag = threading.Event()
    batcher = SpeechBatcher(decoder, start=False)
    a, ha = submit(batcher, hidden[0], 80, seed=0)
    b, hb = submit(batcher, hidden[1], 80, seed=1, is_cancelled=flag.is_set)
    c, hc = submit(batcher, hidden[2], 80, seed=2)
    for _ in range(5):
        batcher.step()
    ha.cancel()
    flag.set()
    batcher.step()
    assert a.finish == ("cancelled", None) and b.finish == ("cancelled", None)
    assert batcher.stats()["running"] == 1 and len(a.codes) == len(b.codes) == 5
    run_to_end(batcher)
    assert c.codes == expected[2], "the survivor moved into a freed row and must not notice"
    assert a.codes == expected[0][:5] and b.codes == expected[1][:5]


def test_cancellation_from_other_threads_with_the_engine_thread(parts, decoder) -> None:
    hidden = segments(parts, [5] * 6, seed=5)
    batcher = SpeechBatcher(decoder, SpeechBatchConfig(max_batch=4))
    try:
        started = [submit(batcher, h, 1000, seed=i) for i, h in enumerate(hidden)]
        assert wait_until(lambda: all(len(s.codes) >= 3 for s, _ in started[:4]), 10)
        threads = [threading.Thread(target=h.cancel) for _, h in started]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(s.done.wait(5) for s, _ in started)
        assert all(s.finish == ("cancelled", None) or s.finish[0] == "stop" for s, _ in started)
        assert wait_until(lambda: batcher.stats()["running"] == 0 and batcher.stats()["waiting"] == 0, 5)
    finally:
        batcher.close()


def test_the_queue_is_bounded_and_waiting_segments_get_unavailable_at_close(parts, decoder) -> None:
    hidden = segments(parts, [4] * 4)
    batcher = SpeechBatcher(decoder, SpeechBatchConfig(max_batch=1, max_queue=2), start=False)
    sinks = [submit(batcher, h, 50, seed=i)[0] for i, h in enumerate(hidden[:2])]
    batcher.step()  # admits one: one waits
    sinks.append(submit(batcher, hidden[2], 50, seed=2)[0])
    with pytest.raises(ResourceExhausted, match="max_queue 2"):
        submit(batcher, hidden[3], 50, seed=3)
    batcher.close()
    assert all(isinstance(s.finish[1], Unavailable) for s in sinks if s.finish[0] == "error")
    assert sum(s.finish[0] == "error" for s in sinks) == 3
    with pytest.raises(Unavailable):
        submit(batcher, hidden[3], 50, seed=3)


def test_the_kv_budget_bounds_the_buffers_and_makes_segments_wait(parts, decoder) -> None:
    hidden = segments(parts, [4, 5, 6, 7, 8, 9], seed=6)
    expected = [alone(decoder, h, 200, seed=i) for i, h in enumerate(hidden)]
    budget = 1024  # 256-position rows: 4 rows at a time
    batcher = SpeechBatcher(
        decoder, SpeechBatchConfig(max_batch=8, kv_positions=budget, prompts_per_step=8), start=False
    )
    sinks = [submit(batcher, h, 200, seed=i)[0] for i, h in enumerate(hidden)]
    peak = 0
    while batcher.step():
        stats = batcher.stats()
        assert stats["rows"] * stats["capacity"] <= budget
        peak = max(peak, stats["running"])
    assert peak == 4 and batcher.max_batch_seen == 4
    assert [s.codes for s in sinks] == expected
    with pytest.raises(InvalidInput, match="KV budget is 1024 positions"):
        submit(batcher, segments(parts, [500])[0], 1000, seed=0)


def test_a_batch_emptied_by_cancellations_does_not_keep_its_buffers_past_the_budget(parts, decoder) -> None:
    budget = 1024
    batcher = SpeechBatcher(
        decoder, SpeechBatchConfig(max_batch=8, kv_positions=budget, prompts_per_step=8), start=False
    )
    handles = [submit(batcher, h, 100, seed=i)[1] for i, h in enumerate(segments(parts, [4] * 4))]
    batcher.step()
    assert batcher.stats()["rows"] * batcher.stats()["capacity"] == budget  # 4 rows of 256
    for handle in handles:
        handle.cancel()
    big, _ = submit(batcher, segments(parts, [40])[0], 300, seed=9)  # needs a 512-position row
    batcher.step()  # drops the four, then admits the big one in the same step
    stats = batcher.stats()
    assert stats["running"] == 1 and stats["rows"] * stats["capacity"] <= budget, stats
    run_to_end(batcher)
    assert big.finish[0] in ("length", "stop")


def test_bad_requests_and_a_broken_sink_fail_alone(parts, decoder) -> None:
    hidden = segments(parts, [5, 5], seed=7)
    batcher = SpeechBatcher(decoder, start=False)
    for bad, match in [
        (torch.zeros(1, 0, 32), "no time steps"),
        (torch.zeros(2, 4, 32), "batch 1"),
        (torch.full((1, 4, 32), float("nan")), "finite"),
        (torch.zeros(1, 4, 7), r"\(B, N, 32\)"),
    ]:
        with pytest.raises(InvalidInput, match=match):
            batcher.submit(bad, CodeSampling(max_tokens=5), Sink())
    with pytest.raises(InvalidInput, match="top_k"):
        batcher.submit(hidden[0], CodeSampling(max_tokens=5, top_k=0), Sink())

    class Broken(Sink):
        def on_code(self, code: int) -> None:
            raise RuntimeError("client went away")

    broken = Broken()
    batcher.submit(hidden[0], CodeSampling(max_tokens=40, greedy=True), broken)
    good, _ = submit(batcher, hidden[1], 40, seed=None, greedy=True)
    run_to_end(batcher)
    assert broken.finish[0] == "error" and "client went away" in str(broken.finish[1])
    assert good.codes == alone(decoder, hidden[1], 40, seed=None, greedy=True)


def test_config_reads_parameters() -> None:
    assert SpeechBatchConfig.from_parameters({"max_queue": "5", "kv_positions": ""}) == SpeechBatchConfig(
        max_queue=5
    )
    with pytest.raises(ValueError, match="prompts_per_step must be an integer"):
        SpeechBatchConfig.from_parameters({"prompts_per_step": "few"})
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        SpeechBatchConfig(max_batch=0)
    with pytest.raises(ValueError, match="kv_positions must be >= 256"):
        SpeechBatchConfig(kv_positions=100)
