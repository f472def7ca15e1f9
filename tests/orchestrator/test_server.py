"""Integration tests: the real grpc.aio orchestrator server on a free loopback port, a real gRPC client, and
the tiny golden model running in process (`InProcessComponents`); component-down tests use the real
`TritonComponents` pointed at a port where nothing listens. The process-level tests run
`python -m vitaserve_orchestrator` (fail fast on bad configuration, SIGTERM drain).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import soundfile as sf
from conftest import make_config, run
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.api.v1 import orchestrator_pb2_grpc as pb_grpc
from vitaserve.components.base import ComponentClient
from vitaserve.components.inprocess import InProcessComponents
from vitaserve.components.triton import TritonComponents
from vitaserve_orchestrator.server import SERVICE_NAME, OrchestratorServer, create_server
from vitaserve_orchestrator.settings import OrchestratorSettings

pytestmark = pytest.mark.integration

GOLDEN = Path(__file__).parents[1] / "golden" / "vita15-tiny"
END = ("response_done", "interrupted", "error")
# These clients play nothing: a lead of an hour lifts the real-time pacing of reply audio (pacing.py), which
# test_interrupt_mid_response and tests/e2e/test_bargein.py exercise.
UNPACED_MS = 3_600_000
MANUAL = pb.SessionSettings(turn_detection="manual", max_reply_tokens=12, playout_lead_ms=UNPACED_MS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def to_pcm16(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()


@asynccontextmanager
async def serving(
    components: ComponentClient, config: OrchestratorSettings | None = None
) -> AsyncIterator[tuple[OrchestratorServer, str]]:
    server, port = create_server(config or make_config(), components, "127.0.0.1:0")
    await server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        await server.stop(0.5)
        await components.close()


class Client:
    """One Converse stream driven by a real grpc.aio client."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._queue: asyncio.Queue[pb.ClientEvent | None] = asyncio.Queue()
        self.call = pb_grpc.OrchestratorStub(channel).Converse(self._requests())
        self.session_id = ""

    async def _requests(self) -> AsyncIterator[pb.ClientEvent]:
        while (event := await self._queue.get()) is not None:
            yield event

    async def send(self, event_id: str = "", **event: Any) -> None:
        await self._queue.put(pb.ClientEvent(event_id=event_id, **event))

    async def start(
        self, session_id: str = "", settings: pb.SessionSettings | None = MANUAL
    ) -> pb.ServerEvent:
        await self.send(session_update=pb.SessionUpdate(session_id=session_id, settings=settings))
        first = await self.read()
        assert first.WhichOneof("event") == "session_started", first
        self.session_id = first.session_id
        return first

    async def read(self, timeout: float = 30.0) -> pb.ServerEvent:
        event = await asyncio.wait_for(self.call.read(), timeout)
        assert event is not grpc.aio.EOF, "the server ended the stream"
        return event

    async def until(self, kinds: Sequence[str] = END, timeout: float = 60.0) -> list[pb.ServerEvent]:
        got = []
        while True:
            got.append(await self.read(timeout))
            if got[-1].WhichOneof("event") in kinds:
                return got

    async def send_audio(self, pcm: np.ndarray, chunk_ms: int = 100) -> None:
        step = 16 * chunk_ms
        for i in range(0, len(pcm), step):
            await self.send(audio=pb.AudioChunk(pcm16=to_pcm16(pcm[i : i + step]), sample_rate=16000))

    async def close(self) -> None:
        await self._queue.put(None)

    async def drain(self, timeout: float = 30.0) -> list[pb.ServerEvent]:
        """Events up to the end of the stream."""
        got = []
        while (event := await asyncio.wait_for(self.call.read(), timeout)) is not grpc.aio.EOF:
            got.append(event)
        return got


def kinds(events: Sequence[pb.ServerEvent]) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def check_response(events: Sequence[pb.ServerEvent]) -> pb.ResponseDone:
    """The invariants of one response's events (turn_started ... response_done)."""
    assert kinds(events)[0] == "turn_started" and kinds(events)[-1] == "response_done", kinds(events)
    rid, tid, sid = events[0].response_id, events[0].turn_id, events[0].session_id
    assert rid and tid and sid
    assert all((e.response_id, e.turn_id, e.session_id) == (rid, tid, sid) for e in events)
    assert [e.t_ms for e in events] == sorted(e.t_ms for e in events)
    text, seq, start_ms, last_span = "", 0, 0, (0, 0)
    for e in events:
        if e.HasField("text_delta"):
            assert e.text_delta.offset == len(text)
            text += e.text_delta.text
        elif e.HasField("audio"):
            a = e.audio
            assert a.sample_rate == 24000 and len(a.pcm16) % 2 == 0 and len(a.pcm16) > 0
            assert a.seq == seq and abs(a.start_ms - start_ms) <= 1
            assert a.text_end <= len(text)  # audio never runs ahead of the text
            assert (a.text_start, a.text_end) >= last_span
            last_span = (a.text_start, a.text_end)
            seq += 1
            start_ms += len(a.pcm16) / 2 / 24
    done = events[-1].response_done
    assert done.text == text
    assert abs(done.timings.audio_ms - start_ms) <= 1 and done.timings.tokens > 0
    assert done.timings.total_ms >= done.timings.first_token_ms > 0
    if seq:
        assert done.timings.total_ms >= done.timings.first_audio_ms >= done.timings.first_token_ms
    return done


@pytest.fixture()
def components(tiny_engines: dict[str, Any]) -> InProcessComponents:
    return InProcessComponents(engines=tiny_engines)


def golden_question() -> np.ndarray:
    pcm, rate = sf.read(GOLDEN / "audio_16k_2.3s.wav", dtype="float32")
    assert rate == 16000
    return pcm


# ---- health and lifecycle ---------------------------------------------------------------------


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )


def test_health_follows_component_readiness_and_draining(components: InProcessComponents) -> None:
    async def body() -> None:
        async with serving(components) as (server, address):
            assert await server.check_readiness()
            for service in ("", SERVICE_NAME):
                assert (
                    await asyncio.to_thread(health_status, address, service)
                    == health_pb2.HealthCheckResponse.SERVING
                )
            await server.drain()
            assert await server.check_readiness()  # ready, yet draining wins
            assert (
                await asyncio.to_thread(health_status, address) == health_pb2.HealthCheckResponse.NOT_SERVING
            )
        # A Triton that cannot be reached: never SERVING.
        async with serving(TritonComponents(f"127.0.0.1:{free_port()}")) as (server, address):
            assert not await server.check_readiness()
            assert (
                await asyncio.to_thread(health_status, address) == health_pb2.HealthCheckResponse.NOT_SERVING
            )

    run(body())


# ---- turns through the tiny model ----------------------------------------------------------------


def test_text_turn(components: InProcessComponents) -> None:
    async def body() -> None:
        async with serving(components) as (_, address), grpc.aio.insecure_channel(address) as channel:
            client = Client(channel)
            started = await client.start()
            assert started.session_started.settings.turn_detection == "manual"
            await client.send(text=pb.TextInput(text="Hello, who are you?"))
            events = await client.until()
            done = check_response(events)
            assert events[0].turn_started.modality == "text"
            assert "audio" in kinds(events)  # speech replies by default
            assert done.state_mark in ("", "☞", "☜")
            await client.close()
            assert await client.drain() == []
            assert await client.call.code() == grpc.StatusCode.OK

    run(body(), timeout=60)


def test_image_and_audio_turn_then_resume(components: InProcessComponents) -> None:
    async def body() -> None:
        async with serving(components) as (_, address), grpc.aio.insecure_channel(address) as channel:
            client = Client(channel)
            await client.start()
            await client.send(image=pb.Image(data=(GOLDEN / "image0_800x600.png").read_bytes()))
            await client.send_audio(golden_question())
            await client.send(commit=pb.Commit())
            events = await client.until()
            done = check_response(events)
            assert events[0].turn_started == pb.TurnStarted(modality="audio", images=1, frames=0)
            assert done.timings.encode_ms > 0
            await client.close()
            assert await client.call.code() == grpc.StatusCode.OK
            # A new stream resumes the session with its history.
            again = Client(channel)
            resumed = await again.start(session_id=client.session_id, settings=None)
            assert resumed.session_started.resumed and resumed.session_started.history_turns == 1
            assert resumed.session_id == client.session_id
            await again.send(text=pb.TextInput(text="And then?"))
            check_response(await again.until())
            await again.close()

    run(body(), timeout=60)


def test_vad_turn_from_streamed_speech(components: InProcessComponents, question_pcm: np.ndarray) -> None:
    async def body() -> None:
        async with serving(components) as (_, address), grpc.aio.insecure_channel(address) as channel:
            client = Client(channel)
            vad = pb.SessionSettings(turn_detection="vad", max_reply_tokens=16, playout_lead_ms=UNPACED_MS)
            await client.start(settings=vad)
            silence = np.zeros(8000, np.float32)
            await client.send_audio(np.concatenate([silence, question_pcm, silence, silence]))
            events = await client.until()
            assert kinds(events)[:2] == ["speech_started", "speech_stopped"]
            assert 400 <= events[0].speech_started.audio_start_ms <= 560
            check_response(events[2:])
            assert events[2].turn_started.modality == "audio"
            await client.close()

    run(body(), timeout=60)


def test_interrupt_mid_response(components: InProcessComponents) -> None:
    async def body() -> None:
        async with serving(components) as (_, address), grpc.aio.insecure_channel(address) as channel:
            client = Client(channel)
            # Greedy decoding of this prompt by the tiny model runs to the 64-token limit: seconds of speech.
            await client.start(settings=pb.SessionSettings(turn_detection="manual", max_reply_tokens=64))
            await client.send(text=pb.TextInput(text="Tell me a long story."))
            events = await client.until(["audio"])
            response_id = events[0].response_id
            sent_at = time.monotonic()
            await client.send(interrupt=pb.Interrupt(response_id=response_id))
            events += await client.until(["interrupted", "response_done"])
            stop_ms = (time.monotonic() - sent_at) * 1000
            intr = events[-1]
            assert intr.HasField("interrupted"), kinds(events)
            assert intr.response_id == response_id and intr.interrupted.reason == "client"
            # Paced playout: the client has played what it received minus at most the lead (300 ms) and
            # one frame (100 ms) still in its buffer.
            received = sum(len(e.audio.pcm16) // 2 for e in events if e.HasField("audio")) / 24
            assert received - 400 - 1 <= intr.interrupted.played_ms <= received + 1
            text = "".join(e.text_delta.text for e in events if e.HasField("text_delta"))
            assert text.startswith(intr.interrupted.heard_text)
            assert stop_ms < 2000
            # Nothing of the cancelled response afterwards; the next (short) turn works.
            await client.send(session_update=pb.SessionUpdate(settings=MANUAL))
            assert (await client.read()).session_started.settings.max_reply_tokens == MANUAL.max_reply_tokens
            await client.send(text=pb.TextInput(text="Short answer please."))
            after = await client.until()
            assert all(e.response_id != response_id for e in after)
            check_response(after)
            print(f"\ninterrupt -> interrupted event: {stop_ms:.1f} ms")
            await client.close()

    run(body(), timeout=90)


# ---- clearing the input, VAD turns that wait for a commit, history edits -------------------------------


def test_vad_utterances_wait_for_a_commit_and_clear_input_drops_them(
    components: InProcessComponents, question_pcm: np.ndarray
) -> None:
    async def body() -> None:
        async with serving(components) as (_, address), grpc.aio.insecure_channel(address) as channel:
            client = Client(channel)
            vad = pb.SessionSettings(turn_detection="vad", max_reply_tokens=12, playout_lead_ms=UNPACED_MS,
                                     vad_create_response=False)
            settings = (await client.start(settings=vad)).session_started.settings
            assert settings.HasField("vad_create_response") and not settings.vad_create_response
            silence = np.zeros(8000, np.float32)
            utterance = np.concatenate([silence, question_pcm, silence, silence])
            await client.send_audio(utterance)
            assert kinds([await client.read(), await client.read()]) == ["speech_started", "speech_stopped"]
            # The utterance waits as the next turn's audio; clear_input drops it: nothing to commit.
            await client.send(clear_input=pb.ClearInput())
            await client.send(event_id="c1", commit=pb.Commit())
            err = await client.read()
            assert (err.error.code, err.error.event_id) == ("FAILED_PRECONDITION", "c1"), err
            # An utterance cleared halfway ends without speech_stopped and is no turn.
            await client.send_audio(np.concatenate([silence, question_pcm[: len(question_pcm) // 2]]))
            assert (await client.read()).HasField("speech_started")
            await client.send(clear_input=pb.ClearInput())
            await client.send_audio(np.zeros(24000, np.float32))
            await client.send(event_id="c2", commit=pb.Commit())
            err = await client.read()  # nothing else came before the commit's error
            assert (err.error.code, err.error.event_id) == ("FAILED_PRECONDITION", "c2"), err
            # A kept utterance is answered at the commit.
            await client.send_audio(utterance)
            assert kinds([await client.read(), await client.read()]) == ["speech_started", "speech_stopped"]
            await client.send(commit=pb.Commit())
            events = await client.until()
            check_response(events)
            assert events[0].turn_started.modality == "audio"
            await client.close()
            # Unset, the end of an utterance starts a response (and the server says so).
            other = Client(channel)
            default = pb.SessionSettings(turn_detection="vad", playout_lead_ms=UNPACED_MS)
            assert (await other.start(settings=default)).session_started.settings.vad_create_response
            await other.close()

    run(body(), timeout=90)


def test_playback_truncates_a_finished_reply_and_delete_turn_removes_it(
    components: InProcessComponents,
) -> None:
    async def body() -> None:
        async with serving(components) as (_, address), grpc.aio.insecure_channel(address) as channel:
            client = Client(channel)
            await client.start()
            await client.send(text=pb.TextInput(text="Hello, who are you?"))
            events = await client.until()
            done = check_response(events)
            rid, tid, audio_ms = events[0].response_id, events[0].turn_id, done.timings.audio_ms
            assert audio_ms > 0 and done.text
            # Played to the end or past it: nothing changes, the answer has the whole reply.
            await client.send(playback=pb.PlaybackPosition(response_id=rid, played_ms=audio_ms + 1000))
            full = await client.read()
            assert (full.turn_id, full.response_id) == (tid, rid)
            assert full.history_truncated == pb.HistoryTruncated(turn_id=tid, played_ms=audio_ms,
                                                                 heard_text=done.text)
            # Stopped halfway: the history turn keeps the text heard by then.
            await client.send(playback=pb.PlaybackPosition(response_id=rid, played_ms=audio_ms // 2))
            cut = (await client.read()).history_truncated
            assert cut.turn_id == tid and cut.played_ms == audio_ms // 2
            assert done.text.startswith(cut.heard_text) and len(cut.heard_text) < len(done.text)
            stale = pb.PlaybackPosition(response_id="resp-old", played_ms=1)
            await client.send(event_id="old", playback=stale)
            err = await client.read()
            assert (err.error.code, err.error.event_id) == ("INVALID_ARGUMENT", "old")
            assert "can only truncate the last response" in err.error.message
            await client.close()
            assert await client.drain() == []
            # Resumed elsewhere: the history turn with its id and the cut reply; then deleted.
            again = Client(channel)
            history = (await again.start(session_id=client.session_id, settings=None)).session_started.history
            assert [(t.turn_id, t.assistant, t.state_mark) for t in history] == [
                (tid, cut.heard_text, done.state_mark)
            ]
            await again.send(delete_turn=pb.DeleteTurn(turn_id=tid))
            deleted = await again.read()
            assert deleted.turn_deleted == pb.TurnDeleted(turn_id=tid) and deleted.turn_id == tid
            await again.send(event_id="gone", delete_turn=pb.DeleteTurn(turn_id=tid))
            err = await again.read()
            assert (err.error.code, err.error.event_id) == ("NOT_FOUND", "gone")
            await again.send(session_update=pb.SessionUpdate())
            assert (await again.read()).session_started.history_turns == 0
            await again.send(text=pb.TextInput(text="Still there?"))
            check_response(await again.until())
            await again.close()
            assert await again.drain() == []

    run(body(), timeout=90)


# ---- bad input, unknown sessions, components down --------------------------------------------------


def test_bad_events_get_error_events_and_the_session_goes_on(components: InProcessComponents) -> None:
    big = make_config().max_audio_chunk_bytes + 2
    bad = [
        ("rate", dict(audio=pb.AudioChunk(pcm16=b"\0\0" * 160, sample_rate=8000)), "INVALID_ARGUMENT"),
        ("odd", dict(audio=pb.AudioChunk(pcm16=b"\0" * 321, sample_rate=16000)), "INVALID_ARGUMENT"),
        ("big-audio", dict(audio=pb.AudioChunk(pcm16=b"\0" * big, sample_rate=16000)), "INVALID_ARGUMENT"),
        (
            "corrupt",
            dict(image=pb.Image(data=(GOLDEN / "image0_800x600.png").read_bytes()[:300])),
            "INVALID_ARGUMENT",
        ),
        ("big-image", dict(image=pb.Image(data=b"\x89PNG" + b"\0" * (8 * 1024 * 1024))), "INVALID_ARGUMENT"),
        ("big-text", dict(text=pb.TextInput(text="a" * 8001)), "INVALID_ARGUMENT"),
        ("nothing", dict(commit=pb.Commit()), "FAILED_PRECONDITION"),
        ("empty", {}, "INVALID_ARGUMENT"),
    ]

    async def body() -> None:
        async with serving(components) as (_, address), grpc.aio.insecure_channel(address) as channel:
            client = Client(channel)
            await client.start()
            for event_id, event, code in bad:
                await client.send(event_id=event_id, **event)
                err = await client.read()
                assert err.HasField("error"), err
                assert (err.error.code, err.error.event_id) == (code, event_id), err.error
                assert err.session_id == client.session_id and not err.error.retryable
            # Out of order: a commit while a response runs.
            await client.send(text=pb.TextInput(text="Tell me a long story."))
            head = await client.until(["text_delta"])
            await client.send(event_id="early", commit=pb.Commit())
            events = await client.until(["error"])
            assert events[-1].error.code == "FAILED_PRECONDITION" and events[-1].error.event_id == "early"
            assert events[-1].turn_id == head[0].turn_id  # the error names the running turn
            check_response(head + events[:-1] + await client.until())
            # Still working.
            await client.send(text=pb.TextInput(text="Hi"))
            check_response(await client.until())
            await client.close()

    run(body(), timeout=90)


def test_first_event_must_be_session_update_and_unknown_sessions_are_not_found(
    components: InProcessComponents,
) -> None:
    async def body() -> None:
        async with serving(components) as (_, address), grpc.aio.insecure_channel(address) as channel:
            client = Client(channel)
            await client.send(text=pb.TextInput(text="hi"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.read()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == "first event must be session_update"

            client = Client(channel)
            await client.send(session_update=pb.SessionUpdate(session_id="sess-nope"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.read()
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

            client = Client(channel)
            await client.send(
                session_update=pb.SessionUpdate(settings=pb.SessionSettings(turn_detection="x"))
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.read()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            client = Client(channel)  # the server is still fine
            await client.start()
            await client.send(end_session=pb.EndSession())
            assert await client.drain() == []
            assert await client.call.code() == grpc.StatusCode.OK
            gone = Client(channel)
            await gone.send(session_update=pb.SessionUpdate(session_id=client.session_id))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await gone.read()
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

    run(body(), timeout=60)


def test_component_down_is_unavailable_quickly() -> None:
    async def body() -> None:
        components = TritonComponents(f"127.0.0.1:{free_port()}")  # nothing listens there
        async with serving(components) as (_, address), grpc.aio.insecure_channel(address) as channel:
            client = Client(channel)
            await client.start()
            for text in ("Hello?", "Anyone?"):
                started = time.monotonic()
                await client.send(text=pb.TextInput(text=text))
                events = await client.until(timeout=10)
                assert kinds(events) == ["turn_started", "error"]
                err = events[-1]
                assert err.error.code == "UNAVAILABLE" and err.error.retryable
                assert err.response_id == events[0].response_id
                assert time.monotonic() - started < 3.0
            await client.close()
            assert await client.call.code() == grpc.StatusCode.OK

    run(body(), timeout=30)


# ---- the process -------------------------------------------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITASERVE_")}
    return {**env, **extra}


def test_process_fails_fast_without_a_component_address() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vitaserve_orchestrator"],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "VITASERVE_TRITON_URL" in proc.stderr


def test_process_serves_and_drains_on_sigterm(tiny_checkpoint: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = _clean_env(
        VITASERVE_BACKEND="inprocess",
        VITASERVE_CHECKPOINT_DIR=str(tiny_checkpoint),
        VITASERVE_LISTEN_ADDRESS=address,
        VITASERVE_HEALTH_POLL_S="0.2",
        VITASERVE_SHUTDOWN_GRACE_S="2",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitaserve_orchestrator"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = health_status(address)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.SERVING, proc.stdout.read() if proc.poll() else status

        async def turn_then_sigterm() -> tuple[int, float]:
            async with grpc.aio.insecure_channel(address) as channel:
                client = Client(channel)
                await client.start()
                await client.send(text=pb.TextInput(text="Hi"))
                check_response(await client.until())
                # SIGTERM with this stream still open: NOT_SERVING, then the stream gets the 2 s grace.
                started = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(proc.wait, 20)
                with pytest.raises(grpc.aio.AioRpcError):
                    await client.drain()
                return code, time.monotonic() - started

        code, stop_s = run(turn_then_sigterm(), timeout=60)
        assert code == 0
        assert 1.5 <= stop_s < 8, stop_s
        output = proc.stdout.read()
        assert "orchestrator serving on" in output and "draining" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
