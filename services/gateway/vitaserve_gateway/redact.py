"""Keep API keys out of the gateway's logs.

At DEBUG, the WebSocket library under uvicorn logs every handshake header, among them `Authorization:
Bearer <key>`, `x-api-key` and the browser form of the key, the subprotocol `openai-insecure-api-key.<key>`.
`RedactSecrets` is a logging filter installed on every handler (uvicorn's and the root's) that rewrites such
values to `[redacted]` before a record is formatted, whatever logger it comes from.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

REDACTED = "[redacted]"
_PATTERNS = (
    (re.compile(r"(?i)\b(authorization|proxy-authorization|x-api-key)(['\"]?\s*[:=,]\s*)[^\r\n]*"),
     rf"\1\2{REDACTED}"),
    (re.compile(r"(?i)(openai-insecure-api-key\.)[^\s,;'\"]+"), rf"\1{REDACTED}"),
)


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactSecrets(logging.Filter):
    """Rewrites a record's message (args merged in) without keys; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's to report, not ours
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


def install_on_root() -> None:
    """Add the filter to the root logger's handlers (those of `logging.basicConfig`)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactSecrets())


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's default logging configuration with the filter on each of its handlers."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_secrets"] = {"()": f"{__name__}.RedactSecrets"}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact_secrets")
    return config
