"""How long each step of a long engine operation took, for its log line ("assemble 12 ms, ...")."""

from __future__ import annotations

import time


class Phases:
    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.steps: list[tuple[str, float]] = []

    def mark(self, step: str) -> None:
        """The step just finished: what it took since the previous mark (or the start)."""
        now = time.perf_counter()
        self.steps.append((step, now - self.last))
        self.last = now

    def __str__(self) -> str:
        return ", ".join(f"{step} {1000 * took:.0f} ms" for step, took in self.steps)
