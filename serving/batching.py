"""Dynamic batching with a bounded wait, and a bounded queue that pushes back.

One :class:`DynamicBatcher` runs one model session (a variant on a device class). Requests that
arrive while a batch is running are merged into the next one, up to ``max_batch_size`` rows;
``max_wait_ms`` optionally holds a batch open for more. Admission is bounded: once
``max_queue`` requests are waiting or running, ``submit`` raises
:class:`ResourceExhaustedError` (429 / RESOURCE_EXHAUSTED) rather than queueing without limit.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from gearbox.compression.errors import GearboxError, InvalidArgumentError, ResourceExhaustedError
from gearbox.serving.config import BatchingConfig

Arrays = Mapping[str, np.ndarray]
RunBatch = Callable[[Arrays], dict[str, np.ndarray]]


@dataclass(frozen=True)
class BatchResult:
    outputs: dict[str, np.ndarray]
    service_s: float
    """Wall time of the batch this request ran in."""
    queue_s: float
    """Time the request waited before its batch started."""
    batch_rows: int


@dataclass
class _Pending:
    inputs: Arrays
    rows: int
    layout: tuple[tuple[str, str, tuple[int, ...]], ...]
    future: asyncio.Future[BatchResult]
    enqueued_at: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    def __init__(
        self,
        name: str,
        run_batch: RunBatch,
        config: BatchingConfig,
        on_batch: Callable[[int], None] | None = None,
        replica_idle: Callable[[], bool] | None = None,
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self._config = config
        self._on_batch = on_batch
        self._replica_idle = replica_idle
        self._queue: deque[_Pending] = deque()
        self._admitted = 0
        self._busy = False
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Requests admitted and not yet answered: waiting plus running."""
        return self._admitted

    async def submit(self, inputs: Arrays) -> BatchResult:
        if self._admitted >= self._config.max_queue:
            raise ResourceExhaustedError(
                f"{self.name}: {self._admitted} requests already queued "
                f"(max_queue {self._config.max_queue}); retry later"
            )
        rows = _batch_rows(inputs)
        if not self._queue and not self._busy and self._replica_idle and self._replica_idle():
            return self._run_now(inputs, rows)
        layout = tuple(sorted((k, v.dtype.str, v.shape[1:]) for k, v in inputs.items()))
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._admitted += 1
        try:
            self._queue.append(_Pending(inputs, rows, layout, future))
            self._ensure_worker().set()
            return await future
        finally:
            self._admitted -= 1

    def _run_now(self, inputs: Arrays, rows: int) -> BatchResult:
        """The idle fast path: no future, no await, so no trip through the event loop.

        Only taken while the replica has no other request in flight: a lone request has nothing
        to be batched with, and in a Serve replica each trip through the loop costs more than a
        small variant's whole run. Under load every request queues, so batches form and the
        queue bound pushes back.
        """
        self._admitted += 1
        self._busy = True
        try:
            started = time.perf_counter()
            outputs = self._run_batch(inputs)
            service_s = time.perf_counter() - started
        finally:
            self._busy = False
            self._admitted -= 1
        if self._on_batch is not None:
            self._on_batch(rows)
        return BatchResult(outputs, service_s, 0.0, rows)

    def _ensure_worker(self) -> asyncio.Event:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work())
        return self._wakeup

    async def _work(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._take([])
            if self._config.max_wait_ms > 0:
                deadline = time.perf_counter() + self._config.max_wait_ms / 1000
                while sum(p.rows for p in batch) < self._config.max_batch_size:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        break
                    batch = self._take(batch)
            self._busy = True
            try:
                await self._run(batch)
            finally:
                self._busy = False
            await asyncio.sleep(0)  # let requests that arrived during the run join the queue

    def _take(self, batch: list[_Pending]) -> list[_Pending]:
        """Moves queued requests that fit (same trailing shapes, row budget) into ``batch``."""
        rows = sum(p.rows for p in batch)
        kept: deque[_Pending] = deque()
        while self._queue:
            pending = self._queue.popleft()
            if pending.future.done():  # the caller went away
                continue
            if not batch:
                batch.append(pending)
                rows = pending.rows
            elif (
                pending.layout == batch[0].layout
                and rows + pending.rows <= self._config.max_batch_size
            ):
                batch.append(pending)
                rows += pending.rows
            else:
                kept.append(pending)
        self._queue.extendleft(reversed(kept))
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            # Inline, not in a thread pool: a hop to another thread and back cost ~1 ms in a
            # Serve replica, twenty times a small variant's run. Requests arriving meanwhile
            # wait in the loop and form the next batch.
            outputs = self._run_merged(batch)
        except Exception as error:
            if len(batch) > 1:
                # One bad request must not fail the others it happened to be batched with.
                for pending in batch:
                    await self._run([pending])
                return
            _resolve(batch[0].future, error=error)
            return
        service_s = time.perf_counter() - started
        rows = sum(p.rows for p in batch)
        if self._on_batch is not None:
            self._on_batch(rows)
        for pending, result in zip(batch, outputs, strict=True):
            _resolve(
                pending.future,
                BatchResult(result, service_s, started - pending.enqueued_at, rows),
            )

    def _run_merged(self, batch: list[_Pending]) -> list[dict[str, np.ndarray]]:
        if len(batch) == 1:
            return [self._run_batch(batch[0].inputs)]
        merged = {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
        outputs = self._run_batch(merged)
        total = sum(p.rows for p in batch)
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise GearboxError(
                    f"{self.name}: output '{name}' does not keep the batch dimension, "
                    "so requests cannot be batched (set max_batch_size 1)"
                )
        bounds = np.cumsum([p.rows for p in batch])[:-1]
        split = {name: np.split(array, bounds) for name, array in outputs.items()}
        return [{name: parts[i] for name, parts in split.items()} for i in range(len(batch))]


def _batch_rows(inputs: Arrays) -> int:
    rows = {array.shape[0] if array.ndim else 1 for array in inputs.values()}
    if len(rows) != 1:
        raise InvalidArgumentError(
            f"inputs disagree on the batch dimension: {sorted(rows)} (the first dimension of "
            "every input is the batch)"
        )
    return rows.pop()


def _resolve(
    future: asyncio.Future[BatchResult],
    result: BatchResult | None = None,
    error: BaseException | None = None,
) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
