"""The gateway's HTTP entry reads a body only up to its limit (413 beyond it)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from gearbox.compression.errors import PayloadTooLargeError
from gearbox.serving.app import read_body

LIMIT = 1000


def _request(chunks: list[bytes], content_length: int | None) -> tuple[Request, list[int]]:
    """A Starlette request whose body arrives in ``chunks``; the list counts chunks read."""
    read = [0]
    headers = [] if content_length is None else [(b"content-length", str(content_length).encode())]
    pending = list(chunks)

    async def receive() -> dict:
        read[0] += 1
        body = pending.pop(0) if pending else b""
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer", "headers": headers}
    return Request(scope, receive), read


def test_a_body_within_the_limit_is_read_whole():
    request, _ = _request([b"a" * 400, b"b" * 600], content_length=1000)
    assert asyncio.run(read_body(request, LIMIT)) == b"a" * 400 + b"b" * 600


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    request, read = _request([b"x" * 10], content_length=LIMIT + 1)
    with pytest.raises(PayloadTooLargeError, match="1001 bytes exceeds the gateway's limit"):
        asyncio.run(read_body(request, LIMIT))
    assert read == [0]


def test_a_streamed_body_is_refused_once_it_passes_the_limit():
    request, read = _request([b"x" * 600] * 5, content_length=None)
    with pytest.raises(PayloadTooLargeError):
        asyncio.run(read_body(request, LIMIT))
    assert read == [2]  # stopped at the chunk that crossed the limit
