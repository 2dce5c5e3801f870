"""Where ONNX Runtime runs: worker threads per device class, with dynamic batching.

One :class:`DeviceExecutor` serves every variant hosted on one device class in this process.
Requests queue per variant; each worker thread takes the variant whose oldest request has
waited longest, merges that variant's queued requests into one batch (up to
``max_batch_size`` rows of the same trailing shapes, waiting at most ``max_wait_ms`` for more),
runs it, and hands each caller its rows back on the caller's event loop. A batch holds as many
rows as answer the variant's waiting requests soonest on average
(:func:`~gearbox.serving.queue_model.batch_limit`): all of them for a small network, one at a
time for a transformer at 64 tokens (whose batch of eight costs about eight runs) until many
wait. Sessions never run on the event loop, so decoding, health probes and timers never wait
for a session.

Handing a batch to a worker thread and its answer back costs two thread wake-ups (measured at
warm-up: about 0.3 ms on a small VM, up to 0.8 ms in the request path). A batch predicted to
take less than that hop, or at most ``BatchingConfig.inline_max_ms``, runs inline instead
whenever nothing is queued, even beside a long batch on a worker: waiting for it delays the
event loop about as little as the hop would delay the request, and a tiny request never waits
behind a long one. Anything slower, and everything once requests queue, runs on a worker.

Admission is bounded: once ``max_queue`` requests of a variant are waiting or running,
``submit`` raises :class:`ResourceExhaustedError` (429 / RESOURCE_EXHAUSTED) at once. So is
every wait: a caller not answered within ``answer_timeout_s`` gets UNAVAILABLE (503), and a
caller that stops waiting (timed out, or gone away) gives its place back at once, even while a
worker still runs its batch, so a session that hangs never holds its variant at 429. Each
batch's callers are answered whatever happens: a failure of the session fails the requests it
ran, and one of the executor's own bookkeeping around it fails the batch with an internal error
(the worker carries on).

A device class has two executors, its lanes (:class:`Lane`). The *standard* lane runs every
request the router sends there, its workers a few steps down in the operating system's
priority (``niceness``). The *priority* lane, one worker at the replica's own priority, runs
only the fastest variant, for requests whose budget the standard lane cannot meet just then: a
tight request that arrives while a long batch runs does not wait for it, and the kernel gives
the priority worker the core whenever both want one, so the long batch yields instead of
competing. Without it, a tight budget is missed whenever a loose request was sent to a slow
variant just before (``docs/BENCHMARKS.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from gearbox.compression.errors import (
    GearboxError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from gearbox.serving.config import MAX_NICENESS, BatchingConfig
from gearbox.serving.queue_model import (
    RunningBatch,
    ServiceTimes,
    WorkState,
    batch_limit,
    variant_key,
)

logger = logging.getLogger(__name__)

HOP_MEASURE_GAP_S = 0.002
"""Idle time before each batch :meth:`DeviceExecutor.measure_hop` times."""

Arrays = Mapping[str, np.ndarray]
RunBatch = Callable[[Arrays], dict[str, np.ndarray]]
OnBatch = Callable[[str, str, int, float], None]
"""Called from a worker after each batch: model, variant, rows, seconds."""


class Lane(enum.Enum):
    """Which of a device class's executors runs a request (see the module doc)."""

    STANDARD = "standard"
    PRIORITY = "priority"


@dataclass(frozen=True)
class BatchResult:
    outputs: dict[str, np.ndarray]
    service_s: float
    """Wall time of the batch this request ran in."""
    queue_s: float
    """Time the request waited before its batch started."""
    batch_rows: int


@dataclass(eq=False)
class _Pending:
    inputs: Arrays
    rows: int
    layout: tuple[tuple[str, str, tuple[int, ...]], ...]
    future: asyncio.Future[BatchResult]
    loop: asyncio.AbstractEventLoop
    variant: _Variant
    enqueued_at: float = field(default_factory=time.perf_counter)
    freed: bool = False
    """Its place under ``max_queue`` is given back (answered, or its caller stopped waiting):
    whichever comes first frees it, once."""


_Answer = tuple[_Pending, "BatchResult | None", "BaseException | None"]


@dataclass(eq=False)
class _Variant:
    model: str
    variant: str
    run_batch: RunBatch
    pads_sequences: bool = False
    """Requests whose token sequences differ in length merge, zero-padded to the longest (a
    text model: padding is masked out, so each row's answer is what it alone would get)."""
    queue: deque[_Pending] = field(default_factory=deque)
    queued_rows: int = 0

    @property
    def key(self) -> str:
        return variant_key(self.model, self.variant)

    admitted: int = 0
    """Requests waiting or running."""


@dataclass(eq=False)
class _Running:
    variant: _Variant
    batch: list[_Pending]
    started: float

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.batch)


class DeviceExecutor:
    def __init__(
        self,
        device_class: str,
        workers: int,
        batching: BatchingConfig,
        service_times: ServiceTimes,
        on_batch: OnBatch | None = None,
        lane: Lane = Lane.STANDARD,
        niceness: int = 0,
    ) -> None:
        """``niceness``: how far below the process's own priority the workers run (0-19)."""
        if workers < 1:
            raise InvalidArgumentError(f"device class '{device_class}' needs at least one worker")
        if not 0 <= niceness <= MAX_NICENESS:
            raise InvalidArgumentError(f"niceness must lie in [0, {MAX_NICENESS}]")
        self.device_class = device_class
        self.lane = lane
        self.workers = workers
        self._niceness = niceness
        self._batching = batching
        self._times = service_times
        self._on_batch = on_batch
        self._variants: dict[tuple[str, str], _Variant] = {}
        self._running: list[_Running] = []
        self._queued = 0
        self.hop_ms = 0.0
        """What handing a batch to a worker and back adds to its run (:meth:`measure_hop`);
        batches predicted to run faster than this run inline on an idle executor."""
        self._ready = threading.Condition()
        self._stopped = False
        self._threads = [
            threading.Thread(
                target=self._work, name=f"gearbox-{device_class}-{lane.value}-{index}", daemon=True
            )
            for index in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    # -- hosting -------------------------------------------------------------------------------

    def host(
        self, model: str, variant: str, run_batch: RunBatch, pads_sequences: bool = False
    ) -> None:
        """Serves ``variant`` with ``run_batch`` from the next batch on. A variant hosted
        already keeps its queue: requests waiting for it run on the new session, and a batch
        running finishes on the old one."""
        with self._ready:
            entry = self._variants.get((model, variant))
            if entry is None:
                self._variants[(model, variant)] = _Variant(
                    model, variant, run_batch, pads_sequences
                )
            else:
                entry.run_batch = run_batch
                entry.pads_sequences = pads_sequences

    def unhost(self, model: str, variant: str) -> bool:
        """Stops hosting ``variant`` if no request waits for it or runs on it (True), else
        leaves it hosted (False)."""
        with self._ready:
            entry = self._variants.get((model, variant))
            if entry is not None and (
                entry.admitted or any(run.variant is entry for run in self._running)
            ):
                return False
            self._variants.pop((model, variant), None)
            return True

    @property
    def hosted(self) -> list[tuple[str, str]]:
        return sorted(self._variants)

    # -- the request side (event loop) ---------------------------------------------------------

    async def submit(self, model: str, variant: str, inputs: Arrays) -> BatchResult:
        entry = self._entry(model, variant)
        rows = _batch_rows(inputs)
        if self.runs_inline(entry.key, rows):
            return self._run_inline(entry, inputs, rows)
        return await self._on_worker(entry, inputs, rows)

    async def _on_worker(self, entry: _Variant, inputs: Arrays, rows: int) -> BatchResult:
        loop = asyncio.get_running_loop()
        pending = _Pending(
            inputs, rows, _layout(inputs, entry.pads_sequences), loop.create_future(), loop, entry
        )
        with self._ready:
            if self._stopped:
                raise UnavailableError(f"{self._name(entry)} is shutting down")
            if entry.admitted >= self._batching.max_queue:
                raise ResourceExhaustedError(
                    f"{self._name(entry)}: {entry.admitted} requests already queued "
                    f"(max_queue {self._batching.max_queue}); retry later"
                )
            entry.admitted += 1
            entry.queue.append(pending)
            entry.queued_rows += rows
            self._queued += 1
            self._ready.notify()
        timeout_s = self._batching.answer_timeout_s
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                return await pending.future
        except (asyncio.CancelledError, TimeoutError):
            self._withdraw(pending)
            if deadline.expired():
                raise UnavailableError(
                    f"{self._name(entry)}: no answer within {timeout_s:g} s "
                    "(answer_timeout_s); its session may be stuck"
                ) from None
            raise

    def _withdraw(self, pending: _Pending) -> None:
        """The caller stopped waiting (went away, or timed out): a queued request leaves the
        queue, and its place is freed at once, even if a worker runs it (a stuck session must
        not hold the variant's queue full)."""
        with self._ready:
            entry = pending.variant
            if pending in entry.queue:
                entry.queue.remove(pending)
                entry.queued_rows -= pending.rows
                self._queued -= 1
            self._free(pending)

    def _free(self, pending: _Pending) -> None:
        """Gives back ``pending``'s place under ``max_queue`` (the lock is held)."""
        if not pending.freed:
            pending.freed = True
            pending.variant.admitted -= 1

    def runs_inline(self, key: str, rows: int) -> bool:
        """Whether a batch of ``key`` submitted now would run inline (see the module doc)."""
        if self._queued or not self._times.knows(key, self.device_class):
            return False  # an unknown cost could be any length: never on the event loop
        predicted = self._times.batch_ms(key, self.device_class, rows)
        return predicted < self.hop_ms or predicted <= self._batching.inline_max_ms

    def _run_inline(self, entry: _Variant, inputs: Arrays, rows: int) -> BatchResult:
        started = time.perf_counter()
        outputs = entry.run_batch(inputs)
        service_s = time.perf_counter() - started
        try:
            self._record(entry, [inputs], rows, service_s)
        except Exception as error:
            logger.exception("%s: an inline batch failed outside the session", self._name(entry))
            raise self._failed_outside(entry) from error
        return BatchResult(outputs, service_s, 0.0, rows)

    def _record(
        self, entry: _Variant, inputs: Sequence[Arrays], rows: int, service_s: float
    ) -> None:
        """Teaches the service times what a batch cost, and reports it (``on_batch``)."""
        tokens = _sequence_length(inputs) if entry.pads_sequences else None
        self._times.observe(entry.key, self.device_class, rows, service_s * 1000, tokens)
        if self._on_batch is not None:
            self._on_batch(entry.model, entry.variant, rows, service_s)

    def _failed_outside(self, entry: _Variant) -> GearboxError:
        """What a caller is told when its batch failed in the executor's own bookkeeping."""
        return GearboxError(
            f"{self._name(entry)}: the batch failed outside the session (an internal error; "
            "the replica's log has the details)"
        )

    async def measure_hop(
        self,
        model: str,
        variant: str,
        inputs: Arrays,
        runs: int = 30,
        gap_s: float = HOP_MEASURE_GAP_S,
    ) -> float:
        """What a worker hop adds to a batch (ms); sets ``hop_ms``.

        The same batch is timed ``runs`` times each way, alternating: submitted to a worker and
        awaited, and run inline; the hop is the difference of the medians, everything the
        worker path adds (queueing, two thread wake-ups, handing the rows back). The batches
        are ``gap_s`` apart, as requests reach an unhurried gateway, so the worker has gone
        to sleep before each one, as it has in serving. Timed back to back against the batch's
        own run time, the hop measured 0.16-0.32 ms on the development VM, while requests
        through the data plane took 0.45-0.84 ms longer on a worker than inline.
        """
        entry = self._entry(model, variant)
        rows = _batch_rows(inputs)
        on_worker: list[float] = []
        inline: list[float] = []
        for _ in range(runs):
            await asyncio.sleep(gap_s)
            started = time.perf_counter()
            await self._on_worker(entry, inputs, rows)
            on_worker.append(time.perf_counter() - started)
            await asyncio.sleep(gap_s)
            started = time.perf_counter()
            self._run_inline(entry, inputs, rows)
            inline.append(time.perf_counter() - started)
        self.hop_ms = max(0.0, statistics.median(on_worker) - statistics.median(inline)) * 1000
        return self.hop_ms

    def work_state(self) -> WorkState:
        """What the executor has to do right now, for :func:`~.queue_model.predict_ms`."""
        now = time.perf_counter()
        with self._ready:
            running = [
                RunningBatch(run.variant.key, run.rows, (now - run.started) * 1000)
                for run in self._running
            ]
            queued = {e.key: e.queued_rows for e in self._variants.values() if e.queued_rows}
            waiting = {e.key: len(e.queue) for e in self._variants.values() if e.queue}
        limits = {}
        for key, requests in waiting.items():
            # Batches as they will form once a request arriving now has joined the queue.
            limit = self._batch_limit(key, None, requests + 1)
            if limit < self._batching.max_batch_size:
                limits[key] = limit
        return WorkState(self.workers, self._batching.max_batch_size, running, queued, limits)

    def _batch_limit(self, key: str, tokens: int | None, waiting: int) -> int:
        """Rows a batch of ``key`` may hold at ``tokens`` with ``waiting`` requests to serve
        (:func:`~.queue_model.batch_limit`)."""
        return batch_limit(
            self._times,
            key,
            self.device_class,
            waiting,
            self._batching.max_batch_size,
            tokens,
            self.hop_ms,
        )

    def depth(self) -> int:
        """Requests admitted on this device class and not yet answered."""
        return sum(entry.admitted for entry in self._variants.values())

    def live(self) -> bool:
        """Whether every worker thread still takes batches (a dead one would leave its
        share of the requests waiting until their timeout)."""
        return not self._stopped and all(thread.is_alive() for thread in self._threads)

    def close(self) -> None:
        """Stops the workers after their current batch; queued callers get UNAVAILABLE."""
        with self._ready:
            self._stopped = True
            abandoned = [p for entry in self._variants.values() for p in entry.queue]
            for entry in self._variants.values():
                for pending in entry.queue:
                    self._free(pending)
                entry.queue.clear()
                entry.queued_rows = 0
            self._queued = 0
            self._ready.notify_all()
        for pending in abandoned:
            _deliver(pending, error=UnavailableError("the gateway replica is shutting down"))

    # -- the worker side (threads) -------------------------------------------------------------

    def _work(self) -> None:
        if self._niceness:
            _lower_thread_priority(self._niceness)
        while True:
            batch: list[_Pending] = []
            answers: list[_Answer] = []
            try:
                running = self._start(batch)
                if running is None:
                    return
                answers = self._run(running.variant, batch, running.started)
            except Exception:  # a bug costs this batch, never the worker
                where = self._name(batch[0].variant) if batch else self.device_class
                logger.exception("%s: a batch failed outside the session", where)
            finally:
                self._finish(batch, answers)

    def _start(self, batch: list[_Pending]) -> _Running | None:
        """Waits for work and moves the batch to run next into ``batch`` (None: stopped).
        Whatever it raises, every request it took is in ``batch``, for :meth:`_finish`."""
        with self._ready:
            entry = self._next_batch(batch)
            if entry is None:
                return None
            running = _Running(entry, batch, time.perf_counter())
            self._running.append(running)
            return running

    def _finish(self, batch: list[_Pending], answers: list[_Answer]) -> None:
        """Frees the batch's places and tells each caller: its answer, or, where the batch
        failed before it had answers, an internal error."""
        with self._ready:
            self._running = [run for run in self._running if run.batch is not batch]
            # Released before the callers hear back: one answered may submit again at once.
            for pending in batch:
                self._free(pending)
        if batch and not answers:
            failure = self._failed_outside(batch[0].variant)
            answers = [(pending, None, failure) for pending in batch]
        for pending, result, error in answers:
            _deliver(pending, result, error)

    def _next_batch(self, batch: list[_Pending]) -> _Variant | None:
        """Waits for work, then moves the batch to run next into ``batch`` (the lock is
        held); the variant it is of, or None once stopped."""
        while True:
            if self._stopped:
                return None
            entry = self._oldest()
            if entry is not None:
                break
            self._ready.wait()
        self._take(entry, batch)
        wait_s = self._batching.max_wait_ms / 1000
        if wait_s > 0:
            deadline = time.perf_counter() + wait_s
            tokens = _sequence_length([p.inputs for p in batch]) if entry.pads_sequences else None
            while sum(p.rows for p in batch) < self._batch_limit(
                entry.key, tokens, len(batch) + len(entry.queue)
            ):
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._stopped:
                    break
                self._ready.wait(remaining)
                self._take(entry, batch)
        return entry

    def _oldest(self) -> _Variant | None:
        """The variant whose first request has waited longest (requests are served in arrival
        order across variants; a caller that stops waiting leaves the queue at once)."""
        waiting = [entry for entry in self._variants.values() if entry.queue]
        return min(waiting, key=lambda entry: entry.queue[0].enqueued_at, default=None)

    def _take(self, entry: _Variant, batch: list[_Pending]) -> None:
        """Moves queued requests that fit (same trailing shapes, and rows within
        :meth:`_batch_limit` at the batch's length) into ``batch``. Should anything here
        raise, each request is still either queued or in ``batch``, never lost."""
        rows = sum(p.rows for p in batch)
        tokens = _sequence_length([p.inputs for p in batch]) if entry.pads_sequences else None
        waiting = len(batch) + len(entry.queue)
        kept: list[_Pending] = []
        try:
            while entry.queue:
                pending = entry.queue[0]
                merged_tokens = tokens
                if entry.pads_sequences:
                    lengths = (tokens, _sequence_length([pending.inputs]))
                    merged_tokens = max((n for n in lengths if n is not None), default=None)
                fits = not batch or (
                    pending.layout == batch[0].layout
                    and rows + pending.rows <= self._batch_limit(entry.key, merged_tokens, waiting)
                )
                entry.queue.popleft()
                if not fits:
                    kept.append(pending)
                    continue
                batch.append(pending)
                entry.queued_rows -= pending.rows
                self._queued -= 1
                tokens = merged_tokens
                rows += pending.rows
        finally:
            entry.queue.extendleft(reversed(kept))

    def _run(self, entry: _Variant, batch: list[_Pending], started: float) -> list[_Answer]:
        """Runs the batch; what each caller is to be told. A failure of the session fails
        only the requests it ran; one of the bookkeeping after it is raised."""
        try:
            outputs = self._run_merged(entry, batch)
        except Exception as error:
            if len(batch) > 1:
                # One bad request must not fail the others it happened to be batched with.
                return [
                    answer
                    for pending in batch
                    for answer in self._run(entry, [pending], time.perf_counter())
                ]
            return [(batch[0], None, error)]
        service_s = time.perf_counter() - started
        rows = sum(p.rows for p in batch)
        self._record(entry, [p.inputs for p in batch], rows, service_s)
        return [
            (pending, BatchResult(result, service_s, started - pending.enqueued_at, rows), None)
            for pending, result in zip(batch, outputs, strict=True)
        ]

    def _run_merged(self, entry: _Variant, batch: list[_Pending]) -> list[dict[str, np.ndarray]]:
        if len(batch) == 1:
            return [entry.run_batch(batch[0].inputs)]
        if entry.pads_sequences:
            merged = {
                name: _padded_concatenation([p.inputs[name] for p in batch])
                for name in batch[0].inputs
            }
        else:
            merged = {
                name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs
            }
        outputs = entry.run_batch(merged)
        total = sum(p.rows for p in batch)
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise GearboxError(
                    f"{self._name(entry)}: output '{name}' does not keep the batch dimension, "
                    "so requests cannot be batched (set max_batch_size 1)"
                )
        bounds = np.cumsum([p.rows for p in batch])[:-1]
        split = {name: np.split(array, bounds) for name, array in outputs.items()}
        return [{name: parts[i] for name, parts in split.items()} for i in range(len(batch))]

    # -- helpers -------------------------------------------------------------------------------

    def _entry(self, model: str, variant: str) -> _Variant:
        entry = self._variants.get((model, variant))
        if entry is None:
            raise NotFoundError(
                f"variant '{variant}' of model '{model}' is not hosted on {self.device_class}"
            )
        return entry

    def _name(self, entry: _Variant) -> str:
        return f"{entry.model}/{entry.variant} on {self.device_class}"


def _lower_thread_priority(steps: int) -> None:
    """Runs the calling thread ``steps`` below its current priority (Linux schedules threads
    one by one; elsewhere this has no effect and the lanes differ only in their queues)."""
    thread = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(current + steps, MAX_NICENESS))
    except (AttributeError, OSError) as error:
        logger.warning("could not lower a worker's priority: %s", error)


def _layout(inputs: Arrays, pads_sequences: bool) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """What requests must share to merge: names, dtypes, and trailing shapes (only their rank
    where sequences are padded to merge)."""
    return tuple(
        sorted(
            (name, array.dtype.str, (array.ndim,) if pads_sequences else array.shape[1:])
            for name, array in inputs.items()
        )
    )


def _sequence_length(inputs: Sequence[Arrays]) -> int | None:
    """The token length a batch of these requests runs at (its longest), if it has one."""
    lengths = [a.shape[1] for request in inputs for a in request.values() if a.ndim >= 2]
    return max(lengths) if lengths else None


def _padded_concatenation(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Rows of every array, zero-padded at the end of the sequence axis to the longest."""
    if all(a.ndim < 2 for a in arrays) or len({a.shape[1:] for a in arrays}) == 1:
        return np.concatenate(arrays)
    length = max(a.shape[1] for a in arrays)
    rows = sum(a.shape[0] for a in arrays)
    merged = np.zeros((rows, length, *arrays[0].shape[2:]), dtype=arrays[0].dtype)
    start = 0
    for array in arrays:
        merged[start : start + array.shape[0], : array.shape[1]] = array
        start += array.shape[0]
    return merged


def _batch_rows(inputs: Arrays) -> int:
    rows = {array.shape[0] if array.ndim else 1 for array in inputs.values()}
    if len(rows) != 1:
        raise InvalidArgumentError(
            f"inputs disagree on the batch dimension: {sorted(rows)} (the first dimension of "
            "every input is the batch)"
        )
    return rows.pop()


def _deliver(
    pending: _Pending, result: BatchResult | None = None, error: BaseException | None = None
) -> None:
    """Resolves a caller's future on its own event loop (futures are not thread-safe)."""

    def resolve() -> None:
        if pending.future.done():
            return
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(result)  # type: ignore[arg-type]

    # A closed loop means nobody is waiting any more.
    with contextlib.suppress(RuntimeError):
        pending.loop.call_soon_threadsafe(resolve)
