"""The budget's clock: when a request reached the gateway replica's server, and its deadline.

A caller's latency budget counts from the moment the request reaches the gateway replica's
server, before its body is read, to the moment its response is encoded (DESIGN §5). Under the
HAProxy ingress each gateway replica runs its own HTTP and gRPC servers, and two hooks stamp
the arrival there, in the request's own context:

- HTTP: :class:`ArrivalMiddleware`, the outermost ASGI middleware of the replica's server (Ray
  Serve installs what :func:`http_middlewares` returns, named by
  ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``), runs as soon as the headers are parsed.
- gRPC: :func:`add_inference_service` registers ``inference.GRPCInferenceService`` and wraps
  the handlers Ray Serve's server builds for it, so each call is stamped when its handler
  starts and carries the remaining time of the caller's deadline.

Under the classic proxy (or a cluster started without these hooks) the gateway starts the
clock itself when its entry point is called; the proxy in front is outside the span either way.

HAProxy reads each request whole before forwarding it, so that it can resend it to another
replica if this one dies (:mod:`gearbox.serving.haproxy_launcher`). A body that reached HAProxy
late would then be outside the span: HAProxy reports how long it held the request after its
head (:data:`~gearbox.serving.haproxy_launcher.HELD_HEADER`, microseconds on its own clock),
and both hooks start the clock that much earlier.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from gearbox.serving.grpc.generated.grpc_service_pb2_grpc import (
    add_GRPCInferenceServiceServicer_to_server,
)
from gearbox.serving.haproxy_launcher import BODY_WAIT_S, HELD_HEADER

GRPC_SERVICE_PREFIX = "/inference.GRPCInferenceService/"


@dataclass(frozen=True)
class RequestClock:
    """When a request arrived (``time.perf_counter`` seconds) and how long its caller waits."""

    arrived: float
    deadline_ms: float | None = None
    """gRPC: the caller's deadline as milliseconds remaining at arrival; None without one."""
    direct: bool = False
    """Stamped by this replica's own server (the HAProxy ingress's direct path); False when a
    proxy forwarded the request and the gateway started the clock itself."""

    @classmethod
    def start(cls, deadline_ms: float | None = None) -> RequestClock:
        return cls(time.perf_counter(), deadline_ms)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.arrived) * 1000


_ARRIVAL: ContextVar[RequestClock | None] = ContextVar("gearbox_arrival", default=None)

_HELD_HEADER_BYTES = HELD_HEADER.encode()


def held_by_the_ingress_s(value: str | bytes | None) -> float:
    """Seconds the ingress held a request before forwarding it, from its
    :data:`~gearbox.serving.haproxy_launcher.HELD_HEADER`; 0 when absent or not a count of
    microseconds, and never more than the ingress waits for a body."""
    if value is None:
        return 0.0
    try:
        held_us = int(value)
    except ValueError:
        return 0.0
    return min(max(held_us, 0) / 1e6, float(BODY_WAIT_S))


def arrival() -> RequestClock:
    """This request's clock: stamped by the server hooks, else started now."""
    return _ARRIVAL.get() or RequestClock.start()


class ArrivalMiddleware:
    """Pure ASGI: stamps each HTTP request before anything else in the server touches it."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            arrived = time.perf_counter()
            held = next((v for k, v in scope["headers"] if k == _HELD_HEADER_BYTES), None)
            _ARRIVAL.set(RequestClock(arrived - held_by_the_ingress_s(held), direct=True))
        await self._app(scope, receive, send)


def http_middlewares() -> list[Middleware]:
    """What ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names: the arrival stamp."""
    return [Middleware(ArrivalMiddleware)]


UnaryHandler = Callable[[Any, Any], Awaitable[Any]]


def _clocked(handler: UnaryHandler) -> UnaryHandler:
    async def clocked(request: Any, context: Any) -> Any:
        arrived = time.perf_counter()
        remaining = context.time_remaining()
        deadline_ms = remaining * 1000 if remaining is not None else None
        metadata = context.invocation_metadata() or ()
        held = held_by_the_ingress_s(next((v for k, v in metadata if k == HELD_HEADER), None))
        # The caller's deadline ran while the ingress held the call, too.
        if deadline_ms is not None:
            deadline_ms += held * 1000
        _ARRIVAL.set(RequestClock(arrived - held, deadline_ms, direct=True))
        return await handler(request, context)

    return clocked


def _clocking(factory: Callable[..., Any]) -> Callable[..., Any]:
    def make_handler(service_method: str, streaming_type: Any) -> Any:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        unary = getattr(streaming_type, "name", "") == "UNARY_UNARY"
        if unary and service_method.startswith(GRPC_SERVICE_PREFIX):
            return _clocked(handler)
        return handler

    return make_handler


def add_inference_service(servicer: object, server: Any) -> None:
    """Ray Serve's ``grpc_servicer_functions`` entry for ``inference.GRPCInferenceService``.

    Ray Serve's gRPC server builds every handler through its ``service_handler_factory``;
    wrapping it here, before the service is added, stamps each OIP call on arrival and reads
    the caller's deadline, which Ray would otherwise drop.
    """
    factory = getattr(server, "service_handler_factory", None)
    if callable(factory):
        server.service_handler_factory = _clocking(factory)
    add_GRPCInferenceServiceServicer_to_server(servicer, server)  # type: ignore[arg-type]
