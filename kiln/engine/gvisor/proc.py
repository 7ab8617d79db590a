"""Host commands for the engine: kiln.proc.run, failing with EngineError."""

from __future__ import annotations

from ... import proc
from ..base import EngineError


async def run(argv: list[str], input: bytes | None = None, check: bool = True, timeout: float = 120.0) -> str:
    try:
        return await proc.run(argv, input=input, check=check, timeout=timeout)
    except proc.CommandFailed as e:
        raise EngineError(str(e)) from e
