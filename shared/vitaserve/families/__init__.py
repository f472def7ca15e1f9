"""Model families: which models fill the four components, and how a turn flows between them.

    vita15  VITA-1.5 (production): encoders return LLM rows spliced into a ChatML prompt's placeholders
    small   small trained models from packages (the embedded default): encoders return text (a transcript,
            an image description), a small LLM reads a text prompt, a small TTS speaks the reply

`get_family(name)` is the one place a name becomes a `ModelFamily`; the orchestrator (setting
`model_family`), the batch worker, the Triton models (parameter `family`) and `InProcessComponents` all
go through it. Importing this package loads no model code (engines import torch only when built).
"""

from __future__ import annotations

from vitaserve.families.base import EngineOptions, LLMRequest, ModelFamily, TurnContent
from vitaserve.families.small import SmallFamily
from vitaserve.families.vita15 import Vita15Family

__all__ = ["DEFAULT_FAMILY", "FAMILIES", "EngineOptions", "LLMRequest", "ModelFamily", "TurnContent",
           "get_family"]

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (Vita15Family(), SmallFamily())}
# The family of a deployment that names none: production serves VITA-1.5. (The embedded demo picks
# `small` itself.)
DEFAULT_FAMILY = "vita15"


def get_family(name: str | None = None) -> ModelFamily:
    """The family called `name` (empty or None: DEFAULT_FAMILY); ValueError naming the known ones."""
    try:
        return FAMILIES[name or DEFAULT_FAMILY]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None
