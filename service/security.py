"""Optional API-key authentication for every route of the server, BentoML's own included.

Set VISIONSERVE_API_KEY and every request must carry `Authorization: Bearer <key>` or `X-API-Key: <key>`;
anything else gets 401 in the API's error shape with a `WWW-Authenticate` challenge (RFC 6750). Only the
probes an orchestrator calls without credentials stay open: /livez, /healthz and /readyz, and the Open Inference
Protocol's /v2/health/live and /v2/health/ready (KServe's probes, deploy/kserve/). /metrics needs
the key like the rest: it names the endpoints and their traffic, and Prometheus can send a bearer token.
The web page at / and its files under /static/ are open too: they hold no data, and the page is where a
browser user enters the key (service/web.py); every route the page calls needs it.

Registered on the BentoML service (not the mounted Starlette app) so that it also guards BentoML's own
routes: /docs.json, /schema.json, /metrics and the Swagger UI's files (/docs itself is ours, guarded too).
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from .config import api_key_from_environment
from .errors import error_body_for_path
from .middleware import send_error
from .web import is_public_page_path

OPEN_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
REALM = "visionserve"


def presented_keys(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Every credential the request carries: a bearer token and an X-API-Key header."""
    keys = []
    for name, value in headers:
        name = name.lower()
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                keys.append(token.strip())
        elif name == b"x-api-key":
            keys.append(value.strip())
    return keys


def key_matches(expected: bytes, presented: list[bytes]) -> bool:
    # Constant-time comparison of each candidate, all of them compared: no early exit on a match.
    matched = False
    for key in presented:
        matched |= hmac.compare_digest(expected, key)
    return matched


def is_cors_preflight(scope: Scope) -> bool:
    # A browser never sends credentials on a preflight; refusing it would break CORS when an operator
    # turns it on. Without CORS configured the preflight is answered 405 by the routes anyway.
    return scope["method"] == "OPTIONS" and any(name.lower() == b"access-control-request-method"
                                                for name, _ in scope["headers"])


class ApiKeyAuth:
    """ASGI middleware: 401 unless the request presents the configured key (a no-op when none is set)."""

    def __init__(self, app: ASGIApp, api_key: str | None = None) -> None:
        self.app = app
        key = api_key if api_key is not None else api_key_from_environment()
        self.expected = key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.expected is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS
                or is_public_page_path(scope["path"]) or is_cors_preflight(scope)):
            await self.app(scope, receive, send)
            return
        presented = presented_keys(scope["headers"])
        if key_matches(self.expected, presented):
            await self.app(scope, receive, send)
            return
        if presented:
            challenge = f'Bearer realm="{REALM}", error="invalid_token"'
            message = "the API key is not valid"
        else:
            challenge = f'Bearer realm="{REALM}"'
            message = "this server needs an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        await send_unauthorized(send, message, challenge, scope["path"])


async def send_unauthorized(send: Send, message: str, challenge: str, path: str) -> None:
    await send_error(send, 401, error_body_for_path(path, "unauthorized", message, None),
                     [(b"www-authenticate", challenge.encode())])
