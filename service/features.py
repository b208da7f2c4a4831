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
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from .errors import ApiError
from .json_response import JSONResponse
from .onnx_models import ModelEntry
from .parsing import Form, ModelParams, inputs_of, routes_in_every_form

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


async def embedding_of(entry: ModelEntry, pixels: np.ndarray) -> np.ndarray:
    """float32 [N, D] from the classifier's batcher, with the /classify requests it is batched with."""
    if "embedding" not in entry.output_names:
        raise ApiError(400, "unknown_output", f"model {entry.name!r} has no output 'embedding'; it has "
                       f"{entry.output_names}", "outputs")
    return (await entry.runner.infer(pixels, ["embedding"]))["embedding"]


def wants_npy(request: Request, params: EmbedParams) -> bool:
    if params.format is not None:
        return params.format == "npy"
    accept = request.headers.get("accept", "")
    return any(media in accept for media in NPY_ACCEPTED)


async def embed(request: Request, form: Form) -> Response:
    inputs = await inputs_of(request, form, get_current_service().classification, EmbedParams, EmbedJsonRequest)
    params, entry = inputs.params, inputs.entry
    embedding = await embedding_of(entry, inputs.pixels)
    version = entry.card.get("version")
    if wants_npy(request, params):
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(embedding, dtype=np.float32), allow_pickle=False)
        return Response(buffer.getvalue(), media_type=NPY_MEDIA_TYPE,
                        headers={"X-Model": entry.name, "X-Model-Version": str(version), "X-Model-Tag": str(entry.tag),
                                 "X-Embedding-Dimension": str(embedding.shape[1])})
    return JSONResponse({"model": entry.name, "version": version, "tag": entry.tag, "dimension": int(embedding.shape[1]),
                         "embeddings": embedding.tolist()})


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


async def similar(request: Request, form: Form) -> JSONResponse:
    inputs = await inputs_of(request, form, get_current_service().classification, SimilarParams, SimilarJsonRequest)
    params, entry = inputs.params, inputs.entry
    index = similarity_index(entry)
    embedding = await embedding_of(entry, inputs.pixels)
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


ROUTES = [*routes_in_every_form("/embed", embed), *routes_in_every_form("/similar", similar)]
