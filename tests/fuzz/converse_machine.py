"""A hypothesis state machine that fuzzes the orchestrator's Converse stream against a live deployment.

Each example is one client of tenant "alpha" doing random things in a random order: opening a stream with
random (often invalid) settings or with the wrong first event, sending random text, audio bytes at random
rates, corrupt or valid images, camera frames with NaN timestamps, huge messages, commits, interrupts and
playback reports at random moments, settings changes mid-stream, deletes of known and unknown turns,
abrupt and polite reconnects with the same session id (several in a burst), and tenant "beta" trying to
resume alpha's session. Meanwhile a canary session of tenant "beta" talks turn after turn in the
background (`Canary`).

The invariants, checked after every step and at the end of each example:
- the orchestrator process is alive and every wait returned within its bound (nothing hangs);
- every ErrorEvent and every status that ends a stream carries a documented code (never INTERNAL or
  UNKNOWN) and a message;
- the other concurrent session (the canary) is unaffected: every one of its turns completes, no errors;
- history is consistent: reopened at the end, the session's history holds only turns this client saw
  started and did not delete, each reply a prefix of what that response streamed.

`FuzzTarget` says where the deployment is; `run_fuzz(target, sequences=N, steps=K)` runs N examples (used
by tests/fuzz/test_converse_fuzz.py with a short budget, and by bench/fuzz.py for long runs).
"""

from __future__ import annotations

import asyncio
import io
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
import hypothesis.strategies as st
import numpy as np
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from PIL import Image

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.api.v1 import orchestrator_pb2_grpc as pb_grpc
from vitaserve.families.base import clean_history_text

# Codes the API documents (orchestrator.proto's header, README). INTERNAL / UNKNOWN are bugs.
DOCUMENTED = {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
              "UNAUTHENTICATED", "ABORTED", "CANCELLED", "DEADLINE_EXCEEDED"}
STEP_TIMEOUT_S = 30.0  # any single wait; past it the service counts as hung
SETTLE_TIMEOUT_S = 60.0  # a running response must end within this once nothing else is sent
# A reply is at most this long on the fuzz deployment (VITASERVE_MAX_REPLY_TOKENS_LIMIT): keeps examples fast.
MAX_TOKENS = 6


@dataclass
class FuzzTarget:
    """A running orchestrator: its address, a liveness check, and the keys of two tenants."""

    address: str
    alpha_key: str
    beta_key: str
    alive: Callable[[], bool]
    max_message_bytes: int  # alpha's limit (the orchestrator's keys file)
    grpc_max_message_bytes: int  # the server's gRPC limit (VITASERVE_GRPC_MAX_MESSAGE_BYTES)


@dataclass
class Findings:
    """What the runs saw: counts by kind, and violations (each a short text)."""

    sequences: int = 0
    steps: int = 0
    error_codes: Counter = field(default_factory=Counter)
    end_codes: Counter = field(default_factory=Counter)
    end_details: dict[str, str] = field(default_factory=dict)  # one example message per code
    turns: int = 0
    canary_turns: int = 0
    canary_turn_s: list[float] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)


class LoopThread:
    """An asyncio loop in a thread of its own: the machine's rules are synchronous."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = STEP_TIMEOUT_S) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise AssertionError(f"hung: no answer within {timeout:.0f} s") from None

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class Stream:
    """One raw Converse call: writes anything, records every event and how the call ended."""

    def __init__(self, channel: grpc.aio.Channel, key: str | None) -> None:
        metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self.call = pb_grpc.OrchestratorStub(channel).Converse(metadata=metadata)
        self.events: list[pb.ServerEvent] = []
        self.code: str | None = None  # the final status code name once the call ended
        self.details = ""
        self.left = False  # the client closed it (cancelled or half-closed) while it was open
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                event = await self.call.read()
                if event is grpc.aio.EOF:
                    break
                self.events.append(event)
                self._changed.set()
        except grpc.aio.AioRpcError:
            pass
        except asyncio.CancelledError:
            pass
        code = await self.call.code()
        self.code = code.name
        self.details = await self.call.details() or ""
        self._changed.set()

    @property
    def ended(self) -> bool:
        return self.code is not None

    async def send(self, event: pb.ClientEvent) -> bool:
        """False if the call had ended (the write is refused)."""
        if self.ended:
            return False
        try:
            await self.call.write(event)
            return True
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            return False

    async def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Until `predicate()` holds or the call ended; False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate() and not self.ended:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return predicate()
        return True

    async def close(self, *, abrupt: bool) -> None:
        self.left = self.left or not self.ended
        if abrupt:
            self.call.cancel()
        else:
            try:
                await self.call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                pass
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), STEP_TIMEOUT_S)
        except TimeoutError:
            raise AssertionError(f"a closed stream did not end within {STEP_TIMEOUT_S:.0f} s") from None


def _png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


VALID_PNG = _png(64, 48, 0)
SPEECH = np.clip(np.sin(np.arange(16000) * 2 * math.pi * 220 / 16000) * 8000, -32768, 32767).astype("<i2")

texts = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.sampled_from(["", " ", "\0", "Hello?", "☞☜☟", "<image>", "<audio>", "<|im_end|>", "x" * 9000]),
)
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
image_bytes = st.one_of(
    st.just(VALID_PNG),
    st.binary(max_size=256),
    st.builds(lambda n: VALID_PNG[:n], st.integers(0, len(VALID_PNG) - 1)),  # truncated
    st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", _png(1, 1, 1), _png(2000, 4, 2)]),
)
pcm = st.one_of(
    st.binary(max_size=4000),
    st.builds(lambda n: SPEECH[: n].tobytes(), st.integers(0, len(SPEECH))),
)
rates = st.sampled_from([16000, 16000, 16000, 0, 8000, 44100, 4294967295])
barge_in = st.one_of(
    st.none(),
    st.builds(
        lambda en, th, ms, mode, rs: pb.BargeInSettings(enabled=en, threshold=th, min_speech_ms=ms,
                                                        in_flight=mode, resume_silence_ms=rs),
        st.booleans(), floats32, st.integers(0, 4294967295),
        st.sampled_from(["", "pause", "continue", "bogus"]),
        st.integers(0, 100000),
    ),
)


@st.composite
def session_settings(draw: st.DrawFn) -> pb.SessionSettings:
    """Mostly settings a client would send (so examples get to talk), one time in four anything at all."""
    wild = draw(st.integers(0, 3)) == 0
    if not wild:
        s = pb.SessionSettings(
            turn_detection=draw(st.sampled_from(["manual", "manual", "vad"])),
            want_audio=draw(st.booleans()),
            max_reply_tokens=draw(st.sampled_from([1, 2, MAX_TOKENS])),
            temperature=draw(st.sampled_from([0.0, 0.8])),
            seed=draw(st.integers(0, 2**64 - 1)),
            playout_lead_ms=3_600_000,  # unpaced (a client that writes a file): pacing only makes it slow
        )
        if draw(st.booleans()):
            s.barge_in.CopyFrom(pb.BargeInSettings(enabled=draw(st.booleans()),
                                                   min_speech_ms=draw(st.sampled_from([0, 200, 500]))))
        return s
    s = pb.SessionSettings(
        turn_detection=draw(st.sampled_from(["manual", "vad", "", "bogus"])),
        want_audio=draw(st.booleans()),
        text_only=draw(st.booleans()),
        max_reply_tokens=draw(st.sampled_from([1, MAX_TOKENS, 0, 4294967295])),
        temperature=draw(st.one_of(st.just(0.0), floats32)),
        seed=draw(st.integers(0, 2**64 - 1)),
        system_prompt=draw(st.one_of(st.just(""), texts)),
        vad_threshold=draw(st.one_of(st.just(0.0), floats32)),
        vad_min_silence_ms=draw(st.sampled_from([0, 1, 200, 4294967295])),
    )
    s.playout_lead_ms = draw(st.sampled_from([3_600_000, 0, 4294967295]))
    policy = draw(barge_in)
    if policy is not None:
        s.barge_in.CopyFrom(policy)
    return s


class ConverseFuzz(RuleBasedStateMachine):
    """One fuzzing client of tenant alpha (see the module docstring). `target`, `loop`, `channel` and
    `findings` are set on the class by `run_fuzz`."""

    target: FuzzTarget
    loop: LoopThread
    channel: grpc.aio.Channel
    findings: Findings

    def __init__(self) -> None:
        super().__init__()
        self.stream: Stream | None = None
        self.session_id = ""
        self.closed_streams: list[Stream] = []
        self.turns: dict[str, str] = {}  # turn_id -> response_id, of every turn_started seen
        self.deleted: set[str] = set()  # turn ids whose TurnDeleted arrived
        self.refused_opens = 0
        self.trail: list[str] = []
        self.findings.sequences += 1

    # -- helpers ------------------------------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float = STEP_TIMEOUT_S) -> Any:
        self.findings.steps += 1
        self.trail.append(sys._getframe(1).f_code.co_name)  # the rule: named in a violation's message
        try:
            return self.loop.run(coro, timeout)
        except AssertionError as exc:  # hung, or a wait inside the coroutine failed
            self._violation(str(exc))

    def _send(self, event: pb.ClientEvent) -> None:
        assert self.stream is not None
        self._run(self.stream.send(event))

    def _all_streams(self) -> list[Stream]:
        return [*self.closed_streams, *([self.stream] if self.stream else [])]

    def _known_responses(self) -> list[str]:
        return sorted(set(self.turns.values())) or ["resp-unknown"]

    def _drop_stream(self) -> None:
        if self.stream is not None:
            self.closed_streams.append(self.stream)
            self.stream = None

    def _record(self, stream: Stream) -> None:
        for e in stream.events:
            if e.WhichOneof("event") == "turn_started":
                self.turns[e.turn_id] = e.response_id
            elif e.WhichOneof("event") == "turn_deleted":
                self.deleted.add(e.turn_id)

    async def _open(self, key: str | None, first: pb.ClientEvent) -> Stream:
        stream = Stream(self.channel, key)
        await stream.send(first)
        ok = await stream.wait(lambda: any(e.WhichOneof("event") == "session_started" for e in stream.events),
                               STEP_TIMEOUT_S)
        self._check(ok, "no session_started (nor an end of the stream) after the first event")
        return stream

    # -- rules --------------------------------------------------------------------------------------------
    @precondition(lambda self: self.stream is None)
    @rule(s=session_settings(), resume=st.booleans())
    def open_stream(self, s: pb.SessionSettings, resume: bool) -> None:
        sid = self.session_id if resume else ""
        update = pb.ClientEvent(session_update=pb.SessionUpdate(session_id=sid, settings=s))
        stream = self._run(self._open(self.target.alpha_key, update))
        self.stream = stream
        started = [e for e in stream.events if e.WhichOneof("event") == "session_started"]
        if started:
            self.session_id = started[0].session_id
        else:
            self._drop_stream()  # refused (bad settings, or a session another stream just took over)

    @precondition(lambda self: self.stream is None and self.refused_opens < 2)
    @rule(first=st.sampled_from(["text", "audio", "commit", "interrupt", "empty"]))
    def open_without_session_update(self, first: str) -> None:
        self.refused_opens += 1
        event = {"text": pb.ClientEvent(text=pb.TextInput(text="hi")),
                 "audio": pb.ClientEvent(audio=pb.AudioChunk(pcm16=b"\0\0" * 160, sample_rate=16000)),
                 "commit": pb.ClientEvent(commit=pb.Commit()),
                 "interrupt": pb.ClientEvent(interrupt=pb.Interrupt()),
                 "empty": pb.ClientEvent()}[first]
        stream = self._run(self._open(self.target.alpha_key, event))
        self._run(stream.close(abrupt=False))
        self._check(stream.code == "INVALID_ARGUMENT", f"{first} first: {stream.code} {stream.details!r}")
        self.closed_streams.append(stream)

    @precondition(lambda self: self.stream is not None)
    @rule(text=texts, defer=st.booleans())
    def send_text(self, text: str, defer: bool) -> None:
        self._send(pb.ClientEvent(event_id="text", text=pb.TextInput(text=text, defer_commit=defer)))

    @precondition(lambda self: self.stream is not None)
    @rule(image=st.booleans(), defer=st.booleans())
    def talk(self, image: bool, defer: bool) -> None:
        """What a client mostly does: a question, with a picture now and then, committed now or later."""
        if image:
            self._send(pb.ClientEvent(event_id="talk-image", image=pb.Image(data=VALID_PNG)))
        question = pb.TextInput(text="What do you see?", defer_commit=defer)
        self._send(pb.ClientEvent(event_id="talk", text=question))
        if defer:
            self._send(pb.ClientEvent(event_id="talk-commit", commit=pb.Commit()))

    @precondition(lambda self: self.stream is not None)
    @rule(data=pcm, rate=rates)
    def send_audio(self, data: bytes, rate: int) -> None:
        self._send(pb.ClientEvent(event_id="audio", audio=pb.AudioChunk(pcm16=data, sample_rate=rate)))

    @precondition(lambda self: self.stream is not None)
    @rule(data=image_bytes, tiles=st.sampled_from([0, 1, 2, 12, 13, 4294967295]))
    def send_image(self, data: bytes, tiles: int) -> None:
        self._send(pb.ClientEvent(event_id="image", image=pb.Image(data=data, max_tiles=tiles)))

    @precondition(lambda self: self.stream is not None)
    @rule(data=image_bytes, ts=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(1.0)))
    def send_frame(self, data: bytes, ts: float) -> None:
        self._send(pb.ClientEvent(event_id="frame", video_frame=pb.VideoFrame(data=data, timestamp_s=ts)))

    @precondition(lambda self: self.stream is not None)
    @rule()
    def commit(self) -> None:
        self._send(pb.ClientEvent(event_id="commit", commit=pb.Commit()))

    @precondition(lambda self: self.stream is not None)
    @rule(which=st.sampled_from(["", "known", "random"]))
    def interrupt(self, which: str) -> None:
        rid = {"": "", "known": self._known_responses()[-1], "random": "resp-does-not-exist"}[which]
        self._send(pb.ClientEvent(event_id="interrupt", interrupt=pb.Interrupt(response_id=rid)))

    @precondition(lambda self: self.stream is not None)
    @rule(which=st.sampled_from(["known", "random", ""]), played=st.integers(0, 4294967295))
    def playback(self, which: str, played: int) -> None:
        rid = {"": "", "known": self._known_responses()[-1], "random": "resp-x"}[which]
        position = pb.PlaybackPosition(response_id=rid, played_ms=played)
        self._send(pb.ClientEvent(event_id="playback", playback=position))

    @precondition(lambda self: self.stream is not None)
    @rule()
    def clear_input(self) -> None:
        self._send(pb.ClientEvent(event_id="clear", clear_input=pb.ClearInput()))

    @precondition(lambda self: self.stream is not None)
    @rule(which=st.sampled_from(["known", "random", ""]))
    def delete_turn(self, which: str) -> None:
        tid = {"": "", "known": (sorted(self.turns) or ["turn-x"])[0], "random": "turn-does-not-exist"}[which]
        self._send(pb.ClientEvent(event_id="delete", delete_turn=pb.DeleteTurn(turn_id=tid)))

    @precondition(lambda self: self.stream is not None)
    @rule(s=session_settings(), sid=st.sampled_from(["same", "other", ""]))
    def update_settings(self, s: pb.SessionSettings, sid: str) -> None:
        session_id = {"same": self.session_id, "other": "sess-someone-else", "": ""}[sid]
        self._send(pb.ClientEvent(event_id="update", session_update=pb.SessionUpdate(session_id=session_id,
                                                                                       settings=s)))

    @precondition(lambda self: self.stream is not None)
    @rule(kind=st.sampled_from(["audio", "image", "text"]), over=st.sampled_from(["tenant", "grpc"]))
    def huge_message(self, kind: str, over: str) -> None:
        """Over the tenant's limit: a RESOURCE_EXHAUSTED ErrorEvent; over gRPC's: the stream ends with it."""
        limit = self.target.max_message_bytes if over == "tenant" else self.target.grpc_max_message_bytes
        n = limit + 1024
        event = {"audio": pb.ClientEvent(audio=pb.AudioChunk(pcm16=b"\1\0" * (n // 2), sample_rate=16000)),
                 "image": pb.ClientEvent(image=pb.Image(data=b"\x89PNG" + b"\0" * n)),
                 "text": pb.ClientEvent(text=pb.TextInput(text="a" * n))}[kind]
        event.event_id = "huge"
        self._send(event)

    @precondition(lambda self: self.stream is not None)
    @rule()
    def settle(self) -> None:
        """Wait until every response this stream started has ended: a turn that never ends is a hang."""
        stream = self.stream
        assert stream is not None

        def finished() -> bool:
            started = {e.response_id for e in stream.events if e.WhichOneof("event") == "turn_started"}
            ended = {e.response_id for e in stream.events
                     if e.WhichOneof("event") in ("response_done", "interrupted", "error") and e.response_id}
            return started <= ended

        self._check(self._run(stream.wait(finished, SETTLE_TIMEOUT_S), SETTLE_TIMEOUT_S + 5),
                    "a response did not end within the settle timeout")

    @precondition(lambda self: self.stream is not None)
    @rule(abrupt=st.booleans(), burst=st.integers(1, 3))
    def reconnect(self, abrupt: bool, burst: int) -> None:
        """Leave (cancel, or half-close) and come back with the same session id, `burst` times in a row."""
        for _ in range(burst):
            assert self.stream is not None
            self._run(self.stream.close(abrupt=abrupt))
            self._drop_stream()
            update = pb.ClientEvent(session_update=pb.SessionUpdate(
                session_id=self.session_id, settings=pb.SessionSettings(turn_detection="manual",
                                                                         playout_lead_ms=3_600_000)))
            stream = self._run(self._open(self.target.alpha_key, update))
            if not any(e.WhichOneof("event") == "session_started" for e in stream.events):
                # The previous stream of this session may still hold it (its end is being processed):
                # answered with a documented code, checked by the invariant. Nothing to resume on.
                self.closed_streams.append(stream)
                return
            self.stream = stream

    @precondition(lambda self: bool(self.session_id))
    @rule(key=st.sampled_from(["beta", "none", "wrong"]))
    def foreign_resume(self, key: str) -> None:
        """Another tenant (or nobody) names alpha's session: NOT_FOUND / UNAUTHENTICATED, alpha unaffected."""
        api_key = {"beta": self.target.beta_key, "none": None, "wrong": "not-a-key"}[key]
        update = pb.ClientEvent(session_update=pb.SessionUpdate(session_id=self.session_id))
        stream = self._run(self._open(api_key, update))
        self._run(stream.close(abrupt=False))
        expected = "NOT_FOUND" if key == "beta" else "UNAUTHENTICATED"
        self._check(stream.code == expected and not stream.events,
                    f"{key} resume: {stream.code} {stream.details!r}, {len(stream.events)} events")
        self.closed_streams.append(stream)
        if self.stream is not None:
            self._check(self.stream.code != "ABORTED", "another tenant's attempt took alpha's session over")

    # -- invariants ---------------------------------------------------------------------------------------
    def _check(self, ok: object, message: str) -> None:
        if not ok:
            self._violation(message)

    def _violation(self, message: str) -> None:
        text = f"{message} (after: {', '.join(self.trail[-12:])})"
        if text not in self.findings.violations:
            self.findings.violations.append(text)
        raise AssertionError(text)

    @invariant()
    def service_alive(self) -> None:
        if not self.target.alive():
            self._violation("the orchestrator process died")

    @invariant()
    def only_documented_errors(self) -> None:
        for stream in self._all_streams():
            for e in stream.events:
                if e.WhichOneof("event") == "error" and not (e.error.code in DOCUMENTED and e.error.message):
                    self._violation(f"error event {e.error.code}: {e.error.message!r}")
            if stream.ended and stream.code != "OK" and not (stream.code in DOCUMENTED and stream.details):
                self._violation(f"stream ended {stream.code}: {stream.details!r}")

    def teardown(self) -> None:
        try:
            if self.stream is not None:
                self.settle()
                self._run(self.stream.close(abrupt=False))
                self._drop_stream()
            for stream in self.closed_streams:
                self._record(stream)
                for e in stream.events:
                    if e.WhichOneof("event") == "error":
                        self.findings.error_codes[e.error.code] += 1
                self.findings.end_codes[stream.code or "open"] += 1
                self.findings.end_details.setdefault(stream.code or "open", stream.details[:200])
            self.findings.turns += len(self.turns)
            if self.session_id:
                self._check_history()
        finally:
            for stream in self.closed_streams:
                if not stream.ended:
                    stream.call.cancel()

    def _check_history(self) -> None:
        update = pb.ClientEvent(session_update=pb.SessionUpdate(session_id=self.session_id))
        stream = self._run(self._open(self.target.alpha_key, update))
        self._run(stream.close(abrupt=False))
        started = [e for e in stream.events if e.WhichOneof("event") == "session_started"]
        if not started:
            # The session may have been ended by the client (EndSession is not fuzzed) or expired: only a
            # documented code is acceptable.
            self._check(stream.code in DOCUMENTED, f"history resume: {stream.code} {stream.details!r}")
            return
        streamed: dict[str, str] = {}
        for s in self.closed_streams:
            for e in s.events:
                if e.WhichOneof("event") == "text_delta":
                    streamed[e.response_id] = streamed.get(e.response_id, "") + e.text_delta.text
        history = started[0].session_started.history
        ids = [t.turn_id for t in history]
        self._check(len(ids) == len(set(ids)), f"a turn is twice in history: {ids}")
        # A turn can start on the server after the client left the stream (a text sent just before a
        # cancel): kept in history, never seen. At most one such turn per stream the client left.
        unseen = [t.turn_id for t in history if t.turn_id not in self.turns]
        left = sum(1 for s in self.closed_streams if s.left)
        self._check(len(unseen) <= left, f"history holds turns this client never saw: {unseen} ({left} left)")
        for turn in history:
            self._check(turn.turn_id not in self.deleted,
                        f"a deleted turn is back in history: {turn.turn_id}")
            if turn.turn_id in unseen:
                continue
            reply = clean_history_text(turn.assistant.removeprefix(turn.state_mark)).strip()
            full = clean_history_text(streamed.get(self.turns[turn.turn_id], "")).strip()
            self._check(full.startswith(reply),
                        f"history's reply {reply!r} is not what was streamed: {full!r}")


class Canary:
    """A session of tenant beta talking turn after turn in the background: every turn must complete."""

    def __init__(self, channel: grpc.aio.Channel, key: str) -> None:
        self._channel = channel
        self._key = key
        self.turns = 0
        self.turn_s: list[float] = []
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, loop: LoopThread) -> None:
        async def begin() -> None:
            self._task = asyncio.get_running_loop().create_task(self._talk())
        loop.run(begin())

    async def _talk(self) -> None:
        stream = Stream(self._channel, self._key)
        settings = pb.SessionSettings(turn_detection="manual", want_audio=True, max_reply_tokens=3, seed=5,
                                      playout_lead_ms=3_600_000)
        await stream.send(pb.ClientEvent(session_update=pb.SessionUpdate(settings=settings)))
        try:
            while not self._stop.is_set():
                n = len(stream.events)
                t0 = time.monotonic()
                await stream.send(pb.ClientEvent(text=pb.TextInput(text=f"Canary turn {self.turns}.")))
                ok = await stream.wait(
                    lambda: any(e.WhichOneof("event") in ("response_done", "error", "interrupted")
                                for e in stream.events[n:]), SETTLE_TIMEOUT_S)
                ends = [e for e in stream.events[n:] if e.WhichOneof("event") in ("response_done", "error",
                                                                                  "interrupted")]
                if not ok or stream.ended or not ends or ends[0].WhichOneof("event") != "response_done":
                    self.failures.append(f"turn {self.turns}: ended={stream.code} {stream.details} "
                                         f"last={ends[0] if ends else None}")
                    return
                self.turns += 1
                self.turn_s.append(time.monotonic() - t0)
                try:
                    await asyncio.wait_for(self._stop.wait(), 0.5)
                except TimeoutError:
                    pass
        finally:
            await stream.close(abrupt=False)

    def one_more_turn(self, loop: LoopThread) -> None:
        """Wait until the canary completes another turn (after the fuzzing: the service still answers)."""
        target = self.turns + 1

        async def wait() -> None:
            while (self.turns < target and not self.failures and self._task is not None
                   and not self._task.done()):
                await asyncio.sleep(0.05)
        loop.run(wait(), SETTLE_TIMEOUT_S + 5)
        if self.turns < target and not self.failures:
            self.failures.append("no canary turn completed after the fuzzing")

    def stop(self, loop: LoopThread) -> None:
        async def end() -> None:
            self._stop.set()
            if self._task is not None:
                await self._task
        loop.run(end(), STEP_TIMEOUT_S + 10)


def run_fuzz(target: FuzzTarget, *, sequences: int, steps: int, derandomize: bool = True,
             deadline_s: float | None = None, chunk: int = 25, findings: Findings | None = None) -> Findings:
    """Run `sequences` examples of up to `steps` steps each, in runs of `chunk` examples (none started past
    `deadline_s`). A violated invariant is recorded as it happens (`Findings.violations`, with the rules
    that led to it: a live service may not replay it exactly) and raised, shrunk by hypothesis where the
    replay holds. `derandomize`: the same examples every run (the test suite); False draws new ones (long
    runs of bench/fuzz.py). `findings`: fill this one (a caller keeps it when the run raises)."""
    findings = findings if findings is not None else Findings()
    loop = LoopThread()

    async def make_channel() -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(target.address, options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024)])

    channel = loop.run(make_channel())
    canary = Canary(channel, target.beta_key)
    canary.start(loop)
    started = time.monotonic()

    class Machine(ConverseFuzz):
        pass

    Machine.target, Machine.loop, Machine.channel, Machine.findings = target, loop, channel, findings
    try:
        done = 0
        while done < sequences and (deadline_s is None or time.monotonic() - started < deadline_s):
            n = min(chunk, sequences - done) if not derandomize else sequences - done
            config = settings(max_examples=n, stateful_step_count=steps, deadline=None,
                              derandomize=derandomize, database=None, phases=[Phase.generate, Phase.shrink],
                              suppress_health_check=list(HealthCheck), print_blob=True)
            run_state_machine_as_test(Machine, settings=config)
            done += n
    finally:
        try:
            canary.one_more_turn(loop)
            canary.stop(loop)
        finally:
            findings.canary_turns = canary.turns
            findings.canary_turn_s = canary.turn_s
            findings.violations.extend(f"canary: {f}" for f in canary.failures)
            loop.run(channel.close())
            loop.close()
    return findings
