"""Stateful fuzzing of the Converse stream against a live orchestrator + Triton (tiny VITA-1.5), with a
short budget; `bench/fuzz.py --sequences N` runs the same machine for long. The machine and its invariants:
converse_machine.py."""

from __future__ import annotations

import pytest
from conftest import fuzz_target
from converse_machine import run_fuzz

from vitaserve.stack import LocalStack

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def test_random_event_sequences_keep_the_service_and_other_sessions_sound(fuzz_stack: LocalStack) -> None:
    findings = run_fuzz(fuzz_target(fuzz_stack), sequences=12, steps=14)
    print(f"fuzz: {findings}")
    assert findings.sequences >= 12 and findings.steps > 12 * 5
    assert findings.violations == []
    # The canary session talked the whole time (and once more after the fuzzing; a failed canary turn is a
    # violation), and the fuzzing did reach the model and the error paths.
    assert findings.canary_turns >= 2
    assert findings.turns >= 3 and sum(findings.error_codes.values()) >= 8
    log = (fuzz_stack.work_dir / "orchestrator.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
