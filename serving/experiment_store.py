"""Where A/B experiments live while the gateway runs, and how each replica follows them.

One :class:`ExperimentLedger` holds every experiment, outcome and piece of feedback: in a Serve
deployment of its own (``app.ExperimentHost``), so that any replica can create, end, report on
or take feedback for any experiment. Each gateway replica keeps a :class:`ReplicaExperiments`:
a copy of the active experiments, refreshed in the background, from which a request's arm is
assigned on the request path without a hop; and a buffer of outcomes, handed to the ledger in
batches off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gearbox.compression.errors import NotFoundError
from gearbox.serving.experiments import (
    DEFAULT_CONFIDENCE,
    Arm,
    Experiment,
    ExperimentLedger,
    Outcome,
    assign,
    check_feedback,
)

logger = logging.getLogger(__name__)

SYNC_INTERVAL_S = 0.5
"""How often a replica hands over its outcomes and re-reads the active experiments: the
longest a newly created or ended experiment takes to reach every replica."""

AgreementTotals = tuple[str, str, float, int]
"""(model, variant, matched rows, compared rows) of one replica's live shadow agreement."""
Feedback = tuple[str, int | None, float | None]
"""(request id, label, score): the truth for one request."""


class ExperimentStore(Protocol):
    """The ledger's operations, awaited: in-process (:class:`LedgerStore`) or through a
    Serve handle (``app.HandleStore``)."""

    async def active(self) -> tuple[Experiment, ...]: ...

    async def create(self, experiment: Experiment) -> None: ...

    async def end(self, name: str) -> None: ...

    async def listing(self) -> list[dict[str, Any]]: ...

    async def record(
        self,
        source: str,
        outcomes: Sequence[Outcome],
        agreement: Sequence[AgreementTotals],
        feedback: Sequence[Feedback] = (),
    ) -> None: ...

    async def feedback(self, request_id: str, label: int | None, score: float | None) -> None: ...

    async def report(self, name: str, confidence: float) -> dict[str, Any]: ...


class LedgerStore:
    """:class:`ExperimentStore` on a ledger in this process."""

    def __init__(self, ledger: ExperimentLedger, declared: Sequence[Experiment] = ()) -> None:
        self.ledger = ledger
        for experiment in declared:
            ledger.create(experiment)

    async def active(self) -> tuple[Experiment, ...]:
        return self.ledger.active()

    async def create(self, experiment: Experiment) -> None:
        self.ledger.create(experiment)

    async def end(self, name: str) -> None:
        self.ledger.end(name)

    async def listing(self) -> list[dict[str, Any]]:
        return self.ledger.listing()

    async def record(
        self,
        source: str,
        outcomes: Sequence[Outcome],
        agreement: Sequence[AgreementTotals],
        feedback: Sequence[Feedback] = (),
    ) -> None:
        self.ledger.record(outcomes)
        for request_id, label, score in feedback:
            # Checked when it was taken; an experiment that ended since dropped the outcome.
            with contextlib.suppress(NotFoundError):
                self.ledger.feedback(request_id, label=label, score=score)
        for model, variant, matched, rows in agreement:
            self.ledger.update_agreement(source, model, variant, matched, rows)

    async def feedback(self, request_id: str, label: int | None, score: float | None) -> None:
        self.ledger.feedback(request_id, label=label, score=score)

    async def report(self, name: str, confidence: float = DEFAULT_CONFIDENCE) -> dict[str, Any]:
        return self.ledger.report(name, confidence).model_dump(mode="json")


@dataclass(frozen=True)
class Assignment:
    experiment: str
    arm: Arm


class ReplicaExperiments:
    """A replica's view of the experiments: arms assigned locally, outcomes sent in batches,
    with the replica's running shadow-agreement totals, so that a report shows each arm's
    live agreement."""

    def __init__(
        self, store: ExperimentStore, source: str, rng: random.Random | None = None
    ) -> None:
        self._store = store
        self._source = source
        self._agreement_totals: Callable[[], Sequence[AgreementTotals]] = tuple
        self._rng = rng or random.Random()
        self._by_model: dict[str, Experiment] = {}
        self._pending: dict[str, Outcome] = {}
        """Outcomes not yet handed over, by request id."""
        self._pending_feedback: list[Feedback] = []
        """Feedback for pending outcomes: handed over with them."""
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def follow_agreement(self, totals: Callable[[], Sequence[AgreementTotals]]) -> None:
        """Where this replica's running shadow-agreement totals come from."""
        self._agreement_totals = totals

    # -- the request path ----------------------------------------------------------------------

    def assignment(self, model: str, routing_key: str | None) -> Assignment | None:
        experiment = self._by_model.get(model)
        if experiment is None:
            return None
        return Assignment(experiment.name, assign(experiment, routing_key, self._rng))

    def record(self, outcome: Outcome) -> None:
        self._pending[outcome.request_id] = outcome

    # -- in the background -----------------------------------------------------------------------

    async def sync(self) -> None:
        """Hands over the buffered outcomes and re-reads the active experiments."""
        async with self._lock:
            outcomes, self._pending = self._pending, {}
            feedback, self._pending_feedback = self._pending_feedback, []
            try:
                await self._store.record(
                    self._source,
                    list(outcomes.values()),
                    list(self._agreement_totals()),
                    feedback,
                )
            except Exception:
                # Kept for the next attempt, ahead of what arrived meanwhile.
                self._pending = {**outcomes, **self._pending}
                self._pending_feedback[:0] = feedback
                raise
            self._follow(await self._store.active())

    def _follow(self, active: Sequence[Experiment]) -> None:
        self._by_model = {experiment.model: experiment for experiment in active}

    def start(self) -> None:
        """Syncs every :data:`SYNC_INTERVAL_S` on the running event loop until :meth:`stop`."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sync_forever())

    async def _sync_forever(self) -> None:
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the ledger is away for a moment: try again
                logger.warning("experiments: could not reach the ledger (%s)", error)
            await asyncio.sleep(SYNC_INTERVAL_S)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.sync()

    # -- administration (each call also refreshes this replica at once) -------------------------

    async def create(self, experiment: Experiment) -> None:
        await self._store.create(experiment)
        self._follow(await self._store.active())

    async def end(self, name: str) -> None:
        await self._store.end(name)
        await self.sync()

    async def listing(self) -> list[dict[str, Any]]:
        return await self._store.listing()

    async def report(self, name: str, confidence: float) -> dict[str, Any]:
        await self.sync()
        return await self._store.report(name, confidence)

    async def feedback(self, request_id: str, label: int | None, score: float | None) -> None:
        """Feedback for one request. One this replica answered and has not yet handed over
        waits for its outcome; one another replica answered may be on its way (at most one
        sync interval), so a request the ledger does not know yet gets one retry after that."""
        pending = self._pending.get(request_id)
        if pending is not None:
            # Answered here moments ago: the feedback travels with its outcome, no hop now.
            check_feedback(pending, label, score)
            self._pending_feedback.append((request_id, label, score))
            return
        try:
            await self._store.feedback(request_id, label, score)
        except NotFoundError:
            await asyncio.sleep(2 * SYNC_INTERVAL_S)
            await self._store.feedback(request_id, label, score)


def declared_experiments(entries: Sequence[Mapping[str, Any]]) -> tuple[Experiment, ...]:
    """Experiments declared in a gateway's configuration (each validated now, at start)."""
    return tuple(Experiment.from_dict(dict(entry)) for entry in entries)
