"""The one exception hierarchy of kiln; the API layer maps each class to its status code in one place."""

from __future__ import annotations


class KilnError(Exception):
    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(KilnError):
    status = 400


class Unauthorized(KilnError):
    status = 401


class Forbidden(KilnError):
    status = 403


class NotFound(KilnError):
    status = 404


class RequestTimeout(KilnError):
    status = 408


class Conflict(KilnError):
    status = 409


class TooLarge(KilnError):
    status = 413


class TooManyRequests(KilnError):
    status = 429


class Internal(KilnError):
    """A failure whose cause is logged but never shown to the caller."""

    status = 500

    def __init__(self, cause: str = ""):
        super().__init__("internal error")
        self.cause = cause


class NotImplementedYet(KilnError):
    """A feature of the API kiln does not have yet (the message names the field)."""

    status = 501


class BadGateway(KilnError):
    """Nothing answers on the sandbox port a request was meant for."""

    status = 502


class Unavailable(KilnError):
    status = 503


class InsufficientStorage(KilnError):
    """The server's disk is full: nothing was changed."""

    status = 507
