"""`ComponentClient` over Triton's gRPC API (`tritonclient.grpc.aio`): production and integration tests.

Each component may live on its own Triton deployment (one URL per component) or all on one server (one
URL). Tensor names and dtypes come from `vitaserve.components.tensors`, shared with the models.

Several servers per component: each call asks a `vitaserve.cluster.routing.Router` for its endpoint (the
router seam). A URL may list several `host:port,host:port` (a static list), or the router follows the
component's Kubernetes pods (`KubernetesDiscovery`). A session's LLM calls stay on one server while it is
ready (consistent hashing on `session_id`, so the server's KV cache is reused); every other call goes
round-robin. `health()` checks the model on every endpoint and tells the router which ones to avoid.
Failover: when an endpoint cannot be reached (gRPC UNAVAILABLE, model not loaded there) before the call got
any response, the endpoint is marked unhealthy and the call is retried once on another ready endpoint; a
stream that has already produced output is never retried (its output would repeat).

- Unary calls (`encode_images`, `encode_audio`) carry a gRPC deadline of `timeout_s`. Several images are
  sent as concurrent one-image requests, which Triton's dynamic batcher groups into one `execute()`.
- Streams (`generate`, `synthesize`) send one request per gRPC stream. An llm_decoder response may carry
  several tokens (the model coalesces them when its sender is behind); `generate` still yields one
  `TokenDelta` per token. Closing the async iterator or
  cancelling the task that iterates it cancels the gRPC call; Triton then reports the request cancelled
  to the model, whose `is_cancelled()` turns true within milliseconds (shared/TRITON.md §5).
  The first response must arrive within `first_response_timeout_s`, the whole stream within
  `stream_timeout_s`.
- Errors become `VitaserveError`s: a model's own errors keep their class (the code travels in the message,
  see `tensors.format_error`); otherwise connection refused, deadlines and unloaded models ->
  `Unavailable`, Triton's INVALID_ARGUMENT -> `InvalidInput` with Triton's message, anything else ->
  `VitaserveError`.

Trace context: every request carries the W3C `traceparent` of the current OpenTelemetry span (if one is
valid) in its gRPC headers, so a Triton started with `--trace-config mode=opentelemetry` continues the
caller's trace; nothing is added while tracing is off.

gRPC aio channels belong to the event loop that creates them, so clients are created lazily inside the
first coroutine that needs them; using the object from another event loop later creates fresh channels.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from typing import Any, TypeVar

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from opentelemetry import propagate, trace
from tritonclient.utils import InferenceServerException

from vitaserve.cluster.discovery import Endpoint, StaticDiscovery
from vitaserve.cluster.routing import Router
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
from vitaserve.components.tensors import (
    AUDIO_ENCODER,
    LLM_DECODER,
    MODELS,
    NO_TOKEN,
    SPEECH_SYNTH,
    VISION_ENCODER,
    ModelSpec,
    encoding_from_outputs,
    pack_media,
    parse_error,
)
from vitaserve.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidInput,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    VitaserveError,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

# tritonclient's own channel options, plus a short reconnect backoff: gRPC's default grows to 120 s, so
# a Triton restarted on the same address (a crashed pod, a SIGKILLed server) would stay unused for up
# to two minutes after it is back; with these it is used again within ~2 s.
_KEEPALIVE = grpcclient.KeepAliveOptions()
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.keepalive_time_ms", _KEEPALIVE.keepalive_time_ms),
    ("grpc.keepalive_timeout_ms", _KEEPALIVE.keepalive_timeout_ms),
    ("grpc.keepalive_permit_without_calls", _KEEPALIVE.keepalive_permit_without_calls),
    ("grpc.http2.max_pings_without_data", _KEEPALIVE.http2_max_pings_without_data),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class _EndpointDown(Unavailable):
    """This endpoint cannot serve the call (unreachable, model not loaded there); another one may."""

# gRPC status (of Triton's answer, or of the call itself) -> error class, when the model sent no code.
_STATUS_ERRORS: dict[str, type[VitaserveError]] = {
    "INVALID_ARGUMENT": InvalidInput,
    "UNAVAILABLE": Unavailable,
    "DEADLINE_EXCEEDED": Unavailable,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "CANCELLED": Cancelled,
    "UNAUTHENTICATED": Unauthenticated,
    "FAILED_PRECONDITION": FailedPrecondition,
}
_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


class TritonComponents(ComponentClient):
    """The components as Triton models reached over gRPC.

    urls: `host:port` of one Triton serving every component, or a mapping component -> `host:port`
        naming at least every component in `components`; each may list several `host:port,host:port`.
    router: picks the endpoint of every call instead (e.g. over Kubernetes discovery); `urls` is then
        not needed. The client owns it: `close()` stops its discovery.
    components: the components this client serves (default: all four); calls to others raise
        `Unavailable`, and `health()` reports only these.
    timeout_s: deadline of unary calls and of readiness checks beyond `health_timeout_s`.
    first_response_timeout_s: a stream whose first token/chunk does not arrive in time is cancelled and
        raises `Unavailable`.
    stream_timeout_s: deadline of a whole stream.
    health_timeout_s: deadline of each readiness check (`health()` never takes much longer).
    """

    def __init__(
        self,
        urls: str | Mapping[str, str] | None = None,
        *,
        router: Router | None = None,
        components: Iterable[str] = COMPONENTS,
        timeout_s: float = 10.0,
        first_response_timeout_s: float = 30.0,
        stream_timeout_s: float = 600.0,
        health_timeout_s: float = 2.0,
    ) -> None:
        self.components = tuple(components)
        unknown = sorted(set(self.components) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"unknown component(s) {unknown}; known: {', '.join(COMPONENTS)}")
        if router is None:
            if urls is None:
                raise ValueError("TritonComponents needs urls or a router")
            if isinstance(urls, str):
                urls = {name: urls for name in self.components}
            extra = sorted(set(urls) - set(COMPONENTS))
            missing = [name for name in self.components if not urls.get(name)]
            if extra or missing:
                raise ValueError(f"Triton URLs: unknown component(s) {extra}, no URL for {missing}")
            self.urls = {name: urls[name] for name in self.components}
            router = Router(StaticDiscovery(self.urls))  # ValueError on a malformed host:port
        else:
            static = isinstance(router.discovery, StaticDiscovery)  # the list itself; else where it comes from
            self.urls = {name: ",".join(e.url for e in router.endpoints(name)) if static
                         else router.discovery.describe(name) for name in self.components}
        self.router = router
        self.timeout_s = timeout_s
        self.first_response_timeout_s = first_response_timeout_s
        self.stream_timeout_s = stream_timeout_s
        self.health_timeout_s = health_timeout_s
        self._clients: dict[str, grpcclient.InferenceServerClient] = {}
        self._active: Counter[str] = Counter()  # calls in flight per endpoint url
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- connections -------------------------------------------------------------------------------

    def _pick(self, component: str, affinity: str = "") -> Endpoint:
        if component not in self.urls:
            raise Unavailable(f"component {component!r} is not configured in this client "
                              f"(configured: {', '.join(self.components)})")
        return self.router.pick(component, affinity=affinity)

    def _client(self, url: str) -> grpcclient.InferenceServerClient:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # channels are bound to the loop that created them
            self._clients, self._loop = {}, loop
        if url not in self._clients:
            self._clients[url] = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        return self._clients[url]

    async def close(self) -> None:
        """Close the channels and the router (this client owns it: discovery watchers stop)."""
        self.router.close()
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    async def health(self) -> Health:
        """A component is ready when its model is ready on at least one endpoint; each endpoint's result
        goes to the router, which avoids the not-ready ones."""
        checks = await self.endpoint_health()
        return Health(ready={name: any(checks[name].values()) for name in self.components})

    async def endpoint_health(self) -> dict[str, dict[str, bool]]:
        """component -> {endpoint url: model ready} over the endpoints discovery reports ready."""

        async def ready(component: str, url: str) -> bool:
            try:
                check = self._client(url).is_model_ready(MODELS[component].name,
                                                         client_timeout=self.health_timeout_s)
                ok = bool(await asyncio.wait_for(check, self.health_timeout_s + 0.5))
            except Exception:  # noqa: BLE001 - health never raises: an unreachable component is not ready
                ok = False
            self.router.set_health(component, url, ok)
            return ok

        pairs = [(name, e.url) for name in self.components for e in self.router.endpoints(name)]
        results = await asyncio.gather(*(ready(name, url) for name, url in pairs))
        checks: dict[str, dict[str, bool]] = {name: {} for name in self.components}
        for (name, url), ok in zip(pairs, results):
            checks[name][url] = ok
        await self._close_unused({url for _, url in pairs})
        return checks

    async def _close_unused(self, in_use: set[str]) -> None:
        """Close channels to endpoints discovery no longer lists (pods scaled away) once no call runs on
        them: a terminating pod still finishes the streams it has."""
        if asyncio.get_running_loop() is not self._loop:
            return
        for url in [u for u in self._clients if u not in in_use and not self._active[u]]:
            await self._clients.pop(url).close()

    # ---- unary calls -------------------------------------------------------------------------------

    async def encode_images(self, images: Sequence[ImageInput], *, request_id: str = "") -> list[Encoding]:
        images = list(images)
        for i, image in enumerate(images):
            if not isinstance(image, ImageInput) or not isinstance(image.data, (bytes, bytearray)):
                raise InvalidInput(f"images[{i}] must be an ImageInput holding bytes")
        requests = []
        for i, image in enumerate(images):
            values = {
                "IMAGE": np.array([[bytes(image.data)]], dtype=np.object_),
                "MAX_TILES": np.array([[_int(image.max_tiles, "max_tiles", _INT32)]], dtype=np.int32),
            }
            rid = f"{request_id}/{i}" if request_id and len(images) > 1 else request_id
            requests.append((values, rid))
        if not requests:
            return []

        # One endpoint for all images of the call: its dynamic batcher groups them into one forward.
        async def on(endpoint: Endpoint) -> list[Any]:
            return await _all([self._infer(VISION_ENCODER, values, rid, endpoint) for values, rid in requests])

        results = await self._with_failover(VISION_ENCODER.name, on)
        return [_encoding(result) for result in results]

    async def encode_audio(self, pcm: np.ndarray, *, request_id: str = "") -> Encoding:
        wave = np.asarray(pcm)
        if wave.ndim != 1 or not np.issubdtype(wave.dtype, np.floating) or wave.size == 0:
            raise InvalidInput(f"PCM must be a non-empty 1-D float array, got {wave.dtype} {wave.shape}")
        values = {"PCM": wave.astype(np.float32, copy=False)[None, :]}
        result = await self._with_failover(
            AUDIO_ENCODER.name, lambda endpoint: self._infer(AUDIO_ENCODER, values, request_id, endpoint))
        return _encoding(result)

    async def _with_failover(self, component: str, call: Callable[[Endpoint], Awaitable[T]],
                             affinity: str = "") -> T:
        endpoint = self._pick(component, affinity)
        try:
            return await call(endpoint)
        except _EndpointDown as exc:
            endpoint = self._fail_over(component, endpoint, affinity, exc)
        return await call(endpoint)

    def _fail_over(self, component: str, failed: Endpoint, affinity: str, exc: _EndpointDown) -> Endpoint:
        """The endpoint to retry on after `failed` could not serve; re-raises when there is none."""
        if not [e for e in self.router.usable(component) if e.url != failed.url]:
            raise exc
        self.router.set_health(component, failed.url, False)  # until health() finds it ready again
        endpoint = self._pick(component, affinity)
        log.warning("%s at %s (%s): %s; retrying on %s", component, failed.url, failed.name, exc, endpoint.url)
        return endpoint

    async def _infer(self, spec: ModelSpec, values: dict[str, np.ndarray], request_id: str,
                     endpoint: Endpoint) -> Any:
        client = self._client(endpoint.url)
        self._active[endpoint.url] += 1
        try:
            call = client.infer(spec.name, _inputs(spec, values), outputs=_outputs(spec), request_id=request_id,
                                client_timeout=self.timeout_s, headers=trace_headers())
            # The gRPC deadline bounds the call; the outer bound also covers a stalled channel setup.
            return await asyncio.wait_for(call, self.timeout_s + 1.0)
        except InferenceServerException as exc:
            raise self._error(spec.name, exc.message() or str(exc), exc.status(), endpoint.url) from None
        except asyncio.TimeoutError:
            raise Unavailable(f"{spec.name} at {endpoint.url}: no answer within "
                              f"{self.timeout_s:g} s") from None
        finally:
            self._active[endpoint.url] -= 1

    # ---- streams ---------------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str,
        media: Sequence[np.ndarray],
        params: GenerationParams,
        *,
        request_id: str = "",
        session_id: str = "",
    ) -> AsyncIterator[TokenDelta]:
        if not isinstance(prompt, str):
            raise InvalidInput(f"prompt must be a string, got {type(prompt).__name__}")
        values = {
            "PROMPT": np.array([prompt.encode("utf-8")], dtype=np.object_),
            "MAX_TOKENS": np.array([_int(params.max_tokens, "max_tokens", _INT32)], dtype=np.int32),
            "TEMPERATURE": np.array([params.temperature], dtype=np.float32),
            "TOP_P": np.array([params.top_p], dtype=np.float32),
            "TOP_K": np.array([_int(params.top_k, "top_k", _INT32)], dtype=np.int32),
        }
        if params.seed is not None:
            values["SEED"] = np.array([_int(params.seed, "seed", _INT64)], dtype=np.int64)
        if session_id:
            values["SESSION_ID"] = np.array([session_id.encode("utf-8")], dtype=np.object_)
        values.update(pack_media(media))
        # aclosing: leaving this generator (aclose, cancel, the end) closes the stream at once, not at GC.
        # Session affinity: the session's earlier turns are cached on that server.
        async with aclosing(self._stream(LLM_DECODER, values, request_id, affinity=session_id)) as results:
            async for result in results:
                finish = result.as_numpy("FINISH_REASON")[0].decode("utf-8") or None
                deltas = _token_deltas(result.as_numpy("TOKEN_ID"), result.as_numpy("TEXT"), finish)
                if finish is None:
                    for delta in deltas:
                        yield delta
                    continue
                # Read the stream to its end before handing out any delta of the last response (callers
                # often stop at one of them). Cancelling a gRPC stream whose request the model has already
                # finished makes Triton 2.51 keep that request forever: the model then never unloads (the
                # server's exit times out).
                await _drain(results, self.timeout_s)
                for delta in deltas:
                    yield delta
                return

    async def synthesize(
        self, text: str, *, first_sentence: bool = False, seed: int | None = None, request_id: str = ""
    ) -> AsyncIterator[SpeechChunk]:
        if not isinstance(text, str):
            raise InvalidInput(f"text must be a string, got {type(text).__name__}")
        values = {
            "TEXT": np.array([text.encode("utf-8")], dtype=np.object_),
            "FIRST_SENTENCE": np.array([bool(first_sentence)], dtype=np.bool_),
        }
        if seed is not None:
            values["SEED"] = np.array([_int(seed, "seed", _INT64)], dtype=np.int64)
        async with aclosing(self._stream(SPEECH_SYNTH, values, request_id)) as results:
            async for result in results:
                pcm = result.as_numpy("PCM").astype(np.float32, copy=False)
                yield SpeechChunk(pcm=pcm, sample_rate=int(result.as_numpy("SAMPLE_RATE")[0]))

    async def _stream(self, spec: ModelSpec, values: dict[str, np.ndarray], request_id: str,
                      affinity: str = "") -> AsyncIterator[Any]:
        """One request on its own gRPC stream; yields the results until the model closes the request.
        Leaving early (aclose, task cancel, an error) cancels the gRPC call. An endpoint that cannot
        serve before the first result is failed over once (see the module docstring)."""
        endpoint = self._pick(spec.name, affinity)
        for attempt in range(2):
            url, started = endpoint.url, False
            self._active[url] += 1
            try:
                # aclosing: closing this generator must close the inner one now (that cancels the gRPC call).
                async with aclosing(self._stream_results(spec, self._client(url), values, request_id, url)
                                    ) as results:
                    async for result in results:
                        started = True
                        yield result
                return
            except _EndpointDown as exc:
                if started or attempt:
                    raise
                endpoint = self._fail_over(spec.name, endpoint, affinity, exc)
            finally:
                self._active[url] -= 1

    async def _stream_results(self, spec: ModelSpec, client: grpcclient.InferenceServerClient,
                              values: dict[str, np.ndarray], request_id: str, url: str) -> AsyncIterator[Any]:
        request = {"model_name": spec.name, "inputs": _inputs(spec, values), "outputs": _outputs(spec),
                   "request_id": request_id}
        try:
            responses = client.stream_infer(_single(request), stream_timeout=self.stream_timeout_s,
                                            headers=trace_headers())
        except InferenceServerException as exc:
            raise self._error(spec.name, exc.message() or str(exc), exc.status(), url) from None
        first = True
        try:
            while True:
                try:
                    step = responses.__anext__()
                    if first:
                        result, error = await asyncio.wait_for(step, self.first_response_timeout_s)
                    else:
                        result, error = await step
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise Unavailable(f"{spec.name} at {url}: no response within "
                                      f"{self.first_response_timeout_s:g} s") from None
                except grpc.RpcError as exc:
                    raise self._error(spec.name, _rpc_details(exc), f"StatusCode.{_rpc_code(exc)}", url) from None
                if error is not None:
                    # The model sends its error with the final flag; let the stream end rather than
                    # cancel it (see `generate`).
                    await _drain(responses, self.timeout_s)
                    raise self._error(spec.name, error.message() or str(error), error.status(), url)
                first = False
                yield result
        finally:
            responses.cancel()  # a no-op once the call has finished

    # ---- errors ----------------------------------------------------------------------------------

    def _error(self, component: str, message: str, status: str | None, url: str) -> VitaserveError:
        """Map Triton's answer to a VitaserveError (see the module docstring)."""
        parsed = parse_error(message)
        if parsed is not None:
            return parsed
        code = (status or "").rsplit(".", 1)[-1]
        where = f"{component} at {url}"
        if code == "NOT_FOUND" or "unknown model" in message.lower():
            return _EndpointDown(f"{where}: the model is not loaded ({message})")
        if code == "UNAVAILABLE":
            return _EndpointDown(f"{where}: {message}")
        if code == "INVALID_ARGUMENT":
            return InvalidInput(message)
        if code == "DEADLINE_EXCEEDED":
            return Unavailable(f"{where}: deadline exceeded ({message})")
        return _STATUS_ERRORS.get(code, VitaserveError)(f"{where}: {message}")


# ---------------------------------------------------------------------------------------------------
# Request building


def trace_headers() -> dict[str, str] | None:
    """The W3C trace context (`traceparent`, `tracestate`) of the current span for a request's headers;
    None when there is no valid span (tracing off)."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def _int(value: Any, name: str, bounds: tuple[int, int]) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not bounds[0] <= value <= bounds[1]:
        raise InvalidInput(f"{name} must be an integer in [{bounds[0]}, {bounds[1]}], got {value!r}")
    return int(value)


def _inputs(spec: ModelSpec, values: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    tensors = []
    for name, value in values.items():
        tensor = grpcclient.InferInput(name, list(value.shape), spec.input(name).dtype)
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    return tensors


def _encoding(result: Any) -> Encoding:
    """An encoder's answer (EMBEDDINGS and TEXT, batch of one) as an `Encoding`."""
    return encoding_from_outputs(result.as_numpy("EMBEDDINGS"), result.as_numpy("TEXT"))


def _outputs(spec: ModelSpec) -> list[grpcclient.InferRequestedOutput]:
    return [grpcclient.InferRequestedOutput(out.name) for out in spec.outputs]


async def _single(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    yield request


def _rpc_code(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    return code.name if code is not None else "UNKNOWN"


def _rpc_details(exc: grpc.RpcError) -> str:
    return (exc.details() if hasattr(exc, "details") else None) or str(exc)


def _token_deltas(ids: np.ndarray, texts: np.ndarray, finish: str | None) -> list[TokenDelta]:
    """The deltas of one llm_decoder response: one per entry of TOKEN_ID/TEXT (a response carries the
    tokens produced since the stream's previous one); `finish` goes on the last entry only."""
    ids, texts = ids.reshape(-1), texts.reshape(-1)
    if len(ids) != len(texts):
        raise VitaserveError(f"llm_decoder sent {len(ids)} TOKEN_ID entries but {len(texts)} TEXT entries")
    if not len(ids):
        return [TokenDelta(None, "", finish)] if finish is not None else []
    last = len(ids) - 1
    return [TokenDelta(None if token == NO_TOKEN else int(token), text.decode("utf-8"),
                       finish if i == last else None)
            for i, (token, text) in enumerate(zip(ids.tolist(), texts.tolist()))]


async def _drain(results: AsyncIterator[Any], timeout_s: float) -> None:
    """Consume what is left of a stream whose request is complete (nothing, normally), for at most
    `timeout_s`; errors are ignored (the caller reports the first one)."""

    async def rest() -> None:
        async for _ in results:
            pass

    try:
        await asyncio.wait_for(rest(), timeout_s)
    except (asyncio.TimeoutError, grpc.RpcError):
        pass  # the caller cancels the call on its way out


async def _all(calls: Sequence[Awaitable[T]]) -> list[T]:
    """Await all calls concurrently; on the first error (or cancellation) cancel the rest and raise."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
