"""A hypothesis state machine that fuzzes the Realtime gateway's WebSocket (the client side of the OpenAI
Realtime protocol) against the live small-family stack, as tests/fuzz/converse_machine.py fuzzes the
Converse stream.

Each example is one client: random JSON events (every client event type the protocol has, with random or
missing fields, plus unknown types), raw garbage text and binary frames, audio appends of random lengths
(odd ones too), commits, clears, responses created and cancelled at random moments, truncates and deletes
of known and unknown items, images that are valid, corrupt or not base64, oversized messages, and
reconnects. Meanwhile a canary socket talks turn after turn.

Invariants: the gateway process is alive; every message it sends is a JSON object with a `type` and an
`event_id`; every `error` event has a type, a code and a message; a socket the gateway closes is closed
with a documented code (1000, 1008, 1009, 1012, 1013), never 1011 (an internal error); the canary's turns
all complete, and it completes one more after the fuzzing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import websockets
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "fuzz"))
from converse_machine import STEP_TIMEOUT_S, VALID_PNG, LoopThread  # noqa: E402

CLOSE_CODES = {1000, 1008, 1009, 1012, 1013}
CLIENT_TYPES = ["session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                "input_audio_buffer.clear", "conversation.item.create", "conversation.item.retrieve",
                "conversation.item.truncate", "conversation.item.delete", "response.create",
                "response.cancel",
                "output_audio_buffer.clear", "transcription_session.update", "response.explode"]
TURN_TIMEOUT_S = 90.0


@dataclass
class RealtimeFindings:
    sequences: int = 0
    steps: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    close_codes: dict[int, int] = field(default_factory=dict)
    responses_done: int = 0
    canary_turns: int = 0
    violations: list[str] = field(default_factory=list)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
item_ids = st.sampled_from(["known", "item_missing", "", None])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Socket:
    """One raw WebSocket to /v1/realtime: sends anything, records every message and how it closed."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.messages: list[Any] = []  # parsed JSON, or the raw text if it did not parse
        self.close_code: int | None = None
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, url: str) -> Socket:
        ws = await websockets.connect(url, max_size=None, open_timeout=STEP_TIMEOUT_S)
        return cls(ws)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                try:
                    self.messages.append(json.loads(raw))
                except (TypeError, ValueError):
                    self.messages.append(raw)
                self._changed.set()
        except websockets.ConnectionClosed:
            pass
        self.close_code = self.ws.close_code if self.ws.close_code is not None else -1
        self._changed.set()

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    async def send(self, message: str | bytes) -> None:
        if self.closed:
            return
        try:
            await self.ws.send(message)
        except websockets.ConnectionClosed:
            pass

    async def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while not predicate() and not self.closed:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return predicate()
        return True

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.wait_for(asyncio.shield(self._reader), STEP_TIMEOUT_S)

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.messages if isinstance(m, dict) and m.get("type") == kind]


class RealtimeFuzz(RuleBasedStateMachine):
    """One fuzzing client of the gateway; `url`, `loop`, `alive`, `max_message_bytes` and `findings` are set
    on the class by `run_realtime_fuzz`."""

    url: str
    loop: LoopThread
    alive: Callable[[], bool]
    max_message_bytes: int
    findings: RealtimeFindings

    def __init__(self) -> None:
        super().__init__()
        self.sockets: list[Socket] = []
        self.oversized_sent = False
        self.findings.sequences += 1
        self._connect()

    @property
    def socket(self) -> Socket:
        return self.sockets[-1]

    def _run(self, coro: Any, timeout: float = STEP_TIMEOUT_S) -> Any:
        self.findings.steps += 1
        try:
            return self.loop.run(coro, timeout)
        except AssertionError as exc:  # hung
            self._check(False, f"{sys._getframe(1).f_code.co_name}: {exc}")

    def _connect(self) -> None:
        sock = self._run(Socket.open(self.url))
        self._check(self._run(sock.wait(lambda: bool(sock.messages), STEP_TIMEOUT_S)), "no session.created")
        self._check(sock.of("session.created"),
                    f"the first event is not session.created: {sock.messages[:1]}")
        self.sockets.append(sock)

    def _send(self, event: dict | str | bytes) -> None:
        self._run(self.socket.send(json.dumps(event) if isinstance(event, dict) else event))

    def _known_item(self) -> str:
        for m in reversed(self.socket.messages):
            if isinstance(m, dict) and m.get("type") == "conversation.item.added":
                return m.get("item", {}).get("id", "item_x")
        return "item_x"

    # -- rules --------------------------------------------------------------------------------------------
    @precondition(lambda self: not self.socket.closed)
    @rule(kind=st.sampled_from(CLIENT_TYPES), fields=st.dictionaries(
        st.sampled_from(["session", "audio", "item", "item_id", "content_index", "audio_end_ms", "response",
                         "previous_item_id", "event_id", "type"]), json_values, max_size=4))
    def random_event(self, kind: str, fields: dict) -> None:
        self._send({"type": kind, **fields} if "type" not in fields else fields)

    @precondition(lambda self: not self.socket.closed)
    @rule(data=st.one_of(st.binary(max_size=64), st.text(max_size=64)))
    def garbage(self, data: bytes | str) -> None:
        self._send(data)

    @precondition(lambda self: not self.socket.closed)
    @rule(pcm=st.binary(max_size=9600))
    def append_audio(self, pcm: bytes) -> None:
        self._send({"type": "input_audio_buffer.append", "audio": b64(pcm)})

    @precondition(lambda self: not self.socket.closed)
    @rule(kind=st.sampled_from(["input_audio_buffer.commit", "input_audio_buffer.clear", "response.create",
                                "response.cancel"]))
    def control(self, kind: str) -> None:
        self._send({"type": kind})

    @precondition(lambda self: not self.socket.closed)
    @rule(image=st.sampled_from(["none", "valid", "corrupt", "not_base64"]), respond=st.booleans())
    def talk(self, image: str, respond: bool) -> None:
        content: list[dict] = [{"type": "input_text", "text": "What is in the picture?"}]
        if image != "none":
            data = {"valid": b64(VALID_PNG), "corrupt": b64(VALID_PNG[:40]), "not_base64": "%%%"}[image]
            content.append({"type": "input_image", "image_url": f"data:image/png;base64,{data}"})
        self._send({"type": "conversation.item.create",
                    "item": {"type": "message", "role": "user", "content": content}})
        if respond:
            self._send({"type": "response.create"})
            self.settle()

    @precondition(lambda self: not self.socket.closed)
    @rule(which=item_ids, end=st.integers(-5, 10**7))
    def truncate_or_delete(self, which: str | None, end: int) -> None:
        item = self._known_item() if which == "known" else which
        self._send({"type": "conversation.item.truncate", "item_id": item, "content_index": 0,
                    "audio_end_ms": end})
        self._send({"type": "conversation.item.delete", "item_id": item})

    @precondition(lambda self: not self.socket.closed)
    @rule(session=st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["realtime", "transcription", "x"]),
        "output_modalities": st.sampled_from([["text"], ["audio"], ["text", "audio"], [], ["x"]]),
        "instructions": st.text(max_size=30),
        "audio": st.sampled_from([{"input": {"turn_detection": None}},
                                  {"input": {"turn_detection": {"type": "server_vad", "threshold": 2.0}}},
                                  {"input": {"format": {"type": "audio/pcm", "rate": 8000}}},
                                  {"output": {"voice": "nobody"}}]),
        "max_output_tokens": st.sampled_from([1, 4, "inf", 0, -1, 10**9]),
    }))
    def session_update(self, session: dict) -> None:
        self._send({"type": "session.update", "session": session})

    @precondition(lambda self: not self.socket.closed and not self.oversized_sent)
    @rule()
    def oversized(self) -> None:
        """Over the gateway's message limit: the socket is closed with 1009 (once an example: it is slow)."""
        self.oversized_sent = True
        self._send({"type": "input_audio_buffer.append", "audio": "A" * (self.max_message_bytes + 16)})
        sock = self.socket
        self._run(sock.wait(lambda: sock.closed, STEP_TIMEOUT_S), STEP_TIMEOUT_S + 5)
        self._check(sock.close_code == 1009, f"an oversized message closed the socket with {sock.close_code}")

    @rule()
    def reconnect(self) -> None:
        self._run(self.socket.close())
        self._connect()

    @precondition(lambda self: not self.socket.closed)
    @rule()
    def settle(self) -> None:
        """Every response.created gets its response.done within the bound: nothing hangs."""
        sock = self.socket

        def finished() -> bool:
            return len(sock.of("response.done")) >= len(sock.of("response.created"))

        self._check(self._run(sock.wait(finished, TURN_TIMEOUT_S), TURN_TIMEOUT_S + 5),
                    "a response never finished")

    # -- invariants ---------------------------------------------------------------------------------------
    def _check(self, ok: object, message: str) -> None:
        """A violated invariant: recorded at once (a live service may not replay it exactly), then raised."""
        if not ok:
            if message not in self.findings.violations:
                self.findings.violations.append(message)
            raise AssertionError(message)

    @invariant()
    def gateway_alive(self) -> None:
        self._check(self.alive(), "the gateway process died")

    @invariant()
    def well_formed_events_and_documented_closes(self) -> None:
        for sock in self.sockets:
            for m in sock.messages:
                self._check(isinstance(m, dict) and isinstance(m.get("type"), str) and m.get("event_id"),
                            f"not a server event: {str(m)[:200]}")
                if m["type"] == "error":
                    err = m.get("error") or {}
                    self._check(err.get("type") and err.get("code") and err.get("message"), f"bad error: {m}")
            if sock.closed:
                self._check(sock.close_code in CLOSE_CODES, f"closed with {sock.close_code}")

    def teardown(self) -> None:
        for sock in self.sockets:
            if not sock.closed:
                self._run(sock.close())
            for m in sock.messages:
                if isinstance(m, dict) and m.get("type") == "error":
                    code = str((m.get("error") or {}).get("code"))
                    self.findings.error_codes[code] = self.findings.error_codes.get(code, 0) + 1
            self.findings.close_codes[sock.close_code] = self.findings.close_codes.get(sock.close_code, 0) + 1
            self.findings.responses_done += len(sock.of("response.done"))


class RealtimeCanary:
    """A socket that asks a typed question, waits for response.done, and asks again."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.turns = 0
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _talk(self) -> None:
        sock = await Socket.open(self.url)
        await sock.send(json.dumps({"type": "session.update", "session": {"type": "realtime",
                                                                         "output_modalities": ["text"],
                                                                         "max_output_tokens": 8}}))
        try:
            while not self._stop.is_set():
                n = len(sock.of("response.done"))
                await sock.send(json.dumps({"type": "conversation.item.create", "item": {
                    "type": "message", "role": "user",
                    "content": [{"type": "input_text", "text": "Hello?"}]}}))
                await sock.send(json.dumps({"type": "response.create"}))
                await sock.wait(lambda: len(sock.of("response.done")) > n, TURN_TIMEOUT_S)
                done = sock.of("response.done")[n:]
                if not done or done[0]["response"]["status"] != "completed" or sock.closed:
                    self.failures.append(f"turn {self.turns}: {done[:1]} closed={sock.close_code}")
                    return
                self.turns += 1
                try:
                    await asyncio.wait_for(self._stop.wait(), 0.5)
                except TimeoutError:
                    pass
        finally:
            await sock.close()

    def start(self, loop: LoopThread) -> None:
        async def begin() -> None:
            self._task = asyncio.get_running_loop().create_task(self._talk())
        loop.run(begin())

    def finish(self, loop: LoopThread) -> None:
        """One more completed turn (the gateway still answers after the fuzzing), then stop."""
        target = self.turns + 1

        async def end() -> None:
            while self.turns < target and self._task is not None and not self._task.done():
                await asyncio.sleep(0.05)
            self._stop.set()
            if self._task is not None:
                await self._task
        loop.run(end(), TURN_TIMEOUT_S * 2)
        if self.turns < target and not self.failures:
            self.failures.append("no canary turn completed after the fuzzing")


def run_realtime_fuzz(url: str, *, alive: Callable[[], bool], max_message_bytes: int, sequences: int,
                      steps: int, derandomize: bool = True, deadline_s: float | None = None, chunk: int = 25,
                      findings: RealtimeFindings | None = None) -> RealtimeFindings:
    """As `converse_machine.run_fuzz`, for the gateway: `sequences` examples in runs of `chunk` (none started
    past `deadline_s`), violations recorded as they happen and raised."""
    findings = findings if findings is not None else RealtimeFindings()
    loop = LoopThread()
    canary = RealtimeCanary(url)
    canary.start(loop)
    started = time.monotonic()

    class Machine(RealtimeFuzz):
        pass

    Machine.url, Machine.loop, Machine.findings = url, loop, findings
    Machine.alive = staticmethod(alive)
    Machine.max_message_bytes = max_message_bytes
    try:
        done = 0
        while done < sequences and (deadline_s is None or time.monotonic() - started < deadline_s):
            n = min(chunk, sequences - done) if not derandomize else sequences - done
            config = settings(max_examples=n, stateful_step_count=steps, deadline=None,
                              derandomize=derandomize, database=None, phases=[Phase.generate, Phase.shrink],
                              suppress_health_check=list(HealthCheck))
            run_state_machine_as_test(Machine, settings=config)
            done += n
    finally:
        try:
            canary.finish(loop)
        finally:
            findings.canary_turns = canary.turns
            findings.violations.extend(f"canary: {f}" for f in canary.failures)
            loop.close()
    return findings
