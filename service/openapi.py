"""The OpenAPI 3.1 document of our own routes, served at GET /openapi.json.

BentoML's /docs.json describes only its typed APIs, and our routes are a plain Starlette app mounted into
the service, so it does not know their bodies, parameters or answers. This document does: request bodies
and parameters come from the same pydantic models that parse them (service/parsing.py and the route
modules), answers from the models below (documentation only: the hot path builds plain dicts, and
tests/test_fuzz.py checks with schemathesis that the answers conform). Built per service, from its
configuration: the model names of the examples, the limits, and the security scheme when an API key is set.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from . import v2
from .classify import Base64ImagesRequest, ImageParams
from .config import RequestLimits
from .explain import ExplainJsonRequest, ExplainParams
from .features import EmbedJsonRequest, EmbedParams, SimilarJsonRequest, SimilarParams
from .generate import GenerateParams, InterpolateParams
from .images import png_bytes
from .reconstruct import ERROR_HEADER, Base64ReconstructRequest, ReconstructParams
from .segment import SegmentJsonRequest, SegmentParams

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{model}"


# --- answers (documentation models) -------------------------------------------------------------------

class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: str = Field(..., description="stable machine-readable code, e.g. too_many_pixels (docs/SERVING.md)")
    message: str = Field(..., description="what went wrong, for a person")
    field: str | None = Field(..., description="the offending field (images[3], top_k, body), or null")
    request_id: str = Field(..., description="the request's id, as in its X-Request-ID header (the client's when "
                            "well formed: 1-128 of A-Z a-z 0-9 . _ -; else the server's)")


class Error(BaseModel):
    """Every error of every route has this shape."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail


class ModelAnswer(BaseModel):
    """What every answer of a model starts with: which model answered, and its card's version."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str
    version: str | None


class ClassScore(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str
    index: int = Field(..., ge=0)
    probability: float = Field(..., ge=0, le=1)


class OodAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    score: float = Field(..., description="higher: less like the training images (service/ood.py)")
    threshold: float = Field(..., description="the card's threshold: 95% of validation images score at most this")
    flag: bool = Field(..., description="score > threshold: probably not an image of the kind the model knows")
    method: str = Field(..., description="e.g. knn_cos_l2 (benchmarks/results/ood.md compares the methods)")


class Prediction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: int = Field(..., ge=0, description="position of the image in the request")
    top_k: list[ClassScore] = Field(..., min_length=1, max_length=10, description="most likely first")
    inverted: bool | None = Field(None, description="whether the image was inverted (absent for tensors)")
    ood: OodAnswer | None = Field(None, description="absent with ood=false; null for a model without OOD statistics")


class ClassificationAnswer(ModelAnswer):
    predictions: list[Prediction]


class SaliencyMap(BaseModel):
    model_config = ConfigDict(extra="forbid")
    height: int = Field(..., ge=1)
    width: int = Field(..., ge=1)
    values: list[list[float]] | str = Field(..., description="rows of floats (encoding=list), or a base64 float32 "
                                                             ".npy array [height, width] (encoding=npy-base64)")


class ExplanationAnswer(ModelAnswer):
    method: Literal["occlusion", "cam"] = Field(..., description="the method that ran")
    target: ClassScore = Field(..., description="the class explained and its probability")
    top_k: list[ClassScore]
    inverted: bool | None = Field(None, description="absent for tensors")
    passes: int = Field(..., ge=1, description="images the model ran for this explanation (one onnxruntime call)")
    patch: int | None = None
    stride: int | None = None
    fill: int | None = Field(None, description="occlusion: the value occluded pixels get (the training background)")
    feature_map: list[int] | None = Field(None, description="cam: the height and width of the maps before upsampling")
    meaning: str
    encoding: Literal["list", "npy-base64"]
    map: SaliencyMap = Field(..., description="at the model's input size")
    input_map: SaliencyMap = Field(..., description="at the input image's own size (the fit's padding cut off)")


class EmbeddingAnswer(ModelAnswer):
    tag: str | None = Field(..., description="the model's BentoML store tag; null when served from a plain folder")
    dimension: int = Field(..., ge=1)
    embeddings: list[list[float]] = Field(..., description="one row of `dimension` floats per image, in request order")


class Neighbour(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(..., ge=0, description="position in the reference set (the training split's IDX order)")
    label: str
    label_index: int = Field(..., ge=0)
    distance: float = Field(..., ge=0, description="euclidean distance in the embedding space")
    thumbnail: str | None = Field(None, description="base64 PNG of the reference image (absent with thumbnails=false)")


class SimilarResult(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: int = Field(..., ge=0, description="position of the query image in the request")
    neighbours: list[Neighbour] = Field(..., description="nearest first")


class ReferenceSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str
    split: str
    images: int = Field(..., ge=1)


class SimilarityAnswer(ModelAnswer):
    k: int = Field(..., ge=1, le=100)
    reference_set: ReferenceSet
    results: list[SimilarResult]


class ClassShare(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(..., ge=0)
    label: str
    pixels: int = Field(..., ge=1)
    fraction: float = Field(..., ge=0, le=1)


class Box(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x0: int = Field(..., ge=0)
    y0: int = Field(..., ge=0)
    x1: int = Field(..., ge=1, description="exclusive")
    y1: int = Field(..., ge=1, description="exclusive")


class Component(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(..., ge=0)
    label: str
    pixels: int = Field(..., ge=1)
    box: Box


class SegmentationAnswer(ModelAnswer):
    height: int = Field(..., ge=1)
    width: int = Field(..., ge=1)
    inverted: bool
    classes: list[ClassShare] = Field(..., description="most frequent first, background included")
    components: list[Component] = Field(..., description="8-connected regions of one class, largest first")
    mask_png: str = Field(..., description="base64 PNG (mode L) of class indices")


class GeneratedImage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int = Field(..., ge=0)
    class_: str = Field(..., alias="class")
    class_index: int = Field(..., ge=0)
    png: str = Field(..., description="base64 PNG, mode L")


class GeneratedImages(ModelAnswer):
    seed: int = Field(..., ge=0)
    n: int = Field(..., ge=1)
    scale: int = Field(..., ge=1)
    images: list[GeneratedImage]


class ModelDescription(BaseModel):
    """A model's card as exported (name, version, task, input, labels, metrics, sha256, ...) plus the server's view."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    name: str
    task: str | None = None
    tag: str | None = Field(None, description="its BentoML store tag, <name>:<sha256 prefix>; null when served "
                                              "from a plain folder (VISIONSERVE_MODELS_DIR)")
    sha256: str | None = Field(None, description="the SHA-256 of model.onnx its card names, verified before loading")
    source: Literal["checkout card", "tag list", "bento", "folder"] = Field(
        ..., description="what named it: the checkout's models/*/card.json, VISIONSERVE_MODELS, the bento's "
                         "pinned tags, or VISIONSERVE_MODELS_DIR")
    status: Literal["available", "unavailable"]
    unavailable_reason: str | None = None
    provider: str | None = None
    precision: Literal["fp32", "fp16"] = Field("fp32", description="the graph that runs: model.onnx, or the FP16 "
                                                                  "variant its card names (VISIONSERVE_PRECISION)")
    default: bool | None = Field(None, description="GET /models/{name} only: the task's default model")


class DefaultModels(BaseModel):
    model_config = ConfigDict(extra="forbid")
    classification: str | None
    segmentation: str | None
    generation: str | None
    reconstruction: str | None


class ModelList(BaseModel):
    model_config = ConfigDict(extra="forbid")
    default: DefaultModels
    models: list[ModelDescription]
    serving: dict = Field(..., description="workers, threads, batching and the batch sizes seen by this worker")


SCHEMA_MODELS = (Error, ClassificationAnswer, SegmentationAnswer, GeneratedImages, ModelDescription, ModelList,
                 Base64ImagesRequest, SegmentJsonRequest, GenerateParams, InterpolateParams,
                 EmbeddingAnswer, SimilarityAnswer, EmbedJsonRequest, SimilarJsonRequest,
                 ExplanationAnswer, ExplainJsonRequest)


class Reconstruction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: int = Field(..., ge=0, description="position of the image in the request")
    error: float = Field(..., ge=0, description="mean squared difference per pixel, pixels in [0, 1]: larger for "
                                                "images unlike the training set")
    reconstruction_png: str = Field(..., description="the reconstruction at the model's input size, base64 PNG")
    inverted: bool | None = Field(None, description="whether the image was inverted (absent for tensors)")


class ReconstructionAnswer(ModelAnswer):
    error_definition: str
    reconstructions: list[Reconstruction]


SCHEMA_MODELS = SCHEMA_MODELS + (ReconstructionAnswer, Base64ReconstructRequest)


# --- building blocks ----------------------------------------------------------------------------------

def ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF_TEMPLATE.format(model=model.__name__)}


def image_route_paths(route: str, what: str, params: type[BaseModel], json_request: type[BaseModel], answer: dict,
                      default_model: str | None, json_example: dict, image_errors: dict, tensor_errors: dict,
                      one_image: bool = False) -> dict:
    """`route` in the three forms every image route takes (service/parsing.py): multipart, /json, /tensor; each
    takes its parameters in the query string too (a copy each: add_request_id_header appends to them)."""
    name = route.strip("/")
    parameters = query_parameters(params, default_model)
    images, tensor = ("one uploaded image", "one uint8 .npy image [1,H,W] or [1,C,H,W]") if one_image else (
        "uploaded image files", "a uint8 .npy batch [N,H,W] or [N,C,H,W] of model-ready pixels")
    return {
        route: {"post": {
            "summary": f"{what} of {images}", "operationId": name, "parameters": [*parameters],
            "requestBody": {"required": True, "content": {"multipart/form-data": {
                "schema": multipart_body("images", params, many=not one_image)}}},
            "responses": {"200": answer, **image_errors}}},
        f"{route}/json": {"post": {
            "summary": f"{what} of {'one base64 image' if one_image else 'base64 image files'} sent in JSON",
            "operationId": f"{name}_json", "parameters": [*parameters],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": ref(json_request), "example": json_example}}},
            "responses": {"200": answer, **image_errors}}},
        f"{route}/tensor": {"post": {
            "summary": f"{what} of {tensor}", "operationId": f"{name}_tensor", "parameters": [*parameters],
            "requestBody": {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}},
            "responses": {"200": answer, **tensor_errors}}},
    }


def component_schemas(limits: RequestLimits) -> dict:
    schemas: dict = {}
    for model in SCHEMA_MODELS:
        schema = model.model_json_schema(by_alias=True, ref_template=REF_TEMPLATE)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    # The models' bounds are the API's; this server's configured limit may be lower.
    n = schemas["GenerateParams"]["properties"]["n"]
    n["maximum"] = min(n["maximum"], limits.max_samples_per_request)
    return schemas


def json_content(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


PNG_CONTENT = {"image/png": {"schema": {"type": "string", "format": "binary"}}}

# What each status means on every route that can answer it (the codes are listed in docs/SERVING.md).
ERROR_STATUSES = {
    "400": "a body that cannot be parsed (JSON, multipart, base64) or an image that does not decode",
    "401": "missing or wrong API key (only when the server has one)",
    "404": "unknown model",
    "413": "over a limit: body bytes, images per request, pixels per image, form field size",
    "415": "wrong Content-Type, or a file that is not an image in an accepted format",
    "422": "a parameter of the wrong type or range, a missing image, an unknown class, a bad tensor",
    "503": "overloaded (with Retry-After) or the model is unavailable",
}


def error_responses(*statuses: str, auth: bool) -> dict:
    responses = {}
    for status in statuses:
        if status == "401" and not auth:
            continue
        response = {"description": ERROR_STATUSES[status], "content": json_content(ref(Error))}
        if status == "503":
            response["headers"] = {"Retry-After": {"description": "seconds to wait (when overloaded)",
                                                   "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
        if status == "401":
            response["headers"] = {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}}
        responses[status] = response
    return responses


REQUEST_ID_SCHEMA = {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"}


def add_request_id_header(paths: dict) -> None:
    """Every operation takes an optional X-Request-ID and answers with one (service/request_context.py)."""
    for operations in paths.values():
        for operation in operations.values():
            operation.setdefault("parameters", []).append(
                # Any string: one that is not well formed is replaced, never refused (so no `pattern` here).
                {"name": "X-Request-ID", "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "kept when well formed (1-128 of A-Z a-z 0-9 . _ -), else replaced by one of the "
                                "server's; echoed in the answer's X-Request-ID and in every error body"})
            for response in operation["responses"].values():
                response.setdefault("headers", {})["X-Request-ID"] = {
                    "required": True, "schema": REQUEST_ID_SCHEMA, "description": "this request's id"}


def text_parameters(model: type[BaseModel]) -> dict[str, dict]:
    """A parameters model's fields as query or form fields: text, so never JSON null (absent is the default)."""
    properties = {}
    for name, schema in model.model_json_schema(by_alias=True)["properties"].items():
        variants = [variant for variant in schema.get("anyOf", []) if variant != {"type": "null"}]
        if len(variants) == 1:
            schema = {**{k: v for k, v in schema.items() if k not in ("anyOf", "default")}, **variants[0]}
        properties[name] = schema
    return properties


def query_parameters(model: type[BaseModel], default_model: str | None) -> list[dict]:
    """Each field of a parameters model as an optional query parameter, with the field's own schema
    (`model` with the task's default model as its example, so that generated requests reach it)."""
    properties = text_parameters(model)
    return [{"name": name, "in": "query", "required": False, "schema": schema,
             **({"description": schema["description"]} if "description" in schema else {}),
             **({"example": default_model} if name == "model" and default_model else {})}
            for name, schema in properties.items()]


def multipart_body(file_field: str, params: type[BaseModel], many: bool) -> dict:
    file_schema = {"type": "string", "format": "binary"}
    properties = {file_field: ({"type": "array", "items": file_schema, "minItems": 1} if many else file_schema)}
    properties.update(text_parameters(params))
    return {"type": "object", "properties": properties, "required": [file_field]}


def example_png() -> str:
    """A 28x28 black PNG, base64: the request examples' image (an answer for sure, whatever it shows)."""
    return base64.b64encode(png_bytes(np.zeros((28, 28), np.uint8))).decode("ascii")


NPY_CONTENT = {"application/x-npy": {"schema": {"type": "string", "format": "binary"}}}


def json_body_operation(summary: str, operation_id: str, body: type[BaseModel], example: dict, answer: dict,
                        error_responses: dict) -> dict:
    return {"post": {"summary": summary, "operationId": operation_id,
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": ref(body), "example": example}}},
                     "responses": {"200": answer, **error_responses}}}


# --- the document ----------------------------------------------------------------------------------------

def build_openapi(limits: RequestLimits, default_models: dict[str, str | None], auth: bool) -> dict:
    """The document for a server with these limits, default models and (when `auth`) an API key."""
    png = example_png()
    errors = lambda *statuses: error_responses(*statuses, auth=auth)  # noqa: E731
    classify_errors = errors("400", "401", "404", "413", "415", "422", "503")
    classification = {"description": "one prediction per image, in request order",
                      "content": json_content(ref(ClassificationAnswer))}
    classifier = default_models.get("classification")
    segmenter = default_models.get("segmentation")
    generator = default_models.get("generation")
    tensor_errors = errors("401", "404", "413", "422", "503")
    generator_errors = errors("400", "401", "404", "415", "422", "503")
    example_model = {"model": classifier} if classifier else {}
    explanation = {"description": "a saliency map for the target class (JSON), or with format=overlay a PNG heat map "
                                  "over the input (headers X-Model, X-Method, X-Target, X-Target-Index, "
                                  "X-Target-Probability)",
                   "content": {**json_content(ref(ExplanationAnswer)), **PNG_CONTENT}}
    embedded = {"description": "one embedding per image: JSON, or with format=npy (or Accept: application/x-npy) "
                               "one float32 .npy array [N, D] with X-Model, X-Model-Version, X-Embedding-Dimension",
                "content": {**json_content(ref(EmbeddingAnswer)), **NPY_CONTENT}}
    similar = {"description": "the k nearest reference images of each image, nearest first",
               "content": json_content(ref(SimilarityAnswer))}
    paths = {
        **image_route_paths("/classify", "Classify", ImageParams, Base64ImagesRequest, classification, classifier,
                            {"images": [png], "top_k": 2, **example_model}, classify_errors, tensor_errors),
        **image_route_paths("/embed", "The classifier's embedding", EmbedParams, EmbedJsonRequest, embedded,
                            classifier, {"images": [png], **example_model}, classify_errors, tensor_errors),
        **image_route_paths("/similar", "The nearest training images", SimilarParams, SimilarJsonRequest, similar,
                            classifier, {"images": [png], **example_model}, classify_errors, tensor_errors),
        **image_route_paths("/explain", "Explain the classification (occlusion or class activation map)",
                            ExplainParams, ExplainJsonRequest, explanation, classifier,
                            {"images": [png], **example_model}, classify_errors, tensor_errors, one_image=True),
        "/segment": {"post": {
            "summary": "Segment one image (multipart file, or base64 in JSON)",
            "operationId": "segment",
            "parameters": query_parameters(SegmentParams, segmenter),
            "requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": multipart_body("image", SegmentParams, many=False)},
                "application/json": {"schema": ref(SegmentJsonRequest), "example": {"image": png, "format": "json"}},
            }},
            "responses": {
                "200": {"description": "format=json: statistics, components and the mask; format=mask or "
                                       "overlay: a PNG",
                        "content": {**json_content(ref(SegmentationAnswer)), **PNG_CONTENT}},
                **classify_errors,
            },
        }},
        # Required bodies: a JSON Content-Type is (an empty body with it means {}, every field its default).
        "/generate": json_body_operation(
            "Generate samples of a class (a grid PNG, or JSON of base64 PNGs)", "generate", GenerateParams,
            {"n": 4, "class": 0, "seed": 1, "scale": 1},
            {"description": "format=grid: one PNG; format=images: JSON",
             "headers": {"X-Seed": {"required": True, "description": "the seed used",
                                    "schema": {"type": "string", "pattern": "^[0-9]+$"}}},
             "content": {**PNG_CONTENT, **json_content(ref(GeneratedImages))}}, generator_errors),
        "/generate/interpolate": json_body_operation(
            "A strip of samples walking from one seed's noise to another's", "interpolate", InterpolateParams,
            {"from_seed": 1, "to_seed": 2, "class": 0, "steps": 4},
            {"description": "one PNG strip", "content": PNG_CONTENT,
             "headers": {name: {"required": True, "schema": {"type": "string"}} for name in ("X-Model", "X-Class",
                                                                                           "X-Steps")}},
            generator_errors),
        "/models": {"get": {
            "summary": "Every model: card, status, provider; the default of each task; serving settings",
            "operationId": "list_models",
            "responses": {"200": {"description": "the models", "content": json_content(ref(ModelList))},
                          **errors("401")},
        }},
        "/models/{name}": {"get": {
            "summary": "One model's card, status and provider",
            "operationId": "show_model",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"},
                            **({"example": classifier} if classifier else {})}],
            "responses": {"200": {"description": "the model", "content": json_content(ref(ModelDescription))},
                          **errors("401", "404")},
        }},
        "/openapi.json": {"get": {
            "summary": "This document",
            "operationId": "openapi",
            "responses": {"200": {"description": "OpenAPI 3.1", "content": json_content({"type": "object"})},
                          **errors("401")},
        }},
    }
    autoencoder = default_models.get("reconstruction")
    if autoencoder:  # served where an autoencoder is (models/autoencoder/)
        reconstruction = {"description": f"format=auto with one image, or format=png: the reconstruction as a PNG, "
                                         f"its error in {ERROR_HEADER} (and X-Model); otherwise JSON, one "
                                         "reconstruction per image",
                          "content": {**PNG_CONTENT, **json_content(ref(ReconstructionAnswer))}}
        paths.update(image_route_paths("/reconstruct", "Reconstruct with the autoencoder, scoring each by its error",
                                       ReconstructParams, Base64ReconstructRequest, reconstruction, autoencoder,
                                       {"images": [png], "model": autoencoder}, classify_errors, tensor_errors))
    paths.update(v2.openapi_paths(classifier, auth))  # the Open Inference Protocol's routes, its error shape
    add_request_id_header(paths)
    document = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "visionserve",
            "version": "1",
            "description": (f"Image classification, segmentation and generation. Limits of this server: "
                            f"{limits.max_body_bytes} bytes per body, {limits.max_images_per_request} images per "
                            f"request, {limits.max_pixels_per_image} pixels per image "
                            f"({limits.max_segment_pixels} for /segment), {limits.max_samples_per_request} "
                            f"samples per /generate. Default generator: {generator}. BentoML's own routes "
                            "(/livez, /readyz, /metrics) are not described here."),
        },
        "paths": paths,
        "components": {"schemas": component_schemas(limits)},
    }
    if auth:
        document["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
        document["security"] = [{"bearer": []}, {"apiKey": []}]
    return document
