"""The soak tests run the benchmark's own code: `bench/soak.py` is loaded here by its path (bench/ is not a
package, and the suite runs with `--import-mode=importlib`) and handed to the tests as a fixture."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH_SOAK = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def load_bench_soak() -> ModuleType:
    name = "vitaserve_bench_soak"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH_SOAK)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def bench_soak() -> ModuleType:
    return load_bench_soak()
