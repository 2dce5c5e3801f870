"""DynamicBatcher: merging, splitting, shape separation, backpressure, failure isolation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gearbox.compression.errors import (
    GearboxError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from gearbox.serving.batching import DynamicBatcher
from gearbox.serving.config import BatchingConfig

POISON = -1.0


class Model:
    """``y = 10 x`` row by row, with a record of every batch it ran; POISON rows make it fail."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.calls = 0

    def __call__(self, inputs):
        self.calls += 1
        x = inputs["x"]
        if np.any(x == POISON):
            raise ValueError("poisoned row")
        self.batches.append(x.shape[0])
        return {"y": x * 10, "total": x.reshape(len(x), -1).sum(axis=1)}


def rows(*values, width=3):
    """One row per value, every element of a row equal to the value: a tag to follow."""
    return {"x": np.repeat(np.asarray(values, np.float32)[:, None], width, axis=1)}


def batcher(model, **config):
    formed: list[int] = []
    instance = DynamicBatcher("m/v on cpu", model, BatchingConfig(**config), formed.append)
    return instance, formed


def test_a_single_request_runs_alone():
    model = Model()
    instance, formed = batcher(model)

    async def main():
        return await instance.submit(rows(1, 2))

    result = asyncio.run(main())
    np.testing.assert_array_equal(result.outputs["y"], rows(10, 20)["x"])
    np.testing.assert_array_equal(result.outputs["total"], [3, 6])
    assert result.batch_rows == 2
    assert model.batches == [2]
    assert formed == [2]


def test_concurrent_requests_merge_and_each_caller_gets_its_own_rows():
    model = Model()
    instance, formed = batcher(model, max_batch_size=8)
    requests = [rows(1), rows(2, 3), rows(4), rows(5, 6, 7)]

    async def main():
        return await asyncio.gather(*(instance.submit(r) for r in requests))

    results = asyncio.run(main())
    assert model.batches == [7]
    assert formed == [7]
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.outputs["y"], request["x"] * 10)
        np.testing.assert_array_equal(result.outputs["total"], request["x"].sum(axis=1))
        assert result.batch_rows == 7


def test_batches_stop_at_max_batch_size():
    model = Model()
    instance, formed = batcher(model, max_batch_size=4)
    requests = [rows(i, i + 0.5) for i in range(5)]  # ten rows, two per request

    async def main():
        return await asyncio.gather(*(instance.submit(r) for r in requests))

    results = asyncio.run(main())
    assert all(size <= 4 for size in model.batches)
    assert sum(model.batches) == 10
    assert len(model.batches) == 3
    assert formed == model.batches
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.outputs["y"], request["x"] * 10)


def test_a_request_larger_than_max_batch_size_still_runs_alone():
    model = Model()
    instance, _ = batcher(model, max_batch_size=2)

    async def main():
        return await asyncio.gather(instance.submit(rows(1, 2, 3, 4)), instance.submit(rows(5)))

    big, small = asyncio.run(main())
    assert sorted(model.batches) == [1, 4]
    np.testing.assert_array_equal(big.outputs["y"], rows(10, 20, 30, 40)["x"])
    np.testing.assert_array_equal(small.outputs["y"], rows(50)["x"])


def test_different_trailing_shapes_are_not_merged():
    model = Model()
    instance, _ = batcher(model, max_batch_size=16)
    narrow = [rows(1), rows(2)]
    wide = [rows(3, width=5), rows(4, width=5)]
    wider_dtype = {"x": np.full((1, 3), 6, np.float64)}

    async def main():
        return await asyncio.gather(
            *(instance.submit(r) for r in (narrow[0], wide[0], narrow[1], wide[1], wider_dtype))
        )

    results = asyncio.run(main())
    assert sorted(model.batches) == [1, 2, 2]
    expected = [narrow[0], wide[0], narrow[1], wide[1], wider_dtype]
    for request, result in zip(expected, results, strict=True):
        assert result.outputs["y"].shape == request["x"].shape
        assert result.outputs["y"].dtype == request["x"].dtype
        np.testing.assert_array_equal(result.outputs["y"], request["x"] * 10)


def test_a_full_queue_pushes_back_and_the_admitted_still_succeed():
    model = Model()
    instance, _ = batcher(model, max_queue=2)

    async def main():
        return await asyncio.gather(
            *(instance.submit(rows(i)) for i in range(1, 5)), return_exceptions=True
        )

    results = asyncio.run(main())
    np.testing.assert_array_equal(results[0].outputs["y"], rows(10)["x"])
    np.testing.assert_array_equal(results[1].outputs["y"], rows(20)["x"])
    for refused in results[2:]:
        assert isinstance(refused, ResourceExhaustedError)
        assert "max_queue 2" in refused.message
    assert sum(model.batches) == 2


def test_the_queue_admits_again_once_it_drains():
    model = Model()
    instance, _ = batcher(model, max_queue=1)

    async def main():
        first = await asyncio.gather(
            instance.submit(rows(1)), instance.submit(rows(2)), return_exceptions=True
        )
        second = await instance.submit(rows(3))
        return first, second

    (ok, refused), later = asyncio.run(main())
    np.testing.assert_array_equal(ok.outputs["y"], rows(10)["x"])
    assert isinstance(refused, ResourceExhaustedError)
    np.testing.assert_array_equal(later.outputs["y"], rows(30)["x"])


def test_a_failing_request_in_a_merged_batch_fails_only_itself():
    model = Model()
    instance, formed = batcher(model)
    requests = [rows(1), rows(2, POISON), rows(3), rows(4, 5)]

    async def main():
        return await asyncio.gather(*(instance.submit(r) for r in requests), return_exceptions=True)

    good_1, bad, good_3, good_45 = asyncio.run(main())
    assert isinstance(bad, ValueError)
    assert "poisoned" in str(bad)
    np.testing.assert_array_equal(good_1.outputs["y"], rows(10)["x"])
    np.testing.assert_array_equal(good_3.outputs["y"], rows(30)["x"])
    np.testing.assert_array_equal(good_45.outputs["y"], rows(40, 50)["x"])
    # The merged run failed, then each request ran on its own.
    assert sorted(model.batches) == [1, 1, 2]
    assert sorted(formed) == [1, 1, 2]


def test_the_batcher_keeps_working_after_a_failure():
    model = Model()
    instance, _ = batcher(model)

    async def main():
        with pytest.raises(ValueError):
            await instance.submit(rows(POISON))
        return await instance.submit(rows(7))

    result = asyncio.run(main())
    np.testing.assert_array_equal(result.outputs["y"], rows(70)["x"])
    assert instance.depth == 0


def test_an_output_without_the_batch_dimension_cannot_be_batched():
    def summary(inputs):
        return {"mean": np.asarray(inputs["x"].mean())}

    instance, _ = batcher(summary)

    async def main():
        alone = await instance.submit(rows(1))
        merged = await asyncio.gather(
            instance.submit(rows(1)), instance.submit(rows(2)), return_exceptions=True
        )
        return alone, merged

    alone, merged = asyncio.run(main())
    assert alone.outputs["mean"] == 1.0
    # Merged, the output cannot be split; run one by one, each request gets its own answer.
    assert [float(r.outputs["mean"]) for r in merged] == [1.0, 2.0]


def test_max_wait_lets_a_later_request_join_the_first_batch():
    model = Model()
    instance, formed = batcher(model, max_wait_ms=10_000, max_batch_size=3)

    async def main():
        first = asyncio.ensure_future(instance.submit(rows(1)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the worker has taken the first request and is waiting
        assert not first.done()
        second = asyncio.ensure_future(instance.submit(rows(2, 3)))  # fills the batch: no wait
        return await first, await second

    first, second = asyncio.run(main())
    assert model.batches == [3]
    assert formed == [3]
    np.testing.assert_array_equal(first.outputs["y"], rows(10)["x"])
    np.testing.assert_array_equal(second.outputs["y"], rows(20, 30)["x"])


def test_without_max_wait_a_later_request_runs_in_a_batch_of_its_own():
    model = Model()
    instance, _ = batcher(model, max_wait_ms=0, max_batch_size=3)

    async def main():
        first = await instance.submit(rows(1))
        second = await instance.submit(rows(2, 3))
        return first, second

    asyncio.run(main())
    assert model.batches == [1, 2]


def test_depth_counts_admitted_requests_and_returns_to_zero():
    model = Model()
    seen: list[int] = []

    def observing(inputs):
        seen.append(instance.depth)  # the depth as the batch runs
        return model(inputs)

    instance, _ = batcher(observing, max_queue=10)

    async def main():
        assert instance.depth == 0
        tasks = [asyncio.ensure_future(instance.submit(rows(i))) for i in range(4)]
        await asyncio.sleep(0)
        depth_while_queued = instance.depth
        await asyncio.gather(*tasks)
        return depth_while_queued

    assert asyncio.run(main()) == 4
    assert seen == [4]
    assert instance.depth == 0


def test_refused_and_failed_requests_leave_no_depth_behind():
    model = Model()
    instance, _ = batcher(model, max_queue=1)

    async def main():
        await asyncio.gather(
            instance.submit(rows(POISON)), instance.submit(rows(1)), return_exceptions=True
        )

    asyncio.run(main())
    assert instance.depth == 0


def test_inputs_that_disagree_on_the_batch_are_refused_before_admission():
    model = Model()
    instance, _ = batcher(model)
    inputs = {"x": np.zeros((2, 3), np.float32), "z": np.zeros((3, 3), np.float32)}

    async def main():
        with pytest.raises(InvalidArgumentError, match=r"batch dimension: \[2, 3\]"):
            await instance.submit(inputs)
        return instance.depth

    assert asyncio.run(main()) == 0
    assert model.calls == 0


def test_a_gearbox_error_from_the_model_reaches_its_caller_unchanged():
    def failing(inputs):
        raise GearboxError("session exploded")

    instance, formed = batcher(failing)

    async def main():
        with pytest.raises(GearboxError, match="session exploded"):
            await instance.submit(rows(1))

    asyncio.run(main())
    assert formed == []
