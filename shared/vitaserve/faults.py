"""Fault injection for the fault tests (`tests/faults/`) and `bench/faults.py`: the same scenarios, so the
figures a benchmark prints are the behaviour a test asserts.

- `KillableTriton`: a local `tritonserver` that can be SIGKILLed with its Python model stubs (its whole
  process group: the stubs are the server's children in its session) and restarted on the same ports,
  as a crashed pod comes back at the same address.
- `reply_then_kill`: start a reply on an open `Conversation`, kill something once its first text delta
  arrived, and time the client's error event (the turn fails; the stream stays open).
- `turn_until_done`: retry a turn on the same stream until it completes (bounded in count and time).
- `StalledClient`: a Converse call that sends a turn and never reads the response stream (gRPC flow
  control then blocks the server's writes); `rss_kib(pid)` reads a process's resident memory.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.api.v1 import orchestrator_pb2_grpc as pb_grpc
from vitaserve.client import Conversation
from vitaserve.triton.launcher import TritonServer, group_processes

# Events that end a turn as the client sees it.
TURN_END = ("response_done", "error", "interrupted")


def rss_kib(pid: int) -> int:
    """Resident set size of process `pid` in KiB (/proc/<pid>/status VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(f"no VmRSS for pid {pid}")


class KillableTriton:
    """A `TritonServer` of `models` that `kill()` SIGKILLs (server and stubs, by process group) and
    `restart()` brings back on the same ports. Each start logs to its own file under `work_dir`;
    `served(request_id)` searches all of them."""

    def __init__(self, model_repository: str | os.PathLike[str], *, models: Sequence[str] | None,
                 work_dir: Path, name: str, env: Mapping[str, str], startup_timeout_s: float = 180.0) -> None:
        self.model_repository = model_repository
        self.models = None if models is None else list(models)
        self.work_dir = work_dir
        self.name = name
        self.env = dict(env)
        self.startup_timeout_s = startup_timeout_s
        self.server: TritonServer | None = None
        self.ports = {"http_port": 0, "grpc_port": 0, "metrics_port": 0}  # 0: free ports on the first start
        self.starts = 0
        self.logs: list[Path] = []

    @property
    def grpc_url(self) -> str:
        assert self.server is not None
        return self.server.grpc_url

    def running(self) -> bool:
        return self.server is not None and self.server.is_running()

    def start(self) -> KillableTriton:
        """Start (again, on the ports of the first start); returns once every model is ready."""
        assert not self.running(), "already running"
        self.starts += 1
        log = self.work_dir / f"{self.name}-{self.starts}.log"
        self.logs.append(log)
        server = TritonServer(self.model_repository, models=self.models, work_dir=self.work_dir / self.name,
                              log_path=log, env=self.env, startup_timeout=self.startup_timeout_s,
                              **self.ports)
        server.start()
        self.server = server
        self.ports = {"http_port": server.ports["http"], "grpc_port": server.ports["grpc"],
                      "metrics_port": server.ports["metrics"]}
        return self

    restart = start

    def kill(self, timeout_s: float = 10.0) -> list[int]:
        """SIGKILL the server's process group (the server and its stub processes) at once, wait until none
        of them lives (bounded), then reap it; returns the pids that were killed."""
        assert self.server is not None and self.server.pid is not None
        pgid = self.server.pid  # the server leads its own session and process group
        victims = group_processes(pgid)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout_s
        while group_processes(pgid) and time.monotonic() < deadline:
            time.sleep(0.02)
        left = group_processes(pgid)
        if left:
            raise RuntimeError(f"{self.name}: processes {left} of group {pgid} outlived SIGKILL")
        self.server.stop(timeout=timeout_s)  # reaps the server, removes its shared-memory regions
        return victims

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def served(self, request_id: str) -> bool:
        """Whether one of this server's starts logged the end of llm_decoder request `request_id`."""
        line = re.compile(rf"llm_decoder request_id='{re.escape(request_id)}' ")
        return any(line.search(p.read_text(errors="replace")) for p in self.logs if p.exists())


# ------------------------------------------------------------------------------------------------
# Turns on an open Conversation


@dataclass
class KillOutcome:
    """What the client saw after `kill` ran during a reply: the event that ended the turn (an
    `error` event, or `response_done` if the reply beat the kill), seconds from the kill to it, and
    the text deltas that arrived before the kill."""

    end: pb.ServerEvent
    kill_to_end_s: float
    deltas_before_kill: int
    response_id: str
    killed: list[int] = field(default_factory=list)


async def reply_then_kill(conv: Conversation, text: str, kill: Callable[[], list[int] | None], *,
                          deadline_s: float) -> KillOutcome:
    """Send `text`, wait for the reply's first text delta, run `kill` (in a thread: it blocks until the
    processes are gone), and read until the turn ends; at most `deadline_s` for each wait."""
    await conv.send_text(text)
    deltas, response_id = 0, ""
    async with asyncio.timeout(deadline_s):
        while True:
            event = await conv.next_event()
            kind = event.WhichOneof("event")
            if kind == "text_delta":
                deltas, response_id = deltas + 1, event.response_id
                break
            if kind in TURN_END:
                raise AssertionError(f"the turn ended before its first text delta: {event}")
    t0 = time.monotonic()
    killed = await asyncio.to_thread(kill) or []
    async with asyncio.timeout(deadline_s):
        while True:
            event = await conv.next_event()
            if event.WhichOneof("event") in TURN_END:
                return KillOutcome(event, time.monotonic() - t0, deltas, response_id, killed)


@dataclass
class TurnResult:
    """`turn_until_done`: the completed turn's events, how many attempts it took, the errors of the failed
    ones, and seconds from the call to the completion."""

    events: list[pb.ServerEvent]
    attempts: int
    errors: list[str]
    seconds: float

    @property
    def done(self) -> pb.ServerEvent:
        return self.events[-1]


async def turn_until_done(conv: Conversation, text: str, *, attempts: int = 200, pause_s: float = 0.2,
                          deadline_s: float = 60.0) -> TurnResult:
    """Send `text` until a turn ends with `response_done` (a retry after each error event), at most
    `attempts` times within `deadline_s`; raises TimeoutError otherwise."""
    t0 = time.monotonic()
    errors: list[str] = []
    async with asyncio.timeout(deadline_s):
        for attempt in range(1, attempts + 1):
            await conv.send_text(text)
            events: list[pb.ServerEvent] = []
            while True:
                events.append(await conv.next_event())
                if events[-1].WhichOneof("event") in TURN_END:
                    break
            if events[-1].WhichOneof("event") == "response_done":
                return TurnResult(events, attempt, errors, time.monotonic() - t0)
            errors.append(f"{events[-1].error.code}: {events[-1].error.message}")
            await asyncio.sleep(pause_s)
    raise TimeoutError(f"no completed turn in {attempts} attempts: {errors[-3:]}")


# ------------------------------------------------------------------------------------------------
# A client that never reads


class StalledClient:
    """One Converse call that writes a session update and a turn and then does not read (its receive
    window fills, and the server's writes block). `drain()` reads on afterwards: the events the
    transport held, then the status the server ended the stream with."""

    def __init__(self, address: str, settings: pb.SessionSettings) -> None:
        # No BDP probing: the receive window stays at its initial 64 KiB instead of growing, so the
        # server's writes block after a few dozen events rather than several MiB (the same behaviour,
        # reached sooner).
        self._channel = grpc.aio.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])
        self._settings = settings
        self.call: grpc.aio.StreamStreamCall | None = None

    async def start(self, *texts: str, flood: int = 0) -> None:
        """Open the call and write the session update, then `texts` (one turn each), then `flood` events
        carrying nothing (each is answered by an INVALID_ARGUMENT error event); never read."""
        self.call = pb_grpc.OrchestratorStub(self._channel).Converse()
        await self.call.write(pb.ClientEvent(session_update=pb.SessionUpdate(settings=self._settings)))
        for text in texts:
            await self.call.write(pb.ClientEvent(text=pb.TextInput(text=text)))
        for i in range(flood):
            await self.call.write(pb.ClientEvent(event_id=f"empty-{i}"))

    async def drain(self, timeout_s: float) -> tuple[list[pb.ServerEvent], grpc.StatusCode, str]:
        """Read everything that is left; the events and the call's final status code and details."""
        assert self.call is not None
        events: list[pb.ServerEvent] = []
        async with asyncio.timeout(timeout_s):
            try:
                while (msg := await self.call.read()) is not grpc.aio.EOF:
                    events.append(msg)
            except grpc.aio.AioRpcError:
                pass  # the status, below
            code = await self.call.code()
            details = await self.call.details()
        return events, code, details or ""

    async def close(self) -> None:
        await self._channel.close()


class RssSampler:
    """Samples `rss_kib(pid)` every `interval_s` in a thread until stopped; `peak_kib`, `samples`."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(rss_kib(self.pid))
            except (OSError, LookupError):
                return  # the process is gone
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak_kib(self) -> int:
        return max(self.samples, default=0)
