"""A Python client for the orchestrator's Converse stream, and a CLI that talks to a running orchestrator.

    python -m vitaserve.client --address 127.0.0.1:50051 [--image cat.png] [--wav question.wav]
                               [--text "What is this?"] [--out reply.wav]

Library use:

    async with Conversation.open("127.0.0.1:50051") as conv:
        await conv.send_image(png_bytes)
        await conv.send_audio(pcm16_bytes)        # 16 kHz mono int16
        await conv.commit()
        async for event in conv.until_done():    # ServerEvent protobufs, ends after response_done
            ...

The client sends events from its own queue, so sending never blocks on the server's replies, and the
conversation is duplex: stream the microphone while a reply plays (the server's barge-in policy decides
whether it interrupts), and report the playback position of the reply audio:

    mic = asyncio.create_task(conv.send_audio(pcm16, chunk_ms=20, realtime=True))
    async for event in conv.events():
        ...                                   # play event.audio.pcm16; stop and flush on `interrupted`
        await conv.report_playback(event.response_id, played_ms)

The server paces reply audio to real time plus a lead (300 ms by default); a client that does not play it
(writes a file) sets `SessionSettings.playout_lead_ms` large.

Auth and TLS: `Conversation.open(address, api_key=KEY)` sends `authorization: Bearer KEY`;
`root_certificates=PEM` connects over TLS trusting that CA (b"" = the system roots), with
`private_key`/`certificate_chain` for mTLS. CLI: `--api-key` (or `VITASERVE_API_KEY`), `--tls-ca FILE`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import time
import wave
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np

from vitaserve.api.v1 import orchestrator_pb2 as pb
from vitaserve.api.v1 import orchestrator_pb2_grpc as pb_grpc

INPUT_SAMPLE_RATE = 16000
_END = object()


class Conversation:
    """One Converse stream. Create with `Conversation.open(address, ...)` as an async context manager."""

    def __init__(self, channel: grpc.aio.Channel, *, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._channel = channel
        self._outbox: asyncio.Queue[object] = asyncio.Queue()
        self._call = pb_grpc.OrchestratorStub(channel).Converse(self._requests(), metadata=metadata)
        self.session_id = ""
        self.started: pb.SessionStarted | None = None

    @classmethod
    def open(
        cls,
        address: str,
        *,
        session_id: str = "",
        settings: pb.SessionSettings | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
        max_message_bytes: int = 32 * 1024 * 1024,
        api_key: str | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        server_name: str | None = None,
    ) -> "_ConversationContext":
        """`api_key`: sent as `authorization: Bearer <key>`. `root_certificates` (PEM; b"" for the system
        roots) switches to TLS; `private_key` + `certificate_chain` add a client certificate (mTLS);
        `server_name` overrides the name checked against the server certificate."""
        if api_key:
            metadata = (*metadata, ("authorization", f"Bearer {api_key}"))
        tls = None
        if root_certificates is not None or private_key is not None:
            tls = (root_certificates or None, private_key, certificate_chain, server_name)
        return _ConversationContext(address, session_id, settings, metadata, max_message_bytes, tls)

    async def _requests(self) -> AsyncIterator[pb.ClientEvent]:
        while True:
            item = await self._outbox.get()
            if item is _END:
                return
            yield item  # type: ignore[misc]

    async def send(self, event: pb.ClientEvent) -> None:
        await self._outbox.put(event)

    async def start(self, session_id: str = "", settings: pb.SessionSettings | None = None) -> pb.SessionStarted:
        """Send the session_update that opens the stream and wait for session_started."""
        await self.send(pb.ClientEvent(session_update=pb.SessionUpdate(session_id=session_id, settings=settings)))
        event = await self.next_event()
        if event.WhichOneof("event") != "session_started":
            raise RuntimeError(f"expected session_started, got {event}")
        self.session_id = event.session_id
        self.started = event.session_started
        return event.session_started

    async def send_text(self, text: str, *, defer_commit: bool = False) -> None:
        await self.send(pb.ClientEvent(text=pb.TextInput(text=text, defer_commit=defer_commit)))

    async def send_image(self, data: bytes, *, max_tiles: int = 1) -> None:
        await self.send(pb.ClientEvent(image=pb.Image(data=data, max_tiles=max_tiles)))

    async def send_frame(self, data: bytes, timestamp_s: float) -> None:
        await self.send(pb.ClientEvent(video_frame=pb.VideoFrame(data=data, timestamp_s=timestamp_s)))

    async def send_audio(self, pcm16: bytes, *, chunk_ms: int = 100, realtime: bool = False,
                         on_chunk: Callable[[float, float], None] | None = None) -> None:
        """Send 16 kHz mono int16 PCM in chunks; `realtime` paces them like a microphone (chunk k leaves
        k·chunk_ms after the first, without drift). `on_chunk(end_ms, sent_at)`: called as each chunk is
        queued, with the end of the chunk in this call's audio (ms) and `time.monotonic()`."""
        step = INPUT_SAMPLE_RATE * chunk_ms // 1000 * 2
        t0 = time.monotonic()
        for k, start in enumerate(range(0, len(pcm16), step)):
            if realtime:
                await asyncio.sleep(max(0.0, t0 + k * chunk_ms / 1000 - time.monotonic()))
            chunk = pcm16[start:start + step]
            await self.send(pb.ClientEvent(audio=pb.AudioChunk(pcm16=chunk, sample_rate=INPUT_SAMPLE_RATE)))
            if on_chunk is not None:
                on_chunk((start + len(chunk)) / 2 * 1000 / INPUT_SAMPLE_RATE, time.monotonic())

    async def commit(self) -> None:
        await self.send(pb.ClientEvent(commit=pb.Commit()))

    async def interrupt(self, response_id: str = "") -> None:
        await self.send(pb.ClientEvent(interrupt=pb.Interrupt(response_id=response_id)))

    async def report_playback(self, response_id: str, played_ms: int) -> None:
        """Tell the server how much of the response's audio has been played (it uses the smaller of this
        and its own paced estimate for `interrupted.played_ms` and the heard text). Once the response has
        finished, this is where playback stopped: the server cuts the turn's history to the text heard by
        then and answers `history_truncated`."""
        await self.send(pb.ClientEvent(playback=pb.PlaybackPosition(response_id=response_id,
                                                                    played_ms=max(0, int(played_ms)))))

    async def next_event(self) -> pb.ServerEvent:
        event = await self._call.read()
        if event is grpc.aio.EOF:
            raise EOFError("the server closed the stream")
        return event

    async def events(self) -> AsyncIterator[pb.ServerEvent]:
        while True:
            event = await self._call.read()
            if event is grpc.aio.EOF:
                return
            yield event

    async def until_done(self) -> AsyncIterator[pb.ServerEvent]:
        """Events up to and including the next response_done, interrupted or error."""
        async for event in self.events():
            yield event
            if event.WhichOneof("event") in ("response_done", "interrupted", "error"):
                return

    async def end_input(self) -> None:
        """Half-close: the client sends nothing more; the server ends the stream once a running response
        has played out. Keep reading `events()` to the end."""
        await self._outbox.put(_END)

    async def close(self) -> None:
        await self._outbox.put(_END)
        try:
            async for _ in self.events():
                pass
        except grpc.aio.AioRpcError:
            pass


class _ConversationContext:
    def __init__(self, address: str, session_id: str, settings: pb.SessionSettings | None,
                 metadata: tuple[tuple[str, str], ...], max_message_bytes: int,
                 tls: tuple[bytes | None, bytes | None, bytes | None, str | None] | None = None) -> None:
        self._args = (address, session_id, settings, metadata, max_message_bytes)
        self._tls = tls
        self._channel: grpc.aio.Channel | None = None
        self._conv: Conversation | None = None

    async def __aenter__(self) -> Conversation:
        address, session_id, settings, metadata, max_bytes = self._args
        options = [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]
        if self._tls is None:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        else:
            roots, key, chain, server_name = self._tls
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            credentials = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key,
                                                       certificate_chain=chain)
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        self._conv = Conversation(self._channel, metadata=metadata)
        await self._conv.start(session_id, settings)
        return self._conv

    async def __aexit__(self, *exc: object) -> None:
        assert self._conv is not None and self._channel is not None
        try:
            await asyncio.wait_for(self._conv.close(), timeout=10)
        except asyncio.TimeoutError:
            pass
        await self._channel.close()


def read_wav_16k(path: str | Path) -> bytes:
    """A WAV file as 16 kHz mono int16 bytes (resampled and down-mixed when needed)."""
    from vitaserve.models.audio import decode_audio, to_mono_16k

    samples, rate = decode_audio(Path(path).read_bytes())
    mono = to_mono_16k(samples, rate)
    return (np.clip(mono, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()


def write_wav(path: str | Path, pcm16: bytes, sample_rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm16)


def describe(event: pb.ServerEvent) -> str:
    """One line per server event, for people watching the stream."""
    kind = event.WhichOneof("event")
    body = getattr(event, kind)
    if kind == "audio":
        return (f"audio      seq={body.seq} {len(body.pcm16) // 2} samples @ {body.sample_rate} Hz "
                f"text[{body.text_start}:{body.text_end}] at {body.start_ms} ms")
    if kind == "text_delta":
        return f"text       {body.text!r}"
    if kind == "response_done":
        t = body.timings
        return (f"done       mark={body.state_mark!r} tokens={t.tokens} encode={t.encode_ms:.0f} ms "
                f"first_token={t.first_token_ms:.0f} ms first_audio={t.first_audio_ms:.0f} ms "
                f"total={t.total_ms:.0f} ms audio={t.audio_ms} ms")
    if kind == "error":
        return f"error      {body.code}: {body.message}"
    if kind == "input_transcript":
        seen = "".join(f"\n{'':31s}image: {d}" for d in body.image_descriptions)
        return f"heard      {body.text!r}{seen}"
    text = str(body).replace("\n", " ").strip()
    return f"{kind:10s} {text}"


async def run_turn(conv: Conversation, *, image: bytes | None, pcm16: bytes | None, text: str | None,
                   echo: bool = True) -> tuple[str, bytes, int, list[pb.ServerEvent]]:
    """Send one turn (image, spoken question and/or text) and collect the reply text, audio and events."""
    t0 = time.perf_counter()
    if image is not None:
        await conv.send_image(image)
    if pcm16 is not None:
        await conv.send_audio(pcm16)
    if text is not None:
        await conv.send_text(text, defer_commit=pcm16 is not None)
    if pcm16 is not None:
        await conv.commit()
    audio = io.BytesIO()
    rate = 24000
    reply = ""
    events: list[pb.ServerEvent] = []
    async for event in conv.until_done():
        events.append(event)
        kind = event.WhichOneof("event")
        if echo:
            print(f"[{(time.perf_counter() - t0) * 1000:8.1f} ms] {describe(event)}", flush=True)
        if kind == "audio":
            audio.write(event.audio.pcm16)
            rate = event.audio.sample_rate
        elif kind == "response_done":
            reply = event.response_done.text
    return reply, audio.getvalue(), rate, events


async def _cli(args: argparse.Namespace) -> int:
    image = Path(args.image).read_bytes() if args.image else None
    pcm16 = read_wav_16k(args.wav) if args.wav else None
    if image is None and pcm16 is None and not args.text:
        print("nothing to send: give --image, --wav and/or --text", file=sys.stderr)
        return 2
    # The CLI writes the reply to a file instead of playing it: unpaced unless --realtime.
    settings = pb.SessionSettings(turn_detection="manual", want_audio=not args.no_audio,
                                  playout_lead_ms=None if args.realtime else 3_600_000)
    roots = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    async with Conversation.open(args.address, session_id=args.session, settings=settings,
                                 api_key=args.api_key, root_certificates=roots) as conv:
        print(f"session {conv.session_id}", flush=True)
        reply, audio, rate, events = await run_turn(conv, image=image, pcm16=pcm16, text=args.text)
    if any(e.WhichOneof("event") == "error" for e in events):
        return 1
    print(f"reply: {reply!r}")
    if args.out and audio:
        write_wav(args.out, audio, rate)
        print(f"wrote {len(audio) // 2 / rate:.2f} s of audio to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Talk to a running vitaserve orchestrator.")
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--session", default="", help="resume this session id")
    parser.add_argument("--image", help="an image file to show")
    parser.add_argument("--wav", help="a spoken question (any WAV; resampled to 16 kHz mono)")
    parser.add_argument("--text", help="a typed question")
    parser.add_argument("--out", help="write the reply audio to this WAV file")
    parser.add_argument("--no-audio", action="store_true", help="text reply only")
    parser.add_argument("--api-key", default=os.environ.get("VITASERVE_API_KEY"),
                        help="API key (default: $VITASERVE_API_KEY); sent as 'authorization: Bearer'")
    parser.add_argument("--tls-ca", help="connect over TLS, trusting this PEM CA bundle")
    parser.add_argument("--realtime", action="store_true",
                        help="receive reply audio paced to real time, as a client that plays it")
    try:
        return asyncio.run(_cli(parser.parse_args(argv)))
    except grpc.aio.AioRpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
