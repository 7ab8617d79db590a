"""kiln's Python SDK: `Kiln` (blocking) and `AsyncKiln` (asyncio), with the same names and methods."""

from .aio import AsyncKiln, AsyncSandbox, CommandResult
from .errors import Conflict, InvalidArgument, KilnError, NotFound, RateLimited, ServerError, Timeout, Unauthorized
from .sync import Kiln, Sandbox

__all__ = [
    "AsyncKiln",
    "AsyncSandbox",
    "CommandResult",
    "Conflict",
    "InvalidArgument",
    "Kiln",
    "KilnError",
    "NotFound",
    "RateLimited",
    "Sandbox",
    "ServerError",
    "Timeout",
    "Unauthorized",
]
