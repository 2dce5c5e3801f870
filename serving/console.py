"""Terminal output: progress bars for compression and the variant table."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gearbox.compression.repository import VariantManifest


class RichProgress:
    """One progress bar per job (the reference training and each variant)."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.fields[job]:<16}"),
            BarColumn(bar_width=28),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
        )
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def started(self, jobs: list[str]) -> None:
        for job in jobs:
            self._tasks[job] = self._progress.add_task("queued", total=1.0, job=job)

    def update(self, job: str, stage: str, fraction: float) -> None:
        self._progress.update(self._tasks[job], description=stage, completed=fraction)

    def finished(self, job: str, ok: bool, summary: str) -> None:
        description = summary if ok else f"[red]{summary}"
        self._progress.update(
            self._tasks[job], description=description, completed=1.0 if ok else None
        )
        self._progress.stop_task(self._tasks[job])


def _size(size_bytes: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.2f} {unit}"
    return f"{size_bytes} B"


def _params(count: int) -> str:
    return f"{count / 1e6:.2f} M" if count >= 1e6 else f"{count / 1e3:.1f} k"


def variant_table(model: str, manifests: Sequence[VariantManifest]) -> Table:
    """Variant, technique, status, size, params, quality, agreement, p50/p95 per device class
    (batch 1 and 8); a ``stored`` column after ``size`` where some variant's compressed
    storage (codebook and indices, sparse encoding) differs from its served artifact."""
    device_classes = sorted({d for m in manifests for d in m.latency_ms})
    batch_sizes = sorted({b for m in manifests for d in m.latency_ms.values() for b in d}, key=int)
    metric = manifests[0].quality.metric if manifests else "quality"
    stored = any(m.stored_size != m.size_bytes for m in manifests)
    table = Table(title=f"model {model}", title_justify="left")
    columns = ("variant", "technique", "status", "size", *(("stored",) if stored else ()))
    for column in (*columns, "params", metric, "agreement"):
        table.add_column(
            column, justify="right" if column in ("size", "stored", "params") else "left"
        )
    for device in device_classes:
        for batch in batch_sizes:
            table.add_column(f"{device} b{batch} ms\np50/p95", justify="right")
    # The reference variant (the only one without a parent) first, the rest by name.
    for m in sorted(manifests, key=lambda m: (m.parent is not None, m.variant)):
        status = "ready" if m.is_ready else "[red]rejected[/red]"
        row = [
            m.variant,
            m.technique,
            status,
            _size(m.size_bytes),
            *((_size(m.stored_size),) if stored else ()),
            _params(m.param_count),
            f"{m.quality.value:.4f}",
            f"{m.quality.agreement:.4f}",
        ]
        for device in device_classes:
            for batch in batch_sizes:
                figures = m.latency_ms.get(device, {}).get(batch)
                row.append(f"{figures['p50']:.3f}/{figures['p95']:.3f}" if figures else "-")
        table.add_row(*row)
    return table


def rejected_reasons(manifests: Sequence[VariantManifest]) -> list[str]:
    return [f"{m.variant}: rejected: {m.reason}" for m in manifests if not m.is_ready]


def say(console: Console, text: str) -> None:
    """Print ``text`` as it is: no rich markup, emoji codes, highlighting or wrapping, which
    would change names, JSON or an error line."""
    console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)
