"""Request ids: every response carries X-Request-ID, every error body and access log line names it.

A client's X-Request-ID is kept when it is well formed (1-128 characters of A-Z a-z 0-9 . _ -, so it is safe in
a header, a log line and a label), else the server makes one (32 hex digits). Registered as the outermost of the
service's own middlewares (service/app.py), so it also sees the errors other middlewares answer (401 from the
API key, 413 from the body limit, 503 from admission, 404 for control characters) and BentoML's own routes.
BentoML's TimeoutMiddleware (504 after traffic.timeout) and its access log sit outside every service middleware:
the 504 carries no id, while the access log line gets it through a logging filter that reads the id of the
request being answered (a context variable, set in the same task that sends the answer).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .errors import error_body, is_protocol_path

HEADER = b"x-request-id"
WELL_FORMED = re.compile(r"[A-Za-z0-9._-]{1,128}")
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("visionserve_request_id",
                                                                                  default=None)
# The model a request ran on, noted by TaskModels (a dict, so that what a route notes reaches the middleware
# whatever context copies lie between them).
current_request_model: contextvars.ContextVar[dict | None] = contextvars.ContextVar("visionserve_request_model",
                                                                                     default=None)
# Scrapes and probes are not traffic: BentoML's access log and its own metrics skip them too.
UNCOUNTED_PATHS = frozenset({"/metrics", "/livez", "/readyz", "/healthz"})


def note_model(name: str) -> None:
    holder = current_request_model.get()
    if holder is not None:
        holder["model"] = name


def route_label(scope: Scope) -> str:
    """The matched route's template (/classify, /models/{name}, /v2/models/{model_name}/infer): bounded, unlike
    paths; `unmatched` when no route matched."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it sent exactly one well-formed one, else a new one."""
    sent = [value for name, value in headers if name.lower() == HEADER]
    if len(sent) == 1:
        try:
            text = sent[0].decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if WELL_FORMED.fullmatch(text):
            return text
    return uuid.uuid4().hex


_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
          429: "too_many_requests", 500: "internal_error", 503: "overloaded", 504: "timeout"}


def with_request_id(body: bytes, request_id: str, status: int, protocol_path: bool) -> tuple[bytes, str]:
    """An error body with the id added: inside our {"error": {...}} shape, beside the Open Inference Protocol's
    {"error": "..."}. A body that is no JSON object (BentoML's plain-text 404 for a path outside our routes) is
    put in the shape of the path's protocol, its text as the message. Returns the body and the error's code."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if not isinstance(parsed, dict):
        message = body.decode("utf-8", errors="replace").strip()[:1000] or f"HTTP {status}"
        parsed = ({"error": message} if protocol_path
                  else error_body(_CODES.get(status, f"http_{status}"), message))
    if isinstance(parsed.get("error"), dict):
        parsed["error"]["request_id"] = request_id
        code = str(parsed["error"].get("code") or _CODES.get(status, f"http_{status}"))
    else:
        parsed["request_id"] = request_id
        code = _CODES.get(status, f"http_{status}")
    return json.dumps(parsed).encode(), code


class RequestIdInAccessLog(logging.Filter):
    """Appends `request_id=<id>` to BentoML's access log line (its format is fixed in AccessLogMiddleware)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = current_request_id.get()
        if request_id is not None and not getattr(record, "request_id", None):
            record.request_id = request_id
            record.msg = f"{record.msg} request_id=%s"
            record.args = (*(record.args or ()), request_id)
        return True


def install_access_log_filter() -> None:
    access = logging.getLogger("bentoml.access")
    if not any(isinstance(f, RequestIdInAccessLog) for f in access.filters):
        access.addFilter(RequestIdInAccessLog())


class RequestId:
    """ASGI middleware: X-Request-ID on every answer and in the body of every error (status >= 400); and the
    request's count, duration and error code by route, model and status on /metrics (service/metrics.py)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        install_access_log_filter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope["headers"])
        current_request_id.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        model = {"model": ""}
        current_request_model.set(model)
        arrived = time.perf_counter()
        start: Message | None = None
        held: list[bytes] = []
        status, code = 500, None

        async def send_with_id(message: Message) -> None:
            nonlocal start, status, code
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id.encode())]}
                if message["status"] < 400 or scope["method"] == "HEAD":
                    await send(message)
                    return
                start = message  # an error: hold it until its body is complete, to add the id
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            held.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(held)
            body, code = with_request_id(body, request_id, start["status"], is_protocol_path(scope["path"]))
            headers = [(k, v) for k, v in start["headers"] if k.lower() not in (b"content-length", b"content-type")]
            await send({**start, "headers": [*headers, (b"content-type", b"application/json"),
                                             (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if scope["path"] not in UNCOUNTED_PATHS:
                count(route_label(scope), model["model"], status, code, time.perf_counter() - arrived)


def count(route: str, model: str, status: int, code: str | None, seconds: float) -> None:
    metrics.child(metrics.requests_total, route, model, str(status)).inc()
    metrics.child(metrics.request_seconds, route, model).observe(seconds)
    if status >= 400:
        metrics.child(metrics.request_errors_total, route, model, str(status),
                      code or _CODES.get(status, f"http_{status}")).inc()

