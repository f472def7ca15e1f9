"""Speech decoder throughput: segments one after another vs decoded together by `SpeechBatcher`.

    python bench/speech_batching.py [--json] [--segments 16] [--codes 200] [--rounds 2]

One tiny checkpoint (`write_tiny_checkpoint`, random weights), one torch thread, in this process (the
speech decoder's AR loop only: no codec, no Triton). `--segments` distinct text segments (8-20 tokens),
each decoding exactly `--codes` codes (top-k 2 sampling, one seed per segment; EOS is not forced, so a
segment that samples it ends early and the count is of codes actually produced).

- codes_per_s_sequential: every segment alone with `SpeechDecoder.generate`, one after another;
- codes_per_s_batched: the same segments submitted at once to one `SpeechBatcher` (its thread);
- ratio: batched over sequential; identical: every segment's codes equal its sequential codes
  (each the best of `--rounds` rounds).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch

from vitaserve.batching import CodeSampling, SpeechBatchConfig, SpeechBatcher
from vitaserve.models.checkpoint import CheckpointDir
from vitaserve.models.tiny import write_tiny_checkpoint


class _Sink:
    def __init__(self, done: threading.Semaphore) -> None:
        self.codes: list[int] = []
        self._done = done

    def on_code(self, code: int) -> None:
        self.codes.append(code)

    def on_finish(self, reason: str, error) -> None:  # noqa: ANN001
        assert error is None, error
        self._done.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--codes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = CheckpointDir(write_tiny_checkpoint(Path(tmp) / "ckpt"))
        decoder = checkpoint.load_speech_decoder("float32", "cpu")
        table = checkpoint.load_embedding_table("float32", "cpu")
    g = torch.Generator().manual_seed(0)
    hidden = [
        decoder.text_to_hidden(table[torch.randint(0, table.shape[0], (8 + i % 13,), generator=g)])
        for i in range(args.segments)
    ]

    def sequential() -> tuple[float, list[list[int]]]:
        started = time.perf_counter()
        out = [
            list(decoder.generate(h, max_tokens=args.codes, generator=torch.Generator().manual_seed(i)))
            for i, h in enumerate(hidden)
        ]
        return time.perf_counter() - started, out

    def batched() -> tuple[float, list[list[int]]]:
        batcher = SpeechBatcher(
            decoder,
            SpeechBatchConfig(max_batch=max(1, args.segments), prompts_per_step=max(1, args.segments)),
        )
        done = threading.Semaphore(0)
        sinks = [_Sink(done) for _ in hidden]
        started = time.perf_counter()
        for i, (h, sink) in enumerate(zip(hidden, sinks)):
            batcher.submit(
                h, CodeSampling(max_tokens=args.codes), sink, generator=torch.Generator().manual_seed(i)
            )
        for _ in sinks:
            done.acquire()
        elapsed = time.perf_counter() - started
        batcher.close()
        return elapsed, [s.codes for s in sinks]

    seq_s, reference = min((sequential() for _ in range(args.rounds)), key=lambda r: r[0])
    bat_s, codes = min((batched() for _ in range(args.rounds)), key=lambda r: r[0])
    total = sum(len(c) for c in reference)
    result = {
        "segments": args.segments,
        "codes": total,
        "codes_per_s_sequential": round(total / seq_s, 1),
        "codes_per_s_batched": round(sum(len(c) for c in codes) / bat_s, 1),
        "ratio": round(seq_s / bat_s * sum(len(c) for c in codes) / total, 2),
        "identical": codes == reference,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
