"""kiln's Python SDK: `Kiln` (blocking) and `AsyncKiln` (asyncio), with the same names and methods."""

from .aio import AsyncKiln, AsyncSandbox, CommandResult
from .errors import (
    BuildFailed,
    Conflict,
    InvalidArgument,
    KilnError,
    NotFound,
    RateLimited,
    ServerError,
    Timeout,
    Unauthorized,
)
from .sync import Kiln, Sandbox

__all__ = [
    "AsyncKiln",
    "AsyncSandbox",
    "BuildFailed",
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
