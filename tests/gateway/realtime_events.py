"""Test helpers around the official `openai` SDK's realtime connection: every server event the gateway sends is
validated against the SDK's own model of that event type (the SDK itself does not validate what it receives),
then handed to the test as the plain JSON dict, so tests check fields, not only types."""

from __future__ import annotations

import asyncio
import base64
import json
import typing
import wave
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import soxr
from openai import AsyncOpenAI
from openai.types.realtime import RealtimeServerEvent

EXAMPLES = Path(__file__).parents[2] / "examples" / "media"
QUESTION_WAV = EXAMPLES / "small_question.wav"
SCENE_PNG = EXAMPLES / "scene.png"


def wav_pcm16_24k(path: Path = QUESTION_WAV, *, pad_s: float = 0.0) -> bytes:
    """A mono WAV as 24 kHz PCM16 (the Realtime wire format), with `pad_s` of silence after it."""
    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    if rate != 24000:
        pcm = soxr.resample(pcm, rate, 24000)
    pcm = np.concatenate([pcm, np.zeros(int(pad_s * 24000), np.float32)])
    return (np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()


def _server_models() -> dict[str, type[pydantic.BaseModel]]:
    union = typing.get_args(RealtimeServerEvent)[0]
    models = {}
    for model in typing.get_args(union):
        (kind,) = typing.get_args(model.model_fields["type"].annotation)
        models[kind] = model
    return models


SERVER_EVENTS = _server_models()
# Names the SDK's GA union does not list but that clients of the beta API know.
BETA_ONLY = {"response.audio.delta", "response.audio.done", "response.audio_transcript.delta",
             "response.audio_transcript.done", "response.text.delta", "response.text.done"}


def check_event(data: dict[str, Any]) -> None:
    """Raises if `data` is not a valid server event of its type (required fields, types, literals)."""
    assert isinstance(data.get("event_id"), str) and data["event_id"], data
    model = SERVER_EVENTS.get(data["type"])
    if model is None:
        assert data["type"] in BETA_ONLY, f"unknown server event type {data['type']!r}"
        return
    model.model_validate(data)


class Events:
    """The server events of one connection, validated, recorded in order."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.seen: list[dict[str, Any]] = []

    async def next(self, timeout: float = 60.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.conn.recv_bytes(), timeout)
        data = json.loads(raw)
        check_event(data)
        self.seen.append(data)
        return data

    async def until(self, *types: str, timeout: float = 120.0) -> list[dict[str, Any]]:
        """Events up to and including the first of `types`."""
        got: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = await self.next(max(0.1, deadline - loop.time()))
            got.append(event)
            if event["type"] in types:
                return got

    async def send(self, event: dict[str, Any]) -> None:
        await self.conn.send(event)


@asynccontextmanager
async def realtime(url: str, *, api_key: str = "unused", model: str = "vitaserve", **connect: Any):
    """An SDK realtime connection to the gateway at `url` (http://host:port) and its `Events`, after the
    first event (session.created), which is returned as `events.created`."""
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key)
    async with client.realtime.connect(model=model, **connect) as conn:
        events = Events(conn)
        events.created = await events.next()  # type: ignore[attr-defined]
        assert events.created["type"] == "session.created", events.created  # type: ignore[attr-defined]
        yield events


def pcm_of(deltas: list[dict[str, Any]]) -> np.ndarray:
    """The PCM16 samples of response.output_audio.delta events."""
    data = b"".join(base64.b64decode(d["delta"]) for d in deltas)
    assert len(data) % 2 == 0
    return np.frombuffer(data, dtype="<i2")


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def b64(pcm16: bytes) -> str:
    return base64.b64encode(pcm16).decode("ascii")


async def append_audio(events: Events, pcm16_24k: bytes, *, chunk_ms: int = 20, realtime_pace: bool = False) -> None:
    """input_audio_buffer.append in chunks of `chunk_ms` (as a microphone would send them)."""
    step = 24 * chunk_ms * 2
    for start in range(0, len(pcm16_24k), step):
        await events.conn.input_audio_buffer.append(audio=b64(pcm16_24k[start:start + step]))
        if realtime_pace:
            await asyncio.sleep(chunk_ms / 1000)
