"""The routing rule of DESIGN.md §6: parameters, candidates, budget, predictions, stickiness.

The router is given a ``predict(variant, device_class, rows)`` function (the data plane's
queue model in production); here a table the test sets by hand.
"""

from __future__ import annotations

import pytest

from gearbox.compression.errors import InvalidArgumentError, NotFoundError, UnavailableError
from gearbox.serving.executor import Lane
from gearbox.serving.router import (
    Reason,
    Router,
    RoutingRequest,
    VariantChoice,
)

KNOWN = ("cpu", "gpu")

# quality, is_reference, cpu service ms
FP32 = VariantChoice("fp32", 0.90, is_reference=True)
INT8 = VariantChoice("int8", 0.88)
SMALL = VariantChoice("small", 0.80)
SEEDS = {"fp32": 4.0, "int8": 1.0, "small": 0.25}


class Predictions:
    """A predict function the test sets by hand: ms per (variant, device class), plus ``extra``
    ms per (variant, device class) standing for work queued ahead; records every call."""

    def __init__(self, seeds) -> None:
        self.ms = {
            (variant, device): ms
            for device, by_variant in seeds.items()
            for variant, ms in by_variant.items()
        }
        self.extra: dict[tuple[str, str], float] = {}
        self.priority_extra: dict[str, float] = {}
        """ms queued ahead on a device class's priority lane"""
        self.calls: list[tuple[str, str, int]] = []

    def __call__(
        self,
        variant: str,
        device_class: str,
        rows: int,
        tokens: int | None = None,
        lane: Lane = Lane.STANDARD,
    ) -> float:
        self.calls.append((variant, device_class, rows))
        key = (variant, device_class)
        if lane is Lane.PRIORITY:
            return self.ms[key] + self.priority_extra.get(device_class, 0.0)
        return self.ms[key] + self.extra.get(key, 0.0)


def make_router(
    variants=(FP32, INT8, SMALL),
    seeds=None,
    device_classes=("cpu",),
    predictions=None,
):
    predict = predictions or Predictions(seeds or {"cpu": SEEDS})
    return Router("tiny", list(variants), list(device_classes), predict)


def budget(ms, **extra):
    return RoutingRequest.from_parameters({"latency_budget_ms": ms, **extra}, KNOWN)


# --- RoutingRequest.from_parameters ---------------------------------------------------------


def test_no_parameters_mean_no_constraint():
    routing = RoutingRequest.from_parameters({}, KNOWN)
    assert routing == RoutingRequest(None, None, None, None)


@pytest.mark.parametrize(
    ("value", "expected"), [(5, 5.0), (2.5, 2.5), ("2.5", 2.5), ("10", 10.0), (" 3 ", 3.0)]
)
def test_budget_accepts_numbers_and_numeric_strings(value, expected):
    routing = RoutingRequest.from_parameters({"latency_budget_ms": value}, KNOWN)
    assert routing.latency_budget_ms == expected
    assert isinstance(routing.latency_budget_ms, float)


@pytest.mark.parametrize("value", ["fast", "", "1ms", "nan", "inf"])
def test_non_numeric_budget_names_the_parameter(value):
    with pytest.raises(InvalidArgumentError, match="latency_budget_ms"):
        RoutingRequest.from_parameters({"latency_budget_ms": value}, KNOWN)


@pytest.mark.parametrize("value", [0, -1, -0.5, "0", "-3"])
def test_budget_must_be_positive(value):
    with pytest.raises(InvalidArgumentError, match="latency_budget_ms must be positive"):
        RoutingRequest.from_parameters({"latency_budget_ms": value}, KNOWN)


@pytest.mark.parametrize("name", ["latency_budget_ms", "min_quality"])
@pytest.mark.parametrize("value", [True, False])
def test_booleans_are_not_numbers(name, value):
    with pytest.raises(InvalidArgumentError, match=name):
        RoutingRequest.from_parameters({name: value}, KNOWN)


def test_min_quality_is_read_as_a_number():
    assert RoutingRequest.from_parameters({"min_quality": "0.85"}, KNOWN).min_quality == 0.85
    with pytest.raises(InvalidArgumentError, match="min_quality"):
        RoutingRequest.from_parameters({"min_quality": "high"}, KNOWN)


def test_device_class_lists_are_split_trimmed_and_deduplicated():
    routing = RoutingRequest.from_parameters({"device_class": " gpu, cpu,gpu,"}, KNOWN)
    assert routing.device_classes == ("gpu", "cpu")
    assert RoutingRequest.from_parameters({"device_class": "cpu"}, KNOWN).device_classes == ("cpu",)
    assert RoutingRequest.from_parameters({"device_class": ""}, KNOWN).device_classes is None


def test_unknown_device_class_lists_the_known_ones():
    with pytest.raises(InvalidArgumentError) as caught:
        RoutingRequest.from_parameters({"device_class": "cpu,tpu"}, KNOWN)
    message = str(caught.value)
    assert "'tpu'" in message
    assert "known: cpu, gpu" in message


@pytest.mark.parametrize("value", [",", 3, True])
def test_device_class_must_name_something(value):
    with pytest.raises(InvalidArgumentError, match=r"device.class"):
        RoutingRequest.from_parameters({"device_class": value}, KNOWN)


def test_routing_key_is_a_string():
    assert RoutingRequest.from_parameters({"routing_key": "user-7"}, KNOWN).routing_key == "user-7"
    assert RoutingRequest.from_parameters({"routing_key": 42}, KNOWN).routing_key == "42"
    assert RoutingRequest.from_parameters({"routing_key": ""}, KNOWN).routing_key is None
    for bad in (True, 1.5):
        with pytest.raises(InvalidArgumentError, match="routing_key"):
            RoutingRequest.from_parameters({"routing_key": bad}, KNOWN)


# --- Router.choose -------------------------------------------------------------------------


def test_generous_budget_gets_the_highest_quality():
    route = make_router().choose(budget(1000))
    assert (route.variant, route.device_class, route.reason) == ("fp32", "cpu", "within_budget")
    assert route.predicted_ms == 4.0


def test_quality_tie_goes_to_the_reference_then_to_the_faster():
    twin = VariantChoice("fp32-twin", 0.90)
    faster_twin = VariantChoice("fast-twin", 0.90)
    seeds = {"cpu": {"fp32": 4.0, "fp32-twin": 0.5, "fast-twin": 0.4}}
    router = make_router([twin, FP32, faster_twin], seeds)
    assert router.choose(budget(1000)).variant == "fp32"

    no_reference = make_router([twin, faster_twin], seeds)
    assert no_reference.choose(budget(1000)).variant == "fast-twin"


def test_tight_budget_gets_the_fastest_over_budget():
    route = make_router().choose(budget(0.01))
    assert (route.variant, route.reason) == ("small", Reason.FASTEST_OVER_BUDGET)
    assert route.predicted_ms == 0.25


@pytest.mark.parametrize(
    ("ms", "variant"), [(4.0, "fp32"), (3.99, "int8"), (1.0, "int8"), (0.5, "small")]
)
def test_middle_budget_gets_the_best_that_fits(ms, variant):
    route = make_router().choose(budget(ms))
    assert (route.variant, route.reason) == (variant, Reason.WITHIN_BUDGET)


def test_no_budget_gets_the_reference():
    route = make_router().choose(RoutingRequest())
    assert (route.variant, route.reason) == ("fp32", "reference")


def test_no_budget_and_no_reference_gets_the_best_quality():
    route = make_router([INT8, SMALL]).choose(RoutingRequest())
    assert (route.variant, route.reason) == ("int8", Reason.HIGHEST_QUALITY)


def test_no_budget_and_min_quality_above_the_reference_gets_the_best_quality():
    better = VariantChoice("distilled", 0.95)
    seeds = {"cpu": {**SEEDS, "distilled": 9.0}}
    router = make_router([FP32, INT8, better], seeds)
    route = router.choose(RoutingRequest(min_quality=0.92))
    assert (route.variant, route.reason) == ("distilled", Reason.HIGHEST_QUALITY)
    # With the reference among the candidates, it answers (even though a better one exists).
    route = router.choose(RoutingRequest(min_quality=0.9))
    assert (route.variant, route.reason) == ("fp32", Reason.REFERENCE)


def test_highest_quality_ties_go_to_the_faster():
    twin = VariantChoice("twin", 0.88)
    seeds = {"cpu": {**SEEDS, "twin": 0.5}}
    route = make_router([INT8, twin, SMALL], seeds).choose(RoutingRequest())
    assert (route.variant, route.reason) == ("twin", Reason.HIGHEST_QUALITY)


def test_pinned_variant_is_served_whatever_the_budget():
    route = make_router().choose(budget(0.01), pinned="int8")
    assert (route.variant, route.reason) == ("int8", Reason.PINNED)
    assert make_router().choose(RoutingRequest(), pinned="small").variant == "small"


def test_unknown_pinned_variant_is_not_found():
    with pytest.raises(NotFoundError, match="'pruned'"):
        make_router().choose(RoutingRequest(), pinned="pruned")


def test_min_quality_filters_the_candidates():
    router = make_router()
    floor = RoutingRequest.from_parameters({"latency_budget_ms": 0.01, "min_quality": 0.85}, KNOWN)
    route = router.choose(floor)
    assert (route.variant, route.reason) == ("int8", Reason.FASTEST_OVER_BUDGET)
    within = RoutingRequest.from_parameters({"latency_budget_ms": 2, "min_quality": 0.8}, KNOWN)
    assert router.choose(within).variant == "int8"
    # Without a budget the reference answers when it qualifies...
    assert router.choose(RoutingRequest(min_quality=0.85)).variant == "fp32"
    # ... and the best qualifying variant when it does not.
    no_reference = make_router([INT8, SMALL])
    route = no_reference.choose(RoutingRequest(min_quality=0.5))
    assert (route.variant, route.reason) == ("int8", Reason.HIGHEST_QUALITY)


def test_unreachable_min_quality_is_invalid_and_says_the_best():
    with pytest.raises(InvalidArgumentError, match=r"min_quality 0\.99 \(best: 0\.9000\)"):
        make_router().choose(RoutingRequest(min_quality=0.99))


def test_work_ahead_raises_the_prediction_until_a_loaded_variant_no_longer_fits():
    predictions = Predictions({"cpu": SEEDS})
    router = make_router(predictions=predictions)
    assert router.choose(budget(5)).variant == "fp32"

    predictions.extra[("fp32", "cpu")] = 4.0  # one batch ahead: 4 ms + 4 ms
    assert router.predicted_ms("fp32", "cpu") == 8.0
    route = router.choose(budget(5))
    assert (route.variant, route.predicted_ms) == ("int8", 1.0)

    predictions.extra[("int8", "cpu")] = 9.0
    assert router.choose(budget(5)).variant == "small"

    predictions.extra.clear()
    assert router.choose(budget(5)).variant == "fp32"


def test_work_ahead_also_decides_the_fastest_over_budget():
    predictions = Predictions({"cpu": SEEDS})
    predictions.extra[("small", "cpu")] = 1.75  # 2 ms: slower than int8
    route = make_router(predictions=predictions).choose(budget(0.01))
    assert (route.variant, route.predicted_ms) == ("int8", 1.0)


def test_a_variant_faster_than_profiled_is_chosen_once_predicted_so():
    predictions = Predictions({"cpu": SEEDS})
    router = make_router(predictions=predictions)
    assert router.choose(budget(2)).variant == "int8"
    predictions.ms[("fp32", "cpu")] = 1.5  # live measurements: the reference is faster
    assert router.choose(budget(2)).variant == "fp32"


def test_every_candidate_is_predicted_at_the_request_rows():
    predictions = Predictions({"cpu": SEEDS, "gpu": SEEDS})
    router = make_router(predictions=predictions, device_classes=("cpu", "gpu"))
    router.choose(budget(2), rows=3)
    assert sorted(predictions.calls) == sorted(
        (variant, device, 3) for variant in SEEDS for device in ("cpu", "gpu")
    )
    predictions.calls.clear()
    router.choose(RoutingRequest(), pinned="int8", rows=5)
    assert sorted(predictions.calls) == [("int8", "cpu", 5), ("int8", "gpu", 5)]
    predictions.calls.clear()
    router.choose(RoutingRequest.from_parameters({"device_class": "gpu"}, KNOWN))
    assert {device for _, device, _ in predictions.calls} == {"gpu"}
    assert {rows for *_, rows in predictions.calls} == {1}
    assert router.predicted_ms("small", "gpu", 7) == 0.25
    assert predictions.calls[-1] == ("small", "gpu", 7)


# --- sticky routing ------------------------------------------------------------------------


def test_routing_key_is_sticky():
    router = make_router()
    keyed = {
        key: router.choose(RoutingRequest(latency_budget_ms=1000, routing_key=key))
        for key in (f"user-{i}" for i in range(60))
    }
    for key, route in keyed.items():
        assert route.reason == Reason.ROUTING_KEY
        again = router.choose(RoutingRequest(latency_budget_ms=1000, routing_key=key))
        assert again.variant == route.variant
    # An A/B split, not everyone on one variant.
    assert len({route.variant for route in keyed.values()}) > 1


def test_routing_key_only_picks_among_variants_that_fit():
    router = make_router()
    for i in range(30):
        route = router.choose(RoutingRequest(latency_budget_ms=2, routing_key=f"user-{i}"))
        assert route.variant in {"int8", "small"}


def test_routing_key_without_budget_chooses_among_all_variants():
    router = make_router()
    chosen = {router.choose(RoutingRequest(routing_key=f"k{i}")).variant for i in range(60)}
    assert chosen == {"fp32", "int8", "small"}


def test_removing_a_variant_that_was_not_chosen_keeps_the_assignment():
    full = make_router()
    for i in range(40):
        key = f"user-{i}"
        routing = RoutingRequest(latency_budget_ms=1000, routing_key=key)
        chosen = full.choose(routing).variant
        others = [v for v in (FP32, INT8, SMALL) if v.variant != chosen]
        for removed in others:
            remaining = [v for v in (FP32, INT8, SMALL) if v is not removed]
            assert make_router(remaining).choose(routing).variant == chosen


# --- device classes ------------------------------------------------------------------------


def test_configured_but_not_served_device_class_is_unavailable():
    routing = RoutingRequest.from_parameters({"device_class": "gpu"}, KNOWN)
    with pytest.raises(UnavailableError, match="gpu"):
        make_router().choose(routing)
    with pytest.raises(UnavailableError):
        make_router().choose(routing, pinned="fp32")


def test_the_faster_device_class_answers_for_a_variant():
    seeds = {"cpu": SEEDS, "gpu": {"fp32": 0.5, "int8": 2.0, "small": 0.1}}
    router = make_router(seeds=seeds, device_classes=("cpu", "gpu"))
    route = router.choose(RoutingRequest())
    assert (route.variant, route.device_class, route.predicted_ms) == ("fp32", "gpu", 0.5)
    assert router.choose(RoutingRequest(), pinned="int8").device_class == "cpu"
    # A budget only fp32-on-gpu and small meet: the higher quality wins, on the class that fits.
    route = router.choose(budget(0.6))
    assert (route.variant, route.device_class) == ("fp32", "gpu")


def test_device_class_parameter_restricts_the_classes():
    seeds = {"cpu": SEEDS, "gpu": {"fp32": 0.5, "int8": 2.0, "small": 0.1}}
    router = make_router(seeds=seeds, device_classes=("cpu", "gpu"))
    cpu_only = RoutingRequest.from_parameters({"device_class": "cpu"}, KNOWN)
    assert router.choose(cpu_only).device_class == "cpu"
    route = router.choose(
        RoutingRequest.from_parameters({"device_class": "cpu", "latency_budget_ms": 0.6}, KNOWN)
    )
    assert (route.variant, route.device_class) == ("small", "cpu")


def test_a_queue_on_one_device_class_moves_the_variant_to_the_other():
    predictions = Predictions({"cpu": SEEDS, "gpu": {"fp32": 1.0, "int8": 1.0, "small": 1.0}})
    router = make_router(predictions=predictions, device_classes=("cpu", "gpu"))
    assert router.choose(RoutingRequest(), pinned="small").device_class == "cpu"
    predictions.extra[("small", "cpu")] = 2.5  # ten requests queued ahead on cpu
    assert router.choose(RoutingRequest(), pinned="small").device_class == "gpu"


def test_a_router_needs_a_variant():
    with pytest.raises(InvalidArgumentError, match="no ready variant"):
        make_router(variants=())


# --- margins: a prediction must leave room for its usual error ------------------------------


def test_a_variant_fits_only_if_its_margin_fits_too():
    """fp32 is predicted at 4 ms; with 1.5 ms of margin a 5 ms budget no longer fits it."""
    margins = {"fp32": 1.5, "int8": 0.5, "small": 0.1}
    router = Router(
        "tiny",
        [FP32, INT8, SMALL],
        ["cpu"],
        Predictions({"cpu": SEEDS}),
        lambda variant, device: margins[variant],
    )
    assert router.choose(budget(5.5)).variant == "fp32"
    chosen = router.choose(budget(5.0))
    assert (chosen.variant, chosen.reason) == ("int8", Reason.WITHIN_BUDGET)
    assert chosen.predicted_ms == 1.0  # the typical prediction, margin apart
    over = router.choose(budget(0.3))
    assert (over.variant, over.reason) == ("small", Reason.FASTEST_OVER_BUDGET)


# --- the priority lane: a worker kept free for budgets the standard lane cannot meet ----------


def priority_router(predictions: Predictions, device_classes=("cpu",), priority_lanes=("cpu",)):
    return Router(
        "tiny",
        [FP32, INT8, SMALL],
        list(device_classes),
        predictions,
        priority_lanes=priority_lanes,
    )


def behind_a_long_batch() -> Predictions:
    """Every variant on cpu's standard lane predicted 10 ms later: a long batch runs there."""
    predictions = Predictions({"cpu": SEEDS})
    predictions.extra = {(v, "cpu"): 10.0 for v in SEEDS}
    return predictions


def test_budgets_the_standard_lane_meets_stay_on_it():
    router = priority_router(Predictions({"cpu": SEEDS}))
    for ms in (5.0, 2.0, 0.5):
        assert router.choose(budget(ms)).lane is Lane.STANDARD
    assert router.choose(RoutingRequest()).lane is Lane.STANDARD
    assert router.choose(budget(0.1)).reason == Reason.FASTEST_OVER_BUDGET


def test_a_tight_budget_behind_a_long_batch_goes_to_the_priority_lane_with_the_fastest():
    """A 10 ms batch of fp32 runs on the standard lane: every variant there is predicted 10 ms
    later. A 3 ms budget then goes to the priority lane, and there only the fastest runs, though
    int8 (1 ms) would fit on it too: a slower variant would hold the worker kept free."""
    predictions = behind_a_long_batch()
    router = priority_router(predictions)
    chosen = router.choose(budget(3.0))
    assert (chosen.variant, chosen.lane, chosen.reason) == (
        "small",
        Lane.PRIORITY,
        Reason.PRIORITY_LANE,
    )
    assert chosen.predicted_ms == 0.25
    # A loose budget still waits for the standard lane, with the best variant that fits there.
    loose = router.choose(budget(20.0))
    assert (loose.variant, loose.lane) == ("fp32", Lane.STANDARD)
    # Without a budget the reference answers on the standard lane, however long it waits.
    assert router.choose(RoutingRequest()).lane is Lane.STANDARD


def test_when_neither_lane_meets_a_budget_the_quicker_answers_over_budget():
    predictions = behind_a_long_batch()
    predictions.priority_extra = {"cpu": 2.0}
    router = priority_router(predictions)
    chosen = router.choose(budget(1.0))
    assert (chosen.variant, chosen.lane, chosen.reason) == (
        "small",
        Lane.PRIORITY,
        Reason.FASTEST_OVER_BUDGET,
    )
    predictions.priority_extra = {"cpu": 20.0}
    chosen = router.choose(budget(1.0))
    assert (chosen.lane, chosen.reason) == (Lane.STANDARD, Reason.FASTEST_OVER_BUDGET)


def test_only_device_classes_with_a_priority_lane_offer_one():
    predictions = Predictions({"cpu": SEEDS, "gpu": SEEDS})
    predictions.extra = {(v, d): 10.0 for v in SEEDS for d in ("cpu", "gpu")}
    router = priority_router(predictions, device_classes=("cpu", "gpu"), priority_lanes=("cpu",))
    chosen = router.choose(budget(3.0))
    assert (chosen.device_class, chosen.lane) == ("cpu", Lane.PRIORITY)
    gpu_only = router.choose(budget(3.0, device_class="gpu"))
    assert (gpu_only.device_class, gpu_only.lane, gpu_only.reason) == (
        "gpu",
        Lane.STANDARD,
        Reason.FASTEST_OVER_BUDGET,
    )
    without = priority_router(predictions, priority_lanes=())
    assert without.choose(budget(3.0)).reason == Reason.FASTEST_OVER_BUDGET


def test_the_priority_lane_respects_min_quality():
    predictions = behind_a_long_batch()
    router = priority_router(predictions)
    chosen = router.choose(budget(3.0, min_quality=0.85))
    assert (chosen.variant, chosen.lane, chosen.reason) == (
        "int8",
        Lane.PRIORITY,
        Reason.PRIORITY_LANE,
    )
