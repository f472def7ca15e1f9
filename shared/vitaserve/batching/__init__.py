"""Continuous batching: many sessions share each forward pass of the LLM decoder and of speech synthesis.

- `kv_cache`      the paged KV-cache pool (a fixed token budget split into blocks) and the view that lets the
                  Hugging Face Qwen2 layers write to and read from it for a whole batch in one call per layer
- `prefix_cache`  per-session reuse of an earlier turn's KV blocks (exact prefix match, LRU eviction)
- `scheduler`     `BatchEngine`: the LLM's queue, admission against the budget, the step loop (bounded
                  prefill + one batched decode step), sampling per request, cancellation, the engine thread
- `speech`        `SpeechBatcher`: the same for the speech decoder's AR loop (every reply sentence of every
                  session is one request; one batched step yields one codec id per running sentence)
- `engine_loop`   what both share: the engine thread, queue, cancellation, shutdown, handles, parameters

`vitaserve.components.engines.LLMEngine` and `SpeechEngine` prepare requests (tokenise, splice media, embed
the text) and submit them here; the Triton adapters and the in-process client both go through them.
"""

from vitaserve.batching.kv_cache import KVPool
from vitaserve.batching.prefix_cache import PrefixCache, sequence_keys
from vitaserve.batching.scheduler import BatchEngine, EngineConfig, RequestHandle, TokenSink
from vitaserve.batching.speech import CodeSampling, CodeSink, SpeechBatchConfig, SpeechBatcher, SpeechHandle

__all__ = ["BatchEngine", "CodeSampling", "CodeSink", "EngineConfig", "KVPool", "PrefixCache", "RequestHandle",
           "SpeechBatchConfig", "SpeechBatcher", "SpeechHandle", "TokenSink", "sequence_keys"]
