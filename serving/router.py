"""Where the variant is chosen: the routing rule of DESIGN.md §6.

Per request: candidates are the ready variants on the allowed device classes that meet
``min_quality``. With a latency budget, the highest-quality candidate whose predicted latency
fits wins. A prediction fits when it leaves room for its margin: the error such predictions
make at a high quantile, plus any allowance for the transport outside the budget's clock. If
none fits, the fastest answers and ``budget_met`` turns false. Without a budget the reference
variant answers. A ``routing_key`` turns the choice among the fitting candidates into a sticky
A/B assignment. Predicted latency comes from :mod:`gearbox.serving.queue_model`: the work
queued ahead on the executor the request would use, its own service time at its batch size,
and the gateway's measured per-request overhead.

Candidates run on a device class's standard lane. Where that lane cannot meet a budget just
then (a long batch is running, requests queue), a device class hosted in this replica offers
its priority lane (:class:`~gearbox.serving.executor.Lane`): a worker kept free for such
requests, which runs only the fastest variant. A request sent there gets the fastest
variant's quality, and no slow variant ever occupies the worker a tight budget needs.

The router runs inside the gateway replica, so choosing costs no extra Ray Serve hop.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from gearbox.compression.errors import InvalidArgumentError, NotFoundError, UnavailableError
from gearbox.serving.executor import Lane
from gearbox.serving.inference import ParameterValue

BUDGET_PARAMETER = "latency_budget_ms"
DEVICE_CLASS_PARAMETER = "device_class"
MIN_QUALITY_PARAMETER = "min_quality"
ROUTING_KEY_PARAMETER = "routing_key"
REQUEST_PARAMETERS = frozenset(
    {BUDGET_PARAMETER, DEVICE_CLASS_PARAMETER, MIN_QUALITY_PARAMETER, ROUTING_KEY_PARAMETER}
)
"""The request parameters the router reads."""


class Reason:
    """Why a variant was chosen; the ``reason`` label of ``gearbox_variant_selected_total``."""

    PINNED = "pinned"
    EXPERIMENT = "experiment"
    """An A/B experiment's arm chose the variant (the ``arm`` label says which)."""
    REFERENCE = "reference"
    HIGHEST_QUALITY = "highest_quality"
    """No budget, and ``min_quality`` (or the device classes) left the reference out."""
    WITHIN_BUDGET = "within_budget"
    PRIORITY_LANE = "priority_lane"
    """No variant fitted on the standard lane; the fastest fits on the priority lane."""
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
    lane: Lane = Lane.STANDARD


Predict = Callable[..., float]
"""``predict(variant, device_class, rows, tokens[, lane])``: predicted latency in ms of a
request of ``rows`` rows (and, for a text model, ``tokens`` tokens; None: its usual length) for
(variant, device class), on its standard lane unless ``lane`` says otherwise."""

Margin = Callable[[str, str], float]
"""How much room (ms) a budget must leave beyond (variant, device class)'s prediction."""


def no_margin(variant: str, device_class: str) -> float:
    return 0.0


class Router:
    """Chooses a (variant, device class) for each request of one model."""

    def __init__(
        self,
        model: str,
        variants: Sequence[VariantChoice],
        device_classes: Sequence[str],
        predict: Predict,
        margin: Margin = no_margin,
        priority_lanes: Collection[str] = (),
    ) -> None:
        """``priority_lanes``: the device classes that have a priority lane."""
        if not variants:
            raise InvalidArgumentError(f"model '{model}' has no ready variant to route to")
        self._model = model
        self._variants = {choice.variant: choice for choice in variants}
        self._device_classes = tuple(device_classes)
        self._priority_lanes = frozenset(priority_lanes)
        self._predict = predict
        self._margin = margin

    @property
    def device_classes(self) -> tuple[str, ...]:
        return self._device_classes

    def predicted_ms(
        self, variant: str, device_class: str, rows: int = 1, tokens: int | None = None
    ) -> float:
        return self._predict(variant, device_class, rows, tokens)

    def choose(
        self,
        routing: RoutingRequest,
        pinned: str = "",
        rows: int = 1,
        tokens: int | None = None,
        pinned_reason: str = Reason.PINNED,
    ) -> Route:
        """``pinned``: the variant to run (on its fastest allowed device class), counted with
        ``pinned_reason``; otherwise the routing rule of DESIGN.md §6 chooses."""
        devices = self._allowed_devices(routing)
        if pinned:
            if pinned not in self._variants:
                raise NotFoundError(f"variant '{pinned}' of model '{self._model}' is not served")
            return self._fastest(
                [self._option(pinned, d, rows, tokens) for d in devices], pinned_reason
            )

        variants = list(self._variants.values())
        if routing.min_quality is not None:
            variants = [v for v in variants if v.quality >= routing.min_quality]
            if not variants:
                best = max(choice.quality for choice in self._variants.values())
                raise InvalidArgumentError(
                    f"no variant of model '{self._model}' reaches {MIN_QUALITY_PARAMETER} "
                    f"{routing.min_quality:g} (best: {best:.4f})"
                )
        options = [self._option(v.variant, d, rows, tokens) for v in variants for d in devices]

        if routing.latency_budget_ms is None:
            if routing.routing_key is not None:
                return self._sticky(options, routing.routing_key)
            references = [o for o in options if self._variants[o.variant].is_reference]
            if references:
                return self._fastest(references, Reason.REFERENCE)
            return self._best(options, Reason.HIGHEST_QUALITY)

        budget = routing.latency_budget_ms
        fitting = [o for o in options if self._fits(o, budget)]
        if fitting:
            if routing.routing_key is not None:
                return self._sticky(fitting, routing.routing_key)
            return self._best(fitting, Reason.WITHIN_BUDGET)
        priority = self._priority_option(variants, devices, rows, tokens)
        if priority is not None and self._fits(priority, budget):
            return _with_reason(priority, Reason.PRIORITY_LANE)
        over = options if priority is None else [*options, priority]
        return self._fastest(over, Reason.FASTEST_OVER_BUDGET)

    def _fits(self, option: Route, budget: float) -> bool:
        return option.predicted_ms + self._margin(option.variant, option.device_class) <= budget

    def _priority_option(
        self,
        variants: Sequence[VariantChoice],
        devices: Sequence[str],
        rows: int,
        tokens: int | None,
    ) -> Route | None:
        """The fastest variant on the quickest priority lane among ``devices``, if any has one."""
        options = [
            Route(
                v.variant,
                device,
                self._predict(v.variant, device, rows, tokens, Lane.PRIORITY),
                "",
                Lane.PRIORITY,
            )
            for v in variants
            for device in devices
            if device in self._priority_lanes
        ]
        if not options:
            return None
        return min(options, key=lambda o: (o.predicted_ms, o.variant, o.device_class))

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

    def _option(self, variant: str, device_class: str, rows: int, tokens: int | None) -> Route:
        return Route(variant, device_class, self._predict(variant, device_class, rows, tokens), "")

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
    return Route(route.variant, route.device_class, route.predicted_ms, reason, route.lane)
