"""What Gearbox installs in each gateway replica's own HTTP server.

Under the HAProxy ingress each gateway replica serves HTTP itself (Ray Serve's direct ingress).
Ray Serve wraps that server's application in the ASGI middlewares that
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names: :func:`http_middlewares`, outermost first.

- :class:`~gearbox.serving.clock.ArrivalMiddleware` starts the budget's clock as soon as the
  request's head is parsed.
- :class:`WholeResponseMiddleware` sends a response's head only together with its body.
"""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gearbox.serving.clock import ArrivalMiddleware

RESPONSE_HEAD = "http.response.start"


class WholeResponseMiddleware:
    """Pure ASGI: holds a response's head until its first body message, then sends the two
    back to back.

    Ray Serve runs the gateway's code on its own thread and passes each ASGI message to the
    server's event loop separately. So a response's head could be written to the socket some
    milliseconds before its body. HAProxy forwards a response's head as soon as it arrives, and
    from then on it can no longer send the request to another replica. A replica killed in that
    gap left its caller with a head and a body cut short (``IncompleteRead``): about one kill in
    forty under a steady load. Sent back to back, with no await between them, the gap is the
    microseconds between two writes.

    A response whose application fails after its head and before any body never sends its
    head: the server then answers the caller with its own error, whole.
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        held: Message | None = None

        async def send_head_with_body(message: Message) -> None:
            nonlocal held
            if message["type"] == RESPONSE_HEAD:
                held = message
                return
            if held is not None:
                head, held = held, None
                await send(head)
            await send(message)

        await self._app(scope, receive, send_head_with_body)


def http_middlewares() -> list[Middleware]:
    """What ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names, outermost first: the arrival
    stamp, then whole responses."""
    return [Middleware(ArrivalMiddleware), Middleware(WholeResponseMiddleware)]
