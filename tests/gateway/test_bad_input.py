"""Bad input to the gateway, through the official SDK and a raw WebSocket: each gets a clear `error` event
(type, code, message, the event's own event_id) and the connection goes on; an oversized message closes the
socket with 1009. Auth: the orchestrator's tenant keys decide (HTTP 401 on the upgrade). A socket closed in
the middle of a response ends the orchestrator session: its Redis keys are deleted and the tenant's stream
slot is free at once (only the store's fencing tombstone stays, until its TTL).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import urllib.request
from collections.abc import Iterator

import pytest
import redis
import websockets
from realtime_events import SCENE_PNG, Events, realtime

from vitaserve.redis_server import RedisServer, redis_server_binary
from vitaserve.stack import GatewayProcess, LocalStack, OrchestratorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

KEY = "vs-test-key-acme"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=180))


def ws_url(gateway_url: str) -> str:
    return gateway_url.replace("http://", "ws://") + "/v1/realtime?model=vitaserve"


async def raw_error(ws: websockets.ClientConnection, message: str | bytes) -> dict:
    await ws.send(message)
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if event["type"] == "error":
            return event["error"]


def test_garbage_unknown_and_malformed_events_get_errors_and_the_connection_goes_on(
        gateway_stack: LocalStack) -> None:
    async def scenario() -> tuple[list[dict], dict]:
        async with websockets.connect(ws_url(gateway_stack.gateway_url)) as ws:
            created = json.loads(await ws.recv())
            assert created["type"] == "session.created"
            errors = [
                await raw_error(ws, "{not json"),
                await raw_error(ws, b"\xff\xfe garbage bytes"),
                await raw_error(ws, "[1, 2, 3]"),
                await raw_error(ws, json.dumps({"event_id": "e-unknown", "type": "response.explode"})),
                await raw_error(ws, json.dumps({"event_id": "e-noaudio", "type": "input_audio_buffer.append"})),
                await raw_error(ws, json.dumps({"event_id": "e-b64", "type": "input_audio_buffer.append",
                                                "audio": "%%% not base64 %%%"})),
                await raw_error(ws, json.dumps({"event_id": "e-odd", "type": "input_audio_buffer.append",
                                                "audio": base64.b64encode(b"\x00\x01\x02").decode()})),
                await raw_error(ws, json.dumps({"type": "session.update", "session": {
                    "type": "realtime", "audio": {"input": {"format": {"type": "audio/pcmu"}}}}})),
                await raw_error(ws, json.dumps({"type": "session.update", "session": {
                    "type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}})),
                await raw_error(ws, json.dumps({"type": "session.update", "session": {
                    "type": "realtime", "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}})),
                await raw_error(ws, json.dumps({"type": "session.update", "session": {
                    "type": "realtime", "output_modalities": ["text", "audio"]}})),
                await raw_error(ws, json.dumps({"type": "session.update", "session": {
                    "type": "realtime", "instructions": "x" * 100_000}})),
                # found by tests/gateway/realtime_machine.py: these used to drop the connection (1006)
                await raw_error(ws, json.dumps({"type": "session.update", "session": {
                    "type": "realtime", "max_output_tokens": -1}})),
                await raw_error(ws, json.dumps({"type": "session.update", "session": {
                    "type": "realtime", "audio": {"input": {"turn_detection": {
                        "type": "server_vad", "silence_duration_ms": -5}}}}})),
            ]
            # still usable: a valid update is applied
            await ws.send(json.dumps({"type": "session.update", "session": {
                "type": "realtime", "output_modalities": ["text"]}}))
            while (event := json.loads(await ws.recv()))["type"] != "session.updated":
                pass
            return errors, event

    errors, updated = run(scenario())
    for error in errors:
        assert error["type"] == "invalid_request_error" and error["message"], error
    assert [e["code"] for e in errors[:3]] == ["invalid_json"] * 3
    assert errors[3]["event_id"] == "e-unknown" and "response.explode" in errors[3]["message"]
    assert errors[4]["event_id"] == "e-noaudio" and errors[4]["param"] == "audio"
    assert errors[5]["event_id"] == "e-b64" and "base64" in errors[5]["message"]
    assert errors[6]["event_id"] == "e-odd" and "odd number of bytes" in errors[6]["message"]
    assert errors[7]["param"] == "session.audio.input.format" and "audio/pcmu" in errors[7]["message"]
    assert "24000" in errors[8]["message"]
    assert "semantic_vad" in errors[9]["message"]
    assert errors[10]["param"] == "session.output_modalities"
    assert "system_prompt" in errors[11]["message"] or "instructions" in errors[11]["message"]
    assert errors[12]["param"] == "session.max_output_tokens" and "-1" in errors[12]["message"]
    assert errors[13]["param"] == "session.audio.input.turn_detection.silence_duration_ms"
    assert updated["session"]["output_modalities"] == ["text"]


def test_events_out_of_order_get_errors(gateway_stack: LocalStack) -> None:
    async def scenario() -> list[dict]:
        async with realtime(gateway_stack.gateway_url) as events:
            conn = events.conn
            got = []
            await conn.response.cancel(event_id="e-cancel")  # nothing to cancel
            got += await events.until("error")
            await conn.input_audio_buffer.commit(event_id="e-commit")  # server_vad commits by itself
            got += await events.until("error")
            await conn.response.create(event_id="e-create")  # nothing to answer
            got += await events.until("error")
            await conn.conversation.item.truncate(item_id="item_nope", content_index=0, audio_end_ms=10,
                                                  event_id="e-trunc")
            got += await events.until("error")
            await conn.conversation.item.delete(item_id="item_nope", event_id="e-del")
            got += await events.until("error")
            await conn.conversation.item.create(event_id="e-assistant", item={
                "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]})
            got += await events.until("error")
            await conn.conversation.item.create(event_id="e-url", item={
                "type": "message", "role": "user",
                "content": [{"type": "input_image", "image_url": "https://example.com/cat.png"}]})
            got += await events.until("error")
            await conn.send({"type": "output_audio_buffer.clear", "event_id": "e-webrtc"})
            got += await events.until("error")
            # two response.create in a row: the second is refused while the first runs
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Say hello."}]})
            await conn.response.create()
            await conn.response.create(event_id="e-twice")
            got += await events.until("error")
            got += await events.until("response.done")
            return got

    got = run(scenario())
    errors = {e["error"]["event_id"]: e["error"] for e in got if e["type"] == "error"}
    assert errors["e-cancel"]["code"] == "response_cancel_not_active"
    assert "server_vad" in errors["e-commit"]["message"]
    assert errors["e-create"]["code"] == "failed_precondition" and "nothing to commit" in errors["e-create"]["message"]
    assert errors["e-trunc"]["code"] == "item_not_found"
    assert errors["e-del"]["code"] == "item_not_found"
    assert "only user messages" in errors["e-assistant"]["message"]
    assert "data: URL" in errors["e-url"]["message"]
    assert errors["e-webrtc"]["code"] == "unsupported_event"
    assert errors["e-twice"]["code"] == "conversation_already_has_active_response"
    assert got[-1]["response"]["status"] == "completed"  # the first response was not disturbed


def test_a_corrupt_image_is_refused_and_its_item_removed(gateway_stack: LocalStack) -> None:
    corrupt = "data:image/png;base64," + base64.b64encode(SCENE_PNG.read_bytes()[:200]).decode()

    async def scenario() -> list[dict]:
        async with realtime(gateway_stack.gateway_url) as events:
            await events.conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                                      "audio": {"input": {"turn_detection": None}}})
            await events.until("session.updated")
            await events.conn.conversation.item.create(event_id="e-corrupt", item={
                "type": "message", "role": "user", "content": [{"type": "input_image", "image_url": corrupt}]})
            got = await events.until("conversation.item.deleted")
            # the session goes on: a text turn is answered, without the refused image
            await events.conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Say hello."}]})
            await events.conn.response.create()
            return got + await events.until("response.done")

    got = run(scenario())
    (error,) = [e["error"] for e in got if e["type"] == "error"]
    assert error["event_id"] == "e-corrupt" and error["code"] == "invalid_argument"
    added = next(e["item"]["id"] for e in got if e["type"] == "conversation.item.added")
    assert next(e for e in got if e["type"] == "conversation.item.deleted")["item_id"] == added
    assert got[-1]["response"]["status"] == "completed"


def test_an_oversized_message_closes_the_socket_with_1009(gateway_stack: LocalStack) -> None:
    async def scenario() -> int:
        async with websockets.connect(ws_url(gateway_stack.gateway_url), max_size=None) as ws:
            await ws.recv()
            huge = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (9 * 1024 * 1024)})
            await ws.send(huge)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 30)
            return closed.value.rcvd.code if closed.value.rcvd else -1

    assert run(scenario()) == 1009


# ---- auth and clean-up, on an orchestrator with keys and Redis, over the same Triton ---------------------


@pytest.fixture(scope="module")
def keyed_gateway(gateway_stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    if redis_server_binary() is None:
        pytest.fail("redis-server is not installed: `apt-get install -y redis-server` (the Makefile does)")
    work = tmp_path_factory.mktemp("keyed")
    keys = work / "keys.json"
    keys.write_text(json.dumps({"tenants": {"acme": {"max_streams": 1}},
                                "keys": [{"sha256": hashlib.sha256(KEY.encode()).hexdigest(), "tenant": "acme"}]}))
    with RedisServer(work_dir=work / "redis") as redis_server:
        orchestrator = OrchestratorProcess({  # DEBUG: what it logs at its most verbose must hold no key
            "VITASERVE_BACKEND": "triton", "VITASERVE_TRITON_URL": gateway_stack.triton_url,
            "VITASERVE_MODEL_FAMILY": "small", "VITASERVE_API_KEYS_FILE": str(keys),
            "VITASERVE_SESSION_STORE": "redis", "VITASERVE_REDIS_URL": redis_server.url,
            "VITASERVE_LOG_LEVEL": "DEBUG",
        }, log_path=work / "orchestrator.log").start()
        try:
            gateway = GatewayProcess(orchestrator.address, log_path=work / "gateway.log",
                                     env={"VITASERVE_GATEWAY_LOG_LEVEL": "debug"}).start()
            try:
                yield gateway, redis_server, work
            finally:
                gateway.stop()
        finally:
            orchestrator.stop()


def test_a_missing_or_wrong_key_is_http_401_and_a_valid_one_connects(keyed_gateway: tuple,
                                                                     gateway_stack: LocalStack) -> None:
    gateway, _, work = keyed_gateway

    async def status_of(**connect) -> int:
        try:
            async with websockets.connect(ws_url(gateway.url), **connect) as ws:
                await ws.recv()
                return 101
        except websockets.InvalidStatus as exc:
            body = json.loads(exc.response.body)
            assert body["error"]["code"] == "unauthenticated" and body["error"]["message"], body
            return exc.response.status_code

    assert run(status_of()) == 401
    assert run(status_of(additional_headers={"Authorization": "Bearer wrong-key"})) == 401
    assert run(status_of(additional_headers={"Authorization": f"Bearer {KEY}"})) == 101
    # browsers: the key as a subprotocol
    assert run(status_of(subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"])) == 101

    async def sdk() -> str:
        async with realtime(gateway.url, api_key=KEY) as events:
            return events.created["session"]["id"]

    assert run(sdk()).startswith("sess-")
    # API keys never in logs: every log file of the run (this orchestrator and gateway at DEBUG, Redis, and
    # the shared stack's Triton, orchestrator and gateway), for each key used and the prefix of its hash
    logs = {p: p.read_text(errors="replace") for d in (work, gateway_stack.work_dir) for p in d.rglob("*.log")}
    assert {"gateway.log", "orchestrator.log", "triton.log"} <= {p.name for p in logs}, sorted(logs)
    assert "DEBUG" in logs[work / "orchestrator.log"]  # the level really is DEBUG
    for secret in (KEY, "wrong-key"):
        for needle in (secret, hashlib.sha256(secret.encode()).hexdigest()[:12]):
            leaks = [p.name for p, text in logs.items() if needle in text]
            assert not leaks, f"{needle!r} is in {leaks}"


def test_a_socket_closed_mid_response_ends_the_session_and_frees_the_tenants_stream(keyed_gateway: tuple) -> None:
    gateway, redis_server, _ = keyed_gateway
    client = redis.Redis.from_url(redis_server.url)

    async def scenario() -> str:
        async with realtime(gateway.url, api_key=KEY) as events:
            session_id = events.created["session"]["id"]
            await events.conn.session.update(session={"type": "realtime",
                                                      "audio": {"input": {"turn_detection": None}}})
            await events.until("session.updated")
            await events.conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Tell me a long story about a cat."}]})
            await events.conn.response.create()
            await events.until("response.output_audio.delta")
            assert client.exists(f"vitaserve:t:{{acme}}:session:{session_id}")
        return session_id  # the socket is closed here, mid-response

    session_id = run(scenario())

    async def reconnect() -> Events:  # max_streams=1: only possible once the old stream is gone
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            try:
                async with realtime(gateway.url, api_key=KEY) as events:
                    return events
            except Exception:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)

    run(reconnect())
    key = f"vitaserve:t:{{acme}}:session:{session_id}"
    assert not client.exists(key)  # the record is deleted, the stream's lease released
    assert client.zscore("vitaserve:t:{acme}:streams", session_id) is None
    assert client.ttl(f"{key}:epoch") > 0  # only the fencing tombstone stays, and it expires (redis_store.py)
    deadline = time.monotonic() + 10  # the gateway's own count of open sockets returns to 0
    while True:
        with urllib.request.urlopen(f"{gateway.url}/metrics") as reply:
            if "vitaserve_gateway_sessions 0.0" in reply.read().decode():
                break
        assert time.monotonic() < deadline, "the gateway still counts open sessions"
        time.sleep(0.1)


def test_the_page_and_probes_are_served(gateway_stack: LocalStack) -> None:
    with urllib.request.urlopen(f"{gateway_stack.gateway_url}/") as reply:
        assert reply.status == 200 and b"<html" in reply.read().lower()
    with urllib.request.urlopen(f"{gateway_stack.gateway_url}/readyz") as reply:
        assert reply.status == 200

