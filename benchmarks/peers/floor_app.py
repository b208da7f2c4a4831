"""(e) The HTTP floor: a Starlette route that reads the same request body and answers a fixed JSON.

No multipart parsing, no decode, no model: what any Python ASGI server costs per request on these cores.

    .venv-peers/bin/uvicorn floor_app:app --app-dir benchmarks/peers --workers 2 --port 8004
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

ANSWER = {"predictions": [{"label": "Ankle boot", "probability": 1.0}]}


async def classify(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse(ANSWER)


async def health(_request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/health", health)])
