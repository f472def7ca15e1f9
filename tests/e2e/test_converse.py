"""End to end through real Triton, the real orchestrator process and a real gRPC client (issue 3 §8)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.client import Conversation, read_wav_16k, run_turn
from vitaserve.stack import LocalStack, OrchestratorProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

EXAMPLES = Path(__file__).parents[2] / "examples" / "media"
GOLDEN = Path(__file__).parents[1] / "golden" / "vita15-tiny"
# These clients play nothing: a lead of an hour lifts the real-time pacing of reply audio (the tiny model
# speaks ~20 s for 24 tokens); test_bargein.py and test_interrupt_stops_everything keep it.
UNPACED_MS = 3_600_000
SETTINGS = pb.SessionSettings(turn_detection="manual", want_audio=True, max_reply_tokens=24, temperature=0.8,
                              seed=11, playout_lead_ms=UNPACED_MS)


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def kinds(events: list[pb.ServerEvent]) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def check_response(events: list[pb.ServerEvent], session_id: str) -> None:
    """Ordered text deltas, 24 kHz audio whose spans move forward, one done event last, ids everywhere."""
    assert kinds(events)[-1] == "response_done", kinds(events)
    assert kinds(events)[0] == "turn_started"
    assert "input_transcript" not in kinds(events)  # VITA-1.5's encoders give LLM rows, no text
    response_ids = {e.response_id for e in events}
    assert len(response_ids) == 1 and "" not in response_ids
    assert {e.session_id for e in events} == {session_id}
    assert len({e.turn_id for e in events}) == 1
    times = [e.t_ms for e in events]
    assert times == sorted(times)
    text = "".join(e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta")
    offsets = [e.text_delta.offset for e in events if e.WhichOneof("event") == "text_delta"]
    assert offsets == sorted(offsets)
    done = events[-1].response_done
    assert done.text == text
    audio = [e.audio for e in events if e.WhichOneof("event") == "audio"]
    if done.text.strip():
        assert audio, "a reply with text must be spoken"
    assert [a.seq for a in audio] == list(range(len(audio)))
    for a in audio:
        assert a.sample_rate == 24000
        assert len(a.pcm16) % 2 == 0 and len(a.pcm16) > 0
        assert 0 <= a.text_start <= a.text_end <= len(done.text)
    assert [a.text_start for a in audio] == sorted(a.text_start for a in audio)
    total_samples = sum(len(a.pcm16) // 2 for a in audio)
    assert abs(done.timings.audio_ms - total_samples * 1000 / 24000) <= 1
    assert done.timings.total_ms >= done.timings.first_token_ms > 0
    if audio:
        assert done.timings.first_audio_ms >= done.timings.first_token_ms


def test_image_and_spoken_question(stack: LocalStack) -> None:
    async def scenario() -> None:
        async with Conversation.open(stack.orchestrator_address, settings=SETTINGS) as conv:
            assert conv.started is not None and conv.started.model_family == "vita15"
            reply, audio, rate, events = await run_turn(
                conv, image=(EXAMPLES / "camera.png").read_bytes(), pcm16=read_wav_16k(EXAMPLES / "question.wav"),
                text=None, echo=False)
            check_response(events, conv.session_id)
            assert events[0].turn_started.modality == "audio" and events[0].turn_started.images == 1
            assert rate == 24000
            pcm = np.frombuffer(audio, "<i2")
            assert pcm.size > 0 and np.abs(pcm).max() > 0

    run(scenario())


def test_text_turn_then_follow_up(stack: LocalStack) -> None:
    async def scenario() -> None:
        async with Conversation.open(stack.orchestrator_address, settings=SETTINGS) as conv:
            _, _, _, first = await run_turn(conv, image=None, pcm16=None, text="Hello there, who are you?",
                                            echo=False)
            check_response(first, conv.session_id)
            _, _, _, second = await run_turn(conv, image=None, pcm16=None, text="Tell me more.", echo=False)
            check_response(second, conv.session_id)
            assert first[0].turn_id != second[0].turn_id
            assert first[-1].response_id != second[-1].response_id

    run(scenario())


def llm_log_line(stack: LocalStack, request_id: str, timeout_s: float = 30.0) -> dict[str, int | str]:
    pattern = re.compile(rf"llm_decoder request_id='{re.escape(request_id)}' responses=\d+ outcome=(\S+) "
                         rf".* kv_reused=(\d+) prompt=(\d+)")
    deadline = time.monotonic() + timeout_s
    while True:
        match = pattern.search((stack.work_dir / "triton.log").read_text(errors="replace"))
        if match:
            return {"outcome": match.group(1), "reused": int(match.group(2)), "prompt": int(match.group(3))}
        assert time.monotonic() < deadline, f"no llm_decoder log line for {request_id}"
        time.sleep(0.05)


def test_the_follow_up_turn_reuses_the_kv_cache_warmed_after_the_first(stack: LocalStack) -> None:
    """Turn 1 has an image and speech; turn 2's prompt repeats turn 1 as text, so without the warm-up
    only the system prompt would match the session's cache."""
    image = (EXAMPLES / "camera.png").read_bytes()
    pcm16 = read_wav_16k(EXAMPLES / "question.wav")

    async def scenario() -> tuple[str, str]:
        async with Conversation.open(stack.orchestrator_address, settings=SETTINGS) as conv:
            _, _, _, first = await run_turn(conv, image=image, pcm16=pcm16, text=None, echo=False)
            check_response(first, conv.session_id)
            warm_id = f"{first[-1].response_id}-warm"
            await asyncio.to_thread(llm_log_line, stack, warm_id)  # the user thinks: the warm-up ends
            # a spoken follow-up about the image, without sending it again (what the warm-up expects)
            _, _, _, second = await run_turn(conv, image=None, pcm16=pcm16, text=None, echo=False)
            check_response(second, conv.session_id)
            return warm_id, second[-1].response_id

    warm_id, second_id = run(scenario())
    warm, second = llm_log_line(stack, warm_id), llm_log_line(stack, second_id)
    assert warm["outcome"] == "done" and warm["prompt"] > 60, warm  # system prompt + turn 1 as history
    # the whole warmed prefix was reused (its last position is recomputed at most: the token boundary)
    assert second["reused"] >= warm["prompt"] - 1, (warm, second)
    assert second["prompt"] > second["reused"]  # the new speech was prefilled


def test_same_seed_same_reply_through_the_stack(stack: LocalStack) -> None:
    async def once() -> str:
        async with Conversation.open(stack.orchestrator_address, settings=SETTINGS) as conv:
            reply, _, _, _ = await run_turn(conv, image=None, pcm16=None, text="Count to three.", echo=False)
            return reply

    assert run(once()) == run(once())


def test_interrupt_stops_everything(stack: LocalStack) -> None:
    long_reply = pb.SessionSettings(turn_detection="manual", want_audio=True, max_reply_tokens=400,
                                    temperature=0.8, seed=5)

    async def scenario() -> None:
        async with Conversation.open(stack.orchestrator_address, settings=long_reply) as conv:
            await conv.send_text("Tell me a long story.")
            seen: list[pb.ServerEvent] = []
            async for event in conv.events():
                seen.append(event)
                if event.WhichOneof("event") == "audio":
                    break
            response_id = seen[-1].response_id
            await conv.interrupt()
            after: list[pb.ServerEvent] = []
            async for event in conv.events():
                after.append(event)
                if event.WhichOneof("event") in ("interrupted", "response_done"):
                    break
            assert kinds(after)[-1] == "interrupted", kinds(after)
            interrupted = after[-1]
            assert interrupted.response_id == response_id
            # Paced playout: the client has played what it received minus at most the lead (300 ms) and one
            # frame (100 ms) still in its buffer.
            received = sum(len(e.audio.pcm16) // 2 for e in seen + after if e.WhichOneof("event") == "audio")
            received_ms = received * 1000 / 24000
            assert received_ms - 401 <= interrupted.interrupted.played_ms <= received_ms + 1
            # Nothing of the cancelled response may follow; the session answers a new (short, unpaced) turn.
            await conv.send(pb.ClientEvent(session_update=pb.SessionUpdate(settings=SETTINGS)))
            assert (await conv.next_event()).WhichOneof("event") == "session_started"
            reply, _, _, events = await run_turn(conv, image=None, pcm16=None, text="Short answer please.",
                                                 echo=False)
            assert all(e.response_id != response_id for e in events)
            check_response(events, conv.session_id)

    run(scenario())


async def _error_after(conv: Conversation, event: pb.ClientEvent) -> pb.ServerEvent:
    await conv.send(event)
    reply = await conv.next_event()
    assert reply.WhichOneof("event") == "error", reply
    return reply


def test_bad_input_gets_clear_errors_and_the_session_goes_on(stack: LocalStack) -> None:
    async def scenario() -> None:
        async with Conversation.open(stack.orchestrator_address, settings=SETTINGS) as conv:
            bad_rate = await _error_after(conv, pb.ClientEvent(audio=pb.AudioChunk(pcm16=b"\0\0" * 800,
                                                                                  sample_rate=44100)))
            assert bad_rate.error.code == "INVALID_ARGUMENT" and "16000" in bad_rate.error.message
            corrupt = await _error_after(conv, pb.ClientEvent(image=pb.Image(data=b"\x89PNG\r\n\x1a\nnope")))
            assert corrupt.error.code == "INVALID_ARGUMENT" and "image" in corrupt.error.message.lower()
            big = await _error_after(conv, pb.ClientEvent(image=pb.Image(data=b"\0" * (9 * 1024 * 1024))))
            assert big.error.code == "INVALID_ARGUMENT" and "bytes" in big.error.message
            early = await _error_after(conv, pb.ClientEvent(commit=pb.Commit()))
            assert early.error.code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION")
            # the same stream still serves a normal turn
            _, _, _, events = await run_turn(conv, image=None, pcm16=None, text="Are you still there?", echo=False)
            check_response(events, conv.session_id)

    run(scenario())


def test_stream_level_errors(stack: LocalStack) -> None:
    async def scenario() -> None:
        async with grpc.aio.insecure_channel(stack.orchestrator_address) as channel:
            from vitaserve.api.v1 import orchestrator_pb2_grpc as pb_grpc

            stub = pb_grpc.OrchestratorStub(channel)
            # events out of order: text before session_update
            call = stub.Converse(iter([pb.ClientEvent(text=pb.TextInput(text="hi"))]))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "session_update" in err.value.details()
            # unknown session
            call = stub.Converse(iter([pb.ClientEvent(session_update=pb.SessionUpdate(session_id="no-such"))]))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert "no-such" in err.value.details()
        # the server is still fine
        async with Conversation.open(stack.orchestrator_address, settings=SETTINGS) as conv:
            _, _, _, events = await run_turn(conv, image=None, pcm16=None, text="Still up?", echo=False)
            check_response(events, conv.session_id)

    run(scenario())


def test_triton_down_gives_unavailable_not_a_hang(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    proc = OrchestratorProcess({"VITASERVE_BACKEND": "triton", "VITASERVE_TRITON_URL": dead},
                               log_path=tmp_path / "orch.log", wait_ready=False).start()
    try:
        async def scenario() -> None:
            async with Conversation.open(proc.address, settings=SETTINGS) as conv:
                t0 = time.perf_counter()
                await conv.send_text("Anyone home?")
                events = [e async for e in conv.until_done()]
                assert time.perf_counter() - t0 < 15
                errors = [e.error for e in events if e.WhichOneof("event") == "error"]
                assert errors and errors[0].code == "UNAVAILABLE" and errors[0].retryable, events

        run(scenario())
    finally:
        proc.stop()


def test_detailed_image_uses_one_placeholder_per_tile(stack: LocalStack) -> None:
    """An 800x600 image with max_tiles=12 is 12 tiles + a thumbnail: 13 placeholders, 13·256 rows."""
    async def scenario() -> None:
        async with Conversation.open(stack.orchestrator_address, settings=SETTINGS) as conv:
            await conv.send_image((GOLDEN / "image0_800x600.png").read_bytes(), max_tiles=12)
            await conv.send_text("Describe every detail.")
            events = [e async for e in conv.until_done()]
            check_response(events, conv.session_id)
            assert events[0].turn_started.images == 1

    run(scenario())
