"""The fuzzing deployment: real Triton with the four models on the tiny VITA-1.5 checkpoint, and a real
orchestrator process with auth on (two tenants), small reply limits (fast examples) and a small gRPC
message limit (cheap huge messages). Started once per test session, stopped by pid."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vitaserve.stack import LocalStack

sys.path.insert(0, str(Path(__file__).parent))
from converse_machine import MAX_TOKENS, FuzzTarget  # noqa: E402

ALPHA_KEY, BETA_KEY = "fuzz-alpha-key", "fuzz-beta-key"
TENANT_MAX_MESSAGE_BYTES = 256 * 1024
GRPC_MAX_MESSAGE_BYTES = 1024 * 1024


def fuzz_orchestrator_env(work: Path) -> dict[str, str]:
    keys = work / "keys.json"
    keys.write_text(json.dumps({
        "tenants": {"alpha": {"max_streams": 8, "max_message_bytes": TENANT_MAX_MESSAGE_BYTES},
                    "beta": {"max_streams": 8}},
        "keys": [{"sha256": hashlib.sha256(k.encode()).hexdigest(), "tenant": t}
                 for k, t in ((ALPHA_KEY, "alpha"), (BETA_KEY, "beta"))],
    }))
    return {"VITASERVE_API_KEYS_FILE": str(keys),
            "VITASERVE_MAX_REPLY_TOKENS": str(MAX_TOKENS),
            "VITASERVE_MAX_REPLY_TOKENS_LIMIT": str(MAX_TOKENS),
            "VITASERVE_GRPC_MAX_MESSAGE_BYTES": str(GRPC_MAX_MESSAGE_BYTES)}


def fuzz_target(stack: LocalStack) -> FuzzTarget:
    proc = stack.orchestrator
    assert proc is not None
    return FuzzTarget(address=stack.orchestrator_address, alpha_key=ALPHA_KEY, beta_key=BETA_KEY,
                      alive=lambda: proc.proc.poll() is None, max_message_bytes=TENANT_MAX_MESSAGE_BYTES,
                      grpc_max_message_bytes=GRPC_MAX_MESSAGE_BYTES)


@pytest.fixture(scope="session")
def fuzz_stack(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    work = tmp_path_factory.mktemp("fuzz")
    with LocalStack(tiny_checkpoint, work_dir=work, orchestrator_env=fuzz_orchestrator_env(work)) as running:
        yield running
