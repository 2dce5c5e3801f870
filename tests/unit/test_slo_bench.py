"""The SLO benchmark's own logic: its schedule, its request bodies, and how it judges budgets
and quality per policy (no server is started here)."""

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    sys.path.insert(0, str(ROOT / "bench"))  # slo_bench imports its sibling serving_peers
    try:
        spec = importlib.util.spec_from_file_location("slo_bench", ROOT / "bench" / "slo_bench.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["slo_bench"] = module  # its dataclasses look their module up by name
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


bench = _load_bench()


def _answer(variant, data):
    return {"model_version": variant, "outputs": [{"name": "y", "data": list(data)}]}


def test_the_schedule_doubles_its_rate_in_the_middle_third():
    offsets, phases = bench._schedule(np.random.default_rng(3), rate=200.0, seconds=30.0)
    counts = np.histogram(offsets, bins=[0, 10, 20, 30])[0]
    assert offsets == sorted(offsets) and offsets[0] > 0 and offsets[-1] < 30.0
    assert counts[1] == pytest.approx(2 * counts[0], rel=0.15)
    assert counts[2] == pytest.approx(counts[0], rel=0.15)
    # A phase is the rate an arrival's gap was drawn at: the spike's, well inside it.
    assert all(phase == 1 for t, phase in zip(offsets, phases, strict=True) if 10.5 <= t < 19.5)
    assert all(phase == 0 for t, phase in zip(offsets, phases, strict=True) if not 9.5 <= t < 20.5)
    again, _ = bench._schedule(np.random.default_rng(3), rate=200.0, seconds=30.0)
    assert again == offsets  # replayable from the seed


def test_a_digits_body_carries_the_image_and_the_budget_only_when_given():
    workload = bench.digits_workload()
    budgeted, unbudgeted = workload.bodies(np.array([4, 4]), [3.5, None])
    document = json.loads(budgeted)
    [tensor] = document["inputs"]
    assert (tensor["name"], tensor["datatype"]) == ("images", "FP32")
    assert len(tensor["data"]) == int(np.prod(tensor["shape"]))
    assert document["parameters"] == {"latency_budget_ms": 3.5}
    assert "parameters" not in json.loads(unbudgeted)


def test_a_digits_answer_scores_one_exactly_when_its_top_class_is_the_label():
    workload = bench.digits_workload()
    one_hot = np.eye(10)
    # Each held-out digit has exactly one class whose one-hot answer scores 1.
    for item in range(0, len(workload.inputs), 37):
        scores = [workload.score(item, _answer("fp32", one_hot[c])) for c in range(10)]
        assert sorted(scores) == [0.0] * 9 + [1.0]


def test_budgets_are_judged_at_the_client_and_only_where_feasible():
    results = [
        {"status": 200, "ms": 4.0, "late_ms": 0.1, "variant": "a", "score": 1.0},  # met
        {"status": 200, "ms": 9.0, "late_ms": 0.1, "variant": "b", "score": 0.5},  # too late
        {"status": 429, "ms": 0.5, "late_ms": 0.1},  # refused: a miss
        {"status": 200, "ms": 1.0, "late_ms": 0.1, "variant": "a", "score": 1.0},  # infeasible
        {"status": 200, "ms": 50.0, "late_ms": 0.1, "variant": "b", "score": 0.0},  # no budget
    ]
    budgets = [5.0, 5.0, 5.0, 2.0, None]
    floors = np.array([3.0, 3.0, 3.0, 2.5, 3.0])  # the last-but-one item needs 2.5 ms unloaded
    row = bench._summarise(results, budgets, floors, {"a": 0.99, "b": 0.95}, seconds=2.0)
    assert (row["feasible"], row["met"], row["misses"]) == (3, 1, 2)
    assert row["met_share"] == pytest.approx(1 / 3)
    assert row["quality"] == pytest.approx((1.0 + 0.5 + 1.0 + 0.0) / 4)
    assert row["mean_manifest_quality"] == pytest.approx((0.99 + 0.95 + 0.99 + 0.95) / 4)
    assert row["throughput_rps"] == 2.0
    assert row["statuses"] == {"200": 4, "429": 1}
    assert row["variants"] == {"a": 2, "b": 2, "-": 1}


def test_misses_are_counted_by_budget_and_by_phase():
    results = [
        {"status": 200, "ms": 9.0, "late_ms": 0.1, "variant": "a", "score": 1.0},  # 1.5L, missed
        {"status": 200, "ms": 9.0, "late_ms": 0.1, "variant": "a", "score": 1.0},  # 2L, met
        {"status": 503, "ms": 1.0, "late_ms": 0.1},  # 2L in the spike: missed
        {"status": 200, "ms": 99.0, "late_ms": 0.1, "variant": "a", "score": 1.0},  # no budget
    ]
    row = bench._summarise(
        results,
        [7.5, 10.0, 10.0, None],
        np.full(4, 5.0),
        {"a": 0.99},
        seconds=1.0,
        multiples=[1.5, 2, 2, None],
        phases=[0, 0, 1, 1],
    )
    assert row["misses"] == 2
    assert row["misses_by_budget"] == {"1.5L": 1, "2L": 1}
    assert row["misses_by_phase"] == {"base": 1, "spike": 1}
    assert row["misses_by_variant"] == {"a": 1, "-": 1}  # "-": no answer


def test_slices_cut_the_schedule_into_equal_spans_of_time_covering_every_request():
    offsets, _ = bench._schedule(np.random.default_rng(5), rate=100.0, seconds=12.0)
    slices = bench._slices(offsets, 12.0, 4)
    assert [start for _, _, start in slices] == [0.0, 3.0, 6.0, 9.0]
    assert slices[0][0] == 0 and slices[-1][1] == len(offsets)
    for (_, end, _), (first, _, _) in itertools.pairwise(slices):
        assert end == first  # no request lost or sent twice
    for first, end, start in slices:
        assert all(start <= offset < start + 3.0 for offset in offsets[first:end])
    # The spike (the middle third) lands in the slices that cover it, for every policy alike.
    middle = slices[2]
    assert middle[1] - middle[0] > 1.5 * (slices[0][1] - slices[0][0])


def test_rounds_rotate_which_policy_runs_after_which():
    rounds = bench._rounds(["a", "b", "c"], 4)
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert {r[0] for r in rounds[:3]} == {"a", "b", "c"}


def test_cpu_times_are_read_from_the_kernel_and_add_up():
    before = bench.CpuTimes.now()
    if before is None:
        pytest.skip("no /proc/stat on this system")
    sum(range(2_000_000))  # some work, so time passes
    spent = bench.CpuTimes.now() - before
    assert spent.total > 0
    # Seconds from clock ticks: equal ticks may differ in the last bits once subtracted.
    assert 0 <= spent.steal <= spent.total + 1e-6
    assert 0 < spent.busy <= spent.total + 1e-6
    doubled = spent + spent
    assert doubled.total == pytest.approx(2 * spent.total)


def test_the_unloaded_floor_judges_isolated_requests_against_the_budget_mix():
    fastest_ms = 10.0
    # Every isolated request at 1.2L meets even the tightest budget, 1.5L.
    assert bench._unloaded_met_share(np.full(50, 12.0), np.full(50, 10.0), fastest_ms) == 1.0
    # At 2.5L they miss 1.5L and 2L (weights 0.2 + 0.2 of 0.85 budgeted).
    share = bench._unloaded_met_share(np.full(50, 25.0), np.full(50, 10.0), fastest_ms)
    assert share == pytest.approx(1 - 0.4 / 0.85)
    # An item whose floor is above 1.5L is not judged at 1.5L, as in the run.
    share = bench._unloaded_met_share(np.array([18.0]), np.array([16.0]), fastest_ms)
    assert share == 1.0


def test_each_miss_is_put_down_to_what_the_gateway_said_about_it():
    allowance = 1.0
    base = {"status": 200, "late_ms": 0.1, "variant": "a", "score": 1.0}
    results = [
        {**base, "ms": 11.0, "predicted_ms": 9.5, "server_ms": 8.0},  # predicted not to fit
        {**base, "ms": 12.0, "predicted_ms": 6.0, "server_ms": 9.5},  # the span ran over
        {**base, "ms": 12.0, "predicted_ms": 6.0, "server_ms": 7.0},  # lost outside the gateway
        {"status": 429, "ms": 0.4, "late_ms": 0.1},  # refused
        {**base, "ms": 8.0, "predicted_ms": 6.0, "server_ms": 6.5},  # met: no cause
    ]
    row = bench._summarise(
        results, [10.0] * 5, np.full(5, 5.0), {"a": 0.99}, seconds=1.0, allowance_ms=allowance
    )
    assert row["misses_by_cause"] == {
        "predicted late": 1,
        "gateway ran over": 1,
        "outside the gateway": 1,
        "refused or failed": 1,
    }
