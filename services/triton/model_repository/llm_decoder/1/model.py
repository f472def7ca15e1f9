"""Triton adapter of the LLM decoder (decoupled): a ChatML prompt + media rows -> a stream of token responses.

The model family (parameter `family`, `vitaserve.families`) builds the `LLMEngine`: VITA-1.5's Qwen2 with
media splicing, or the small family's SmolLM2 on text prompts; both run the same engine below.

`execute()` validates each request and hands it to the instance's continuous-batching engine
(`vitaserve.batching.BatchEngine`, one engine thread: requests of all sessions share each decode step) and
returns at once. Responses go out on the dispatcher's sender threads (`backend.TokenStream`): each carries
the tokens produced since the stream's previous response (TOKEN_ID/TEXT arrays, one entry per token), so
a stream whose sender keeps up gets one token per response and a stream whose sender is behind gets the
tokens of several steps in one response (adaptive coalescing; the first token always goes alone; at most
`max_tokens_per_response` per response, 0 = no bound). The last response ends with the entry TOKEN_ID -1
(the detokeniser's rest) and carries FINISH_REASON ("stop" or "length") and the final flag. The final flag
is always sent: done, cancelled (Triton's `is_cancelled()`, polled by the engine every step, frees the
request's KV blocks at once) or error (RESOURCE_EXHAUSTED when the engine's queue is full).
Engine settings are this model's config.pbtxt `parameters` (`EngineConfig.from_parameters`).
Tensors: `vitaserve.components.tensors.LLM_DECODER`.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from vitaserve.components.base import GenerationParams
from vitaserve.components.tensors import LLM_DECODER as SPEC
from vitaserve.components.tensors import NO_TOKEN, unpack_media
from vitaserve.triton import backend
from vitaserve.triton.launcher import assert_stub_uses_project_venv

_NO_FINISH = np.array([b""], np.object_)  # read-only: FINISH_REASON of every response but the last


class _TokenResponses:
    """The engine's TokenSink for one request: ids -> coalesced responses (detokenised by the sender)."""

    def __init__(self, detokenizer):
        self.detok = detokenizer
        self.stream = None  # the request's backend.TokenStream (built with `self.build`)
        self.handle = None  # the engine's RequestHandle, set once submitted

    def build(self, ids, finish):
        """One response of `ids` (on the sender thread); the last one (`finish` set) ends with NO_TOKEN."""
        push = self.detok.push
        texts = [push(i).encode("utf-8") for i in ids]
        if finish:
            ids = [*ids, NO_TOKEN]
            texts.append(self.detok.flush().encode("utf-8"))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("TOKEN_ID", np.array(ids, np.int64)),
            pb_utils.Tensor("TEXT", np.array(texts, np.object_)),
            pb_utils.Tensor("FINISH_REASON",
                            np.array([finish.encode()], np.object_) if finish else _NO_FINISH),
        ])

    def on_token(self, token_id):
        self.stream.push(token_id)

    def on_finish(self, reason, error):
        handle = self.handle
        note = f"kv_reused={handle.reused_tokens} prompt={handle.prompt_tokens}" if handle is not None else ""
        if error is not None:
            self.stream.close(error=error, note=note)
        elif reason == "cancelled":
            self.stream.close(outcome="cancelled", note=note)
        else:
            self.stream.finish(reason, note=note)


class TritonPythonModel:
    def initialize(self, args):
        assert_stub_uses_project_venv()
        family, options = backend.load_settings(args, SPEC)
        # torch is imported by the engine, not at module level: Triton's config auto-complete pass imports
        # this file in a stub of its own, which then stays cheap.
        from vitaserve.models.llm import StreamDetokenizer

        try:
            self.max_tokens_per_response = backend.int_parameter(options.params, "max_tokens_per_response", 0)
        except ValueError as exc:
            raise RuntimeError(f"model {SPEC.name!r}: {exc}") from None
        self.responses = backend.ResponseDispatcher(SPEC.name)
        # after each engine step, that step's sends go to the sender threads in one hand-over
        self.engine = backend.build_engine(SPEC.name, family, options, after_step=self.responses.flush)
        # describe() starts the engine (allocates its KV cache): a budget that does not fit fails the load
        pb_utils.Logger.log_info(f"{SPEC.name}: family {family.name}, {self.engine.describe()}, "
                                 f"max_tokens_per_response={self.max_tokens_per_response or 'unbounded'}")
        self.detokenizer = lambda: StreamDetokenizer(self.engine.tokenizer)

    def execute(self, requests):
        for request in requests:
            sink = _TokenResponses(self.detokenizer())
            stream = self.responses.open_tokens(request, sink.build, self.max_tokens_per_response)
            sink.stream = stream
            try:
                inputs = backend.RequestInputs(request)
                media = unpack_media(inputs.array("MEDIA_EMBEDS"), inputs.array("MEDIA_ROWS"))
                params = GenerationParams(
                    max_tokens=int(inputs.scalar("MAX_TOKENS")),
                    temperature=float(inputs.scalar("TEMPERATURE")),
                    top_p=float(inputs.scalar("TOP_P")),
                    top_k=int(inputs.scalar("TOP_K")),
                    seed=inputs.scalar("SEED", None),
                )
                prepared = self.engine.prepare(inputs.text("PROMPT"), media, params)
                session = inputs.text("SESSION_ID") if inputs.array("SESSION_ID") is not None else ""
                sink.handle = self.engine.submit(prepared, sink, session_id=session,
                                                 is_cancelled=stream.is_cancelled)
            except Exception as exc:  # noqa: BLE001 - every request gets an answer
                stream.close(error=exc)
        return None

    def finalize(self):
        self.engine.close()        # unfinished requests end with UNAVAILABLE through their streams
        self.responses.shutdown()  # sends what is queued, then stops
