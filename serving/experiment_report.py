"""The statistics of an A/B experiment's report, its table and plot, and the
``gearbox experiments`` command that fetches reports from a running gateway.

Every arm is compared with the first (the control): accuracy with Fisher's exact test when a
2x2 table has an expected count below 5 and the pooled two-proportion z-test otherwise;
latency and scores with the two-sided Mann-Whitney U test, which assumes no distribution
(latencies are skewed, with long tails).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from scipy import stats

from gearbox.compression.errors import InvalidArgumentError
from gearbox.serving.console import say

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ABSENT = "-"
MIN_PER_ARM = 5
"""Fewest observations each side needs before a comparison is attempted."""
EXPECTED_CELL_MIN = 5
"""Below this expected count in any cell the normal approximation fails: use Fisher's test."""
FISHER = "Fisher's exact test"
Z_TEST = "two-proportion z-test"
MANN_WHITNEY = "Mann-Whitney U test"

Metric = Literal["accuracy", "latency", "score"]


@dataclass(frozen=True)
class ArmSample:
    """The raw observations of one arm that a report summarises."""

    name: str
    variant: str
    weight: float
    latencies_ms: Sequence[float]
    budget_met: Sequence[bool]
    """One entry per request that had a latency budget."""
    correct: Sequence[bool]
    """One entry per request with a label: whether the prediction matched it."""
    scores: Sequence[float]
    feedback: int | None = None
    """Requests with feedback; None counts the labels and scores."""
    agreement: float | None = None
    agreement_rows: int = 0


class Interval(BaseModel):
    low: float
    high: float


class ArmReport(BaseModel):
    name: str
    variant: str
    weight: float
    control: bool
    requests: int
    feedback: int
    labelled: int
    correct: int
    accuracy: float | None
    accuracy_ci: Interval | None
    """Wilson score interval at the report's confidence."""
    scored: int
    mean_score: float | None
    score_ci: Interval | None
    """Student t interval of the mean score."""
    agreement: float | None
    """Live agreement with the reference from shadow runs; None before any comparison."""
    agreement_rows: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    with_budget: int
    """Requests that had a latency budget."""
    budget_met_rate: float | None


class Comparison(BaseModel):
    metric: Metric
    arm: str
    control: str
    test: str | None
    """None when there was too little data to run one."""
    statistic: float | None
    p_value: float | None
    difference: float | None
    """Arm minus control: accuracy (a fraction), latency p50 (ms) or mean score."""
    direction: Literal["higher", "lower"] | None = None
    """Which way the test found the arm to differ from the control (higher accuracy,
    latency or score); None when not compared. For Mann-Whitney this follows U, which a
    difference of medians can disagree with."""
    significant: bool
    verdict: str


class ExperimentReport(BaseModel):
    experiment: str
    model: str
    ended: bool
    confidence: float
    generated_at: float
    evicted: int = 0
    """Oldest outcomes dropped to bound memory; the figures cover the rest."""
    arms: list[ArmReport]
    comparisons: list[Comparison]
    verdict: str

    def arm(self, name: str) -> ArmReport:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise InvalidArgumentError(f"report of '{self.experiment}' has no arm '{name}'")

    def comparison(self, arm: str, metric: Metric) -> Comparison | None:
        for comparison in self.comparisons:
            if comparison.arm == arm and comparison.metric == metric:
                return comparison
        return None


def _finite(value: float | np.floating[Any] | None) -> float | None:
    # JSON has no NaN or infinity; a statistic without a finite value is reported as absent.
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _percent(value: float | None) -> str:
    return ABSENT if value is None else f"{value * 100:.1f} %"


def _level(confidence: float) -> str:
    return f"{confidence * 100:g} %"


def _p(p_value: float) -> str:
    return "p < 0.0001" if p_value < 1e-4 else f"p = {p_value:.2g}"


def _ms(value: float | None) -> str:
    if value is None:
        return ABSENT
    digits = 0 if value >= 100 else 1 if value >= 10 else 2 if value >= 1 else 3
    return f"{value:.{digits}f} ms"


def _arm_report(sample: ArmSample, control: bool, confidence: float) -> ArmReport:
    labelled, correct = len(sample.correct), int(sum(sample.correct))
    accuracy = correct / labelled if labelled else None
    accuracy_ci = None
    if labelled:
        ci = stats.binomtest(correct, labelled).proportion_ci(
            confidence_level=confidence, method="wilson"
        )
        accuracy_ci = Interval(low=float(ci.low), high=float(ci.high))
    scores = np.asarray(sample.scores, dtype=float)
    mean_score = float(scores.mean()) if scores.size else None
    score_ci = None
    if scores.size >= 2:
        spread = float(scores.std(ddof=1))
        if spread == 0.0:
            score_ci = Interval(low=mean_score, high=mean_score)
        else:
            low, high = stats.t.interval(
                confidence, scores.size - 1, loc=mean_score, scale=spread / math.sqrt(scores.size)
            )
            score_ci = Interval(low=float(low), high=float(high))
    latencies = np.asarray(sample.latencies_ms, dtype=float)
    p50, p95 = np.percentile(latencies, [50, 95]) if latencies.size else (None, None)
    budgets = len(sample.budget_met)
    feedback = labelled + scores.size if sample.feedback is None else sample.feedback
    return ArmReport(
        name=sample.name,
        variant=sample.variant,
        weight=sample.weight,
        control=control,
        requests=int(latencies.size),
        feedback=int(feedback),
        labelled=labelled,
        correct=correct,
        accuracy=accuracy,
        accuracy_ci=accuracy_ci,
        scored=int(scores.size),
        mean_score=mean_score,
        score_ci=score_ci,
        agreement=_finite(sample.agreement),
        agreement_rows=sample.agreement_rows,
        latency_p50_ms=_finite(p50),
        latency_p95_ms=_finite(p95),
        with_budget=budgets,
        budget_met_rate=sum(sample.budget_met) / budgets if budgets else None,
    )


def two_proportion_test(
    correct: int, total: int, control_correct: int, control_total: int
) -> tuple[str, float | None, float]:
    """(test name, statistic, two-sided p) for arm against control accuracy.

    The z-test's normal approximation needs every expected cell of the 2x2 table to be at
    least 5; below that, Fisher's exact test (statistic: the odds ratio).
    """
    table = np.array(
        [[correct, total - correct], [control_correct, control_total - control_correct]],
        dtype=float,
    )
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    if expected.min() < EXPECTED_CELL_MIN:
        odds, p_value = stats.fisher_exact(table.astype(int))
        return FISHER, _finite(odds), float(p_value)
    pooled = (correct + control_correct) / (total + control_total)
    error = math.sqrt(pooled * (1 - pooled) * (1 / total + 1 / control_total))
    z = (correct / total - control_correct / control_total) / error
    return Z_TEST, z, float(2 * stats.norm.sf(abs(z)))


def _significance(p_value: float, confidence: float) -> tuple[bool, str]:
    significant = p_value < 1 - confidence
    state = "significant" if significant else "not significant"
    return significant, f"{_p(p_value)}; {state} at {_level(confidence)}"


def _compare_accuracy(arm: ArmReport, control: ArmReport, confidence: float) -> Comparison:
    base = {"metric": "accuracy", "arm": arm.name, "control": control.name}
    if min(arm.labelled, control.labelled) < MIN_PER_ARM:
        verdict = (
            f"Not enough feedback to compare accuracy ({arm.name}: {arm.labelled}, "
            f"{control.name}: {control.labelled} labelled requests; {MIN_PER_ARM} each needed)"
        )
        return Comparison(
            **base, test=None, statistic=None, p_value=None, difference=None,
            significant=False, verdict=verdict,
        )  # fmt: skip
    assert arm.accuracy is not None and control.accuracy is not None
    test, statistic, p_value = two_proportion_test(
        arm.correct, arm.labelled, control.correct, control.labelled
    )
    significant, tail = _significance(p_value, confidence)
    figures = f"{_percent(arm.accuracy)} vs {_percent(control.accuracy)}"
    if significant:
        direction = "more" if arm.accuracy > control.accuracy else "less"
        verdict = (
            f"{arm.name} is {direction} accurate than {control.name}: {figures} ({test}, {tail})"
        )
    else:
        verdict = (
            f"No significant difference in accuracy between {arm.name} and {control.name} "
            f"({figures}, {_p(p_value)} at {_level(confidence)}; {test})"
        )
    return Comparison(
        **base, test=test, statistic=statistic, p_value=p_value,
        difference=arm.accuracy - control.accuracy,
        direction="higher" if arm.accuracy > control.accuracy else "lower",
        significant=significant, verdict=verdict,
    )  # fmt: skip


def _mann_whitney(values: Sequence[float], control: Sequence[float]) -> tuple[float, float, bool]:
    """(U of ``values``, two-sided p, whether ``values`` tend to be the larger)."""
    result = stats.mannwhitneyu(values, control, alternative="two-sided")
    statistic = float(result.statistic)
    # U above half its range means a random draw from ``values`` exceeds one from ``control``
    # more often than not: the direction the test found, which medians can disagree with.
    return statistic, float(result.pvalue), statistic > len(values) * len(control) / 2


@dataclass(frozen=True)
class _RankedMetric:
    """A metric whose arms are compared by rank (Mann-Whitney U), and how its verdicts read."""

    metric: Metric
    subject: str
    """What is compared: "latency", "scores"."""
    evidence: str
    """What there must be enough of: "requests", "feedback"."""
    counted: str
    """What the counts count: "requests", "scored requests"."""
    higher: str
    lower: str
    """The finding when the arm ranks higher / lower: "is slower", "scores lower"."""
    label: str
    """The summary figure's name: "p50", "mean"."""
    figure: Callable[[ArmReport], float | None]
    shown: Callable[[float], str]


LATENCY = _RankedMetric(
    "latency", "latency", "requests", "requests", "is slower", "is faster", "p50",
    lambda arm: arm.latency_p50_ms, _ms,
)  # fmt: skip
SCORES = _RankedMetric(
    "score", "scores", "feedback", "scored requests", "scores higher", "scores lower", "mean",
    lambda arm: arm.mean_score, lambda value: f"{value:.3g}",
)  # fmt: skip


def _compare_ranks(
    what: _RankedMetric,
    arm: ArmReport,
    control: ArmReport,
    values: Sequence[float],
    control_values: Sequence[float],
    confidence: float,
) -> Comparison:
    base = {"metric": what.metric, "arm": arm.name, "control": control.name, "test": MANN_WHITNEY}
    if min(len(values), len(control_values)) < MIN_PER_ARM:
        verdict = (
            f"Not enough {what.evidence} to compare {what.subject} ({arm.name}: "
            f"{len(values)}, {control.name}: {len(control_values)} {what.counted}; "
            f"{MIN_PER_ARM} each needed)"
        )
        return Comparison(
            **{**base, "test": None}, statistic=None, p_value=None, difference=None,
            significant=False, verdict=verdict,
        )  # fmt: skip
    arm_figure, control_figure = what.figure(arm), what.figure(control)
    assert arm_figure is not None and control_figure is not None
    statistic, p_value, higher = _mann_whitney(values, control_values)
    significant, tail = _significance(p_value, confidence)
    summary = f"{what.label} {what.shown(arm_figure)} vs {what.shown(control_figure)}"
    if significant:
        finding = what.higher if higher else what.lower
        verdict = f"{arm.name} {finding} than {control.name}: {summary} ({MANN_WHITNEY}, {tail})"
    else:
        verdict = (
            f"No significant difference in {what.subject} between {arm.name} and "
            f"{control.name} ({summary}, {_p(p_value)} at {_level(confidence)})"
        )
    return Comparison(
        **base, statistic=statistic, p_value=p_value, difference=arm_figure - control_figure,
        direction="higher" if higher else "lower", significant=significant, verdict=verdict,
    )  # fmt: skip


_FINDINGS = {
    ("accuracy", True): "more accurate",
    ("accuracy", False): "less accurate",
    ("latency", True): "slower",
    ("latency", False): "faster",
    ("score", True): "scores higher",
    ("score", False): "scores lower",
}


def _overall(
    comparisons: Sequence[Comparison], arms: Sequence[ArmReport], confidence: float
) -> str:
    control = arms[0].name
    parts: list[str] = []
    for arm in arms[1:]:
        mine = [c for c in comparisons if c.arm == arm.name]
        found = [_FINDINGS[(c.metric, c.direction == "higher")] for c in mine if c.significant]
        if found:
            parts.append(f"{arm.name} is {' and '.join(found)} than {control}")
        elif all(c.test is None for c in mine):
            parts.append(f"not enough data yet to compare {arm.name} with {control}")
        else:
            parts.append(f"no significant difference between {arm.name} and {control}")
    text = "; ".join(parts)
    # Arm names are identifiers: never capitalised, even at the start of the sentence.
    return f"{text} (at {_level(confidence)})."


def build_report(
    experiment: str,
    model: str,
    active: bool,
    confidence: float,
    arms: Sequence[ArmSample],
    evicted: int = 0,
) -> ExperimentReport:
    """Summarise each arm and compare every arm after the first with the first."""
    if not 0.0 < confidence < 1.0:
        raise InvalidArgumentError(f"confidence must be strictly between 0 and 1, got {confidence}")
    if len(arms) < 2:
        raise InvalidArgumentError("a report compares at least 2 arms")
    reports = [_arm_report(sample, i == 0, confidence) for i, sample in enumerate(arms)]
    control, control_sample = reports[0], arms[0]
    any_labels = any(r.labelled for r in reports)
    any_scores = any(r.scored for r in reports)
    comparisons: list[Comparison] = []
    for report, sample in zip(reports[1:], arms[1:], strict=True):
        # An embedding model's feedback is scores only; an accuracy line would be noise.
        if any_labels or not any_scores:
            comparisons.append(_compare_accuracy(report, control, confidence))
        comparisons.append(
            _compare_ranks(
                LATENCY,
                report,
                control,
                sample.latencies_ms,
                control_sample.latencies_ms,
                confidence,
            )
        )
        if any_scores:
            comparisons.append(
                _compare_ranks(
                    SCORES, report, control, sample.scores, control_sample.scores, confidence
                )
            )
    # Sorting by metric keeps each metric's lines together when there are several arms.
    order = {"accuracy": 0, "latency": 1, "score": 2}
    comparisons.sort(key=lambda c: order[c.metric])
    return ExperimentReport(
        experiment=experiment,
        model=model,
        ended=not active,
        confidence=confidence,
        generated_at=time.time(),
        evicted=evicted,
        arms=reports,
        comparisons=comparisons,
        verdict=_overall(comparisons, reports, confidence),
    )


def _accuracy_cell(arm: ArmReport) -> str:
    if arm.accuracy is None or arm.accuracy_ci is None:
        return ABSENT
    ci = arm.accuracy_ci
    return f"{_percent(arm.accuracy)} [{ci.low * 100:.1f}, {ci.high * 100:.1f}]"


def render(report: ExperimentReport, console: Console) -> None:
    """Print the arms as a table, then one line per comparison and the overall verdict."""
    state = "ended" if report.ended else "active"
    table = Table(
        title=f"experiment {report.experiment} on {report.model} ({state}), "
        f"{_level(report.confidence)} confidence",
        title_justify="left",
    )
    for column in ("arm", "variant", "weight", "n", "feedback"):
        table.add_column(column, justify="left" if column in ("arm", "variant") else "right")
    table.add_column("accuracy [CI]", justify="right")
    if any(arm.scored for arm in report.arms):
        table.add_column("mean score", justify="right")
    for column in ("agreement", "p50", "p95", "budget met"):
        table.add_column(column, justify="right")
    for arm in report.arms:
        cells = [
            f"{arm.name} (control)" if arm.control else arm.name,
            arm.variant,
            f"{arm.weight * 100:.0f} %",
            str(arm.requests),
            str(arm.feedback),
            _accuracy_cell(arm),
        ]
        if any(a.scored for a in report.arms):
            cells.append(ABSENT if arm.mean_score is None else f"{arm.mean_score:.3g}")
        cells += [
            ABSENT if arm.agreement is None else f"{arm.agreement:.4f}",
            _ms(arm.latency_p50_ms),
            _ms(arm.latency_p95_ms),
            ABSENT
            if arm.budget_met_rate is None
            else f"{_percent(arm.budget_met_rate)} of {arm.with_budget}",
        ]
        table.add_row(*cells)
    console.print(table)
    for comparison in report.comparisons:
        say(console, f"  {comparison.verdict}")
    say(console, f"Verdict: {report.verdict}")
    if report.evicted:
        say(
            console,
            f"(the oldest {report.evicted} requests were dropped to bound memory; the figures "
            "cover the most recent ones)",
        )


def _tick(arm: ArmReport) -> str:
    variant = "" if arm.variant == arm.name else f"\nvariant {arm.variant}"
    return f"{arm.name}{variant}" + ("\n(control)" if arm.control else "")


def plot(report: ExperimentReport, path: str | os.PathLike[str]) -> Figure:
    """Draw accuracy per arm with its confidence interval beside latency p50 and p95 per
    arm, and save the PNG at ``path``. Returns the figure."""
    # Figure with the Agg canvas, not pyplot: no global state and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    accuracy_axes, latency_axes = figure.subplots(1, 2)
    positions = np.arange(len(report.arms))
    ticks = [_tick(arm) for arm in report.arms]
    colours = ["tab:grey" if arm.control else "tab:blue" for arm in report.arms]

    measured = [arm for arm in report.arms if arm.accuracy is not None]
    for x, arm, colour in zip(positions, report.arms, colours, strict=True):
        if arm.accuracy is None or arm.accuracy_ci is None:
            accuracy_axes.text(
                x, 0.5, "no labelled\nfeedback", ha="center", va="center", color="grey",
                fontsize=9, transform=accuracy_axes.get_xaxis_transform(),
            )  # fmt: skip
            continue
        below = arm.accuracy - arm.accuracy_ci.low
        above = arm.accuracy_ci.high - arm.accuracy
        accuracy_axes.errorbar(
            x, arm.accuracy * 100, yerr=[[below * 100], [above * 100]], fmt="o",
            color=colour, markersize=8, capsize=8, elinewidth=1.6, capthick=1.6,
        )  # fmt: skip
        accuracy_axes.annotate(
            f"{arm.accuracy * 100:.1f} %\nn = {arm.labelled}",
            (x, arm.accuracy * 100), xytext=(12, 0), textcoords="offset points",
            va="center", fontsize=9,
        )  # fmt: skip
    if measured:
        lows = [a.accuracy_ci.low * 100 for a in measured if a.accuracy_ci is not None]
        highs = [a.accuracy_ci.high * 100 for a in measured if a.accuracy_ci is not None]
        span = max(max(highs) - min(lows), 1.0)
        # Room above the highest interval (even past 100 %) for the labels beside the points.
        accuracy_axes.set_ylim(max(0.0, min(lows) - 0.15 * span), max(highs) + 0.2 * span)
    else:
        accuracy_axes.set_ylim(0, 100)
    control = report.arms[0]
    if control.accuracy is not None:
        # The control's level across the panel: how far each arm sits from it, at a glance.
        accuracy_axes.axhline(
            control.accuracy * 100, color="tab:grey", linestyle=":", linewidth=0.9, zorder=0
        )
    accuracy_axes.set_ylabel("accuracy, % of labelled requests")
    accuracy_axes.set_title(f"accuracy with {_level(report.confidence)} Wilson interval")

    width = 0.38
    for offset, label, values, colour in (
        (-width / 2, "p50", [a.latency_p50_ms for a in report.arms], "tab:blue"),
        (width / 2, "p95", [a.latency_p95_ms for a in report.arms], "tab:orange"),
    ):
        heights = [0.0 if v is None else v for v in values]
        bars = latency_axes.bar(positions + offset, heights, width, label=label, color=colour)
        latency_axes.bar_label(
            bars,
            labels=[_ms(v) if v is not None else "" for v in values],
            fontsize=8,
            padding=2,
        )
    top = max([a.latency_p95_ms or 0.0 for a in report.arms] + [0.0])
    latency_axes.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    for x, arm in zip(positions, report.arms, strict=True):
        if arm.latency_p50_ms is None:
            latency_axes.text(
                x, 0.5, "no requests", ha="center", va="center", color="grey", fontsize=9,
                transform=latency_axes.get_xaxis_transform(),
            )  # fmt: skip
    latency_axes.set_ylabel("latency, ms")
    latency_axes.set_title("latency per request")
    latency_axes.legend(loc="upper right", fontsize=9)

    for axes in (accuracy_axes, latency_axes):
        axes.set_xticks(positions, ticks)
        axes.set_xlim(-0.6, len(report.arms) - 0.4)
        axes.grid(True, axis="y", alpha=0.3)
    state = ", ended" if report.ended else ""
    figure.suptitle(
        f"experiment {report.experiment} on {report.model}{state} "
        f"({_level(report.confidence)} confidence)",
        fontsize=12,
    )
    figure.savefig(path)
    return figure


__all__ = [
    "FISHER",
    "MANN_WHITNEY",
    "MIN_PER_ARM",
    "Z_TEST",
    "ArmReport",
    "ArmSample",
    "Comparison",
    "ExperimentReport",
    "Interval",
    "build_report",
    "plot",
    "render",
    "two_proportion_test",
]
