"""DeviceExecutor: worker threads, dynamic batching, admission, failure isolation, inline path.

Runners are plain numpy functions. To decide exactly what is queued when a worker forms its
next batch, a test holds the (single) worker busy with a :class:`Gate` batch, submits, and
opens the gate; nothing here depends on how fast this machine is.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest

from gearbox.compression.errors import (
    ErrorCode,
    GearboxError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from gearbox.serving.config import BatchingConfig
from gearbox.serving.executor import DeviceExecutor, Lane
from gearbox.serving.queue_model import BatchCost, RunningBatch, ServiceTimes, variant_key
from tests.unit.serving_fixtures import GATE_KEY, PATIENCE_S, Gate, until

POISON = -1.0
KEY = variant_key("m", "v")


class Model:
    """``y = 10 x`` row by row, with a record of every batch it ran and on which thread;
    POISON rows make it fail."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.seen: list[np.ndarray] = []
        self.threads: list[int] = []
        self.calls = 0

    def __call__(self, inputs):
        self.calls += 1
        self.threads.append(threading.get_ident())
        x = inputs["x"]
        if np.any(x == POISON):
            raise ValueError("poisoned row")
        self.batches.append(x.shape[0])
        self.seen.append(x.copy())
        return {"y": x * 10, "total": x.reshape(len(x), -1).sum(axis=1)}


def rows(*values, width=3, dtype=np.float32):
    """One row per value, every element of a row equal to the value: a tag to follow."""
    return {"x": np.repeat(np.asarray(values, dtype)[:, None], width, axis=1)}


@dataclass
class Harness:
    executor: DeviceExecutor
    times: ServiceTimes
    formed: list[tuple[str, str, int, float]] = field(default_factory=list)

    def host(self, runner, model="m", variant="v"):
        self.executor.host(model, variant, runner)
        return runner

    def gate(self, rows=1) -> Gate:
        return Gate(self.executor, self.times, rows)

    def batches(self, model="m") -> list[tuple[str, int]]:
        """(variant, rows) of every batch of ``model`` that ran, in order."""
        return [(variant, n) for m, variant, n, _ in self.formed if m == model]

    async def submit(self, inputs, model="m", variant="v"):
        return await self.executor.submit(model, variant, inputs)

    def queued(self, key=KEY) -> int:
        return self.executor.work_state().queued_rows.get(key, 0)


@pytest.fixture
def make() -> Iterator[Callable[..., Harness]]:
    """``make(workers=1, device_class="cpu", **batching)``; every executor is closed after.
    Nothing runs inline unless a test asks for it (``inline_max_ms``, ``hop_ms``)."""
    made: list[DeviceExecutor] = []

    def build(workers=1, device_class="cpu", **batching) -> Harness:
        times = ServiceTimes()
        harness = Harness(None, times)  # type: ignore[arg-type]
        harness.executor = DeviceExecutor(
            device_class,
            workers,
            BatchingConfig(**{"inline_max_ms": 0.0, **batching}),
            times,
            on_batch=lambda *call: harness.formed.append(call),
        )
        made.append(harness.executor)
        return harness

    yield build
    for executor in made:
        executor.close()


def run(coroutine):
    return asyncio.run(coroutine)


async def held_then(harness: Harness, submit: Callable[[], list[asyncio.Future]], queued: int):
    """Holds the worker, submits, waits until ``queued`` rows of m/v wait, opens, gathers."""
    async with harness.gate().held():
        futures = submit()
        await until(lambda: harness.queued() == queued)
    return await asyncio.gather(*futures, return_exceptions=True)


# --- running and batching ---------------------------------------------------------------------


def test_a_single_request_runs_on_a_worker_thread(make):
    harness = make()
    model = harness.host(Model())
    result = run(harness.submit(rows(1, 2)))
    np.testing.assert_array_equal(result.outputs["y"], rows(10, 20)["x"])
    np.testing.assert_array_equal(result.outputs["total"], [3, 6])
    assert result.batch_rows == 2
    assert result.service_s >= 0
    assert result.queue_s >= 0
    assert model.batches == [2]
    assert model.threads[0] != threading.get_ident()
    [(m, v, n, seconds)] = harness.formed
    assert (m, v, n) == ("m", "v", 2)
    assert seconds >= 0
    assert harness.executor.hosted == [("m", "v")]


def test_queued_requests_merge_up_to_max_batch_size(make):
    harness = make(max_batch_size=4)
    model = harness.host(Model())
    requests = [rows(i, i + 0.5) for i in range(5)]  # ten rows, two per request

    def submit():
        return [asyncio.ensure_future(harness.submit(r)) for r in requests]

    results = run(held_then(harness, submit, queued=10))
    assert model.batches == [4, 4, 2]
    assert harness.batches() == [("v", 4), ("v", 4), ("v", 2)]
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.outputs["y"], request["x"] * 10)
        np.testing.assert_array_equal(result.outputs["total"], request["x"].sum(axis=1))
    assert [r.batch_rows for r in results] == [4, 4, 4, 4, 2]
    assert all(r.queue_s > 0 for r in results)  # they waited behind the gate


def test_a_request_larger_than_max_batch_size_still_runs_alone(make):
    harness = make(max_batch_size=2)
    model = harness.host(Model())

    def submit():
        return [
            asyncio.ensure_future(harness.submit(rows(1, 2, 3, 4))),
            asyncio.ensure_future(harness.submit(rows(5))),
        ]

    big, small = run(held_then(harness, submit, queued=5))
    assert model.batches == [4, 1]
    np.testing.assert_array_equal(big.outputs["y"], rows(10, 20, 30, 40)["x"])
    np.testing.assert_array_equal(small.outputs["y"], rows(50)["x"])


def test_a_later_request_that_fits_joins_the_batch_ahead_of_one_that_does_not(make):
    harness = make(max_batch_size=4)
    model = harness.host(Model())
    requests = [rows(1, 1, 1), rows(2, 2, 2), rows(3)]

    def submit():
        return [asyncio.ensure_future(harness.submit(r)) for r in requests]

    results = run(held_then(harness, submit, queued=7))
    assert model.batches == [4, 3]
    np.testing.assert_array_equal(model.seen[0][:, 0], [1, 1, 1, 3])
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.outputs["y"], request["x"] * 10)


def test_different_trailing_shapes_and_dtypes_never_merge(make):
    harness = make(max_batch_size=16)
    model = harness.host(Model())
    requests = [
        rows(1),
        rows(3, width=5),
        rows(2),
        rows(4, width=5),
        rows(6, dtype=np.float64),
    ]

    def submit():
        return [asyncio.ensure_future(harness.submit(r)) for r in requests]

    results = run(held_then(harness, submit, queued=5))
    # The oldest request's batch takes the others of its layout; then the next oldest.
    assert model.batches == [2, 2, 1]
    assert [seen.shape[1:] for seen in model.seen] == [(3,), (5,), (3,)]
    assert model.seen[2].dtype == np.float64
    for request, result in zip(requests, results, strict=True):
        assert result.outputs["y"].shape == request["x"].shape
        assert result.outputs["y"].dtype == request["x"].dtype
        np.testing.assert_array_equal(result.outputs["y"], request["x"] * 10)


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        (["a", "b", "a"], [("a", 2), ("b", 1)]),
        (["b", "a", "a"], [("b", 1), ("a", 2)]),
    ],
)
def test_the_variant_with_the_oldest_request_runs_first(make, order, expected):
    harness = make()
    harness.host(Model(), variant="a")
    harness.host(Model(), variant="b")

    async def main():
        async with harness.gate().held():
            futures = [
                asyncio.ensure_future(harness.submit(rows(i), variant=variant))
                for i, variant in enumerate(order)
            ]
            await until(lambda: sum(harness.executor.work_state().queued_rows.values()) == 3)
        return await asyncio.gather(*futures)

    results = run(main())
    assert harness.batches() == expected
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.outputs["y"], rows(i)["x"] * 10)


def test_max_wait_holds_a_batch_open_for_a_later_request(make):
    harness = make(max_wait_ms=PATIENCE_S * 1000, max_batch_size=3)
    model = harness.host(Model())

    async def main():
        first = asyncio.ensure_future(harness.submit(rows(1)))
        # The worker took the request from the queue and waits for more.
        await until(lambda: harness.executor.depth() == 1 and harness.queued() == 0)
        await asyncio.sleep(0.05)
        assert not first.done()
        assert model.calls == 0
        second = asyncio.ensure_future(harness.submit(rows(2, 3)))  # fills the batch: no wait
        return await first, await second

    first, second = run(main())
    assert model.batches == [3]
    np.testing.assert_array_equal(first.outputs["y"], rows(10)["x"])
    np.testing.assert_array_equal(second.outputs["y"], rows(20, 30)["x"])
    assert first.batch_rows == second.batch_rows == 3


def test_a_batch_held_open_runs_with_what_it_has_once_the_wait_is_over(make):
    harness = make(max_wait_ms=20, max_batch_size=8)
    model = harness.host(Model())
    result = run(harness.submit(rows(7)))
    assert model.batches == [1]
    np.testing.assert_array_equal(result.outputs["y"], rows(70)["x"])


@pytest.mark.parametrize("batching", [{}, {"max_wait_ms": 0}], ids=["default", "zero"])
def test_without_max_wait_a_lone_request_runs_at_once_in_a_batch_of_its_own(make, batching):
    harness = make(max_batch_size=3, **batching)
    model = harness.host(Model())

    async def main():
        first = asyncio.ensure_future(harness.submit(rows(1)))
        # Its batch runs before another request comes (a batch held open would wait for one).
        await until(lambda: model.calls == 1)
        second = await harness.submit(rows(2, 3))
        return await first, second

    first, second = run(main())
    assert model.batches == [1, 2]
    assert (first.batch_rows, second.batch_rows) == (1, 2)


# --- admission --------------------------------------------------------------------------------


def test_a_full_queue_refuses_at_once_and_the_admitted_still_succeed(make):
    harness = make(max_queue=2)
    model = harness.host(Model())
    other = harness.host(Model(), variant="w")

    async def main():
        async with harness.gate().held():
            futures = [asyncio.ensure_future(harness.submit(rows(i))) for i in range(1, 5)]
            # Refused without waiting for the busy worker; admission is per variant.
            await until(lambda: all(f.done() for f in futures[2:]))
            assert not any(f.done() for f in futures[:2])
            elsewhere = asyncio.ensure_future(harness.submit(rows(9), variant="w"))
            await until(lambda: harness.queued(variant_key("m", "w")) == 1)
        return await asyncio.gather(*futures, return_exceptions=True), await elsewhere

    results, elsewhere = run(main())
    np.testing.assert_array_equal(results[0].outputs["y"], rows(10)["x"])
    np.testing.assert_array_equal(results[1].outputs["y"], rows(20)["x"])
    for refused in results[2:]:
        assert isinstance(refused, ResourceExhaustedError)
        assert "m/v on cpu: 2 requests already queued (max_queue 2)" in refused.message
    assert sum(model.batches) == 2
    assert other.batches == [1]
    np.testing.assert_array_equal(elsewhere.outputs["y"], rows(90)["x"])


def test_the_queue_admits_again_once_it_drains(make):
    harness = make(max_queue=2)
    harness.host(Model())

    async def main():
        async with harness.gate().held():
            first = [asyncio.ensure_future(harness.submit(rows(i))) for i in range(3)]
            await until(lambda: first[2].done())
        first = await asyncio.gather(*first, return_exceptions=True)
        await until(lambda: harness.executor.depth() == 0)
        return first, await harness.submit(rows(3))

    first, later = run(main())
    assert [type(r).__name__ for r in first] == ["BatchResult"] * 2 + ["ResourceExhaustedError"]
    np.testing.assert_array_equal(later.outputs["y"], rows(30)["x"])


class HoldingLoop(asyncio.SelectorEventLoop):
    """An event loop that holds each executor worker right after it hands this loop a result,
    until ``release`` is set: what the worker does after answering then happens later."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def call_soon_threadsafe(self, callback, *args, context=None):
        handle = super().call_soon_threadsafe(callback, *args, context=context)
        if threading.current_thread().name.startswith("gearbox-"):
            self.release.wait(PATIENCE_S)
        return handle


def test_an_answered_request_no_longer_counts_against_max_queue(make):
    harness = make(max_queue=1)
    harness.host(Model())
    loop = HoldingLoop()

    async def main():
        answered = await harness.submit(rows(1))
        depth = harness.executor.depth()
        again = asyncio.ensure_future(harness.submit(rows(2)))
        await asyncio.sleep(0)  # admitted (queued) or refused by now
        loop.release.set()
        return answered, depth, (await asyncio.gather(again, return_exceptions=True))[0]

    try:
        answered, depth, again = loop.run_until_complete(main())
    finally:
        loop.release.set()
        loop.close()
    np.testing.assert_array_equal(answered.outputs["y"], rows(10)["x"])
    assert depth == 0
    assert not isinstance(again, ResourceExhaustedError), again.message
    np.testing.assert_array_equal(again.outputs["y"], rows(20)["x"])


def test_depth_counts_admitted_requests_and_returns_to_zero(make):
    harness = make(max_queue=10)
    harness.host(Model())

    async def main():
        assert harness.executor.depth() == 0
        async with harness.gate().held():
            assert harness.executor.depth() == 1  # the gate's own request, running
            futures = [asyncio.ensure_future(harness.submit(rows(i))) for i in range(4)]
            await until(lambda: harness.queued() == 4)
            queued_depth = harness.executor.depth()
        await asyncio.gather(*futures)
        await until(lambda: harness.executor.depth() == 0)
        return queued_depth

    assert run(main()) == 5


def test_refused_and_failed_requests_leave_no_depth_behind(make):
    harness = make(max_queue=1)
    harness.host(Model())

    async def main():
        async with harness.gate().held():
            futures = [
                asyncio.ensure_future(harness.submit(rows(POISON))),
                asyncio.ensure_future(harness.submit(rows(1))),
            ]
            await until(lambda: futures[1].done())
        results = await asyncio.gather(*futures, return_exceptions=True)
        await until(lambda: harness.executor.depth() == 0)
        return results

    failed, refused = run(main())
    assert isinstance(failed, ValueError)
    assert isinstance(refused, ResourceExhaustedError)


def test_inputs_that_disagree_on_the_batch_are_refused_before_admission(make):
    harness = make()
    model = harness.host(Model())
    inputs = {"x": np.zeros((2, 3), np.float32), "z": np.zeros((3, 3), np.float32)}
    with pytest.raises(InvalidArgumentError, match=r"batch dimension: \[2, 3\]"):
        run(harness.submit(inputs))
    assert harness.executor.depth() == 0
    assert model.calls == 0


def test_an_unhosted_variant_is_not_found(make):
    harness = make()
    harness.host(Model())
    with pytest.raises(NotFoundError, match="variant 'w' of model 'm' is not hosted on cpu"):
        run(harness.submit(rows(1), variant="w"))


def test_an_executor_needs_a_worker():
    with pytest.raises(InvalidArgumentError, match="at least one worker"):
        DeviceExecutor("cpu", 0, BatchingConfig(), ServiceTimes())


# --- failures and cancellation ----------------------------------------------------------------


def test_a_failing_request_in_a_merged_batch_fails_only_itself(make):
    harness = make()
    model = harness.host(Model())
    requests = [rows(1), rows(2, POISON), rows(3), rows(4, 5)]

    def submit():
        return [asyncio.ensure_future(harness.submit(r)) for r in requests]

    good_1, bad, good_3, good_45 = run(held_then(harness, submit, queued=6))
    assert isinstance(bad, ValueError)
    assert "poisoned" in str(bad)
    np.testing.assert_array_equal(good_1.outputs["y"], rows(10)["x"])
    np.testing.assert_array_equal(good_3.outputs["y"], rows(30)["x"])
    np.testing.assert_array_equal(good_45.outputs["y"], rows(40, 50)["x"])
    # The merged run failed, then each request ran on its own.
    assert model.calls == 5
    assert model.batches == [1, 1, 2]
    assert harness.batches() == [("v", 1), ("v", 1), ("v", 2)]


def test_the_executor_keeps_working_after_a_failure(make):
    harness = make()
    harness.host(Model())

    async def main():
        with pytest.raises(ValueError):
            await harness.submit(rows(POISON))
        return await harness.submit(rows(7))

    result = run(main())
    np.testing.assert_array_equal(result.outputs["y"], rows(70)["x"])


def test_an_output_without_the_batch_dimension_cannot_be_merged(make):
    harness = make()

    def summary(inputs):
        return {"mean": np.asarray(inputs["x"].mean())}

    harness.host(summary)

    def submit():
        return [asyncio.ensure_future(harness.submit(rows(v))) for v in (1, 2)]

    alone = run(harness.submit(rows(1)))
    merged = run(held_then(harness, submit, queued=2))
    assert float(alone.outputs["mean"]) == 1.0
    # Merged, the output cannot be split; run one by one, each request gets its own answer.
    assert [float(r.outputs["mean"]) for r in merged] == [1.0, 2.0]


def test_a_gearbox_error_from_the_model_reaches_its_caller_unchanged(make):
    harness = make()

    def failing(inputs):
        raise GearboxError("session exploded")

    harness.host(failing)
    with pytest.raises(GearboxError, match="session exploded"):
        run(harness.submit(rows(1)))
    assert harness.formed == []


class Exploding(list):
    """An ``on_batch`` record that raises on recording the first batch of model ``m`` (a
    metrics hiccup, say): the executor's bookkeeping after a session ran fails."""

    def append(self, item):
        super().append(item)
        if [model for model, *_ in self].count("m") == 1 and item[0] == "m":
            raise RuntimeError("metrics exploded")


def test_a_failure_outside_the_session_fails_the_whole_batch_never_the_worker(make):
    harness = make()
    model = harness.host(Model())
    harness.formed = Exploding()
    requests = [rows(1), rows(2), rows(3, 4)]

    def submit():
        return [asyncio.ensure_future(harness.submit(r)) for r in requests]

    async def main():
        failed = await held_then(harness, submit, queued=4)
        await until(lambda: harness.executor.depth() == 0)
        return failed, await harness.submit(rows(5))

    failed, later = run(main())
    assert model.batches == [4, 1]  # the session ran the merged batch; recording it failed
    for error in failed:
        assert type(error) is GearboxError and error.code is ErrorCode.INTERNAL
        assert "m/v on cpu: the batch failed outside the session" in error.message
        assert "metrics exploded" not in error.message  # the details go to the log
    # The same worker still serves: the next request is answered, and counted.
    np.testing.assert_array_equal(later.outputs["y"], rows(50)["x"])
    assert len(set(model.threads)) == 1
    assert harness.executor.depth() == 0


def test_a_failing_session_fails_every_caller_and_the_next_request_succeeds(make):
    harness = make()
    healthy = Model()
    failures = {"left": 4}  # the merged run and each of the three alone

    def flaky(inputs):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("the session broke")
        return healthy(inputs)

    harness.host(flaky)

    def submit():
        return [asyncio.ensure_future(harness.submit(rows(v))) for v in (1, 2, 3)]

    async def main():
        failed = await held_then(harness, submit, queued=3)
        await until(lambda: harness.executor.depth() == 0)
        return failed, await harness.submit(rows(4))

    failed, later = run(main())
    assert [str(error) for error in failed] == ["the session broke"] * 3
    assert failures["left"] == 0
    np.testing.assert_array_equal(later.outputs["y"], rows(40)["x"])
    assert healthy.batches == [1]


class Stuck:
    """A session that never answers until ``release`` is set (a hung driver, say)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls = 0

    def __call__(self, inputs):
        self.calls += 1
        self.started.set()
        self.release.wait(PATIENCE_S)
        return {"y": inputs["x"] * 10}


def test_a_session_that_never_answers_times_its_callers_out_and_frees_their_places(make):
    harness = make(max_queue=2, answer_timeout_s=0.1)
    stuck = harness.host(Stuck())

    async def main():
        first = asyncio.ensure_future(harness.submit(rows(1)))  # runs, and hangs
        await until(stuck.started.is_set)
        second = asyncio.ensure_future(harness.submit(rows(2)))  # waits behind it
        timed_out = await asyncio.gather(first, second, return_exceptions=True)
        # The worker is still stuck, yet the variant admits again: nothing holds it at 429.
        depth_while_stuck = harness.executor.depth()
        queued_while_stuck = harness.queued()
        again = await asyncio.gather(harness.submit(rows(3)), return_exceptions=True)
        stuck.release.set()
        await until(lambda: not harness.executor.work_state().running)
        return timed_out + again, depth_while_stuck, queued_while_stuck

    errors, depth_while_stuck, queued_while_stuck = run(main())
    for error in errors:
        assert isinstance(error, UnavailableError), error
        assert "m/v on cpu: no answer within 0.1 s (answer_timeout_s)" in error.message
    assert (depth_while_stuck, queued_while_stuck) == (0, 0)
    # The stuck batch finishing later frees nothing twice, and the next request is answered.
    assert harness.executor.depth() == 0
    result = run(harness.submit(rows(4)))
    np.testing.assert_array_equal(result.outputs["y"], rows(40)["x"])
    assert stuck.calls == 2  # the stuck batch and the last; the timed-out queued ones never ran


def test_an_answer_timeout_must_be_positive():
    for timeout_s in (0.0, -1.0):
        with pytest.raises(InvalidArgumentError, match="answer_timeout_s must be positive"):
            BatchingConfig(answer_timeout_s=timeout_s)


def test_a_cancelled_callers_request_is_skipped(make):
    harness = make()
    model = harness.host(Model())

    async def main():
        async with harness.gate().held():
            futures = [asyncio.ensure_future(harness.submit(rows(v))) for v in (1, 2, 3)]
            await until(lambda: harness.queued() == 3)
            # The oldest (at the head of the queue) and the newest give up.
            for cancelled in (futures[0], futures[2]):
                cancelled.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await cancelled
            # Their places are free at once, while the worker is still busy.
            depth_while_held = harness.executor.depth()
        result = await futures[1]
        await until(lambda: harness.executor.depth() == 0)
        return result, depth_while_held

    result, depth_while_held = run(main())
    assert depth_while_held == 2  # the gate's request and the one still waiting
    np.testing.assert_array_equal(result.outputs["y"], rows(20)["x"])
    assert model.batches == [1]
    np.testing.assert_array_equal(model.seen[0], rows(2)["x"])
    assert harness.executor.work_state().queued_rows == {}


def test_close_fails_queued_callers_and_lets_the_running_batch_finish(make):
    harness = make(device_class="closing")
    model = harness.host(Model())

    def workers_alive():
        return [t for t in threading.enumerate() if t.name.startswith("gearbox-closing-")]

    async def main():
        assert len(workers_alive()) == 1
        gate = harness.gate()
        await gate.hold()
        futures = [asyncio.ensure_future(harness.submit(rows(v))) for v in (1, 2)]
        await until(lambda: harness.queued() == 2)
        harness.executor.close()
        queued = await asyncio.gather(*futures, return_exceptions=True)
        with pytest.raises(UnavailableError, match="shutting down"):
            await harness.submit(rows(3))
        await gate.open()  # the batch that was running when close() came still answers
        return queued, gate.task.result()

    queued, held = run(main())
    assert [type(r) for r in queued] == [UnavailableError] * 2
    assert all("shutting down" in r.message for r in queued)
    assert held.batch_rows == 1
    assert model.calls == 0
    deadline = time.monotonic() + PATIENCE_S
    while workers_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert workers_alive() == []


def test_callers_failed_by_close_no_longer_count_in_depth(make):
    harness = make()
    harness.host(Model())

    async def main():
        gate = harness.gate()
        await gate.hold()
        futures = [asyncio.ensure_future(harness.submit(rows(v))) for v in (1, 2, 3)]
        await until(lambda: harness.queued() == 3)
        harness.executor.close()
        await asyncio.gather(*futures, return_exceptions=True)
        await gate.open()
        await until(lambda: not harness.executor.work_state().running)
        return harness.executor.depth()

    assert run(main()) == 0


# --- what the queue model sees ----------------------------------------------------------------


def test_work_state_reports_running_and_queued_rows(make):
    harness = make(max_batch_size=8)
    harness.host(Model())
    harness.host(Model(), variant="w")

    async def main():
        gate = harness.gate(rows=3)
        async with gate.held():
            futures = [
                asyncio.ensure_future(harness.submit(rows(1, 2))),
                asyncio.ensure_future(harness.submit(rows(3))),
                asyncio.ensure_future(harness.submit(rows(4, 5, 6, 7), variant="w")),
            ]
            await until(lambda: len(harness.executor.work_state().queued_rows) == 2)
            during = harness.executor.work_state()
        await asyncio.gather(*futures)
        await until(lambda: not harness.executor.work_state().running)
        return during, harness.executor.work_state()

    during, after = run(main())
    assert (during.workers, during.max_batch_size) == (1, 8)
    [running] = during.running
    assert (running.variant, running.rows) == (GATE_KEY, 3)
    assert running.elapsed_ms >= 0
    assert dict(during.queued_rows) == {KEY: 3, variant_key("m", "w"): 4}
    assert list(after.running) == []
    assert dict(after.queued_rows) == {}


def test_two_workers_run_two_batches_at_once(make):
    harness = make(workers=2)
    release = threading.Event()
    started = {"a": threading.Event(), "b": threading.Event()}

    def blocking(name):
        def runner(inputs):
            started[name].set()
            release.wait(PATIENCE_S)
            return {"y": inputs["x"]}

        return runner

    harness.host(blocking("a"), variant="a")
    harness.host(blocking("b"), variant="b")
    harness.times.seed(variant_key("m", "a"), "cpu", BatchCost(1000.0, 0.0))

    async def main():
        futures = [
            asyncio.ensure_future(harness.submit(rows(1), variant="a")),
            asyncio.ensure_future(harness.submit(rows(2, 3), variant="b")),
        ]
        await until(lambda: started["a"].is_set() and started["b"].is_set())
        state = harness.executor.work_state()
        release.set()
        await asyncio.gather(*futures)
        return state

    state = run(main())
    assert state.workers == 2
    assert sorted((r.variant, r.rows) for r in state.running) == [
        (variant_key("m", "a"), 1),
        (variant_key("m", "b"), 2),
    ]


def test_results_go_back_to_each_callers_own_event_loop(make):
    harness = make(max_batch_size=4)
    harness.host(Model())

    def caller(index):
        async def main():
            values = [index * 100 + i for i in range(5)]
            results = await asyncio.gather(*(harness.submit(rows(v)) for v in values))
            return values, [float(r.outputs["y"][0, 0]) for r in results]

        return asyncio.run(main())

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(caller, range(4)))
    for values, outputs in answers:
        assert outputs == [v * 10.0 for v in values]


# --- the inline path --------------------------------------------------------------------------


def test_a_batch_predicted_shorter_than_the_hop_runs_inline_on_an_idle_executor(make):
    harness = make()
    model = harness.host(Model())
    harness.times.seed(KEY, "cpu", BatchCost(0.0, 1000.0))
    harness.executor.hop_ms = 5000.0
    assert harness.executor.runs_inline(KEY, 4)
    assert not harness.executor.runs_inline(KEY, 5)  # 5 s is not shorter than the hop

    result = run(harness.submit(rows(1, 2)))
    np.testing.assert_array_equal(result.outputs["y"], rows(10, 20)["x"])
    assert model.threads == [threading.get_ident()]  # on the caller's thread
    assert (result.queue_s, result.batch_rows) == (0.0, 2)
    assert harness.batches() == [("v", 2)]
    # The inline run is measured like any other (far below the seeded 2 s here).
    assert harness.times.batch_ms(KEY, "cpu", 2) < 2000.0


def test_a_batch_predicted_longer_than_the_hop_runs_on_a_worker(make):
    harness = make()
    model = harness.host(Model())
    harness.times.seed(KEY, "cpu", BatchCost(0.0, 1.0))
    harness.executor.hop_ms = 5.0
    run(harness.submit(rows(*range(6))))
    assert model.threads[0] != threading.get_ident()


def test_a_batch_predicted_within_inline_max_ms_runs_inline_whatever_the_hop(make):
    harness = make(inline_max_ms=2.0)
    model = harness.host(Model())
    harness.times.seed(KEY, "cpu", BatchCost(0.0, 1.0))  # 1 ms a row
    assert harness.executor.hop_ms == 0.0
    assert harness.executor.runs_inline(KEY, 2)
    assert not harness.executor.runs_inline(KEY, 3)
    run(harness.submit(rows(1, 2)))
    assert model.threads == [threading.get_ident()]


def test_a_variant_of_unknown_cost_never_runs_inline(make):
    harness = make(inline_max_ms=2.0)
    model = harness.host(Model())  # unseeded, never run: no cost to go by
    harness.executor.hop_ms = 5.0
    assert not harness.executor.runs_inline(KEY, 1)
    run(harness.submit(rows(1)))
    assert model.threads[0] != threading.get_ident()


def test_an_inline_batch_whose_bookkeeping_fails_answers_an_internal_error(make):
    harness = make()
    model = harness.host(Model())
    harness.times.seed(KEY, "cpu", BatchCost(0.0, 0.001))
    harness.executor.hop_ms = 5.0
    harness.formed = Exploding()

    async def main():
        with pytest.raises(GearboxError) as failed:
            await harness.submit(rows(1))
        return failed.value, await harness.submit(rows(2))

    error, later = run(main())
    assert type(error) is GearboxError and error.code is ErrorCode.INTERNAL
    assert "m/v on cpu: the batch failed outside the session" in error.message
    np.testing.assert_array_equal(later.outputs["y"], rows(20)["x"])
    assert model.threads == [threading.get_ident()] * 2  # both inline
    assert harness.executor.depth() == 0


def test_a_negative_inline_max_ms_is_refused():
    with pytest.raises(InvalidArgumentError, match="inline_max_ms must not be negative"):
        BatchingConfig(inline_max_ms=-1.0)


def test_nothing_runs_inline_before_the_hop_is_measured(make):
    harness = make()
    model = harness.host(Model())  # unseeded: predicted at 0 ms
    assert harness.executor.hop_ms == 0.0
    assert not harness.executor.runs_inline(KEY, 1)
    run(harness.submit(rows(1)))
    assert model.threads[0] != threading.get_ident()


def test_a_fast_batch_queues_behind_waiting_requests(make):
    harness = make()
    slow = harness.host(Model(), variant="slow")
    fast = harness.host(Model(), variant="fast")
    harness.times.seed(variant_key("m", "slow"), "cpu", BatchCost(10_000.0, 0.0))
    harness.times.seed(variant_key("m", "fast"), "cpu", BatchCost(0.0, 0.001))
    harness.executor.hop_ms = 5.0

    async def main():
        async with harness.gate().held():
            waiting = asyncio.ensure_future(harness.submit(rows(1), variant="slow"))
            await until(lambda: harness.queued(variant_key("m", "slow")) == 1)
            assert not harness.executor.runs_inline(variant_key("m", "fast"), 1)
            quick = asyncio.ensure_future(harness.submit(rows(2), variant="fast"))
            await until(lambda: harness.queued(variant_key("m", "fast")) == 1)
            assert not quick.done()
        return await waiting, await quick

    run(main())
    assert fast.threads[0] != threading.get_ident()
    assert harness.batches() == [("slow", 1), ("fast", 1)]  # in arrival order
    assert slow.calls == 1


def test_a_fast_batch_runs_inline_beside_a_long_batch_when_nothing_queues(make):
    harness = make()
    fast = harness.host(Model(), variant="fast")
    harness.times.seed(variant_key("m", "fast"), "cpu", BatchCost(0.0, 0.001))
    harness.executor.hop_ms = 5.0

    async def main():
        gate = harness.gate()
        async with gate.held():
            # The only worker is busy, nothing waits: the tiny batch does not wait behind it.
            result = await harness.submit(rows(3), variant="fast")
            assert not gate.task.done()
            return result

    result = run(main())
    np.testing.assert_array_equal(result.outputs["y"], rows(30)["x"])
    assert fast.threads == [threading.get_ident()]


def test_measure_hop_times_the_batch_on_a_worker_and_inline_and_sets_hop_ms(make):
    harness = make()
    model = harness.host(Model())
    harness.times.seed(KEY, "cpu", BatchCost(0.0, 0.001))
    harness.executor.hop_ms = 1e9  # whatever it was, half the measurement goes through a worker
    hop = run(harness.executor.measure_hop("m", "v", rows(1), runs=7, gap_s=0.0))
    assert model.calls == 14
    here = threading.get_ident()
    assert sum(thread == here for thread in model.threads) == 7
    assert hop == harness.executor.hop_ms
    assert hop >= 0


def _heartbeat_during(harness: Harness, running: threading.Event) -> int:
    """Event-loop ticks counted while the runner was running."""

    async def main():
        task = asyncio.ensure_future(harness.submit(rows(1)))
        ticks = 0
        while not task.done():
            if running.is_set():
                ticks += 1
            await asyncio.sleep(0)
        await task
        return ticks

    return run(main())


def _sleepy(running: threading.Event):
    def runner(inputs):
        running.set()
        time.sleep(0.2)
        running.clear()
        return {"y": inputs["x"]}

    return runner


def test_a_slow_run_on_a_worker_does_not_block_the_event_loop(make):
    harness = make()
    running = threading.Event()
    harness.host(_sleepy(running))
    # Thousands of ticks fit in 200 ms on any machine; a blocked loop would count none.
    assert _heartbeat_during(harness, running) >= 5


def test_an_inline_run_does_block_the_event_loop(make):
    # The contrast that makes the test above meaningful: inline, the loop waits for the run.
    harness = make()
    running = threading.Event()
    harness.host(_sleepy(running))
    harness.times.seed(KEY, "cpu", BatchCost(0.0, 0.001))
    harness.executor.hop_ms = 1e9
    assert _heartbeat_during(harness, running) == 0


# --- a running batch's place in the work state ------------------------------------------------


def test_running_batches_report_their_elapsed_time(make):
    harness = make()
    harness.host(Model())

    async def main():
        async with harness.gate(rows=2).held():
            first = harness.executor.work_state().running[0]
            await asyncio.sleep(0.01)
            second = harness.executor.work_state().running[0]
        return first, second

    first, second = run(main())
    assert isinstance(first, RunningBatch)
    assert (first.variant, first.rows) == (GATE_KEY, 2)
    assert second.elapsed_ms > first.elapsed_ms


class MaskedSum:
    """A text model's shape: ``total`` = sum of ids where the mask is 1, per row."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, ...]] = []

    def __call__(self, inputs):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        self.seen.append(ids.shape)
        return {"total": (ids * mask).sum(axis=1)}


def tokens(*lengths: int) -> dict[str, np.ndarray]:
    """One row per length, padded to the longest: ids 1..n, mask 1 over them."""
    longest = max(lengths)
    ids = np.zeros((len(lengths), longest), np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = np.arange(1, length + 1)
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_token_sequences_of_different_lengths_merge_padded_where_the_model_pads(make):
    harness = make(max_batch_size=8)
    model = MaskedSum()
    harness.executor.host("m", "v", model, pads_sequences=True)
    requests = [tokens(3), tokens(7, 2), tokens(5)]

    def submit():
        return [asyncio.ensure_future(harness.submit(r)) for r in requests]

    results = run(held_then(harness, submit, queued=4))
    assert model.seen == [(4, 7)]  # one batch, padded to the longest sequence
    expected = [[6], [28, 3], [15]]
    for result, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(result.outputs["total"], want)
        assert result.batch_rows == 4


def test_token_sequences_of_different_lengths_never_merge_where_the_model_does_not_pad(make):
    harness = make(max_batch_size=8)
    model = MaskedSum()
    harness.executor.host("m", "v", model)
    requests = [tokens(3), tokens(7), tokens(3)]

    def submit():
        return [asyncio.ensure_future(harness.submit(r)) for r in requests]

    results = run(held_then(harness, submit, queued=3))
    assert model.seen == [(2, 3), (1, 7)]
    assert [r.outputs["total"].tolist() for r in results] == [[6], [28], [6]]


def test_a_variant_whose_batch_costs_its_rows_runs_queued_requests_one_by_one(make):
    harness = make(max_batch_size=8)
    model = harness.host(Model())
    harness.times.seed(KEY, "cpu", BatchCost(0.1, 10.0))  # eight rows cost eight runs
    requests = [rows(i) for i in range(3)]

    def submit():
        return [asyncio.ensure_future(harness.submit(r)) for r in requests]

    results = run(held_then(harness, submit, queued=3))
    assert model.batches == [1, 1, 1]
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.outputs["y"], request["x"] * 10)
    assert harness.executor.work_state().batch_limits == {}  # nothing waits: no limit to state


def test_the_work_state_tells_the_queue_model_which_variants_never_merge(make):
    harness = make(max_batch_size=8)
    harness.host(Model(), variant="lone")
    harness.host(Model(), variant="merging")
    harness.times.seed(variant_key("m", "lone"), "cpu", BatchCost(0.1, 10.0))
    harness.times.seed(variant_key("m", "merging"), "cpu", BatchCost(10.0, 0.1))

    async def main():
        async with harness.gate().held():
            futures = [
                asyncio.ensure_future(harness.submit(rows(i), variant=variant))
                for i, variant in enumerate(["lone", "lone", "merging", "merging"])
            ]
            await until(lambda: sum(harness.executor.work_state().queued_rows.values()) == 4)
            state = harness.executor.work_state()
        await asyncio.gather(*futures)
        return state

    state = run(main())
    assert state.batch_limit(variant_key("m", "lone")) == 1
    assert state.batch_limit(variant_key("m", "merging")) == 8
    assert harness.batches() == [("lone", 1), ("lone", 1), ("merging", 2)]


def test_a_text_variant_merges_short_sentences_but_not_long_ones(make):
    harness = make(max_batch_size=8)
    model = MaskedSum()
    harness.executor.host("m", "v", model, pads_sequences=True)
    # Short batches mostly cost their fixed part; at 64 tokens every row costs a run.
    harness.times.seed(
        KEY,
        "cpu",
        BatchCost(0.5, 10.0),
        by_tokens={4: BatchCost(3.0, 1.0), 64: BatchCost(0.5, 10.0)},
    )
    requests = [tokens(3), tokens(4), tokens(60), tokens(64), tokens(2)]

    def submit():
        return [asyncio.ensure_future(harness.submit(r)) for r in requests]

    run(held_then(harness, submit, queued=5))
    # The two short ones and the last short one merge; the long ones would make the short
    # batch a long one, and among themselves merging does not pay.
    assert model.seen == [(3, 4), (1, 60), (1, 64)]


# --- lanes: the standard workers yield the CPU to the priority lane -------------------------


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities are POSIX")
def test_niced_workers_run_below_the_process_priority_and_others_at_it():
    """Each worker records its thread's niceness while it runs a batch."""

    def niceness(_inputs):
        value = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return {"y": np.full((1, 1), value, np.float32)}

    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}
    for lane, steps in ((Lane.STANDARD, 5), (Lane.PRIORITY, 0)):
        executor = DeviceExecutor(
            "cpu", 1, BatchingConfig(inline_max_ms=0.0), ServiceTimes(), lane=lane, niceness=steps
        )
        try:
            executor.host("m", "v", niceness)
            result = run(executor.submit("m", "v", rows(1)))
        finally:
            executor.close()
        seen[lane] = int(result.outputs["y"][0, 0])
    assert seen == {Lane.STANDARD: min(own + 5, 19), Lane.PRIORITY: own}


def test_a_niceness_outside_the_operating_systems_range_is_refused():
    for steps in (-1, 20):
        with pytest.raises(InvalidArgumentError, match="niceness"):
            DeviceExecutor("cpu", 1, BatchingConfig(), ServiceTimes(), niceness=steps)
    with pytest.raises(InvalidArgumentError, match="standard_niceness"):
        BatchingConfig(standard_niceness=20)
