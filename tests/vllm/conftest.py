"""The vLLM tests reuse the Triton tests' helpers (tests/components/triton_calls.py), imported by name."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "components"))
