"""Running host commands from asyncio, with errors that say what failed."""

from __future__ import annotations

import asyncio
import subprocess


class CommandFailed(Exception):
    pass


async def run(argv: list[str], input: bytes | None = None, check: bool = True, timeout: float = 120.0) -> str:
    """Run argv to completion and return its stdout; raise CommandFailed on failure when check."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CommandFailed(f"{' '.join(argv[:4])}: timed out after {timeout}s")
    if check and proc.returncode != 0:
        raise CommandFailed(f"{' '.join(argv[:6])}: exit {proc.returncode}: {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


async def exit_status(argv: list[str], timeout: float = 600.0) -> int:
    """Run argv to completion and return its exit status (for tools whose status carries meaning)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CommandFailed(f"{' '.join(argv[:4])}: timed out after {timeout}s") from None
