"""Triton adapter of speech synthesis (decoupled): one text segment -> one response per 24 kHz PCM chunk.

The model family (parameter `family`, `vitaserve.families`) builds the engine. VITA-1.5's `SpeechEngine`
queues each segment in the instance's speech batcher (`vitaserve.batching.SpeechBatcher`, one engine
thread: the segments of all sessions share each AR decode step); the small family's hibari synthesises a
sentence at once. `execute()` validates each request and queues it, then returns; a bad segment is answered
at once (INVALID_ARGUMENT), and so is one that finds the batcher's queue full (RESOURCE_EXHAUSTED). Each
request's chunks (VITA: codec decoding) and responses run on a worker thread (`backend.StreamWorkers`),
which also polls the request's cancellation (at least every 20 ms) and stops the segment; the final flag is
always sent. Text that is empty once the state marks are stripped gives no chunks.

Settings (config.pbtxt `parameters`): `max_streams` segments decoded together (VITA: the batch), and for
VITA `max_queue` segments waiting beyond it, `kv_positions` the KV budget, `prompts_per_step`, and
`codec_workers` codec windows decoded at a time. Tensors: `vitaserve.components.tensors.SPEECH_SYNTH`.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from vitaserve.components.tensors import SPEECH_SYNTH as SPEC
from vitaserve.triton import backend
from vitaserve.triton.launcher import assert_stub_uses_project_venv


class _Responses:
    """One PCM chunk -> one response; `log_note()` adds the segment's codes and peak batch to its log line."""

    def __init__(self, stream, rate):
        self.stream = stream
        self.rate = rate

    def __iter__(self):
        for pcm in self.stream:
            yield pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("PCM", pcm.astype(np.float32, copy=False)),
                pb_utils.Tensor("SAMPLE_RATE", self.rate),
            ])

    def close(self):
        self.stream.close()

    def log_note(self):
        handle = getattr(self.stream, "handle", None)  # VITA's batcher handle; None for other engines
        return "" if handle is None else f"codes={handle.codes} batch_peak={handle.peak_batch}"


class TritonPythonModel:
    def initialize(self, args):
        assert_stub_uses_project_venv()
        family, options = backend.load_settings(args, SPEC)
        self.engine = backend.build_engine(SPEC.name, family, options)  # imports torch here, not at load
        pb_utils.Logger.log_info(f"{SPEC.name}: family {family.name}, {self.engine.stream_capacity} streams")
        # one worker per segment the engine can hold (running + queued), so none waits for a thread
        self.workers = backend.StreamWorkers(SPEC.name, self.engine.stream_capacity)

    def execute(self, requests):
        for request in requests:
            self.workers.submit(request, self._serve, eager=True)
        return None

    def _serve(self, inputs, is_cancelled):
        """Validate and queue the segment now (raising its error here); return its responses."""
        stream = self.engine.synthesize(inputs.text("TEXT"), bool(inputs.scalar("FIRST_SENTENCE")),
                                        inputs.scalar("SEED", None), is_cancelled)
        return _Responses(stream, np.array([self.engine.sample_rate], np.int32))

    def finalize(self):
        self.workers.shutdown()  # cancels running streams; their segments leave the batch at its next step
        self.engine.close()
