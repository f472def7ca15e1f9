"""What the LLM's `BatchEngine` and the speech decoder's `SpeechBatcher` share: the engine thread, the
waiting queue and the running list, cancellation, shutdown, request handles and config parsing.

A subclass implements `step()` (one scheduling step; False when there was nothing to do) and
`_finish(request, reason, error)` (end a request exactly once and tell its sink). Requests are objects
with a `handle` (`Handle`) and an `is_cancelled` callable or None.
"""

from __future__ import annotations

import dataclasses
import threading
import traceback
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from typing import Any, TypeVar

from vitaserve.errors import Unavailable, VitaserveError

C = TypeVar("C")


def config_from_parameters(cls: type[C], params: Mapping[str, str]) -> C:
    """A config dataclass from string parameters (a Triton config.pbtxt): empty or missing = the field's
    default; int and bool fields. Raises ValueError naming the bad parameter."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        raw = str(params.get(f.name, "") or "").strip()
        if not raw:
            continue
        if f.type in (bool, "bool"):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"parameter {f.name} must be true or false, got {raw!r}")
            values[f.name] = raw.lower() in ("true", "1", "yes")
        else:
            try:
                values[f.name] = int(raw)
            except ValueError:
                raise ValueError(f"parameter {f.name} must be an integer, got {raw!r}") from None
    return cls(**values)


class Handle:
    """What `submit` returns: `cancel()` from any thread; the step counters are for tests and stats."""

    def __init__(self, engine: EngineLoop, request_id: int) -> None:
        self._engine = engine
        self.id = request_id
        self.cancel_requested = False
        self.finish_reason: str | None = None
        self.submitted_step = engine.steps
        self.admitted_step: int | None = None
        self.finished_step: int | None = None

    def cancel(self) -> None:
        self.cancel_requested = True
        self._engine._wake()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class EngineLoop(ABC):
    """The engine thread and its queues. `failure` names the engine in the error that ends the running
    requests when a step raises; `unloading` is the Unavailable message of `close()`."""

    failure = "the engine failed; see the server log"
    unloading = "the engine is unloading"

    def __init__(self) -> None:
        self.steps = 0
        self._cv = threading.Condition()
        self._waiting: deque[Any] = deque()  # guarded by _cv
        self._running: list[Any] = []  # engine thread only
        self._closed = False
        self._thread: threading.Thread | None = None

    def _start(self, name: str) -> None:
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    @abstractmethod
    def step(self) -> bool: ...

    @abstractmethod
    def _finish(self, request: Any, reason: str, error: VitaserveError | None = None) -> None: ...

    def _after_step(self) -> None:
        """Called on the engine thread after every step, also one that raised."""

    def _on_closed(self) -> None:
        """Called by `close()` once every request has ended."""

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._running:
                    self._cv.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a bug in a step must not kill the engine thread
                traceback.print_exc()
                for request in list(self._running):
                    self._finish(request, "error", VitaserveError(self.failure))
            finally:
                self._after_step()

    def close(self) -> None:
        """Stop the engine thread after its current step; every unfinished request ends with Unavailable."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            waiting, self._waiting = list(self._waiting), deque()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        for request in waiting + list(self._running):
            self._finish(request, "error", Unavailable(self.unloading))
        self._on_closed()

    def _cancelled(self, request: Any) -> bool:
        if request.handle.cancel_requested:
            return True
        try:
            return bool(request.is_cancelled is not None and request.is_cancelled())
        except Exception:  # noqa: BLE001 - a request we cannot ask about is gone
            return True

    def _drop_cancelled(self) -> None:
        """End the cancelled requests, running (their resources are freed by `_finish`) and waiting."""
        for request in [r for r in self._running if self._cancelled(r)]:
            self._finish(request, "cancelled")
        with self._cv:
            gone = [r for r in self._waiting if self._cancelled(r)]
            for request in gone:
                self._waiting.remove(request)
        for request in gone:
            self._finish(request, "cancelled")
