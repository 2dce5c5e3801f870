"""The middlewares of each replica's own HTTP server, driven through the raw ASGI interface and
through a Starlette application as Ray Serve builds it."""

from __future__ import annotations

import asyncio

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from gearbox.serving.clock import ArrivalMiddleware, arrival
from gearbox.serving.ingress import REPLICA_SERVER_MIDDLEWARES
from gearbox.serving.replica_server import WholeResponseMiddleware, http_middlewares

HEAD = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
BODY = {"type": "http.response.body", "body": b"ok", "more_body": False}


class Timeline:
    """One list of what the application sent and what reached the server, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def server_send(self, message: dict) -> None:
        self.events.append(f"server {message['type']}")


def app_sending(*messages: dict, timeline: Timeline):
    """An ASGI app that sends ``messages``, giving the event loop a turn between them, as Ray
    Serve's hand-over from the user thread does."""

    async def app(scope, receive, send) -> None:
        for message in messages:
            timeline.events.append(f"app {message['type']}")
            await send(message)
            await asyncio.sleep(0)

    return app


async def receive() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


def drive(middleware_cls, *messages: dict, scope_type: str = "http") -> list[str]:
    timeline = Timeline()
    app = app_sending(*messages, timeline=timeline)
    wrapped = middleware_cls(app) if middleware_cls else app
    scope = {"type": scope_type, "headers": []}
    asyncio.run(wrapped(scope, receive, timeline.server_send))
    return timeline.events


def test_without_it_the_head_reaches_the_server_before_the_body_is_made():
    # What the middleware is for: the gap a replica can die in.
    assert drive(None, HEAD, BODY) == [
        "app http.response.start",
        "server http.response.start",
        "app http.response.body",
        "server http.response.body",
    ]


def test_the_head_reaches_the_server_only_with_the_body():
    assert drive(WholeResponseMiddleware, HEAD, BODY) == [
        "app http.response.start",
        "app http.response.body",
        "server http.response.start",
        "server http.response.body",
    ]


def test_head_and_body_are_sent_back_to_back_without_an_await_between():
    order: list[str] = []

    async def server_send(message: dict) -> None:
        order.append(message["type"])

    async def interleaver() -> None:
        for _ in range(5):
            order.append("other task")
            await asyncio.sleep(0)

    async def main() -> None:
        app = app_sending(HEAD, BODY, timeline=Timeline())
        other = asyncio.create_task(interleaver())
        await WholeResponseMiddleware(app)({"type": "http", "headers": []}, receive, server_send)
        await other

    asyncio.run(main())
    head = order.index("http.response.start")
    assert order[head + 1] == "http.response.body", order


def test_a_streamed_body_passes_chunk_by_chunk_in_order():
    first = {"type": "http.response.body", "body": b"a", "more_body": True}
    last = {"type": "http.response.body", "body": b"b", "more_body": False}
    events = drive(WholeResponseMiddleware, HEAD, first, last)
    assert [e for e in events if e.startswith("server")] == [
        "server http.response.start",
        "server http.response.body",
        "server http.response.body",
    ]
    # Only the head waits: each chunk reaches the server as soon as it is sent.
    assert events.index("server http.response.body") < events.index("app http.response.body", 3)


def test_a_head_without_a_body_is_never_sent():
    # The server then answers with its own error, whole, rather than a head with no body.
    assert drive(WholeResponseMiddleware, HEAD) == ["app http.response.start"]


@pytest.mark.parametrize("scope_type", ["lifespan", "websocket"])
def test_other_scopes_pass_through_untouched(scope_type):
    message = {"type": "http.response.start", "status": 200, "headers": []}
    assert drive(WholeResponseMiddleware, message, scope_type=scope_type) == [
        "app http.response.start",
        "server http.response.start",
    ]


def test_ray_serve_is_pointed_at_these_middlewares():
    module, _, name = REPLICA_SERVER_MIDDLEWARES.partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is http_middlewares


def test_the_stamp_comes_first_then_whole_responses_in_a_starlette_app():
    assert [m.cls for m in http_middlewares()] == [ArrivalMiddleware, WholeResponseMiddleware]
    clocks = []

    async def endpoint(request):
        clocks.append((arrival(), arrival()))
        return JSONResponse({"ok": True})

    async def stream(request):
        async def chunks():
            yield b"1"
            yield b"2"

        return StreamingResponse(chunks())

    received: list[bool] = []
    app = Starlette(
        routes=[Route("/", endpoint), Route("/stream", stream)], middleware=http_middlewares()
    )
    sent = []

    async def server_send(message):
        sent.append(message)

    async def receive_once():
        # The request, then nothing: the caller stays connected.
        if not received:
            received.append(True)
            return await receive()
        await asyncio.Event().wait()

    async def call(path):
        received.clear()
        await app({"type": "http", "method": "GET", "path": path, "headers": [],
                   "query_string": b""}, receive_once, server_send)  # fmt: skip

    asyncio.run(call("/"))
    [(first, second)] = clocks
    assert first is second
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200 and b'"ok":true' in sent[1]["body"]
    sent.clear()
    asyncio.run(call("/stream"))
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"12"
