"""Long fuzzing runs of the Converse stream or the Realtime gateway against a live deployment (the test
suite runs a short budget of both).

    python bench/fuzz.py --sequences 200 [--steps 20] [--minutes 30] [--json] [--checkpoint DIR]
    python bench/fuzz.py --target gateway --sequences 100 [--minutes 30] [--json]

Starts real Triton (tiny VITA-1.5 checkpoint unless --checkpoint) and the orchestrator with auth on (two
tenants), exactly as tests/fuzz/ does, and runs the hypothesis state machine of
tests/fuzz/converse_machine.py with fresh random examples (not the derandomized ones of the suite) for
`--sequences` examples of up to `--steps` steps, or until `--minutes` pass. A violated invariant (a crash, a
hang, an undocumented error code, a harmed canary session, inconsistent history) is shrunk by hypothesis
and printed with the steps that reproduce it; the exit code is then 1. The report: sequences, steps, turns,
error codes seen, how streams ended, the canary's turns, and the orchestrator log's tracebacks (0 expected).
`--target gateway`: the small-family stack with the gateway (as tests/gateway/ starts it) and the state
machine of tests/gateway/realtime_machine.py; the report counts error codes, close codes, responses and
the canary's turns, and the gateway log's tracebacks.
SIGINT/SIGTERM stop everything it started (vitaserve.lifecycle.run_main).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from vitaserve.lifecycle import run_main
from vitaserve.models.tiny import write_tiny_checkpoint
from vitaserve.stack import LocalStack

FUZZ_DIR = Path(__file__).resolve().parents[1] / "tests" / "fuzz"
GOLDEN = FUZZ_DIR.parent / "golden" / "vita15-tiny"


def _fuzz_modules():  # noqa: ANN202 - the test folder's conftest (deployment) and machine
    sys.path.insert(0, str(FUZZ_DIR))
    import converse_machine

    spec = importlib.util.spec_from_file_location("fuzz_conftest", FUZZ_DIR / "conftest.py")
    assert spec is not None and spec.loader is not None
    deployment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deployment)
    return converse_machine, deployment


def fuzz(checkpoint: str | None, *, sequences: int, steps: int, minutes: float | None,
         keep_logs: str | None = None) -> dict:
    machine, deployment = _fuzz_modules()
    with tempfile.TemporaryDirectory(prefix="vitaserve-fuzz-") as tmp:
        work = Path(tmp)
        ckpt = Path(checkpoint) if checkpoint else write_tiny_checkpoint(work / "ckpt", golden=GOLDEN)
        with LocalStack(ckpt, work_dir=work / "stack",
                        orchestrator_env=deployment.fuzz_orchestrator_env(work)) as stack:
            started = time.monotonic()
            violation = ""
            findings = machine.Findings()
            try:
                machine.run_fuzz(deployment.fuzz_target(stack), sequences=sequences, steps=steps,
                                 derandomize=False, deadline_s=minutes * 60 if minutes else None,
                                 findings=findings)
            except Exception as exc:  # a violated invariant: hypothesis printed the steps it could replay
                violation = _describe(exc)
            log = (stack.work_dir / "orchestrator.log").read_text(errors="replace")
            _keep_logs(stack.work_dir, keep_logs)
            report = _plain(findings)
            report.update(wall_s=round(time.monotonic() - started, 1), violation=violation,
                          orchestrator_alive=stack.orchestrator is not None
                          and stack.orchestrator.proc.poll() is None,
                          orchestrator_tracebacks=log.count("Traceback"))
            report.pop("canary_turn_s", None)
            return report


def _plain(findings: object) -> dict:
    """The findings as JSON-able values (dataclasses.asdict would turn a Counter's items into keys)."""
    return {k: dict(v) if isinstance(v, dict) else v for k, v in vars(findings).items()}


def _describe(exc: BaseException) -> str:
    """The violation's own messages, out of hypothesis's wrappers (a flaky replay groups them)."""
    parts = [f"{type(exc).__name__}: {exc}"]
    for inner in getattr(exc, "exceptions", ()):
        parts.append(_describe(inner))
    if exc.__cause__ is not None:
        parts.append(_describe(exc.__cause__))
    return " | ".join(parts)


def _keep_logs(work_dir: Path, keep: str | None) -> None:
    """Copy the services' logs out of the run's temporary folder (to read what a violation left there)."""
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for log in work_dir.glob("*.log"):
            shutil.copy(log, Path(keep) / log.name)


def fuzz_gateway(*, sequences: int, steps: int, minutes: float | None, keep_logs: str | None = None) -> dict:
    sys.path.insert(0, str(FUZZ_DIR.parent / "gateway"))
    import realtime_machine

    from vitaserve_gateway.settings import GatewaySettings

    with tempfile.TemporaryDirectory(prefix="vitaserve-fuzz-gw-") as tmp, \
            LocalStack(None, family="small", gateway=True, work_dir=tmp) as stack:
        gateway = stack.gateway
        assert gateway is not None
        url = stack.gateway_url.replace("http://", "ws://") + "/v1/realtime?model=vitaserve"
        findings = realtime_machine.RealtimeFindings()
        started = time.monotonic()
        violation = ""
        try:
            realtime_machine.run_realtime_fuzz(
                url, alive=lambda: gateway.proc.poll() is None,
                max_message_bytes=GatewaySettings().max_message_bytes, sequences=sequences, steps=steps,
                derandomize=False, deadline_s=minutes * 60 if minutes else None, findings=findings)
        except Exception as exc:
            violation = _describe(exc)
        log = (stack.work_dir / "gateway.log").read_text(errors="replace")
        _keep_logs(stack.work_dir, keep_logs)
        report = _plain(findings)
        report.update(wall_s=round(time.monotonic() - started, 1), violation=violation,
                      gateway_alive=gateway.proc.poll() is None, gateway_tracebacks=log.count("Traceback"))
        return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=("converse", "gateway"), default="converse",
                        help="the orchestrator's Converse stream (tiny VITA-1.5) or the Realtime gateway "
                        "(small family)")
    parser.add_argument("--sequences", type=int, default=200, help="examples (client sessions) to run")
    parser.add_argument("--steps", type=int, default=20, help="most steps (client actions) per example")
    parser.add_argument("--minutes", type=float, help="stop starting new examples after this long")
    parser.add_argument("--checkpoint", help="checkpoint directory (default: a tiny one, random weights)")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the services' logs to DIR at the end")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    if args.target == "gateway":
        report = fuzz_gateway(sequences=args.sequences, steps=args.steps, minutes=args.minutes,
                              keep_logs=args.keep_logs)
    else:
        report = fuzz(args.checkpoint, sequences=args.sequences, steps=args.steps, minutes=args.minutes,
                      keep_logs=args.keep_logs)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        for key, value in report.items():
            print(f"{key:24s} {value}")
    service = "gateway" if args.target == "gateway" else "orchestrator"
    sound = (not report["violation"] and not report.get("violations") and report[f"{service}_alive"]
             and report[f"{service}_tracebacks"] == 0)
    return 0 if sound else 1


if __name__ == "__main__":
    sys.exit(run_main(main))  # SIGINT/SIGTERM stop everything it started, then exit
