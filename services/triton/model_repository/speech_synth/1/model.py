"""Triton adapter of speech synthesis (decoupled): one text segment -> one response per 24 kHz PCM chunk.

Each request is served on a worker thread (`backend.StreamWorkers`, `max_streams` per instance), so
`execute()` returns at once. `SpeechEngine` polls the request's cancellation before every speech code;
the final flag is always sent. Text that is empty once the state marks are stripped gives no chunks.
Tensors: `vitaserve.components.tensors.SPEECH_SYNTH`.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from vitaserve.components.tensors import SPEECH_SYNTH as SPEC
from vitaserve.triton import backend
from vitaserve.triton.launcher import assert_stub_uses_project_venv


class TritonPythonModel:
    def initialize(self, args):
        assert_stub_uses_project_venv()
        settings = backend.load_settings(args, SPEC)
        # torch is imported here, not at module level: Triton's config auto-complete pass imports this
        # file in a stub of its own, which then stays cheap.
        from vitaserve.components.engines import SpeechEngine
        from vitaserve.models.checkpoint import CheckpointDir

        checkpoint = CheckpointDir(settings.checkpoint_dir)
        self.engine = SpeechEngine(checkpoint, dtype=settings.dtype, device=settings.device)
        self.workers = backend.StreamWorkers(SPEC.name, settings.max_streams)

    def execute(self, requests):
        for request in requests:
            self.workers.submit(request, self._serve)
        return None

    def _serve(self, inputs, is_cancelled):
        text = inputs.text("TEXT")
        first = bool(inputs.scalar("FIRST_SENTENCE"))
        rate = np.array([self.engine.sample_rate], np.int32)
        for pcm in self.engine.synthesize(text, first, inputs.scalar("SEED", None), is_cancelled):
            yield pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("PCM", pcm.astype(np.float32, copy=False)),
                pb_utils.Tensor("SAMPLE_RATE", rate),
            ])

    def finalize(self):
        self.workers.shutdown()
