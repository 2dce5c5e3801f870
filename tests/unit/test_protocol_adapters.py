"""The HTTP and gRPC adapters over a real data plane: endpoints, status codes, wire formats.

The gRPC side is :class:`GrpcServicer` called directly, method by method, as Ray Serve's
gRPC server calls it (a real ``grpc.aio`` server in front of it is in ``test_clock.py``).
"""

from __future__ import annotations

import asyncio
import json
import pickle
import re
import time

import grpc
import numpy as np
import pytest
import tritonclient.http as triton_http

from gearbox.serving.catalog import Catalog
from gearbox.serving.clock import RequestClock
from gearbox.serving.config import BatchingConfig
from gearbox.serving.dataplane import DataPlane
from gearbox.serving.grpc.adapter import (
    GrpcServicer,
    parameter_to_proto,
    parameters_from_proto,
    response_to_proto,
)
from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
from gearbox.serving.inference import InferResponse, Tensor
from gearbox.serving.rest.adapter import HttpAdapter, encode_infer_response
from tests.unit.serving_fixtures import (
    BROKEN_MODEL,
    DEVICE,
    FASTEST,
    INPUT,
    MIDDLE_BUDGET_MS,
    MODEL,
    OUTPUT,
    READY,
    REFERENCE,
    REJECTED,
    SEEDED_MS,
    Gate,
    GrpcContext,
    RecordingMetrics,
    images,
    run,
    run_artifact,
    started,
    until,
)
from tests.unit.test_dataplane import FakeBackend

JSON = {"content-type": "application/json"}


@pytest.fixture
def served(serving):
    """No shadow runs: their work on the reference would queue ahead of later requests and
    move budget routing (the data plane's tests cover shadowing)."""
    return serving(shadow_fraction=0.0)


@pytest.fixture
def http(served):
    return HttpAdapter(served.plane)


@pytest.fixture
def grpc_adapter(served):
    return GrpcServicer(served.plane)


def get(adapter, path):
    return run(adapter.handle("GET", path, {}, b""))


def post_json(adapter, path, document):
    return run(adapter.handle("POST", path, JSON, json.dumps(document).encode()))


def body(response):
    assert response.headers["content-type"] == "application/json"
    return json.loads(response.body)


def infer_json(data, **parameters):
    document = {
        "id": "req-1",
        "inputs": [
            {
                "name": INPUT,
                "datatype": "FP32",
                "shape": list(data.shape),
                "data": data.ravel().tolist(),
            }
        ],
    }
    if parameters:
        document["parameters"] = parameters
    return document


# --- HTTP: endpoints -----------------------------------------------------------------------


def test_server_metadata_and_health(http):
    meta = get(http, "/v2")
    assert meta.status == 200
    assert body(meta)["name"] == "gearbox"
    assert "binary_tensor_data" in body(meta)["extensions"]
    live = get(http, "/v2/health/live")
    assert (live.status, body(live)) == (200, {"live": True})
    ready = get(http, "/v2/health/ready")
    assert (ready.status, body(ready)) == (200, {"ready": True})
    # Trailing slashes and the method's case do not matter.
    assert run(http.handle("get", "/v2/health/live/", {}, b"")).status == 200


def test_behind_haproxy_readiness_is_answered_for_the_path_the_probe_came_by(serving):
    plane = serving(direct_ingress=True).plane
    http = HttpAdapter(plane)
    forwarded = get(http, "/v2/health/ready")  # no stamp: a proxy forwarded it
    direct = RequestClock(time.perf_counter(), direct=True)
    reached = run(http.handle("GET", "/v2/health/ready", {}, b"", direct))
    grpc_forwarded, _ = call(GrpcServicer(plane).ServerReady, pb.ServerReadyRequest())
    assert grpc_forwarded.ready is False
    assert (forwarded.status, body(forwarded)) == (503, {"ready": False})
    assert (reached.status, body(reached)) == (200, {"ready": True})


def test_model_metadata(http):
    response = get(http, f"/v2/models/{MODEL}")
    assert response.status == 200
    meta = body(response)
    assert meta["name"] == MODEL
    assert meta["versions"] == list(READY)
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": INPUT, "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["parameters"]["reference_variant"] == REFERENCE


def test_version_metadata(http):
    response = get(http, f"/v2/models/{MODEL}/versions/int8")
    assert response.status == 200
    meta = body(response)
    assert meta["versions"] == ["int8"]
    assert meta["parameters"]["technique"] == "quantize"
    assert meta["parameters"]["latency_ms_cpu_b1_p50"] == SEEDED_MS["int8"]


def test_model_and_version_readiness(http):
    ready = get(http, f"/v2/models/{MODEL}/ready")
    assert (ready.status, body(ready)) == (200, {"name": MODEL, "ready": True})
    version = get(http, f"/v2/models/{MODEL}/versions/int8/ready")
    assert (version.status, body(version)["ready"]) == (200, True)
    rejected = get(http, f"/v2/models/{MODEL}/versions/{REJECTED}/ready")
    assert (rejected.status, body(rejected)["ready"]) == (503, False)
    broken = get(http, f"/v2/models/{BROKEN_MODEL}/ready")
    assert (broken.status, body(broken)["ready"]) == (503, False)
    assert get(http, f"/v2/models/{MODEL}/versions/int4/ready").status == 404
    assert get(http, "/v2/models/nope/ready").status == 404


def test_infer_json(http, served):
    data = images(3, seed=4)
    predicted = served.predicted_ms(REFERENCE, rows=3)
    response = post_json(http, f"/v2/models/{MODEL}/infer", infer_json(data))
    assert response.status == 200
    answer = body(response)
    assert answer["model_name"] == MODEL
    assert answer["model_version"] == REFERENCE
    assert answer["id"] == "req-1"
    assert answer["parameters"]["variant"] == REFERENCE
    assert answer["parameters"]["device_class"] == "cpu"
    assert answer["parameters"]["budget_met"] is True
    assert answer["parameters"]["predicted_latency_ms"] == predicted
    assert answer["parameters"]["latency_ms"] > 0
    [output] = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == (OUTPUT, "FP32", [3, 10])
    values = np.asarray(output["data"], np.float32).reshape(3, 10)
    expected = run_artifact(served.repository, REFERENCE, data)
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)
    assert served.metrics.requests[-1] == (MODEL, REFERENCE, "cpu", "http", "ok")


def test_infer_pinned_version_and_routing_parameters(http):
    pinned = post_json(http, f"/v2/models/{MODEL}/versions/int8/infer", infer_json(images(1)))
    assert (pinned.status, body(pinned)["model_version"]) == (200, "int8")
    tight = post_json(
        http, f"/v2/models/{MODEL}/infer", infer_json(images(1), latency_budget_ms=1e-6)
    )
    assert body(tight)["model_version"] == FASTEST
    assert body(tight)["parameters"]["budget_met"] is False
    middle = infer_json(images(1), latency_budget_ms=str(MIDDLE_BUDGET_MS))
    as_string = post_json(http, f"/v2/models/{MODEL}/infer", middle)
    assert body(as_string)["model_version"] == "int8"


def test_nested_json_data_is_accepted(http, served):
    data = images(2, seed=8)
    document = infer_json(data)
    document["inputs"][0]["data"] = data.tolist()
    response = post_json(http, f"/v2/models/{MODEL}/versions/{REFERENCE}/infer", document)
    assert response.status == 200
    values = np.asarray(body(response)["outputs"][0]["data"], np.float32).reshape(2, 10)
    np.testing.assert_allclose(
        values, run_artifact(served.repository, REFERENCE, data), rtol=1e-5, atol=1e-6
    )


def test_variants_extension(http):
    response = get(http, f"/v2/models/{MODEL}/variants")
    assert response.status == 200
    listing = body(response)
    served = {row["variant"]: row["served"] for row in listing["variants"]}
    assert served == {"fp32": True, "int8": True, "small": True, REJECTED: False}
    assert get(http, f"/v2/models/{MODEL}/versions/int8/variants").status == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/v3/health/live"),
        ("GET", "/v2/health"),
        ("GET", "/v2/models"),
        ("GET", f"/v2/models/{MODEL}/versions"),
        ("GET", f"/v2/models/{MODEL}/statistics"),
        ("GET", f"/v2/models/{MODEL}/versions/int8/ready/now"),
        # wrong methods
        ("POST", "/v2/health/live"),
        ("DELETE", "/v2"),
        ("GET", f"/v2/models/{MODEL}/infer"),
        ("PUT", f"/v2/models/{MODEL}/infer"),
        ("POST", f"/v2/models/{MODEL}"),
        ("POST", f"/v2/models/{MODEL}/variants"),
    ],
)
def test_unknown_endpoints_are_404_json(http, method, path):
    response = run(http.handle(method, path, {}, b"{}"))
    assert response.status == 404
    assert body(response) == {"error": f"no endpoint {method} {path}"}


# --- HTTP: errors --------------------------------------------------------------------------


def infer_status(http, document_or_bytes, path=f"/v2/models/{MODEL}/infer", headers=JSON):
    raw = (
        document_or_bytes
        if isinstance(document_or_bytes, bytes)
        else json.dumps(document_or_bytes).encode()
    )
    response = run(http.handle("POST", path, headers, raw))
    return response.status, body(response).get("error", "")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"{}", "non-empty 'inputs' list"),
        (b'{"inputs": []}', "non-empty 'inputs' list"),
        (b'{"inputs": [3]}', r"inputs\[0\] must be an object"),
        (b'{"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}', r"inputs\[0\]"),
        (b'{"inputs": [{"name": "images", "shape": [1], "data": [1]}]}', "'images'.*datatype"),
        (b'{"inputs": [{"name": "images", "datatype": "FP32", "data": [1]}]}', "'images'.*shape"),
        (b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1]}]}', "'images'.*data"),
        (
            b'{"inputs": [{"name": "images", "datatype": "F32", "shape": [1], "data": [1]}]}',
            "'images'.*unknown or unsupported datatype 'F32'",
        ),
        (
            b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [2], "data": [1]}]}',
            r"'images': shape \[2\] needs 2 elements, data has 1",
        ),
        (
            b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [-1], "data": [1]}]}',
            "'images'.*non-negative integers",
        ),
        (
            b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": ["a"]}]}',
            "'images'.*FP32 numbers",
        ),
        (
            b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": "abc"}]}',
            "'images'.*list of numbers",
        ),
        (b'{"parameters": [], "inputs": [{"name": "images"}]}', "request parameters"),
        (b'{"parameters": {"a": [1]}, "inputs": [{"name": "images"}]}', "'a' must be a"),
        (b"1" * 100_000, "a number Gearbox cannot read"),
        (b'{"inputs": [{"name": "images", "datatype": "INT64", "shape": [1], "data": [%s]}]}'
         % (b"9" * 5000), "a number Gearbox cannot read"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)  # fmt: skip
def test_malformed_infer_requests_are_400_naming_the_problem(http, raw, match):
    status, error = infer_status(http, raw)
    assert status == 400
    assert error
    assert re.search(match, error), error


@pytest.mark.parametrize(
    "shape",
    [[2**70], [2**32, 2**32], [2**62, 4, 1, 1]],
)
def test_a_huge_shape_is_400_not_an_internal_error(http, shape):
    document = {"inputs": [{"name": INPUT, "datatype": "FP32", "shape": shape, "data": []}]}
    status, error = infer_status(http, document)
    assert status == 400
    assert f"input '{INPUT}'" in error


def test_non_numeric_budget_is_400_naming_it(http):
    status, error = infer_status(http, infer_json(images(1), latency_budget_ms="fast"))
    assert status == 400
    assert "latency_budget_ms" in error
    assert "'fast'" in error


def test_wrong_model_shape_is_400_naming_the_input(http):
    document = {
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]
    }
    status, error = infer_status(http, document)
    assert status == 400
    assert f"input '{INPUT}' has shape [1, 64]" in error


def test_not_found_is_404(http):
    assert infer_status(http, infer_json(images(1)), "/v2/models/nope/infer")[0] == 404
    status, error = infer_status(
        http, infer_json(images(1)), f"/v2/models/{MODEL}/versions/{REJECTED}/infer"
    )
    assert status == 404
    assert "rejected" in error
    assert get(http, f"/v2/models/{MODEL}/versions/{REJECTED}").status == 404


def test_unavailable_is_503(serving):
    http = HttpAdapter(serving(configured=(DEVICE, "gpu")).plane)
    status, error = infer_status(http, infer_json(images(1), device_class="gpu"))
    assert status == 503
    assert "gpu" in error
    assert infer_status(http, infer_json(images(1)), f"/v2/models/{BROKEN_MODEL}/infer")[0] == 503


def test_overload_is_429_and_the_admitted_requests_are_answered(serving):
    served = serving(batching=BatchingConfig(max_queue=2))
    http = HttpAdapter(served.plane)
    raw = json.dumps(infer_json(images(1))).encode()
    path = f"/v2/models/{MODEL}/versions/{REFERENCE}/infer"

    async def main():
        async with Gate(served.backend.executor, served.backend.times).held():
            tasks = [asyncio.ensure_future(http.handle("POST", path, JSON, raw)) for _ in range(4)]
            await until(lambda: sum(t.done() for t in tasks) == 2)
        return await asyncio.gather(*tasks)

    responses = run(main())
    assert [response.status for response in responses] == [200, 200, 429, 429]
    assert "max_queue 2" in body(responses[2])["error"]


def test_an_internal_error_is_500_and_says_nothing_more(tiny_repository):
    failing = FakeBackend(DEVICE, error=RuntimeError("secret stack detail"))
    plane = DataPlane(Catalog.load(tiny_repository), [failing], [DEVICE], RecordingMetrics())
    status, error = infer_status(HttpAdapter(plane), infer_json(images(1)))
    assert status == 500
    assert "secret" not in error
    assert error == f"internal error serving POST /v2/models/{MODEL}/infer"


def test_health_and_readiness_are_503_before_the_warm_up(tiny_repository):
    async def main():
        async with started(tiny_repository, warm=False) as served:
            http = HttpAdapter(served.plane)
            before = [
                await http.handle("GET", path, {}, b"")
                for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready")
            ]
            servicer = GrpcServicer(served.plane)
            grpc_before = await servicer.ServerReady(pb.ServerReadyRequest(), GrpcContext())
            await served.plane.warm_up()
            after = await http.handle("GET", "/v2/health/ready", {}, b"")
            grpc_after = await servicer.ServerReady(pb.ServerReadyRequest(), GrpcContext())
            return before, after, grpc_before, grpc_after

    (live, ready, model_ready), after, grpc_before, grpc_after = run(main())
    assert (live.status, body(live)) == (200, {"live": True})
    assert (ready.status, body(ready)) == (503, {"ready": False})
    assert (model_ready.status, body(model_ready)) == (503, {"name": MODEL, "ready": False})
    assert (after.status, body(after)) == (200, {"ready": True})
    assert (grpc_before.ready, grpc_after.ready) == (False, True)


def test_the_latency_counts_from_the_clock_given_to_the_adapter(http):
    # The server stamped the request a second before the adapter saw it.
    raw = json.dumps(infer_json(images(1), latency_budget_ms=MIDDLE_BUDGET_MS)).encode()
    clock = RequestClock(time.perf_counter() - 1.0)
    response = run(http.handle("POST", f"/v2/models/{MODEL}/infer", JSON, raw, clock))
    parameters = body(response)["parameters"]
    assert parameters["latency_ms"] >= 1000
    assert parameters["budget_met"] is False
    assert parameters["latency_budget_ms"] == MIDDLE_BUDGET_MS
    # Without a clock the adapter starts one itself.
    fresh = body(run(http.handle("POST", f"/v2/models/{MODEL}/infer", JSON, raw)))
    assert fresh["parameters"]["latency_ms"] < 1000


def _answered_response():
    logits = np.arange(20, dtype=np.float32).reshape(2, 10)
    return InferResponse(MODEL, "int8", "r-1", (Tensor(OUTPUT, logits),), {"variant": "int8"})


def test_encode_infer_response_finishes_once_the_outputs_are_encoded():
    response = _answered_response()
    finished = []

    def finish(seen):
        finished.append(seen)
        return {**seen.parameters, "latency_ms": 1.5}

    encoded = encode_infer_response(response, finish)
    assert finished == [response]
    document = json.loads(encoded.body)
    assert document["parameters"] == {"variant": "int8", "latency_ms": 1.5}
    assert document["outputs"][0]["data"] == list(range(20))
    # Without ``finish`` the response's own parameters go out.
    assert json.loads(encode_infer_response(response).body)["parameters"] == {"variant": "int8"}


def test_response_to_proto_finishes_once_the_outputs_are_encoded():
    response = _answered_response()
    finished = []

    def finish(seen):
        finished.append(seen)
        return {**seen.parameters, "budget_met": True}

    message = response_to_proto(response, raw=False, finish=finish)
    assert finished == [response]
    assert parameters_from_proto(message.parameters) == {"variant": "int8", "budget_met": True}
    assert list(message.outputs[0].contents.fp32_contents) == list(range(20))
    raw = response_to_proto(response, raw=True)
    assert parameters_from_proto(raw.parameters) == {"variant": "int8"}
    assert np.frombuffer(raw.raw_output_contents[0], "<f4").tolist() == list(range(20))


def test_a_bad_request_does_not_stop_the_next(http):
    assert infer_status(http, b"{oops")[0] == 400
    assert post_json(http, f"/v2/models/{MODEL}/infer", infer_json(images(1))).status == 200


# --- HTTP: the binary-data extension, with tritonclient's own encoder and decoder ----------


def triton_request(data, outputs=None, binary_input=True, parameters=None):
    tensor = triton_http.InferInput(INPUT, list(data.shape), "FP32")
    tensor.set_data_from_numpy(data, binary_data=binary_input)
    raw, header_length = triton_http.InferenceServerClient.generate_request_body(
        [tensor], outputs=outputs, request_id="tc-1", parameters=parameters
    )
    headers = dict(JSON)
    if header_length is not None:
        headers["inference-header-content-length"] = str(header_length)
    return headers, raw


def triton_result(response):
    assert response.status == 200, response.body
    length = response.headers.get("inference-header-content-length")
    return triton_http.InferenceServerClient.parse_response_body(
        response.body, header_length=None if length is None else int(length)
    )


def test_tritonclient_binary_request_and_binary_response(http, served):
    data = images(4, seed=21)
    headers, raw = triton_request(data)  # no outputs named: every output binary
    assert "inference-header-content-length" in headers
    response = run(http.handle("POST", f"/v2/models/{MODEL}/versions/int8/infer", headers, raw))
    assert response.headers["content-type"] == "application/octet-stream"
    result = triton_result(response)
    logits = result.as_numpy(OUTPUT)
    assert logits.dtype == np.float32
    assert logits.shape == (4, 10)
    np.testing.assert_allclose(
        logits, run_artifact(served.repository, "int8", data), rtol=1e-5, atol=1e-6
    )
    answer = result.get_response()
    assert answer["model_version"] == "int8"
    assert answer["id"] == "tc-1"
    assert answer["outputs"][0]["parameters"]["binary_data_size"] == logits.nbytes


def test_tritonclient_binary_request_with_a_json_response(http, served):
    data = images(2, seed=22)
    outputs = [triton_http.InferRequestedOutput(OUTPUT, binary_data=False)]
    headers, raw = triton_request(data, outputs=outputs, parameters={"latency_budget_ms": 1e6})
    response = run(http.handle("POST", f"/v2/models/{MODEL}/infer", headers, raw))
    assert "inference-header-content-length" not in response.headers
    result = triton_result(response)
    np.testing.assert_allclose(
        result.as_numpy(OUTPUT),
        run_artifact(served.repository, REFERENCE, data),
        rtol=1e-5,
        atol=1e-6,
    )
    assert result.get_response()["parameters"]["variant"] == REFERENCE


def test_tritonclient_json_request_with_a_binary_output(http, served):
    data = images(2, seed=23)
    outputs = [triton_http.InferRequestedOutput(OUTPUT, binary_data=True)]
    headers, raw = triton_request(data, outputs=outputs, binary_input=False)
    assert "inference-header-content-length" not in headers
    result = triton_result(run(http.handle("POST", f"/v2/models/{MODEL}/infer", headers, raw)))
    np.testing.assert_allclose(
        result.as_numpy(OUTPUT),
        run_artifact(served.repository, REFERENCE, data),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (lambda headers, raw: (headers, raw[:-4]), "runs past the end of the body"),
        (lambda headers, raw: (headers, raw + b"\0" * 4), "4 bytes of binary data no input"),
        (
            lambda headers, raw: ({**headers, "inference-header-content-length": "x"}, raw),
            "Inference-Header-Content-Length",
        ),
        (
            lambda headers, raw: (
                {**headers, "inference-header-content-length": str(len(raw) + 1)},
                raw,
            ),
            "exceeds the body",
        ),
    ],
)
def test_inconsistent_binary_bodies_are_400(http, tamper, match):
    headers, raw = tamper(*triton_request(images(1)))
    response = run(http.handle("POST", f"/v2/models/{MODEL}/infer", headers, raw))
    assert response.status == 400
    assert match in body(response)["error"]


# --- gRPC ----------------------------------------------------------------------------------


def call(method, request):
    context = GrpcContext()
    reply = run(method(request, context))
    return reply, context


def typed_request(data, version="", **parameters):
    request = pb.ModelInferRequest(
        model_name=MODEL,
        model_version=version,
        id="g-1",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name=INPUT,
                datatype="FP32",
                shape=list(data.shape),
                contents=pb.InferTensorContents(fp32_contents=data.ravel().tolist()),
            )
        ],
    )
    for key, value in parameters.items():
        request.parameters[key].CopyFrom(parameter_to_proto(value))
    return request


def raw_request(data, version=""):
    return pb.ModelInferRequest(
        model_name=MODEL,
        model_version=version,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name=INPUT, datatype="FP32", shape=list(data.shape)
            )
        ],
        raw_input_contents=[data.astype("<f4").tobytes()],
    )


def test_grpc_health_and_server_metadata(grpc_adapter):
    live, context = call(grpc_adapter.ServerLive, pb.ServerLiveRequest())
    assert live.live is True
    assert context.code is None
    ready, _ = call(grpc_adapter.ServerReady, pb.ServerReadyRequest())
    assert ready.ready is True
    meta, _ = call(grpc_adapter.ServerMetadata, pb.ServerMetadataRequest())
    assert meta.name == "gearbox"
    assert "binary_tensor_data" in meta.extensions


def test_grpc_model_ready(grpc_adapter):
    reply, context = call(grpc_adapter.ModelReady, pb.ModelReadyRequest(name=MODEL))
    assert (reply.ready, context.code) == (True, None)
    reply, _ = call(grpc_adapter.ModelReady, pb.ModelReadyRequest(name=MODEL, version=REJECTED))
    assert reply.ready is False
    reply, context = call(grpc_adapter.ModelReady, pb.ModelReadyRequest(name="nope"))
    assert context.code == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in context.details
    assert reply == pb.ModelReadyResponse()


def test_grpc_model_metadata(grpc_adapter):
    meta, context = call(grpc_adapter.ModelMetadata, pb.ModelMetadataRequest(name=MODEL))
    assert context.code is None
    assert list(meta.versions) == list(READY)
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        (INPUT, "FP32", [-1, 1, 8, 8])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        (OUTPUT, "FP32", [-1, 10])
    ]
    one, _ = call(grpc_adapter.ModelMetadata, pb.ModelMetadataRequest(name=MODEL, version="int8"))
    assert list(one.versions) == ["int8"]
    _, context = call(
        grpc_adapter.ModelMetadata, pb.ModelMetadataRequest(name=MODEL, version=REJECTED)
    )
    assert context.code == grpc.StatusCode.NOT_FOUND
    assert "rejected" in context.details


def test_grpc_infer_typed_contents(grpc_adapter, served):
    data = images(3, seed=31)
    predicted = served.predicted_ms(REFERENCE, rows=3)
    reply, context = call(grpc_adapter.ModelInfer, typed_request(data))
    assert context.code is None
    assert (reply.model_name, reply.model_version, reply.id) == (MODEL, REFERENCE, "g-1")
    assert not reply.raw_output_contents
    [output] = reply.outputs
    assert (output.name, output.datatype, list(output.shape)) == (OUTPUT, "FP32", [3, 10])
    logits = np.asarray(output.contents.fp32_contents, np.float32).reshape(3, 10)
    np.testing.assert_allclose(
        logits, run_artifact(served.repository, REFERENCE, data), rtol=1e-5, atol=1e-6
    )
    parameters = parameters_from_proto(reply.parameters)
    assert parameters["variant"] == REFERENCE
    assert parameters["device_class"] == "cpu"
    assert parameters["budget_met"] is True
    assert reply.parameters["budget_met"].WhichOneof("parameter_choice") == "bool_param"
    assert reply.parameters["predicted_latency_ms"].double_param == predicted
    assert reply.parameters["latency_ms"].WhichOneof("parameter_choice") == "double_param"
    assert served.metrics.requests[-1] == (MODEL, REFERENCE, "cpu", "grpc", "ok")


def test_grpc_infer_raw_contents(grpc_adapter, served):
    data = images(2, seed=32)
    reply, context = call(grpc_adapter.ModelInfer, raw_request(data, version="int8"))
    assert context.code is None
    assert reply.model_version == "int8"
    [raw] = reply.raw_output_contents
    assert not reply.outputs[0].contents.fp32_contents
    logits = np.frombuffer(raw, "<f4").reshape(list(reply.outputs[0].shape))
    np.testing.assert_allclose(
        logits, run_artifact(served.repository, "int8", data), rtol=1e-5, atol=1e-6
    )


def test_grpc_and_http_answer_with_the_same_numbers(grpc_adapter, http):
    data = images(2, seed=33)
    reply, _ = call(grpc_adapter.ModelInfer, typed_request(data, version=FASTEST))
    over_grpc = np.asarray(reply.outputs[0].contents.fp32_contents, np.float32)
    over_http = np.asarray(
        body(post_json(http, f"/v2/models/{MODEL}/versions/{FASTEST}/infer", infer_json(data)))[
            "outputs"
        ][0]["data"],
        np.float32,
    )
    np.testing.assert_array_equal(over_grpc, over_http)


@pytest.mark.parametrize(
    ("value", "variant"),
    [
        (1_000_000, REFERENCE),  # int64_param
        (1e-6, FASTEST),  # double_param
        (str(MIDDLE_BUDGET_MS), "int8"),  # string_param
    ],
)
def test_grpc_budget_parameter_in_every_numeric_form(grpc_adapter, value, variant):
    reply, context = call(
        grpc_adapter.ModelInfer, typed_request(images(1), latency_budget_ms=value)
    )
    assert context.code is None
    assert reply.model_version == variant


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda r: r.parameters["latency_budget_ms"].CopyFrom(parameter_to_proto(True)),
            "latency_budget_ms",
        ),
        (
            lambda r: r.parameters["latency_budget_ms"].CopyFrom(parameter_to_proto("x")),
            "latency_budget_ms",
        ),
        (
            lambda r: r.parameters["routing_key"].CopyFrom(pb.InferParameter()),
            "'routing_key' has no value",
        ),
        (lambda r: r.inputs[0].shape.__setitem__(0, 5), r"'images': shape \[5, 1, 8, 8\]"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP16"), "'images'.*raw_input_contents"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP64"), "'images'"),
        (lambda r: setattr(r.inputs[0], "name", "pixels"), r"missing input\(s\) images"),
        (lambda r: r.raw_input_contents.append(b"\0" * 256), "give raw_input_contents or typed"),
        (lambda r: r.outputs.add(name="probabilities"), "probabilities"),
    ],
)
def test_grpc_malformed_requests_are_invalid_argument(grpc_adapter, mutate, match):
    request = typed_request(images(1))
    mutate(request)
    reply, context = call(grpc_adapter.ModelInfer, request)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(match, context.details), context.details
    assert reply == pb.ModelInferResponse()


def test_grpc_raw_contents_must_match_inputs(grpc_adapter):
    request = raw_request(images(1))
    request.raw_input_contents.append(b"")
    _, context = call(grpc_adapter.ModelInfer, request)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "2 entries for 1 inputs" in context.details
    short = raw_request(images(1))
    short.raw_input_contents[0] = short.raw_input_contents[0][:-1]
    _, context = call(grpc_adapter.ModelInfer, short)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'images'" in context.details and "255" in context.details


def test_grpc_huge_shape_is_invalid_argument(grpc_adapter):
    request = raw_request(images(1))
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([2**32, 2**32])
    request.raw_input_contents[0] = b""
    _, context = call(grpc_adapter.ModelInfer, request)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_not_found(grpc_adapter):
    request = typed_request(images(1))
    request.model_name = "nope"
    _, context = call(grpc_adapter.ModelInfer, request)
    assert context.code == grpc.StatusCode.NOT_FOUND
    _, context = call(grpc_adapter.ModelInfer, typed_request(images(1), version=REJECTED))
    assert context.code == grpc.StatusCode.NOT_FOUND
    assert "rejected" in context.details


def test_grpc_unavailable_and_internal_errors(serving, tiny_repository):
    servicer = GrpcServicer(serving(configured=(DEVICE, "gpu")).plane)
    _, context = call(servicer.ModelInfer, typed_request(images(1), device_class="gpu"))
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert "gpu" in context.details
    failing = FakeBackend(DEVICE, error=RuntimeError("secret stack detail"))
    plane = DataPlane(Catalog.load(tiny_repository), [failing], [DEVICE], RecordingMetrics())
    reply, context = call(GrpcServicer(plane).ModelInfer, typed_request(images(1)))
    assert (context.code, context.details) == (grpc.StatusCode.INTERNAL, "internal error")
    assert reply == pb.ModelInferResponse()


def test_grpc_overload_is_resource_exhausted(serving):
    served = serving(batching=BatchingConfig(max_queue=2))
    servicer = GrpcServicer(served.plane)
    contexts = [GrpcContext() for _ in range(4)]

    async def main():
        async with Gate(served.backend.executor, served.backend.times).held():
            tasks = [
                asyncio.ensure_future(
                    servicer.ModelInfer(typed_request(images(1), version=REFERENCE), context)
                )
                for context in contexts
            ]
            await until(lambda: sum(t.done() for t in tasks) == 2)
        return await asyncio.gather(*tasks)

    replies = run(main())
    assert [c.code for c in contexts] == [None, None, *[grpc.StatusCode.RESOURCE_EXHAUSTED] * 2]
    assert "max_queue 2" in contexts[2].details
    assert [reply.model_version for reply in replies[:2]] == [REFERENCE, REFERENCE]
    assert replies[2] == pb.ModelInferResponse()
    assert served.metrics.codes() == ["resource_exhausted"] * 2 + ["ok"] * 2
    assert {protocol for *_, protocol, _ in served.metrics.requests} == {"grpc"}


def test_grpc_a_bad_request_does_not_stop_the_next(grpc_adapter):
    bad = typed_request(images(1))
    bad.inputs[0].datatype = "NOPE"
    _, context = call(grpc_adapter.ModelInfer, bad)
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    reply, context = call(grpc_adapter.ModelInfer, typed_request(images(1)))
    assert context.code is None
    assert reply.model_version == REFERENCE


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (True, "bool_param"),
        (False, "bool_param"),
        (-(2**40), "int64_param"),
        (0, "int64_param"),
        (2.5, "double_param"),
        ("cpu,gpu", "string_param"),
        ("", "string_param"),
    ],
)
def test_parameters_round_trip(value, field):
    message = parameter_to_proto(value)
    assert message.WhichOneof("parameter_choice") == field
    request = pb.ModelInferRequest()
    request.parameters["p"].CopyFrom(message)
    decoded = parameters_from_proto(
        pb.ModelInferRequest.FromString(request.SerializeToString()).parameters
    )
    assert decoded == {"p": value}
    assert type(decoded["p"]) is type(value)


def test_uint64_parameters_are_read_as_integers():
    request = pb.ModelInferRequest()
    request.parameters["n"].uint64_param = 2**63
    assert parameters_from_proto(request.parameters) == {"n": 2**63}


@pytest.mark.parametrize("build", [typed_request, raw_request])
def test_model_infer_request_survives_pickling(grpc_adapter, served, build):
    # Ray Serve's gRPC proxy pickles each request on its way to the replica.
    data = images(2, seed=41)
    request = build(data, version="int8")
    request.parameters["routing_key"].CopyFrom(parameter_to_proto("user-1"))
    copy = pickle.loads(pickle.dumps(request))
    assert copy == request
    assert copy.SerializeToString() == request.SerializeToString()
    reply, context = call(grpc_adapter.ModelInfer, copy)
    assert context.code is None
    assert reply.model_version == "int8"
    assert pickle.loads(pickle.dumps(reply)) == reply
