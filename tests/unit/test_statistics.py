"""Triton's statistics extension: figures a real data plane records, both adapters, and
tritonclient's own parsing of what they answer."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as triton_pb2
from tritonclient.utils import InferenceServerException

from gearbox.compression.errors import InvalidArgumentError, NotFoundError
from gearbox.serving.clock import RequestClock, add_inference_service
from gearbox.serving.dataplane import EXTENSIONS
from gearbox.serving.executor import BatchResult
from gearbox.serving.grpc.adapter import GrpcServicer
from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
from gearbox.serving.queue_model import BatchCost, variant_key
from gearbox.serving.rest.adapter import HttpAdapter
from gearbox.serving.statistics import Duration, ModelStatistics, Phases, Statistics
from tests.unit.serving_fixtures import (
    BROKEN_MODEL,
    DEVICE,
    FASTEST,
    INPUT,
    MODEL,
    READY,
    REFERENCE,
    REJECTED,
    Gate,
    GrpcContext,
    Served,
    images,
    infer_request,
    run,
    triton_http_client,
    until,
)

DURATIONS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)


@pytest.fixture
def quiet(serving: Any) -> Served:
    """No shadow runs: one on the reference could share a batch with a test's requests."""
    return serving(shadow_fraction=0.0)


def only(stats: list[ModelStatistics], version: str) -> ModelStatistics:
    [found] = [s for s in stats if s.version == version]
    return found


def epoch_ms() -> int:
    return time.time_ns() // 1_000_000


# --- the figures a data plane records ------------------------------------------------------


def test_requests_one_at_a_time_are_counted_with_their_phases(quiet):
    before = epoch_ms()

    async def main() -> None:
        for seed in range(5):
            await quiet.answer(infer_request(images(2, seed), version=REFERENCE))
        await quiet.answer(infer_request(images(3), version=FASTEST))

    run(main())
    after = epoch_ms()
    stats = quiet.plane.statistics(MODEL)
    assert [s.version for s in stats] == list(READY)
    reference = only(stats, REFERENCE)
    infer = reference.inference_stats
    assert reference.name == MODEL
    assert before <= reference.last_inference <= after
    assert reference.inference_count == 10  # rows, not requests
    assert reference.execution_count == 5  # each ran alone
    assert infer.success.count == 5
    for phase in (infer.queue, infer.compute_input, infer.compute_infer, infer.compute_output):
        assert phase.count == 5
        assert phase.ns > 0
    # The phases are disjoint spans inside the request's.
    phases = infer.queue.ns + infer.compute_input.ns + infer.compute_infer.ns
    assert phases + infer.compute_output.ns <= infer.success.ns
    assert infer.success.ns >= infer.compute_infer.ns
    assert infer.fail.count == infer.fail.ns == 0
    assert infer.cache_hit.count == infer.cache_miss.count == 0
    [batch] = reference.batch_stats
    assert batch.batch_size == 2
    assert batch.compute_infer.count == 5
    assert batch.compute_infer.ns == pytest.approx(infer.compute_infer.ns, abs=5)
    assert batch.compute_input.ns == pytest.approx(infer.compute_input.ns, abs=5)

    fastest = only(stats, FASTEST)
    assert (fastest.inference_count, fastest.execution_count) == (3, 1)
    assert [b.batch_size for b in fastest.batch_stats] == [3]
    untouched = only(stats, "int8")
    assert untouched.inference_count == untouched.last_inference == 0
    assert untouched.inference_stats.success.count == 0
    assert untouched.batch_stats == ()


def test_a_batch_of_several_requests_is_one_execution(quiet):
    rows = [images(1, seed=i) for i in range(4)]
    key = variant_key(MODEL, REFERENCE)
    # Only the batch's fixed cost: four waiting requests are answered soonest merged.
    quiet.backend.times.seed(key, DEVICE, BatchCost(1.0, 0.001))

    async def main() -> None:
        async with Gate(quiet.backend.executor, quiet.backend.times).held():
            tasks = [
                asyncio.ensure_future(quiet.answer(infer_request(r, version=REFERENCE)))
                for r in rows
            ]
            await until(lambda: quiet.backend.executor.work_state().queued_rows.get(key) == 4)
        await asyncio.gather(*tasks)

    run(main())
    assert [b for b in quiet.metrics.batches if b[0] == MODEL] == [(MODEL, REFERENCE, DEVICE, 4)]
    [reference] = quiet.plane.statistics(MODEL, REFERENCE)
    infer = reference.inference_stats
    assert infer.success.count == reference.inference_count == 4
    assert reference.execution_count == 1
    [batch] = reference.batch_stats
    assert (batch.batch_size, batch.compute_infer.count) == (4, 1)
    # Each request is given its batch's run; the batch statistics count that run once.
    assert batch.compute_infer.ns == pytest.approx(infer.compute_infer.ns / 4, abs=5)
    # They waited behind the gate's batch.
    assert infer.queue.ns > 0
    assert infer.success.ns >= infer.compute_infer.ns


def test_shares_of_a_batch_add_up_to_one_run():
    statistics = Statistics({MODEL: (REFERENCE,)})
    result = BatchResult({}, service_s=0.004, queue_s=0.001, batch_rows=4)
    for rows in (1, 3):
        statistics.succeeded(MODEL, REFERENCE, Phases(time.perf_counter(), 5.0, result, rows), 6.0)
    [figures] = statistics.report(MODEL, (REFERENCE,))
    assert (figures.inference_count, figures.execution_count) == (4, 1)
    # Each request is given the whole run, as Triton gives each request of a batch.
    assert figures.inference_stats.compute_infer == Duration(2, 8_000_000)
    [batch] = figures.batch_stats
    assert (batch.batch_size, batch.compute_infer.count, batch.compute_infer.ns) == (
        4,
        1,
        4_000_000,
    )
    assert figures.inference_stats.queue.ns == 2_000_000
    assert figures.inference_stats.success.ns == 12_000_000


def test_failures_are_counted_where_they_can_be_attributed(quiet):
    wrong_shape = images(1)[:, :, :4]

    async def fail(request: Any) -> None:
        with pytest.raises((InvalidArgumentError, NotFoundError)):
            await quiet.answer(request)

    async def main() -> None:
        await fail(infer_request(wrong_shape))  # before any variant was chosen
        await fail(infer_request(wrong_shape, version=FASTEST))  # pinned: that variant's
        await fail(infer_request(version=REJECTED))  # a version that is not served
        await fail(infer_request(model="nope"))
        await quiet.answer(infer_request(version=FASTEST))

    run(main())
    stats = quiet.plane.statistics(MODEL)
    assert [s.version for s in stats] == [*READY, ""]
    fastest = only(stats, FASTEST).inference_stats
    assert (fastest.fail.count, fastest.success.count) == (1, 1)
    assert fastest.fail.ns > 0
    unrouted = only(stats, "")
    assert unrouted.inference_stats.fail.count == 1
    assert unrouted.inference_stats.success.count == unrouted.inference_count == 0
    assert unrouted.last_inference > 0
    assert sum(s.inference_stats.fail.count for s in stats) == 2
    # A version asked for by name is reported alone, without the unattributed entry.
    assert [s.version for s in quiet.plane.statistics(MODEL, FASTEST)] == [FASTEST]


def test_a_cancelled_request_is_a_failure(quiet):
    async def main() -> None:
        async with Gate(quiet.backend.executor, quiet.backend.times).held():
            task = asyncio.ensure_future(quiet.answer(infer_request(version=REFERENCE)))
            await until(lambda: quiet.backend.depth() == 2)  # the gate's and ours
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main())
    [reference] = quiet.plane.statistics(MODEL, REFERENCE)
    assert reference.inference_stats.fail.count == 1
    assert reference.inference_stats.success.count == reference.execution_count == 0


def test_every_model_without_a_name(quiet):
    run(quiet.answer(infer_request(version=REFERENCE)))
    stats = quiet.plane.statistics()
    # The model without a ready variant has no version to report.
    assert [(s.name, s.version) for s in stats] == [(MODEL, v) for v in READY]
    assert only(stats, REFERENCE).inference_stats.success.count == 1


@pytest.mark.parametrize(
    ("model", "version", "error", "match"),
    [
        ("nope", "", NotFoundError, "model 'nope' not found"),
        (MODEL, "int4", NotFoundError, "variant 'int4'"),
        (MODEL, REJECTED, NotFoundError, "rejected"),
        ("", REFERENCE, InvalidArgumentError, "model's name"),
    ],
)
def test_unknown_models_and_versions(quiet, model, version, error, match):
    with pytest.raises(error, match=match):
        quiet.plane.statistics(model, version)
    assert quiet.plane.statistics(BROKEN_MODEL) == []


def test_statistics_is_an_advertised_extension():
    assert "statistics" in EXTENSIONS


# --- HTTP ---------------------------------------------------------------------------------


def http_infer(adapter: HttpAdapter, version: str, data: np.ndarray) -> None:
    document = {
        "inputs": [
            {
                "name": INPUT,
                "datatype": "FP32",
                "shape": list(data.shape),
                "data": data.ravel().tolist(),
            }
        ]
    }
    path = f"/v2/models/{MODEL}/versions/{version}/infer"
    reply = run(adapter.handle("POST", path, {}, json.dumps(document).encode()))
    assert reply.status == 200


def http_get(adapter: HttpAdapter, path: str) -> tuple[int, Any]:
    reply = run(adapter.handle("GET", path, {}, b""))
    assert reply.headers["content-type"] == "application/json"
    return reply.status, json.loads(reply.body)


def test_http_answers_tritons_json(quiet):
    http = HttpAdapter(quiet.plane)
    http_infer(http, REFERENCE, images(2))
    status, document = http_get(http, f"/v2/models/{MODEL}/versions/{REFERENCE}/stats")
    assert status == 200
    [model] = document["model_stats"]
    assert set(model) == {
        "name",
        "version",
        "last_inference",
        "inference_count",
        "execution_count",
        "inference_stats",
        "batch_stats",
    }
    assert (model["name"], model["version"]) == (MODEL, REFERENCE)
    assert (model["inference_count"], model["execution_count"]) == (2, 1)
    assert set(model["inference_stats"]) == set(DURATIONS)
    for duration in model["inference_stats"].values():
        assert set(duration) == {"count", "ns"}
    assert model["inference_stats"]["success"]["count"] == 1
    assert model["inference_stats"]["compute_input"]["ns"] > 0
    [batch] = model["batch_stats"]
    assert set(batch) == {"batch_size", "compute_input", "compute_infer", "compute_output"}
    assert batch["batch_size"] == 2

    status, document = http_get(http, f"/v2/models/{MODEL}/stats")
    assert status == 200
    assert [m["version"] for m in document["model_stats"]] == list(READY)
    status, document = http_get(http, "/v2/models/stats")
    assert status == 200
    assert {m["name"] for m in document["model_stats"]} == {MODEL}
    # tritonclient.grpc's messages take the same document (json_format is strict on names).
    parsed = json_format.ParseDict(document, triton_pb2.ModelStatisticsResponse())
    assert parsed.model_stats[0].inference_stats.success.count == 1


@pytest.mark.parametrize(
    "path",
    ["/v2/models/nope/stats", f"/v2/models/{MODEL}/versions/int4/stats"],
)
def test_http_unknown_is_404(quiet, path):
    status, document = http_get(HttpAdapter(quiet.plane), path)
    assert status == 404
    assert "not found" in document["error"]


def test_tritonclient_http_get_inference_statistics(quiet):
    http = HttpAdapter(quiet.plane)
    http_infer(http, FASTEST, images(1))
    client, stub = triton_http_client(http)
    every = client.get_inference_statistics()
    model = client.get_inference_statistics(MODEL)
    version = client.get_inference_statistics(MODEL, FASTEST)
    with pytest.raises(InferenceServerException, match="'int4'") as missing:
        client.get_inference_statistics(MODEL, "int4")
    client.close()
    assert [uri for _, uri in stub.requests] == [
        "/v2/models/stats",
        f"/v2/models/{MODEL}/stats",
        f"/v2/models/{MODEL}/versions/{FASTEST}/stats",
        f"/v2/models/{MODEL}/versions/int4/stats",
    ]
    assert missing.value.status() == "404"
    assert len(every["model_stats"]) == len(model["model_stats"]) == len(READY)
    [figures] = version["model_stats"]
    assert figures["inference_stats"]["success"]["count"] == 1


# --- gRPC -----------------------------------------------------------------------------------


def grpc_statistics(
    servicer: GrpcServicer, name: str = "", version: str = ""
) -> tuple[pb.ModelStatisticsResponse, GrpcContext]:
    context = GrpcContext()
    request = pb.ModelStatisticsRequest(name=name, version=version)
    return run(servicer.ModelStatistics(request, context)), context


def test_grpc_answers_the_same_figures_as_http(quiet):
    http = HttpAdapter(quiet.plane)
    http_infer(http, REFERENCE, images(2))
    http_infer(http, FASTEST, images(1))
    reply, context = grpc_statistics(GrpcServicer(quiet.plane), MODEL)
    assert context.code is None
    assert [m.version for m in reply.model_stats] == list(READY)
    reference = reply.model_stats[0]
    assert (reference.inference_count, reference.execution_count) == (2, 1)
    assert reference.inference_stats.success.count == 1
    assert reference.inference_stats.compute_infer.ns > 0
    assert reference.batch_stats[0].batch_size == 2
    # tritonclient's own message reads ours off the wire, and it holds what HTTP says.
    theirs = triton_pb2.ModelStatisticsResponse.FromString(reply.SerializeToString())
    _, document = http_get(http, f"/v2/models/{MODEL}/stats")
    assert theirs == json_format.ParseDict(document, triton_pb2.ModelStatisticsResponse())


def test_grpc_not_found_and_invalid(quiet):
    servicer = GrpcServicer(quiet.plane)
    reply, context = grpc_statistics(servicer, "nope")
    assert context.code == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in (context.details or "")
    assert list(reply.model_stats) == []
    _, context = grpc_statistics(servicer, "", REFERENCE)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT


def test_statistics_messages_are_tritons():
    for name in (
        "ModelStatisticsRequest",
        "ModelStatisticsResponse",
        "ModelStatistics",
        "InferStatistics",
        "StatisticDuration",
        "InferBatchStatistics",
    ):
        ours, theirs = getattr(pb, name).DESCRIPTOR, getattr(triton_pb2, name).DESCRIPTOR
        assert ours.full_name == theirs.full_name
        for field in ours.fields:
            other = theirs.fields_by_name[field.name]
            assert (field.number, field.type, field.label) == (
                other.number,
                other.type,
                other.label,
            )
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    method = service.methods_by_name["ModelStatistics"]
    assert method.input_type.full_name == "inference.ModelStatisticsRequest"
    assert method.output_type.full_name == "inference.ModelStatisticsResponse"


def test_tritonclient_grpc_over_a_real_server(quiet):
    """The RPC is registered by the same function Ray Serve is given, and served."""

    async def main() -> tuple[Any, Any, Any]:
        await quiet.answer(infer_request(version=REFERENCE), RequestClock.start())
        server = grpc.aio.server()
        add_inference_service(GrpcServicer(quiet.plane), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
            try:
                message = await client.get_inference_statistics(MODEL, REFERENCE)
                as_json = await client.get_inference_statistics(MODEL, as_json=True)
                with pytest.raises(InferenceServerException) as missing:
                    await client.get_inference_statistics("nope")
            finally:
                await client.close()
        finally:
            await server.stop(None)
        return message, as_json, missing.value

    message, as_json, missing = run(main())
    [reference] = message.model_stats
    assert (reference.name, reference.version) == (MODEL, REFERENCE)
    assert reference.inference_stats.success.count == 1
    assert reference.inference_count == 2
    assert [m["version"] for m in as_json["model_stats"]] == list(READY)
    assert "NOT_FOUND" in missing.status()
