"""`python -m vitaserve_orchestrator`: run the orchestrator configured from `VITASERVE_*` variables
(see settings.py). Exits with code 2 on a configuration error, before loading anything."""

from __future__ import annotations

import asyncio
import logging
import sys

from pydantic import ValidationError

from vitaserve_orchestrator.settings import OrchestratorSettings


def main() -> int:
    try:
        settings = OrchestratorSettings()
    except ValidationError as exc:
        print(f"vitaserve orchestrator: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from vitaserve_orchestrator.server import serve  # heavy imports (torch) only after the check

    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
