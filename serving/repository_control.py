"""Live repository updates: what every replica serves, changed without a restart.

The model repository is the truth about which variants exist. What an operator asks on top
of it (Triton's model-repository extension: load a model, which re-reads it from the
repository, or unload it) lives in one :class:`RepositoryControl`, held by a single
deployment, as a *generation* number each load or unload raises plus the set of unloaded
models. Every replica follows it with a :class:`ReplicaRepository`: it syncs every
:data:`SYNC_INTERVAL_S`, saying which generation it serves; on a new one it re-reads the
repository, loads and warms what changed off the event loop, and then switches its data
plane at once, so no request waits for a load or meets a half-updated replica. A load or
unload call returns once every live replica serves its generation: replicas disagree about
which variants exist only while an update is under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gearbox.compression.errors import NotFoundError, UnavailableError
from gearbox.compression.repository import ModelRepository
from gearbox.serving.catalog import Catalog
from gearbox.serving.dataplane import DataPlane
from gearbox.serving.hosting import LocalBackend, RemoteBackend

logger = logging.getLogger(__name__)

SYNC_INTERVAL_S = 0.5
"""How often a replica asks for the current generation (and says which one it serves)."""
LIVE_AFTER_S = 5.0
"""A replica not heard from for this long is gone (stopped, or replaced): no update waits
for it."""
UPDATE_TIMEOUT_S = 300.0
"""The longest a load or unload waits for every replica to serve it."""


def unloaded_reason(model: str) -> str:
    return f"model '{model}' was unloaded (POST /v2/repository/models/{model}/load serves it again)"


Version = tuple[str, int]
"""(the control's epoch, a generation): what a replica serves."""


@dataclass(frozen=True)
class RepositoryState:
    """What the operator asked: served from the repository, less the unloaded models."""

    generation: int = 0
    unloaded: frozenset[str] = field(default_factory=frozenset)
    epoch: str = ""
    """Which control counted the generations: a control that restarted (its deployment's
    replica died) counts from 0 again, and its states are new to every replica."""

    @property
    def version(self) -> Version:
        return (self.epoch, self.generation)

    def applied_to(self, catalog: Catalog) -> Catalog:
        """``catalog`` (the repository as it is) as this state serves it."""
        for model in sorted(self.unloaded):
            catalog = catalog.without_models([model], unloaded_reason(model))
        return catalog


class RepositoryControl:
    """The one record of the repository's generation and of what each replica serves."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._state = RepositoryState(epoch=uuid.uuid4().hex[:12])
        self._serving: dict[str, tuple[Version, float]] = {}
        """replica -> (the version it serves, when it last said so)."""
        self._clock = clock

    @property
    def epoch(self) -> str:
        return self._state.epoch

    async def sync(self, replica: str, serving: Version | None) -> RepositoryState:
        """The current state; ``serving``: the version ``replica`` serves (None: it is
        starting and serves none yet)."""
        if serving is not None:
            self._serving[replica] = (serving, self._clock())
        return self._state

    async def load(self, model: str) -> RepositoryState:
        """A new generation that serves ``model`` from the repository as it is now."""
        return self._next(self._state.unloaded - {model})

    async def unload(self, model: str) -> RepositoryState:
        return self._next(self._state.unloaded | {model})

    def _next(self, unloaded: frozenset[str]) -> RepositoryState:
        current = self._state
        self._state = RepositoryState(current.generation + 1, unloaded, current.epoch)
        return self._state

    async def behind(self, version: Version) -> list[str]:
        """The live replicas that do not serve ``version`` or a later one."""
        now = self._clock()
        for replica, (_, heard) in list(self._serving.items()):
            if now - heard > LIVE_AFTER_S:
                del self._serving[replica]
        epoch, generation = version
        return sorted(
            replica
            for replica, ((served_epoch, served), _) in self._serving.items()
            if served_epoch != epoch or served < generation
        )

    async def forget(self, replica: str) -> None:
        """``replica`` stopped: no update waits for it."""
        self._serving.pop(replica, None)


class Control(Protocol):
    """:class:`RepositoryControl`'s calls, wherever it lives (in a deployment, reached
    through a handle, or in this process)."""

    async def sync(self, replica: str, serving: Version | None) -> RepositoryState: ...

    async def load(self, model: str) -> RepositoryState: ...

    async def unload(self, model: str) -> RepositoryState: ...

    async def behind(self, version: Version) -> list[str]: ...

    async def forget(self, replica: str) -> None: ...


Apply = Callable[[RepositoryState], Awaitable[None]]
"""Serves a state from now on: re-reads the repository, loads what changed, switches."""


def gateway_update(
    repository: ModelRepository,
    local: LocalBackend,
    plane: DataPlane,
    remotes: Sequence[RemoteBackend] = (),
) -> Apply:
    """How a gateway replica serves a new state: its own device class loads and warms what
    changed (requests go on meanwhile), then the data plane switches to it at once."""

    async def apply(state: RepositoryState) -> None:
        catalog = state.applied_to(await asyncio.to_thread(Catalog.load, repository))
        await local.update(catalog)
        for backend in remotes:
            backend.update(catalog)
        plane.serve(local.served(catalog))

    return apply


class ReplicaRepository:
    """One replica's side: follows the control's generation (see the module doc)."""

    def __init__(
        self,
        control: Control,
        apply: Apply,
        replica: str,
        models: Callable[[], Iterable[str]],
        serving: Version | None = None,
        poll_s: float = 0.1,
        timeout_s: float = UPDATE_TIMEOUT_S,
    ) -> None:
        """``models``: the names the repository holds now; ``serving``: the version this
        replica was built to serve (None: none yet)."""
        self._control = control
        self._apply = apply
        self._replica = replica
        self._models = models
        self._poll_s = poll_s
        self._timeout_s = timeout_s
        self.serving = serving
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def sync(self) -> None:
        """Learns the current state and, when it is new, serves it before returning."""
        state = await self._control.sync(self._replica, self.serving)
        await self._serve(state)

    def _is_new(self, state: RepositoryState) -> bool:
        if self.serving is None:
            return True
        epoch, generation = self.serving
        return state.epoch != epoch or state.generation > generation

    async def _serve(self, state: RepositoryState) -> None:
        async with self._lock:
            if not self._is_new(state):
                return
            await self._apply(state)
            self.serving = state.version
        await self._control.sync(self._replica, self.serving)

    def start(self) -> None:
        """Syncs every :data:`SYNC_INTERVAL_S` on the running event loop until :meth:`stop`."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sync_forever())

    async def _sync_forever(self) -> None:
        # An update runs beside the syncs: they go on saying this replica is alive (and which
        # generation it still serves) however long its loads take.
        update: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    state = await self._control.sync(self._replica, self.serving)
                except Exception as error:  # the control is away for a moment: try again
                    logger.warning("repository updates: the control is unreachable (%s)", error)
                else:
                    if self._is_new(state) and (update is None or update.done()):
                        update = asyncio.get_running_loop().create_task(self._serve(state))
                        update.add_done_callback(self._log_failure)
                await asyncio.sleep(SYNC_INTERVAL_S)
        finally:
            if update is not None:
                update.cancel()

    def _log_failure(self, update: asyncio.Task[None]) -> None:
        if not update.cancelled() and update.exception() is not None:
            logger.error(
                "repository update failed; still serving generation %s: %s",
                self.serving,
                update.exception(),
            )

    def cancel(self) -> None:
        """Stops following (from a destructor, where nothing can be awaited)."""
        if self._task is not None:
            self._task.cancel()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self._control.forget(self._replica)

    # -- administration: the change, served here at once, then everywhere ----------------------

    async def load(self, model: str) -> int:
        """Serves ``model`` as the repository holds it now, on every replica; the generation."""
        self._require_known(model)
        return await self._everywhere(await self._control.load(model))

    async def unload(self, model: str) -> int:
        """Stops serving ``model`` on every replica; the generation."""
        self._require_known(model)
        return await self._everywhere(await self._control.unload(model))

    def _require_known(self, model: str) -> None:
        known = sorted(self._models())
        if model not in known:
            raise NotFoundError(
                f"model '{model}' is not in the repository (it holds: {', '.join(known) or 'none'})"
            )

    async def _everywhere(self, state: RepositoryState) -> int:
        await self._serve(state)
        deadline = time.monotonic() + self._timeout_s
        while behind := await self._control.behind(state.version):
            if time.monotonic() > deadline:
                raise UnavailableError(
                    f"repository update {state.generation} is served here but not yet by "
                    f"{len(behind)} replica(s) after {self._timeout_s:g} s: {', '.join(behind)}"
                )
            await asyncio.sleep(self._poll_s)
        return state.generation
