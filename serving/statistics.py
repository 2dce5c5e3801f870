"""Triton's statistics extension: cumulative inference figures per model and variant.

The figures are this gateway replica's own, since it started (a gateway may run several replicas
behind its ingress, each counting what it answered; Prometheus is the cluster-wide view). A
variant is a model *version* here. They mean what Triton's mean, measured as follows:

- ``inference_count``: rows inferred by requests that succeeded.
- ``execution_count``: ONNX Runtime runs. A batch of several requests runs once, but the data
  plane only sees each request's :class:`~gearbox.serving.executor.BatchResult`, which carries
  the batch's rows (``batch_rows``): each request counts ``rows / batch_rows`` of a run, so the
  requests of one batch add up to exactly one. A batch shared with a request that is not
  recorded (a shadow comparison, a caller who went away) counts only its recorded share, and
  the count reported is that sum rounded.
- ``success`` / ``fail``: requests and their whole span in the gateway, from the arrival stamp
  (:class:`~gearbox.serving.clock.RequestClock`) to the outputs encoded (success) or the error
  (fail). A request that fails before the router chose a variant (a malformed input, say,
  without a pinned version) has no version: its failure is reported in an entry whose version
  is empty, listed with the model's versions once it holds something.
- ``queue``: time the request waited for its batch to start (``BatchResult.queue_s``: waiting
  for a worker and for the batch to fill; 0 for a batch run inline on the event loop).
- ``compute_input``: from arrival until the request is handed to its backend. Gearbox does not
  time decoding, validation, tokenization and the routing decision one by one, so all of them
  are here, and for HTTP under the HAProxy ingress so is reading the body off the connection.
- ``compute_infer``: the wall time of the batch the request ran in (``BatchResult.service_s``:
  merging, the ONNX Runtime run, splitting), as Triton gives each request of a batch the
  batch's time.
- ``compute_output``: from the backend's answer until the adapter has encoded the outputs.
  The hand-back from a worker thread (or a remote device class) to the event loop is in neither
  ``queue`` nor ``compute_*``, only in ``success``.
- ``cache_hit`` / ``cache_miss``: always zero: Gearbox has no response cache.
- ``batch_stats``: per batch size (rows of the run), the runs of that size (counted as
  ``execution_count`` is), their requests' ``compute_input`` and ``compute_output`` summed, and
  their ``compute_infer`` counted once per run.

Everything is recorded from the event loop (never from a worker thread), so nothing locks;
recording a request costs a few attribute and dict updates.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gearbox.serving.executor import BatchResult

NS_PER_S = 1_000_000_000
NS_PER_MS = 1_000_000


@dataclass(frozen=True)
class Duration:
    """Triton's ``StatisticDuration``: how many, and their total nanoseconds."""

    count: int = 0
    ns: int = 0


NO_DURATION = Duration()


@dataclass(frozen=True)
class InferStatistics:
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    cache_hit: Duration = NO_DURATION
    cache_miss: Duration = NO_DURATION


@dataclass(frozen=True)
class BatchStatistics:
    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True)
class ModelStatistics:
    """One model version's figures (Triton's ``ModelStatistics``)."""

    name: str
    version: str
    last_inference: int
    """Milliseconds since the epoch of the last request answered or failed; 0 before any."""
    inference_count: int
    execution_count: int
    inference_stats: InferStatistics
    batch_stats: tuple[BatchStatistics, ...]


class Phases:
    """Where a request's time went up to its backend's answer; stamped when the answer came."""

    __slots__ = ("arrived", "batch_rows", "infer_ns", "input_ns", "queue_ns", "returned", "rows")

    def __init__(self, arrived: float, work_ms: float, result: BatchResult, rows: int) -> None:
        """``arrived``: the request's arrival (``time.perf_counter`` seconds); ``work_ms``: how
        long its backend took; ``rows``: the request's own rows."""
        self.returned = time.perf_counter()
        self.arrived = arrived
        handed = self.returned - work_ms / 1000
        self.input_ns = max(int((handed - arrived) * NS_PER_S), 0)
        self.queue_ns = int(result.queue_s * NS_PER_S)
        self.infer_ns = int(result.service_s * NS_PER_S)
        self.rows = rows
        # A backend that does not say its batch's rows ran this request alone.
        self.batch_rows = max(result.batch_rows, rows, 1)


class _Figures:
    """One model version's running totals (counts of queue and compute_* are successes)."""

    __slots__ = (
        "batches",
        "executions",
        "fail_count",
        "fail_ns",
        "infer_ns",
        "inferences",
        "input_ns",
        "last_inference",
        "output_ns",
        "queue_ns",
        "success_count",
        "success_ns",
    )

    def __init__(self) -> None:
        self.last_inference = 0
        self.inferences = 0
        self.executions = 0.0
        self.success_count = 0
        self.success_ns = 0
        self.fail_count = 0
        self.fail_ns = 0
        self.queue_ns = 0
        self.input_ns = 0
        self.infer_ns = 0
        self.output_ns = 0
        self.batches: dict[int, list[float]] = {}
        """Batch size -> [runs, compute_input ns, compute_infer ns, compute_output ns]."""

    def report(self, model: str, version: str) -> ModelStatistics:
        successes = self.success_count
        return ModelStatistics(
            name=model,
            version=version,
            last_inference=self.last_inference,
            inference_count=self.inferences,
            execution_count=round(self.executions),
            inference_stats=InferStatistics(
                success=Duration(successes, self.success_ns),
                fail=Duration(self.fail_count, self.fail_ns),
                queue=Duration(successes, self.queue_ns),
                compute_input=Duration(successes, self.input_ns),
                compute_infer=Duration(successes, self.infer_ns),
                compute_output=Duration(successes, self.output_ns),
            ),
            batch_stats=tuple(
                BatchStatistics(
                    batch_size=size,
                    compute_input=Duration(round(runs), round(input_ns)),
                    compute_infer=Duration(round(runs), round(infer_ns)),
                    compute_output=Duration(round(runs), round(output_ns)),
                )
                for size, (runs, input_ns, infer_ns, output_ns) in sorted(self.batches.items())
            ),
        )


class Statistics:
    """This replica's figures for the served variants of each model (see the module doc)."""

    def __init__(self, served: Mapping[str, Iterable[str]]) -> None:
        """``served``: each model's served variants; nothing else is ever recorded, so a
        caller naming other models or versions cannot grow the table."""
        self._versions = {model: frozenset(versions) for model, versions in served.items()}
        self._figures = {
            (model, version): _Figures()
            for model, versions in self._versions.items()
            for version in versions
        }

    def serve(self, served: Mapping[str, Iterable[str]]) -> None:
        """Records ``served`` from now on (a repository update); the figures of versions served
        before are kept, as Triton keeps a reloaded model's."""
        self._versions = {model: frozenset(versions) for model, versions in served.items()}
        for model, versions in self._versions.items():
            for version in versions:
                self._figures.setdefault((model, version), _Figures())

    def succeeded(self, model: str, version: str, phases: Phases | None, latency_ms: float) -> None:
        """A request answered by ``version`` whose outputs are encoded ``latency_ms`` after it
        arrived."""
        figures = self._figures.get((model, version))
        if figures is None or phases is None:
            return
        latency_ns = int(latency_ms * NS_PER_MS)
        finished = phases.arrived + latency_ms / 1000
        output_ns = max(int((finished - phases.returned) * NS_PER_S), 0)
        figures.last_inference = time.time_ns() // NS_PER_MS
        figures.inferences += phases.rows
        share = phases.rows / phases.batch_rows
        figures.executions += share
        figures.success_count += 1
        figures.success_ns += latency_ns
        figures.queue_ns += phases.queue_ns
        figures.input_ns += phases.input_ns
        figures.infer_ns += phases.infer_ns
        figures.output_ns += output_ns
        batch = figures.batches.get(phases.batch_rows)
        if batch is None:
            batch = figures.batches[phases.batch_rows] = [0.0, 0.0, 0.0, 0.0]
        batch[0] += share
        batch[1] += phases.input_ns
        batch[2] += phases.infer_ns * share
        batch[3] += output_ns

    def failed(self, model: str, version: str, latency_ms: float) -> None:
        """A request for ``model`` that failed ``latency_ms`` after it arrived; ``version``:
        the variant it was routed or pinned to, empty when it had none yet."""
        versions = self._versions.get(model)
        if versions is None or (version and version not in versions):
            return  # not served: nothing to attribute it to
        figures = self._figures.get((model, version))
        if figures is None:
            figures = self._figures[(model, version)] = _Figures()
        figures.last_inference = time.time_ns() // NS_PER_MS
        figures.fail_count += 1
        figures.fail_ns += int(latency_ms * NS_PER_MS)

    def report(
        self, model: str, versions: Iterable[str], unattributed: bool = False
    ) -> list[ModelStatistics]:
        """The figures of ``versions`` of ``model`` (zeros for one never used); with
        ``unattributed``, also the failures that reached no version, if there were any."""
        reports = [self._figures_of(model, version).report(model, version) for version in versions]
        if unattributed and (model, "") in self._figures:
            reports.append(self._figures[(model, "")].report(model, ""))
        return reports

    def _figures_of(self, model: str, version: str) -> _Figures:
        return self._figures.get((model, version)) or _Figures()


__all__ = [
    "BatchStatistics",
    "Duration",
    "InferStatistics",
    "ModelStatistics",
    "Phases",
    "Statistics",
]
