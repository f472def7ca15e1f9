"""The official `openai` SDK's realtime client, unmodified, against the gateway in front of the real stack
(small family: Whisper, EfficientNet + OCR, SmolLM2, hibari on real Triton; the orchestrator process; the
gateway process). Every server event is validated against the SDK's model of its type (realtime_events.py).
"""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
from realtime_events import SCENE_PNG, append_audio, pcm_of, realtime, types, wav_pcm16_24k

from vitaserve.stack import LocalStack

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

MANUAL_AUDIO = {"type": "realtime", "output_modalities": ["audio"],
                "audio": {"input": {"turn_detection": None}}}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=240))


def user_text(text: str) -> dict:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def test_session_created_and_updated_describe_the_session(gateway_stack: LocalStack) -> None:
    async def scenario() -> tuple[dict, dict]:
        async with realtime(gateway_stack.gateway_url, model="vitaserve-small") as events:
            await events.conn.session.update(session={
                "type": "realtime", "output_modalities": ["text"], "instructions": "Answer in one word.",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                                    "turn_detection": {"type": "server_vad", "threshold": 0.6,
                                                       "silence_duration_ms": 400,
                                                       "interrupt_response": False}},
                          "output": {"format": {"type": "audio/pcm", "rate": 24000}}},
            })
            (updated,) = await events.until("session.updated")
            return events.created, updated

    created, updated = run(scenario())
    session = created["session"]
    assert session["type"] == "realtime" and session["model"] == "vitaserve-small"
    assert session["id"].startswith("sess-")
    assert session["output_modalities"] == ["audio"]
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    new = updated["session"]
    assert new["id"] == session["id"]
    assert new["output_modalities"] == ["text"] and new["instructions"] == "Answer in one word."
    detection = new["audio"]["input"]["turn_detection"]
    assert detection["threshold"] == pytest.approx(0.6) and detection["silence_duration_ms"] == 400
    assert detection["interrupt_response"] is False


def test_a_spoken_question_streamed_in_20ms_chunks_is_transcribed_and_answered_with_audio(
        gateway_stack: LocalStack) -> None:
    """server_vad (the default): the WAV appended in 20 ms chunks, then silence; the server detects the end of
    speech, commits, transcribes and answers with audio deltas that decode to PCM16 at 24 kHz."""
    async def scenario() -> list[dict]:
        async with realtime(gateway_stack.gateway_url) as events:
            await append_audio(events, wav_pcm16_24k(pad_s=1.5), chunk_ms=20)
            return await events.until("response.done", timeout=180)

    got = run(scenario())
    kinds = types(got)
    assert "error" not in kinds, [e for e in got if e["type"] == "error"]
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
             "input_audio_buffer.committed", "response.created", "response.output_audio.delta",
             "response.output_audio_transcript.done", "response.done"]
    positions = [kinds.index(k) for k in order]
    assert positions == sorted(positions), kinds
    started, stopped, committed = (next(e for e in got if e["type"] == k) for k in order[:3])
    assert started["item_id"] == stopped["item_id"] == committed["item_id"]
    assert stopped["audio_end_ms"] > started["audio_start_ms"]
    user_item = next(e["item"] for e in got if e["type"] == "conversation.item.added"
                     and e["item"]["role"] == "user")
    assert user_item["id"] == committed["item_id"]
    (transcription,) = [e for e in got if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert transcription["item_id"] == committed["item_id"]
    heard = transcription["transcript"].lower()
    assert "animal" in heard and "picture" in heard, heard
    deltas = [e for e in got if e["type"] == "response.output_audio.delta"]
    (done,) = [e for e in got if e["type"] == "response.done"]
    response = done["response"]
    assert response["status"] == "completed" and response["usage"]["output_tokens"] > 0
    assert {d["response_id"] for d in deltas} == {response["id"]}
    assert {d["item_id"] for d in deltas} == {response["output"][0]["id"]}
    pcm = pcm_of(deltas)
    assert len(pcm) / 24000 > 0.5 and np.abs(pcm).max() > 1000  # speech, not silence
    transcript = next(e for e in got if e["type"] == "response.output_audio_transcript.done")["transcript"]
    streamed = "".join(e["delta"] for e in got if e["type"] == "response.output_audio_transcript.delta")
    assert transcript.strip() and streamed.strip() == transcript.strip()
    assert response["output"][0]["content"][0] == {"type": "output_audio", "transcript": transcript}


def test_a_manual_turn_with_an_image_and_text_gets_an_answer_about_the_image(gateway_stack: LocalStack) -> None:
    image = "data:image/png;base64," + base64.b64encode(SCENE_PNG.read_bytes()).decode()

    async def scenario() -> list[dict]:
        async with realtime(gateway_stack.gateway_url) as events:
            await events.conn.session.update(session={**MANUAL_AUDIO, "output_modalities": ["text"]})
            await events.until("session.updated")
            await events.conn.conversation.item.create(item={
                "type": "message", "role": "user",
                "content": [{"type": "input_image", "image_url": image},
                            {"type": "input_text", "text": "What animal is in this picture?"}]})
            await events.conn.response.create()
            return await events.until("response.done", timeout=180)

    got = run(scenario())
    assert "error" not in types(got), got
    added = next(e for e in got if e["type"] == "conversation.item.added")
    assert [p["type"] for p in added["item"]["content"]] == ["input_image", "input_text"]
    text = next(e for e in got if e["type"] == "response.output_text.done")["text"]
    assert "response.output_audio.delta" not in types(got)  # text output: no audio
    assert "cat" in text.lower(), text


def test_response_cancel_mid_response_stops_it_and_history_keeps_what_was_heard(
        gateway_stack: LocalStack) -> None:
    async def scenario() -> tuple[list[dict], list[dict], dict]:
        async with realtime(gateway_stack.gateway_url) as events:
            await events.conn.session.update(session=MANUAL_AUDIO)
            await events.until("session.updated")
            await events.conn.conversation.item.create(item=user_text(
                "Tell me a long story about a cat who lives in a pizza shop."))
            await events.conn.response.create()
            before = await events.until("response.output_audio.delta", timeout=120)
            await events.conn.response.cancel()
            after = await events.until("response.done", timeout=30)
            assistant = next(e for e in before if e["type"] == "response.output_item.added")["item"]["id"]
            await events.conn.conversation.item.retrieve(item_id=assistant)
            (retrieved,) = await events.until("conversation.item.retrieved")
            return before, after, retrieved

    before, after, retrieved = run(scenario())
    done = after[-1]["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled", "error": None} or \
        (done["status_details"]["type"], done["status_details"]["reason"]) == ("cancelled", "client_cancelled")
    heard = next(e for e in after if e["type"] == "response.output_audio_transcript.done")["transcript"]
    streamed = "".join(e["delta"] for e in before + after if e["type"] == "response.output_audio_transcript.delta")
    assert len(heard) < len(streamed) or not streamed  # cut to what the audio had reached
    assert retrieved["item"]["status"] == "incomplete"
    assert retrieved["item"]["content"][0]["transcript"] == heard


def test_truncate_cuts_the_reply_to_what_was_heard_and_refuses_past_its_audio(gateway_stack: LocalStack) -> None:
    async def scenario() -> tuple[list[dict], list[dict], list[dict], dict]:
        async with realtime(gateway_stack.gateway_url) as events:
            await events.conn.session.update(session=MANUAL_AUDIO)
            await events.until("session.updated")
            await events.conn.conversation.item.create(item=user_text("What is the capital of France?"))
            await events.conn.response.create()
            turn = await events.until("response.done", timeout=120)
            item = turn[-1]["response"]["output"][0]
            audio_ms = len(pcm_of([e for e in turn if e["type"] == "response.output_audio.delta"])) / 24
            await events.conn.conversation.item.truncate(item_id=item["id"], content_index=0,
                                                         audio_end_ms=int(audio_ms) + 5000)
            refused = await events.until("error")
            await events.conn.conversation.item.truncate(item_id=item["id"], content_index=0, audio_end_ms=400)
            truncated = await events.until("conversation.item.truncated")
            await events.conn.conversation.item.retrieve(item_id=item["id"])
            (retrieved,) = await events.until("conversation.item.retrieved")
            return turn, refused, truncated, retrieved

    turn, refused, truncated, retrieved = run(scenario())
    full = next(e for e in turn if e["type"] == "response.output_audio_transcript.done")["transcript"]
    assert "already shorter" in refused[-1]["error"]["message"]
    assert refused[-1]["error"]["type"] == "invalid_request_error"
    event = truncated[-1]
    assert event["audio_end_ms"] == 400 and event["content_index"] == 0
    assert event["item_id"] == retrieved["item"]["id"]
    cut = retrieved["item"]["content"][0]["transcript"]
    assert len(cut) < len(full) and full.startswith(cut.strip()[:3])


def test_speech_over_a_reply_interrupts_it_when_interrupt_response_is_true(gateway_stack: LocalStack) -> None:
    """Barge-in through server_vad: the orchestrator's policy interrupts the reply (reason turn_detected),
    and the utterance becomes the next turn."""
    async def scenario() -> tuple[list[dict], list[dict]]:
        async with realtime(gateway_stack.gateway_url) as events:
            await events.conn.session.update(session={"type": "realtime", "audio": {"input": {
                "turn_detection": {"type": "server_vad", "interrupt_response": True}}}})
            await events.until("session.updated")
            await events.conn.conversation.item.create(item=user_text(
                "Tell me a long story about a cat who lives in a pizza shop."))
            await events.conn.response.create()
            first = await events.until("response.output_audio.delta", timeout=120)
            speaking = asyncio.create_task(append_audio(events, wav_pcm16_24k(pad_s=1.5), realtime_pace=True))
            rest = await events.until("response.done", timeout=60)
            rest += await events.until("response.done", timeout=120)  # the spoken question's own reply
            await speaking
            return first, rest

    _, rest = run(scenario())
    kinds = types(rest)
    cancelled = rest[kinds.index("response.done")]["response"]
    assert cancelled["status"] == "cancelled" and cancelled["status_details"]["reason"] == "turn_detected"
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("response.done")
    answered = rest[-1]["response"]
    assert answered["status"] == "completed" and answered["id"] != cancelled["id"]
    transcripts = [e["transcript"] for e in rest if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert transcripts and "animal" in transcripts[-1].lower()


def test_speech_over_a_reply_does_not_interrupt_it_when_interrupt_response_is_false(
        gateway_stack: LocalStack) -> None:
    async def scenario() -> list[dict]:
        async with realtime(gateway_stack.gateway_url) as events:
            await events.conn.session.update(session={"type": "realtime", "audio": {"input": {
                "turn_detection": {"type": "server_vad", "interrupt_response": False}}}})
            await events.until("session.updated")
            await events.conn.conversation.item.create(item=user_text("What is the capital of France?"))
            await events.conn.response.create()
            got = await events.until("response.output_audio.delta", timeout=120)
            await append_audio(events, wav_pcm16_24k(pad_s=1.0))
            got += await events.until("response.done", timeout=60)
            return got

    got = run(scenario())
    assert got[-1]["response"]["status"] == "completed"


def test_delete_removes_a_whole_turn_and_clear_empties_the_input_buffer(gateway_stack: LocalStack) -> None:
    async def scenario() -> tuple[list[dict], list[dict], list[dict]]:
        async with realtime(gateway_stack.gateway_url) as events:
            await events.conn.session.update(session={**MANUAL_AUDIO, "output_modalities": ["text"]})
            await events.until("session.updated")
            await events.conn.conversation.item.create(item=user_text("Say hello."))
            await events.conn.response.create()
            turn = await events.until("response.done", timeout=120)
            user = next(e["item"]["id"] for e in turn if e["type"] == "conversation.item.added")
            await events.conn.conversation.item.delete(item_id=user)
            deleted = [await events.next(), await events.next()]
            await append_audio(events, wav_pcm16_24k()[:24000 * 2])
            await events.conn.input_audio_buffer.clear()
            cleared = await events.until("input_audio_buffer.cleared")
            await events.conn.input_audio_buffer.commit()
            empty = await events.until("error")
            return turn, deleted, cleared + empty

    turn, deleted, rest = run(scenario())
    assistant = turn[-1]["response"]["output"][0]["id"]
    user = next(e["item"]["id"] for e in turn if e["type"] == "conversation.item.added")
    assert {e["type"] for e in deleted} == {"conversation.item.deleted"}
    assert {e["item_id"] for e in deleted} == {user, assistant}
    assert rest[-1]["error"]["code"] == "input_audio_buffer_commit_empty"


def test_beta_event_names_on_request(gateway_stack: LocalStack) -> None:
    """Clients written against the beta API ask with ?event_names=beta."""
    import json

    import websockets

    url = gateway_stack.gateway_url.replace("http://", "ws://") + "/v1/realtime?model=m&event_names=beta"

    async def scenario() -> list[dict]:
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "session.update", "session": MANUAL_AUDIO}))
            await ws.send(json.dumps({"type": "conversation.item.create", "item": user_text("Say hello.")}))
            await ws.send(json.dumps({"type": "response.create"}))
            got = []
            while not got or got[-1]["type"] != "response.done":
                got.append(json.loads(await asyncio.wait_for(ws.recv(), 120)))
            return got

    kinds = types(run(scenario()))
    assert {"response.audio.delta", "response.audio_transcript.delta", "response.audio_transcript.done",
            "response.audio.done", "conversation.item.created"} <= set(kinds)
    assert not [k for k in kinds if k.startswith(("response.output_audio", "response.output_text"))]
