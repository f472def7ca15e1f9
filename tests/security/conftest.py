"""Fixtures and helpers of the security tests. This folder is put on `sys.path` so its helpers
(`oversize.py`) are imported by name (the suite runs with `--import-mode=importlib`). Appended, not
prepended: other folders import their own `conftest` by name, which must not resolve to this one."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).parent)
if HERE not in sys.path:
    sys.path.append(HERE)
