"""The Realtime gateway's cost: time to first audio through it against direct gRPC, and 32 sessions at once.

    python bench/gateway.py [--turns 20] [--sessions 32] [--concurrent-turns 2] [--tokens 32] [--json]

One `LocalStack` with the small family and the gateway (Triton, the orchestrator process, the gateway
process). Reply audio is not paced (a playout lead of an hour: `playout_lead_ms` on the direct stream,
VITASERVE_GATEWAY_PLAYOUT_LEAD_MS for the gateway), so replies finish at compute speed. Every turn is a
typed question (QUESTIONS, cycled) with a spoken reply of at most `--tokens` tokens, greedy (temperature 0:
the gateway sends none, which the orchestrator reads as greedy), so both paths produce the same replies.

1. paired (`direct`, `gateway`): one session per path, `--turns` turns each, interleaved turn by turn (the
   order inside each pair alternates), after one warm-up turn per path. Direct: `vitaserve.client.Conversation`
   sends TextInput(defer_commit) then Commit. Gateway: the official `openai` SDK's realtime connection
   (turn_detection null, output audio) sends `conversation.item.create` (input_text) then `response.create`,
   which the gateway turns into the same two orchestrator events. TTFA is client clock, from the send of
   Commit / `response.create` to the first audio event (`audio` / `response.output_audio.delta`); reported
   p50 and p99 per path, `added_p50_ms` (difference of the medians), `added_paired_p50_ms` (median of the
   per-pair differences), `direct_server_ttfa_p50_ms` (the orchestrator's own commit -> first audio, from
   ResponseDone timings; `gateway_server_ttfa_p50_ms` the same through the gateway, which passes the timings
   on in `response.done`'s metadata) and `same_replies` (pairs whose reply texts are equal: the same work on both paths).
   TTFA varies by hundreds of ms with the models' compute, which swamps a difference of a few ms; the
   round trip from the same send to the turn's start (`turn_started` / `response.created`, which the
   orchestrator sends at the commit, before any model runs) takes the same hops as the first audio without
   the compute: `*_started_p50_ms` per path, and `added_started_p50_ms`/`_p99_ms` (per-pair differences)
   is the gateway's added latency on the round trip. The headline figure, `added_ttfa_p50_ms`: per turn, the
   client's TTFA minus the orchestrator's own (what the hops cost, without the compute), median per path,
   gateway minus direct. `gateway_first_audio_forward_p50_ms`/`_p99_ms`: what
   the gateway process measured itself for these turns (its `vitaserve_gateway_forward_seconds` histogram,
   event `first_audio`: a reply's first audio event from its arrival to its delta written to the socket),
   interpolated within buckets as Prometheus' histogram_quantile does.
2. per-event cost of the gateway's code (`forwarding`): the direct session's recorded ServerEvents replayed
   through `vitaserve_gateway.session.RealtimeSession` in this process (a stub in place of the gRPC call, the
   gateway's own JSON serialiser in place of the WebSocket send), `--replays` times: the time from handing it
   one orchestrator event to it asking for the next (translation, resampling to 24 kHz where the family's
   rate differs (not for the small family: hibari speaks at 24 kHz), base64, JSON), p50 and p99 per event
   kind. Not counted: uvicorn's WebSocket framing and socket write, gRPC decoding, scheduling.
3. load (`concurrent`): `--sessions` SDK connections at once through the gateway, `--concurrent-turns` turns
   each, every event read up to `response.done`. `errors`: error events, exceptions, timeouts, responses not
   `completed` or without audio (target 0). Wall time, TTFA p50/p99 under load, and the gateway process's
   RSS (/proc/PID/status VmRSS) before, at its peak while the load runs (sampled every 100 ms), and after
   every session has closed.

Events from the gateway are read as raw JSON (`conn.recv_bytes()`), not as the SDK's pydantic objects, so
the client's own parsing cost stays out of the gateway's figure. Exits 1 if any phase had an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from openai import AsyncOpenAI

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.client import Conversation
from vitaserve.lifecycle import run_main
from vitaserve.stack import LocalStack
from vitaserve_gateway.protocol import dumps
from vitaserve_gateway.session import RealtimeSession

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "How many legs does a spider have?",
    "What do bees make?",
    "Why is the sky blue?",
]
UNPACED_LEAD_MS = 3_600_000  # compute is measured, not playback
TURN_TIMEOUT_S = 180.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class Turn:
    ttfa_ms: float | None = None
    started_ms: float | None = None  # the commit -> the turn started (turn_started / response.created)
    reply: str = ""
    server_ttfa_ms: float | None = None  # the orchestrator's commit -> first audio (its timings)
    errors: list[str] = field(default_factory=list)


# ---- direct gRPC ------------------------------------------------------------------------------------

def direct_settings(tokens: int) -> pb.SessionSettings:
    return pb.SessionSettings(turn_detection="manual", want_audio=True, max_reply_tokens=tokens,
                              temperature=0.0, playout_lead_ms=UNPACED_LEAD_MS)


async def direct_turn(conv: Conversation, question: str, record: list[pb.ServerEvent]) -> Turn:
    turn = Turn()
    await conv.send_text(question, defer_commit=True)
    t0 = time.perf_counter()
    await conv.commit()
    done = False
    async for event in conv.until_done():
        record.append(event)
        kind = event.WhichOneof("event")
        if kind == "audio" and turn.ttfa_ms is None:
            turn.ttfa_ms = (time.perf_counter() - t0) * 1000
        elif kind == "turn_started":
            turn.started_ms = (time.perf_counter() - t0) * 1000
        elif kind == "error":
            turn.errors.append(f"direct: {event.error.code} {event.error.message}")
        elif kind == "interrupted":
            turn.errors.append("direct: interrupted")
        elif kind == "response_done":
            done = True
            turn.reply = event.response_done.text
            turn.server_ttfa_ms = event.response_done.timings.first_audio_ms
    if not done:
        turn.errors.append("direct: no response_done")
    elif turn.ttfa_ms is None:
        turn.errors.append("direct: no audio")
    return turn


# ---- the gateway (official SDK) ---------------------------------------------------------------------

async def recv(conn: Any) -> dict[str, Any]:
    return json.loads(await conn.recv_bytes())


async def configure(conn: Any, tokens: int) -> None:
    """Wait for session.created, then manual turns with audio output; returns on session.updated."""
    first = await recv(conn)
    if first["type"] != "session.created":
        raise RuntimeError(f"expected session.created, got {first['type']}")
    await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"],
                                       "max_output_tokens": tokens, "audio": {"input": {"turn_detection": None}}})
    while (event := await recv(conn))["type"] != "session.updated":
        if event["type"] == "error":
            raise RuntimeError(f"session.update refused: {event['error']}")


async def gateway_turn(conn: Any, question: str) -> Turn:
    turn = Turn()
    await conn.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": question}]})
    t0 = time.perf_counter()
    await conn.response.create()
    while True:
        event = await recv(conn)
        kind = event["type"]
        if kind == "response.output_audio.delta" and turn.ttfa_ms is None:
            turn.ttfa_ms = (time.perf_counter() - t0) * 1000
        elif kind == "response.created":
            turn.started_ms = (time.perf_counter() - t0) * 1000
        elif kind == "error":
            turn.errors.append(f"gateway: {event['error'].get('code')} {event['error'].get('message')}")
        elif kind == "response.done":
            response = event["response"]
            if response["status"] != "completed":
                turn.errors.append(f"gateway: response {response['status']}: {response.get('status_details')}")
            output = response.get("output") or [{}]
            content = output[0].get("content") or [{}]
            turn.reply = content[0].get("transcript") or ""
            first_audio = (response.get("metadata") or {}).get("vitaserve.first_audio_ms")
            turn.server_ttfa_ms = float(first_audio) if first_audio is not None else None
            break
    if turn.ttfa_ms is None and not turn.errors:
        turn.errors.append("gateway: no audio")
    return turn


def realtime_client(url: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


# ---- 1. paired turns ----------------------------------------------------------------------------------

async def paired(address: str, url: str, turns: int, tokens: int) -> tuple[dict, list[pb.ServerEvent]]:
    record: list[pb.ServerEvent] = []
    rows: list[tuple[Turn, Turn]] = []
    errors: list[str] = []
    async with (Conversation.open(address, settings=direct_settings(tokens)) as conv,
                realtime_client(url).realtime.connect(model="vitaserve") as conn):
        await configure(conn, tokens)
        for warm in (await direct_turn(conv, QUESTIONS[0], []), await gateway_turn(conn, QUESTIONS[0])):
            errors += [f"warm-up {e}" for e in warm.errors]  # one warm-up turn per path
        record.append(pb.ServerEvent(session_id=conv.session_id, session_started=conv.started))
        for k in range(turns):
            question = QUESTIONS[k % len(QUESTIONS)]
            got: dict[str, Turn] = {}
            for path in ("direct", "gateway") if k % 2 == 0 else ("gateway", "direct"):  # alternate the order
                coro = direct_turn(conv, question, record) if path == "direct" else gateway_turn(conn, question)
                got[path] = await asyncio.wait_for(coro, TURN_TIMEOUT_S)
            errors += [f"turn {k} {e}" for e in got["direct"].errors + got["gateway"].errors]
            rows.append((got["direct"], got["gateway"]))
    for line in errors[:5]:
        print(line, file=sys.stderr)
    ok = [(d, g) for d, g in rows if d.ttfa_ms is not None and g.ttfa_ms is not None]
    direct_ttfa = [d.ttfa_ms for d, _ in ok]
    gateway_ttfa = [g.ttfa_ms for _, g in ok]
    started = [(d, g) for d, g in ok if d.started_ms is not None and g.started_ms is not None]
    result = {
        "turns": turns,
        "direct_ttfa_p50_ms": percentile(direct_ttfa, 50), "direct_ttfa_p99_ms": percentile(direct_ttfa, 99),
        "gateway_ttfa_p50_ms": percentile(gateway_ttfa, 50), "gateway_ttfa_p99_ms": percentile(gateway_ttfa, 99),
        "added_p50_ms": percentile(gateway_ttfa, 50) - percentile(direct_ttfa, 50),
        "added_paired_p50_ms": percentile([g.ttfa_ms - d.ttfa_ms for d, g in ok], 50),
        "direct_started_p50_ms": percentile([d.started_ms for d, _ in started], 50),
        "gateway_started_p50_ms": percentile([g.started_ms for _, g in started], 50),
        "added_started_p50_ms": percentile([g.started_ms - d.started_ms for d, g in started], 50),
        "added_started_p99_ms": percentile([g.started_ms - d.started_ms for d, g in started], 99),
        "direct_server_ttfa_p50_ms": percentile([d.server_ttfa_ms for d, _ in ok if d.server_ttfa_ms], 50),
        "gateway_server_ttfa_p50_ms": percentile([g.server_ttfa_ms for _, g in ok if g.server_ttfa_ms], 50),
    }
    # Transport: the client's TTFA minus the orchestrator's own (commit -> first audio sent, from its
    # timings), per turn: the hops to and from the orchestrator, without the models' compute.
    direct_hops = [d.ttfa_ms - d.server_ttfa_ms for d, _ in ok if d.server_ttfa_ms]
    gateway_hops = [g.ttfa_ms - g.server_ttfa_ms for _, g in ok if g.server_ttfa_ms]
    result |= {
        "direct_hops_p50_ms": percentile(direct_hops, 50), "gateway_hops_p50_ms": percentile(gateway_hops, 50),
        "gateway_hops_p99_ms": percentile(gateway_hops, 99),
        "added_ttfa_p50_ms": percentile(gateway_hops, 50) - percentile(direct_hops, 50),
        "same_replies": sum(d.reply == g.reply for d, g in rows),
        "errors": len(errors),
    }
    return result, record


# ---- 2. the gateway's per-event cost, in this process ---------------------------------------------------

class _ReplayCall:
    """Stands in for the Converse call: hands out recorded ServerEvents and notes when each is asked for."""

    def __init__(self, events: list[pb.ServerEvent]) -> None:
        self._events = iter(events)
        self.asked: list[float] = []

    async def read(self) -> object:
        self.asked.append(time.perf_counter())
        return next(self._events, grpc.aio.EOF)

    def cancel(self) -> None:
        pass


class _ReplayStub:
    def __init__(self, call: _ReplayCall) -> None:
        self._call = call

    def Converse(self, requests: object, metadata: object = ()) -> _ReplayCall:
        return self._call


async def forwarding(record: list[pb.ServerEvent], replays: int) -> dict[str, Any]:
    """Per orchestrator event kind: the gateway's time from reading it to asking for the next one."""
    spent: dict[str, list[float]] = {}
    sent = 0

    async def send(event: dict[str, Any]) -> None:
        nonlocal sent
        dumps(event).encode("utf-8")  # what websocket.send_text serialises and encodes
        sent += 1

    for _ in range(replays):
        call = _ReplayCall(record)
        session = RealtimeSession(stub=_ReplayStub(call), metadata=(), send=send, model="vitaserve")
        await session.open()  # reads the recorded session_started
        await session.pump_upstream()
        # pump_upstream reads event k at asked[k] and asks for event k+1 once it has sent k's translation
        for k in range(1, len(record)):
            kind = record[k].WhichOneof("event")
            spent.setdefault(kind, []).append((call.asked[k + 1] - call.asked[k]) * 1000)
    out: dict[str, Any] = {"replays": replays, "events": sum(len(v) for v in spent.values()),
                           "realtime_events_sent": sent}
    for kind, values in sorted(spent.items()):
        out[kind] = {"n": len(values), "p50_ms": percentile(values, 50), "p99_ms": percentile(values, 99)}
    audio = [e.audio for e in record if e.WhichOneof("event") == "audio"]
    if audio:
        out["audio_chunk_ms_mean"] = statistics.fmean(len(a.pcm16) / 2 / a.sample_rate * 1000 for a in audio)
    return out


# ---- 3. concurrent sessions ------------------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_sessions(url: str) -> float:
    """The gateway's open-sessions gauge (its /metrics)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("vitaserve_gateway_sessions "):
                return float(line.split()[1])
    return float("nan")


async def wait_sessions_closed(url: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while open_sessions(url) > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


async def load_session(url: str, index: int, turns: int, tokens: int, ttfa: list[float], errors: list[str]) -> None:
    try:
        async with realtime_client(url).realtime.connect(model="vitaserve") as conn:
            await asyncio.wait_for(configure(conn, tokens), TURN_TIMEOUT_S)
            for k in range(turns):
                question = QUESTIONS[(index + k) % len(QUESTIONS)]
                turn = await asyncio.wait_for(gateway_turn(conn, question), TURN_TIMEOUT_S)
                errors += [f"session {index} turn {k}: {e}" for e in turn.errors]
                if turn.ttfa_ms is not None:
                    ttfa.append(turn.ttfa_ms)
    except Exception as exc:  # noqa: BLE001 - counted, the other sessions go on
        errors.append(f"session {index}: {type(exc).__name__}: {exc}")


async def concurrent(url: str, gateway_pid: int, sessions: int, turns: int, tokens: int) -> dict:
    await wait_sessions_closed(url)
    before = rss_kib(gateway_pid)
    peak = before

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_kib(gateway_pid))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample(), name="gateway-rss")
    ttfa: list[float] = []
    errors: list[str] = []
    started = time.perf_counter()
    try:
        await asyncio.gather(*(load_session(url, i, turns, tokens, ttfa, errors) for i in range(sessions)))
        wall = time.perf_counter() - started
        await wait_sessions_closed(url)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    for line in errors[:5]:
        print(line, file=sys.stderr)
    return {
        "sessions": sessions, "turns": sessions * turns, "turns_with_audio": len(ttfa), "wall_s": wall,
        "ttfa_p50_ms": percentile(ttfa, 50), "ttfa_p99_ms": percentile(ttfa, 99),
        "gateway_rss_before_mib": before / 1024, "gateway_rss_peak_mib": peak / 1024,
        "gateway_rss_after_mib": rss_kib(gateway_pid) / 1024,
        "errors": len(errors),
    }


def forward_histogram(url: str, event: str) -> tuple[list[float], list[float]]:
    """The gateway's own `vitaserve_gateway_forward_seconds{event=...}` histogram: (bucket bounds, cumulative
    counts), from its /metrics."""
    bounds, counts = [], []
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("vitaserve_gateway_forward_seconds_bucket{") and f'event="{event}"' in line:
                le = line.split('le="', 1)[1].split('"', 1)[0]
                bounds.append(float("inf") if le == "+Inf" else float(le))
                counts.append(float(line.rsplit(" ", 1)[1]))
    return bounds, counts


def histogram_quantile(bounds: list[float], counts: list[float], q: float) -> float:
    """Prometheus' histogram_quantile: linear within the bucket that holds the q-th observation."""
    total = counts[-1] if counts else 0.0
    if not total:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


async def run(stack: LocalStack, args: argparse.Namespace) -> dict:
    pair, record = await paired(stack.orchestrator_address, stack.gateway_url, args.turns, args.tokens)
    # What the gateway process itself measured for those turns: a reply's first audio event, from its
    # arrival from the orchestrator to its response.output_audio.delta written to the socket.
    bounds, counts = forward_histogram(stack.gateway_url, "first_audio")
    pair["gateway_first_audio_forward_n"] = int(counts[-1]) if counts else 0
    pair["gateway_first_audio_forward_p50_ms"] = histogram_quantile(bounds, counts, 0.5) * 1000
    pair["gateway_first_audio_forward_p99_ms"] = histogram_quantile(bounds, counts, 0.99) * 1000
    forward = await forwarding(record, args.replays)
    load = await concurrent(stack.gateway_url, stack.gateway.pid, args.sessions, args.concurrent_turns,
                            args.tokens)
    return {"paired": pair, "forwarding": forward, "concurrent": load}


def table(result: dict) -> str:
    p, f, c = result["paired"], result["forwarding"], result["concurrent"]
    lines = [
        f"time to first audio, {p['turns']} typed turns per path, interleaved (client clock, ms)",
        f"  {'':22s} {'p50':>9s} {'p99':>9s}",
        f"  {'direct gRPC':22s} {p['direct_ttfa_p50_ms']:9.1f} {p['direct_ttfa_p99_ms']:9.1f}",
        f"  {'via gateway (SDK)':22s} {p['gateway_ttfa_p50_ms']:9.1f} {p['gateway_ttfa_p99_ms']:9.1f}",
        (f"  added by the gateway: {p['added_p50_ms']:.1f} ms (difference of medians), "
         f"{p['added_paired_p50_ms']:.1f} ms (median of per-pair differences)"),
        (f"  orchestrator's own commit -> first audio, p50: direct {p['direct_server_ttfa_p50_ms']:.1f} ms, "
         f"gateway {p['gateway_server_ttfa_p50_ms']:.1f} ms"),
        (f"  client TTFA minus the orchestrator's, p50: direct {p['direct_hops_p50_ms']:.2f} ms, gateway "
         f"{p['gateway_hops_p50_ms']:.2f} ms (p99 {p['gateway_hops_p99_ms']:.2f})"),
        f"  => time to first audio added by the gateway, p50: {p['added_ttfa_p50_ms']:.2f} ms",
        (f"  round trip to the turn's start (no compute), p50: direct {p['direct_started_p50_ms']:.1f} ms, "
         f"gateway {p['gateway_started_p50_ms']:.1f} ms"),
        (f"  added by the gateway on that round trip (per pair): p50 {p['added_started_p50_ms']:.1f} ms, "
         f"p99 {p['added_started_p99_ms']:.1f} ms"),
        (f"  inside the gateway, a reply's first audio event in -> written to the socket "
         f"(its histogram, n={p['gateway_first_audio_forward_n']}): p50 {p['gateway_first_audio_forward_p50_ms']:.2f} ms, "
         f"p99 {p['gateway_first_audio_forward_p99_ms']:.2f} ms"),
        f"  same replies on both paths: {p['same_replies']}/{p['turns']}   errors: {p['errors']}",
        "",
        f"gateway code per orchestrator event, in-process replay x{f['replays']} (ms)",
        f"  {'event':22s} {'n':>6s} {'p50':>9s} {'p99':>9s}",
    ]
    for kind, v in f.items():
        if isinstance(v, dict):
            lines.append(f"  {kind:22s} {v['n']:6d} {v['p50_ms']:9.3f} {v['p99_ms']:9.3f}")
    if "audio_chunk_ms_mean" in f:
        lines.append(f"  (audio events carry {f['audio_chunk_ms_mean']:.0f} ms of speech on average)")
    lines += [
        "",
        f"{c['sessions']} concurrent gateway sessions x {c['turns'] // max(1, c['sessions'])} turns",
        f"  wall {c['wall_s']:.1f} s   turns with audio {c['turns_with_audio']}/{c['turns']}   errors {c['errors']}",
        f"  ttfa p50 {c['ttfa_p50_ms']:.1f} ms   p99 {c['ttfa_p99_ms']:.1f} ms",
        (f"  gateway RSS before {c['gateway_rss_before_mib']:.1f} MiB   peak {c['gateway_rss_peak_mib']:.1f} MiB"
         f"   after {c['gateway_rss_after_mib']:.1f} MiB"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20, help="paired phase: turns per path")
    parser.add_argument("--sessions", type=int, default=32, help="load phase: concurrent gateway sessions")
    parser.add_argument("--concurrent-turns", type=int, default=2, help="load phase: turns per session")
    parser.add_argument("--tokens", type=int, default=32, help="max reply tokens per turn")
    parser.add_argument("--replays", type=int, default=5, help="replays of the recorded events (forwarding)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    gateway_env = {"VITASERVE_GATEWAY_PLAYOUT_LEAD_MS": str(UNPACED_LEAD_MS)}
    with (tempfile.TemporaryDirectory(prefix="vitaserve-gateway-bench-") as tmp,
          LocalStack(None, family="small", gateway=True, work_dir=Path(tmp) / "stack",
                     gateway_env=gateway_env) as stack):
        result = asyncio.run(run(stack, args))

    def rounded(value: object) -> object:
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        return round(value, 3) if isinstance(value, float) else value

    out = rounded(result)
    print(json.dumps(out) if args.json else table(out))
    return 0 if result["paired"]["errors"] == result["concurrent"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(run_main(main))  # SIGINT/SIGTERM stop everything it started, then exit
