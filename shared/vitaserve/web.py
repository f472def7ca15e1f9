"""`python -m vitaserve.web` (`make web`): the whole local stack with the Realtime gateway, for a browser.

    python -m vitaserve.web [--family small|vita15] [--port 8080] [--host 127.0.0.1]

Starts Triton, the orchestrator and the gateway (the small family by default: it answers meaningfully on a
laptop CPU), prints the page's URL and the WebSocket URL for OpenAI Realtime clients, and serves until
Ctrl-C or SIGTERM, which stop every process it started (vitaserve.lifecycle). Open the URL in a browser,
allow the microphone and camera, and talk; talk over a reply to interrupt it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vitaserve.families import FAMILIES
from vitaserve.lifecycle import run_main
from vitaserve.stack import REPO_ROOT, LocalStack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="small")
    parser.add_argument("--checkpoint", type=Path, help="a VITA-1.5 checkpoint directory (--family vita15)")
    parser.add_argument("--port", type=int, default=8080, help="the gateway's port (default 8080)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the gateway's address (default loopback; 0.0.0.0 serves other machines)")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint
    if args.family == "vita15" and checkpoint is None:
        from vitaserve.demo import DEFAULT_TINY, ensure_tiny_checkpoint

        checkpoint = ensure_tiny_checkpoint(DEFAULT_TINY)
        print("NOTE: the tiny VITA-1.5 checkpoint has random weights; its replies are noise by design.")
    t0 = time.perf_counter()
    with LocalStack(checkpoint, family=args.family, gateway=True, gateway_port=args.port,
                    gateway_host=args.host, work_dir=REPO_ROOT / "var" / f"web-stack-{args.family}") as stack:
        url = stack.gateway_url
        print(f"ready in {time.perf_counter() - t0:.1f} s")
        print(f"  browser page:      {url}/   (allow the microphone and camera; Chrome/Firefox on localhost)")
        print(f"  OpenAI Realtime:   {url.replace('http', 'ws', 1)}/v1/realtime?model=vitaserve   "
              f"(AsyncOpenAI(base_url=\"{url}/v1\").realtime.connect(model=\"vitaserve\"))")
        print(f"  gRPC Converse:     {stack.orchestrator_address}")
        print("Ctrl-C stops everything.", flush=True)
        while True:
            if stack.gateway is not None and stack.gateway.proc is not None and stack.gateway.proc.poll() is not None:
                print(f"the gateway exited with code {stack.gateway.proc.returncode}", file=sys.stderr)
                return 1
            time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(run_main(main))
