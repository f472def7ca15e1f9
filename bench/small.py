"""The small model family through the whole stack: time to first audio, reply real-time factor, ASR words.

    python bench/small.py [--turns 20] [--sessions 4] [--tokens 64] [--json]

One `LocalStack` with the small family (Whisper tiny.en, EfficientNet-Lite0 + RapidOCR, SmolLM2-135M-Instruct,
hibari; real Triton and the orchestrator process). Every turn is what a user of the demo does: the camera
picture (examples/media/scene.png) and a spoken question, committed push-to-talk. The questions are the
shipped example (examples/media/small_question.wav) and QUESTIONS spoken by hibari (another seed and voice
speed for each), cycled. After one warm-up turn:

1. sequential: one session, `--turns` turns one after the other;
2. concurrent: `--sessions` sessions at once, `--turns` turns in all (split between them).

Per phase, over all turns:
- `ttfa_p50_ms`, `ttfa_p99_ms`: end of the user's turn (the client sends Commit) to the first reply audio
  chunk received, client clock; `server_ttfa_p50_ms`: the same from the orchestrator's timings, with its
  parts `server_encode_p50_ms` (both encoders) and `server_ttft_p50_ms` (commit -> first token);
- `reply_rtf`: (commit -> the last audio chunk received) / duration of the reply audio, per turn, median:
  below 1 means the reply is produced faster than it plays (pacing is lifted for this client);
- `asr_wer`: word error of the transcripts the orchestrator sent (InputTranscript) against the questions'
  texts, over all turns (`asr_wer_shipped`: the shipped WAV's turns only);
- `errors`: error events, failed streams, turns without audio.
Also, once: `tts_rtf`, hibari's own synthesis time / audio duration over the replies' texts, in this
process (one thread).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.client import Conversation, read_wav_16k
from vitaserve.families.small.asr import word_errors
from vitaserve.lifecycle import run_main
from vitaserve.stack import REPO_ROOT, LocalStack

EXAMPLES = REPO_ROOT / "examples" / "media"
SHIPPED = "What animal is in this picture, and what word is written on it?"
QUESTIONS = [
    "What is written on the sign?",
    "Which animal do you see in this photo?",
    "Can you read the word in the picture for me?",
    "Is there a cat in this picture?",
]


@dataclass(frozen=True)
class Question:
    text: str
    pcm16: bytes
    shipped: bool


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def wer(pairs: list[tuple[str, str]]) -> float:
    """Corpus word error rate of (reference, hypothesis) pairs."""
    counts = [word_errors(r, h) for r, h in pairs]
    return sum(e for e, _ in counts) / max(1, sum(n for _, n in counts))


def make_questions() -> list[Question]:
    from vitaserve.families.small.tts import SpeechSynthesizer

    tts = SpeechSynthesizer(threads=1)
    out = [Question(SHIPPED, read_wav_16k(EXAMPLES / "small_question.wav"), True)]
    for k, text in enumerate(QUESTIONS):
        pcm = np.concatenate([np.zeros(4800, np.float32), *tts.synthesize(text, seed=100 + k),
                              np.zeros(4800, np.float32)])
        pcm16k = soxr.resample(pcm, 24000, 16000)
        out.append(Question(text, (np.clip(pcm16k, -1, 1) * 32767).astype("<i2").tobytes(), False))
    return out


async def session(address: str, index: int, turns: list[Question], tokens: int, image: bytes,
                  rows: list[dict], errors: list[str]) -> None:
    settings = pb.SessionSettings(turn_detection="manual", want_audio=True, max_reply_tokens=tokens,
                                  temperature=0.0, playout_lead_ms=3_600_000)
    try:
        async with Conversation.open(address, settings=settings) as conv:
            for turn, question in enumerate(turns):
                await conv.send_image(image)
                await conv.send_audio(question.pcm16, chunk_ms=1000)
                t0 = time.perf_counter()
                await conv.commit()
                first = last = None
                heard, done, samples, rate = None, None, 0, 24000
                async for event in conv.until_done():
                    kind = event.WhichOneof("event")
                    now = (time.perf_counter() - t0) * 1000
                    if kind == "audio":
                        first = now if first is None else first
                        last = now
                        samples += len(event.audio.pcm16) // 2
                        rate = event.audio.sample_rate
                    elif kind == "input_transcript":
                        heard = event.input_transcript.text
                    elif kind == "error":
                        errors.append(f"session {index} turn {turn}: {event.error.code} {event.error.message}")
                    elif kind == "response_done":
                        done = event.response_done
                if done is None or first is None:
                    errors.append(f"session {index} turn {turn}: no response_done or no audio")
                    continue
                audio_s = samples / rate
                rows.append({"ttfa": first, "server_ttfa": done.timings.first_audio_ms, "question": question,
                             "encode": done.timings.encode_ms, "ttft": done.timings.first_token_ms,
                             "heard": heard or "", "reply": done.text, "audio_s": audio_s,
                             "rtf": (last / 1000.0) / audio_s if audio_s else float("nan")})
    except Exception as exc:  # noqa: BLE001 - counted, the other sessions go on
        errors.append(f"session {index}: {type(exc).__name__}: {exc}")


async def phase(address: str, sessions: int, turns: int, tokens: int, questions: list[Question],
                image: bytes) -> tuple[dict, list[dict]]:
    plan = [questions[k % len(questions)] for k in range(turns)]
    per = [plan[i::sessions] for i in range(sessions)]
    rows: list[dict] = []
    errors: list[str] = []
    started = time.perf_counter()
    await asyncio.gather(*(session(address, i, per[i], tokens, image, rows, errors) for i in range(sessions)))
    for line in errors[:5]:
        print(line, file=sys.stderr)
    ttfa = [r["ttfa"] for r in rows]
    return {
        "sessions": sessions, "turns": len(rows), "wall_s": time.perf_counter() - started,
        "ttfa_p50_ms": percentile(ttfa, 50), "ttfa_p99_ms": percentile(ttfa, 99),
        "server_ttfa_p50_ms": percentile([r["server_ttfa"] for r in rows], 50),
        "server_encode_p50_ms": percentile([r["encode"] for r in rows], 50),
        "server_ttft_p50_ms": percentile([r["ttft"] for r in rows], 50),
        "reply_rtf": statistics.median([r["rtf"] for r in rows]) if rows else float("nan"),
        "reply_audio_s_mean": statistics.fmean([r["audio_s"] for r in rows]) if rows else float("nan"),
        "asr_wer": wer([(r["question"].text, r["heard"]) for r in rows]),
        "asr_wer_shipped": wer([(r["question"].text, r["heard"]) for r in rows if r["question"].shipped]),
        "errors": len(errors),
    }, rows


def tts_rtf(replies: list[str]) -> float:
    from vitaserve.families.small.tts import SpeechSynthesizer

    tts = SpeechSynthesizer(threads=1)
    spent = audio = 0.0
    for text in replies:
        t0 = time.perf_counter()
        samples = sum(chunk.size for chunk in tts.synthesize(text, seed=0))
        spent += time.perf_counter() - t0
        audio += samples / tts.sample_rate
    return spent / audio if audio else float("nan")


async def run(address: str, turns: int, sessions: int, tokens: int) -> dict:
    questions = make_questions()
    image = (EXAMPLES / "scene.png").read_bytes()
    await phase(address, 1, 1, tokens, questions, image)  # warm-up
    sequential, rows = await phase(address, 1, turns, tokens, questions, image)
    concurrent, more = await phase(address, sessions, turns, tokens, questions, image)
    return {"sequential": sequential, "concurrent": concurrent,
            "tts_rtf": tts_rtf(sorted({r["reply"] for r in rows + more if r["reply"].strip()})),
            "example_reply": rows[0]["reply"] if rows else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20, help="turns per phase")
    parser.add_argument("--sessions", type=int, default=4, help="concurrent sessions of the second phase")
    parser.add_argument("--tokens", type=int, default=64, help="max reply tokens per turn")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vitaserve-small-") as tmp:
        with LocalStack(None, family="small", work_dir=Path(tmp) / "stack") as stack:
            result = asyncio.run(run(stack.orchestrator_address, args.turns, args.sessions, args.tokens))

    def rounded(value: object) -> object:
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        return round(value, 3) if isinstance(value, float) else value

    out = rounded(result)
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=1))
    return 0 if result["sequential"]["errors"] == result["concurrent"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(run_main(main))  # SIGINT/SIGTERM stop everything it started, then exit
