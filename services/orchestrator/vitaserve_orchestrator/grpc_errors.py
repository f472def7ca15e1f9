"""The one place where `VitaserveError`s become gRPC status codes.

Errors that end a stream are `context.abort(code, message)`; errors that concern one event become an
`ErrorEvent` carrying the same code name. Both go through `status_code`, so a class maps to exactly one
code everywhere.
"""

from __future__ import annotations

from typing import NoReturn

import grpc

from vitaserve.errors import VitaserveError
from vitaserve_orchestrator.events import ErrorEvent


def as_vitaserve_error(exc: BaseException) -> VitaserveError:
    """`exc` itself if it is a `VitaserveError`, else an INTERNAL error naming it."""
    if isinstance(exc, VitaserveError):
        return exc
    return VitaserveError(f"internal error: {type(exc).__name__}: {exc}")


def status_code(exc: VitaserveError) -> grpc.StatusCode:
    """The gRPC status code of an error (INTERNAL if its code is not a `grpc.StatusCode` name)."""
    return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)


def error_event(exc: BaseException, event_id: str = "") -> ErrorEvent:
    err = as_vitaserve_error(exc)
    return ErrorEvent(
        code=status_code(err).name, message=err.message, event_id=event_id, retryable=err.retryable
    )


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End the RPC with the status of `exc`."""
    err = as_vitaserve_error(exc)
    await context.abort(status_code(err), err.message)
    raise AssertionError("context.abort returned")  # abort always raises
