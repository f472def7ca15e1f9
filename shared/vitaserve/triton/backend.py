"""What the Python-backend adapters (`services/triton/model_repository/*/1/model.py`) share.

These helpers run inside Triton's Python stub: the functions that build responses import
`triton_python_backend_utils`, which exists only there. They keep every `model.py` a thin adapter:

- `load_settings(args, spec)`: check the loaded config against the model's `ModelSpec` (a mismatch fails
  the load) and read the `parameters` (family, checkpoint_dir, dtype, device, max_streams);
- `RequestInputs`: typed access to a request's tensors, raising `InvalidInput` for bad values;
- `execute_batched(...)`: one engine call for all requests of an `execute()`, one answer per request;
- `StreamWorkers`: serve decoupled requests on worker threads, stop on cancellation, always send the
  final flag, log one line per request;
- `ResponseDispatcher` / `DecoupledStream`: for models whose own engine thread produces the results
  (llm_decoder's batch engine): responses are sent on one dispatcher thread in order, so the engine never
  waits on Triton's IPC; the final flag is sent exactly once and one line is logged per request;
  `TokenStream` coalesces a stream's tokens into one response while its sender is behind;
- `error_response(exc)`: a `TritonError` whose code and message carry the `VitaserveError`.

Parameters (config.pbtxt `parameters`, all strings):
    family          the model family (`vitaserve.families`: vita15 | small); empty = VITASERVE_MODEL_FAMILY,
                    else vita15
    checkpoint_dir  checkpoint directory; empty = the VITASERVE_CHECKPOINT_DIR environment variable (the small
                    family needs none)
    dtype           float32 (default) | bfloat16 | float16
    device          cpu (default) | cuda (the instance's GPU under KIND_GPU) | cuda:N
    max_streams     decoupled models: streams one instance serves at once (default 1)
    (any other)     model-specific, in `EngineOptions.params` (llm_decoder: `EngineConfig.from_parameters`)
    cpu_threads     (optional) torch threads per instance on the CPU; empty = VITASERVE_CPU_THREADS, 0 = torch default
    max_tokens_per_response  (llm_decoder) bound of a coalesced response (`TokenStream`); 0 = no bound
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any

import numpy as np

from vitaserve.components.base import Encoding
from vitaserve.components.tensors import ModelSpec, encoding_outputs, format_error
from vitaserve.errors import InvalidInput, Unavailable, VitaserveError
from vitaserve.families import EngineOptions, ModelFamily, get_family

ENV_MODEL_FAMILY = "VITASERVE_MODEL_FAMILY"
ENV_CHECKPOINT_DIR = "VITASERVE_CHECKPOINT_DIR"
ENV_CPU_THREADS = "VITASERVE_CPU_THREADS"

# VitaserveError.code -> the TritonError code the 2.51 Python backend supports (it has no
# RESOURCE_EXHAUSTED or FAILED_PRECONDITION; the exact code still travels in the message).
_TRITON_CODES = {
    "INVALID_ARGUMENT": "INVALID_ARG",
    "NOT_FOUND": "NOT_FOUND",
    "UNAVAILABLE": "UNAVAILABLE",
    "RESOURCE_EXHAUSTED": "UNAVAILABLE",
    "CANCELLED": "CANCELLED",
}


def _pb() -> Any:
    import triton_python_backend_utils as pb_utils  # only importable inside the Triton stub

    return pb_utils


# ---------------------------------------------------------------------------------------------------
# Settings


def _limit_cpu_threads(model: str, value: str, device: str) -> None:
    """Torch intra-op threads of this model instance on the CPU. Several stubs on one host each default to
    one thread per core; their spinning OpenMP pools then fight (measured here: two encoders run together
    took 300-400 ms instead of ~40 ms on 2 cores). Empty or 0 keeps torch's default."""
    if not value or not device.startswith("cpu"):
        return
    try:
        threads = int(value)
    except ValueError:
        raise RuntimeError(f"model {model!r}: cpu_threads must be an integer, got {value!r}") from None
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def load_settings(args: dict[str, str], spec: ModelSpec) -> tuple[ModelFamily, EngineOptions]:
    """Validate the model config Triton loaded against `spec` and read its parameters (see the module
    docstring): the model family and the options its engine is built with. Raises RuntimeError with every
    problem, so the load fails with a clear message."""
    config = json.loads(args["model_config"])
    spec.check_config(config)
    params = {key: str(value.get("string_value", "")) for key, value in config.get("parameters", {}).items()}
    try:
        family = get_family(params.get("family") or os.environ.get(ENV_MODEL_FAMILY, ""))
    except ValueError as exc:
        raise RuntimeError(f"model {spec.name!r}: {exc}") from None
    checkpoint_dir = params.get("checkpoint_dir") or os.environ.get(ENV_CHECKPOINT_DIR, "")
    if not checkpoint_dir and family.needs_checkpoint:
        raise RuntimeError(f"model {spec.name!r}: parameter checkpoint_dir is empty and "
                           f"{ENV_CHECKPOINT_DIR} is not set (family {family.name} needs its checkpoint)")
    device = params.get("device") or "cpu"
    if device == "cuda" and args.get("model_instance_kind") == "GPU":
        device = f"cuda:{args.get('model_instance_device_id', '0')}"
    try:
        max_streams = int(params.get("max_streams") or 1)
    except ValueError:
        raise RuntimeError(f"model {spec.name!r}: max_streams must be an integer, "
                           f"got {params.get('max_streams')!r}") from None
    if max_streams < 1:
        raise RuntimeError(f"model {spec.name!r}: max_streams must be >= 1, got {max_streams}")
    _limit_cpu_threads(spec.name, params.get("cpu_threads") or os.environ.get(ENV_CPU_THREADS, ""), device)
    dtype = params.get("dtype") or "float32"
    return family, EngineOptions(checkpoint_dir, dtype, device, max_streams, params)


def build_engine(component: str, family: ModelFamily, options: EngineOptions, **kwargs: Any) -> Any:
    """`family.engine(...)`, with a bad engine parameter failing the load with the model's name."""
    try:
        return family.engine(component, options, **kwargs)
    except ValueError as exc:
        raise RuntimeError(f"model {component!r} (family {family.name}): {exc}") from None


def int_parameter(params: dict[str, str], name: str, default: int, minimum: int = 0) -> int:
    """An integer parameter (empty or missing = `default`); ValueError naming it when bad."""
    raw = (params.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"parameter {name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"parameter {name} must be >= {minimum}, got {value}")
    return value


# ---------------------------------------------------------------------------------------------------
# Requests and errors


class RequestInputs:
    """A request's input tensors. `batched`: the model has a batch dimension and takes one item per
    request, so each tensor must have batch size 1 and is returned without it."""

    def __init__(self, request: Any, *, batched: bool = False) -> None:
        self._request = request
        self._batched = batched

    def array(self, name: str) -> np.ndarray | None:
        tensor = _pb().get_input_tensor_by_name(self._request, name)
        if tensor is None:
            return None
        value = tensor.as_numpy()
        if self._batched:
            if value.shape[0] != 1:
                raise InvalidInput(f"send one item per request: {name} has a batch of {value.shape[0]}")
            value = value[0]
        return value

    def scalar(self, name: str, default: Any = ...) -> Any:
        value = self.array(name)
        if value is None:
            if default is ...:
                raise InvalidInput(f"input {name} is missing")
            return default
        if value.size != 1:
            raise InvalidInput(f"input {name} must hold one value, got shape {list(value.shape)}")
        item = value.reshape(-1)[0]
        return item.item() if isinstance(item, np.generic) else item

    def text(self, name: str) -> str:
        raw = self.scalar(name)
        try:
            return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"input {name} is not valid UTF-8: {exc}") from None

    @property
    def request_id(self) -> str:
        return self._request.request_id()


def as_vitaserve_error(exc: BaseException, model: str) -> VitaserveError:
    """`exc` itself if it is a VitaserveError; otherwise an internal error, logged with its traceback."""
    if isinstance(exc, VitaserveError):
        return exc
    _pb().Logger.log_error(f"{model}: unexpected error\n{''.join(traceback.format_exception(exc))}")
    return VitaserveError(f"{model} failed: {type(exc).__name__}: {exc}")


def error_response(exc: BaseException, model: str) -> Any:
    """An InferenceResponse carrying `exc` as a TritonError (message = `format_error`)."""
    pb = _pb()
    err = as_vitaserve_error(exc, model)
    code = getattr(pb.TritonError, _TRITON_CODES.get(err.code, "INTERNAL"))
    return pb.InferenceResponse(error=pb.TritonError(format_error(err), code))


def tensor(name: str, value: np.ndarray) -> Any:
    return _pb().Tensor(name, value)


# ---------------------------------------------------------------------------------------------------
# Batched models


def execute_batched(requests: Sequence[Any], model: str, parse: Callable[[RequestInputs], Any],
                    forward: Callable[[list[Any]], list[Encoding]]) -> list[Any]:
    """Answer each request of one encoder's `execute()`: `parse` each (a bad one gets its error), run
    `forward` once on all parsed items, and return each item's `Encoding` as EMBEDDINGS and TEXT (batch of
    one)."""
    pb = _pb()
    responses: list[Any] = [None] * len(requests)
    items, owners = [], []
    for i, request in enumerate(requests):
        try:
            items.append(parse(RequestInputs(request, batched=True)))
            owners.append(i)
        except Exception as exc:  # noqa: BLE001 - every request gets an answer
            responses[i] = error_response(exc, model)
    if items:
        try:
            results = forward(items)
        except Exception as exc:  # noqa: BLE001
            failed = error_response(exc, model)
            results = None
            for i in owners:
                responses[i] = failed
        if results is not None:
            for i, result in zip(owners, results):
                responses[i] = pb.InferenceResponse(output_tensors=[
                    pb.Tensor(name, value[None]) for name, value in encoding_outputs(result).items()])
    return responses


# ---------------------------------------------------------------------------------------------------
# Decoupled models


class CancelPoll:
    """`sender.is_cancelled()` asked at most every `interval_s`; a True is remembered. Each ask is an IPC
    round trip to the server (0.1-0.2 ms measured here), and engines ask before every token or speech
    code: a 300-code sentence paid 30-60 ms for it. Cancellation is still seen within `interval_s`."""

    def __init__(self, sender: Any, interval_s: float = 0.005) -> None:
        self._sender = sender
        self.interval_s = interval_s
        self.polled_at = -float("inf")  # time.monotonic() of the last ask
        self.cancelled = False  # the last answer (True is final)

    def __call__(self) -> bool:
        if not self.cancelled:
            now = time.monotonic()
            if now - self.polled_at >= self.interval_s:
                self.polled_at = now
                self.cancelled = bool(self._sender.is_cancelled())
        return self.cancelled


class StreamWorkers:
    """Serve decoupled requests on up to `max_streams` worker threads, so `execute()` returns at once and
    one long stream does not hold back the others.

    `serve(inputs, is_cancelled)` returns (or, as a generator function, is) the iterator of one request's
    InferenceResponses; `is_cancelled()` is true once the client cancelled the request or the model is
    unloading. With `eager=True`, `serve` is called in `submit` itself (in `execute()`), so it can
    validate the request and queue it in an engine at once: what it raises is the request's answer right
    away, and only the iteration goes to a worker thread. Responses stop at cancellation, an error
    becomes the request's last response, and the final flag is always sent. One log line per request
    records its id, responses sent, outcome and duration, then what the iterator's `log_note()` returns
    if it has one.
    """

    def __init__(self, model: str, max_streams: int) -> None:
        self.model = model
        self._pool = ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix=f"{model}-stream")
        self._stopping = threading.Event()

    def submit(self, request: Any, serve: Callable[[RequestInputs, Callable[[], bool]], Iterator[Any]], *,
               eager: bool = False) -> None:
        sender = request.get_response_sender()
        poll = CancelPoll(sender)

        def is_cancelled() -> bool:
            return self._stopping.is_set() or poll()

        started = time.monotonic()
        if not eager:
            self._pool.submit(self._run, request, sender, started, is_cancelled,
                              lambda: serve(RequestInputs(request), is_cancelled))
            return
        try:
            if self._stopping.is_set():
                raise Unavailable(f"model {self.model} is unloading")
            responses = serve(RequestInputs(request), is_cancelled)
        except Exception as exc:  # noqa: BLE001 - every request gets an answer
            self._end(request, sender, started, 0, *self._failure(exc))
            return
        self._pool.submit(self._run, request, sender, started, is_cancelled, lambda: responses)

    def _failure(self, exc: BaseException) -> tuple[str, Any]:
        err = as_vitaserve_error(exc, self.model)
        return f"error {err.code}", error_response(err, self.model)

    def _run(self, request: Any, sender: Any, started: float, is_cancelled: Callable[[], bool],
             responses_of: Callable[[], Iterator[Any]]) -> None:
        sent, outcome, last, note = 0, "done", None, ""
        try:
            if self._stopping.is_set():
                raise Unavailable(f"model {self.model} is unloading")
            with closing(responses_of()) as responses:  # type: ignore[type-var]
                log_note = getattr(responses, "log_note", None)
                for response in responses:
                    if is_cancelled():
                        break
                    sender.send(response)
                    sent += 1
            if is_cancelled():
                outcome = "cancelled"
            note = log_note() if log_note is not None else ""
        except Exception as exc:  # noqa: BLE001 - every request gets an answer
            # `_failure` keeps no reference to `exc`: the cycle exc -> traceback -> this frame would keep
            # the request (referenced by the traceback's frames) alive until a GC pass, and Triton cannot
            # unload the model while a request lives.
            outcome, last = self._failure(exc)
        finally:
            self._end(request, sender, started, sent, outcome, last, note)
            responses_of = None  # type: ignore[assignment]  # drop the generator (and the request) now

    def _end(self, request: Any, sender: Any, started: float, sent: int, outcome: str, last: Any,
             note: str = "") -> None:
        pb = _pb()
        flags = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            sender.send(last, flags=flags) if last is not None else sender.send(flags=flags)
        except Exception as exc:  # noqa: BLE001 - the request may already be gone (server stopping)
            pb.Logger.log_warn(f"{self.model}: could not close request {request.request_id()!r}: {exc}")
        note = f" {note}" if note else ""
        pb.Logger.log_info(f"{self.model} request_id={request.request_id()!r} responses={sent} "
                           f"outcome={outcome} seconds={time.monotonic() - started:.3f}{note}")

    def shutdown(self) -> None:
        """Cancel running streams (they end after their current step), answer queued ones with
        UNAVAILABLE, and wait for the threads."""
        self._stopping.set()
        self._pool.shutdown(wait=True)


class ResponseDispatcher:
    """Threads that send the responses of every `DecoupledStream` of a model.

    A send waits for Triton's IPC round trip (0.1-0.5 ms on a CPU host) with the GIL released, so more
    `threads` could overlap those waits; each stream is pinned to one thread, which keeps its responses
    in order. One thread is the default: every sender re-takes the GIL after each send and each C++
    call, and the engine thread gives the GIL up at every torch op, so each extra sender adds GIL
    hand-overs to the engine's steps (measured with 16 streams through Triton, tokens/s: 2 threads
    3404 / 3481, 1 thread 4227, on this 2-core machine). Responses posted on the engine thread are held
    until its `flush()` (called after every engine step) and handed over in one piece per sender thread:
    waking a sender once per token makes it fight the engine thread for the GIL at every torch call
    (measured: several times slower steps).

    Adaptive hand-over (what makes `TokenStream`s coalesce): the senders and the engine share one GIL and
    the cores with tritonserver, so senders that send every step "keep up" only by slowing the engine's
    steps down (measured with 16 streams, handing over every step: 1.2 tokens per response, the stub's CPU
    0.48 ms per token of which the batched forward is ~0.15). So `flush()` hands the held work over only
    once `hold_factor` x a hand-over's send time (wall time, moving average per sender thread; at most
    `max_hold_s`) has passed since the last one; at once when a post is urgent (a stream's first token,
    its end, any plain `DecoupledStream` post) or when only one post is held (a lone stream is sent per
    token: latency first; coalescing it did not raise its tokens/s). With a few streams a hand-over's
    sends take a fraction of a step and every step is handed over (one token per response); with many
    streams they outlast a step, the engine runs on meanwhile, and each stream's tokens of those steps
    go out as one response: the sends' share of the CPU stays near 1/`hold_factor`.
    """

    # 8: bench/concurrency.py, 16 streams, 2 shared cores: ~8 tokens per response, 4300-4500 tokens/s
    # (4: ~5-6 tokens per response, 2900-3700 tokens/s); a lone stream stays at ~1.03 either way.
    hold_factor = 8.0
    max_hold_s = 0.05  # bounds the added latency of a coalesced token

    def __init__(self, model: str, threads: int = 1) -> None:
        self.model = model
        self._handed_at = 0.0  # the last hand-over (engine thread)
        self._send_s = [0.0] * threads  # per sender thread: moving average of a hand-over's send time
        self._held_posts = 0
        self._urgent = False
        self._queues: list[queue.SimpleQueue[Callable[[], None] | None]] = [
            queue.SimpleQueue() for _ in range(threads)]
        self._threads = [threading.Thread(target=self._run, args=(q,), name=f"{model}-responses-{i}",
                                          daemon=True) for i, q in enumerate(self._queues)]
        self._next = 0
        self._engine_thread: int | None = None
        self._held: dict[int, list[Callable[[], None]]] = {}
        for thread in self._threads:
            thread.start()

    def open(self, request: Any) -> DecoupledStream:
        self._next = (self._next + 1) % len(self._queues)
        return DecoupledStream(self, request, self._next)

    def open_tokens(self, request: Any, build: Callable[[list[Any], str], Any],
                    max_items: int = 0) -> TokenStream:
        """A coalescing token stream (`TokenStream`) of `request`."""
        self._next = (self._next + 1) % len(self._queues)
        return TokenStream(self, request, self._next, build, max_items)

    def post(self, index: int, fn: Callable[[], None], *, urgent: bool = True) -> None:
        """Send `fn()` on sender thread `index`; from the engine thread, at a `flush()` (`urgent`: the
        next one; otherwise when the adaptive hand-over says so, see the class docstring)."""
        if threading.get_ident() == self._engine_thread:
            self._held.setdefault(index, []).append(fn)
            self._held_posts += 1
            self._urgent = self._urgent or urgent
        else:
            self._queues[index].put(fn)

    def expedite(self) -> None:
        """Make the next `flush()` hand everything over (e.g. a held stream has ended: the engine may have
        no further step, and so no further flush, to wait for)."""
        self._urgent = True

    def flush(self) -> None:
        """On the engine thread, after a step: hand what it posted to the sender threads, when due."""
        self._engine_thread = threading.get_ident()
        if not self._held:
            return
        now = time.monotonic()
        hold = min(max(self._send_s) * self.hold_factor, self.max_hold_s)
        if not self._urgent and self._held_posts > 1 and now - self._handed_at < hold:
            return  # the senders would take the GIL from the engine: let the tokens coalesce meanwhile
        self._urgent, self._handed_at, self._held_posts = False, now, 0
        held, self._held = self._held, {}
        for index, fns in held.items():
            self._queues[index].put(lambda index=index, fns=fns: self._run_all(index, fns))

    def _run_all(self, index: int, fns: list[Callable[[], None]]) -> None:
        # Wall time, not this thread's CPU time: it includes tritonserver's share of each send (the IPC
        # round trip), which runs on the same cores as the engine.
        started = time.perf_counter()
        for fn in fns:
            self._call(fn)
        self._send_s[index] = 0.7 * self._send_s[index] + 0.3 * (time.perf_counter() - started)

    def _call(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one broken response must not stop the others
            _pb().Logger.log_error(f"{self.model}: sending a response failed: {exc}")

    def _run(self, work: queue.SimpleQueue[Callable[[], None] | None]) -> None:
        while (fn := work.get()) is not None:
            self._call(fn)

    def shutdown(self) -> None:
        """Send everything already posted, then stop the threads."""
        held, self._held = self._held, {}  # the engine thread has stopped: nothing is added any more
        self._held_posts = 0
        for index, fns in held.items():
            self._queues[index].put(lambda index=index, fns=fns: self._run_all(index, fns))
        for work in self._queues:
            work.put(None)
        for thread in self._threads:
            thread.join()


class DecoupledStream:
    """The responses of one decoupled request, sent on the dispatcher's thread.

    `post(make)` sends `make()` (built on the dispatcher thread, so e.g. detokenisation stays off the
    engine thread); `close()` sends the final flag, with an error response if given, exactly once, and
    logs `<model> request_id=... responses=N outcome=... seconds=...`. `is_cancelled()` asks Triton at
    most every `cancel_poll_s` (each ask is an IPC round trip; the engine asks for every request at every
    step) and remembers a True.
    """

    def __init__(self, dispatcher: ResponseDispatcher, request: Any, index: int) -> None:
        self._dispatcher = dispatcher
        self._index = index
        self._request: Any = request  # held until closed: Triton owns it while responses may follow
        self._sender = request.get_response_sender()
        self._poll = CancelPoll(self._sender, interval_s=0.01)
        self.request_id = request.request_id()
        self.started = time.monotonic()
        self.sent = 0
        self._closed = False

    @property
    def cancel_poll_s(self) -> float:
        return self._poll.interval_s

    @cancel_poll_s.setter
    def cancel_poll_s(self, value: float) -> None:
        self._poll.interval_s = value

    def is_cancelled(self) -> bool:
        return self._closed or self._poll()

    def post(self, make: Callable[[], Any]) -> None:
        self._dispatcher.post(self._index, lambda: self._send(make))

    def close(self, *, outcome: str = "done", error: BaseException | None = None, note: str = "") -> None:
        """Send the final flag (after everything posted before); `note` is appended to the log line."""
        self._dispatcher.post(self._index, lambda: self._close(outcome, error, note))

    def _send(self, make: Callable[[], Any]) -> None:
        if self._closed:
            return
        self._sender.send(make())
        self.sent += 1

    def _close(self, outcome: str, error: BaseException | None, note: str, last: Any = None) -> None:
        """Send the final flag, with `last` (a response) or the error's response if given."""
        if self._closed:
            return
        self._closed = True
        pb = _pb()
        model = self._dispatcher.model
        if error is not None:
            err = as_vitaserve_error(error, model)
            last, outcome = error_response(err, model), f"error {err.code}"
        flags = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            self._sender.send(last, flags=flags) if last is not None else self._sender.send(flags=flags)
        except Exception as exc:  # noqa: BLE001 - the request may already be gone (server stopping)
            pb.Logger.log_warn(f"{model}: could not close request {self.request_id!r}: {exc}")
        finally:
            self._request = None
        note = f" {note}" if note else ""
        pb.Logger.log_info(f"{model} request_id={self.request_id!r} responses={self.sent} "
                           f"outcome={outcome} seconds={time.monotonic() - self.started:.3f}{note}")


class TokenStream(DecoupledStream):
    """A decoupled stream of tokens whose responses coalesce adaptively (an adaptive stream interval).

    The engine thread `push()`es each token; the stream keeps the tokens not yet sent and schedules one
    send on its dispatcher thread when it has none scheduled. The send takes every pending token at once
    and builds ONE response of them (`build(items, finish)`, up to `max_items` per response). So when the
    sender keeps up, each token goes out alone as soon as its step ends (no added latency); when it is
    behind (many streams, a slow IPC), the tokens produced meanwhile share one response, and the cost of a
    response (~0.5 ms of CPU here: tensors, IPC, tritonserver, the client) is paid once for all of them.
    The first response always carries exactly one token (time to first token never waits for a batch).

    `finish(reason)` makes the remaining tokens and `reason` ("stop" | "length") one last response sent
    with the final flag; `close(outcome="cancelled")` drops what is pending; `close(error=...)` sends
    what is pending, then the error with the final flag. The log line adds `tokens=N` (the items sent).
    """

    def __init__(self, dispatcher: ResponseDispatcher, request: Any, index: int,
                 build: Callable[[list[Any], str], Any], max_items: int = 0) -> None:
        super().__init__(dispatcher, request, index)
        self._build = build
        self._max_items = max_items  # 0 = no bound
        self._lock = threading.Lock()  # pending / scheduled / ending: engine thread vs sender thread
        self._pending: list[Any] = []
        self._scheduled = False
        self._ending: tuple[str, str, BaseException | None, str] | None = None  # reason, outcome, error, note
        self.tokens = 0

    def is_cancelled(self) -> bool:
        """The engine's poll (every step): Triton is asked by the sender thread at each send, at most every
        `cancel_poll_s` (the IPC round trip then overlaps the engine's forward instead of delaying its
        step: measured ~10% of the engine thread with 16 streams); here only when nobody asked for
        2 x `cancel_poll_s` (a request still queued or in prefill has no sends)."""
        if self._poll.cancelled or self._closed:
            return True
        if time.monotonic() - self._poll.polled_at >= 2 * self.cancel_poll_s:
            return super().is_cancelled()
        return False

    def push(self, item: Any) -> None:
        """On the engine thread: one more token (an item `build` understands)."""
        with self._lock:
            self._pending.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        # the first token is urgent (time to first token); later ones may wait for the adaptive hand-over
        self._dispatcher.post(self._index, self._drain, urgent=self.sent == 0)

    def finish(self, reason: str, *, note: str = "") -> None:
        """The last response: the pending tokens and `reason`, sent with the final flag."""
        self._end(reason, "done", None, note)

    def close(self, *, outcome: str = "done", error: BaseException | None = None, note: str = "") -> None:
        """Send the final flag without a last response: cancelled (pending tokens are dropped) or an
        error (pending tokens go first)."""
        self._end("", outcome, error, note)

    def _end(self, reason: str, outcome: str, error: BaseException | None, note: str) -> None:
        with self._lock:
            if self._ending is not None:
                return
            self._ending = (reason, outcome, error, note)
            scheduled, self._scheduled = self._scheduled, True
        if scheduled:
            self._dispatcher.expedite()  # the held drain sends the end: hand it over at the next flush
        else:
            self._dispatcher.post(self._index, self._drain)

    def _drain(self) -> None:
        """On the sender thread: send what is pending now (and the end, if it came)."""
        with self._lock:
            items, self._pending = self._pending, []
            ending, self._scheduled = self._ending, False
        if self._closed:
            return
        if ending is None:
            super().is_cancelled()  # polls Triton when due; the engine reads the flag at its next step
        if ending is not None and ending[1] == "cancelled":
            items = []
        chunks: list[list[Any]] = []
        if items and self.sent == 0:
            chunks.append(items[:1])  # the first token goes out alone, now
            items = items[1:]
        step = self._max_items or len(items) or 1
        chunks += [items[i:i + step] for i in range(0, len(items), step)]
        if ending is not None and ending[0] and not chunks:
            chunks.append([])  # a last response with no token left to carry
        try:
            for n, chunk in enumerate(chunks):
                last = ending is not None and ending[0] != "" and n == len(chunks) - 1
                response = self._build(chunk, ending[0] if last else "")
                self.tokens += len(chunk)
                if last:
                    self._final(response, ending[1], None, ending[3])
                    return
                self._sender.send(response)
                self.sent += 1
        except Exception as exc:  # noqa: BLE001 - the final flag must still go out
            _pb().Logger.log_error(f"{self._dispatcher.model}: sending a response of {self.request_id!r} "
                                   f"failed: {exc}")
            if ending is not None:
                self._final(None, ending[1], ending[2] or exc, ending[3])
            return
        if ending is not None:
            self._final(None, ending[1], ending[2], ending[3])

    def _final(self, response: Any, outcome: str, error: BaseException | None, note: str) -> None:
        if response is not None:
            self.sent += 1
        note = f"tokens={self.tokens}{' ' + note if note else ''}"
        self._close(outcome, error, note, last=response)
