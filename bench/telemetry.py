"""What telemetry costs on the hot path: one step of a component stream, and one whole component call.

    python bench/telemetry.py [--json] [--steps 200000] [--calls 20000]

A scripted component whose streams yield at once (no model, no I/O), so only the wrapper is measured:
- `raw`: the component itself;
- `off`: through `InstrumentedComponents` with tracing off (the default: no tracer provider, no-op spans);
- `on`: through it with the SDK tracer provider recording every span (an in-memory exporter behind the
  SDK's batch processor, as with OTLP).
Prints per stream step (a token or an audio chunk) and per call (a `generate` stream opened and read
to its end of 8 tokens, inside a turn span) the cost in microseconds, and what `off` and `on` add over
`raw`. Timings are of this machine at this moment: on a shared machine, compare the differences only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence

import numpy as np
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from vitaserve.components.base import (
    ComponentClient,
    Encoding,
    GenerationParams,
    Health,
    SpeechChunk,
    TokenDelta,
)
from vitaserve_orchestrator.instrumented import InstrumentedComponents
from vitaserve_orchestrator.telemetry import Telemetry, setup_tracing


class Instant(ComponentClient):
    """Streams of `n` tokens that never wait."""

    def __init__(self, n: int) -> None:
        self.n = n

    async def encode_images(self, images, *, request_id=""):  # noqa: ANN001, ANN201
        return []

    async def encode_audio(self, pcm, *, request_id=""):  # noqa: ANN001, ANN201
        return Encoding(embeddings=np.zeros((1, 1), np.float32))

    async def generate(self, prompt: str, media: Sequence[np.ndarray], params: GenerationParams, *,
                       request_id: str = "", session_id: str = "") -> AsyncIterator[TokenDelta]:
        for k in range(self.n):
            yield TokenDelta(k, "x", "stop" if k == self.n - 1 else None)

    async def synthesize(self, text: str, *, first_sentence: bool = False, seed: int | None = None,
                         request_id: str = "") -> AsyncIterator[SpeechChunk]:
        yield SpeechChunk(np.zeros(1, np.float32), 24000)

    async def health(self) -> Health:
        return Health({})


async def per_step(components: ComponentClient, steps: int) -> float:
    stream = components.generate("p", [], GenerationParams())
    started = time.perf_counter()
    async for _ in stream:
        pass
    return (time.perf_counter() - started) / steps * 1e6


async def per_call(components: ComponentClient, telemetry: Telemetry, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        with telemetry.tracer.start_as_current_span("turn"):
            async for _ in components.generate("p", [], GenerationParams()):
                pass
    return (time.perf_counter() - started) / calls * 1e6


async def main(steps: int, calls: int) -> dict[str, float]:
    off = Telemetry()
    provider = setup_tracing(otlp_endpoint=None, exporter=InMemorySpanExporter())
    on = Telemetry(provider=provider)
    out: dict[str, float] = {}
    for name, telemetry, wrap in (("raw", off, False), ("off", off, True), ("on", on, True)):
        long = Instant(steps)
        out[f"step_{name}_us"] = await per_step(InstrumentedComponents(long, telemetry) if wrap else long, steps)
        short = Instant(8)
        client = InstrumentedComponents(short, telemetry) if wrap else short
        out[f"call_{name}_us"] = await per_call(client, telemetry, calls)
    for kind in ("step", "call"):
        out[f"{kind}_added_off_us"] = out[f"{kind}_off_us"] - out[f"{kind}_raw_us"]
        out[f"{kind}_added_on_us"] = out[f"{kind}_on_us"] - out[f"{kind}_raw_us"]
    assert provider is not None
    provider.shutdown()
    return {k: round(v, 2) for k, v in out.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(main(args.steps, args.calls))
    print(json.dumps(result) if args.json else "\n".join(f"{k:24s} {v}" for k, v in result.items()))
