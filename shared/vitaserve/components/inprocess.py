"""`ComponentClient` running the engines in this process (unit tests, environments without Triton).

The engines are the model family's (`vitaserve.families`), built as the Triton models build them.

Blocking torch work runs on a small thread pool, never on the event loop. Streaming calls bridge the
engine's iterator to an async iterator: a worker thread pulls items and hands them to the loop; closing
the async iterator (`aclose()`) or cancelling the task that iterates it sets a cancel flag that the
engine polls before its next token or chunk, so the thread stops after the step in flight. The worker
does not wait for the consumer: it may run ahead by the items already queued (a few tokens).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from vitaserve.components.base import (
    COMPONENTS,
    ComponentClient,
    Encoding,
    GenerationParams,
    Health,
    ImageInput,
    SpeechChunk,
    TokenDelta,
)
from vitaserve.errors import Unavailable, VitaserveError
from vitaserve.families import EngineOptions, get_family

T = TypeVar("T")

_DONE = object()


class InProcessComponents(ComponentClient):
    """The four components as engines in this process.

    checkpoint_dir: the family's checkpoint (VITA-1.5: the released layout; the small family needs none);
        only the weights of `components` are loaded (in the constructor, which blocks:
        build it in a thread from async code if that matters).
    family: the model family whose engines are built (`vitaserve.families`).
    max_workers: threads for model work; concurrent streams beyond this wait for a free thread.
    engines: already built engines by component name (`ModelFamily.engine`), used instead of loading them
        (tests share them).
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        *,
        family: str = "",
        dtype: str = "float32",
        device: str = "cpu",
        components: Iterable[str] = COMPONENTS,
        max_workers: int = 4,
        engines: dict[str, Any] | None = None,
    ) -> None:
        self.components = tuple(components)
        unknown = sorted(set(self.components) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"unknown component(s) {unknown}; known: {', '.join(COMPONENTS)}")
        self._engines: dict[str, Any] = {k: v for k, v in (engines or {}).items() if k in self.components}
        missing = [name for name in self.components if name not in self._engines]
        if missing:
            model_family = get_family(family)
            if checkpoint_dir is None and model_family.needs_checkpoint:
                raise ValueError(f"checkpoint_dir is required to load {', '.join(missing)}")
            options = EngineOptions(str(checkpoint_dir or ""), dtype, device)
            for name in missing:
                self._engines[name] = model_family.engine(name, options)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="vitaserve-engine")
        self._active: set[threading.Event] = set()
        self._closed = False

    def engine(self, component: str) -> Any:
        if self._closed:
            raise Unavailable("the in-process components are closed")
        try:
            return self._engines[component]
        except KeyError:
            raise Unavailable(f"component {component!r} is not loaded in this process "
                              f"(loaded: {', '.join(self.components)})") from None

    # ---- unary calls -------------------------------------------------------------------------------

    async def _run(self, component: str, fn: Callable[..., T], *args: Any) -> T:
        self.engine(component)
        future = asyncio.get_running_loop().run_in_executor(self._pool, _guarded, component, fn, *args)
        return await future

    async def encode_images(self, images: Sequence[ImageInput], *, request_id: str = "") -> list[Encoding]:
        engine = self.engine("vision_encoder")
        return await self._run("vision_encoder", engine.encode, list(images))

    async def encode_audio(self, pcm: np.ndarray, *, request_id: str = "") -> Encoding:
        engine = self.engine("audio_encoder")
        return (await self._run("audio_encoder", engine.encode, [pcm]))[0]

    # ---- streams ---------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        media: Sequence[np.ndarray],
        params: GenerationParams,
        *,
        request_id: str = "",
        session_id: str = "",
    ) -> AsyncIterator[TokenDelta]:
        engine = self.engine("llm_decoder")
        media = list(media)
        # session_id lets the session's next turn reuse this one's KV cache (the engine's prefix cache)
        return self._stream("llm_decoder", lambda cancelled: engine.generate(prompt, media, params, cancelled,
                                                                             session_id=session_id))

    def synthesize(
        self, text: str, *, first_sentence: bool = False, seed: int | None = None, request_id: str = ""
    ) -> AsyncIterator[SpeechChunk]:
        engine = self.engine("speech_synth")

        def chunks(cancelled: Callable[[], bool]) -> Iterator[SpeechChunk]:
            for pcm in engine.synthesize(text, first_sentence, seed, cancelled):
                yield SpeechChunk(pcm=pcm, sample_rate=engine.sample_rate)

        return self._stream("speech_synth", chunks)

    async def _stream(self, component: str, make: Callable[[Callable[[], bool]], Iterator[T]]
                      ) -> AsyncIterator[T]:
        """Run `make(is_cancelled)` on a worker thread and yield its items here."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
        cancelled = threading.Event()
        self._active.add(cancelled)

        def put(item: Any, error: BaseException | None = None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (item, error))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                cancelled.set()

        def produce() -> None:
            items: Iterator[T] | None = None
            try:
                items = make(cancelled.is_set)
                for item in items:
                    if cancelled.is_set():
                        break
                    put(item)
                put(_DONE)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
                put(_DONE, _as_vitaserve_error(component, exc))
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()  # runs the engine's cleanup now, in this thread

        self._pool.submit(produce)
        try:
            while True:
                item, error = await queue.get()
                if error is not None:
                    raise error
                if item is _DONE:
                    return
                yield item
        finally:
            # aclose(), task cancellation, an error or the end: the engine sees this before its next step.
            cancelled.set()
            self._active.discard(cancelled)

    # ---- lifecycle -------------------------------------------------------------------------------

    async def health(self) -> Health:
        return Health(ready={name: not self._closed for name in self.components})

    async def close(self) -> None:
        """Cancel running streams and wait for the worker threads to finish their current step."""
        self._closed = True
        for flag in list(self._active):
            flag.set()
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)


def _as_vitaserve_error(component: str, exc: BaseException) -> VitaserveError:
    if isinstance(exc, VitaserveError):
        return exc
    err = VitaserveError(f"{component} failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _guarded(component: str, fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except VitaserveError:
        raise
    except Exception as exc:  # noqa: BLE001 - the interface promises VitaserveErrors only
        raise _as_vitaserve_error(component, exc) from exc

