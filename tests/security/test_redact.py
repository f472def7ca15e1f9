"""The gateway's log filter (`vitaserve_gateway/redact.py`): every form a key takes in a handshake header
is rewritten before a record is formatted, through the handlers of the uvicorn configuration the gateway
runs with; other text is untouched. The whole-run check (every log file of a stack at DEBUG) is in
tests/gateway/test_bad_input.py."""

from __future__ import annotations

import io
import logging
import logging.config

import pytest

from vitaserve_gateway.redact import REDACTED, RedactSecrets, redact, uvicorn_log_config

pytestmark = pytest.mark.unit

KEY = "vs_Zm9vYmFyYmF6cXV4"


@pytest.mark.parametrize("line", [
    f"< authorization: Bearer {KEY}", f"< Authorization: {KEY}", f"< x-api-key: {KEY}",
    f"< sec-websocket-protocol: realtime, openai-insecure-api-key.{KEY}, openai-beta.realtime-v1",
    f"headers={{'authorization': 'Bearer {KEY}'}}",
])
def test_each_form_of_a_key_is_redacted(line: str) -> None:
    cleaned = redact(line)
    assert KEY not in cleaned and REDACTED in cleaned


def test_other_text_is_untouched_and_records_are_kept() -> None:
    assert redact("< sec-websocket-protocol: realtime") == "< sec-websocket-protocol: realtime"
    record = logging.LogRecord("websockets", logging.DEBUG, __file__, 1, "< %s: %s", ("authorization", KEY), None)
    assert RedactSecrets().filter(record) is True and KEY not in record.getMessage()


def test_the_uvicorn_handlers_redact_whatever_logger_writes() -> None:
    config = uvicorn_log_config()
    stream = io.StringIO()
    logging.config.dictConfig(config)
    try:
        (handler,) = logging.getLogger("uvicorn").handlers  # uvicorn.error propagates to it
        handler.setStream(stream)  # type: ignore[attr-defined]
        logging.getLogger("uvicorn.error").setLevel(logging.DEBUG)
        logging.getLogger("uvicorn.error").debug("< authorization: Bearer %s", KEY)
    finally:
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
    assert "authorization: [redacted]" in stream.getvalue() and KEY not in stream.getvalue()
