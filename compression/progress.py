"""Progress of a compression run: Ray tasks write to a board actor, the driver reads it."""

from __future__ import annotations

from typing import Protocol

import ray


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Latest (stage, fraction) per job. Tasks update it fire-and-forget."""

    def __init__(self) -> None:
        self._state: dict[str, tuple[str, float]] = {}

    def update(self, job: str, stage: str, fraction: float) -> None:
        self._state[job] = (stage, fraction)

    def snapshot(self) -> dict[str, tuple[str, float]]:
        return dict(self._state)


class ProgressListener(Protocol):
    """What the driver tells whoever shows progress (a terminal, a log, a test)."""

    def started(self, jobs: list[str]) -> None: ...

    def update(self, job: str, stage: str, fraction: float) -> None: ...

    def finished(self, job: str, ok: bool, summary: str) -> None: ...


class SilentProgress:
    def started(self, jobs: list[str]) -> None:
        pass

    def update(self, job: str, stage: str, fraction: float) -> None:
        pass

    def finished(self, job: str, ok: bool, summary: str) -> None:
        pass
