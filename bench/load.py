"""Load generator: N concurrent scripted sessions over the real stack (Triton + the orchestrator process).

    python bench/load.py [--sessions 16] [--turns 2] [--tokens 48] [--json] [--checkpoint DIR]

One `LocalStack` (the four Triton models on the tiny checkpoint, random weights, unless --checkpoint; and
the orchestrator process), then `--sessions` clients at once, each a `vitaserve.client.Conversation`
running `--turns` turns: the first turn sends the example camera image and the spoken question
(examples/media), later turns the spoken question again (a multi-turn session: its prompt repeats the
history, so llm_decoder reuses the session's KV cache). Each turn commits and waits for `response_done`.
Sessions start together after one warm-up turn.

Reports, over all turns: time to first token and time to first audio (client clock, from the commit;
p50 and p99), aggregate LLM tokens/s (tokens of every reply / wall time of the load phase), turns, and
errors (error events, failed streams, turns without audio when audio was asked for), and from the Triton
log the mean number of prompt positions llm_decoder reused from the session's KV cache per turn request,
and the fraction of the prompt positions of the sessions' later turns that were reused (the orchestrator
warms each session's next prompt prefix after a turn; `warmup_requests` counts those requests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.client import Conversation, read_wav_16k
from vitaserve.lifecycle import run_main
from vitaserve.models.tiny import write_tiny_checkpoint
from vitaserve.stack import REPO_ROOT, LocalStack

EXAMPLES = REPO_ROOT / "examples" / "media"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def session(address: str, index: int, turns: int, tokens: int, image: bytes, pcm16: bytes,
                  rows: list[dict], errors: list[str]) -> None:
    settings = pb.SessionSettings(turn_detection="manual", want_audio=True, max_reply_tokens=tokens,
                                  temperature=0.8, seed=1000 + index)
    try:
        async with Conversation.open(address, settings=settings) as conv:
            for turn in range(turns):
                if turn == 0:
                    await conv.send_image(image)
                await conv.send_audio(pcm16, chunk_ms=1000)
                t0 = time.perf_counter()
                await conv.commit()
                ttft = ttfa = None
                done = None
                async for event in conv.until_done():
                    kind = event.WhichOneof("event")
                    now = (time.perf_counter() - t0) * 1000
                    if kind == "text_delta" and ttft is None:
                        ttft = now
                    elif kind == "audio" and ttfa is None:
                        ttfa = now
                    elif kind == "error":
                        errors.append(f"session {index} turn {turn}: {event.error.code} {event.error.message}")
                    elif kind == "response_done":
                        done = event.response_done
                        response_id = event.response_id
                if done is None:
                    errors.append(f"session {index} turn {turn}: no response_done")
                    continue
                if ttfa is None and done.text.strip():
                    errors.append(f"session {index} turn {turn}: a reply with text but no audio")
                rows.append({"ttft": ttft, "ttfa": ttfa, "tokens": done.timings.tokens,
                             "total": (time.perf_counter() - t0) * 1000, "turn": turn,
                             "response_id": response_id})
    except Exception as exc:  # noqa: BLE001 - counted, the other sessions go on
        errors.append(f"session {index}: {type(exc).__name__}: {exc}")


async def load(address: str, sessions: int, turns: int, tokens: int) -> dict[str, float]:
    image = (EXAMPLES / "camera.png").read_bytes()
    pcm16 = read_wav_16k(EXAMPLES / "question.wav")
    warm_rows: list[dict] = []
    warm_errors: list[str] = []
    await session(address, -1, 1, tokens, image, pcm16, warm_rows, warm_errors)
    rows: list[dict] = []
    errors: list[str] = []
    started = time.perf_counter()
    await asyncio.gather(*(session(address, i, turns, tokens, image, pcm16, rows, errors) for i in range(sessions)))
    wall = time.perf_counter() - started
    for line in errors[:5]:
        print(line, file=sys.stderr)
    ttft = [r["ttft"] for r in rows if r["ttft"] is not None]
    ttfa = [r["ttfa"] for r in rows if r["ttfa"] is not None]
    return {
        "sessions": sessions, "turns": len(rows), "wall_s": wall,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
        "ttfa_p50_ms": percentile(ttfa, 50), "ttfa_p99_ms": percentile(ttfa, 99),
        "turn_p50_ms": statistics.median([r["total"] for r in rows]) if rows else float("nan"),
        "tokens_per_s": sum(r["tokens"] for r in rows) / wall,
        "errors": len(errors),
        "_later_turns": {r["response_id"] for r in rows if r["turn"] > 0},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--turns", type=int, default=2, help="turns per session")
    parser.add_argument("--tokens", type=int, default=48, help="max reply tokens per turn")
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory (default: a tiny one)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vitaserve-load-") as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else write_tiny_checkpoint(Path(tmp) / "ckpt", seed=0)
        with LocalStack(ckpt, work_dir=Path(tmp) / "stack") as stack:
            result = asyncio.run(load(stack.orchestrator_address, args.sessions, args.turns, args.tokens))
            # prefix reuse as llm_decoder logged it (positions of each prompt not recomputed), for the
            # turns' requests; the orchestrator's KV warm-ups between turns (request ids *-warm) apart
            log = (Path(tmp) / "stack" / "triton.log").read_text(errors="replace")
            lines = re.findall(r"llm_decoder request_id='([^']*)' .* kv_reused=(\d+) prompt=(\d+)", log)
            turns = [(int(r), int(p)) for rid, r, p in lines if not rid.endswith("-warm")]
            later_ids = result.pop("_later_turns")
            later = [(int(r), int(p)) for rid, r, p in lines if rid in later_ids]
            result["llm_requests"] = len(turns)
            result["warmup_requests"] = len(lines) - len(turns)
            result["kv_reused_mean"] = sum(r for r, _ in turns) / len(turns) if turns else 0.0
            result["kv_reused_fraction_later_turns"] = (
                sum(r for r, _ in later) / sum(p for _, p in later) if later else 0.0)
    out = {k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>14}: {v}")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(run_main(main))  # SIGINT/SIGTERM stop everything it started, then exit
