"""Unit tests of the gateway's translation logic (no servers): client event parsing, the session settings
it sends upstream, the resampler, and `RealtimeSession` against a scripted Converse call. The same paths
run against the real stack in test_realtime_sdk.py and test_bad_input.py."""

from __future__ import annotations

import asyncio
import base64
import json

import grpc
import numpy as np
import pytest
from realtime_events import check_event

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve_gateway.audio import AudioFormatError, Resampler, decode_pcm16_base64
from vitaserve_gateway.protocol import EventWriter, ProtocolError, parse_client_event
from vitaserve_gateway.session import RealtimeConfig, RealtimeSession

pytestmark = pytest.mark.unit


def test_every_client_event_type_of_the_sdk_parses() -> None:
    events = [
        {"type": "session.update", "session": {"type": "realtime"}},
        {"type": "input_audio_buffer.append", "audio": "AAAA"},
        {"type": "input_audio_buffer.commit"},
        {"type": "input_audio_buffer.clear"},
        {"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": "hi"}]}},
        {"type": "conversation.item.retrieve", "item_id": "item_1"},
        {"type": "conversation.item.truncate", "item_id": "item_1", "content_index": 0, "audio_end_ms": 10},
        {"type": "conversation.item.delete", "item_id": "item_1"},
        {"type": "response.create"},
        {"type": "response.cancel"},
        {"type": "output_audio_buffer.clear"},
    ]
    for event in events:
        parsed = parse_client_event(json.dumps({**event, "event_id": "e1"}))
        assert parsed.type == event["type"] and parsed.event_id == "e1"


@pytest.mark.parametrize(("raw", "code", "param"), [
    ("{", "invalid_json", None),
    ('"a string"', "invalid_json", None),
    ('{"event_id": "x"}', "missing_required_parameter", "type"),
    ('{"type": 7}', "missing_required_parameter", "type"),
    ('{"type": "session.delete"}', "invalid_value", "type"),
    ('{"type": "conversation.item.truncate", "item_id": "i"}', "missing_required_parameter",
     "audio_end_ms"),
    (('{"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"format": '
      '{"type": "audio/pcm", "rate": 8000}}}}}'), "invalid_value", "session.audio.input.format.rate"),
])
def test_bad_client_events_name_what_was_wrong(raw: str, code: str, param: str | None) -> None:
    with pytest.raises(ProtocolError) as error:
        parse_client_event(raw)
    assert error.value.code == code and error.value.param == param and error.value.message


def test_session_settings_sent_upstream() -> None:
    vad = RealtimeConfig(turn_detection={"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 400,
                                         "interrupt_response": False, "create_response": False},
                         instructions="Be brief.", max_output_tokens=64)
    s = vad.to_settings(playout_lead_ms=None)
    assert (s.turn_detection, s.vad_min_silence_ms, s.system_prompt, s.max_reply_tokens) == ("vad", 400, "Be brief.", 64)
    assert s.vad_threshold == pytest.approx(0.6)
    assert s.barge_in.HasField("enabled") and not s.barge_in.enabled
    assert s.HasField("vad_create_response") and not s.vad_create_response
    assert not s.HasField("playout_lead_ms") and s.want_audio and not s.text_only
    manual = RealtimeConfig(turn_detection=None, output_modalities=("text",)).to_settings(playout_lead_ms=5000)
    assert manual.turn_detection == "manual" and manual.text_only and manual.playout_lead_ms == 5000
    assert not manual.barge_in.HasField("enabled") and not manual.HasField("vad_create_response")
    default = RealtimeConfig().to_settings(playout_lead_ms=None)
    assert default.turn_detection == "vad" and default.max_reply_tokens == 0  # "inf": the server's default


def test_the_session_as_reported_is_a_valid_session_created_event() -> None:
    resolved = pb.SessionSettings(turn_detection="vad", vad_threshold=0.7, vad_min_silence_ms=500)
    session = RealtimeConfig().wire(resolved, session_id="sess-1", model="m")
    check_event({"type": "session.created", "event_id": "event_1", "session": session})
    assert session["audio"]["input"]["turn_detection"]["threshold"] == pytest.approx(0.7)


def test_the_input_resampler_keeps_a_tone_and_the_rate_ratio() -> None:
    t = np.arange(24000 * 2) / 24000
    tone = (np.sin(2 * np.pi * 440 * t) * 12000).astype("<i2").tobytes()
    resampler = Resampler(24000, 16000)
    out = b"".join(resampler.push(tone[i:i + 960]) for i in range(0, len(tone), 960))
    out += resampler.push(b"", last=True)
    samples = np.frombuffer(out, dtype="<i2").astype(np.float32)
    assert abs(len(samples) - 32000) <= 2
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * 16000 / len(samples) - 440) < 2


def test_audio_payloads_are_checked() -> None:
    assert decode_pcm16_base64(base64.b64encode(b"\x01\x00\x02\x00").decode(), max_bytes=10) == b"\x01\x00\x02\x00"
    for bad in ("***", base64.b64encode(b"\x01").decode(), base64.b64encode(b"\x00" * 64).decode()):
        with pytest.raises(AudioFormatError):
            decode_pcm16_base64(bad, max_bytes=16)


def test_beta_names_replace_ga_names_where_they_differ() -> None:
    beta = EventWriter(beta_names=True)
    assert beta.event("response.output_audio.delta")["type"] == "response.audio.delta"
    assert beta.event("response.output_text.done")["type"] == "response.text.done"
    assert beta.event("response.done")["type"] == "response.done"
    assert EventWriter().event("response.output_audio.delta")["type"] == "response.output_audio.delta"


class ScriptedCall:
    """A Converse call that answers with scripted ServerEvents and records what the session sent."""

    def __init__(self, requests, replies: list[pb.ServerEvent]) -> None:
        self.sent: list[pb.ClientEvent] = []
        self._replies = asyncio.Queue()
        for reply in replies:
            self._replies.put_nowait(reply)
        self._reader = asyncio.ensure_future(self._consume(requests))

    async def _consume(self, requests) -> None:
        async for request in requests:
            self.sent.append(request)

    def reply(self, *events: pb.ServerEvent) -> None:
        for event in events:
            self._replies.put_nowait(event)

    async def read(self):
        return await self._replies.get()

    def cancel(self) -> None:
        self._reader.cancel()


class ScriptedStub:
    def __init__(self, replies: list[pb.ServerEvent]) -> None:
        self.replies = replies
        self.call: ScriptedCall | None = None

    def Converse(self, requests, metadata=()):
        self.call = ScriptedCall(requests, self.replies)
        return self.call


def server(turn: str = "", response: str = "", **event: object) -> pb.ServerEvent:
    return pb.ServerEvent(session_id="sess-1", turn_id=turn, response_id=response, **event)


def test_a_turn_is_translated_into_the_ga_event_sequence() -> None:
    async def scenario() -> tuple[list[dict], list[pb.ClientEvent]]:
        sent: list[dict] = []

        async def send(event: dict) -> None:
            sent.append(event)

        stub = ScriptedStub([server(session_started=pb.SessionStarted(settings=pb.SessionSettings(
            turn_detection="vad", vad_threshold=0.7, vad_min_silence_ms=500)))])
        session = RealtimeSession(stub=stub, metadata=(), send=send, model="m")
        await session.open()
        await session.announce()
        call = stub.call
        assert call is not None
        pump = asyncio.ensure_future(session.pump_upstream())
        await session.on_client_event("conversation.item.create", parse_client_event(json.dumps({
            "type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "hello"}]}})).model, "e-item")
        await session.on_client_event("response.create", None, "e-create")
        pcm = (np.ones(2400) * 1000).astype("<i2").tobytes()
        call.reply(
            server("t1", "r1", turn_started=pb.TurnStarted(modality="text")),
            server("t1", "r1", text_delta=pb.TextDelta(text="Hi", offset=0)),
            server("t1", "r1", audio=pb.AudioOut(pcm16=pcm, sample_rate=24000, seq=0)),
            server("t1", "r1", response_done=pb.ResponseDone(text="Hi", timings=pb.Timings(
                tokens=2, first_audio_ms=412.25))),
            server("t1", "r1", turn_deleted=pb.TurnDeleted(turn_id="t1")),
        )
        while not any(e["type"] == "conversation.item.deleted" for e in sent):
            await asyncio.sleep(0.01)
        pump.cancel()
        session.cancel()
        return sent, call.sent

    sent, upstream = asyncio.run(asyncio.wait_for(scenario(), 10))
    for event in sent:
        check_event(event)
    assert [e["type"] for e in sent] == [
        "session.created", "conversation.item.added", "conversation.item.done",
        "response.created", "response.output_item.added", "conversation.item.added",
        "response.content_part.added", "response.output_audio_transcript.delta", "response.output_audio.delta",
        "response.output_audio.done", "response.output_audio_transcript.done", "response.content_part.done",
        "response.output_item.done", "conversation.item.done", "response.done",
        "conversation.item.deleted", "conversation.item.deleted",
    ]
    kinds = [e.WhichOneof("event") for e in upstream]
    assert kinds == ["session_update", "text", "commit"]
    assert upstream[1].text.defer_commit and upstream[1].text.text == "hello"
    done = sent[14]["response"]
    assert done["status"] == "completed" and done["usage"]["output_tokens"] == 2
    assert done["metadata"]["vitaserve.first_audio_ms"] == "412.2"  # the orchestrator's timings, passed on
    assert base64.b64decode(sent[8]["delta"]) == b"\xe8\x03" * 2400  # 24 kHz in, 24 kHz out: untouched


def test_an_upstream_failure_is_an_error_event() -> None:
    class FailingCall(ScriptedCall):
        async def read(self):
            if self._replies.empty():
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                           grpc.aio.Metadata(), details="Triton is down")
            return await self._replies.get()

    class FailingStub(ScriptedStub):
        def Converse(self, requests, metadata=()):
            self.call = FailingCall(requests, self.replies)
            return self.call

    async def scenario() -> tuple[list[dict], tuple | None]:
        sent: list[dict] = []

        async def send(event: dict) -> None:
            sent.append(event)

        stub = FailingStub([server(session_started=pb.SessionStarted())])
        session = RealtimeSession(stub=stub, metadata=(), send=send, model="m")
        await session.open()
        await session.pump_upstream()
        session.cancel()
        return sent, session.closed_status

    sent, status = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert status == ("UNAVAILABLE", "Triton is down")
    (error,) = sent
    check_event(error)
    assert error["error"] == {"type": "server_error", "code": "UNAVAILABLE", "message": "Triton is down",
                              "param": None, "event_id": None}
