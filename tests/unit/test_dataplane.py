"""The data plane on a real tiny repository: routing, validation, metrics, shadow, metadata."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gearbox.compression.devices import DeviceClass
from gearbox.compression.errors import (
    IntegrityError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from gearbox.compression.repository import ARTIFACT_FILE
from gearbox.serving.config import BatchingConfig
from gearbox.serving.dataplane import Catalog, DataPlane
from gearbox.serving.hosting import LocalBackend
from gearbox.serving.inference import InferRequest, RequestedOutput, Tensor
from tests.unit.serving_fixtures import (
    BROKEN_MODEL,
    FASTEST,
    INPUT,
    MODEL,
    OFFLINE_AGREEMENT,
    OUTPUT,
    READY,
    REFERENCE,
    REJECTED,
    SEEDED_MS,
    VARIANTS,
    RecordingMetrics,
    images,
    infer_request,
    publish_tiny_repository,
    run,
    run_artifact,
    serve,
    until,
)

# --- answers -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", READY)
def test_pinned_variant_answers_as_its_artifact_does(served, variant):
    data = images(3, seed=5)
    response = run(served.plane.infer(infer_request(data, version=variant)))
    assert response.model == MODEL
    assert response.version == variant
    [output] = response.outputs
    assert output.name == OUTPUT
    assert output.datatype == "FP32"
    assert output.shape == (3, 10)
    expected = run_artifact(served.repository, variant, data)
    np.testing.assert_allclose(output.data, expected, rtol=1e-5, atol=1e-6)
    # Every variant has its own weights: the answer shows which one ran.
    for other in READY:
        if other != variant:
            assert not np.allclose(output.data, run_artifact(served.repository, other, data))
    assert response.parameters["variant"] == variant
    assert response.parameters["device_class"] == "cpu"
    assert served.metrics.selections == [(MODEL, variant, "pinned")]


def test_response_parameters_describe_the_route(served):
    request = InferRequest(
        model=MODEL, inputs=(Tensor(INPUT, images(1)),), id="request-7", protocol="grpc"
    )
    response = run(served.plane.infer(request))
    assert response.id == "request-7"
    parameters = response.parameters
    assert set(parameters) == {
        "variant",
        "device_class",
        "predicted_latency_ms",
        "latency_ms",
        "budget_met",
    }
    assert parameters["variant"] == REFERENCE == response.version
    assert parameters["device_class"] == "cpu"
    assert parameters["predicted_latency_ms"] == SEEDED_MS[REFERENCE]  # the manifest's p50
    assert isinstance(parameters["latency_ms"], float)
    assert parameters["latency_ms"] > 0
    assert parameters["budget_met"] is True
    assert served.metrics.requests == [(MODEL, REFERENCE, "cpu", "grpc", "ok")]


def test_no_budget_gets_the_reference(served):
    response = run(served.plane.infer(infer_request()))
    assert response.version == REFERENCE
    assert served.metrics.selections == [(MODEL, REFERENCE, "reference")]
    assert served.metrics.budgets == []  # no budget, no budget outcome


def test_generous_budget_gets_the_best_quality_and_meets_it(served):
    response = run(served.plane.infer(infer_request(latency_budget_ms=1e6)))
    assert response.version == REFERENCE
    assert response.parameters["budget_met"] is True
    assert served.metrics.selections == [(MODEL, REFERENCE, "within_budget")]
    assert served.metrics.budgets == [(MODEL, REFERENCE, True)]


def test_tiny_budget_gets_the_fastest_and_is_missed(served):
    response = run(served.plane.infer(infer_request(latency_budget_ms=1e-6)))
    assert response.version == FASTEST
    assert response.parameters["budget_met"] is False
    assert response.parameters["predicted_latency_ms"] == SEEDED_MS[FASTEST]
    assert served.metrics.selections == [(MODEL, FASTEST, "fastest_over_budget")]
    assert served.metrics.budgets == [(MODEL, FASTEST, False)]


def test_a_middle_budget_gets_the_best_variant_predicted_to_fit(served):
    # fp32 is seeded at 4 ms, int8 at 1 ms: a 2 ms budget excludes only fp32.
    response = run(served.plane.infer(infer_request(latency_budget_ms="2")))
    assert response.version == "int8"
    assert served.metrics.selections == [(MODEL, "int8", "within_budget")]


def test_min_quality_narrows_the_choice(served):
    response = run(served.plane.infer(infer_request(latency_budget_ms=1e-6, min_quality=0.85)))
    assert response.version == "int8"


def test_the_rejected_variant_is_never_routed_to(served):
    # It would win on quality and on speed if it were a candidate.
    async def main():
        versions = set()
        for parameters in ({}, {"latency_budget_ms": 1e6}, {"latency_budget_ms": 1e-6}):
            response = await served.plane.infer(infer_request(**parameters))
            versions.add(response.version)
        return versions

    assert REJECTED not in run(main())


def test_concurrent_requests_are_batched_and_answered_separately(served):
    rows = [images(1, seed=i) for i in range(4)]

    async def main():
        return await asyncio.gather(
            *(served.plane.infer(infer_request(r, version=REFERENCE)) for r in rows)
        )

    responses = run(main())
    for data, response in zip(rows, responses, strict=True):
        expected = run_artifact(served.repository, REFERENCE, data)
        np.testing.assert_allclose(response.outputs[0].data, expected, rtol=1e-5, atol=1e-6)
    batches = [rows for model, variant, device, rows in served.metrics.batches]
    assert sum(batches) == 4
    assert all(batch[:3] == (MODEL, REFERENCE, "cpu") for batch in served.metrics.batches)


# --- errors --------------------------------------------------------------------------------


def test_rejected_version_is_not_found_and_says_rejected(served):
    with pytest.raises(NotFoundError, match=r"'pruned'.*rejected.*agreement 0\.41"):
        run(served.plane.infer(infer_request(version=REJECTED)))
    assert served.metrics.codes() == ["not_found"]


@pytest.mark.parametrize(
    ("model", "version", "match"),
    [
        ("nope", "", r"model 'nope' not found \(served models: broken, tiny\)"),
        (MODEL, "int4", r"variant 'int4'.*\(ready variants: fp32, int8, small\)"),
    ],
)
def test_unknown_model_or_version_is_not_found(served, model, version, match):
    with pytest.raises(NotFoundError, match=match):
        run(served.plane.infer(infer_request(model=model, version=version)))
    assert served.metrics.codes() == ["not_found"]


def test_a_model_without_ready_variants_is_unavailable(served):
    with pytest.raises(UnavailableError, match="no ready variant"):
        run(served.plane.infer(infer_request(model=BROKEN_MODEL)))
    assert served.metrics.codes() == ["unavailable"]


def test_configured_but_unserved_device_class_is_unavailable(tiny_repository):
    served = serve(tiny_repository, configured=("cpu", "gpu"))
    with pytest.raises(UnavailableError, match="gpu"):
        run(served.plane.infer(infer_request(device_class="gpu")))
    response = run(served.plane.infer(infer_request(device_class="cpu,gpu")))
    assert response.parameters["device_class"] == "cpu"


def test_device_class_outside_the_configuration_is_invalid(served):
    with pytest.raises(InvalidArgumentError, match=r"'gpu' \(known: cpu\)"):
        run(served.plane.infer(infer_request(device_class="gpu")))


GOOD = images(2)


def _request(*tensors, outputs=()):
    return InferRequest(model=MODEL, inputs=tensors, outputs=outputs)


MALFORMED = {
    "wrong datatype": (
        _request(Tensor(INPUT, GOOD.astype(np.float64))),
        r"input 'images' has datatype FP64, the model expects FP32",
    ),
    "wrong shape": (
        _request(Tensor(INPUT, np.zeros((2, 1, 4, 4), np.float32))),
        r"input 'images' has shape \[2, 1, 4, 4\], the model expects \[-1, 1, 8, 8\]",
    ),
    "wrong rank": (
        _request(Tensor(INPUT, np.zeros((2, 64), np.float32))),
        r"input 'images' has shape \[2, 64\]",
    ),
    "missing input": (_request(), r"missing input\(s\) images"),
    "unexpected input": (
        _request(Tensor(INPUT, GOOD), Tensor("pixels", GOOD)),
        r"unexpected input\(s\) pixels \(inputs: images\)",
    ),
    "duplicate input": (
        _request(Tensor(INPUT, GOOD), Tensor(INPUT, GOOD)),
        r"input 'images' is given twice",
    ),
    "empty batch": (
        _request(Tensor(INPUT, np.zeros((0, 1, 8, 8), np.float32))),
        r"the batch is empty \(first dimension 0\)",
    ),
    "unknown output": (
        _request(Tensor(INPUT, GOOD), outputs=(RequestedOutput("probabilities"),)),
        r"unknown output\(s\) probabilities \(outputs: logits\)",
    ),
    "bad budget": (
        InferRequest(MODEL, (Tensor(INPUT, GOOD),), parameters={"latency_budget_ms": "soon"}),
        r"latency_budget_ms must be a number, got 'soon'",
    ),
    "unreachable quality": (
        InferRequest(MODEL, (Tensor(INPUT, GOOD),), parameters={"min_quality": 0.99}),
        r"min_quality 0\.99",
    ),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_request_is_invalid_and_the_next_one_succeeds(served, case):
    request, match = MALFORMED[case]

    async def main():
        with pytest.raises(InvalidArgumentError, match=match):
            await served.plane.infer(request)
        return await served.plane.infer(infer_request(GOOD, version=REFERENCE))

    good = run(main())
    np.testing.assert_allclose(
        good.outputs[0].data, run_artifact(served.repository, REFERENCE, GOOD), rtol=1e-5
    )
    assert served.metrics.codes() == ["invalid_argument", "ok"]
    # Nothing was selected or run for the malformed request.
    assert served.metrics.selections == [(MODEL, REFERENCE, "pinned")]
    assert [rows for *_, rows in served.metrics.batches] == [2]


def test_requested_outputs_are_returned_once_each(served):
    request = _request(
        Tensor(INPUT, GOOD), outputs=(RequestedOutput(OUTPUT), RequestedOutput(OUTPUT, True))
    )
    response = run(served.plane.infer(request))
    assert [t.name for t in response.outputs] == [OUTPUT]
    assert response.binary_outputs == frozenset({OUTPUT})


# --- metrics -------------------------------------------------------------------------------


def test_metrics_record_requests_selections_budgets_and_batches(served):
    async def main():
        await served.plane.infer(infer_request(images(3)))
        await served.plane.infer(infer_request(latency_budget_ms=1e6))
        await served.plane.infer(infer_request(latency_budget_ms=1e-6))
        await served.plane.infer(infer_request(version="int8"))
        with pytest.raises(InvalidArgumentError):
            await served.plane.infer(infer_request(images(0)))
        await until(lambda: len(served.metrics.batches) == 5)

    run(main())
    metrics = served.metrics
    assert metrics.requests == [
        (MODEL, REFERENCE, "cpu", "http", "ok"),
        (MODEL, REFERENCE, "cpu", "http", "ok"),
        (MODEL, FASTEST, "cpu", "http", "ok"),
        (MODEL, "int8", "cpu", "http", "ok"),
        (MODEL, "", "", "http", "invalid_argument"),
    ]
    assert metrics.selections == [
        (MODEL, REFERENCE, "reference"),
        (MODEL, REFERENCE, "within_budget"),
        (MODEL, FASTEST, "fastest_over_budget"),
        (MODEL, "int8", "pinned"),
    ]
    assert metrics.budgets == [(MODEL, REFERENCE, True), (MODEL, FASTEST, False)]
    # One batch per request (they ran one after the other), plus the shadow run of the
    # reference that the over-budget request to FASTEST triggered (shadow_fraction 1).
    assert sorted(metrics.batches) == sorted(
        [
            (MODEL, REFERENCE, "cpu", 3),
            (MODEL, REFERENCE, "cpu", 2),
            (MODEL, FASTEST, "cpu", 2),
            (MODEL, "int8", "cpu", 2),
            (MODEL, REFERENCE, "cpu", 2),
        ]
    )
    # Every request left the in-flight gauge where it found it.
    assert sum(delta for *_, delta in metrics.inflight_deltas) == 0
    assert {delta for *_, delta in metrics.inflight_deltas} == {1, -1}


def test_variant_figures_are_published_for_ready_variants_only(served):
    figures = served.metrics.figures
    assert set(figures) == {(MODEL, v) for v in READY}
    manifest = served.repository.manifest(MODEL, "int8")
    assert figures[(MODEL, "int8")] == (manifest.quality.value, manifest.size_bytes)
    assert {(m, v) for m, v, _ in served.metrics.agreements} == {(MODEL, v) for v in READY}
    assert all(value == OFFLINE_AGREEMENT for *_, value in served.metrics.agreements)


def test_shadow_comparison_updates_live_agreement_of_a_non_reference_variant(served):
    data = images(16, seed=11)
    answer = run_artifact(served.repository, FASTEST, data).argmax(axis=1)
    reference = run_artifact(served.repository, REFERENCE, data).argmax(axis=1)
    expected = float((answer == reference).mean())
    assert expected != OFFLINE_AGREEMENT

    async def main():
        before = len(served.metrics.agreements)
        await served.plane.infer(infer_request(data, latency_budget_ms=1e-6))
        await until(lambda: len(served.metrics.agreements) > before)
        # The reference answering itself is never compared.
        await served.plane.infer(infer_request(data))
        for _ in range(20):
            await asyncio.sleep(0)
        return before

    before = run(main())
    assert served.metrics.agreements[before:] == [(MODEL, FASTEST, pytest.approx(expected))]
    row = next(r for r in served.plane.variants(MODEL)["variants"] if r["variant"] == FASTEST)
    assert row["live_agreement"] == pytest.approx(expected)


def test_no_shadow_comparison_when_the_fraction_is_zero(tiny_repository):
    served = serve(tiny_repository, shadow_fraction=0.0)

    async def main():
        for _ in range(3):
            await served.plane.infer(infer_request(version=FASTEST))
        for _ in range(20):
            await asyncio.sleep(0)

    run(main())
    assert all(value == OFFLINE_AGREEMENT for *_, value in served.metrics.agreements)
    assert [variant for _, variant, *_ in served.metrics.batches] == [FASTEST] * 3


def test_backpressure_surfaces_as_resource_exhausted(tiny_repository):
    served = serve(tiny_repository, batching=BatchingConfig(max_queue=1))

    async def main():
        return await asyncio.gather(
            *(served.plane.infer(infer_request(version=REFERENCE)) for _ in range(3)),
            return_exceptions=True,
        )

    results = run(main())
    assert results[0].version == REFERENCE
    assert [type(r).__name__ for r in results[1:]] == ["ResourceExhaustedError"] * 2
    assert sorted(served.metrics.codes()) == ["ok", "resource_exhausted", "resource_exhausted"]


# --- health and metadata -------------------------------------------------------------------


def test_health(served):
    assert served.plane.live() is True
    assert served.plane.ready() is True
    meta = served.plane.server_metadata()
    assert meta.name == "gearbox"
    assert "binary_tensor_data" in meta.extensions
    assert "gearbox_variants" in meta.extensions


def test_model_metadata_lists_ready_versions_only(served):
    meta = served.plane.model_metadata(MODEL)
    assert meta.name == MODEL
    assert meta.versions == READY
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [(INPUT, "FP32", (-1, 1, 8, 8))]
    assert [(t.name, t.datatype, t.shape) for t in meta.outputs] == [(OUTPUT, "FP32", (-1, 10))]
    assert meta.parameters == {
        "reference_variant": REFERENCE,
        "task": "classification",
        "metric": "accuracy",
    }
    assert served.plane.model_metadata(BROKEN_MODEL).versions == ()


def test_version_metadata_carries_the_manifest_figures(served):
    meta = served.plane.model_metadata(MODEL, "int8")
    manifest = served.repository.manifest(MODEL, "int8")
    assert meta.versions == ("int8",)
    parameters = meta.parameters
    assert parameters["reference_variant"] == REFERENCE
    assert parameters["technique"] == manifest.technique
    assert parameters["size_bytes"] == manifest.size_bytes
    assert parameters["param_count"] == manifest.param_count
    assert parameters["quality"] == manifest.quality.value
    assert parameters["agreement"] == manifest.quality.agreement
    assert parameters["latency_ms_cpu_b1_p50"] == SEEDED_MS["int8"]
    assert parameters["latency_ms_cpu_b8_p95"] == manifest.latency_ms["cpu"]["8"]["p95"]


def test_version_metadata_of_a_rejected_or_unknown_variant_is_not_found(served):
    with pytest.raises(NotFoundError, match="rejected"):
        served.plane.model_metadata(MODEL, REJECTED)
    with pytest.raises(NotFoundError, match="'int4'"):
        served.plane.model_metadata(MODEL, "int4")
    with pytest.raises(NotFoundError, match="'nope'"):
        served.plane.model_metadata("nope")


def test_model_ready(served):
    assert served.plane.model_ready(MODEL) is True
    for variant in READY:
        assert served.plane.model_ready(MODEL, variant) is True
    assert served.plane.model_ready(MODEL, REJECTED) is False
    assert served.plane.model_ready(BROKEN_MODEL) is False
    with pytest.raises(NotFoundError):
        served.plane.model_ready(MODEL, "int4")
    with pytest.raises(NotFoundError):
        served.plane.model_ready("nope")


def test_variants_lists_every_manifest_with_served_flags(served):
    listing = served.plane.variants(MODEL)
    assert listing["model"] == MODEL
    assert listing["reference_variant"] == REFERENCE
    rows = {row["variant"]: row for row in listing["variants"]}
    assert set(rows) == {seed.name for seed in VARIANTS}
    assert {name for name, row in rows.items() if row["served"]} == set(READY)
    assert rows[REJECTED]["status"] == "rejected"
    assert "predicted_latency_ms" not in rows[REJECTED]
    assert "live_agreement" not in rows[REJECTED]
    for variant in READY:
        assert rows[variant]["predicted_latency_ms"] == {"cpu": SEEDED_MS[variant]}
        assert rows[variant]["live_agreement"] == OFFLINE_AGREEMENT
        assert rows[variant]["sha256"] == served.repository.manifest(MODEL, variant).sha256
    broken = served.plane.variants(BROKEN_MODEL)["variants"]
    assert [row["served"] for row in broken] == [False]


def test_catalog_keeps_rejected_manifests_but_serves_only_ready(tiny_repository):
    catalog = Catalog.load(tiny_repository)
    assert set(catalog.models) == {MODEL, BROKEN_MODEL}
    assert catalog.models[MODEL].ready == READY
    assert REJECTED in catalog.models[MODEL].manifests
    assert catalog.models[BROKEN_MODEL].ready == ()
    assert sorted((m.model, m.variant) for m in catalog.ready_manifests()) == [
        (MODEL, v) for v in READY
    ]


# --- hosting -------------------------------------------------------------------------------


def test_local_backend_hosts_the_ready_variants(served):
    assert served.backend.hosted == [(MODEL, v) for v in READY]
    assert served.backend.device_class == "cpu"
    assert served.backend.depth() == 0
    with pytest.raises(NotFoundError, match="not hosted on cpu"):
        run(served.backend.infer(MODEL, REJECTED, {INPUT: images(1)}))


def test_a_tampered_artifact_is_refused_at_load(tmp_path):
    repository = publish_tiny_repository(tmp_path / "repo")
    artifact = repository.root / MODEL / "int8" / ARTIFACT_FILE
    data = bytearray(artifact.read_bytes())
    data[-1] ^= 0xFF
    artifact.write_bytes(bytes(data))
    catalog = Catalog.load(repository)
    with pytest.raises(IntegrityError, match="sha256"):
        LocalBackend(repository, catalog.ready_manifests(), DeviceClass("cpu"), BatchingConfig())


def test_a_rejected_manifest_is_never_loaded(tiny_repository):
    manifest = tiny_repository.manifest(MODEL, REJECTED)
    with pytest.raises(UnavailableError, match="rejected"):
        LocalBackend(tiny_repository, [manifest], DeviceClass("cpu"), BatchingConfig())


def test_a_device_class_without_its_provider_is_unavailable(tiny_repository):
    missing = DeviceClass("npu", execution_provider="NoSuchExecutionProvider")
    manifests = [tiny_repository.manifest(MODEL, REFERENCE)]
    with pytest.raises(UnavailableError, match="NoSuchExecutionProvider"):
        LocalBackend(tiny_repository, manifests, missing, BatchingConfig())


def test_a_data_plane_needs_a_backend(tiny_repository):
    with pytest.raises(InvalidArgumentError, match="backend"):
        DataPlane(Catalog.load(tiny_repository), [], ["cpu"], RecordingMetrics())
