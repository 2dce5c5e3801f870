"""The data plane on a real tiny repository: routing, validation, clock, metrics, shadow, metadata.

Requests go through :meth:`DataPlane.infer` and, once answered, :meth:`DataPlane.answered`
(``Served.answer`` does both, as the adapters do).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
import time

import numpy as np
import pytest

from gearbox.compression.devices import DeviceClass
from gearbox.compression.errors import (
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from gearbox.serving.catalog import Catalog, profiled_cost
from gearbox.serving.clock import RequestClock
from gearbox.serving.config import BatchingConfig
from gearbox.serving.dataplane import DataPlane
from gearbox.serving.executor import BatchResult, Lane
from gearbox.serving.hosting import (
    LocalBackend,
    RemoteBackend,
    load_session,
    synthetic_inputs,
)
from gearbox.serving.inference import InferRequest, InferResponse, RequestedOutput, Tensor
from gearbox.serving.queue_model import BatchCost, predict_ms, variant_key
from gearbox.serving.rest.adapter import HttpAdapter
from tests.unit.serving_fixtures import (
    BROKEN_MODEL,
    DEVICE,
    FASTEST,
    INPUT,
    MIDDLE_BUDGET_MS,
    MODEL,
    OFFLINE_AGREEMENT,
    OUTPUT,
    READY,
    REFERENCE,
    REJECTED,
    SEEDED_MS,
    VARIANTS,
    Gate,
    RecordingMetrics,
    images,
    infer_request,
    publish_tiny_repository,
    run,
    run_artifact,
    started,
    until,
)

# --- answers -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", READY)
def test_pinned_variant_answers_as_its_artifact_does(served, variant):
    data = images(3, seed=5)
    response = run(served.answer(infer_request(data, version=variant)))
    assert response.model == MODEL
    assert response.version == variant
    [output] = response.outputs
    assert output.name == OUTPUT
    assert output.datatype == "FP32"
    assert output.shape == (3, 10)
    expected = run_artifact(served.repository, variant, data)
    np.testing.assert_allclose(output.data, expected, rtol=1e-5, atol=1e-6)
    # Every variant has its own weights: the answer shows which one ran.
    for other in READY:
        if other != variant:
            assert not np.allclose(output.data, run_artifact(served.repository, other, data))
    assert response.parameters["variant"] == variant
    assert response.parameters["device_class"] == DEVICE
    assert served.metrics.selections == [(MODEL, variant, "pinned")]


def test_parameters_gearbox_does_not_read_are_echoed_so_a_typo_shows(served):
    response = run(served.answer(infer_request(images(1), latency_budget=0.001, zeta=1)))
    assert response.parameters["ignored_parameters"] == "latency_budget,zeta"
    # The misspelt budget was not applied: the reference answered, within no budget.
    assert response.parameters["variant"] == REFERENCE
    assert "latency_budget_ms" not in response.parameters
    clean = run(served.answer(infer_request(images(1), latency_budget_ms=10_000.0)))
    assert "ignored_parameters" not in clean.parameters
    assert served.metrics.ignored == [(MODEL, 2)]


def test_response_parameters_describe_the_route(served):
    request = InferRequest(
        model=MODEL, inputs=(Tensor(INPUT, images(1)),), id="request-7", protocol="grpc"
    )
    predicted = served.predicted_ms(REFERENCE, rows=1)
    response = run(served.answer(request))
    assert response.id == "request-7"
    parameters = response.parameters
    assert set(parameters) == {
        "variant",
        "device_class",
        "predicted_latency_ms",
        "latency_ms",
        "budget_met",
    }
    assert parameters["variant"] == REFERENCE == response.version
    assert parameters["device_class"] == DEVICE
    # The backend's prediction (the manifest's p50 here, plus the worker hop) and the
    # gateway's measured overhead.
    assert parameters["predicted_latency_ms"] == predicted
    assert predicted >= SEEDED_MS[REFERENCE]
    assert isinstance(parameters["latency_ms"], float)
    assert parameters["latency_ms"] > 0
    assert parameters["budget_met"] is True
    assert served.metrics.requests == [(MODEL, REFERENCE, DEVICE, "grpc", "ok")]


def test_infer_alone_records_nothing_until_answered(served):
    async def main():
        response = await served.plane.infer(infer_request(), RequestClock.start())
        assert "latency_ms" not in response.parameters
        assert served.metrics.requests == []
        return served.plane.answered(response)

    parameters = run(main())
    assert parameters["latency_ms"] > 0
    assert served.metrics.requests == [(MODEL, REFERENCE, DEVICE, "http", "ok")]


def test_answered_without_an_answer_returns_the_parameters_as_they_are(served):
    response = InferResponse(MODEL, REFERENCE, "", (), {"variant": REFERENCE})
    assert served.plane.answered(response) == {"variant": REFERENCE}
    assert served.metrics.requests == []


def test_no_budget_gets_the_reference(served):
    response = run(served.answer(infer_request()))
    assert response.version == REFERENCE
    assert "latency_budget_ms" not in response.parameters
    assert served.metrics.selections == [(MODEL, REFERENCE, "reference")]
    assert served.metrics.budgets == []  # no budget, no budget outcome


def test_generous_budget_gets_the_best_quality_and_meets_it(served):
    response = run(served.answer(infer_request(latency_budget_ms=1e6)))
    assert response.version == REFERENCE
    assert response.parameters["budget_met"] is True
    assert response.parameters["latency_budget_ms"] == 1e6
    assert served.metrics.selections == [(MODEL, REFERENCE, "within_budget")]
    assert served.metrics.budgets == [(MODEL, REFERENCE, True)]


def test_tiny_budget_gets_the_fastest_and_is_missed(served):
    # On whichever lane answers sooner: no lane can meet this budget.
    predicted = min(served.predicted_ms(FASTEST, 2, lane) for lane in served.backend.lanes)
    response = run(served.answer(infer_request(latency_budget_ms=1e-6)))
    assert response.version == FASTEST
    assert response.parameters["budget_met"] is False
    assert response.parameters["predicted_latency_ms"] == predicted
    assert served.metrics.selections == [(MODEL, FASTEST, "fastest_over_budget")]
    assert served.metrics.budgets == [(MODEL, FASTEST, False)]


def test_a_middle_budget_gets_the_best_variant_predicted_to_fit(served):
    # fp32 is profiled at 400 ms, int8 at 100 ms: a 200 ms budget excludes only fp32.
    response = run(served.answer(infer_request(latency_budget_ms=str(MIDDLE_BUDGET_MS))))
    assert response.version == "int8"
    assert served.metrics.selections == [(MODEL, "int8", "within_budget")]


def test_min_quality_narrows_the_choice(served):
    response = run(served.answer(infer_request(latency_budget_ms=1e-6, min_quality=0.85)))
    assert response.version == "int8"


def test_min_quality_above_the_reference_without_budget_gets_the_best_quality(tmp_path):
    # int8 outranks the reference here: a floor above the reference leaves the best variant.
    variants = tuple(
        dataclasses.replace(seed, quality=0.93) if seed.name == "int8" else seed
        for seed in VARIANTS
    )
    repository = publish_tiny_repository(tmp_path / "repo", variants)

    async def main():
        async with started(repository) as served:
            above = await served.answer(infer_request(min_quality=0.91))
            below = await served.answer(infer_request(min_quality=0.85))
            return above, below, served.metrics.selections

    above, below, selections = run(main())
    assert (above.version, below.version) == ("int8", REFERENCE)
    assert selections == [(MODEL, "int8", "highest_quality"), (MODEL, REFERENCE, "reference")]


def test_the_rejected_variant_is_never_routed_to(served):
    # It would win on quality and on speed if it were a candidate.
    async def main():
        versions = set()
        for parameters in ({}, {"latency_budget_ms": 1e6}, {"latency_budget_ms": 1e-6}):
            response = await served.answer(infer_request(**parameters))
            versions.add(response.version)
        return versions

    assert REJECTED not in run(main())


def test_concurrent_requests_are_batched_and_answered_separately(served):
    rows = [images(1, seed=i) for i in range(4)]
    key = variant_key(MODEL, REFERENCE)
    # A batch that costs its fixed part alone: four waiting requests are answered soonest merged
    # (the warm-up's calibration on this machine could say otherwise).
    served.backend.times.seed(key, DEVICE, BatchCost(1.0, 0.001))

    async def main():
        # Held behind a busy worker, the four requests queue and then run as one batch.
        async with Gate(served.backend.executor, served.backend.times).held():
            tasks = [
                asyncio.ensure_future(served.answer(infer_request(r, version=REFERENCE)))
                for r in rows
            ]
            await until(lambda: served.backend.executor.work_state().queued_rows.get(key) == 4)
        return await asyncio.gather(*tasks)

    responses = run(main())
    for data, response in zip(rows, responses, strict=True):
        expected = run_artifact(served.repository, REFERENCE, data)
        np.testing.assert_allclose(response.outputs[0].data, expected, rtol=1e-5, atol=1e-6)
    assert [b for b in served.metrics.batches if b[0] == MODEL] == [(MODEL, REFERENCE, DEVICE, 4)]


# --- the clock and the budget ----------------------------------------------------------------


def test_latency_counts_from_the_clock_the_adapter_started(served):
    # A request that reached the server a second ago has waited at least that long.
    clock = RequestClock(time.perf_counter() - 1.0)
    response = run(served.answer(infer_request(latency_budget_ms=1e6), clock))
    assert response.parameters["latency_ms"] >= 1000.0
    assert response.parameters["budget_met"] is True
    assert served.metrics.request_seconds[-1] >= 1.0


def test_a_budget_spent_before_the_request_reached_the_plane_is_missed(served):
    clock = RequestClock(time.perf_counter() - 1.0)
    response = run(served.answer(infer_request(latency_budget_ms=MIDDLE_BUDGET_MS), clock))
    # Routed on its prediction (int8 fits 200 ms), judged on the clock (over a second).
    assert response.version == "int8"
    assert response.parameters["budget_met"] is False
    assert served.metrics.budgets == [(MODEL, "int8", False)]


@pytest.mark.parametrize(
    ("deadline_ms", "variant", "reason", "met"),
    [
        (1e7, REFERENCE, "within_budget", True),
        (MIDDLE_BUDGET_MS, "int8", "within_budget", None),
        (0.01, FASTEST, "fastest_over_budget", False),
    ],
)
def test_a_grpc_deadline_becomes_the_budget(served, deadline_ms, variant, reason, met):
    clock = RequestClock.start(deadline_ms=deadline_ms)
    response = run(served.answer(infer_request(), clock))
    assert response.version == variant
    assert served.metrics.selections == [(MODEL, variant, reason)]
    assert response.parameters["latency_budget_ms"] == round(deadline_ms, 4)
    if met is not None:
        assert response.parameters["budget_met"] is met
    assert len(served.metrics.budgets) == 1


def test_an_expired_deadline_is_the_smallest_budget(served):
    response = run(served.answer(infer_request(), RequestClock.start(deadline_ms=-5.0)))
    assert response.version == FASTEST
    assert response.parameters["budget_met"] is False
    assert 0 < response.parameters["latency_budget_ms"] <= 0.001


def test_the_budget_parameter_wins_over_the_deadline(served):
    clock = RequestClock.start(deadline_ms=1e7)
    response = run(served.answer(infer_request(latency_budget_ms=0.01), clock))
    assert response.version == FASTEST
    assert response.parameters["latency_budget_ms"] == 0.01


def test_answered_spans_teach_the_plane_its_overhead(served):
    before = served.plane.overhead_ms
    predicted_before = served.predicted_ms(FASTEST)
    clock = RequestClock(time.perf_counter() - 1.0)  # a second spent outside the backend
    run(served.answer(infer_request(version=FASTEST), clock))
    after = served.plane.overhead_ms
    assert after > before + 50  # 10 % of the second moved into the estimate
    # Every prediction carries the overhead.
    assert served.predicted_ms(FASTEST) > predicted_before + 50


# --- errors --------------------------------------------------------------------------------


def test_rejected_version_is_not_found_and_says_rejected(served):
    with pytest.raises(NotFoundError, match=r"'pruned'.*rejected.*agreement 0\.41"):
        run(served.answer(infer_request(version=REJECTED)))
    assert served.metrics.codes() == ["not_found"]


@pytest.mark.parametrize(
    ("model", "version", "match"),
    [
        ("nope", "", r"model 'nope' not found \(served models: broken, tiny\)"),
        (MODEL, "int4", r"variant 'int4'.*\(ready variants: fp32, int8, small\)"),
    ],
)
def test_unknown_model_or_version_is_not_found(served, model, version, match):
    with pytest.raises(NotFoundError, match=match):
        run(served.answer(infer_request(model=model, version=version)))
    assert served.metrics.codes() == ["not_found"]


def test_a_model_without_ready_variants_is_unavailable(served):
    with pytest.raises(UnavailableError, match="no ready variant"):
        run(served.answer(infer_request(model=BROKEN_MODEL)))
    assert served.metrics.codes() == ["unavailable"]


def test_configured_but_unserved_device_class_is_unavailable(serving):
    served = serving(configured=(DEVICE, "gpu"))
    with pytest.raises(UnavailableError, match="gpu"):
        run(served.answer(infer_request(device_class="gpu")))
    response = run(served.answer(infer_request(device_class="cpu,gpu")))
    assert response.parameters["device_class"] == DEVICE


def test_device_class_outside_the_configuration_is_invalid(served):
    with pytest.raises(InvalidArgumentError, match=r"'gpu' \(known: cpu\)"):
        run(served.answer(infer_request(device_class="gpu")))


GOOD = images(2)


def _request(*tensors, outputs=()):
    return InferRequest(model=MODEL, inputs=tensors, outputs=outputs)


MALFORMED = {
    "wrong datatype": (
        _request(Tensor(INPUT, GOOD.astype(np.float64))),
        r"input 'images' has datatype FP64, the model expects FP32",
    ),
    "wrong shape": (
        _request(Tensor(INPUT, np.zeros((2, 1, 4, 4), np.float32))),
        r"input 'images' has shape \[2, 1, 4, 4\], the model expects \[-1, 1, 8, 8\]",
    ),
    "wrong rank": (
        _request(Tensor(INPUT, np.zeros((2, 64), np.float32))),
        r"input 'images' has shape \[2, 64\]",
    ),
    "missing input": (_request(), r"missing input\(s\) images"),
    "unexpected input": (
        _request(Tensor(INPUT, GOOD), Tensor("pixels", GOOD)),
        r"unexpected input\(s\) pixels \(inputs: images\)",
    ),
    "duplicate input": (
        _request(Tensor(INPUT, GOOD), Tensor(INPUT, GOOD)),
        r"input 'images' is given twice",
    ),
    "empty batch": (
        _request(Tensor(INPUT, np.zeros((0, 1, 8, 8), np.float32))),
        r"the batch is empty \(first dimension 0\)",
    ),
    "unknown output": (
        _request(Tensor(INPUT, GOOD), outputs=(RequestedOutput("probabilities"),)),
        r"unknown output\(s\) probabilities \(outputs: logits\)",
    ),
    "bad budget": (
        InferRequest(MODEL, (Tensor(INPUT, GOOD),), parameters={"latency_budget_ms": "soon"}),
        r"latency_budget_ms must be a number, got 'soon'",
    ),
    "unreachable quality": (
        InferRequest(MODEL, (Tensor(INPUT, GOOD),), parameters={"min_quality": 0.99}),
        r"min_quality 0\.99",
    ),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_request_is_invalid_and_the_next_one_succeeds(served, case):
    request, match = MALFORMED[case]

    async def main():
        with pytest.raises(InvalidArgumentError, match=match):
            await served.answer(request)
        return await served.answer(infer_request(GOOD, version=REFERENCE))

    good = run(main())
    np.testing.assert_allclose(
        good.outputs[0].data, run_artifact(served.repository, REFERENCE, GOOD), rtol=1e-5
    )
    assert served.metrics.codes() == ["invalid_argument", "ok"]
    # Nothing was selected or run for the malformed request.
    assert served.metrics.selections == [(MODEL, REFERENCE, "pinned")]
    assert [rows for *_, rows in served.metrics.batches] == [2]


def test_requested_outputs_are_returned_once_each(served):
    request = _request(
        Tensor(INPUT, GOOD), outputs=(RequestedOutput(OUTPUT), RequestedOutput(OUTPUT, True))
    )
    response = run(served.answer(request))
    assert [t.name for t in response.outputs] == [OUTPUT]
    assert response.binary_outputs == frozenset({OUTPUT})


def test_a_cancelled_request_is_recorded_as_cancelled_and_never_runs(served):
    data = images(1, seed=3)

    async def main():
        async with Gate(served.backend.executor, served.backend.times).held():
            task = asyncio.ensure_future(served.answer(infer_request(data, version=REFERENCE)))
            await until(lambda: served.backend.depth() == 2)  # the gate's and ours
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        # The next request runs alone: the cancelled one was skipped, not merged into it.
        response = await served.answer(infer_request(images(2), version=REFERENCE))
        await until(lambda: served.backend.depth() == 0)
        return response

    response = run(main())
    assert response.version == REFERENCE
    assert served.metrics.codes() == ["cancelled", "ok"]
    assert served.metrics.requests[0] == (MODEL, REFERENCE, DEVICE, "http", "cancelled")
    assert [b for b in served.metrics.batches if b[0] == MODEL] == [(MODEL, REFERENCE, DEVICE, 2)]
    assert sum(delta for *_, delta in served.metrics.inflight_deltas) == 0


def test_backpressure_surfaces_as_resource_exhausted(serving):
    # max_queue 2, not 1: see test_executor.py (an answered request keeps its slot a moment).
    served = serving(batching=BatchingConfig(max_queue=2))

    async def main():
        # The worker is busy: the first two requests wait in the queue, and fill it.
        async with Gate(served.backend.executor, served.backend.times).held():
            results = [
                asyncio.ensure_future(served.answer(infer_request(version=REFERENCE)))
                for _ in range(4)
            ]
            await until(lambda: all(r.done() for r in results[2:]))
            assert not any(r.done() for r in results[:2])
        return await asyncio.gather(*results, return_exceptions=True)

    results = run(main())
    assert [r.version for r in results[:2]] == [REFERENCE, REFERENCE]
    assert [type(r) for r in results[2:]] == [ResourceExhaustedError] * 2
    assert "max_queue 2" in results[2].message
    assert sorted(served.metrics.codes()) == ["ok"] * 2 + ["resource_exhausted"] * 2


class FakeBackend:
    """A device class answering with a constant (or failing), with fixed predictions."""

    def __init__(self, device_class, predicted_ms=0.001, error=None, value=7.0):
        self.device_class = device_class
        self.predicted = predicted_ms
        self.error = error
        self.value = value
        self.calls: list[tuple[str, str, int]] = []

    lanes = (Lane.STANDARD,)

    async def infer(self, model, variant, inputs, lane=Lane.STANDARD):
        rows = len(inputs[INPUT])
        self.calls.append((model, variant, rows))
        if self.error is not None:
            raise self.error
        return BatchResult({OUTPUT: np.full((rows, 10), self.value, np.float32)}, 0.0, 0.0, rows)

    def predict_ms(self, model, variant, rows, tokens=None, lane=Lane.STANDARD):
        return self.predicted

    async def run_in_background(self, model, variant, inputs):
        return (await self.infer(model, variant, inputs)).outputs

    def depth(self):
        return 0

    def settle(self):
        pass


def test_an_unexpected_backend_failure_is_recorded_as_internal(tiny_repository):
    metrics = RecordingMetrics()
    broken = FakeBackend(DEVICE, error=RuntimeError("session exploded"))
    plane = DataPlane(Catalog.load(tiny_repository), [broken], [DEVICE], metrics)
    with pytest.raises(RuntimeError, match="session exploded"):
        run(plane.infer(infer_request(), RequestClock.start()))
    assert metrics.codes() == ["internal"]
    assert metrics.requests == [(MODEL, REFERENCE, DEVICE, "http", "internal")]
    assert sum(delta for *_, delta in metrics.inflight_deltas) == 0


def test_a_faster_second_device_class_answers(served):
    gpu = FakeBackend("gpu", predicted_ms=0.001)
    plane = DataPlane(
        served.catalog, [served.backend, gpu], [DEVICE, "gpu"], served.metrics, shadow_fraction=0
    )

    async def main():
        fastest = await plane.infer(infer_request(), RequestClock.start())
        plane.answered(fastest)
        cpu_only = await plane.infer(infer_request(device_class=DEVICE), RequestClock.start())
        plane.answered(cpu_only)
        return fastest, cpu_only

    fastest, cpu_only = run(main())
    assert fastest.parameters["device_class"] == "gpu"
    assert fastest.version == REFERENCE
    np.testing.assert_array_equal(fastest.outputs[0].data, np.full((2, 10), 7.0, np.float32))
    assert gpu.calls == [(MODEL, REFERENCE, 2)]
    assert cpu_only.parameters["device_class"] == DEVICE
    assert [r[2] for r in served.metrics.requests] == ["gpu", DEVICE]
    assert {(model, device) for model, device, _ in served.metrics.inflight_deltas} == {
        (MODEL, "gpu"),
        (MODEL, DEVICE),
    }


# --- metrics -------------------------------------------------------------------------------


def test_metrics_record_requests_selections_budgets_and_batches(served):
    async def main():
        before = len(served.metrics.agreements)
        await served.answer(infer_request(images(3)))
        await served.answer(infer_request(latency_budget_ms=1e6))
        await served.answer(infer_request(latency_budget_ms=1e-6))
        # Each non-reference answer is compared with the reference (fraction 1), once the
        # device class is idle: let the first comparison finish before the next answer.
        await until(lambda: len(served.metrics.agreements) == before + 1)
        await served.answer(infer_request(version="int8"))
        with pytest.raises(InvalidArgumentError):
            await served.answer(infer_request(images(0)))
        await until(lambda: len(served.metrics.agreements) == before + 2)
        return served.metrics.agreements[before:]

    compared = run(main())
    metrics = served.metrics
    assert metrics.requests == [
        (MODEL, REFERENCE, DEVICE, "http", "ok"),
        (MODEL, REFERENCE, DEVICE, "http", "ok"),
        (MODEL, FASTEST, DEVICE, "http", "ok"),
        (MODEL, "int8", DEVICE, "http", "ok"),
        (MODEL, "", "", "http", "invalid_argument"),
    ]
    assert metrics.selections == [
        (MODEL, REFERENCE, "reference"),
        (MODEL, REFERENCE, "within_budget"),
        (MODEL, FASTEST, "fastest_over_budget"),
        (MODEL, "int8", "pinned"),
    ]
    assert metrics.budgets == [(MODEL, REFERENCE, True), (MODEL, FASTEST, False)]
    assert [variant for _, variant, _ in compared] == [FASTEST, "int8"]
    # One batch per request (they ran one after the other); the shadow runs of the reference
    # form none: they run on the background thread, outside the serving lanes.
    assert sorted(metrics.batches) == sorted(
        [
            (MODEL, REFERENCE, DEVICE, 3),
            (MODEL, REFERENCE, DEVICE, 2),
            (MODEL, FASTEST, DEVICE, 2),
            (MODEL, "int8", DEVICE, 2),
        ]
    )
    # Every request left the in-flight gauge where it found it.
    assert sum(delta for *_, delta in metrics.inflight_deltas) == 0
    assert {delta for *_, delta in metrics.inflight_deltas} == {1, -1}
    assert all(seconds >= 0 for seconds in metrics.request_seconds)


def test_variant_figures_are_published_for_ready_variants_only(served):
    figures = served.metrics.figures
    assert set(figures) == {(MODEL, v) for v in READY}
    manifest = served.repository.manifest(MODEL, "int8")
    assert figures[(MODEL, "int8")] == (manifest.quality.value, manifest.size_bytes)
    assert {(m, v) for m, v, _ in served.metrics.agreements} == {(MODEL, v) for v in READY}
    assert all(value == OFFLINE_AGREEMENT for *_, value in served.metrics.agreements)
    # Their series start at zero on every configured device class, before any request.
    assert served.metrics.declared == [(MODEL, v, (DEVICE,)) for v in READY]


def test_shadow_comparison_updates_live_agreement_of_a_non_reference_variant(served):
    data = images(16, seed=11)
    answer = run_artifact(served.repository, FASTEST, data).argmax(axis=1)
    reference = run_artifact(served.repository, REFERENCE, data).argmax(axis=1)
    expected = float((answer == reference).mean())
    assert expected != OFFLINE_AGREEMENT

    async def main():
        before = len(served.metrics.agreements)
        await served.answer(infer_request(data, latency_budget_ms=1e-6))
        await until(lambda: len(served.metrics.agreements) > before)
        # The reference answering itself is never compared.
        await served.answer(infer_request(data))
        for _ in range(20):
            await asyncio.sleep(0)
        return before

    before = run(main())
    assert served.metrics.agreements[before:] == [(MODEL, FASTEST, pytest.approx(expected))]
    row = next(r for r in served.plane.variants(MODEL)["variants"] if r["variant"] == FASTEST)
    assert row["live_agreement"] == pytest.approx(expected)


def test_no_shadow_comparison_when_the_fraction_is_zero(serving):
    served = serving(shadow_fraction=0.0)

    async def main():
        for _ in range(3):
            await served.answer(infer_request(version=FASTEST))
        for _ in range(20):
            await asyncio.sleep(0)

    run(main())
    assert all(value == OFFLINE_AGREEMENT for *_, value in served.metrics.agreements)
    assert [variant for _, variant, *_ in served.metrics.batches] == [FASTEST] * 3


def test_shadow_comparisons_wait_for_an_idle_device_class_and_do_not_pile_up(serving):
    served = serving(shadow_fraction=1.0)
    # small runs inline (shorter than the hop), so it is answered beside a busy worker.
    served.backend.times.seed(variant_key(MODEL, FASTEST), DEVICE, BatchCost(0.0, 1e-6))

    async def main():
        before = len(served.metrics.agreements)
        async with Gate(served.backend.executor, served.backend.times).held():
            for seed in range(3):
                response = await served.answer(infer_request(images(2, seed), version=FASTEST))
                assert response.version == FASTEST
            for _ in range(20):
                await asyncio.sleep(0)
            busy = served.metrics.agreements[before:]
        # Idle again: the next answer is compared, once (no burst for the three skipped).
        await served.answer(infer_request(images(2, 7), version=FASTEST))
        await until(lambda: len(served.metrics.agreements) == before + 1)
        for _ in range(20):
            await asyncio.sleep(0)
        return busy, served.metrics.agreements[before:]

    busy, compared = run(main())
    assert busy == []
    assert [(model, variant) for model, variant, _ in compared] == [(MODEL, FASTEST)]
    # The comparison never entered a serving lane.
    assert [b for b in served.metrics.batches if b[1] == REFERENCE] == []


# --- readiness and warm-up -----------------------------------------------------------------


def test_the_plane_is_ready_only_after_its_warm_up(tiny_repository):
    async def main():
        async with started(tiny_repository, warm=False) as served:
            assert served.plane.live() is True
            assert served.plane.ready() is False
            assert served.plane.model_ready(MODEL) is False
            assert served.plane.model_ready(MODEL, "int8") is False
            await served.backend.warm_up()
            assert served.plane.ready() is False  # the sessions alone are not the plane
            await served.plane.warm_up()
            assert served.plane.ready() is True
            assert served.plane.model_ready(MODEL) is True
            assert served.plane.model_ready(MODEL, "int8") is True
            return served.metrics

    metrics = run(main())
    # The warm-up's own requests are never recorded as traffic.
    assert metrics.requests == []
    assert metrics.selections == []
    assert metrics.budgets == []
    assert all(value == OFFLINE_AGREEMENT for *_, value in metrics.agreements)


def test_behind_haproxy_a_probe_forwarded_by_a_proxy_is_told_not_ready(tiny_repository):
    async def main():
        async with started(tiny_repository) as proxied:
            forwarded = proxied.plane.ready(arrived_directly=False)
        async with started(tiny_repository, direct_ingress=True) as direct:
            return forwarded, direct.plane.ready(True), direct.plane.ready(False)

    forwarded, direct, fallback = run(main())
    assert forwarded is True  # the classic proxy is the only path: it is the ready one
    assert direct is True
    assert fallback is False


def test_warm_up_measures_this_machine(tiny_repository):
    async def main():
        async with started(tiny_repository, pin=False) as served:
            return (
                {v: served.backend.times.batch_ms(variant_key(MODEL, v), DEVICE, 1) for v in READY},
                served.backend.executor.hop_ms,
                served.plane.overhead_ms,
                served.predicted_ms(REFERENCE),
                served.plane.variants(MODEL),
            )

    measured, hop_ms, overhead_ms, predicted, listing = run(main())
    # The manifests' figures were replaced by measurements of these sessions.
    for variant in READY:
        assert measured[variant] > 0
        assert measured[variant] != pytest.approx(SEEDED_MS[variant])
    assert hop_ms > 0
    assert overhead_ms > 0
    assert predicted >= measured[REFERENCE]
    rows = {row["variant"]: row for row in listing["variants"]}
    assert rows[REFERENCE]["predicted_latency_ms"] == {DEVICE: predicted}


def test_server_metadata(served):
    meta = served.plane.server_metadata()
    assert meta.name == "gearbox"
    assert "binary_tensor_data" in meta.extensions
    assert "gearbox_variants" in meta.extensions


# --- metadata ------------------------------------------------------------------------------


def test_model_metadata_lists_ready_versions_only(served):
    meta = served.plane.model_metadata(MODEL)
    assert meta.name == MODEL
    assert meta.versions == READY
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [(INPUT, "FP32", (-1, 1, 8, 8))]
    assert [(t.name, t.datatype, t.shape) for t in meta.outputs] == [(OUTPUT, "FP32", (-1, 10))]
    assert meta.parameters == {
        "reference_variant": REFERENCE,
        "task": "classification",
        "metric": "accuracy",
    }
    assert served.plane.model_metadata(BROKEN_MODEL).versions == ()


def test_version_metadata_carries_the_manifest_figures(served):
    meta = served.plane.model_metadata(MODEL, "int8")
    manifest = served.repository.manifest(MODEL, "int8")
    assert meta.versions == ("int8",)
    parameters = meta.parameters
    assert parameters["reference_variant"] == REFERENCE
    assert parameters["technique"] == manifest.technique
    assert parameters["size_bytes"] == manifest.size_bytes
    assert parameters["param_count"] == manifest.param_count
    assert parameters["quality"] == manifest.quality.value
    assert parameters["agreement"] == manifest.quality.agreement
    assert parameters["latency_ms_cpu_b1_p50"] == SEEDED_MS["int8"]
    assert parameters["latency_ms_cpu_b8_p95"] == manifest.latency_ms[DEVICE]["8"]["p95"]


def test_version_metadata_of_a_rejected_or_unknown_variant_is_not_found(served):
    with pytest.raises(NotFoundError, match="rejected"):
        served.plane.model_metadata(MODEL, REJECTED)
    with pytest.raises(NotFoundError, match="'int4'"):
        served.plane.model_metadata(MODEL, "int4")
    with pytest.raises(NotFoundError, match="'nope'"):
        served.plane.model_metadata("nope")


def test_model_ready(served):
    assert served.plane.model_ready(MODEL) is True
    for variant in READY:
        assert served.plane.model_ready(MODEL, variant) is True
    assert served.plane.model_ready(MODEL, REJECTED) is False
    assert served.plane.model_ready(BROKEN_MODEL) is False
    with pytest.raises(NotFoundError):
        served.plane.model_ready(MODEL, "int4")
    with pytest.raises(NotFoundError):
        served.plane.model_ready("nope")


def test_variants_lists_every_manifest_with_served_flags(served):
    expected = {variant: served.predicted_ms(variant) for variant in READY}
    listing = served.plane.variants(MODEL)
    assert listing["model"] == MODEL
    assert listing["reference_variant"] == REFERENCE
    rows = {row["variant"]: row for row in listing["variants"]}
    assert set(rows) == {seed.name for seed in VARIANTS}
    assert {name for name, row in rows.items() if row["served"]} == set(READY)
    assert rows[REJECTED]["status"] == "rejected"
    assert "predicted_latency_ms" not in rows[REJECTED]
    assert "live_agreement" not in rows[REJECTED]
    for variant in READY:
        assert rows[variant]["predicted_latency_ms"] == {DEVICE: expected[variant]}
        assert rows[variant]["live_agreement"] == OFFLINE_AGREEMENT
        # What the warm-up's answers taught: a fraction of a millisecond, never negative.
        assert 0.0 <= rows[variant]["prediction_margin_ms"][DEVICE] < 10.0
        assert rows[variant]["sha256"] == served.repository.manifest(MODEL, variant).sha256
    # Predictions keep the profiled order.
    assert expected["small"] < expected["int8"] < expected[REFERENCE]
    broken = served.plane.variants(BROKEN_MODEL)["variants"]
    assert [row["served"] for row in broken] == [False]


# --- catalog -------------------------------------------------------------------------------


def test_catalog_keeps_rejected_manifests_but_serves_only_ready(tiny_repository):
    catalog = Catalog.load(tiny_repository)
    assert set(catalog.models) == {MODEL, BROKEN_MODEL}
    assert catalog.models[MODEL].ready == READY
    assert REJECTED in catalog.models[MODEL].manifests
    assert catalog.models[BROKEN_MODEL].ready == ()
    assert sorted((m.model, m.variant) for m in catalog.ready_manifests()) == [
        (MODEL, v) for v in READY
    ]


def test_profiled_cost_reads_batch_one_and_eight(tiny_repository):
    manifest = tiny_repository.manifest(MODEL, "int8")  # 100 ms at batch 1, 300 at batch 8
    cost = profiled_cost(manifest, DEVICE)
    assert cost.ms(1) == pytest.approx(SEEDED_MS["int8"])
    assert cost.ms(8) == pytest.approx(3 * SEEDED_MS["int8"])


def test_profiled_cost_of_an_unprofiled_class_is_the_fastest_known(tiny_repository):
    manifest = tiny_repository.manifest(MODEL, "int8")
    both = dataclasses.replace(
        manifest,
        latency_ms={
            "slow": {"1": {"p50": 50.0, "p95": 60.0}},
            "fast": {"1": {"p50": 2.0, "p95": 3.0}},
        },
    )
    assert profiled_cost(both, "gpu") == BatchCost.from_profile(2.0)
    assert profiled_cost(both, "slow") == BatchCost.from_profile(50.0)
    nothing = dataclasses.replace(manifest, latency_ms={})
    assert profiled_cost(nothing, DEVICE) == BatchCost(0.0, 0.0)
    no_batch_one = dataclasses.replace(manifest, latency_ms={DEVICE: {"8": {"p50": 1, "p95": 2}}})
    assert profiled_cost(no_batch_one, DEVICE) == BatchCost(0.0, 0.0)


# --- hosting -------------------------------------------------------------------------------


def test_local_backend_hosts_the_ready_variants(served):
    assert served.backend.hosted == [(MODEL, v) for v in READY]
    assert served.backend.device_class == DEVICE
    assert served.backend.depth() == 0
    with pytest.raises(NotFoundError, match="not hosted on cpu"):
        run(served.backend.infer(MODEL, REJECTED, {INPUT: images(1)}))


def test_local_backend_answers_with_the_batch_it_ran(served):
    data = images(3, seed=9)
    result = run(served.backend.infer(MODEL, "int8", {INPUT: data}))
    np.testing.assert_allclose(
        result.outputs[OUTPUT], run_artifact(served.repository, "int8", data), rtol=1e-5
    )
    assert result.batch_rows == 3
    assert result.service_s >= 0
    assert result.queue_s >= 0


def test_local_backend_predicts_with_the_queue_model_and_the_hop(served):
    executor = served.backend.executor
    key = variant_key(MODEL, "int8")
    run_ms = predict_ms(executor.work_state(), served.backend.times, DEVICE, key, 2)
    assert run_ms == pytest.approx(served.backend.times.batch_ms(key, DEVICE, 2))
    # 100 ms is longer than the hop: it runs on a worker, and the hop is part of the wait.
    assert not executor.runs_inline(key, 2)
    assert served.backend.predict_ms(MODEL, "int8", 2) == pytest.approx(run_ms + executor.hop_ms)
    # A batch shorter than the hop runs inline, and no hop is added.
    served.backend.times.seed(key, DEVICE, BatchCost(0.0, executor.hop_ms / 100))
    assert executor.runs_inline(key, 2)
    assert served.backend.predict_ms(MODEL, "int8", 2) == pytest.approx(executor.hop_ms / 50)


def test_a_batch_that_runs_inline_beside_a_long_one_is_not_predicted_to_wait_for_it(served):
    key = variant_key(MODEL, FASTEST)
    served.backend.times.seed(key, DEVICE, BatchCost(0.0, 1e-4))
    executor = served.backend.executor

    async def main():
        async with Gate(executor, served.backend.times).held():  # a 60 s batch runs
            assert executor.runs_inline(key, 1)
            return served.backend.predict_ms(MODEL, FASTEST, 1)

    assert run(main()) == pytest.approx(served.backend.times.batch_ms(key, DEVICE, 1))


def test_local_backend_runs_as_many_workers_as_its_device_class(tiny_repository):
    device = DeviceClass(DEVICE, ray_resources={"CPU": 2})
    backend = LocalBackend(
        tiny_repository, Catalog.load(tiny_repository), device, BatchingConfig(max_batch_size=4)
    )
    try:
        assert backend.executor.workers == 2
        state = backend.executor.work_state()
        assert (state.workers, state.max_batch_size) == (2, 4)
    finally:
        backend.close()


def test_synthetic_inputs_follow_the_signature(tiny_repository):
    record = tiny_repository.model(MODEL)
    inputs = synthetic_inputs(record, 5)
    assert list(inputs) == [INPUT]
    assert inputs[INPUT].shape == (5, 1, 8, 8)
    assert inputs[INPUT].dtype == np.float32
    assert not inputs[INPUT].any()
    assert record.signature.check_inputs(inputs, "warm-up") == 5


def test_a_rejected_manifest_is_never_loaded(tiny_repository):
    manifest = tiny_repository.manifest(MODEL, REJECTED)
    with pytest.raises(UnavailableError, match="rejected"):
        load_session(tiny_repository, manifest, DeviceClass(DEVICE))


def test_a_device_class_without_its_provider_is_unavailable(tiny_repository):
    missing = DeviceClass("npu", execution_provider="NoSuchExecutionProvider")
    with pytest.raises(UnavailableError, match="NoSuchExecutionProvider"):
        LocalBackend(tiny_repository, Catalog.load(tiny_repository), missing, BatchingConfig())


def test_a_backend_that_fails_to_load_leaves_no_worker_thread_behind(tiny_repository):
    missing = DeviceClass("leaky", execution_provider="NoSuchExecutionProvider")
    with pytest.raises(UnavailableError):
        LocalBackend(tiny_repository, Catalog.load(tiny_repository), missing, BatchingConfig())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
        t.name.startswith("gearbox-leaky-") for t in threading.enumerate()
    ):
        time.sleep(0.01)
    assert not any(t.name.startswith("gearbox-leaky-") for t in threading.enumerate())


def test_a_data_plane_needs_a_backend(tiny_repository):
    with pytest.raises(InvalidArgumentError, match="backend"):
        DataPlane(Catalog.load(tiny_repository), [], [DEVICE], RecordingMetrics())


# --- the remote backend (a device class reached through a handle) ------------------------------


class Remote:
    """A Ray Serve handle's shape: ``handle.infer.remote(...)`` is awaitable."""

    def __init__(self, answer=None, error=None, wait=None):
        self.infer = self
        self._answer = answer
        self._error = error
        self._wait = wait
        self.calls: list[tuple[str, str, dict]] = []

    def remote(self, model, variant, inputs):
        self.calls.append((model, variant, inputs))
        return self._call()

    async def _call(self):
        if self._wait is not None:
            await self._wait.wait()
        if self._error is not None:
            raise self._error
        return self._answer


class WrappedError(Exception):
    """What Ray raises for an exception in a replica: the original is its ``cause``."""

    def __init__(self, cause):
        super().__init__(str(cause))
        self.cause = cause


def test_remote_backend_is_seeded_from_the_manifests(tiny_repository):
    backend = RemoteBackend("gpu", Remote(), Catalog.load(tiny_repository))
    # gpu is not profiled: the fastest profiled class (cpu) seeds it.
    assert backend.predict_ms(MODEL, "int8", 1) == pytest.approx(SEEDED_MS["int8"])
    assert backend.depth() == 0


def test_remote_backend_learns_the_round_trip_and_counts_what_is_in_flight(tiny_repository):
    answer = BatchResult({OUTPUT: np.zeros((1, 10), np.float32)}, 0.0, 0.0, 1)

    async def main():
        release = asyncio.Event()
        handle = Remote(answer, wait=release)
        backend = RemoteBackend("gpu", handle, Catalog.load(tiny_repository))
        alone = backend.predict_ms(MODEL, "int8", 1)
        first = asyncio.ensure_future(backend.infer(MODEL, "int8", {INPUT: images(1)}))
        await until(lambda: backend.depth() == 1)
        # One request ahead: a new one waits for it.
        assert backend.predict_ms(MODEL, "int8", 1) == pytest.approx(2 * alone)
        release.set()
        result = await first
        return backend, handle, alone, result

    backend, handle, alone, result = run(main())
    assert result is answer
    assert backend.depth() == 0
    assert [(m, v) for m, v, _ in handle.calls] == [(MODEL, "int8")]
    # The measured round trip (far below the seeded 100 ms) pulled the estimate down.
    assert backend.predict_ms(MODEL, "int8", 1) < alone


@pytest.mark.parametrize(
    ("raised", "expected", "match"),
    [
        (ResourceExhaustedError("queue full"), ResourceExhaustedError, "queue full"),
        (
            WrappedError(NotFoundError("no such variant")),
            UnavailableError,
            "'gpu' does not serve it yet: no such variant",
        ),
        (RuntimeError("actor died"), UnavailableError, "'gpu' failed to answer: RuntimeError"),
    ],
)
def test_remote_backend_errors_keep_their_code(tiny_repository, raised, expected, match):
    backend = RemoteBackend("gpu", Remote(error=raised), Catalog.load(tiny_repository))
    with pytest.raises(expected, match=match):
        run(backend.infer(MODEL, "int8", {INPUT: images(1)}))
    assert backend.depth() == 0


def test_a_transport_allowance_is_left_free_when_choosing_but_not_counted_on_the_clock(
    tiny_repository,
):
    """int8 (100 ms) fits a 200 ms budget alone, not with 150 ms of transport beside it."""

    async def scenario():
        async with started(tiny_repository, transport_allowance_ms=150.0) as stack:
            answer = await stack.answer(infer_request(latency_budget_ms=MIDDLE_BUDGET_MS))
            return answer, stack.plane.variants(MODEL)

    response, listing = run(scenario())
    assert response.version == "small"
    assert response.parameters["budget_met"] is True  # the gateway's own span, as ever
    margins = {row["variant"]: row.get("prediction_margin_ms") for row in listing["variants"]}
    assert 150.0 <= margins["int8"][DEVICE] < 160.0  # the allowance and the small errors
    assert response.parameters["latency_ms"] < MIDDLE_BUDGET_MS


class LateBackend(FakeBackend):
    """Predicts 1 ms and answers 20 ms later."""

    async def infer(self, model, variant, inputs, lane=Lane.STANDARD):
        await asyncio.sleep(0.02)
        return await super().infer(model, variant, inputs, lane)


def test_answers_that_run_late_teach_the_router_to_leave_room_for_them(tiny_repository):
    plane = DataPlane(
        Catalog.load(tiny_repository), [LateBackend(DEVICE, predicted_ms=1.0)], [DEVICE],
        RecordingMetrics(),
    )  # fmt: skip

    async def route(budget_ms: float) -> str:
        response = await plane.infer(
            infer_request(latency_budget_ms=budget_ms), RequestClock.start()
        )
        plane.answered(response)
        return response.answer.route.reason

    async def main() -> tuple[str, str]:
        first = await route(10.0)  # nothing learnt yet: 1 ms fits 10 ms
        for _ in range(40):
            plane.answered(await plane.infer(infer_request(), RequestClock.start()))
        return first, await route(10.0)

    first, later = run(main())
    assert first == "within_budget"
    assert later == "fastest_over_budget"  # 1 ms predicted, but answers come 20 ms late


def test_background_runs_answer_as_the_artifact_does_on_an_idle_class_thread(served):
    data = images(2, seed=9)
    outputs = run(served.backend.run_in_background(MODEL, REFERENCE, {INPUT: data}))
    np.testing.assert_allclose(
        outputs["logits"], run_artifact(served.repository, REFERENCE, data), rtol=1e-6
    )
    # The thread takes a core only when no other thread wants it.
    policy = served.backend._background.submit(os.sched_getscheduler, 0).result()
    assert policy == os.SCHED_IDLE
    with pytest.raises(NotFoundError):
        run(served.backend.run_in_background(MODEL, "pruned", {INPUT: data}))


def test_a_replica_whose_workers_stopped_is_not_live(tiny_repository):
    async def scenario() -> None:
        async with started(tiny_repository) as served:
            http = HttpAdapter(served.plane)
            assert served.plane.live()
            assert (await http.handle("GET", "/v2/health/live", {}, b"")).status == 200
            served.backend.executor.close()  # as if its worker threads had died
            assert not served.plane.live()
            reply = await http.handle("GET", "/v2/health/live", {}, b"")
            assert reply.status == 503 and json.loads(reply.body) == {"live": False}

    run(scenario())
