"""Triton adapter of the audio encoder (batched, ragged): PCM (16 kHz) -> EMBEDDINGS and TEXT.

The model family (parameter `family`, `vitaserve.families`) builds the engine: VITA-1.5 answers with LLM
rows (n_tokens, H) for the `<audio>` placeholder, the small family with the transcript. Dynamic batching
hands `execute()` several one-waveform requests of different lengths (the PCM input allows ragged
batches), which the engine runs in one batched call. A request with bad audio gets an INVALID_ARG error
without failing the others. Tensors: `vitaserve.components.tensors.AUDIO_ENCODER`.
"""

from vitaserve.components.tensors import AUDIO_ENCODER as SPEC
from vitaserve.triton import backend
from vitaserve.triton.launcher import assert_stub_uses_project_venv


class TritonPythonModel:
    def initialize(self, args):
        assert_stub_uses_project_venv()
        family, options = backend.load_settings(args, SPEC)
        self.engine = backend.build_engine(SPEC.name, family, options)  # imports torch here, not at load

    def execute(self, requests):
        return backend.execute_batched(requests, SPEC.name, self._parse, self.engine.forward)

    def _parse(self, inputs):
        return self.engine.preprocess(inputs.array("PCM"))
