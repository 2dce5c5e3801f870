"""A/B experiments: definitions, sticky assignment, the ledger, the statistics of a report,
its table and plot, and the `gearbox experiments` command against a real HTTP server."""

from __future__ import annotations

import argparse
import io
import json
import random
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from scipy import stats

from gearbox.compression.errors import InvalidArgumentError, NotFoundError
from gearbox.serving.experiment_report import (
    FISHER,
    MANN_WHITNEY,
    Z_TEST,
    ArmSample,
    ExperimentReport,
    build_report,
    plot,
    render,
)
from gearbox.serving.experiments import (
    Experiment,
    ExperimentLedger,
    Outcome,
    assign,
    key_point,
)
from gearbox.serving.experiments_cli import add_experiments_parser, run_experiments

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE


def experiment(weights: tuple[float, ...] = (0.5, 0.5), name: str = "ab") -> Experiment:
    variants = ["fp32", "int8", "pruned", "distilled"]
    return Experiment.from_dict(
        {
            "name": name,
            "model": "digits",
            "arms": [{"variant": v, "weight": w} for v, w in zip(variants, weights, strict=False)],
        }
    )


# ---- definitions ------------------------------------------------------------------------------


def test_from_dict_defaults_names_normalises_weights_and_round_trips():
    parsed = Experiment.from_dict(
        {
            "name": "int8-vs-fp32",
            "model": "digits",
            "arms": [
                {"variant": "fp32", "weight": 7},
                {"variant": "int8", "weight": 3, "name": "quantised"},
            ],
        }
    )
    assert [arm.name for arm in parsed.arms] == ["fp32", "quantised"]
    assert [arm.variant for arm in parsed.arms] == ["fp32", "int8"]
    assert [arm.weight for arm in parsed.arms] == pytest.approx([0.7, 0.3])
    assert parsed.control.name == "fp32"
    assert Experiment.from_dict(parsed.to_dict()) == parsed
    assert Experiment.from_dict(json.loads(json.dumps(parsed.to_dict()))) == parsed
    thirds = experiment((1, 1, 1))
    assert Experiment.from_dict(thirds.to_dict()) == thirds


GOOD_ARMS = [{"variant": "fp32", "weight": 0.5}, {"variant": "int8", "weight": 0.5}]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ([], "expected a JSON object, got an array"),
        ({"name": "-leading-dash", "model": "digits", "arms": GOOD_ARMS}, "name: '-leading-dash'"),
        ({"name": "x" * 65, "model": "digits", "arms": GOOD_ARMS}, "name: 'xxx"),
        ({"name": "has space", "model": "digits", "arms": GOOD_ARMS}, "name: 'has space'"),
        ({"name": 7, "model": "digits", "arms": GOOD_ARMS}, "name: input should be a valid string"),
        ({"model": "digits", "arms": GOOD_ARMS}, "'name' is required"),
        ({"name": "ab", "arms": GOOD_ARMS}, "'model' is required"),
        ({"name": "ab", "model": "", "arms": GOOD_ARMS}, "model: must not be empty"),
        ({"name": "ab", "model": "digits", "arms": GOOD_ARMS[:1]}, "at least 2 arms, got 1"),
        ({"name": "ab", "model": "digits", "arms": []}, "at least 2 arms, got 0"),
        ({"name": "ab", "model": "digits", "arms": "fp32"}, "arms: input should be a valid list"),
        (
            {"name": "ab", "model": "digits", "arms": [GOOD_ARMS[0], {"variant": "int8"}]},
            "arms[1]: 'weight' is required",
        ),
        (
            {"name": "ab", "model": "digits", "arms": [GOOD_ARMS[0], {"weight": 1}]},
            "arms[1]: 'variant' is required",
        ),
        (
            {"name": "ab", "model": "digits", "arms": [GOOD_ARMS[0], {"variant": "", "weight": 1}]},
            "arms[1].variant: must not be empty",
        ),
        (
            {
                "name": "ab",
                "model": "digits",
                "arms": [GOOD_ARMS[0], {"variant": "i", "weight": 0}],
            },
            "arms[1].weight: must be positive, got 0",
        ),
        (
            {
                "name": "ab",
                "model": "digits",
                "arms": [{"variant": "f", "weight": -1}, GOOD_ARMS[1]],
            },
            "arms[0].weight: must be positive, got -1",
        ),
        (
            {
                "name": "ab",
                "model": "digits",
                "arms": [GOOD_ARMS[0], {"variant": "i", "weight": "x"}],
            },
            "arms[1].weight: input should be a valid number",
        ),
        (
            {
                "name": "ab",
                "model": "digits",
                "arms": [GOOD_ARMS[0], {"variant": "i", "weight": True}],
            },
            "arms[1].weight: must be a number, not a boolean",
        ),
        (
            {
                "name": "ab",
                "model": "digits",
                "arms": [GOOD_ARMS[0], {"variant": "i", "weight": "nan"}],
            },
            "arms[1].weight: input should be a finite number",
        ),
        (
            {"name": "ab", "model": "digits", "arms": [GOOD_ARMS[0], GOOD_ARMS[0]]},
            "arm name 'fp32' is used twice",
        ),
        (
            {
                "name": "ab",
                "model": "digits",
                "arms": [
                    {"variant": "fp32", "weight": 1, "name": "x"},
                    {"variant": "int8", "weight": 1, "name": "x"},
                ],
            },
            "arm name 'x' is used twice",
        ),
        (
            {
                "name": "ab",
                "model": "digits",
                "arms": [GOOD_ARMS[0], {"variant": "i", "weigth": 1}],
            },
            "arms[1]: unknown field 'weigth'",
        ),
        ({"name": "ab", "model": "digits", "arms": GOOD_ARMS, "extra": 1}, "unknown field 'extra'"),
    ],
)
def test_bad_bodies_raise_one_clear_line(body, problem):
    with pytest.raises(InvalidArgumentError) as raised:
        Experiment.from_dict(body)
    message = raised.value.message
    assert problem in message
    assert message.startswith("invalid experiment: ")
    assert "\n" not in message
    assert "_ArmBody" not in message and "_ExperimentBody" not in message
    assert "pydantic" not in message


# ---- assignment -------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.25, 0.25)])
def test_sticky_split_follows_the_weights(weights):
    split = experiment(weights)
    rng = random.Random(0)
    counts = Counter(assign(split, f"user-{i}", rng).name for i in range(10_000))
    for arm in split.arms:
        assert abs(counts[arm.name] / 10_000 - arm.weight) <= 0.02, counts


def test_the_same_key_always_lands_on_the_same_arm():
    split = experiment((0.5, 0.25, 0.25))
    first = {key: assign(split, key, random.Random(1)).name for key in map(str, range(500))}
    again = {key: assign(split, key, random.Random(2)).name for key in map(str, range(500))}
    assert first == again
    assert len(set(first.values())) == 3
    # The experiment's name is part of the hash: one key is not on the same arm everywhere.
    assert key_point("ab", "user-1") != key_point("cd", "user-1")


def test_assignment_is_the_same_in_a_fresh_process():
    split = experiment((0.5, 0.25, 0.25))
    keys = [f"k{i}" for i in range(200)]
    here = [assign(split, key, random.Random(0)).name for key in keys]
    script = (
        "import json, random, sys\n"
        "from gearbox.serving.experiments import Experiment, assign\n"
        "split = Experiment.from_dict(json.loads(sys.argv[1]))\n"
        "keys = json.loads(sys.argv[2])\n"
        "print(json.dumps([assign(split, k, random.Random(0)).name for k in keys]))\n"
    )
    # A different hash seed than this process: Python's own hash() would change with it.
    answer = subprocess.run(
        [sys.executable, "-c", script, json.dumps(split.to_dict()), json.dumps(keys)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    assert json.loads(answer.stdout) == here


def test_without_a_key_the_split_follows_the_weights():
    split = experiment((0.7, 0.3))
    rng = random.Random(42)
    counts = Counter(assign(split, None, rng).name for _ in range(10_000))
    assert abs(counts["fp32"] / 10_000 - 0.7) <= 0.02
    assert abs(counts["int8"] / 10_000 - 0.3) <= 0.02


# ---- the ledger -------------------------------------------------------------------------------


def outcome(
    request_id: str,
    arm: str = "fp32",
    prediction: int | None = 1,
    latency_ms: float = 1.0,
    budget_met: bool | None = None,
    name: str = "ab",
) -> Outcome:
    return Outcome(
        request_id=request_id,
        experiment=name,
        arm=arm,
        variant=arm,
        latency_ms=latency_ms,
        budget_met=budget_met,
        prediction=prediction,
    )


def test_create_end_and_get():
    ledger = ExperimentLedger()
    ab = experiment()
    ledger.create(ab)
    assert ledger.active() == (ab,)
    assert ledger.for_model("digits") == ab
    with pytest.raises(InvalidArgumentError, match="'ab' already exists"):
        ledger.create(ab)
    with pytest.raises(InvalidArgumentError, match="already has an active experiment 'ab'"):
        ledger.create(experiment(name="other"))
    with pytest.raises(NotFoundError, match="no experiment 'nope'"):
        ledger.end("nope")
    with pytest.raises(NotFoundError):
        ledger.get("nope")

    ledger.record([outcome("r1")])
    assert ledger.end("ab") == ab
    assert ledger.active() == ()
    assert ledger.get("ab") == ab
    assert not ledger.is_active("ab")
    assert ledger.for_model("digits") is None
    report = ledger.report("ab")
    assert report.ended
    assert report.arm("fp32").requests == 1
    # Late feedback still counts for an ended experiment.
    ledger.feedback("r1", label=1)
    assert ledger.report("ab").arm("fp32").labelled == 1
    [listed] = ledger.listing()
    assert listed["active"] is False
    assert (listed["requests"], listed["feedback"]) == (1, 1)

    # An ended experiment's name may start again, from nothing.
    ledger.create(ab)
    assert ledger.report("ab").arm("fp32").requests == 0
    with pytest.raises(NotFoundError):
        ledger.feedback("r1", label=1)


def test_outcomes_of_unknown_or_ended_experiments_are_dropped_and_counted():
    ledger = ExperimentLedger()
    ledger.create(experiment())
    kept = ledger.record(
        [outcome("r1"), outcome("r2", name="nope"), outcome("r3", arm="no-such-arm")]
    )
    assert (kept, ledger.discarded) == (1, 2)
    ledger.end("ab")
    assert ledger.record([outcome("r4")]) == 0
    assert ledger.discarded == 3
    assert ledger.report("ab").arm("fp32").requests == 1


def test_feedback_for_an_unknown_request_names_it():
    ledger = ExperimentLedger(max_outcomes=50)
    ledger.create(experiment())
    with pytest.raises(NotFoundError) as raised:
        ledger.feedback("abc", label=3)
    assert "no request 'abc' in any experiment" in raised.value.message
    assert "most recent 50 requests" in raised.value.message


def test_feedback_replaces_and_needs_exactly_one_value():
    ledger = ExperimentLedger()
    ledger.create(experiment())
    ledger.record([outcome("r1", prediction=4)])
    ledger.feedback("r1", label=3)
    arm = ledger.report("ab").arm("fp32")
    assert (arm.labelled, arm.correct, arm.feedback) == (1, 0, 1)
    ledger.feedback("r1", label=4)
    arm = ledger.report("ab").arm("fp32")
    assert (arm.labelled, arm.correct, arm.feedback) == (1, 1, 1)
    ledger.feedback("r1", score=0.25)
    arm = ledger.report("ab").arm("fp32")
    assert (arm.labelled, arm.scored, arm.mean_score, arm.feedback) == (0, 1, 0.25, 1)
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        ledger.feedback("r1")
    with pytest.raises(InvalidArgumentError, match="exactly one"):
        ledger.feedback("r1", label=1, score=1.0)
    with pytest.raises(InvalidArgumentError, match="finite"):
        ledger.feedback("r1", score=float("nan"))


def test_a_label_for_an_embedding_request_is_refused():
    ledger = ExperimentLedger()
    ledger.create(experiment())
    ledger.record([outcome("e1", prediction=None)])
    with pytest.raises(InvalidArgumentError, match="send a score"):
        ledger.feedback("e1", label=1)
    ledger.feedback("e1", score=0.9)


def test_memory_is_bounded_oldest_first_with_their_ids():
    ledger = ExperimentLedger(max_outcomes=3)
    ledger.create(experiment())
    ledger.record(outcome(f"r{i}", latency_ms=float(i)) for i in range(5))
    assert ledger.requests_held == 3
    for gone in ("r0", "r1"):
        with pytest.raises(NotFoundError):
            ledger.feedback(gone, label=1)
    for kept in ("r2", "r3", "r4"):
        ledger.feedback(kept, label=1)
    report = ledger.report("ab")
    assert report.arm("fp32").requests == 3
    assert report.arm("fp32").latency_p50_ms == 3.0
    assert report.evicted == 2


def test_agreement_sums_the_latest_totals_over_sources():
    ledger = ExperimentLedger()
    ledger.create(experiment())
    assert ledger.report("ab").arm("int8").agreement is None
    ledger.update_agreement("replica-1", "digits", "int8", matched=90, rows=100)
    ledger.update_agreement("replica-2", "digits", "int8", matched=10, rows=20)
    # Running totals: the newer figure of a source replaces its older one.
    ledger.update_agreement("replica-1", "digits", "int8", matched=180, rows=200)
    ledger.update_agreement("replica-1", "other-model", "int8", matched=0, rows=100)
    arm = ledger.report("ab").arm("int8")
    assert arm.agreement == pytest.approx(190 / 220)
    assert arm.agreement_rows == 220
    assert ledger.report("ab").arm("fp32").agreement is None


def test_report_rejects_a_bad_confidence():
    ledger = ExperimentLedger()
    ledger.create(experiment())
    for confidence in (0.0, 1.0, 1.5):
        with pytest.raises(InvalidArgumentError, match="confidence"):
            ledger.report("ab", confidence=confidence)


# ---- statistics -------------------------------------------------------------------------------


def simulated_ledger(
    seed: int,
    accuracy: tuple[float, float],
    n: int = 1000,
    latency_scale: tuple[float, float] = (1, 1),
) -> ExperimentLedger:
    """Two arms with n labelled requests each, right with the given probabilities."""
    rng = np.random.default_rng(seed)
    ledger = ExperimentLedger()
    ledger.create(experiment())
    for arm, p, scale in zip(("fp32", "int8"), accuracy, latency_scale, strict=True):
        right = rng.random(n) < p
        latencies = rng.lognormal(0.0, 0.5, n) * scale
        budgets = rng.random(n) < 0.5
        ledger.record(
            outcome(
                f"{arm}-{i}",
                arm=arm,
                prediction=1,
                latency_ms=float(latencies[i]),
                budget_met=bool(latencies[i] < 2.0) if budgets[i] else None,
            )
            for i in range(n)
        )
        for i in range(n):
            ledger.feedback(f"{arm}-{i}", label=1 if right[i] else 0)
    return ledger


def test_report_finds_a_planted_accuracy_difference():
    ledger = simulated_ledger(seed=3, accuracy=(0.95, 0.85))
    report = ledger.report("ab")
    control, arm = report.arm("fp32"), report.arm("int8")
    assert control.control and not arm.control
    assert control.labelled == arm.labelled == 1000
    comparison = report.comparison("int8", "accuracy")
    assert comparison is not None
    assert comparison.test == Z_TEST
    assert comparison.significant and comparison.direction == "lower"
    assert comparison.p_value is not None and comparison.p_value < 1e-6
    assert comparison.difference == pytest.approx(arm.accuracy - control.accuracy)
    assert comparison.verdict.startswith("int8 is less accurate than fp32: ")
    assert "two-proportion z-test" in comparison.verdict
    assert "significant at 95 %" in comparison.verdict
    assert "int8 is less accurate than fp32" in report.verdict
    # The z-test is the uncorrected chi-square test of the same table.
    table = [
        [arm.correct, arm.labelled - arm.correct],
        [control.correct, control.labelled - control.correct],
    ]
    chi2 = stats.chi2_contingency(table, correction=False)
    assert comparison.p_value == pytest.approx(chi2.pvalue, rel=1e-6)
    # Wilson intervals, as scipy computes them, around each accuracy.
    expected = stats.binomtest(arm.correct, arm.labelled).proportion_ci(0.95, method="wilson")
    assert arm.accuracy_ci is not None
    assert (arm.accuracy_ci.low, arm.accuracy_ci.high) == pytest.approx(
        (expected.low, expected.high)
    )
    assert arm.accuracy_ci.low < arm.accuracy < arm.accuracy_ci.high


def test_report_summarises_latency_and_budgets():
    ledger = simulated_ledger(seed=5, accuracy=(0.9, 0.9), n=200)
    report = ledger.report("ab")
    state = ledger._states["ab"]  # the raw outcomes, to recompute the figures independently
    latencies = [e.outcome.latency_ms for e in state.entries.values() if e.outcome.arm == "int8"]
    budgets = [
        e.outcome.budget_met
        for e in state.entries.values()
        if e.outcome.arm == "int8" and e.outcome.budget_met is not None
    ]
    arm = report.arm("int8")
    assert arm.latency_p50_ms == pytest.approx(np.percentile(latencies, 50))
    assert arm.latency_p95_ms == pytest.approx(np.percentile(latencies, 95))
    assert arm.with_budget == len(budgets) and 60 < len(budgets) < 140
    assert arm.budget_met_rate == pytest.approx(sum(budgets) / len(budgets))


def sample(
    name: str,
    rng: np.random.Generator,
    n: int,
    accuracy: float = 0.9,
    latency_scale: float = 1.0,
    scores: np.ndarray | None = None,
) -> ArmSample:
    return ArmSample(
        name=name,
        variant=name,
        weight=0.5,
        latencies_ms=rng.lognormal(0.0, 0.5, n) * latency_scale,
        budget_met=[],
        correct=rng.random(n) < accuracy,
        scores=[] if scores is None else scores,
    )


def aa_report(seed: int, n: int = 400, **planted: float) -> ExperimentReport:
    rng = np.random.default_rng(seed)
    control = sample("a", rng, n)
    arm = sample("b", rng, n, **planted)
    return build_report("ab", "digits", True, CONFIDENCE, [control, arm])


def test_identical_arms_are_rarely_called_different():
    runs = 200
    # A 1-in-1000 binomial margin above the expected alpha * runs false positives.
    allowed = stats.binom.ppf(0.999, runs, ALPHA)
    reports = [aa_report(seed) for seed in range(runs)]
    for metric in ("accuracy", "latency"):
        comparisons = [r.comparison("b", metric) for r in reports]
        assert all(c is not None and c.test is not None for c in comparisons)
        false_positives = sum(c.significant for c in comparisons if c is not None)
        assert false_positives <= allowed, (metric, false_positives, allowed)
        # The test is not so conservative that it never fires (it would also hide real ones).
        assert false_positives >= 1, metric
    quiet = [c for c in (r.comparison("b", "accuracy") for r in reports) if not c.significant]
    assert quiet[0].test == Z_TEST
    assert quiet[0].verdict.startswith("No significant difference in accuracy between b and a (")


def test_planted_differences_are_found_nearly_always():
    runs = 50
    accuracy = [aa_report(100 + s, accuracy=0.78).comparison("b", "accuracy") for s in range(runs)]
    found = sum(c is not None and c.significant and c.direction == "lower" for c in accuracy)
    assert found >= runs - 1
    latency = [
        aa_report(200 + s, latency_scale=1.3).comparison("b", "latency") for s in range(runs)
    ]
    found = sum(c is not None and c.significant and c.direction == "higher" for c in latency)
    assert found >= runs - 1
    assert all(c is not None and c.test == MANN_WHITNEY for c in latency)
    report = aa_report(7, latency_scale=0.6)
    comparison = report.comparison("b", "latency")
    assert comparison is not None and comparison.verdict.startswith("b is faster than a: p50 ")
    assert "b is faster than a" in report.verdict


def test_small_counts_use_fishers_exact_test():
    def arm(name: str, right: int, total: int) -> ArmSample:
        correct = [True] * right + [False] * (total - right)
        return ArmSample(name, name, 0.5, [1.0] * total, [], correct, [])

    report = build_report("ab", "digits", True, CONFIDENCE, [arm("a", 12, 12), arm("b", 4, 12)])
    comparison = report.comparison("b", "accuracy")
    assert comparison is not None and comparison.test == FISHER
    odds, expected_p = stats.fisher_exact([[4, 8], [12, 0]])
    assert comparison.p_value == pytest.approx(expected_p)
    assert comparison.statistic == pytest.approx(odds)
    assert comparison.significant and "Fisher's exact test" in comparison.verdict
    assert comparison.verdict.startswith("b is less accurate than a: 33.3 % vs 100.0 % (")

    # A perfect arm against an imperfect control has an infinite odds ratio: reported as
    # absent, since JSON has no infinity.
    flipped = build_report("ab", "digits", True, CONFIDENCE, [arm("a", 4, 12), arm("b", 12, 12)])
    comparison = flipped.comparison("b", "accuracy")
    assert comparison is not None and comparison.test == FISHER
    assert comparison.statistic is None and comparison.direction == "higher"
    json.dumps(flipped.model_dump(mode="json"), allow_nan=False)

    few = build_report("ab", "digits", True, CONFIDENCE, [arm("fp32", 0, 0), arm("int8", 3, 3)])
    comparison = few.comparison("int8", "accuracy")
    assert comparison is not None and comparison.test is None and not comparison.significant
    assert comparison.verdict.startswith(
        "Not enough feedback to compare accuracy (int8: 3, fp32: 0 labelled requests"
    )
    assert few.arm("fp32").accuracy is None and few.arm("fp32").accuracy_ci is None


def test_scores_get_a_t_interval_and_a_mann_whitney_comparison():
    rng = np.random.default_rng(11)
    control_scores = rng.normal(0.80, 0.05, 300)
    arm_scores = rng.normal(0.75, 0.05, 300)
    control = ArmSample("a", "fp32", 0.5, [1.0] * 300, [], [], control_scores)
    arm = ArmSample("b", "int8", 0.5, [1.0] * 300, [], [], arm_scores)
    report = build_report("ab", "minilm", True, CONFIDENCE, [control, arm])
    summary = report.arm("b")
    low, high = stats.t.interval(
        0.95, 299, loc=arm_scores.mean(), scale=arm_scores.std(ddof=1) / np.sqrt(300)
    )
    assert summary.score_ci is not None
    assert (summary.score_ci.low, summary.score_ci.high) == pytest.approx((low, high))
    comparison = report.comparison("b", "score")
    assert comparison is not None and comparison.test == MANN_WHITNEY
    assert comparison.significant and comparison.direction == "lower"
    assert comparison.verdict.startswith("b scores lower than a: mean ")
    # Scores only (an embedding model): no accuracy line to distract.
    assert report.comparison("b", "accuracy") is None
    # Identical latencies on both sides: no difference, and no NaN anywhere.
    latency = report.comparison("b", "latency")
    assert latency is not None and not latency.significant
    json.dumps(report.model_dump(mode="json"), allow_nan=False)


def test_every_arm_is_compared_with_the_first():
    rng = np.random.default_rng(2)
    arms = [sample(name, rng, 300) for name in ("a", "b", "c")]
    report = build_report("abc", "digits", True, CONFIDENCE, arms)
    assert {(c.arm, c.control) for c in report.comparisons} == {("b", "a"), ("c", "a")}
    assert [c.metric for c in report.comparisons] == ["accuracy"] * 2 + ["latency"] * 2


# ---- JSON, table and plot ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def report() -> ExperimentReport:
    ledger = simulated_ledger(seed=9, accuracy=(0.97, 0.90), n=400, latency_scale=(1.0, 0.5))
    ledger.update_agreement("replica-1", "digits", "int8", matched=985, rows=1000)
    return ledger.report("ab")


def test_the_report_survives_a_json_round_trip(report):
    text = json.dumps(report.model_dump(mode="json"), allow_nan=False)
    assert ExperimentReport.model_validate(json.loads(text)) == report


def test_render_prints_every_arm_and_the_verdicts(report):
    console = Console(file=io.StringIO(), width=200, color_system=None)
    render(report, console)
    text = console.file.getvalue()
    for arm in report.arms:
        assert arm.name in text
    assert "fp32 (control)" in text
    assert "0.9850" in text  # int8's live agreement
    for comparison in report.comparisons:
        assert comparison.verdict in text
    assert f"Verdict: {report.verdict}" in text
    assert "int8 is less accurate and faster than fp32" in report.verdict


def test_plot_writes_a_png(report, tmp_path):
    path = tmp_path / "report.png"
    plot(report, path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    # An arm with no feedback and no requests yet still draws.
    rng = np.random.default_rng(0)
    empty = ArmSample("new", "pruned", 0.2, [], [], [], [])
    sparse = build_report("abc", "digits", False, 0.9, [sample("a", rng, 50), empty])
    plot(sparse, tmp_path / "sparse.png")
    assert (tmp_path / "sparse.png").stat().st_size > 10_000


# ---- the command line, against a real HTTP server ----------------------------------------------


class Gateway:
    """Answers like the gateway's experiment endpoints and remembers what it was sent."""

    def __init__(self, report: ExperimentReport) -> None:
        self.report = report.model_dump(mode="json")
        self.requests: list[dict[str, Any]] = []
        self.token_required: str | None = None


def handler(gateway: Gateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):
            pass

        def _answer(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            gateway.requests.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "authorization": self.headers.get("Authorization"),
                    "body": body,
                }
            )
            wanted = f"Bearer {gateway.token_required}"
            if (
                self.command != "GET"
                and gateway.token_required
                and self.headers.get("Authorization") != wanted
            ):
                self._answer(401, {"error": "admin token missing or wrong"})
            elif self.path.startswith("/v2/experiments/ab/report"):
                self._answer(200, gateway.report)
            elif self.path.startswith("/v2/experiments/broken/report"):
                self._answer(200, {"experiment": "broken"})
            elif self.path == "/v2/experiments" and self.command == "GET":
                listed = [{**experiment().to_dict(), "active": True, "requests": 7, "feedback": 2}]
                self._answer(200, {"experiments": listed})
            elif self.path == "/v2/experiments" and self.command == "POST":
                self._answer(200, body)
            elif self.path == "/v2/experiments/ab" and self.command == "DELETE":
                self._answer(200, {})
            else:
                name = self.path.split("/")[3] if self.path.count("/") >= 3 else "?"
                self._answer(404, {"error": f"no experiment '{name}'\n(known: ab)"})

        do_GET = do_POST = do_DELETE = _handle

    return Handler


@pytest.fixture
def gateway(report) -> Iterator[tuple[Gateway, str]]:
    state = Gateway(report)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(state))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gearbox")
    add_experiments_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def run(argv: list[str]) -> tuple[int, str, str]:
    out = Console(file=io.StringIO(), width=200, color_system=None)
    err = Console(file=io.StringIO(), width=80, color_system=None)
    code = run_experiments(parse(["experiments", *argv]), out, err)
    return code, out.file.getvalue(), err.file.getvalue()


def test_cli_report_table(gateway, report):
    state, url = gateway
    code, out, err = run(["report", "ab", "--url", url + "/"])
    assert (code, err) == (0, "")
    for arm in report.arms:
        assert arm.name in out
    assert report.verdict in out
    assert state.requests[-1]["path"] == "/v2/experiments/ab/report?confidence=0.95"


def test_cli_report_json_and_plot(gateway, report, tmp_path):
    state, url = gateway
    png = tmp_path / "ab.png"
    code, out, err = run(
        ["report", "ab", "--json", "--confidence", "0.9", "--plot", str(png), "--url", url]
    )
    assert (code, err) == (0, "")
    assert state.requests[-1]["path"] == "/v2/experiments/ab/report?confidence=0.9"
    document, _, written = out.rpartition("}")
    assert ExperimentReport.model_validate(json.loads(document + "}")) == report
    assert f"written to {png}" in written
    assert png.read_bytes().startswith(b"\x89PNG")
    code, _, err = run(["report", "ab", "--plot", str(tmp_path / "no" / "x.png"), "--url", url])
    assert code == 1 and err.startswith("gearbox: error: cannot write the plot to ")
    assert err.count("\n") == 1


def test_cli_gateway_error_is_one_line(gateway):
    _, url = gateway
    code, out, err = run(["report", "nope", "--url", url])
    assert code == 1 and out == ""
    assert err == "gearbox: error: no experiment 'nope' (known: ab) (HTTP 404)\n"


def test_cli_unreadable_report_is_one_line(gateway):
    _, url = gateway
    code, _, err = run(["report", "broken", "--url", url])
    assert code == 1
    assert err.count("\n") == 1 and "report cannot be read" in err


def test_cli_unreachable_gateway_is_one_line():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, out, err = run(["list", "--url", f"http://127.0.0.1:{port}"])
    assert code == 1 and out == ""
    assert err.startswith(f"gearbox: error: cannot reach the gateway at http://127.0.0.1:{port}")
    assert err.count("\n") == 1


def test_cli_list(gateway):
    _, url = gateway
    code, out, err = run(["list", "--url", url])
    assert (code, err) == (0, "")
    assert "ab" in out and "digits" in out and "fp32=fp32 50 %" in out and "active" in out


def test_cli_create_and_end_send_the_token(gateway, tmp_path, monkeypatch):
    state, url = gateway
    state.token_required = "s3cret"
    body = {"name": "ab", "model": "digits", "arms": GOOD_ARMS}
    definition = tmp_path / "ab.json"
    definition.write_text(json.dumps(body))

    monkeypatch.delenv("GEARBOX_ADMIN_TOKEN", raising=False)
    code, _, err = run(["create", str(definition), "--url", url])
    assert code == 1
    assert err == (
        "gearbox: error: admin token missing or wrong (HTTP 401; give --token or set "
        "GEARBOX_ADMIN_TOKEN)\n"
    )

    code, out, err = run(["create", str(definition), "--url", url, "--token", "s3cret"])
    assert (code, err) == (0, "")
    assert state.requests[-1] == {
        "method": "POST",
        "path": "/v2/experiments",
        "authorization": "Bearer s3cret",
        "body": body,
    }
    assert "created experiment ab on digits" in out

    monkeypatch.setenv("GEARBOX_ADMIN_TOKEN", "s3cret")
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(body)))
    assert run(["create", "-", "--url", url])[0] == 0
    code, out, err = run(["end", "ab", "--url", url])
    assert (code, err) == (0, "")
    assert state.requests[-1]["method"] == "DELETE"
    assert state.requests[-1]["path"] == "/v2/experiments/ab"
    assert state.requests[-1]["authorization"] == "Bearer s3cret"
    assert "ended experiment ab" in out


def test_cli_create_checks_the_definition_before_sending(gateway, tmp_path):
    state, url = gateway
    definition = tmp_path / "bad.json"
    definition.write_text(json.dumps({"name": "ab", "model": "digits", "arms": GOOD_ARMS[:1]}))
    code, _, err = run(["create", str(definition), "--url", url])
    assert code == 1 and state.requests == []
    assert err == "gearbox: error: invalid experiment: arms: needs at least 2 arms, got 1\n"
    definition.write_text("{not json")
    code, _, err = run(["create", str(definition), "--url", url])
    assert code == 1 and err.count("\n") == 1 and "is not JSON" in err
    code, _, err = run(["create", str(tmp_path / "missing.json"), "--url", url])
    assert code == 1 and "cannot read" in err


def test_cli_help_shows_every_default(capsys):
    for action, defaults in (
        ("report", ["default: 0.95", "default: http://127.0.0.1:8000", "default: no plot"]),
        ("create", ["default: $GEARBOX_ADMIN_TOKEN", "default: http://127.0.0.1:8000"]),
        ("end", ["default: $GEARBOX_ADMIN_TOKEN"]),
        ("list", ["default: http://127.0.0.1:8000"]),
    ):
        with pytest.raises(SystemExit):
            parse(["experiments", action, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for default in defaults:
            assert default in text, (action, default)
    with pytest.raises(SystemExit):
        parse(["experiments", "report", "ab", "--confidence", "1.2"])
    assert "strictly between 0 and 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["experiments", "list", "--url", "127.0.0.1:8000"])
    assert "is not an http:// or https:// URL" in capsys.readouterr().err
