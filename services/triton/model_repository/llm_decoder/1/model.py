"""Triton adapter of the LLM decoder (decoupled): a ChatML prompt + media rows -> one response per token.

Each request is served on a worker thread (`backend.StreamWorkers`, `max_streams` per instance), so
`execute()` returns at once. `LLMEngine` polls the request's cancellation before every token; the last
response carries FINISH_REASON ("stop" or "length") and TOKEN_ID -1; the final flag is always sent.
Tensors: `vitaserve.components.tensors.LLM_DECODER`.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from vitaserve.components.base import GenerationParams
from vitaserve.components.tensors import LLM_DECODER as SPEC
from vitaserve.components.tensors import NO_TOKEN, unpack_media
from vitaserve.triton import backend
from vitaserve.triton.launcher import assert_stub_uses_project_venv


class TritonPythonModel:
    def initialize(self, args):
        assert_stub_uses_project_venv()
        settings = backend.load_settings(args, SPEC)
        # torch is imported here, not at module level: Triton's config auto-complete pass imports this
        # file in a stub of its own, which then stays cheap.
        from vitaserve.components.engines import LLMEngine
        from vitaserve.models.checkpoint import CheckpointDir

        checkpoint = CheckpointDir(settings.checkpoint_dir)
        self.engine = LLMEngine(checkpoint, dtype=settings.dtype, device=settings.device)
        self.workers = backend.StreamWorkers(SPEC.name, settings.max_streams)

    def execute(self, requests):
        for request in requests:
            self.workers.submit(request, self._serve)
        return None

    def _serve(self, inputs, is_cancelled):
        media = unpack_media(inputs.array("MEDIA_EMBEDS"), inputs.array("MEDIA_ROWS"))
        params = GenerationParams(
            max_tokens=int(inputs.scalar("MAX_TOKENS")),
            temperature=float(inputs.scalar("TEMPERATURE")),
            top_p=float(inputs.scalar("TOP_P")),
            top_k=int(inputs.scalar("TOP_K")),
            seed=inputs.scalar("SEED", None),
        )
        for delta in self.engine.generate(inputs.text("PROMPT"), media, params, is_cancelled):
            token = NO_TOKEN if delta.token_id is None else delta.token_id
            yield pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("TOKEN_ID", np.array([token], np.int64)),
                pb_utils.Tensor("TEXT", np.array([delta.text.encode("utf-8")], np.object_)),
                pb_utils.Tensor("FINISH_REASON", np.array([(delta.finish_reason or "").encode()], np.object_)),
            ])

    def finalize(self):
        self.workers.shutdown()
