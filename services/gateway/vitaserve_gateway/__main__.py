"""`python -m vitaserve_gateway`: serve the Realtime gateway with uvicorn, configured from
`VITASERVE_GATEWAY_*` variables (settings.py). Exits with code 2 on a configuration error."""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic import ValidationError

from vitaserve_gateway.redact import install_on_root, uvicorn_log_config
from vitaserve_gateway.settings import GatewaySettings


def main() -> int:
    try:
        settings = GatewaySettings()
    except ValidationError as exc:
        print(f"vitaserve gateway: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_on_root()  # at DEBUG the handshake headers are logged: keys are redacted (redact.py)
    from vitaserve_gateway.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ws="websockets-sansio",
        # h11 bounds the request head (httptools buffers any size of headers); only the upgrade and the
        # small pages are HTTP, the WebSocket frames go through websockets
        http="h11",
        h11_max_incomplete_event_size=settings.max_header_bytes,
        ws_max_size=settings.max_message_bytes,
        ws_ping_interval=settings.ws_ping_interval_s,
        ws_ping_timeout=settings.ws_ping_timeout_s,
        ssl_certfile=str(settings.tls_cert_file) if settings.tls_cert_file else None,
        ssl_keyfile=str(settings.tls_key_file) if settings.tls_key_file else None,
        log_level=settings.log_level.lower(),
        log_config=uvicorn_log_config(),
        access_log=False,  # an access log line would carry the query string of every upgrade
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
