"""The budget's clock: stamped where a request reaches the server, with the gRPC deadline.

HTTP: :class:`ArrivalMiddleware` is driven through the raw ASGI interface. gRPC: a tiny server
object shows which handlers :func:`add_inference_service` wraps, and a real ``grpc.aio`` server
on 127.0.0.1 (building its handlers through ``service_handler_factory``, as Ray Serve's does)
answers a real client whose timeout becomes the request's latency budget.
"""

from __future__ import annotations

import asyncio
import enum
import time

import grpc
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from gearbox.serving.clock import (
    GRPC_SERVICE_PREFIX,
    ArrivalMiddleware,
    RequestClock,
    add_inference_service,
    arrival,
    held_by_the_ingress_s,
    http_middlewares,
)
from gearbox.serving.grpc.adapter import GrpcServicer, parameter_to_proto, parameters_from_proto
from gearbox.serving.grpc.generated import grpc_service_pb2 as pb
from gearbox.serving.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from gearbox.serving.haproxy_launcher import BODY_WAIT_S, HELD_HEADER
from gearbox.serving.queue_model import BatchCost, variant_key
from tests.unit.serving_fixtures import DEVICE, INPUT, MODEL, REFERENCE, images, started


class StreamingType(enum.Enum):
    """The shape of Ray Serve's ``gRPCStreamingType`` (the clock reads only the name)."""

    UNARY_UNARY = 1
    UNARY_STREAM = 2
    STREAM_UNARY = 3
    STREAM_STREAM = 4


# --- RequestClock and arrival() ---------------------------------------------------------------


def test_a_clock_counts_from_its_arrival():
    before = time.perf_counter()
    clock = RequestClock.start()
    assert before <= clock.arrived <= time.perf_counter()
    assert clock.deadline_ms is None
    assert clock.elapsed_ms() >= 0
    assert RequestClock(time.perf_counter() - 0.5).elapsed_ms() >= 500
    assert RequestClock.start(deadline_ms=250.0).deadline_ms == 250.0


def test_arrival_without_a_stamp_starts_now():
    async def main():
        before = time.perf_counter()
        first, second = arrival(), arrival()
        return before, first, second, time.perf_counter()

    before, first, second, after = asyncio.run(main())
    assert before <= first.arrived <= second.arrived <= after
    assert first is not second  # nothing stamped: each call starts a clock of its own
    assert first.deadline_ms is None
    assert first.direct is False  # a proxy forwarded it, or nothing was in front


# --- HTTP: the ASGI middleware ----------------------------------------------------------------


class Recorder:
    """An ASGI app that records what arrival() says inside it, before and after the body."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, RequestClock, RequestClock, float]] = []

    async def __call__(self, scope, receive, send):
        entered = time.perf_counter()
        first = arrival()
        await receive()
        await asyncio.sleep(0)
        self.seen.append((scope["type"], first, arrival(), entered))
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})


async def call_asgi(app, scope_type="http", headers=()):
    scope = {"type": scope_type, "method": "GET", "path": "/", "headers": list(headers)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_the_middleware_stamps_each_http_request_before_the_app_runs():
    recorder = Recorder()
    middleware = ArrivalMiddleware(recorder)

    async def main():
        before = time.perf_counter()
        sent = await call_asgi(middleware)
        return before, sent

    before, sent = asyncio.run(main())
    [(kind, first, later, entered)] = recorder.seen
    assert kind == "http"
    assert first is later  # one clock for the whole request, however long it takes
    assert before <= first.arrived <= entered
    assert first.deadline_ms is None
    assert first.direct is True
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


@pytest.mark.parametrize(
    ("held", "moved_s"),
    [
        (b"60000", 0.060),  # the ingress held the request 60 ms waiting for its body
        (b"0", 0.0),
        (b"-5", 0.0),  # never later than the replica's own arrival
        (b"soon", 0.0),  # not a count: ignored
        (b"9" * 30, float(BODY_WAIT_S)),  # never more than the ingress waits for a body
    ],
)
def test_the_time_the_ingress_held_the_request_counts(held, moved_s):
    recorder = Recorder()
    middleware = ArrivalMiddleware(recorder)
    header = (HELD_HEADER.encode(), held)

    async def main():
        before = time.perf_counter()
        await call_asgi(middleware, headers=[(b"host", b"x"), header])
        return before, time.perf_counter()

    before, after = asyncio.run(main())
    [(_kind, first, _later, _entered)] = recorder.seen
    assert before - moved_s <= first.arrived <= after - moved_s


def test_held_by_the_ingress_reads_microseconds():
    assert held_by_the_ingress_s("2500") == pytest.approx(0.0025)
    assert held_by_the_ingress_s(None) == 0.0
    assert held_by_the_ingress_s(b"1.5") == 0.0


def test_concurrent_requests_get_a_clock_each_and_nothing_leaks_out():
    recorder = Recorder()
    middleware = ArrivalMiddleware(recorder)

    async def main():
        await asyncio.gather(call_asgi(middleware), call_asgi(middleware))
        return arrival(), arrival()

    outside, again = asyncio.run(main())
    (_, one, one_later, _), (_, two, two_later, _) = recorder.seen
    assert one is one_later
    assert two is two_later
    assert one is not two
    assert outside is not again  # the caller's own context was never stamped


def test_the_middleware_leaves_other_scopes_alone():
    recorder = Recorder()
    asyncio.run(call_asgi(ArrivalMiddleware(recorder), scope_type="lifespan"))
    [(kind, first, later, _)] = recorder.seen
    assert kind == "lifespan"
    assert first is not later


def test_http_middlewares_put_the_stamp_in_front_of_a_starlette_app():
    [middleware] = http_middlewares()
    assert middleware.cls is ArrivalMiddleware
    clocks = []

    async def endpoint(request):
        clocks.append((arrival(), arrival()))
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/", endpoint)], middleware=http_middlewares())
    sent = asyncio.run(call_asgi(app))
    [(first, second)] = clocks
    assert first is second
    assert sent[0]["status"] == 200


# --- gRPC: which handlers are wrapped ---------------------------------------------------------


class FactoryServer:
    """The parts of Ray Serve's gRPC server that add_inference_service touches."""

    def __init__(self) -> None:
        self.built: list[tuple[str, StreamingType]] = []
        self.generic: list[object] = []
        self.registered: list[tuple[str, dict]] = []
        self.service_handler_factory = self.factory

    def factory(self, service_method, streaming_type):
        self.built.append((service_method, streaming_type))

        async def handler(request, context):
            clock = arrival()
            return (request, clock, arrival() is clock)

        return handler

    def add_generic_rpc_handlers(self, handlers):
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service, handlers):
        self.registered.append((service, handlers))


class Deadline:
    """A gRPC context with the two methods the clock reads."""

    def __init__(self, remaining_s, metadata=None):
        self.remaining_s = remaining_s
        self.metadata = metadata

    def time_remaining(self):
        return self.remaining_s

    def invocation_metadata(self):
        return self.metadata


MODEL_INFER = f"{GRPC_SERVICE_PREFIX}ModelInfer"
SERVICER = GrpcServicer(None)  # type: ignore[arg-type]
"""Registration only looks its methods up (Ray Serve registers a Mock in its place)."""


def test_add_inference_service_registers_oip_and_wraps_the_factory():
    server = FactoryServer()
    original = server.service_handler_factory
    add_inference_service(SERVICER, server)
    assert server.service_handler_factory is not original
    [(service, handlers)] = server.registered
    assert service == "inference.GRPCInferenceService"
    assert {"ServerLive", "ServerReady", "ModelReady", "ModelMetadata", "ModelInfer"} <= set(
        handlers
    )
    assert len(server.generic) == 1


@pytest.mark.parametrize(
    ("method", "streaming", "wrapped"),
    [
        (MODEL_INFER, StreamingType.UNARY_UNARY, True),
        (f"{GRPC_SERVICE_PREFIX}ServerReady", StreamingType.UNARY_UNARY, True),
        (MODEL_INFER, StreamingType.UNARY_STREAM, False),
        (MODEL_INFER, StreamingType.STREAM_UNARY, False),
        (MODEL_INFER, StreamingType.STREAM_STREAM, False),
        ("/ray.serve.RayServeAPIService/ListApplications", StreamingType.UNARY_UNARY, False),
        ("/other.GRPCInferenceService/ModelInfer", StreamingType.UNARY_UNARY, False),
    ],
)
def test_only_unary_oip_handlers_are_wrapped(method, streaming, wrapped):
    server = FactoryServer()
    add_inference_service(SERVICER, server)
    server.built.clear()
    handler = server.service_handler_factory(service_method=method, streaming_type=streaming)
    # The original factory built the handler either way, for this method and shape.
    assert server.built == [(method, streaming)]
    assert (handler.__name__ == "clocked") is wrapped


@pytest.mark.parametrize(("remaining_s", "deadline_ms"), [(2.5, 2500.0), (None, None)])
def test_a_wrapped_handler_sees_the_arrival_and_the_callers_deadline(remaining_s, deadline_ms):
    server = FactoryServer()
    add_inference_service(SERVICER, server)
    handler = server.service_handler_factory(
        service_method=MODEL_INFER, streaming_type=StreamingType.UNARY_UNARY
    )

    async def main():
        before = time.perf_counter()
        return before, await handler("request", Deadline(remaining_s)), time.perf_counter()

    before, (request, clock, same), after = asyncio.run(main())
    assert request == "request"  # the reply passes through
    assert same  # one clock for the call
    assert clock.deadline_ms == (None if deadline_ms is None else pytest.approx(deadline_ms))
    assert before <= clock.arrived <= after
    assert clock.direct is True


def test_a_grpc_call_the_ingress_held_starts_earlier_with_more_of_its_deadline():
    server = FactoryServer()
    add_inference_service(SERVICER, server)
    handler = server.service_handler_factory(
        service_method=MODEL_INFER, streaming_type=StreamingType.UNARY_UNARY
    )
    held = Deadline(2.5, metadata=(("user-agent", "grpc"), (HELD_HEADER, "40000")))

    async def main():
        before = time.perf_counter()
        return before, await handler("request", held), time.perf_counter()

    before, (_request, clock, _same), after = asyncio.run(main())
    assert before - 0.040 <= clock.arrived <= after - 0.040
    # The caller's deadline ran while the ingress held the call: 2.5 s left at the replica
    # were 2.54 s when the clock starts.
    assert clock.deadline_ms == pytest.approx(2540.0)


def test_a_server_without_a_handler_factory_just_gets_the_service():
    class PlainServer:
        def __init__(self):
            self.services = []

        def add_generic_rpc_handlers(self, handlers):
            self.services.extend(handlers)

        def add_registered_method_handlers(self, service, handlers):
            self.services.append(service)

    server = PlainServer()
    add_inference_service(SERVICER, server)
    assert "inference.GRPCInferenceService" in server.services
    assert not hasattr(server, "service_handler_factory")


# --- gRPC: a real server and client -----------------------------------------------------------


class ServeLikeServer:
    """A real ``grpc.aio`` server whose handlers come from ``service_handler_factory``, as in
    Ray Serve (there, the factory routes to the replica; here, to the servicer directly)."""

    def __init__(self, servicer: GrpcServicer) -> None:
        self.server = grpc.aio.server()
        self._servicer = servicer
        self.service_handler_factory = self._dispatch

    def _dispatch(self, service_method, streaming_type):
        method = getattr(self._servicer, service_method.rsplit("/", 1)[1])

        async def handler(request, context):
            return await method(request, context)

        return handler

    def add_generic_rpc_handlers(self, handlers):
        """The registered handlers below carry the same methods."""

    def add_registered_method_handlers(self, service, handlers):
        built = {
            name: handler._replace(
                unary_unary=self.service_handler_factory(
                    service_method=f"/{service}/{name}",
                    streaming_type=StreamingType.UNARY_UNARY,
                )
            )
            for name, handler in handlers.items()
        }
        generic = grpc.method_handlers_generic_handler(service, built)
        self.server.add_generic_rpc_handlers((generic,))


def infer_request(version="", **parameters):
    data = images(1, seed=4)
    request = pb.ModelInferRequest(
        model_name=MODEL,
        model_version=version,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name=INPUT, datatype="FP32", shape=list(data.shape)
            )
        ],
        raw_input_contents=[data.astype("<f4").tobytes()],
    )
    for key, value in parameters.items():
        request.parameters[key].CopyFrom(parameter_to_proto(value))
    return request


def test_a_real_grpc_call_gets_its_deadline_as_its_budget(tiny_repository):
    timeout_s = 60.0

    async def main():
        async with started(tiny_repository, shadow_fraction=0.0) as served:
            # fp32 is predicted at 100 s: it fits no 60 s deadline, and int8 (100 ms) does.
            served.backend.times.seed(
                variant_key(MODEL, REFERENCE), DEVICE, BatchCost(100_000.0, 0.0)
            )
            server = ServeLikeServer(GrpcServicer(served.plane))
            add_inference_service(GrpcServicer(served.plane), server)
            port = server.server.add_insecure_port("127.0.0.1:0")
            await server.server.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = pb_grpc.GRPCInferenceServiceStub(channel)
                    ready = await stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout_s)
                    with_deadline = await stub.ModelInfer(infer_request(), timeout=timeout_s)
                    without = await stub.ModelInfer(infer_request())
                    explicit = await stub.ModelInfer(
                        infer_request(latency_budget_ms=1e6), timeout=timeout_s
                    )
                    with pytest.raises(grpc.aio.AioRpcError) as missing:
                        await stub.ModelInfer(infer_request(version="int4"), timeout=timeout_s)
            finally:
                await server.server.stop(None)
            return ready, with_deadline, without, explicit, missing.value, served.metrics

    ready, with_deadline, without, explicit, missing, metrics = asyncio.run(main())
    assert ready.ready is True
    deadline = parameters_from_proto(with_deadline.parameters)
    assert with_deadline.model_version == "int8"
    # The caller's timeout, as the server sees it remaining (gRPC's wire encoding of the
    # timeout rounds it up a little).
    assert 0.5 * timeout_s * 1000 < deadline["latency_budget_ms"] <= 1.01 * timeout_s * 1000
    assert deadline["budget_met"] is True
    # No deadline, no budget: the reference answers, however slow it is predicted.
    assert without.model_version == REFERENCE
    assert "latency_budget_ms" not in parameters_from_proto(without.parameters)
    # A budget the request names wins over the deadline.
    assert explicit.model_version == REFERENCE
    assert parameters_from_proto(explicit.parameters)["latency_budget_ms"] == 1e6
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert "'int4'" in missing.details()
    assert metrics.selections == [
        (MODEL, "int8", "within_budget"),
        (MODEL, REFERENCE, "reference"),
        (MODEL, REFERENCE, "within_budget"),
    ]
    assert [code for *_, code in metrics.requests] == ["ok", "ok", "ok", "not_found"]
    assert {protocol for *_, protocol, _ in metrics.requests} == {"grpc"}
