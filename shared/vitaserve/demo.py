"""The embedded default: a local end-to-end conversation (`make demo`).

    python -m vitaserve.demo [--family small|vita15] [--checkpoint DIR] [--image PNG] [--wav WAV]
                             [--out reply.wav]

Starts a local Triton with the four models and the orchestrator, then runs a scripted conversation through
the public gRPC API: an image and a spoken question, then a typed follow-up. Streamed events are printed
with timestamps; for each turn the demo prints what the model family understood (the transcript of the
question and the image description), the reply text, and writes the reply audio as a WAV. Everything is
stopped at the end, and at once on SIGINT/SIGTERM.

Families (`vitaserve.families`):
- small (default): trained models that ship inside packages (Whisper tiny.en, EfficientNet-Lite0 + RapidOCR,
  SmolLM2-135M-Instruct, hibari TTS). The image is a photo of a cat with the word PIZZA on a sign, the
  question asks which animal and which word: a listener can check the answer.
- vita15: VITA-1.5. With --checkpoint DIR, the real checkpoint; without, a tiny checkpoint with random
  weights is written (once) and used: the computation is the real model's, but its answers are noise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.client import Conversation, read_wav_16k, run_turn, write_wav
from vitaserve.families import FAMILIES
from vitaserve.lifecycle import run_main
from vitaserve.stack import REPO_ROOT, LocalStack

EXAMPLES = REPO_ROOT / "examples" / "media"
DEFAULT_TINY = REPO_ROOT / "var" / "tiny-checkpoint"


@dataclass(frozen=True)
class Script:
    """One family's demo conversation: the picture, the spoken question, the typed follow-up, sampling."""

    image: Path
    wav: Path
    follow_up: str
    max_reply_tokens: int
    temperature: float


SCRIPTS = {
    # Greedy: the small LLM answers best without sampling, and the demo's answer is then reproducible.
    "small": Script(EXAMPLES / "scene.png", EXAMPLES / "small_question.wav",
                    "Which word did you read in the picture?", 64, 0.0),
    "vita15": Script(EXAMPLES / "camera.png", EXAMPLES / "question.wav", "And what colour is the roof?",
                     48, 0.8),
}


def ensure_tiny_checkpoint(path: Path) -> Path:
    from vitaserve.models.tiny import write_tiny_checkpoint

    if not (path / "model.safetensors.index.json").exists():
        print(f"writing a tiny random-weight checkpoint to {path} ...", flush=True)
        write_tiny_checkpoint(path, seed=0)
    return path


async def converse(address: str, image: bytes, question_pcm16: bytes, script: Script, out: Path) -> int:
    # The demo writes the reply to a WAV file instead of playing it: a lead of an hour lifts the real-time
    # pacing of reply audio (the orchestrator's default for clients that play it).
    settings = pb.SessionSettings(turn_detection="manual", want_audio=True,
                                  max_reply_tokens=script.max_reply_tokens, temperature=script.temperature,
                                  seed=7, playout_lead_ms=3_600_000)
    failures = 0
    async with Conversation.open(address, settings=settings) as conv:
        family = conv.started.model_family if conv.started else "?"
        print(f"\nsession {conv.session_id} (model family {family})\n")
        turns = [
            ("turn 1: camera image + spoken question", dict(image=image, pcm16=question_pcm16, text=None)),
            ("turn 2: typed follow-up", dict(image=None, pcm16=None, text=script.follow_up)),
        ]
        for i, (title, inputs) in enumerate(turns, start=1):
            print(f"--- {title}")
            reply, audio, rate, events = await run_turn(conv, **inputs)
            failures += sum(e.WhichOneof("event") == "error" for e in events)
            path = out.with_name(f"{out.stem}-turn{i}{out.suffix}")
            if audio:
                write_wav(path, audio, rate)
            for event in events:
                if event.WhichOneof("event") == "input_transcript":
                    heard = event.input_transcript
                    print(f"    transcript: {heard.text!r}")
                    for description in heard.image_descriptions:
                        print(f"    image description: {description!r}")
            if inputs["text"] is not None:
                print(f"    typed: {inputs['text']!r}")
            print(f"    reply text: {reply!r}")
            print(f"    reply audio: {len(audio) // 2 / rate:.2f} s at {rate} Hz -> {path}\n")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default=None,
                        help="model family (default: small; vita15 when --checkpoint is given)")
    parser.add_argument("--checkpoint", type=Path,
                        help="a VITA-1.5 checkpoint directory (--family vita15; default: tiny, random)")
    parser.add_argument("--image", type=Path, help="the picture of turn 1 (default: the family's example)")
    parser.add_argument("--wav", type=Path, help="the spoken question of turn 1, 16 kHz mono WAV")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "out" / "reply.wav")
    args = parser.parse_args(argv)
    family = args.family or ("vita15" if args.checkpoint else "small")
    if args.checkpoint and family != "vita15":
        parser.error("--checkpoint is a VITA-1.5 checkpoint: use it with --family vita15")
    script = SCRIPTS[family]

    checkpoint = None
    if family == "vita15":
        checkpoint = args.checkpoint or ensure_tiny_checkpoint(DEFAULT_TINY)
        if args.checkpoint is None:
            print("NOTE: the tiny checkpoint has random weights; the replies below are noise by design.")
    else:
        print("Model family 'small': Whisper tiny.en, EfficientNet-Lite0 + RapidOCR, SmolLM2-135M-Instruct "
              "and hibari TTS, weights from their packages (the LLM is converted once into a cache, ~20 s).")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with LocalStack(checkpoint, family=family, work_dir=REPO_ROOT / "var" / f"demo-stack-{family}") as stack:
        print(f"Triton ready at {stack.triton_url}, orchestrator at {stack.orchestrator_address} "
              f"({time.perf_counter() - t0:.1f} s to start)")
        failures = asyncio.run(converse(stack.orchestrator_address, (args.image or script.image).read_bytes(),
                                        read_wav_16k(args.wav or script.wav), script, args.out))
    print(f"stopped everything; {failures} error event(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
