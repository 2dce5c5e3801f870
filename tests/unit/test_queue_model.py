"""The queue model: batch costs, live service times, and predicted latency.

Pure arithmetic on hand-made work states, then a check of :func:`predict_ms` against a small
discrete-event simulation of an executor that forms batches by the same rule as
:class:`~gearbox.serving.executor.DeviceExecutor` (the variant with the oldest waiting request
first; its requests merged up to :func:`batch_limit` rows), in virtual time: no threads, no clock.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
import pytest

from gearbox.compression.errors import InvalidArgumentError
from gearbox.serving.queue_model import (
    OUTLIER_FACTOR,
    BatchCost,
    PredictionErrors,
    RunningBatch,
    ServiceTimes,
    WorkState,
    batch_limit,
    batches_of,
    predict_ms,
    variant_key,
)

CPU = "cpu"

# --- BatchCost --------------------------------------------------------------------------------


def test_a_batch_costs_its_fixed_part_plus_its_rows():
    cost = BatchCost(1.5, 0.25)
    assert cost.ms(1) == 1.75
    assert cost.ms(8) == 3.5


def test_from_profile_passes_through_batch_one_and_batch_eight():
    cost = BatchCost.from_profile(4.0, 12.0)
    assert cost.per_row_ms == pytest.approx(8 / 7)
    assert cost.fixed_ms == pytest.approx(4 - 8 / 7)
    assert cost.ms(1) == pytest.approx(4.0)
    assert cost.ms(8) == pytest.approx(12.0)


@pytest.mark.parametrize("b8", [None, 0.0, -1.0])
def test_from_profile_without_batch_eight_splits_batch_one_in_half(b8):
    cost = BatchCost.from_profile(4.0, b8)
    assert (cost.fixed_ms, cost.per_row_ms) == (2.0, 2.0)
    assert not cost.measured_shape  # an assumption, which batching decisions must not trust
    assert BatchCost.from_profile(4.0, 12.0).measured_shape


def test_from_profile_never_goes_negative():
    # Batch 8 no slower than batch 1: all of it is fixed cost.
    assert BatchCost.from_profile(4.0, 3.0) == BatchCost(4.0, 0.0)
    # A negative figure counts as nothing.
    assert BatchCost.from_profile(-1.0) == BatchCost(0.0, 0.0, measured_shape=False)
    # Batch 8 far above 8 x batch 1: the fixed part is clamped at zero.
    steep = BatchCost.from_profile(1.0, 50.0)
    assert steep.fixed_ms == 0.0
    assert steep.per_row_ms == pytest.approx(7.0)


# --- ServiceTimes -----------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0, -0.1, 1.5])
def test_smoothing_must_lie_in_the_unit_interval(smoothing):
    with pytest.raises(InvalidArgumentError, match="smoothing"):
        ServiceTimes(smoothing=smoothing)


def test_nothing_known_costs_nothing():
    assert ServiceTimes().batch_ms("m/v", CPU, 4) == 0.0


def test_a_seed_is_the_estimate_at_every_batch_size():
    times = ServiceTimes()
    times.seed("m/v", CPU, BatchCost(1.0, 0.5))
    assert times.batch_ms("m/v", CPU) == 1.5
    assert times.batch_ms("m/v", CPU, 8) == 5.0
    # Keys are (variant, device class): others are untouched.
    assert times.batch_ms("m/v", "gpu") == 0.0
    assert times.batch_ms("m/w", CPU) == 0.0


def test_an_observation_scales_the_whole_shape_by_the_smoothing_factor():
    times = ServiceTimes(smoothing=0.25)
    times.seed("m/v", CPU, BatchCost(1.0, 1.0))  # 2 ms at batch 1, 5 ms at batch 4
    times.observe("m/v", CPU, 4, 10.0)  # twice as slow as seeded, seen at batch 4
    assert times.batch_ms("m/v", CPU, 4) == pytest.approx(5.0 * 1.25)
    assert times.batch_ms("m/v", CPU, 1) == pytest.approx(2.0 * 1.25)  # learnt at any size
    times.observe("m/v", CPU, 1, 1.0)  # then half as slow
    assert times.batch_ms("m/v", CPU, 1) == pytest.approx(2.0 * (1.25 + 0.25 * (0.5 - 1.25)))


def test_smoothing_one_follows_the_last_observation():
    times = ServiceTimes(smoothing=1.0)
    times.seed("m/v", CPU, BatchCost(0.0, 4.0))
    times.observe("m/v", CPU, 1, 7.5)
    assert times.batch_ms("m/v", CPU) == pytest.approx(7.5)


def test_the_estimate_converges_on_a_steady_service_time():
    times = ServiceTimes()
    times.seed("m/v", CPU, BatchCost(50.0, 50.0))
    for _ in range(100):
        times.observe("m/v", CPU, 2, 3.0)
    assert times.batch_ms("m/v", CPU, 2) == pytest.approx(3.0, abs=1e-6)


def test_one_stall_may_at_most_double_a_samples_weight():
    times = ServiceTimes(smoothing=0.5)
    times.seed("m/v", CPU, BatchCost(0.0, 1.0))
    times.observe("m/v", CPU, 1, 100.0)  # a stall
    assert OUTLIER_FACTOR == 2.0
    assert times.batch_ms("m/v", CPU) == pytest.approx(1.5)  # 1 + 0.5 * (2 - 1)
    for _ in range(20):  # a lasting slowdown still gets through
        times.observe("m/v", CPU, 1, 10.0)
    assert times.batch_ms("m/v", CPU) == pytest.approx(10.0, rel=0.01)


def test_a_speed_up_is_never_clamped():
    times = ServiceTimes(smoothing=1.0)
    times.seed("m/v", CPU, BatchCost(0.0, 100.0))
    times.observe("m/v", CPU, 1, 0.01)
    assert times.batch_ms("m/v", CPU) == pytest.approx(0.01)


@pytest.mark.parametrize("seed", [None, BatchCost(0.0, 0.0)])
def test_without_a_usable_seed_the_first_observation_is_the_cost_of_a_row(seed):
    times = ServiceTimes()
    if seed is not None:
        times.seed("m/v", CPU, seed)
    times.observe("m/v", CPU, 4, 8.0)
    assert times.batch_ms("m/v", CPU, 4) == pytest.approx(8.0)
    assert times.batch_ms("m/v", CPU, 1) == pytest.approx(2.0)
    assert not times.knows_batch_shape("m/v", CPU)


def test_calibrate_with_two_batch_sizes_fixes_both_costs():
    times = ServiceTimes(smoothing=1.0)
    times.seed("m/v", CPU, BatchCost(10.0, 10.0))
    times.observe("m/v", CPU, 1, 100.0)  # a live scale, which calibration replaces
    times.calibrate("m/v", CPU, {8: 9.0, 1: 2.0})  # 1 ms fixed + 1 ms per row
    assert times.batch_ms("m/v", CPU, 1) == pytest.approx(2.0)
    assert times.batch_ms("m/v", CPU, 4) == pytest.approx(5.0)
    assert times.batch_ms("m/v", CPU, 8) == pytest.approx(9.0)


def test_calibrate_uses_the_two_smallest_batch_sizes_and_never_goes_negative():
    times = ServiceTimes()
    times.calibrate("m/v", CPU, {16: 1000.0, 4: 6.0, 2: 4.0})
    assert times.batch_ms("m/v", CPU, 3) == pytest.approx(5.0)
    times.calibrate("m/w", CPU, {1: 3.0, 8: 2.0})  # bigger batches faster: noise
    assert times.batch_ms("m/w", CPU, 8) == pytest.approx(3.0)
    times.calibrate("m/x", CPU, {1: 1.0, 2: 10.0})  # per-row above batch 1: no negative fixed
    assert times.batch_ms("m/x", CPU, 1) == pytest.approx(9.0)
    assert times.batch_ms("m/x", CPU, 2) == pytest.approx(18.0)


def test_calibrate_with_one_batch_size_rescales_the_profiled_shape():
    times = ServiceTimes()
    times.seed("m/v", CPU, BatchCost(1.0, 1.0))
    times.calibrate("m/v", CPU, {1: 4.0})  # twice the profile
    assert times.batch_ms("m/v", CPU, 3) == pytest.approx(8.0)
    times.calibrate("m/w", CPU, {2: 6.0})  # nothing profiled: a cost per row
    assert times.batch_ms("m/w", CPU, 1) == pytest.approx(3.0)


# --- batches_of and variant_key ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "size", "expected"),
    [(0, 8, []), (3, 8, [3]), (8, 8, [8]), (19, 8, [8, 8, 3]), (3, 1, [1, 1, 1])],
)
def test_batches_of(rows, size, expected):
    assert batches_of(rows, size) == expected


def test_variant_key():
    assert variant_key("digits", "int8") == "digits/int8"


# --- predict_ms on hand-made work states ------------------------------------------------------


def times_for(**costs: BatchCost) -> ServiceTimes:
    times = ServiceTimes()
    for variant, cost in costs.items():
        times.seed(variant, CPU, cost)
    return times


TIMES = times_for(a=BatchCost(2.0, 1.0), b=BatchCost(1.0, 0.5))
"""a: 2 ms + 1 ms per row; b: 1 ms + 0.5 ms per row."""


def test_an_idle_executor_predicts_the_own_batch_plus_overhead():
    state = WorkState(workers=1, max_batch_size=8)
    assert predict_ms(state, TIMES, CPU, "a") == 3.0
    assert predict_ms(state, TIMES, CPU, "a", rows=4) == 6.0
    assert predict_ms(state, TIMES, CPU, "a", rows=4, overhead_ms=0.5) == 6.5


def test_what_is_left_of_running_batches_is_waited_for():
    state = WorkState(1, 8, running=[RunningBatch("b", 4, elapsed_ms=1.0)])  # 3 ms, 1 done
    assert predict_ms(state, TIMES, CPU, "a") == 2.0 + 3.0
    overdue = WorkState(1, 8, running=[RunningBatch("b", 4, elapsed_ms=10.0)])
    assert predict_ms(overdue, TIMES, CPU, "a") == 3.0  # never negative


def test_other_variants_queued_rows_run_first_in_full_batches():
    state = WorkState(1, 4, queued_rows={"b": 10})  # batches of 4, 4, 2: 3 + 3 + 2 ms
    assert predict_ms(state, TIMES, CPU, "a") == 8.0 + 3.0


def test_a_request_joins_its_variants_last_partial_batch_when_it_fits():
    state = WorkState(1, 8, queued_rows={"a": 5})
    assert predict_ms(state, TIMES, CPU, "a", rows=2) == TIMES.batch_ms("a", CPU, 7)  # 9 ms


def test_a_request_that_does_not_fit_waits_for_its_variants_queued_batches():
    assert predict_ms(WorkState(1, 8, queued_rows={"a": 7}), TIMES, CPU, "a", rows=2) == 9.0 + 4.0
    full = WorkState(1, 8, queued_rows={"a": 16})  # two full batches of 10 ms ahead
    assert predict_ms(full, TIMES, CPU, "a") == 20.0 + 3.0


def test_work_ahead_is_shared_among_the_workers():
    state = WorkState(
        workers=2,
        max_batch_size=8,
        running=[RunningBatch("a", 2, 0.0), RunningBatch("b", 2, 0.0)],  # 4 + 2 ms
        queued_rows={"b": 2},  # 2 ms
    )
    assert predict_ms(state, TIMES, CPU, "a", overhead_ms=1.0) == 1.0 + 8.0 / 2 + 3.0


def test_everything_together():
    state = WorkState(
        workers=1,
        max_batch_size=4,
        running=[RunningBatch("a", 4, elapsed_ms=2.5)],  # 6 ms, 3.5 left
        queued_rows={"b": 6, "a": 3},  # b: 3 + 2 ms; a: 3 rows, joined by ours
    )
    expected = 0.25 + 3.5 + 5.0 + TIMES.batch_ms("a", CPU, 4)
    assert predict_ms(state, TIMES, CPU, "a", rows=1, overhead_ms=0.25) == pytest.approx(expected)


def test_a_variant_that_never_merges_queues_in_batches_of_one():
    state = WorkState(1, 8, queued_rows={"a": 3, "b": 2}, batch_limits={"a": 1})
    # b's two rows run as one batch (2 ms); a's three as three (3 ms each); ours after them.
    assert predict_ms(state, TIMES, CPU, "a") == 2.0 + 9.0 + 3.0
    assert state.batch_limit("a") == 1
    assert state.batch_limit("b") == 8


def test_the_batch_limit_answers_the_waiting_requests_soonest_on_average():
    times = times_for(
        small=BatchCost(2.0, 1.0),
        transformer=BatchCost(0.5, 10.0),
        even=BatchCost(1.0, 1.0),
        free_rows=BatchCost(1.0, 0.0),
    )

    def limit(variant: str, waiting: int, **kwargs) -> int:
        return batch_limit(times, variant, CPU, waiting, 8, **kwargs)

    # Two waiting, fixed cost above the per-row cost: merged both answer after 4 ms, one by
    # one after 3 and 6 ms (4.5 on average).
    assert limit("small", 2) == 2
    assert limit("small", 32) == 8  # sqrt(32 * 2) = 8
    # A batch of eight costs about eight runs: one at a time, until the queue is deep.
    assert limit("transformer", 2) == 1
    assert limit("transformer", 20) == 1  # sqrt(20 * 0.05) = 1
    assert limit("transformer", 200) == 3  # sqrt(200 * 0.05) = 3.2
    # No gain from merging two; a fixed cost outside the session (the worker hop) tips it.
    assert limit("even", 2) == 1
    assert limit("even", 2, per_batch_ms=1.0) == 2
    assert limit("free_rows", 1) == 8  # rows cost nothing: merge everything


def test_the_batch_limit_is_judged_at_the_batchs_own_length():
    times = ServiceTimes()
    times.seed(
        "text",
        CPU,
        BatchCost(0.5, 10.0),
        by_tokens={16: BatchCost(3.0, 1.0), 64: BatchCost(0.5, 10.0)},
    )
    assert batch_limit(times, "text", CPU, 8, 8, tokens=16) == 5  # sqrt(8 * 3)
    assert batch_limit(times, "text", CPU, 8, 8, tokens=64) == 1


@pytest.mark.parametrize("cost", [None, BatchCost.from_profile(4.0)])
def test_a_variant_whose_batch_shape_is_unmeasured_merges_as_configured(cost):
    times = ServiceTimes()
    if cost is not None:
        times.seed("v", CPU, cost)
    else:
        times.observe("v", CPU, 1, 5.0)
    assert batch_limit(times, "v", CPU, 2, 8) == 8


def test_an_idle_worker_means_no_wait():
    state = WorkState(workers=2, max_batch_size=8, running=[RunningBatch("b", 8, 0.0)])
    assert predict_ms(state, TIMES, CPU, "a") == TIMES.batch_ms("a", CPU, 1)


# --- predict_ms against a simulated executor --------------------------------------------------

COSTS = {
    "m/a": BatchCost(2.0, 0.5),
    "m/b": BatchCost(1.0, 0.25),
    "m/c": BatchCost(4.0, 1.0),
}
"""True service times of the simulated variants, seeded exactly into ServiceTimes."""
MAX_BATCH = 8
HORIZON_MS = 20_000.0


@dataclass(order=True)
class _Batch:
    ends: float
    started: float = field(compare=False)
    variant: str = field(compare=False)
    rows: int = field(compare=False)
    requests: list[int] = field(compare=False)


@dataclass
class Outcome:
    predicted: np.ndarray
    actual: np.ndarray

    @property
    def errors(self) -> np.ndarray:
        return np.abs(self.predicted - self.actual)


def arrivals(load: float, workers: int, seed: int) -> list[tuple[float, str, int]]:
    """Poisson arrivals of 1- or 2-row requests, equally shared among the variants, at about
    ``load`` of the workers' capacity when nothing batches."""
    rng = np.random.default_rng(seed)
    mean_ms = np.mean([cost.ms(1.5) for cost in COSTS.values()])
    rate = load * workers / mean_ms / len(COSTS)  # requests per ms per variant
    found = []
    for variant in COSTS:
        now = 0.0
        while True:
            now += rng.exponential(1.0 / rate)
            if now > HORIZON_MS:
                break
            found.append((now, variant, int(rng.integers(1, 3))))
    return sorted(found)


def simulate(workers: int, load: float, seed: int = 7) -> Outcome:
    """Runs the arrivals through ``workers`` simulated workers; predicts each request's latency
    with predict_ms from the executor's state on arrival, and measures it."""
    times = ServiceTimes()
    for variant, cost in COSTS.items():
        times.seed(variant, CPU, cost)
    queues: dict[str, list[tuple[float, int, int]]] = {v: [] for v in COSTS}  # (at, rows, id)
    running: list[_Batch] = []
    predicted: dict[int, float] = {}
    arrived: dict[int, float] = {}
    answered: dict[int, float] = {}

    def start_batches(now: float) -> None:
        # DeviceExecutor's rule: the oldest head first; merge its variant up to its batch limit.
        while len(running) < workers:
            heads = [(queue[0][0], v) for v, queue in queues.items() if queue]
            if not heads:
                return
            _, variant = min(heads)
            limit = batch_limit(times, variant, CPU, len(queues[variant]), MAX_BATCH)
            taken, kept, rows = [], [], 0
            for item in queues[variant]:
                if not taken or rows + item[1] <= limit:
                    taken.append(item)
                    rows += item[1]
                else:
                    kept.append(item)
            queues[variant] = kept
            ends = now + COSTS[variant].ms(rows)
            heapq.heappush(running, _Batch(ends, now, variant, rows, [i[2] for i in taken]))

    pending = arrivals(load, workers, seed)
    index = 0
    while index < len(pending) or running:
        next_arrival = pending[index][0] if index < len(pending) else float("inf")
        if running and running[0].ends <= next_arrival:
            done = heapq.heappop(running)
            for request in done.requests:
                answered[request] = done.ends
            start_batches(done.ends)
            continue
        now, variant, rows = pending[index]
        state = WorkState(
            workers,
            MAX_BATCH,
            [RunningBatch(b.variant, b.rows, now - b.started) for b in running],
            {v: sum(item[1] for item in queue) for v, queue in queues.items() if queue},
            {v: batch_limit(times, v, CPU, len(queue) + 1, MAX_BATCH)
             for v, queue in queues.items() if queue},
        )  # fmt: skip
        predicted[index] = predict_ms(state, times, CPU, variant, rows)
        arrived[index] = now
        queues[variant].append((now, rows, index))
        index += 1
        start_batches(now)

    ids = sorted(predicted)
    return Outcome(
        np.array([predicted[i] for i in ids]),
        np.array([answered[i] - arrived[i] for i in ids]),
    )


def test_the_simulation_queues_more_as_load_rises():
    light, heavy = simulate(1, 0.2), simulate(1, 0.8)
    assert len(heavy.actual) > 3 * len(light.actual)
    assert heavy.actual.mean() > light.actual.mean()
    assert light.actual.min() >= COSTS["m/b"].ms(1)  # nothing beats its own run


@pytest.mark.parametrize("load", [0.3, 0.5, 0.7])
def test_predictions_match_a_simulated_single_worker_executor(load):
    outcome = simulate(workers=1, load=load)
    mean_latency = outcome.actual.mean()
    assert np.median(outcome.errors) < 0.10 * mean_latency
    assert outcome.errors.mean() < 0.10 * mean_latency
    assert abs((outcome.predicted - outcome.actual).mean()) < 0.05 * mean_latency
    assert np.corrcoef(outcome.predicted, outcome.actual)[0, 1] > 0.9


def test_predictions_rise_with_load():
    means = [simulate(workers=1, load=load).predicted.mean() for load in (0.2, 0.5, 0.8)]
    assert means == sorted(means)
    assert means[-1] > 1.3 * means[0]


def test_predictions_match_a_simulated_two_worker_executor():
    outcome = simulate(workers=2, load=0.6)
    mean_latency = outcome.actual.mean()
    assert np.median(outcome.errors) < 0.10 * mean_latency
    assert abs((outcome.predicted - outcome.actual).mean()) < 0.05 * mean_latency


# --- cost that grows with the input's length --------------------------------------------------

BY_TOKENS = {16: BatchCost(1.0, 0.0), 64: BatchCost(4.0, 0.0), 128: BatchCost(10.0, 0.0)}


def length_times() -> ServiceTimes:
    times = ServiceTimes()
    times.seed("m/v", "cpu", BY_TOKENS[64], BY_TOKENS)
    return times


def test_a_text_models_cost_follows_its_profile_between_and_beyond_lengths():
    times = length_times()
    assert times.batch_ms("m/v", "cpu", 1) == pytest.approx(4.0)  # its usual length
    assert times.batch_ms("m/v", "cpu", 1, tokens=64) == pytest.approx(4.0)
    assert times.batch_ms("m/v", "cpu", 1, tokens=16) == pytest.approx(1.0)
    assert times.batch_ms("m/v", "cpu", 1, tokens=40) == pytest.approx(2.5)  # halfway
    assert times.batch_ms("m/v", "cpu", 1, tokens=256) == pytest.approx(22.0)  # along 64..128
    assert times.batch_ms("m/v", "cpu", 1, tokens=1) == pytest.approx(0.4)  # floored at 1/10


def test_a_long_batch_measured_slow_teaches_the_speed_not_the_length():
    times = length_times()
    # 128 tokens took twice their profile: the machine is slower, at every length alike.
    times.observe("m/v", "cpu", 1, 20.0, tokens=128)
    scale = 1 + 0.2 * (2.0 - 1)
    assert times.batch_ms("m/v", "cpu", 1, tokens=128) == pytest.approx(10.0 * scale)
    assert times.batch_ms("m/v", "cpu", 1, tokens=16) == pytest.approx(1.0 * scale)


def test_reseeding_without_lengths_forgets_them():
    times = length_times()
    times.seed("m/v", "cpu", BatchCost(4.0, 0.0))
    assert times.batch_ms("m/v", "cpu", 1, tokens=16) == pytest.approx(4.0)


def test_the_prediction_of_a_request_uses_its_own_length():
    times = length_times()
    idle = WorkState(workers=1, max_batch_size=8)
    assert predict_ms(idle, times, "cpu", "m/v", tokens=16) == pytest.approx(1.0)
    assert predict_ms(idle, times, "cpu", "m/v", tokens=128) == pytest.approx(10.0)


# --- prediction errors ------------------------------------------------------------------------


def test_the_margin_is_the_quantile_of_recent_errors():
    errors = PredictionErrors(quantile=0.9, window=100, min_samples=10, refresh_every=1)
    for error in range(100):  # 0 .. 99 ms late
        errors.observe("m/v", "cpu", float(error))
    assert errors.margin_ms("m/v", "cpu") == pytest.approx(89.1)


def test_only_the_recent_window_counts():
    errors = PredictionErrors(quantile=0.5, window=20, min_samples=10, refresh_every=1)
    for _ in range(20):
        errors.observe("m/v", "cpu", 50.0)
    for _ in range(20):
        errors.observe("m/v", "cpu", 1.0)
    assert errors.margin_ms("m/v", "cpu") == pytest.approx(1.0)


def test_a_key_with_few_errors_borrows_everyones_and_early_answers_give_no_credit():
    errors = PredictionErrors(quantile=0.5, window=64, min_samples=10, refresh_every=1)
    assert errors.margin_ms("m/v", "cpu") == 0.0
    for _ in range(30):
        errors.observe("m/a", "cpu", 2.0)
    errors.observe("m/b", "cpu", 9.0)
    assert errors.margin_ms("m/b", "cpu") == pytest.approx(2.0)  # pooled
    for _ in range(30):
        errors.observe("m/c", "cpu", -3.0)
    assert errors.margin_ms("m/c", "cpu") == 0.0


def test_the_margin_is_refreshed_every_few_errors():
    errors = PredictionErrors(quantile=0.5, window=64, min_samples=1, refresh_every=4)
    errors.observe("m/v", "cpu", 1.0)
    assert errors.margin_ms("m/v", "cpu") == 1.0
    for _ in range(3):
        errors.observe("m/v", "cpu", 9.0)
    assert errors.margin_ms("m/v", "cpu") == 1.0  # three new errors: not yet
    errors.observe("m/v", "cpu", 9.0)
    assert errors.margin_ms("m/v", "cpu") == 9.0


@pytest.mark.parametrize("quantile", [0.0, 1.0, -0.5])
def test_the_quantile_lies_strictly_between_0_and_1(quantile):
    with pytest.raises(InvalidArgumentError, match="quantile"):
        PredictionErrors(quantile)


def test_a_key_borrows_its_own_models_errors_before_everyones():
    """A slow model's errors of tens of milliseconds must not keep a fast model's variants,
    still with few answers of their own, out of every tight budget."""
    errors = PredictionErrors(quantile=0.5, window=64, min_samples=10, refresh_every=1)
    for _ in range(30):
        errors.observe("slow/fp32", "cpu", 40.0)
    for _ in range(12):
        errors.observe("fast/fp32", "cpu", 0.5)
    errors.observe("fast/int8", "cpu", 0.2)
    assert errors.margin_ms("fast/int8", "cpu") == pytest.approx(0.5)  # its model's pool
    assert errors.margin_ms("fast/fp32", "gpu") == pytest.approx(40.0)  # nothing on gpu yet
    assert errors.margin_ms("slow/int8", "cpu") == pytest.approx(40.0)
