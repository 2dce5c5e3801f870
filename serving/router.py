"""Where the variant is chosen: the routing rule of DESIGN.md §6.

Per request: candidates are the ready variants on the allowed device classes that meet
``min_quality``. With a latency budget, the highest-quality candidate whose predicted latency
fits wins; if none fits, the fastest answers and ``budget_met`` turns false. Without a budget the
reference variant answers. A ``routing_key`` turns the choice among the fitting candidates into a
sticky A/B assignment. Predicted latency = live service-time estimate x (1 + requests queued
ahead), per variant x device class, seeded from the manifest's profile, plus the gateway's own
measured per-request overhead (the same for every variant, so it never changes the order).

The router runs inside the gateway replica, so choosing costs no extra Ray Serve hop.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from gearbox.compression.errors import InvalidArgumentError, NotFoundError, UnavailableError
from gearbox.serving.inference import ParameterValue

BUDGET_PARAMETER = "latency_budget_ms"
DEVICE_CLASS_PARAMETER = "device_class"
MIN_QUALITY_PARAMETER = "min_quality"
ROUTING_KEY_PARAMETER = "routing_key"
OUTLIER_FACTOR = 2.0


class Reason:
    """Why a variant was chosen; the ``reason`` label of ``gearbox_variant_selected_total``."""

    PINNED = "pinned"
    REFERENCE = "reference"
    WITHIN_BUDGET = "within_budget"
    FASTEST_OVER_BUDGET = "fastest_over_budget"
    ROUTING_KEY = "routing_key"


@dataclass(frozen=True)
class RoutingRequest:
    """The routing parameters of one request, validated."""

    latency_budget_ms: float | None = None
    device_classes: tuple[str, ...] | None = None
    """Allowed device classes; None allows every served class."""
    min_quality: float | None = None
    routing_key: str | None = None

    @classmethod
    def from_parameters(
        cls, parameters: Mapping[str, ParameterValue], known_device_classes: Collection[str]
    ) -> RoutingRequest:
        budget = _number(parameters, BUDGET_PARAMETER)
        if budget is not None and budget <= 0:
            raise InvalidArgumentError(f"parameter {BUDGET_PARAMETER} must be positive")
        min_quality = _number(parameters, MIN_QUALITY_PARAMETER)
        key = parameters.get(ROUTING_KEY_PARAMETER)
        if key is not None and (not isinstance(key, str | int) or isinstance(key, bool)):
            raise InvalidArgumentError(f"parameter {ROUTING_KEY_PARAMETER} must be a string")
        return cls(
            latency_budget_ms=budget,
            device_classes=_device_classes(parameters, known_device_classes),
            min_quality=min_quality,
            routing_key=None if key is None or key == "" else str(key),
        )


def _number(parameters: Mapping[str, ParameterValue], name: str) -> float | None:
    value = parameters.get(name)
    if value is None:
        return None
    # Some clients send every parameter as a string; "2.5" means 2.5, "fast" means nothing.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidArgumentError(
                f"parameter {name} must be a number, got {parameters[name]!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgumentError(f"parameter {name} must be a finite number, got {value!r}")
    return float(value)


def _device_classes(
    parameters: Mapping[str, ParameterValue], known: Collection[str]
) -> tuple[str, ...] | None:
    value = parameters.get(DEVICE_CLASS_PARAMETER)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidArgumentError(
            f"parameter {DEVICE_CLASS_PARAMETER} must be a string such as 'cpu' or 'cpu,gpu'"
        )
    names = tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise InvalidArgumentError(
            f"unknown device class {', '.join(map(repr, unknown)) or repr(value)} "
            f"(known: {', '.join(sorted(known))})"
        )
    return names


@dataclass(frozen=True)
class VariantChoice:
    """What the router knows of a ready variant before any request arrives."""

    variant: str
    quality: float
    is_reference: bool = False


@dataclass(frozen=True)
class Route:
    variant: str
    device_class: str
    predicted_ms: float
    reason: str


class LatencyEstimator:
    """Live service time per (variant, device class): seeded, then an exponential average.

    Service time excludes time spent waiting in the queue; queueing enters the prediction
    through the queue depth instead, so it is not counted twice.
    """

    def __init__(self, smoothing: float = 0.2) -> None:
        if not 0 < smoothing <= 1:
            raise InvalidArgumentError("smoothing must lie in (0, 1]")
        self._smoothing = smoothing
        self._estimates: dict[tuple[str, str], float] = {}

    def seed(self, variant: str, device_class: str, milliseconds: float) -> None:
        self._estimates[(variant, device_class)] = max(milliseconds, 0.0)

    def observe(self, variant: str, device_class: str, milliseconds: float) -> None:
        key = (variant, device_class)
        previous = self._estimates.get(key)
        if previous is None or previous <= 0:
            self._estimates[key] = milliseconds
            return
        # One stall (a GC pause, a noisy neighbour) may at most double a sample's weight:
        # an inflated estimate would keep the router away from the variant, and so from the
        # very measurements that would correct it. A lasting slowdown still gets through.
        sample = min(milliseconds, OUTLIER_FACTOR * previous)
        self._estimates[key] = previous + self._smoothing * (sample - previous)

    def service_ms(self, variant: str, device_class: str) -> float:
        return self._estimates.get((variant, device_class), 0.0)


QueueDepth = Callable[[str, str], int]


class Router:
    """Chooses a (variant, device class) for each request of one model."""

    def __init__(
        self,
        model: str,
        variants: Sequence[VariantChoice],
        device_classes: Sequence[str],
        estimator: LatencyEstimator,
        queue_depth: QueueDepth,
        overhead_ms: Callable[[], float] = lambda: 0.0,
    ) -> None:
        if not variants:
            raise InvalidArgumentError(f"model '{model}' has no ready variant to route to")
        self._model = model
        self._variants = {choice.variant: choice for choice in variants}
        self._device_classes = tuple(device_classes)
        self._estimator = estimator
        self._queue_depth = queue_depth
        self._overhead_ms = overhead_ms

    @property
    def device_classes(self) -> tuple[str, ...]:
        return self._device_classes

    def predicted_ms(self, variant: str, device_class: str) -> float:
        waiting = self._queue_depth(variant, device_class)
        service = self._estimator.service_ms(variant, device_class)
        return self._overhead_ms() + service * (1 + waiting)

    def choose(self, routing: RoutingRequest, pinned: str = "") -> Route:
        devices = self._allowed_devices(routing)
        if pinned:
            if pinned not in self._variants:
                raise NotFoundError(f"variant '{pinned}' of model '{self._model}' is not served")
            return self._fastest([self._option(pinned, d) for d in devices], Reason.PINNED)

        variants = list(self._variants.values())
        if routing.min_quality is not None:
            variants = [v for v in variants if v.quality >= routing.min_quality]
            if not variants:
                best = max(choice.quality for choice in self._variants.values())
                raise InvalidArgumentError(
                    f"no variant of model '{self._model}' reaches {MIN_QUALITY_PARAMETER} "
                    f"{routing.min_quality:g} (best: {best:.4f})"
                )
        options = [self._option(v.variant, d) for v in variants for d in devices]

        if routing.latency_budget_ms is None:
            if routing.routing_key is not None:
                return self._sticky(options, routing.routing_key)
            references = [o for o in options if self._variants[o.variant].is_reference]
            if references:
                return self._fastest(references, Reason.REFERENCE)
            return self._best(options, Reason.REFERENCE)

        fitting = [o for o in options if o.predicted_ms <= routing.latency_budget_ms]
        if not fitting:
            return self._fastest(options, Reason.FASTEST_OVER_BUDGET)
        if routing.routing_key is not None:
            return self._sticky(fitting, routing.routing_key)
        return self._best(fitting, Reason.WITHIN_BUDGET)

    def _allowed_devices(self, routing: RoutingRequest) -> tuple[str, ...]:
        if routing.device_classes is None:
            return self._device_classes
        served = tuple(d for d in routing.device_classes if d in self._device_classes)
        if not served:
            raise UnavailableError(
                f"device class {', '.join(routing.device_classes)} is configured but not served "
                f"now (served: {', '.join(self._device_classes)})"
            )
        return served

    def _option(self, variant: str, device_class: str) -> Route:
        return Route(variant, device_class, self.predicted_ms(variant, device_class), "")

    def _fastest(self, options: Sequence[Route], reason: str) -> Route:
        best = min(options, key=lambda o: (o.predicted_ms, o.variant, o.device_class))
        return _with_reason(best, reason)

    def _best(self, options: Sequence[Route], reason: str) -> Route:
        def rank(option: Route) -> tuple[float, bool, float, str]:
            choice = self._variants[option.variant]
            return (-choice.quality, not choice.is_reference, option.predicted_ms, option.variant)

        return _with_reason(min(options, key=rank), reason)

    def _sticky(self, options: Sequence[Route], key: str) -> Route:
        # Rendezvous hashing: a key keeps its variant as long as that variant stays a candidate,
        # on every replica and across restarts, whatever else joins or leaves the set.
        variant = max({o.variant for o in options}, key=lambda v: _rendezvous_score(key, v))
        return self._fastest([o for o in options if o.variant == variant], Reason.ROUTING_KEY)


def _rendezvous_score(key: str, variant: str) -> int:
    digest = hashlib.sha256(f"{key}\x00{variant}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _with_reason(route: Route, reason: str) -> Route:
    return Route(route.variant, route.device_class, route.predicted_ms, reason)
