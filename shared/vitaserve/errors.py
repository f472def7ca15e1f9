"""One typed error hierarchy for the whole platform.

Every error a service can report derives from `VitaserveError`. Each class names its gRPC status code
(mapped once, at the gRPC edge) and whether retrying the same call may succeed. Code raises these; it
never returns error objects.
"""

from __future__ import annotations


class VitaserveError(Exception):
    """Base class. `code` is the name of a `grpc.StatusCode` member; `retryable` tells callers whether
    the same request may succeed later."""

    code: str = "INTERNAL"
    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable


class InvalidInput(VitaserveError, ValueError):
    """The caller sent something malformed or out of bounds (bad image bytes, NaN audio, ...)."""

    code = "INVALID_ARGUMENT"


class NotFound(VitaserveError, LookupError):
    """A named thing (session, job, model) does not exist for this caller."""

    code = "NOT_FOUND"


class FailedPrecondition(VitaserveError):
    """The request is well formed but not valid in the current state (e.g. events out of order)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(VitaserveError):
    """A limit was hit (queue full, memory budget, quota); may succeed later."""

    code = "RESOURCE_EXHAUSTED"
    retryable = True


class RateLimited(ResourceExhausted):
    """A rate limit was hit (e.g. a tenant's turns per minute); `retry_after_s` says when the same call may
    succeed."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message, retryable=True)
        self.retry_after_s = retry_after_s


class Unavailable(VitaserveError):
    """A dependency (Triton, Redis) cannot be reached right now."""

    code = "UNAVAILABLE"
    retryable = True


class Cancelled(VitaserveError):
    """The operation was cancelled (barge-in, client went away)."""

    code = "CANCELLED"


class Unauthenticated(VitaserveError):
    code = "UNAUTHENTICATED"


class Aborted(VitaserveError):
    """A concurrency conflict: e.g. a newer stream took the session over (its fencing epoch is newer)."""

    code = "ABORTED"


class CheckpointError(VitaserveError):
    """A checkpoint directory is incomplete, inconsistent or of an unknown kind. The message names the
    file and the tensor key involved."""

    code = "FAILED_PRECONDITION"
