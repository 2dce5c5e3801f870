"""The Pareto front of a model's variants, and the plot that shows it.

A variant is worth keeping when no other one is at least as good on every objective and better
on one: quality (higher is better), latency p50 at batch 1 (lower) and stored size (lower).
:func:`pareto_front` finds those; :func:`plot_front` draws every variant of a model as quality
against latency, with marker area following stored size, so that a reader sees which variant
buys how much speed for how much quality.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Annotation
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
from matplotlib.transforms import Bbox

from gearbox.compression.errors import InvalidArgumentError
from gearbox.compression.repository import VariantManifest


@dataclass(frozen=True)
class ParetoPoint:
    """One candidate's objectives."""

    name: str
    quality: float
    """Higher is better."""
    latency_ms: float
    """Lower is better."""
    size_bytes: int
    """Lower is better."""

    def dominates(self, other: ParetoPoint) -> bool:
        """At least as good as ``other`` on every objective and better on at least one."""
        at_least_as_good = (
            self.quality >= other.quality
            and self.latency_ms <= other.latency_ms
            and self.size_bytes <= other.size_bytes
        )
        better = (
            self.quality > other.quality
            or self.latency_ms < other.latency_ms
            or self.size_bytes < other.size_bytes
        )
        return at_least_as_good and better


def pareto_front(points: Sequence[ParetoPoint]) -> list[ParetoPoint]:
    """The points no other point dominates, fastest first (then best quality, then smallest).

    Points equal on all three objectives do not dominate one another, so all of them stay.
    """
    front = [p for p in points if not any(other.dominates(p) for other in points)]
    return sorted(front, key=lambda p: (p.latency_ms, -p.quality, p.size_bytes, p.name))


def point_of(manifest: VariantManifest, device_class: str, batch: int = 1) -> ParetoPoint | None:
    """A manifest's objectives on ``device_class`` at ``batch`` rows; None where that pair was
    not profiled."""
    figures = manifest.latency_at(device_class, batch)
    if figures is None:
        return None
    return ParetoPoint(
        name=manifest.variant,
        quality=manifest.quality.value,
        latency_ms=figures["p50"],
        size_bytes=manifest.stored_size,
    )


def first_device_class(manifests: Sequence[VariantManifest]) -> str:
    """The device class profiled first (manifests list their classes in profiling order)."""
    for manifest in manifests:
        for device in manifest.latency_ms:
            return device
    raise InvalidArgumentError("no variant has latency figures to plot")


def _reference(manifests: Sequence[VariantManifest]) -> str | None:
    """The reference variant: the one that has no parent."""
    return next((m.variant for m in manifests if m.parent is None), None)


def _size_text(size_bytes: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.3g} {unit}"
    return f"{size_bytes} B"


_MIN_MARKER_AREA = 40.0
_MAX_MARKER_AREA = 900.0
_LABEL_OFFSETS = ((8, 6), (8, -14), (-8, 6), (-8, -14), (8, 18), (8, -26), (-8, 18), (-8, -26))
"""Where a label may sit relative to its marker, in points, tried in this order."""


def _marker_areas(sizes: Sequence[int]) -> list[float]:
    """Marker area growing with the logarithm of stored size, from the smallest variant's
    ``_MIN_MARKER_AREA`` to the largest's ``_MAX_MARKER_AREA``: compressed variants are often
    a hundred times smaller than the reference, and a linear scale would draw them all alike."""
    low, high = math.log(max(1, min(sizes))), math.log(max(1, max(sizes)))
    if high - low < 1e-9:
        return [_MAX_MARKER_AREA / 2] * len(sizes)
    return [
        _MIN_MARKER_AREA
        + (_MAX_MARKER_AREA - _MIN_MARKER_AREA) * (math.log(max(1, size)) - low) / (high - low)
        for size in sizes
    ]


def _overlap(box: Bbox, others: Sequence[Bbox]) -> float:
    total = 0.0
    for other in others:
        width = min(box.x1, other.x1) - max(box.x0, other.x0)
        height = min(box.y1, other.y1) - max(box.y0, other.y0)
        if width > 0 and height > 0:
            total += width * height
    return total


def _outside(box: Bbox, frame: Bbox) -> float:
    """The area of ``box`` that lies outside ``frame``."""
    return box.width * box.height - _overlap(box, [frame])


def _place_labels(
    figure: Figure,
    axes: Axes,
    labels: Sequence[tuple[str, float, float, str]],
    marker_areas: Sequence[float],
) -> None:
    """Annotate each (text, x, y, colour), choosing for each label the first offset where it
    covers no marker or label already placed and stays inside the axes (else the offset where
    it covers least)."""
    renderer = FigureCanvasAgg(figure).get_renderer()
    frame = axes.get_window_extent(renderer)
    pixels_per_point = figure.dpi / 72.0
    taken: list[Bbox] = []
    for (_, x, y, _), area in zip(labels, marker_areas, strict=True):
        cx, cy = axes.transData.transform((x, y))
        half = 0.5 * area**0.5 * pixels_per_point
        taken.append(Bbox.from_extents(cx - half, cy - half, cx + half, cy + half))
    for text, x, y, colour in labels:
        best: tuple[float, Annotation] | None = None
        for dx, dy in _LABEL_OFFSETS:
            annotation = axes.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                ha="left" if dx > 0 else "right",
                fontsize=8,
                color=colour,
            )
            box = annotation.get_window_extent(renderer)
            cost = _overlap(box, taken) + 4 * _outside(box, frame)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, annotation)
            else:
                annotation.remove()
            if cost == 0.0:
                break
        assert best is not None
        taken.append(best[1].get_window_extent(renderer))


def plot_front(
    manifests: Sequence[VariantManifest],
    path: str | os.PathLike[str],
    device_class: str | None = None,
    batch: int = 1,
    max_accuracy_drop: float | None = None,
) -> Figure:
    """Draw one model's variants as quality against latency p50 and save the PNG at ``path``.

    Latency is the ``batch``-row p50 on ``device_class`` (default: the first profiled one);
    marker area grows with the logarithm of stored size. Every variant is labelled; rejected
    ones are grey; the Pareto front of the ready ones (quality, latency, size) is joined by a
    line, fastest first; the reference (the variant without a parent) is a star.
    ``max_accuracy_drop`` also draws the accuracy gate below the reference's quality. Returns
    the figure.
    """
    if not manifests:
        raise InvalidArgumentError("there are no variants to plot")
    models = sorted({m.model for m in manifests})
    if len(models) > 1:
        raise InvalidArgumentError(f"plot one model at a time, not {', '.join(models)}")
    device = device_class or first_device_class(manifests)
    plotted: list[tuple[VariantManifest, ParetoPoint]] = []
    missing: list[str] = []
    for manifest in manifests:
        point = point_of(manifest, device, batch)
        if point is None:
            missing.append(manifest.variant)
        else:
            plotted.append((manifest, point))
    if not plotted:
        raise InvalidArgumentError(f"no variant was profiled on '{device}' at batch {batch}")
    plotted.sort(key=lambda pair: pair[1].latency_ms)
    reference = _reference(manifests)
    front = pareto_front([point for manifest, point in plotted if manifest.is_ready])
    on_front = {point.name for point in front}

    figure = Figure(figsize=(10, 6.5), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    if len(front) > 1:
        axes.plot(
            [p.latency_ms for p in front],
            [p.quality for p in front],
            color="tab:blue",
            linewidth=1.2,
            linestyle="--",
            zorder=1,
        )
    areas = _marker_areas([point.size_bytes for _, point in plotted])
    drawn_areas: list[float] = []
    labels: list[tuple[str, float, float, str]] = []
    for (manifest, point), area in zip(plotted, areas, strict=True):
        if not manifest.is_ready:
            face, edge, colour = "lightgrey", "grey", "grey"
        elif manifest.variant in on_front:
            face, edge, colour = "tab:blue", "navy", "black"
        else:
            face, edge, colour = "tab:orange", "saddlebrown", "black"
        is_reference = manifest.variant == reference
        drawn_areas.append(area * (1.6 if is_reference else 1.0))
        axes.scatter(
            point.latency_ms,
            point.quality,
            s=drawn_areas[-1],
            marker="*" if is_reference else "o",
            facecolors=face,
            edgecolors=edge,
            alpha=0.85,
            zorder=3 if manifest.is_ready else 2,
        )
        name = f"{manifest.variant} (reference)" if is_reference else manifest.variant
        text = f"{name}, {_size_text(point.size_bytes)}"
        labels.append((text, point.latency_ms, point.quality, colour))

    quality = plotted[0][0].quality
    axes.axhline(quality.reference, color="black", linewidth=0.6, linestyle=":", zorder=0)
    if max_accuracy_drop is not None:
        axes.axhline(
            quality.reference - max_accuracy_drop, color="firebrick", linewidth=0.8, zorder=0
        )
    latencies = [point.latency_ms for _, point in plotted]
    if min(latencies) > 0 and max(latencies) / min(latencies) > 4:
        axes.set_xscale("log")
        axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        axes.xaxis.set_minor_formatter(NullFormatter())
    levels = [point.quality for _, point in plotted] + [quality.reference]
    if max_accuracy_drop is not None:
        levels.append(quality.reference - max_accuracy_drop)
    _pad_axes(axes, latencies, levels)
    axes.set_xlabel(f"latency p50, ms ({device}, batch {batch})")
    axes.set_ylabel(f"held-out {quality.metric}")
    axes.set_title(f"{models[0]}: {quality.metric} vs latency (marker area: log of stored size)")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(handles=_legend(max_accuracy_drop), loc="lower right", fontsize=8)
    if missing:
        note = f"not profiled on {device} at batch {batch}: {', '.join(missing)}"
        figure.text(0.01, 0.005, note, fontsize=7, color="grey")
    _place_labels(figure, axes, labels, drawn_areas)
    figure.savefig(path)
    return figure


def _pad_axes(axes: Axes, latencies: Sequence[float], qualities: Sequence[float]) -> None:
    """Show every marker and quality level, with room around the extremes for labels."""
    low, high = min(qualities), max(qualities)
    span = max(high - low, 0.01)
    axes.set_ylim(low - 0.12 * span, high + 0.12 * span)
    if axes.get_xscale() == "log":
        axes.set_xlim(min(latencies) / 1.6, max(latencies) * 1.6)
    else:
        left, right = min(latencies), max(latencies)
        margin = max(right - left, 0.1 * right, 1e-3) * 0.25
        axes.set_xlim(max(0.0, left - margin), right + margin)


def _legend(max_accuracy_drop: float | None) -> list[Line2D]:
    def marker(label: str, face: str, edge: str, shape: str = "o") -> Line2D:
        return Line2D(
            [],
            [],
            marker=shape,
            linestyle="",
            markerfacecolor=face,
            markeredgecolor=edge,
            markersize=9,
            label=label,
        )

    handles = [
        marker("on the Pareto front (quality, latency, size)", "tab:blue", "navy"),
        marker("ready, dominated", "tab:orange", "saddlebrown"),
        marker("rejected by the accuracy gate", "lightgrey", "grey"),
        marker("reference", "white", "black", "*"),
        Line2D([], [], color="black", linestyle=":", linewidth=0.6, label="reference quality"),
    ]
    if max_accuracy_drop is not None:
        gate = f"accuracy gate (-{max_accuracy_drop:g})"
        handles.append(Line2D([], [], color="firebrick", linewidth=0.8, label=gate))
    return handles


__all__ = ["ParetoPoint", "first_device_class", "pareto_front", "plot_front", "point_of"]
