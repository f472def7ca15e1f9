"""Stateful fuzzing of the Realtime gateway's WebSocket against the live small-family stack, with a short
budget (the machine and its invariants: realtime_machine.py)."""

from __future__ import annotations

import pytest
from realtime_machine import run_realtime_fuzz

from vitaserve.stack import LocalStack
from vitaserve_gateway.settings import GatewaySettings

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]


def test_random_realtime_event_sequences_keep_the_gateway_and_other_sockets_sound(
        gateway_stack: LocalStack) -> None:
    gateway = gateway_stack.gateway
    assert gateway is not None
    url = gateway_stack.gateway_url.replace("http://", "ws://") + "/v1/realtime?model=vitaserve"
    findings = run_realtime_fuzz(url, alive=lambda: gateway.proc.poll() is None,
                                 max_message_bytes=GatewaySettings().max_message_bytes,
                                 sequences=10, steps=12)
    print(f"realtime fuzz: {findings}")
    assert findings.violations == []
    assert findings.sequences >= 10 and findings.steps > 10 * 5
    assert findings.canary_turns >= 2 and sum(findings.error_codes.values()) >= 8
    log = (gateway_stack.work_dir / "gateway.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
