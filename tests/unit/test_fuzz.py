"""Property-based fuzzing of inference request decoding, through the real adapters.

The cases of :mod:`tests.fixtures.oip_fuzz` (malformed JSON, the binary-data extension, gRPC
messages) go through :class:`HttpAdapter` and :class:`GrpcServicer` over the unit tests' warmed-up
data plane. Property: every bad request is a client error (HTTP 400/404/413/429; a gRPC status
other than INTERNAL, UNKNOWN, UNAVAILABLE, ...) with a message, every good one is answered, and
a valid request right after any case still succeeds. Examples are derandomized, with no example
database, so every run (and CI) tries the same cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import Request
from starlette.responses import Response

from gearbox.serving.app import read_body
from gearbox.serving.cli import _gateway_config, _parser
from gearbox.serving.clock import add_inference_service
from gearbox.serving.grpc.adapter import GrpcServicer
from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
from gearbox.serving.inference import TensorLimits, tensor_from_values
from gearbox.serving.rest.adapter import HttpAdapter, HttpResponse
from tests.fixtures.oip_fuzz import (
    BINARY_KINDS,
    GRPC_KINDS,
    JSON_KINDS,
    GrpcCase,
    HttpCase,
    draw_cases,
    encode,
    fuzz_live,
    good_tensor,
    grpc_acceptable,
    grpc_cases,
    http_acceptable,
    http_binary_cases,
    http_cases,
    http_json_cases,
    infer_path,
    input_json,
    typed_input,
)
from tests.unit.serving_fixtures import (
    MODEL,
    PATIENCE_S,
    READY,
    GrpcContext,
    Served,
    run,
    serve,
)
from tests.unit.tiny_model import CONV_SIGNATURE

INPUTS = CONV_SIGNATURE.inputs
FUZZ = settings(
    max_examples=20,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def stack(tiny_repository) -> Iterator[Served]:
    """One stack for every example (a fixture per example would rebuild it hundreds of times);
    no shadow runs, so that bad requests are all that reaches the reference."""
    served = serve(tiny_repository, shadow_fraction=0.0)
    yield served
    served.close()


@pytest.fixture(scope="module")
def http(stack: Served) -> HttpAdapter:
    return HttpAdapter(stack.plane)


@pytest.fixture(scope="module")
def servicer(stack: Served) -> GrpcServicer:
    return GrpcServicer(stack.plane)


def send_http(http: HttpAdapter, case: HttpCase) -> HttpResponse:
    # Starlette hands the adapter lower-case header names.
    headers = {name.lower(): value for name, value in case.headers.items()}
    return run(http.handle("POST", case.path, headers, case.body))


def send_grpc(servicer: GrpcServicer, request: pb.ModelInferRequest) -> GrpcContext:
    # Through the wire format, as a server would receive it.
    received = pb.ModelInferRequest.FromString(request.SerializeToString())
    context = GrpcContext()
    run(servicer.ModelInfer(received, context))
    return context


def valid_http_case(rows: int = 1) -> HttpCase:
    tensor = good_tensor(INPUTS[0], rows, data_seed=rows)
    return HttpCase("valid", infer_path(MODEL), encode({"inputs": [input_json(tensor)]}))


def valid_grpc_request(rows: int = 1) -> pb.ModelInferRequest:
    tensor = good_tensor(INPUTS[0], rows, data_seed=rows)
    return pb.ModelInferRequest(model_name=MODEL, inputs=[typed_input(tensor)])


def check_http(http: HttpAdapter, case: HttpCase) -> None:
    reply = send_http(http, case)
    detail = reply.body[:300]
    assert http_acceptable(case, reply.status), (case.label, reply.status, detail)
    if reply.status != 200:
        assert json.loads(reply.body)["error"], (case.label, detail)
    assert send_http(http, valid_http_case()).status == 200, f"after {case.label}"


def check_grpc(servicer: GrpcServicer, case: GrpcCase) -> None:
    context = send_grpc(servicer, case.request)
    code = context.code or grpc.StatusCode.OK
    assert grpc_acceptable(case, code), (case.label, code, context.details)
    if code is not grpc.StatusCode.OK:
        assert context.details, case.label
    assert send_grpc(servicer, valid_grpc_request()).code is None, f"after {case.label}"


@FUZZ
@pytest.mark.parametrize("kind", JSON_KINDS)
@given(data=st.data())
def test_json_requests_never_get_a_server_error(
    http: HttpAdapter, kind: str, data: st.DataObject
) -> None:
    case = data.draw(http_json_cases(MODEL, INPUTS, READY, kinds=[kind]), label="case")
    check_http(http, case)


@FUZZ
@pytest.mark.parametrize("kind", BINARY_KINDS)
@given(data=st.data())
def test_binary_data_requests_never_get_a_server_error(
    http: HttpAdapter, kind: str, data: st.DataObject
) -> None:
    case = data.draw(http_binary_cases(MODEL, INPUTS, READY, kinds=[kind]), label="case")
    check_http(http, case)


@FUZZ
@pytest.mark.parametrize("kind", GRPC_KINDS)
@given(data=st.data())
def test_grpc_requests_never_get_a_server_error(
    servicer: GrpcServicer, kind: str, data: st.DataObject
) -> None:
    case = data.draw(grpc_cases(MODEL, INPUTS, READY, kinds=[kind]), label="case")
    check_grpc(servicer, case)


def test_a_seed_fixes_the_cases() -> None:
    """What makes a benchmark's fuzz run repeatable."""
    first = list(draw_cases(http_cases(MODEL, INPUTS, READY), 150, seed_value=7))
    again = list(draw_cases(http_cases(MODEL, INPUTS, READY), 150, seed_value=7))
    other = list(draw_cases(http_cases(MODEL, INPUTS, READY), 150, seed_value=8))
    assert first == again
    assert first != other
    with pytest.raises(ValueError, match="unknown kinds"):
        grpc_cases(MODEL, INPUTS, kinds=["grpc-valid", "no-such-kind"])


# --- what fuzzing found, kept as plain regression tests ---------------------------------------


@pytest.mark.parametrize("shape", [[0, 10**30], [0, 2**62, 2**62], [2, 0, 2**63 - 1]])
def test_a_zero_size_shape_with_a_huge_dimension_is_413_not_an_internal_error(
    http: HttpAdapter, servicer: GrpcServicer, shape: list[int]
) -> None:
    document = {"inputs": [{"name": "images", "datatype": "FP32", "shape": shape, "data": []}]}
    reply = send_http(http, HttpCase("zero-size", infer_path(MODEL), encode(document)))
    assert reply.status == 413
    assert "'images'" in json.loads(reply.body)["error"]
    if max(shape) < 2**63:  # what an int64 shape holds
        request = pb.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="images", datatype="FP32", shape=shape)
        request.raw_input_contents.append(b"")
        assert send_grpc(servicer, request).code is grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("value", [10**400, -(2**63) - 1, 2**64])
def test_a_parameter_integer_beyond_64_bits_is_400(http: HttpAdapter, value: int) -> None:
    tensor = good_tensor(INPUTS[0], 1, data_seed=0)
    document = {"inputs": [input_json(tensor)], "parameters": {"latency_budget_ms": value}}
    reply = send_http(http, HttpCase("long", infer_path(MODEL), encode(document)))
    assert reply.status == 400
    assert "'latency_budget_ms' is an integer beyond 64 bits" in json.loads(reply.body)["error"]
    document["parameters"] = {"latency_budget_ms": 2**64 - 1}  # uint64's largest: a number
    assert send_http(http, HttpCase("long", infer_path(MODEL), encode(document))).status == 200


@pytest.mark.parametrize("value", ["NaN", "1.5", "inf", "x"])
def test_strings_are_not_numbers(http: HttpAdapter, value: str) -> None:
    data: list[object] = [0.0] * 64
    data[3] = value
    document = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8],
                            "data": data}]}  # fmt: skip
    reply = send_http(http, HttpCase("string", infer_path(MODEL), encode(document)))
    assert reply.status == 400
    assert "'images': data must be FP32 numbers" in json.loads(reply.body)["error"]
    with pytest.raises(Exception, match="BOOL numbers"):
        tensor_from_values("flags", "BOOL", [1], [value])


def test_integer_data_keeps_numpys_range_checks() -> None:
    assert tensor_from_values("x", "UINT8", [2], [0, 255]).data.tolist() == [0, 255]
    with pytest.raises(Exception, match="UINT8 numbers"):
        tensor_from_values("x", "UINT8", [1], [256])
    with pytest.raises(Exception, match="INT32 numbers"):
        tensor_from_values("x", "INT32", [1], [float("nan")])


# --- limits -----------------------------------------------------------------------------------


def test_rows_and_elements_beyond_the_limits_are_refused_naming_the_limit(stack: Served) -> None:
    limits = TensorLimits(max_rows=3, max_elements=150)
    http = HttpAdapter(stack.plane, limits=limits)
    servicer = GrpcServicer(stack.plane, limits)

    assert send_http(http, valid_http_case(rows=2)).status == 200  # 128 elements
    too_large = send_http(http, valid_http_case(rows=3))  # 192 elements
    assert too_large.status == 413
    assert "limit of 150 elements per tensor" in json.loads(too_large.body)["error"]
    too_many = send_http(http, valid_http_case(rows=4))
    assert too_many.status == 400
    assert "4 rows" in json.loads(too_many.body)["error"]
    assert "limit of 3 rows per request" in json.loads(too_many.body)["error"]

    assert send_grpc(servicer, valid_grpc_request(rows=2)).code is None
    context = send_grpc(servicer, valid_grpc_request(rows=3))
    assert context.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "150 elements" in (context.details or "")
    context = send_grpc(servicer, valid_grpc_request(rows=4))
    assert context.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "3 rows" in (context.details or "")


def test_the_default_limits_refuse_a_declared_shape_before_any_array_is_built(
    http: HttpAdapter,
) -> None:
    rows = TensorLimits().max_rows + 1
    tensor = good_tensor(INPUTS[0], 1, data_seed=0)
    document = {"inputs": [{**input_json(tensor), "shape": [rows, 1, 8, 8]}]}
    reply = send_http(http, HttpCase("rows", infer_path(MODEL), encode(document)))
    assert reply.status == 400
    assert f"{rows} rows" in json.loads(reply.body)["error"]


def test_serve_options_set_the_limits(tmp_path) -> None:
    default = _gateway_config(_parser().parse_args(["serve", "--repo", str(tmp_path)]))
    assert default.tensor_limits == TensorLimits()
    args = ["serve", "--repo", str(tmp_path), "--max-request-rows", "16",
            "--max-tensor-elements", "1000"]  # fmt: skip
    chosen = _gateway_config(_parser().parse_args(args))
    assert chosen.tensor_limits == TensorLimits(max_rows=16, max_elements=1000)
    with pytest.raises(SystemExit):
        _parser().parse_args([*args[:3], "--max-request-rows", "0"])


# --- fuzz_live, against real servers ---------------------------------------------------------


@contextlib.contextmanager
def live_gateway(stack: Served) -> Iterator[tuple[str, str]]:
    """The stack behind a real HTTP server (uvicorn, which Ray Serve's proxy runs too) and a
    real ``grpc.aio`` server, on loopback ports of their own, in a thread with its own event
    loop; yields (HTTP URL, gRPC target)."""
    http = HttpAdapter(stack.plane)
    addresses: queue.Queue[tuple[str, str]] = queue.Queue()
    stop = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        body = await read_body(request, 64 * 1024 * 1024)
        reply = await http.handle(request.method, request.url.path, request.headers, body)
        response = Response(reply.body, status_code=reply.status, headers=dict(reply.headers))
        await response(scope, receive, send)

    async def main() -> None:
        grpc_server = grpc.aio.server()
        add_inference_service(GrpcServicer(stack.plane), grpc_server)
        grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        web = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        )
        serving = asyncio.ensure_future(web.serve())
        while not web.started:
            await asyncio.sleep(0.01)
        http_port = web.servers[0].sockets[0].getsockname()[1]
        addresses.put((f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"))
        while not stop.is_set():
            await asyncio.sleep(0.05)
        web.should_exit = True
        await serving
        await grpc_server.stop(None)

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    try:
        yield addresses.get(timeout=PATIENCE_S)
    finally:
        stop.set()
        thread.join(PATIENCE_S)


def test_fuzz_live_counts_every_answer_of_a_live_gateway(stack: Served) -> None:
    with live_gateway(stack) as (http_url, grpc_target):
        report = fuzz_live(http_url, grpc_target, MODEL, cases_per_protocol=40, seed=3)
    assert report["server_errors"] == 0
    for protocol in ("http", "grpc"):
        figures = report[protocol]
        assert figures["cases"] == 40
        assert sum(figures["by_status"].values()) == 40
        assert sum(figures["by_label"].values()) == 40
        assert figures["unexpected_answers_by_label"] == {}
        assert figures["healthy_after"] is True
    assert {"200", "400"} <= report["http"]["by_status"].keys()
    assert {"OK", "INVALID_ARGUMENT"} <= report["grpc"]["by_status"].keys()


def test_fuzz_live_counts_a_gateway_it_cannot_reach_as_server_errors(stack: Served) -> None:
    with live_gateway(stack) as (http_url, _):
        # Nothing listens on port 1: every gRPC call fails to connect.
        report = fuzz_live(http_url, "127.0.0.1:1", MODEL, cases_per_protocol=10, seed=3)
    assert report["grpc"]["server_errors"] == 10
    assert report["grpc"]["by_status"] == {"UNAVAILABLE": 10}
    assert report["grpc"]["healthy_after"] is False
    assert report["server_errors"] == 10
