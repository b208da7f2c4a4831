"""The classifiers' feature space as routes: POST /embed and POST /similar (multipart, /json base64, /tensor .npy).

/embed answers each image's `embedding` (the classifier graph's penultimate features) as JSON floats or one
float32 .npy array; /similar answers the k nearest training images in that space from the index the export step
built (export/index.py), loaded at start-up (service/similarity.py). Both run through the classifier's batcher,
so an /embed or /similar request shares model calls with /classify requests.
"""

from __future__ import annotations

import asyncio
import io
from typing import Literal

import numpy as np
from bentoml import get_current_service
from pydantic import Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import ApiError
from .http_front import (
    ModelParams,
    check_image_count,
    decode_base64_images,
    fit_all_off_loop_if_large,
    load_npy_tensor,
    parse_params,
    read_multipart_upload,
    validation_error,
)
from .images import InputSpec
from .onnx_models import ModelEntry
from .task_models import TaskModels

NPY_MEDIA_TYPE = "application/x-npy"
NPY_ACCEPTED = (NPY_MEDIA_TYPE, "application/octet-stream")


class EmbedParams(ModelParams):
    format: Literal["json", "npy"] | None = Field(
        None, description="json: floats in JSON; npy: one float32 .npy array [N, D] (default: by the Accept header, "
                          "application/x-npy or application/octet-stream for npy, else json)")


class EmbedJsonRequest(EmbedParams):
    images: list[str] = Field(..., min_length=1, description="base64 image files (data: URLs accepted)")


class SimilarParams(ModelParams):
    k: int = Field(8, ge=1, le=100, description="how many nearest reference images per query image")
    thumbnails: bool = Field(True, description="include each neighbour's 28x28 image as a base64 PNG")


class SimilarJsonRequest(SimilarParams):
    images: list[str] = Field(..., min_length=1, description="base64 image files (data: URLs accepted)")


def classifiers() -> TaskModels:
    return get_current_service().classification


async def pixels_from_files(entry: ModelEntry, files: list[tuple[str, bytes]], invert) -> np.ndarray:
    pixels, _ = await fit_all_off_loop_if_large(files, InputSpec.from_card(entry.card), invert,
                                                get_current_service().config.limits.max_pixels_per_image)
    return pixels


def pixels_from_tensor(entry: ModelEntry, body: bytes, invert) -> np.ndarray:
    pixels = load_npy_tensor(body, InputSpec.from_card(entry.card), get_current_service().config.limits)
    return 255 - pixels if invert == "true" else pixels  # tensors are model-ready; "auto" leaves them as sent


async def inputs_of(request: Request, kind: str, params_model, json_model) -> tuple:
    """(params, entry, pixels) of a multipart, base64 JSON or .npy request."""
    limits = get_current_service().config.limits
    if kind == "multipart":
        files, fields = await read_multipart_upload(request, limits)
        params = parse_params(params_model, request.query_params.multi_items(), fields)
    elif kind == "json":
        try:
            params = json_model.model_validate_json(await request.body())
        except ValidationError as exc:
            raise validation_error(exc) from None
        check_image_count(len(params.images), limits)
        files = decode_base64_images(params.images)
    else:
        params = parse_params(params_model, request.query_params.multi_items())
        entry = classifiers().resolve_model(params.model)
        return params, entry, pixels_from_tensor(entry, await request.body(), params.invert)
    entry = classifiers().resolve_model(params.model)
    return params, entry, await pixels_from_files(entry, files, params.invert)


def wants_npy(request: Request, params: EmbedParams) -> bool:
    if params.format is not None:
        return params.format == "npy"
    accept = request.headers.get("accept", "")
    return any(media in accept for media in NPY_ACCEPTED)


async def embed(request: Request, kind: str) -> Response:
    params, entry, pixels = await inputs_of(request, kind, EmbedParams, EmbedJsonRequest)
    embedding = (await classifiers().infer(entry, pixels, outputs=["embedding"]))["embedding"]
    version = entry.card.get("version")
    if wants_npy(request, params):
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(embedding, dtype=np.float32), allow_pickle=False)
        return Response(buffer.getvalue(), media_type=NPY_MEDIA_TYPE,
                        headers={"X-Model": entry.name, "X-Model-Version": str(version), "X-Model-Tag": str(entry.tag),
                                 "X-Embedding-Dimension": str(embedding.shape[1])})
    return JSONResponse({"model": entry.name, "version": version, "tag": entry.tag, "dimension": int(embedding.shape[1]),
                         "embeddings": embedding.tolist()})


async def embed_multipart(request: Request) -> Response:
    return await embed(request, "multipart")


async def embed_base64(request: Request) -> Response:
    return await embed(request, "json")


async def embed_tensor(request: Request) -> Response:
    return await embed(request, "tensor")


def similarity_index(entry: ModelEntry):
    indexes = get_current_service().similarity
    index = indexes.get(entry.name)
    if index is None:
        raise ApiError(422, "no_index", f"model {entry.name!r} has no similarity index; models with one: "
                       f"{sorted(indexes)}", "model")
    if index.unavailable_reason:
        raise ApiError(503, "index_unavailable", f"the similarity index of {entry.name!r} cannot answer: "
                       f"{index.unavailable_reason}", "model")
    return index


async def similar(request: Request, kind: str) -> JSONResponse:
    params, entry, pixels = await inputs_of(request, kind, SimilarParams, SimilarJsonRequest)
    index = similarity_index(entry)
    embedding = (await classifiers().infer(entry, pixels, outputs=["embedding"]))["embedding"]
    # A flat search costs ~1.5 ms per query on one core: off the event loop, like large image decodes.
    distances, positions = await asyncio.to_thread(index.search, embedding, params.k)
    results = []
    for query, (row_distances, row_positions) in enumerate(zip(distances, positions)):
        neighbours = []
        for distance, position in zip(row_distances.tolist(), row_positions.tolist()):
            label = int(index.labels[position])
            neighbour = {"index": position, "label": index.label_names[label], "label_index": label,
                         "distance": distance}
            if params.thumbnails:
                neighbour["thumbnail"] = index.thumbnail(position)
            neighbours.append(neighbour)
        results.append({"image": query, "neighbours": neighbours})
    reference = index.section["reference_set"]
    return JSONResponse({"model": entry.name, "version": entry.card.get("version"), "k": params.k,
                         "reference_set": {"dataset": reference["dataset"], "split": reference["split"],
                                           "images": reference["images"]},
                         "results": results})


async def similar_multipart(request: Request) -> JSONResponse:
    return await similar(request, "multipart")


async def similar_base64(request: Request) -> JSONResponse:
    return await similar(request, "json")


async def similar_tensor(request: Request) -> JSONResponse:
    return await similar(request, "tensor")


ROUTES = [
    Route("/embed", embed_multipart, methods=["POST"]),
    Route("/embed/json", embed_base64, methods=["POST"]),
    Route("/embed/tensor", embed_tensor, methods=["POST"]),
    Route("/similar", similar_multipart, methods=["POST"]),
    Route("/similar/json", similar_base64, methods=["POST"]),
    Route("/similar/tensor", similar_tensor, methods=["POST"]),
]
