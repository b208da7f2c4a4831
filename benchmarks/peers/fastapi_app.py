"""(b) Plain FastAPI + uvicorn + onnxruntime: one request, one session.run, no batching.

    PEER_MODEL=models/cnn/model.onnx PEER_CARD=models/cnn/card.json \
        .venv-peers/bin/uvicorn fastapi_app:app --app-dir benchmarks/peers --workers 2 --port 8001
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, UploadFile

import common

state: dict = {}


@asynccontextmanager
async def lifespan(_app: FastAPI):
    state["session"], state["labels"] = common.load_session(), common.load_labels()
    yield


app = FastAPI(lifespan=lifespan)


@app.post("/classify")
def classify(images: list[UploadFile]) -> dict:  # a sync route: FastAPI runs it in its thread pool
    pixels = np.stack([common.decode_png(image.file.read()) for image in images])
    return {"predictions": common.classify(state["session"], state["labels"], pixels)}


@app.get("/health")
def health() -> dict:
    return {"ok": "session" in state}
