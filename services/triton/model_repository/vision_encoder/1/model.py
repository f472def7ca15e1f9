"""Triton adapter of the vision encoder (batched): IMAGE + MAX_TILES -> EMBEDDINGS and TEXT.

The model family (parameter `family`, `vitaserve.families`) builds the engine: VITA-1.5 answers with LLM
rows (n_tiles·256, H) for the `<image>` placeholders, the small family with a one-line description. Dynamic
batching hands `execute()` several one-image requests, which the engine runs in one batched call. A request
with bad image bytes or MAX_TILES gets an INVALID_ARG error without failing the others. Tensors:
`vitaserve.components.tensors.VISION_ENCODER`.
"""

from vitaserve.components.base import ImageInput
from vitaserve.components.tensors import VISION_ENCODER as SPEC
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
        image = ImageInput(data=inputs.scalar("IMAGE"), max_tiles=int(inputs.scalar("MAX_TILES")))
        return self.engine.preprocess(image)
