"""Exceptions of the kiln SDK, one per kind of failure, mapped from HTTP status codes."""

from __future__ import annotations


class KilnError(Exception):
    """Any error the API answered (status, message) or the client met."""

    def __init__(self, message: str, status: int | None = None, request_id: str | None = None):
        super().__init__(message if status is None else f"{message} (HTTP {status})")
        self.message = message
        self.status = status
        self.request_id = request_id


class InvalidArgument(KilnError):
    """400: the request was refused as invalid; nothing changed."""


class Unauthorized(KilnError):
    """401: no API key, or an unknown one."""


class NotFound(KilnError):
    """404: no such sandbox, file, template, volume, secret or rule (or not yours)."""


class Conflict(KilnError):
    """409: the name is taken, the volume is in use, the sandbox is stopped..."""


class RateLimited(KilnError):
    """429: a rate limit or quota; `retry_after` seconds when the server said."""

    def __init__(
        self, message: str, status: int | None = None, request_id: str | None = None, retry_after: float | None = None
    ):
        super().__init__(message, status, request_id)
        self.retry_after = retry_after


class Timeout(KilnError):
    """The request, or the command it ran, did not finish in time."""


class ServerError(KilnError):
    """5xx: the daemon failed; `request_id` finds the cause in its log."""


BY_STATUS = {
    400: InvalidArgument,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: InvalidArgument,
    429: RateLimited,
}


def error_for(status: int, message: str, request_id: str | None = None, retry_after: str | None = None) -> KilnError:
    cls = BY_STATUS.get(status, ServerError if status >= 500 else KilnError)
    if cls is RateLimited:
        return RateLimited(message, status, request_id, float(retry_after) if retry_after else None)
    return cls(message, status, request_id)


class BuildFailed(KilnError):
    """A Dockerfile build failed at a step (exit_code: the step's, when a RUN failed)."""

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code
