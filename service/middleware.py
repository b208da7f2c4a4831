"""The ASGI middlewares of the mounted app and the service: limits that answer before any route runs.

RequestBodyLimit (413 over the body limit), AdmissionLimit (503 when a worker has too many requests in
progress) and ControlCharactersInPath (404 in our shape for paths BentoML's mount pattern cannot match).
Each answers in the error shape of the path's protocol (service/errors.py).
"""

from __future__ import annotations

import json
from typing import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_body_for_path


async def send_error(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """A JSON error answered straight from ASGI, before any route (and its exception handlers) runs."""
    encoded = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(encoded)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": encoded})


class RequestBodyLimit:
    """ASGI middleware: 413 for bodies over the limit, by Content-Length or while streaming (chunked).

    `max_body_bytes` is a callable because the limit lives in the service instance's configuration,
    which exists only once the worker has started.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: Callable[[], int]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes()
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._send_too_large(send, limit, scope["path"])
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise body_too_large(limit)
            return message

        await self.app(scope, counting_receive, send)

    @staticmethod
    async def _send_too_large(send: Send, limit: int, path: str) -> None:
        await send_error(send, 413, error_body_for_path(path, "body_too_large",
                                                        f"request body is over the limit of {limit} bytes"),
                         [(b"connection", b"close")])


class AdmissionLimit:
    """ASGI middleware: 503 + Retry-After at once, before the body is parsed, when this worker already has
    `max_in_flight` requests in progress (0: no limit).

    The batchers' queue bounds count images waiting for a model, but under overload the time goes earlier:
    every request's body is read and its images decoded before a batcher can refuse it. Measured with
    `make overload` (400 clients without pauses, 2 cores): with only the queue bound, accepted requests had a
    p99 of 1.5-2.5 s whatever the bound. Refusing at the door was meant to bound the work in progress; on 2
    cores shared with the load generator a limit of 128 did not (p99 1.9 s, fewer requests served), so it is
    off by default, for machines where the front end is not the bottleneck.
    """

    def __init__(self, app: ASGIApp, max_in_flight: Callable[[], int], retry_after: Callable[[], int],
                 max_body_bytes: Callable[[], int]) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.retry_after = retry_after
        self.max_body_bytes = max_body_bytes
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_in_flight()
        if limit and self.in_flight >= limit:
            drained = await self._drain(receive, self.max_body_bytes())
            await self._send_overloaded(send, scope["path"], close=not drained)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    @staticmethod
    async def _drain(receive: Receive, max_bytes: int) -> bool:
        """Read the body and drop it: answering before the client has sent it all resets the connection
        under the client's feet (it sees no 503, only a broken pipe). Reading is a copy; the parsing and
        decoding that the limit exists to avoid never happen. No more than the body limit is read (a refused
        request is no reason to accept an endless chunked upload); False when reading stopped there."""
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return True
            received += len(message.get("body", b""))
            if received > max_bytes:
                return False

    async def _send_overloaded(self, send: Send, path: str, close: bool) -> None:
        retry_after = str(self.retry_after())
        body = error_body_for_path(path, "overloaded", f"the server has {self.in_flight} requests in progress; "
                                   f"retry after {retry_after} s")
        await send_error(send, 503, body,
                         [(b"retry-after", retry_after.encode())] + ([(b"connection", b"close")] if close else []))


class ControlCharactersInPath:
    """ASGI middleware: 404 in our error shape for a path holding a control character (%0A, %00, ...).

    No route of ours has one, and BentoML mounts our app with a pattern whose `.*` stops at a newline,
    so without this such a path got BentoML's plain-text 404 instead of the API's JSON error.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and any(ord(c) < 0x20 or ord(c) == 0x7F for c in scope["path"]):
            await send_error(send, 404, error_body_for_path(scope["path"], "not_found",
                                                            "no endpoint at a path with control characters"))
            return
        await self.app(scope, receive, send)


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes")
