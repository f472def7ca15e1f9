"""`vitaserve`: the one command-line entry point, dispatching to each area's own CLI.

    vitaserve demo ...              the embedded default (a local end-to-end conversation)
    vitaserve converse ...          talk to a running orchestrator (vitaserve.client)
    vitaserve triton ...            the local Triton launcher
    vitaserve tiny-checkpoint ...   write a tiny checkpoint in the released layout
    vitaserve batch ...             batch jobs on Celery (submit | status | cancel | schedules)
    vitaserve cluster ...           Kubernetes-aware routing: component pods and model readiness

Each subcommand is `module:function` taking `argv` and returning an exit code, imported only when it is
run, so one deployment's image needs only the dependencies of the commands it uses.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from vitaserve.lifecycle import run_main

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("vitaserve.demo:main", "run the embedded default: a local end-to-end conversation"),
    "converse": ("vitaserve.client:main", "talk to a running orchestrator with a WAV, an image and/or text"),
    "triton": ("vitaserve.triton.launcher:main", "start the bundled tritonserver on a model repository"),
    "tiny-checkpoint": ("vitaserve.models.tiny:main", "write a tiny checkpoint in the released layout"),
    "batch": ("vitaserve_batch.cli:main", "batch jobs: submit | status | cancel | schedules"),
    "cluster": ("vitaserve.cluster.cli:main", "component pods and model readiness (Kubernetes routing)"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: vitaserve COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"vitaserve: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, func_name = SUBCOMMANDS[name][0].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        print(f"vitaserve {name}: not available in this installation ({exc})", file=sys.stderr)
        return 2
    # SIGINT/SIGTERM unwind the command, so what it started (Triton, the orchestrator) stops too.
    result = run_main(getattr(module, func_name), rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
