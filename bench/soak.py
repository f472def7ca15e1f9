"""Soak: N concurrent sessions looping multimodal turns over the real stack for M minutes, with the resource
use of every process sampled throughout, to find leaks.

    python bench/soak.py [--sessions 64] [--minutes 10] [--sample-s 5] [--seed 0] [--json]
                         [--session-ttl-s 60] [--checkpoint DIR] [--series-out FILE]

The stack: one Triton with the four models (tiny VITA-1.5 checkpoint, random weights, unless --checkpoint),
a redis-server of its own, and one orchestrator process using it as the session store, with /metrics on a
free loopback port. Each of the N clients runs sessions one after another: a session has 4-12 turns, each
one of: a typed question (45 %), an image with a question (20 %), the spoken question of examples/media
(20 %), a typed question interrupted at its first text or audio (15 %), every kind once among its first
four turns; it reconnects with the same session id after its first or second turn, and after 15 % of the
later ones; at its end it sends EndSession (75 %) or just leaves, so its record
expires (`--session-ttl-s`, short so that expiry reaches a steady state in the run's first half). Even
clients are paced (the default playout lead), odd ones take their audio unpaced; a user thinks 0.1-0.8 s
between turns. One warm-up session runs every kind of turn first; the idle state after it is the baseline.

Counted: turns started / done / interrupted by kind, sessions, reconnects, and errors by code: every
ErrorEvent, every failed RPC (its gRPC status), a stream that ended early (EOF), a turn without its end
within 120 s (TURN_TIMEOUT), a resume that did not resume (RESUME_MISMATCH). Target: 0 errors.

Sampled every `--sample-s`: RSS of the orchestrator, of tritonserver and of each Triton model process
(the `triton_python_backend_stub` children, by model instance name), Redis keys (DBSIZE), open fds of the
orchestrator and of tritonserver, and the orchestrator's live asyncio tasks and open streams (its /metrics:
`vitaserve_asyncio_tasks`, `vitaserve_active_sessions`). Each series: least-squares slope per minute over
the second half of the run (after warm-up) with its standard error, first and last values, and `flagged`
when the slope is clearly above noise (vitaserve.resources.Trend). After the load the run waits (bounded)
for the idle state: asyncio tasks, fds and Redis keys back at their baseline.

`soak(...)` returns the report (tests/soak/ runs it short); `main` prints it; the exit code is 0 only with
0 errors, nothing flagged and everything back at its baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.client import Conversation, read_wav_16k
from vitaserve.lifecycle import run_main
from vitaserve.redis_server import RedisServer
from vitaserve.resources import open_fds, rss_bytes, tcp_peer_ports, trend, triton_model_processes
from vitaserve.stack import REPO_ROOT, LocalStack, OrchestratorProcess, free_port

EXAMPLES = REPO_ROOT / "examples" / "media"
TURN_KINDS = (("text", 0.45), ("image", 0.20), ("audio", 0.20), ("interrupt", 0.15))
SESSION_TURNS = (4, 12)
RECONNECT_P = 0.15
ABANDON_P = 0.25
THINK_S = (0.1, 0.8)
TURN_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 30.0
MAX_REPLY_TOKENS = 16
UNPACED_LEAD_MS = 3_600_000
QUESTIONS = ("What do you see?", "Tell me one short thing.", "And then?", "Say something about the weather.",
             "Why?", "Describe it in one sentence.")
# Series that must come back to their idle value once every session has ended (deleted or expired).
# The orchestrator's Redis connections are apart: redis-py's pool keeps the connections its peak of
# concurrent commands opened (it has no max_connections), a high-water mark bounded by the concurrency
# rather than a leak; `redis_pool_bounded` checks that bound.
IDLE_SERIES = ("asyncio_tasks", "orchestrator_other_fds", "triton_fds", "redis_keys")
MB = 1024 * 1024


@dataclass
class Media:
    image: bytes
    pcm16: bytes

    @classmethod
    def examples(cls) -> Media:
        return cls((EXAMPLES / "camera.png").read_bytes(), read_wav_16k(EXAMPLES / "question.wav"))


@dataclass
class Stats:
    """What the clients did and what went wrong, by kind and by code."""

    turns_started: int = 0
    turns_done: int = 0
    turns_interrupted: int = 0
    by_kind: Counter = field(default_factory=Counter)
    sessions_opened: int = 0
    sessions_deleted: int = 0
    sessions_abandoned: int = 0
    reconnects: int = 0
    errors: Counter = field(default_factory=Counter)
    error_examples: list[str] = field(default_factory=list)
    turn_ms: list[float] = field(default_factory=list)  # commit -> response_done (done turns), client clock
    reply_audio_ms: list[int] = field(default_factory=list)

    def error(self, code: str, message: str) -> None:
        self.errors[code] += 1
        if len(self.error_examples) < 10:
            self.error_examples.append(f"{code}: {message[:300]}")

    def as_dict(self) -> dict[str, Any]:
        return {"turns": {"started": self.turns_started, "done": self.turns_done,
                          "interrupted": self.turns_interrupted, "by_kind": dict(self.by_kind)},
                "sessions_opened": self.sessions_opened, "sessions_deleted": self.sessions_deleted,
                "sessions_abandoned": self.sessions_abandoned, "reconnects": self.reconnects,
                "errors_total": sum(self.errors.values()), "errors": dict(self.errors),
                "error_examples": self.error_examples,
                "turn_p50_ms": _percentile(self.turn_ms, 50), "turn_p99_ms": _percentile(self.turn_ms, 99),
                "reply_audio_p50_ms": _percentile(self.reply_audio_ms, 50)}


def _percentile(values: list[float], q: float) -> int | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))])


# ---- the clients ----------------------------------------------------------------------------------------

async def _turn(conv: Conversation, kind: str, rng: random.Random, media: Media, stats: Stats) -> None:
    """One turn, read to its end (response_done or interrupted); an ErrorEvent ends it as failed."""
    stats.turns_started += 1
    stats.by_kind[kind] += 1
    if kind == "audio":
        await conv.send_audio(media.pcm16, chunk_ms=200)
        await conv.commit()
    else:
        if kind == "image":
            await conv.send_image(media.image)
        await conv.send_text(rng.choice(QUESTIONS))
    t0 = time.monotonic()
    interrupt_sent = kind != "interrupt"
    async with asyncio.timeout(TURN_TIMEOUT_S):
        async for event in conv.events():
            what = event.WhichOneof("event")
            if what == "response_done":
                stats.turns_done += 1
                stats.turn_ms.append((time.monotonic() - t0) * 1000)
                stats.reply_audio_ms.append(event.response_done.timings.audio_ms)
                return
            if what == "interrupted":
                stats.turns_interrupted += 1
                return
            if what == "error":
                stats.error(event.error.code, event.error.message)
                return
            if not interrupt_sent and what in ("text_delta", "audio"):
                await conv.interrupt(event.response_id)  # the reply may still finish first: a fair race
                interrupt_sent = True
    raise EOFError("the stream ended during a turn")


async def _drain(conv: Conversation, stats: Stats, *, end_session: bool) -> None:
    """Leave the stream (after EndSession, or by half-closing it) and read it to its end, counting any
    error event it still carried (e.g. a late save refused)."""
    if end_session:
        await conv.send(pb.ClientEvent(end_session=pb.EndSession()))
    await conv.end_input()
    async with asyncio.timeout(DRAIN_TIMEOUT_S):
        async for event in conv.events():
            if event.WhichOneof("event") == "error":
                stats.error(event.error.code, event.error.message)


def _plan(rng: random.Random) -> tuple[list[str], set[int]]:
    """A session's turn kinds (every kind once in its first four turns, in random order, then drawn from
    the mix) and the turns after which it reconnects (once after its first or second turn, then 15 %)."""
    turns = rng.randint(*SESSION_TURNS)
    kinds = [k for k, _ in TURN_KINDS]
    rng.shuffle(kinds)
    kinds += rng.choices([k for k, _ in TURN_KINDS], weights=[w for _, w in TURN_KINDS], k=turns - len(kinds))
    reconnects = {rng.choice((1, 2))} | {i for i in range(3, turns) if rng.random() < RECONNECT_P}
    return kinds, reconnects


async def _session(address: str, settings: pb.SessionSettings, rng: random.Random, media: Media,
                   deadline: float, stats: Stats) -> None:
    """One session from its first stream to EndSession (or abandonment), reconnecting now and then."""
    kinds, reconnect_after = _plan(rng)
    turns, done, session_id = len(kinds), 0, ""
    stats.sessions_opened += 1
    for _stream in range(turns + 1):  # at most one stream per turn, plus the first
        async with Conversation.open(address, session_id=session_id, settings=settings) as conv:
            if session_id:
                stats.reconnects += 1
                started = conv.started
                if conv.session_id != session_id or started is None or not started.resumed:
                    stats.error("RESUME_MISMATCH", f"reopened {session_id}, got {conv.session_id}")
            session_id = conv.session_id
            reconnect = False
            while done < turns and time.monotonic() < deadline and not reconnect:
                await _turn(conv, kinds[done], rng, media, stats)
                done += 1
                await asyncio.sleep(rng.uniform(*THINK_S))
                reconnect = done in reconnect_after
            if reconnect and done < turns and time.monotonic() < deadline:
                await _drain(conv, stats, end_session=False)
                continue
            delete = rng.random() >= ABANDON_P
            await _drain(conv, stats, end_session=delete)
            if delete:
                stats.sessions_deleted += 1
            else:
                stats.sessions_abandoned += 1
            return


async def _client(address: str, index: int, seed: int, media: Media, deadline: float, stats: Stats) -> None:
    """Sessions one after another until `deadline`; a failed stream is counted and the next one starts."""
    rng = random.Random(seed * 1000 + index)
    settings = pb.SessionSettings(turn_detection="manual", want_audio=True, max_reply_tokens=MAX_REPLY_TOKENS,
                                  temperature=0.8, seed=1000 + index)
    if index % 2:
        settings.playout_lead_ms = UNPACED_LEAD_MS
    max_sessions = 100_000  # a bound on the loop; the deadline ends it long before
    for _ in range(max_sessions):
        if time.monotonic() >= deadline:
            return
        try:
            await _session(address, settings, rng, media, deadline, stats)
        except grpc.aio.AioRpcError as exc:
            stats.error(exc.code().name, exc.details() or "")
        except TimeoutError:
            stats.error("TURN_TIMEOUT", f"client {index}: no end of turn or stream within the limit")
        except EOFError as exc:
            stats.error("EOF", f"client {index}: {exc}")
        except Exception as exc:  # noqa: BLE001 - counted; the other clients go on
            stats.error(type(exc).__name__, f"client {index}: {exc}")


async def warm_up(address: str, media: Media, stats: Stats) -> None:
    """Every kind of turn once, a reconnect, and EndSession: what lazily starts in the stack has started."""
    settings = pb.SessionSettings(turn_detection="manual", want_audio=True, max_reply_tokens=MAX_REPLY_TOKENS,
                                  seed=1, playout_lead_ms=UNPACED_LEAD_MS)
    rng = random.Random(0)
    session_id = ""
    for kinds in (("text", "image"), ("audio", "interrupt")):
        async with Conversation.open(address, session_id=session_id, settings=settings) as conv:
            session_id = conv.session_id
            for kind in kinds:
                await _turn(conv, kind, rng, media, stats)
            await _drain(conv, stats, end_session=kinds[0] == "audio")


# ---- sampling ---------------------------------------------------------------------------------------------

class Sampler:
    """One sample of every series (see the module docstring); `model_pids` names the Triton model processes
    as first seen, and `model_restarts` counts samples where a model's process had changed."""

    def __init__(self, *, orchestrator_pid: int, triton_pid: int, redis_url: str, metrics_url: str) -> None:
        self.orchestrator_pid = orchestrator_pid
        self.redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        self.triton_pid = triton_pid
        self.metrics_url = metrics_url
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=5)
        self.model_pids = triton_model_processes(triton_pid)
        self.model_restarts = 0

    def scrape(self) -> dict[str, float]:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as reply:
            text = reply.read().decode()
        values = {}
        for name in ("vitaserve_asyncio_tasks", "vitaserve_active_sessions"):
            match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
            if match is None:
                raise RuntimeError(f"{name} missing from {self.metrics_url}")
            values[name] = float(match.group(1))
        return values

    def sample(self) -> dict[str, float]:
        # fds first: the scrape's own HTTP connection must not be counted among the orchestrator's
        fds = open_fds(self.orchestrator_pid)
        redis_conns = sum(1 for port in tcp_peer_ports(self.orchestrator_pid) if port == self.redis_port)
        out = {
            "orchestrator_fds": float(fds),
            "orchestrator_redis_conns": float(redis_conns),
            "orchestrator_other_fds": float(fds - redis_conns),
            "triton_fds": float(open_fds(self.triton_pid)),
            "orchestrator_rss_mb": rss_bytes(self.orchestrator_pid) / MB,
            "tritonserver_rss_mb": rss_bytes(self.triton_pid) / MB,
        }
        models = triton_model_processes(self.triton_pid)
        if models != self.model_pids:
            self.model_restarts += 1
        for name, pid in sorted(models.items()):
            out[f"model_rss_mb:{name}"] = rss_bytes(pid) / MB
        metrics = self.scrape()
        out.update({
            "redis_keys": float(self._redis.dbsize()),
            "asyncio_tasks": metrics["vitaserve_asyncio_tasks"],
            "active_sessions": metrics["vitaserve_active_sessions"],
        })
        return out

    def close(self) -> None:
        self._redis.close()


async def settle(sampler: Sampler, baseline: dict[str, float], timeout_s: float,
                 series: tuple[str, ...] = IDLE_SERIES) -> tuple[dict[str, float], float]:
    """Sample once a second until every one of `series` is at or below its baseline, or `timeout_s`;
    returns the last sample and the seconds it took."""
    t0 = time.monotonic()
    now = await asyncio.to_thread(sampler.sample)
    for _ in range(int(timeout_s) + 1):
        if all(now[name] <= baseline[name] for name in series):
            break
        await asyncio.sleep(1.0)
        now = await asyncio.to_thread(sampler.sample)
    return now, time.monotonic() - t0


async def idle_baseline(sampler: Sampler, samples: int = 3) -> dict[str, float]:
    """The idle values of `IDLE_SERIES`: the lowest of a few samples a second apart, taken once the warm-up
    streams are gone and the task gauge (set once a second) has been refreshed. The lowest, so that a
    transient (a connection closing) never raises the baseline the run must return to."""
    await asyncio.sleep(2.0)
    baseline = {name: float("inf") for name in IDLE_SERIES}
    for i in range(samples):
        if i:
            await asyncio.sleep(1.0)
        now = await asyncio.to_thread(sampler.sample)
        baseline = {name: min(baseline[name], now[name]) for name in IDLE_SERIES}
    return baseline


async def run_load(address: str, sampler: Sampler, *, sessions: int, duration_s: float, sample_s: float,
                   seed: int, media: Media, stats: Stats) -> list[tuple[float, dict[str, float]]]:
    """The N clients for `duration_s` (each finishes its running turn and ends its session), sampled every
    `sample_s`; returns the samples as (seconds since the start, values)."""
    samples: list[tuple[float, dict[str, float]]] = []
    t0 = time.monotonic()
    deadline = t0 + duration_s
    clients = asyncio.gather(*(_client(address, i, seed, media, deadline, stats) for i in range(sessions)))
    # On SIGINT/SIGTERM asyncio.run cancels the clients while nobody awaits them: retrieve that outcome
    clients.add_done_callback(lambda f: f.cancelled() or f.exception())
    bound = int((duration_s + TURN_TIMEOUT_S + DRAIN_TIMEOUT_S) / sample_s) + 2
    for _ in range(bound):  # sample until the clients are done (they end at the deadline, bounded)
        samples.append((time.monotonic() - t0, await asyncio.to_thread(sampler.sample)))
        done, _ = await asyncio.wait({clients}, timeout=sample_s)
        if done:
            break
    await clients
    return samples


# ---- the run ----------------------------------------------------------------------------------------------

@dataclass
class SoakStack:
    address: str
    metrics_url: str
    redis_url: str
    orchestrator_pid: int
    triton_pid: int


@contextmanager
def soak_stack(work: Path, checkpoint_dir: str | Path | None, session_ttl_s: float) -> Iterator[SoakStack]:
    """Triton (tiny checkpoint unless given), a Redis and the orchestrator with /metrics; stopped by pid."""
    if checkpoint_dir is None:
        from vitaserve.models.tiny import write_tiny_checkpoint

        checkpoint_dir = write_tiny_checkpoint(work / "ckpt", seed=0)
    with LocalStack(checkpoint_dir, orchestrator=False, work_dir=work / "stack") as stack, \
            RedisServer(work_dir=work / "redis") as redis_server:
        metrics_address = f"127.0.0.1:{free_port()}"
        orchestrator = OrchestratorProcess({
            "VITASERVE_BACKEND": "triton", "VITASERVE_TRITON_URL": stack.triton_url,
            "VITASERVE_MODEL_FAMILY": "vita15", "VITASERVE_SESSION_STORE": "redis",
            "VITASERVE_REDIS_URL": redis_server.url, "VITASERVE_METRICS_ADDRESS": metrics_address,
            "VITASERVE_SESSION_IDLE_TTL_S": str(session_ttl_s),
            "VITASERVE_HEALTH_POLL_S": "0.5",  # SERVING sooner after start; nothing else depends on it
            "VITASERVE_SHUTDOWN_GRACE_S": "2",  # it is stopped after every session has ended
        }, log_path=work / "orchestrator.log").start()
        try:
            assert stack.triton.pid is not None
            yield SoakStack(orchestrator.address, f"http://{metrics_address}/metrics", redis_server.url,
                            orchestrator.pid, stack.triton.pid)
        finally:
            orchestrator.stop()


def analyse(samples: list[tuple[float, dict[str, float]]], duration_s: float) -> dict[str, dict[str, Any]]:
    """Per series: the trend over the second half of the run (up to its deadline: the wind-down while the
    clients finish their last turns would pull every slope down), and the run's first, last and peak."""
    half = [(t, v) for t, v in samples if duration_s / 2 <= t <= duration_s]
    names = sorted({name for _, values in samples for name in values})
    out = {}
    for name in names:
        points = [(t, v[name]) for t, v in half if name in v]
        fitted = trend([t for t, _ in points], [v for _, v in points])
        every = [v[name] for _, v in samples if name in v]
        out[name] = {**fitted.as_dict(), "run_first": round(every[0], 3), "run_last": round(every[-1], 3),
                     "run_max": round(max(every), 3)}
    return out


async def _soak(stack: SoakStack, *, sessions: int, duration_s: float, sample_s: float, seed: int,
                settle_timeout_s: float) -> dict[str, Any]:
    media = Media.examples()
    sampler = await asyncio.to_thread(
        Sampler, orchestrator_pid=stack.orchestrator_pid, triton_pid=stack.triton_pid,
        redis_url=stack.redis_url, metrics_url=stack.metrics_url)
    try:
        fresh = await asyncio.to_thread(sampler.sample)
        warm = Stats()
        t_warm = time.monotonic()
        await warm_up(stack.address, media, warm)
        t_idle = time.monotonic()
        baseline = await idle_baseline(sampler)
        baseline["redis_keys"] = fresh["redis_keys"]  # a fresh Redis: every key is the sessions'
        stats = Stats()
        t0 = time.monotonic()
        samples = await run_load(stack.address, sampler, sessions=sessions, duration_s=duration_s,
                                 sample_s=sample_s, seed=seed, media=media, stats=stats)
        load_s = time.monotonic() - t0
        after, settle_s = await settle(sampler, baseline, settle_timeout_s)
    finally:
        sampler.close()
    series = analyse(samples, duration_s)
    return {
        "clients": sessions, "minutes": round(duration_s / 60, 2), "load_s": round(load_s, 1),
        "sample_s": sample_s, "samples": len(samples), **stats.as_dict(),
        "warm_up_errors": dict(warm.errors),
        "series": series,
        "flagged": sorted(name for name, s in series.items() if s["flagged"]),
        "model_processes": sorted(sampler.model_pids), "model_restarts": sampler.model_restarts,
        "baseline": {k: baseline[k] for k in IDLE_SERIES},
        "after": {k: after[k] for k in IDLE_SERIES},
        "back_to_baseline": {k: after[k] <= baseline[k] for k in IDLE_SERIES},
        # one pooled connection per concurrent command at most: the clients, the warm-up, lease renewals
        "redis_pool_conns_after": after["orchestrator_redis_conns"],
        "redis_pool_bounded": after["orchestrator_redis_conns"] <= sessions + 2,
        "settle_s": round(settle_s, 1),
        "_phases": {"warm_up": round(t_idle - t_warm, 1), "idle_baseline": round(t0 - t_idle, 1),
                    "load": round(load_s, 1), "settle": round(settle_s, 1)},
        "_samples": samples,
    }


def soak(sessions: int = 64, minutes: float = 10.0, *, sample_s: float = 5.0, seed: int = 0,
         session_ttl_s: float = 60.0, checkpoint_dir: str | Path | None = None,
         work_dir: str | Path | None = None) -> dict[str, Any]:
    """Start the stack, run the soak (module docstring), stop everything; returns the report (its
    `_samples` holds the raw series). The wait for idle is bounded by the session TTL plus 30 s."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vitaserve-soak-") as tmp:
        work = Path(work_dir) if work_dir else Path(tmp)
        with soak_stack(work, checkpoint_dir, session_ttl_s) as stack:
            started = time.monotonic()
            report = asyncio.run(_soak(stack, sessions=sessions, duration_s=minutes * 60, sample_s=sample_s,
                                       seed=seed, settle_timeout_s=session_ttl_s + 30))
            stopping = time.monotonic()
    report["phases_s"] = {"start": round(started - t0, 1), **report.pop("_phases"),
                          "stop": round(time.monotonic() - stopping, 1)}
    return report


def _print(report: dict[str, Any]) -> None:
    for key, value in report.items():
        if key not in ("series", "_samples"):
            print(f"{key:20s} {value}")
    print(f"\n{'series (2nd half)':34s} {'first':>10s} {'last':>10s} {'slope/min':>10s} {'±':>8s}  flag")
    for name, s in report["series"].items():
        print(f"{name:34s} {s['run_first']:10.2f} {s['run_last']:10.2f} {s['slope_per_min']:10.3f} "
              f"{s['stderr_per_min']:8.3f}  {'FLAGGED' if s['flagged'] else ''}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=64, help="concurrent clients")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--session-ttl-s", type=float, default=60.0,
                        help="VITASERVE_SESSION_IDLE_TTL_S of the orchestrator (abandoned sessions expire)")
    parser.add_argument("--checkpoint", help="checkpoint directory (default: a tiny one, random weights)")
    parser.add_argument("--series-out", help="write the raw samples here (JSON)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.minutes <= 0 or args.sample_s <= 0:
        parser.error("--sessions, --minutes and --sample-s must be positive")
    report = soak(args.sessions, args.minutes, sample_s=args.sample_s, seed=args.seed,
                  session_ttl_s=args.session_ttl_s, checkpoint_dir=args.checkpoint)
    samples = report.pop("_samples")
    if args.series_out:
        Path(args.series_out).write_text(json.dumps([{"t_s": round(t, 2), **v} for t, v in samples]))
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    ok = (report["errors_total"] == 0 and not report["flagged"] and all(report["back_to_baseline"].values())
          and report["redis_pool_bounded"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_main(main))  # SIGINT/SIGTERM stop everything it started, then exit
