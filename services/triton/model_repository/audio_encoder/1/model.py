"""Triton adapter of the audio encoder (batched, ragged): PCM (16 kHz) -> EMBEDDINGS (n_tokens, H).

Dynamic batching hands `execute()` several one-waveform requests of different lengths (the PCM input
allows ragged batches); they are padded into one encoder forward (`AudioEngine`). A request with bad
audio gets an INVALID_ARG error without failing the others. Tensors:
`vitaserve.components.tensors.AUDIO_ENCODER`.
"""

from vitaserve.components.tensors import AUDIO_ENCODER as SPEC
from vitaserve.triton import backend
from vitaserve.triton.launcher import assert_stub_uses_project_venv


class TritonPythonModel:
    def initialize(self, args):
        assert_stub_uses_project_venv()
        settings = backend.load_settings(args, SPEC)
        # torch is imported here, not at module level: Triton's config auto-complete pass imports this
        # file in a stub of its own, which then stays cheap.
        from vitaserve.components.engines import AudioEngine
        from vitaserve.models.checkpoint import CheckpointDir

        checkpoint = CheckpointDir(settings.checkpoint_dir)
        self.engine = AudioEngine(checkpoint, dtype=settings.dtype, device=settings.device)

    def execute(self, requests):
        return backend.execute_batched(requests, SPEC.name, self._parse, self.engine.forward, "EMBEDDINGS")

    def _parse(self, inputs):
        return self.engine.preprocess(inputs.array("PCM"))
