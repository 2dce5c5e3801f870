"""``gearbox top``: a live terminal view of a running gateway, read from its own /metrics.

For people without Prometheus or Grafana: two scrapes of the gateway's exposition text an
interval apart give request rates, error and traffic shares, latency quantiles and budget
shares per model, variant and device class, next to the gauges (agreement, quality, queue).
"""

from __future__ import annotations

import argparse
import http.client
import math
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from gearbox.compression.errors import UnavailableError
from gearbox.serving.metric_names import (
    ALL_METRICS,
    BUDGET,
    INFLIGHT,
    REQUEST_LATENCY,
    REQUESTS,
    VARIANT_AGREEMENT,
    VARIANT_QUALITY,
    Kind,
)

DEFAULT_URL = "http://127.0.0.1:8080/metrics"
DEFAULT_INTERVAL_S = 2.0
SCRAPE_TIMEOUT_S = 5.0
RAY_PREFIX = "ray_"
OK = "ok"
MISSING = "\u2013"  # an en dash: no figure (as opposed to a zero)

Labels = tuple[tuple[str, str], ...]
"""A series' labels, sorted by name, so that equal label sets compare equal."""
SeriesKey = tuple[str, Labels]


def _sample_names() -> frozenset[str]:
    names: set[str] = set()
    for spec in ALL_METRICS:
        if spec.kind is Kind.HISTOGRAM:
            names.update(f"{spec.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        else:
            names.add(spec.sample_name)
    return frozenset(names)


SAMPLE_NAMES = _sample_names()


@dataclass(frozen=True)
class Snapshot:
    """One scrape: every Gearbox sample by (sample name without ``ray_``, labels)."""

    taken_at: float
    """``time.monotonic()`` when the scrape was read: rates divide by the measured gap."""
    values: Mapping[SeriesKey, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, taken_at: float) -> Snapshot:
        """Parses Prometheus text exposition; series that are not Gearbox's are dropped."""
        values: dict[SeriesKey, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = _plain_name(sample.name)
                if name is None:
                    continue
                key = (name, tuple(sorted(sample.labels.items())))
                # Ray's exporter may repeat a series under labels we then collapse; sum them.
                values[key] = values.get(key, 0.0) + sample.value
        return cls(taken_at, MappingProxyType(values))

    def series(self, name: str) -> Iterable[tuple[Labels, float]]:
        return ((labels, value) for (n, labels), value in self.values.items() if n == name)


def _plain_name(name: str) -> str | None:
    # Ray's exporter prefixes `ray_`; the gateway's own exporter does not. Accept both.
    if name in SAMPLE_NAMES:
        return name
    if name.startswith(RAY_PREFIX) and name[len(RAY_PREFIX) :] in SAMPLE_NAMES:
        return name[len(RAY_PREFIX) :]
    return None


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT_S) -> Snapshot:
    """Reads ``url`` once; an unreachable or malformed endpoint is an :class:`UnavailableError`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        raise UnavailableError(f"cannot read metrics from {url}: HTTP {error.code}") from None
    except urllib.error.URLError as error:
        raise UnavailableError(f"cannot read metrics from {url}: {error.reason}") from None
    except (OSError, ValueError, http.client.HTTPException) as error:
        raise UnavailableError(f"cannot read metrics from {url}: {error}") from None
    taken_at = time.monotonic()
    try:
        return Snapshot.parse(text, taken_at)
    except ValueError as error:
        raise UnavailableError(
            f"{url} did not answer with Prometheus text exposition: {error}"
        ) from None


@dataclass(frozen=True)
class TopRow:
    """One model x variant x device class over a window; ``None`` where nothing was measured."""

    model: str
    variant: str
    device_class: str
    """Empty for a variant that has gauges but has answered nothing on any device class."""
    requests: float
    rate_rps: float
    error_share: float | None
    traffic_share: float | None
    """Of the model's requests in the window, over every variant and device class."""
    p50_ms: float | None
    p95_ms: float | None
    budget_met_share: float | None
    """Per model x variant (the budget counter has no device class)."""
    agreement: float | None
    quality: float | None
    inflight: float | None
    """Per model x device class: shared by every variant's row on that device class."""


def _without(labels: Labels, drop: str) -> Labels:
    return tuple(item for item in labels if item[0] != drop)


def _deltas(
    before: Snapshot, after: Snapshot, names: Sequence[str]
) -> list[tuple[SeriesKey, float]]:
    """Increase of every counter-like series in ``names`` between the snapshots.

    A series that fell restarted from zero (gateway restart), so its whole value is the
    increase, as Prometheus' rate() assumes; a histogram restarts as one, so one fallen bucket
    resets every bucket of that label set.
    """
    reset: set[Labels] = set()
    for name in names:
        for labels, value in after.series(name):
            if value < before.values.get((name, labels), 0.0):
                reset.add(_without(labels, "le"))
    increases = []
    for name in names:
        for labels, value in after.series(name):
            restarted = _without(labels, "le") in reset
            start = 0.0 if restarted else before.values.get((name, labels), 0.0)
            increases.append(((name, labels), value - start))
    return increases


def _group(
    increases: Iterable[tuple[SeriesKey, float]], name: str, keys: Sequence[str]
) -> dict[tuple[str, ...], float]:
    totals: dict[tuple[str, ...], float] = defaultdict(float)
    for (sample, labels), value in increases:
        if sample == name:
            found = dict(labels)
            totals[tuple(found.get(key, "") for key in keys)] += value
    return totals


def _gauge(
    snapshot: Snapshot, name: str, keys: Sequence[str], combine: str
) -> dict[tuple[str, ...], float]:
    values: dict[tuple[str, ...], float] = {}
    for labels, value in snapshot.series(name):
        found = dict(labels)
        key = tuple(found.get(k, "") for k in keys)
        if key not in values:
            values[key] = value
        elif combine == "sum":
            values[key] += value
        else:
            values[key] = max(values[key], value)
    return values


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative ``{upper bound: count}``; ``None`` empty.

    Linear within the bucket holding the rank; the lowest bucket starts at 0; a rank in the
    +Inf bucket answers the highest finite bound, as Prometheus does.
    """
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    previous_bound, previous_count = 0.0, 0.0
    for index, bound in enumerate(bounds):
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return bounds[-2] if len(bounds) > 1 else None
            if index == 0 and bound <= 0:
                return bound
            within = count - previous_count
            if within <= 0:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / within
        previous_bound, previous_count = bound, count
    return bounds[-2] if len(bounds) > 1 else None


def window(before: Snapshot, after: Snapshot) -> list[TopRow]:
    """The rows for the window between two snapshots of one gateway (unsorted)."""
    seconds = after.taken_at - before.taken_at
    if seconds <= 0:
        raise ValueError("the second snapshot must be taken after the first")
    row_keys = ("model", "variant", "device_class")

    requests_name = REQUESTS.sample_name
    increases = _deltas(before, after, [requests_name])
    requests = _group(increases, requests_name, row_keys)
    errors = _group(
        (item for item in increases if dict(item[0][1]).get("code") != OK),
        requests_name,
        row_keys,
    )

    latency = REQUEST_LATENCY.name
    bucket_name = f"{latency}_bucket"
    latency_increases = _deltas(before, after, [bucket_name, f"{latency}_count"])
    buckets: dict[tuple[str, ...], dict[float, float]] = defaultdict(dict)
    for key, value in _group(latency_increases, bucket_name, (*row_keys, "le")).items():
        buckets[key[:-1]][float(key[-1])] = buckets[key[:-1]].get(float(key[-1]), 0.0) + value

    budget_name = BUDGET.sample_name
    budget = _group(
        _deltas(before, after, [budget_name]), budget_name, ("model", "variant", "outcome")
    )
    quality = _gauge(after, VARIANT_QUALITY.sample_name, ("model", "variant"), "max")
    agreement = _gauge(after, VARIANT_AGREEMENT.sample_name, ("model", "variant"), "max")
    inflight = _gauge(after, INFLIGHT.sample_name, ("model", "device_class"), "sum")

    with_gauges = set(quality) | set(agreement)
    known = {
        tuple(dict(labels).get(k, "") for k in row_keys)
        for name in (requests_name, bucket_name)
        for labels, _ in after.series(name)
    }
    # Idle rows stay only for variants still reporting gauges (the ones being served).
    shown = {k for k in known | set(buckets) if requests.get(k, 0.0) > 0 or k[:2] in with_gauges}
    shown |= {(*variant, "") for variant in with_gauges if not any(k[:2] == variant for k in shown)}

    model_totals: dict[str, float] = defaultdict(float)
    for (model, _variant, _device), count in requests.items():
        model_totals[model] += count

    rows = []
    for model, variant, device_class in shown:
        count = requests.get((model, variant, device_class), 0.0)
        histogram = buckets.get((model, variant, device_class), {})
        met = budget.get((model, variant, "met"), 0.0)
        missed = budget.get((model, variant, "missed"), 0.0)
        p50, p95 = (histogram_quantile(q, histogram) for q in (0.5, 0.95))
        rows.append(
            TopRow(
                model=model,
                variant=variant,
                device_class=device_class,
                requests=count,
                rate_rps=count / seconds,
                error_share=errors.get((model, variant, device_class), 0.0) / count
                if count > 0
                else None,
                traffic_share=count / model_totals[model] if model_totals[model] > 0 else None,
                p50_ms=None if p50 is None else p50 * 1000.0,
                p95_ms=None if p95 is None else p95 * 1000.0,
                budget_met_share=met / (met + missed) if met + missed > 0 else None,
                agreement=agreement.get((model, variant)),
                quality=quality.get((model, variant)),
                inflight=inflight.get((model, device_class)) if device_class else None,
            )
        )
    return rows


def _sorted(rows: Iterable[TopRow]) -> list[TopRow]:
    return sorted(rows, key=lambda r: (r.model, -r.rate_rps, r.variant, r.device_class))


def _rate(value: float) -> str:
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}"


def _share(value: float | None) -> str:
    return MISSING if value is None else f"{value * 100:.1f}"


def _ms(value: float | None) -> str:
    if value is None:
        return MISSING
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _figure(value: float | None) -> str:
    return MISSING if value is None else f"{value:.3f}"


def _count(value: float | None) -> str:
    return MISSING if value is None else f"{value:g}"


def render(
    rows: Sequence[TopRow], url: str, window_s: float | None, note: str | None = None
) -> Table:
    """The table of ``rows`` sorted by model, then busiest first; ``note`` goes underneath."""
    span = f"last {window_s:.1f} s" if window_s is not None else "waiting for a second scrape"
    table = Table(
        title=f"gearbox top · {url} · {span}",
        title_justify="left",
        caption=note or ("no Gearbox series yet" if not rows else None),
        caption_justify="left",
    )
    table.add_column("model")
    table.add_column("variant")
    table.add_column("device")
    # Two-line headers: the table fits 120 columns without rich folding or cutting them.
    numeric = (
        "req/s", "traffic\n%", "errors\n%", "p50\nms", "p95\nms", "budget\nmet %",
        "agree-\nment", "quality", "in-flight\n(device)¹",
    )  # fmt: skip
    for header in numeric:
        table.add_column(header, justify="right")
    ordered = _sorted(rows)
    for index, row in enumerate(ordered):
        last_of_model = index + 1 == len(ordered) or ordered[index + 1].model != row.model
        table.add_row(
            row.model,
            row.variant,
            row.device_class or MISSING,
            _rate(row.rate_rps),
            _share(row.traffic_share),
            _share(row.error_share),
            _ms(row.p50_ms),
            _ms(row.p95_ms),
            _share(row.budget_met_share),
            _figure(row.agreement),
            _figure(row.quality),
            _count(row.inflight),
            end_section=last_of_model,
        )
    if rows and note is None:
        table.caption = "¹ requests in flight on the model's device class, all variants together"
    return table


def run_top(url: str, interval_s: float, once: bool, console: Console) -> int:
    """Shows the table for ``url``: once after one interval, or refreshed until Ctrl-C."""
    before = scrape(url)
    if once:
        time.sleep(interval_s)
        after = scrape(url)
        console.print(render(window(before, after), url, after.taken_at - before.taken_at))
        return 0
    try:
        with Live(render([], url, None), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval_s)
                try:
                    after = scrape(url)
                except UnavailableError as error:
                    # Keep the last baseline: the next good scrape spans the outage, and a
                    # restarted gateway's counters count as a reset rather than a drop.
                    live.update(render([], url, None, note=error.message), refresh=True)
                    continue
                rows = window(before, after)
                live.update(render(rows, url, after.taken_at - before.taken_at), refresh=True)
                before = after
    except KeyboardInterrupt:
        return 0


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def add_top_parser(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``top`` to the ``gearbox`` command's subcommands."""
    top = subparsers.add_parser(
        "top", help="live table of a running gateway's traffic, latency and budgets"
    )
    top.add_argument(
        "--url",
        default=DEFAULT_URL,
        metavar="URL",
        help="the gateway's Prometheus endpoint (default %(default)s)",
    )
    top.add_argument(
        "--interval",
        type=_interval,
        default=DEFAULT_INTERVAL_S,
        metavar="SECONDS",
        help="seconds between scrapes: each row covers one interval (default %(default)s)",
    )
    top.add_argument(
        "--once",
        action="store_true",
        help="print one table, one interval after starting, and exit "
        "(default: off, refresh until Ctrl-C)",
    )


def run_top_command(args: argparse.Namespace, out: Console, err: Console) -> int:
    """The ``top`` subcommand: an unreachable gateway is one line on ``err`` and exit 1."""
    try:
        return run_top(args.url, args.interval, args.once, out)
    except UnavailableError as error:
        err.print(f"gearbox: error: {error.message}", markup=False, highlight=False, soft_wrap=True)
        return 1
