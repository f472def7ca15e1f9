"""The component client seen through telemetry: a span per component call and its errors counted.

`InstrumentedComponents(inner, telemetry)` is a `ComponentClient` wrapping any other (Triton, in-process).
Each call gets a span, a child of the current one (the turn's):

    vision_encoder.encode    encode_images (attribute vitaserve.images)
    audio_encoder.encode     encode_audio (vitaserve.audio_samples)
    llm_decoder.generate     the whole token stream (vitaserve.tokens when it ends)
    speech_synth.synthesize  the whole audio stream of one text segment (vitaserve.chunks)

The span is the current one while the inner client works, so `TritonComponents` sends its W3C trace
context (`traceparent`) in the Triton request's headers. For a stream the span is made current only
around each step of the inner iterator (never across a yield into the caller's code), and it ends when
the stream ends, fails or is closed. A `VitaserveError` raised by a call is counted in
`vitaserve_component_errors_total{component, code}` and marks the span as failed; cancellation (an
interruption, a closed stream) is not an error. No per-token span: a stream step costs one context
attach/detach.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from vitaserve.components.base import (
    ComponentClient,
    Encoding,
    GenerationParams,
    Health,
    ImageInput,
    SpeechChunk,
    TokenDelta,
)
from vitaserve.errors import VitaserveError
from vitaserve_orchestrator.telemetry import Telemetry


class InstrumentedComponents(ComponentClient):
    """`inner` with a span per call and its errors counted (see the module docstring)."""

    def __init__(self, inner: ComponentClient, telemetry: Telemetry) -> None:
        self.inner = inner
        self._telemetry = telemetry
        self._tracer = telemetry.tracer
        self._errors = telemetry.metrics.component_errors

    def _failed(self, component: str, span: Span, exc: BaseException) -> None:
        if isinstance(exc, VitaserveError):
            self._errors.labels(component, exc.code).inc()
            span.set_status(Status(StatusCode.ERROR, f"{exc.code}: {exc.message}"))
            span.set_attribute("vitaserve.error_code", exc.code)

    async def encode_images(self, images: Sequence[ImageInput], *, request_id: str = "") -> list[Encoding]:
        with self._tracer.start_as_current_span(
            "vision_encoder.encode", attributes={"vitaserve.request_id": request_id,
                                                 "vitaserve.images": len(images)},
            record_exception=False, set_status_on_exception=False,
        ) as span:
            try:
                return await self.inner.encode_images(images, request_id=request_id)
            except BaseException as exc:
                self._failed("vision_encoder", span, exc)
                raise

    async def encode_audio(self, pcm: np.ndarray, *, request_id: str = "") -> Encoding:
        with self._tracer.start_as_current_span(
            "audio_encoder.encode", attributes={"vitaserve.request_id": request_id,
                                                "vitaserve.audio_samples": int(np.size(pcm))},
            record_exception=False, set_status_on_exception=False,
        ) as span:
            try:
                return await self.inner.encode_audio(pcm, request_id=request_id)
            except BaseException as exc:
                self._failed("audio_encoder", span, exc)
                raise

    def generate(
        self,
        prompt: str,
        media: Sequence[np.ndarray],
        params: GenerationParams,
        *,
        request_id: str = "",
        session_id: str = "",
    ) -> AsyncIterator[TokenDelta]:
        span = self._tracer.start_span("llm_decoder.generate", attributes={
            "vitaserve.request_id": request_id, "vitaserve.session_id": session_id,
            "vitaserve.media": len(media), "vitaserve.max_tokens": params.max_tokens})
        stream = self.inner.generate(prompt, media, params, request_id=request_id, session_id=session_id)
        return _TracedStream("llm_decoder", stream, span, self._failed, "vitaserve.tokens")

    async def warm_prefix(self, prompt: str, *, session_id: str, request_id: str = "") -> int:
        """A span of its own (`llm_decoder.warm_prefix`, in whatever trace is current: the session's),
        around the inner client's warm-up, so its Triton request carries that span, not a turn's."""
        with self._tracer.start_as_current_span(
            "llm_decoder.warm_prefix", attributes={"vitaserve.request_id": request_id,
                                                   "vitaserve.session_id": session_id,
                                                   "vitaserve.prompt_chars": len(prompt)},
            record_exception=False, set_status_on_exception=False,
        ) as span:
            try:
                return await self.inner.warm_prefix(prompt, session_id=session_id, request_id=request_id)
            except BaseException as exc:
                self._failed("llm_decoder", span, exc)
                raise

    def synthesize(
        self, text: str, *, first_sentence: bool = False, seed: int | None = None, request_id: str = ""
    ) -> AsyncIterator[SpeechChunk]:
        span = self._tracer.start_span("speech_synth.synthesize", attributes={
            "vitaserve.request_id": request_id, "vitaserve.text_chars": len(text),
            "vitaserve.first_sentence": first_sentence})
        stream = self.inner.synthesize(text, first_sentence=first_sentence, seed=seed, request_id=request_id)
        return _TracedStream("speech_synth", stream, span, self._failed, "vitaserve.chunks")

    async def health(self) -> Health:
        return await self.inner.health()

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:  # e.g. TritonComponents.router, .urls for status pages
        return getattr(self.inner, name)


class _TracedStream:
    """An async iterator over `inner` that runs each step with `span` current and ends the span once."""

    def __init__(self, component: str, inner: AsyncIterator[Any], span: Span,
                 failed: Callable[[str, Span, BaseException], None], count_attribute: str) -> None:
        self._component = component
        self._inner = aiter(inner)
        self._span = span
        self._context = trace.set_span_in_context(span)
        self._failed = failed
        self._count_attribute = count_attribute
        self._items = 0
        self._open = True

    def __aiter__(self) -> _TracedStream:
        return self

    async def __anext__(self) -> Any:
        token = otel_context.attach(self._context)
        try:
            item = await anext(self._inner)
        except StopAsyncIteration:
            self._end()
            raise
        except BaseException as exc:
            self._failed(self._component, self._span, exc)
            self._end(cancelled=not isinstance(exc, Exception))
            raise
        finally:
            otel_context.detach(token)
        self._items += 1
        return item

    async def aclose(self) -> None:
        token = otel_context.attach(self._context)
        try:
            close = getattr(self._inner, "aclose", None)
            if close is not None:
                await close()
        finally:
            otel_context.detach(token)
            self._end()

    def _end(self, *, cancelled: bool = False) -> None:
        if not self._open:
            return
        self._open = False
        self._span.set_attribute(self._count_attribute, self._items)
        if cancelled:
            self._span.set_attribute("vitaserve.cancelled", True)
        self._span.end()
