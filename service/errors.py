"""One error shape for every endpoint: {"error": {"code": ..., "message": ..., "field": ...}}.

BentoML's own error bodies vary in shape and hide 5xx messages (docs/ARCHITECTURE.md), so every route of ours
raises `ApiError` and the handlers below turn it, and anything Starlette raises, into this shape.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request

from .json_response import JSONResponse

logger = logging.getLogger("bentoml.visionserve")


class ApiError(Exception):
    """A client-visible failure with its HTTP status, a stable machine code and the offending field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}


def error_body(code: str, message: str, field: str | None = None) -> dict:
    return {"error": {"code": code, "message": message, "field": field}}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, field), status_code=status, headers=headers)


def is_protocol_path(path: str) -> bool:
    """The Open Inference Protocol's routes (service/v2.py) answer errors in its own shape."""
    return path == "/v2" or path.startswith("/v2/")


def error_body_for_path(path: str, code: str, message: str, field: str | None = None) -> dict:
    """The error body for a request to `path`: the protocol's {"error": message} under /v2, else ours. For the
    ASGI middlewares that answer before any route (401, 413, 503), which see only the path."""
    return {"error": message} if is_protocol_path(path) else error_body(code, message, field)


# The protocol has one status for every bad tensor, shape, datatype or parameter: 400.
_PROTOCOL_STATUS = {415: 400, 422: 400}


def error_response_for(request: Request, status: int, code: str, message: str, field: str | None = None,
                       headers: dict[str, str] | None = None) -> JSONResponse:
    if is_protocol_path(request.url.path):
        return JSONResponse({"error": message}, status_code=_PROTOCOL_STATUS.get(status, status), headers=headers)
    return error_response(status, code, message, field, headers)


# Starlette's own HTTP errors (unknown path, wrong method) keep their status, in our shape.
_HTTP_STATUS_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


async def handle_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response_for(request, exc.status, exc.code, exc.message, exc.field, exc.headers)


async def handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = _HTTP_STATUS_CODES.get(exc.status_code, "http_error")
    return error_response_for(request, exc.status_code, code, str(exc.detail), None, exc.headers)


async def handle_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Reaching this is a server bug, never a client mistake: log the traceback, answer in our shape.
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response_for(request, 500, "internal_error",
                              "internal server error; the traceback is in the server log")


EXCEPTION_HANDLERS = {
    ApiError: handle_api_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected_error,
}
