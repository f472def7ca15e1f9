"""Barge-in stop latency through the whole stack: Triton + the orchestrator process + a gRPC client.

    python bench/bargein.py [--json] [--interruptions 30] [--in-flight pause|continue] [--address HOST:PORT]

Each interruption: a typed turn starts a long spoken reply (tiny checkpoint, random weights, paced to real
time with the server's default 300 ms lead); once its audio plays (0.2-0.6 s after the first frame, varied so
the speech falls at every phase of the 100 ms frames), the client streams speech (the first 1.2 s of
tests/orchestrator/data/speech_question.wav, then 0.7 s of silence) in 20 ms chunks in real time, as a
microphone does. The session's VAD utterances are never turns here (vad_min_utterance_ms = 60 s), so every
reply comes from a typed turn and every interruption is a barge-in by the policy (min speech 500 ms).

The policy moment, measured on the client: the time it sent the audio chunk that completed the minimum
speech as the server's VAD counted it. The server reports that point as `Interrupted.trigger_audio_ms`
(an offset in the stream's input audio, which the client also counts), so no clocks are compared across
processes. Figures (client clock, ms, percentiles over the interruptions):
- stop_ms: policy moment -> the last audio chunk of the cancelled response reaching the client; 0 when the
  last chunk arrived before the moment (with in_flight=pause the audio is held from the speech's first VAD
  window on, so it usually stopped before the policy was met; `stop_raw_ms_*` keeps the signed values);
- interrupted_ms: policy moment -> the `interrupted` event reaching the client (includes the chunk's
  transit to the server, the VAD, the gate, and the event's transit back);
- frames_after_policy: audio chunks of cancelled responses that arrived after the policy moment (total).
`lost_history_turns` comes from the replica-kill scenario of bench/replica_kill.py (Redis, two orchestrator
replicas, SIGKILL mid-conversation, reconnect), run on the same Triton.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
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

sys.path.insert(0, str(Path(__file__).parent))
from replica_kill import lost_history_turns  # noqa: E402 - the replica-kill scenario, a bench of its own

SPEECH = REPO_ROOT / "tests" / "orchestrator" / "data" / "speech_question.wav"
CHUNK_MS = 20
SPEECH_MS = 1200
SILENCE_MS = 700
WARMUP = 2


def silence(ms: int) -> bytes:
    return b"\0\0" * (16 * ms)


class Stream:
    """One Converse stream: a background reader stamping arrivals, and the input audio's send times."""

    def __init__(self, conv: Conversation) -> None:
        self.conv = conv
        self.arrivals: list[tuple[float, pb.ServerEvent]] = []
        self.sent: list[tuple[float, float]] = []  # (chunk end in the stream's input audio ms, sent at)
        self._input_ms = 0.0
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for event in self.conv.events():
            self.arrivals.append((time.monotonic(), event))
            self._changed.set()

    async def wait_for(self, predicate, since: int = 0,
                       timeout: float = 30.0) -> tuple[float, pb.ServerEvent]:
        async with asyncio.timeout(timeout):
            while True:
                for t, event in self.arrivals[since:]:
                    if event.WhichOneof("event") == "error":
                        raise RuntimeError(f"{event.error.code}: {event.error.message}")
                    if predicate(event):
                        return t, event
                self._changed.clear()
                await self._changed.wait()

    async def mic(self, pcm16: bytes) -> None:
        base = self._input_ms
        await self.conv.send_audio(pcm16, chunk_ms=CHUNK_MS, realtime=True,
                                   on_chunk=lambda end_ms, at: self.sent.append((base + end_ms, at)))
        self._input_ms = base + len(pcm16) / 2 / 16

    async def close(self) -> None:
        await self.conv.end_input()
        await asyncio.wait_for(self._reader, 30)


async def interrupt_once(stream: Stream, speech: bytes, rng: random.Random) -> dict[str, float]:
    since = len(stream.arrivals)
    await stream.conv.send_text("Tell me a long story.")
    _, first = await stream.wait_for(lambda e: e.WhichOneof("event") == "audio", since)
    rid = first.response_id
    await asyncio.sleep(rng.uniform(0.2, 0.6))
    mic = asyncio.get_running_loop().create_task(stream.mic(speech + silence(SILENCE_MS)))
    intr_at, intr = await stream.wait_for(
        lambda e: e.WhichOneof("event") == "interrupted" and e.response_id == rid, since)
    await mic  # the rest of the speech and the silence: any late audio of `rid` would arrive meanwhile
    trigger = intr.interrupted.trigger_audio_ms
    if intr.interrupted.reason != "barge_in" or not trigger:
        raise RuntimeError(f"unexpected interruption: {intr.interrupted}")
    moment = next(at for end_ms, at in stream.sent if end_ms >= trigger - 0.5)
    audio = [t for t, e in stream.arrivals[since:]
             if e.WhichOneof("event") == "audio" and e.response_id == rid]
    last = max(audio)
    return {
        "stop_raw_ms": (last - moment) * 1000,
        "interrupted_ms": (intr_at - moment) * 1000,
        "frames_after_policy": sum(1 for t in audio if t > moment),
        "played_ms": intr.interrupted.played_ms,
    }


async def run_bench(address: str, n: int, in_flight: str, seed: int) -> list[dict[str, float]]:
    speech = read_wav_16k(SPEECH)[: 16 * SPEECH_MS * 2]
    # Utterances of up to 60 s are not turns: every reply comes from the typed turn.
    settings = pb.SessionSettings(
        turn_detection="vad", want_audio=True, max_reply_tokens=48, temperature=0.8, seed=11,
        vad_min_utterance_ms=60_000,
        barge_in=pb.BargeInSettings(enabled=True, min_speech_ms=500, in_flight=in_flight),
    )
    rng = random.Random(seed)
    rows = []
    async with Conversation.open(address, settings=settings) as conv:
        stream = Stream(conv)
        await stream.mic(silence(200))  # the server loads this stream's VAD
        for k in range(n + WARMUP):
            row = await interrupt_once(stream, speech, rng)
            if k >= WARMUP:
                rows.append(row)
        await stream.close()
    return rows


def pct(values: list[float], q: int) -> float:
    if len(values) == 1:
        return round(values[0], 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--interruptions", type=int, default=30)
    parser.add_argument("--in-flight", choices=("pause", "continue"), default="pause",
                        help="the session's barge-in in_flight mode (server default: pause)")
    parser.add_argument("--address", help="a running orchestrator (default: start Triton + one here)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the speech timing")
    parser.add_argument("--skip-replica-kill", action="store_true")
    args = parser.parse_args(argv)

    lost = None  # not measured with --address (a running orchestrator) or --skip-replica-kill
    with tempfile.TemporaryDirectory(prefix="vitaserve-bench-") as tmp:
        checkpoint = write_tiny_checkpoint(Path(tmp) / "ckpt", seed=0)
        if args.address:
            rows = asyncio.run(run_bench(args.address, args.interruptions, args.in_flight, args.seed))
        else:
            with LocalStack(checkpoint, work_dir=Path(tmp) / "stack") as stack:
                rows = asyncio.run(run_bench(stack.orchestrator_address, args.interruptions, args.in_flight,
                                             args.seed))
                if not args.skip_replica_kill:
                    lost = lost_history_turns(checkpoint, triton_url=stack.triton_url,
                                              work_dir=Path(tmp) / "replica_kill")
    stop = [max(0.0, r["stop_raw_ms"]) for r in rows]
    raw = [r["stop_raw_ms"] for r in rows]
    intr = [r["interrupted_ms"] for r in rows]
    result = {
        "interruptions": len(rows),
        "in_flight": args.in_flight,
        "stop_ms_p50": pct(stop, 50),
        "stop_ms_p99": pct(stop, 99),
        "stop_ms_max": round(max(stop), 2),
        "stop_raw_ms_p50": pct(raw, 50),
        "stop_raw_ms_min": round(min(raw), 2),
        "interrupted_ms_p50": pct(intr, 50),
        "interrupted_ms_p99": pct(intr, 99),
        "frames_after_policy": int(sum(r["frames_after_policy"] for r in rows)),
        "played_ms_p50": pct([r["played_ms"] for r in rows], 50),
        "lost_history_turns": lost,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:26s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # SIGINT/SIGTERM stop everything it started, then exit
