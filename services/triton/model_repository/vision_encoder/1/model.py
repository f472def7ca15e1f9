"""Triton adapter of the vision encoder (batched): IMAGE + MAX_TILES -> EMBEDDINGS (n_tiles·256, H).

Dynamic batching hands `execute()` several one-image requests; their tiles go through the encoder in one
forward (`VisionEngine`). A request with bad image bytes or MAX_TILES gets an INVALID_ARG error without
failing the others. Tensors: `vitaserve.components.tensors.VISION_ENCODER`.
"""

from vitaserve.components.base import ImageInput
from vitaserve.components.tensors import VISION_ENCODER as SPEC
from vitaserve.triton import backend
from vitaserve.triton.launcher import assert_stub_uses_project_venv


class TritonPythonModel:
    def initialize(self, args):
        assert_stub_uses_project_venv()
        settings = backend.load_settings(args, SPEC)
        # torch is imported here, not at module level: Triton's config auto-complete pass imports this
        # file in a stub of its own, which then stays cheap.
        from vitaserve.components.engines import VisionEngine
        from vitaserve.models.checkpoint import CheckpointDir

        checkpoint = CheckpointDir(settings.checkpoint_dir)
        self.engine = VisionEngine(checkpoint, dtype=settings.dtype, device=settings.device)

    def execute(self, requests):
        return backend.execute_batched(requests, SPEC.name, self._parse, self.engine.forward, "EMBEDDINGS")

    def _parse(self, inputs):
        image = ImageInput(data=inputs.scalar("IMAGE"), max_tiles=int(inputs.scalar("MAX_TILES")))
        return self.engine.preprocess(image)
