"""The embedded default: a local end-to-end conversation (`make demo`).

    python -m vitaserve.demo [--checkpoint DIR] [--image PNG] [--wav WAV] [--out reply.wav]

Starts a local Triton with the four models and the orchestrator, then runs a scripted conversation through
the public gRPC API: an image and a spoken question, then a typed follow-up. Streamed events are printed
with timestamps and the reply audio of each turn is written as a WAV. Everything is stopped at the end.

Without --checkpoint, a tiny VITA-1.5 checkpoint with random weights is written (once) and used: the
computation is the real model's, but its answers are noise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.client import Conversation, read_wav_16k, run_turn, write_wav
from vitaserve.stack import REPO_ROOT, LocalStack

EXAMPLES = REPO_ROOT / "examples" / "media"
DEFAULT_TINY = REPO_ROOT / "var" / "tiny-checkpoint"


def ensure_tiny_checkpoint(path: Path) -> Path:
    from vitaserve.models.tiny import write_tiny_checkpoint

    if not (path / "model.safetensors.index.json").exists():
        print(f"writing a tiny random-weight checkpoint to {path} ...", flush=True)
        write_tiny_checkpoint(path, seed=0)
    return path


async def converse(address: str, image: bytes, question_pcm16: bytes, out: Path) -> int:
    # The demo writes the reply to a WAV file instead of playing it: a lead of an hour lifts the real-time
    # pacing of reply audio (the orchestrator's default for clients that play it).
    settings = pb.SessionSettings(turn_detection="manual", want_audio=True, max_reply_tokens=48,
                                  temperature=0.8, seed=7, playout_lead_ms=3_600_000)
    failures = 0
    async with Conversation.open(address, settings=settings) as conv:
        print(f"\nsession {conv.session_id}\n")
        turns = [
            ("turn 1: camera image + spoken question", dict(image=image, pcm16=question_pcm16, text=None)),
            ("turn 2: typed follow-up", dict(image=None, pcm16=None, text="And what colour is the roof?")),
        ]
        for i, (title, inputs) in enumerate(turns, start=1):
            print(f"--- {title}")
            reply, audio, rate, events = await run_turn(conv, **inputs)
            failures += sum(e.WhichOneof("event") == "error" for e in events)
            path = out.with_name(f"{out.stem}-turn{i}{out.suffix}")
            if audio:
                write_wav(path, audio, rate)
            print(f"    reply text: {reply!r}")
            print(f"    reply audio: {len(audio) // 2 / rate:.2f} s at {rate} Hz -> {path}\n")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a VITA-1.5 checkpoint directory (default: tiny, random)")
    parser.add_argument("--image", type=Path, default=EXAMPLES / "camera.png")
    parser.add_argument("--wav", type=Path, default=EXAMPLES / "question.wav")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "reply.wav")
    args = parser.parse_args(argv)

    checkpoint = args.checkpoint or ensure_tiny_checkpoint(DEFAULT_TINY)
    if args.checkpoint is None:
        print("NOTE: the tiny checkpoint has random weights; the replies below are noise by design.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with LocalStack(checkpoint, work_dir=REPO_ROOT / "var" / "demo-stack") as stack:
        print(f"Triton ready at {stack.triton_url}, orchestrator at {stack.orchestrator_address} "
              f"({time.perf_counter() - t0:.1f} s to start)")
        failures = asyncio.run(converse(stack.orchestrator_address, args.image.read_bytes(),
                                        read_wav_16k(args.wav), args.out))
    print(f"stopped everything; {failures} error event(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
