"""Predicted latency: what a request will wait for on the executor it would use, and its own run.

DESIGN §6: predicted latency = the work queued ahead of the request on its device class's
executor (batch-aware) + its own service time at its batch size + the gateway's measured
per-request overhead. :class:`ServiceTimes` knows what one batch of a variant costs;
:func:`predict_ms` turns a snapshot of the executor (:class:`WorkState`) into a prediction.

Both are pure: the executor feeds them, and the unit tests drive them with synthetic arrivals
against a simulated executor that forms batches by the same rule (:func:`batches_of`).
"""

from __future__ import annotations

import bisect
import functools
import heapq
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from gearbox.compression.errors import InvalidArgumentError


def variant_key(model: str, variant: str) -> str:
    """How one model's variant is named in service times and work states (names hold no '/')."""
    return f"{model}/{variant}"


def model_of(key: str) -> str:
    """The model of a :func:`variant_key`."""
    return key.split("/", 1)[0]


OUTLIER_FACTOR = 2.0
"""A single measurement may pull an estimate up by at most this factor of its current value."""


@dataclass(frozen=True)
class BatchCost:
    """What one batch of a variant costs: ``fixed_ms + per_row_ms * rows``, before live scaling."""

    fixed_ms: float
    per_row_ms: float
    measured_shape: bool = True
    """Whether the split into fixed and per-row cost was measured (two batch sizes) rather than
    assumed from one figure."""

    @classmethod
    def from_profile(cls, b1_ms: float, b8_ms: float | None = None) -> BatchCost:
        """From a manifest's batch-1 and (if profiled) batch-8 p50.

        Without a batch-8 figure, half of a single row's time is taken as fixed and half as
        per-row: between perfect batching and none, so neither error is large.
        """
        b1_ms = max(b1_ms, 0.0)
        if b8_ms is None or b8_ms <= 0:
            return cls(b1_ms / 2, b1_ms / 2, measured_shape=False)
        per_row = max((b8_ms - b1_ms) / 7, 0.0)
        return cls(max(b1_ms - per_row, 0.0), per_row)

    def ms(self, rows: int) -> float:
        return self.fixed_ms + self.per_row_ms * rows


class ServiceTimes:
    """Live service time per (variant, device class), batch size and, for a model whose cost
    grows with its input (a transformer's tokens), sequence length.

    The manifest's profile fixes the shape (fixed and per-row cost, and how that cost changes
    from one profiled length to the next); live measurements of whole batches scale it by an
    exponential average, so that a machine slower or faster than the profiling one is learnt
    from a few requests at any batch size and length.
    """

    def __init__(self, smoothing: float = 0.2) -> None:
        if not 0 < smoothing <= 1:
            raise InvalidArgumentError("smoothing must lie in (0, 1]")
        self._smoothing = smoothing
        self._costs: dict[tuple[str, str], BatchCost] = {}
        self._scales: dict[tuple[str, str], float] = {}
        self._by_tokens: dict[tuple[str, str], tuple[tuple[int, BatchCost], ...]] = {}

    def seed(
        self,
        variant: str,
        device_class: str,
        cost: BatchCost,
        by_tokens: Mapping[int, BatchCost] | None = None,
    ) -> None:
        """``cost`` is the variant's at its usual input; ``by_tokens`` (a text model's profile
        at several sequence lengths) says how the cost changes with the length."""
        key = (variant, device_class)
        self._costs[key] = cost
        self._scales[key] = 1.0
        if by_tokens:
            self._by_tokens[key] = tuple(sorted(by_tokens.items()))
        else:
            self._by_tokens.pop(key, None)

    def _length_factor(self, key: tuple[str, str], rows: int, tokens: int | None) -> float:
        """How much a batch at ``tokens`` costs relative to the usual input, by the profile:
        linear between profiled lengths, extended along the nearest two beyond them."""
        profile = self._by_tokens.get(key)
        cost = self._costs.get(key)
        if tokens is None or not profile or cost is None or cost.ms(rows) <= 0:
            return 1.0
        if len(profile) == 1:
            return 1.0
        lengths = [length for length, _ in profile]
        upper = min(max(bisect.bisect_left(lengths, tokens), 1), len(profile) - 1)
        (low, low_cost), (high, high_cost) = profile[upper - 1], profile[upper]
        weight = (tokens - low) / (high - low)
        at_length = low_cost.ms(rows) + weight * (high_cost.ms(rows) - low_cost.ms(rows))
        # Never below a tenth of the usual cost: a line extended past the shortest profiled
        # length must not predict a free batch.
        return max(at_length / cost.ms(rows), 0.1)

    def observe(
        self,
        variant: str,
        device_class: str,
        rows: int,
        milliseconds: float,
        tokens: int | None = None,
    ) -> None:
        key = (variant, device_class)
        cost = self._costs.get(key)
        base = cost.ms(rows) * self._length_factor(key, rows, tokens) if cost is not None else 0.0
        if base <= 0:
            # Nothing to scale: the first measurement becomes the cost of one row.
            self._costs[key] = BatchCost(0.0, milliseconds / max(rows, 1), measured_shape=False)
            self._scales[key] = 1.0
            return
        scale = self._scales[key]
        # One stall (a GC pause, a noisy neighbour) may at most double a sample's weight: an
        # inflated estimate would keep the router away from the variant, and so from the very
        # measurements that would correct it. A lasting slowdown still gets through.
        sample = min(milliseconds / base, OUTLIER_FACTOR * scale)
        self._scales[key] = scale + self._smoothing * (sample - scale)

    def calibrate(self, variant: str, device_class: str, measured_ms: Mapping[int, float]) -> None:
        """Replaces the estimate with this machine's own measurements ({rows: ms}): two batch
        sizes fix the fixed and per-row cost; one rescales the profiled shape."""
        key = (variant, device_class)
        if len(measured_ms) >= 2:
            (rows_a, ms_a), (rows_b, ms_b) = sorted(measured_ms.items())[:2]
            per_row = max((ms_b - ms_a) / (rows_b - rows_a), 0.0)
            self._costs[key] = BatchCost(max(ms_a - per_row * rows_a, 0.0), per_row)
            self._scales[key] = 1.0
            return
        ((rows, ms),) = measured_ms.items()
        cost = self._costs.get(key)
        if cost is None or cost.ms(rows) <= 0:
            self._costs[key] = BatchCost(0.0, ms / max(rows, 1), measured_shape=False)
            self._scales[key] = 1.0
        else:
            self._scales[key] = ms / cost.ms(rows)

    def knows(self, variant: str, device_class: str) -> bool:
        """Whether ``variant`` has a cost on ``device_class`` (seeded or observed)."""
        return (variant, device_class) in self._costs

    def knows_batch_shape(self, variant: str, device_class: str) -> bool:
        """Whether ``variant``'s split into fixed and per-row cost on ``device_class`` was
        measured (see :attr:`BatchCost.measured_shape`)."""
        cost = self._costs.get((variant, device_class))
        return cost is not None and cost.measured_shape

    def batch_ms(
        self, variant: str, device_class: str, rows: int = 1, tokens: int | None = None
    ) -> float:
        key = (variant, device_class)
        cost = self._costs.get(key)
        if cost is None:
            return 0.0
        return self._scales[key] * cost.ms(rows) * self._length_factor(key, rows, tokens)


def batch_limit(
    times: ServiceTimes,
    variant: str,
    device_class: str,
    waiting: int,
    max_batch_size: int,
    tokens: int | None = None,
    per_batch_ms: float = 0.0,
) -> int:
    """The batch size that answers ``waiting`` queued requests of ``variant`` soonest on
    average, at most ``max_batch_size``.

    Every request of a batch waits for the whole batch. With a batch's cost linear in its rows
    (``fixed + per_row * rows``, ``per_batch_ms`` such as the hop to a worker counted as fixed),
    n requests served in batches of k are answered on average after about ``(n / k + 1) / 2``
    batches of ``fixed + per_row * k``, which is least at ``k = sqrt(n * fixed / per_row)``.
    A small network, whose batch costs mostly its fixed part, merges whatever waits. A
    transformer at 64 tokens, whose batch of eight costs about eight runs, runs its requests
    one at a time until a deep queue makes a little merging worth it. A variant whose split into
    fixed and per-row cost is not measured merges up to ``max_batch_size``.
    """
    if not times.knows_batch_shape(variant, device_class):
        return max_batch_size
    one = times.batch_ms(variant, device_class, 1, tokens) + per_batch_ms
    two = times.batch_ms(variant, device_class, 2, tokens) + per_batch_ms
    per_row, fixed = two - one, 2 * one - two
    if per_row <= 0:
        return max_batch_size
    if fixed <= 0:
        return 1
    best = round(math.sqrt(max(waiting, 1) * fixed / per_row))
    return min(max(best, 1), max_batch_size)


@dataclass(frozen=True)
class RunningBatch:
    variant: str
    rows: int
    elapsed_ms: float


@dataclass(frozen=True)
class WorkState:
    """A snapshot of one executor: batches running now and rows waiting per variant."""

    workers: int
    max_batch_size: int
    running: Sequence[RunningBatch] = ()
    queued_rows: Mapping[str, int] = field(default_factory=dict)
    batch_limits: Mapping[str, int] = field(default_factory=dict)
    """Rows per batch of a variant whose queued requests merge into batches smaller than
    ``max_batch_size`` (see :func:`batch_limit`)."""

    def batch_limit(self, variant: str) -> int:
        return self.batch_limits.get(variant, self.max_batch_size)


def batches_of(rows: int, max_batch_size: int) -> list[int]:
    """How ``rows`` queued rows of one variant run: full batches, then the remainder."""
    full, remainder = divmod(rows, max_batch_size)
    return [max_batch_size] * full + ([remainder] if remainder else [])


def predict_ms(
    state: WorkState,
    times: ServiceTimes,
    device_class: str,
    variant: str,
    rows: int = 1,
    overhead_ms: float = 0.0,
    tokens: int | None = None,
) -> float:
    """When a request of ``rows`` rows for ``variant`` arriving now would be answered, in ms.

    The executor's workers are laid out in time: each is free once what is left of its running
    batch is done (an idle one at once), and every queued batch goes, in order, to the worker
    free first. The request joins its variant's last partial batch if it fits; its batch
    starts on the first worker free after the batches ahead and runs for its own service time.
    """
    free_at = sorted(
        max(times.batch_ms(run.variant, device_class, run.rows) - run.elapsed_ms, 0.0)
        for run in state.running
    )
    free_at = ([0.0] * max(state.workers - len(free_at), 0) + free_at)[: max(state.workers, 1)]
    free_at = free_at or [0.0]
    heapq.heapify(free_at)

    def run_next(ms: float) -> float:
        start = heapq.heappop(free_at)
        heapq.heappush(free_at, start + ms)
        return start

    for other, queued in state.queued_rows.items():
        if other != variant:
            for size in batches_of(queued, state.batch_limit(other)):
                run_next(times.batch_ms(other, device_class, size))
    limit = state.batch_limit(variant)
    mine = batches_of(state.queued_rows.get(variant, 0), limit)
    own_rows = rows
    if mine and mine[-1] + rows <= limit:
        own_rows += mine.pop()
    for size in mine:
        run_next(times.batch_ms(variant, device_class, size))
    # Batches ahead are taken at the variant's usual length; the request's own at its own.
    own = times.batch_ms(variant, device_class, own_rows, tokens)
    return overhead_ms + run_next(own) + own


_ErrorPool = tuple[str, str] | tuple[str, str, str] | None
"""(variant key, device class); (model, device class, "*"): the model's variants together;
None: every key's errors together."""


@functools.lru_cache(maxsize=4096)
def _pools(variant: str, device_class: str) -> tuple[_ErrorPool, ...]:
    """The pools an error of ``variant`` counts in, from the narrowest (asked on every request
    and every routing option, so built once per key)."""
    return ((variant, device_class), (model_of(variant), device_class, "*"), None)


class PredictionErrors:
    """How far answers ran past their typical prediction: the margin a budget must leave.

    A prediction is a typical latency; a variant chosen because its typical latency just fits a
    budget misses it about half the time. The router therefore asks that the prediction plus a
    high quantile of recent errors (observed latency minus prediction, per variant and device
    class) fit. A key with few observations borrows the quantile of its model's variants on the
    same device class together, and failing that of every key's: a slow model's errors, tens of
    milliseconds, would otherwise keep a fast model's new variant out of every budget.
    """

    def __init__(
        self,
        quantile: float = 0.95,
        window: int = 256,
        min_samples: int = 32,
        refresh_every: int = 16,
    ) -> None:
        if not 0 < quantile < 1:
            raise InvalidArgumentError("the prediction quantile must lie in (0, 1)")
        if window < min_samples or min_samples < 1 or refresh_every < 1:
            raise InvalidArgumentError("the window must hold at least min_samples errors")
        self._quantile = quantile
        self._window = window
        self._min_samples = min_samples
        self._refresh_every = refresh_every
        self._errors: dict[_ErrorPool, deque[float]] = {None: deque(maxlen=window)}
        self._margins: dict[_ErrorPool, float] = {}
        self._unseen: dict[_ErrorPool, int] = {}

    @property
    def quantile(self) -> float:
        return self._quantile

    def observe(self, variant: str, device_class: str, error_ms: float) -> None:
        for key in _pools(variant, device_class):
            errors = self._errors.get(key)
            if errors is None:
                errors = self._errors[key] = deque(maxlen=self._window)
            errors.append(error_ms)
            self._unseen[key] = self._unseen.get(key, 0) + 1

    def margin_ms(self, variant: str, device_class: str) -> float:
        """The quantile of this key's recent errors (never below zero: answers that came early
        are no reason to promise less than the typical prediction)."""
        for key in _pools(variant, device_class):
            errors = self._errors.get(key)
            if key is None or (errors is not None and len(errors) >= self._min_samples):
                break
        errors = self._errors.get(key)
        if not errors:
            return 0.0
        # The quantile is refreshed every few observations, not on every request: it sits on
        # the routing path, and a few errors more barely move it.
        if key not in self._margins or self._unseen.get(key, 0) >= self._refresh_every:
            quantile = np.quantile(np.fromiter(errors, float, len(errors)), self._quantile)
            self._margins[key] = max(float(quantile), 0.0)
            self._unseen[key] = 0
        return self._margins[key]
