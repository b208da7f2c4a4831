"""The OpenAPI 3.1 document of our own routes, served at GET /openapi.json.

BentoML's /docs.json describes only its typed APIs, and our routes are a plain Starlette app mounted into
the service, so it does not know their bodies, parameters or answers. This document does: request bodies
and parameters come from the same pydantic models that parse them (service/http_front.py, segment.py,
generate.py), answers from the models below (documentation only: the hot path builds plain dicts, and
tests/test_fuzz.py checks with schemathesis that the answers conform). Built per service, from its
configuration: the model names of the examples, the limits, and the security scheme when an API key is set.
"""

from __future__ import annotations

import base64
import io
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from .config import RequestLimits
from .features import EmbedJsonRequest, EmbedParams, SimilarJsonRequest, SimilarParams
from .generate import GenerateParams, InterpolateParams
from .http_front import Base64ImagesRequest, ImageParams
from . import v2
from .explain import ExplainJsonRequest, ExplainParams
from .segment import SegmentJsonRequest, SegmentParams
from .reconstruct import ERROR_HEADER, Base64ReconstructRequest, ReconstructParams

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


class ClassificationAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str
    version: str | None
    predictions: list[Prediction]


class SaliencyMap(BaseModel):
    model_config = ConfigDict(extra="forbid")
    height: int = Field(..., ge=1)
    width: int = Field(..., ge=1)
    values: list[list[float]] | str = Field(..., description="rows of floats (encoding=list), or a base64 float32 "
                                                             ".npy array [height, width] (encoding=npy-base64)")


class ExplanationAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str
    version: str | None
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


class EmbeddingAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str
    version: str | None
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


class SimilarityAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str
    version: str | None
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


class SegmentationAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str
    version: str | None
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


class GeneratedImages(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str
    version: str | None
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


class ReconstructionAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str
    version: str | None
    error_definition: str
    reconstructions: list[Reconstruction]


SCHEMA_MODELS = SCHEMA_MODELS + (ReconstructionAnswer, Base64ReconstructRequest)


# --- building blocks ----------------------------------------------------------------------------------

def ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF_TEMPLATE.format(model=model.__name__)}


def explain_paths(classifier: str | None, png: str, image_errors: dict, errors) -> dict:
    """/explain in the three input forms of /classify, one image each (service/explain.py)."""
    answer = {"description": "a saliency map for the target class (JSON), or with format=overlay a PNG heat map "
                             "over the input (headers X-Model, X-Method, X-Target, X-Target-Index, "
                             "X-Target-Probability)",
              "content": {**json_content(ref(ExplanationAnswer)), **PNG_CONTENT}}
    return {
        "/explain": {"post": {
            "summary": "Explain one uploaded image's classification: occlusion or class activation map",
            "operationId": "explain", "parameters": query_parameters(ExplainParams, classifier),
            "requestBody": {"required": True, "content": {"multipart/form-data": {
                "schema": multipart_body("images", ExplainParams, many=False)}}},
            "responses": {"200": answer, **image_errors}}},
        "/explain/json": {"post": {
            "summary": "Explain one base64 image's classification", "operationId": "explain_json",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": ref(ExplainJsonRequest),
                "example": {"images": [png], **({"model": classifier} if classifier else {})}}}},
            "responses": {"200": answer, **image_errors}}},
        "/explain/tensor": {"post": {
            "summary": "Explain one uint8 .npy image [1,H,W] or [1,C,H,W] of model-ready pixels",
            "operationId": "explain_tensor", "parameters": query_parameters(ExplainParams, classifier),
            "requestBody": {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}},
            "responses": {"200": answer, **errors("401", "404", "413", "422", "503")}}},
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
    buffer = io.BytesIO()
    Image.new("L", (28, 28), 0).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


NPY_CONTENT = {"application/x-npy": {"schema": {"type": "string", "format": "binary"}}}


def reconstruct_paths(autoencoder: str | None, png: str, image_errors: dict, errors) -> dict:
    """/reconstruct in the three input forms of /classify (service/reconstruct.py)."""
    answer = {"description": f"format=auto with one image, or format=png: the reconstruction as a PNG, its error in "
                             f"{ERROR_HEADER} (and X-Model); otherwise JSON, one reconstruction per image",
              "content": {**PNG_CONTENT, **json_content(ref(ReconstructionAnswer))}}
    example_model = {"model": autoencoder} if autoencoder else {}
    return {
        "/reconstruct": {"post": {
            "summary": "Reconstruct uploaded image files with the autoencoder, and score each by its error",
            "operationId": "reconstruct", "parameters": query_parameters(ReconstructParams, autoencoder),
            "requestBody": {"required": True, "content": {"multipart/form-data": {
                "schema": multipart_body("images", ReconstructParams, many=True)}}},
            "responses": {"200": answer, **image_errors}}},
        "/reconstruct/json": {"post": {
            "summary": "Reconstruct base64 image files sent in JSON", "operationId": "reconstruct_json",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": ref(Base64ReconstructRequest), "example": {"images": [png], **example_model}}}},
            "responses": {"200": answer, **image_errors}}},
        "/reconstruct/tensor": {"post": {
            "summary": "Reconstruct a uint8 .npy batch [N,H,W] or [N,C,H,W] of model-ready pixels",
            "operationId": "reconstruct_tensor", "parameters": query_parameters(ReconstructParams, autoencoder),
            "requestBody": {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}},
            "responses": {"200": answer, **errors("401", "404", "413", "422", "503")}}},
    }


def feature_paths(classifier: str | None, png: str, image_errors: dict, errors) -> dict:
    """/embed and /similar (service/features.py): the three input forms of /classify each."""
    embedded = {"description": "one embedding per image: JSON, or with format=npy (or Accept: application/x-npy) "
                               "one float32 .npy array [N, D] with X-Model, X-Model-Version, X-Embedding-Dimension",
                "content": {**json_content(ref(EmbeddingAnswer)), **NPY_CONTENT}}
    similar = {"description": "the k nearest reference images of each image, nearest first",
               "content": json_content(ref(SimilarityAnswer))}
    example_model = {"model": classifier} if classifier else {}
    paths = {}
    for route, params, json_request, answer, what in (
            ("/embed", EmbedParams, EmbedJsonRequest, embedded, "embedding"),
            ("/similar", SimilarParams, SimilarJsonRequest, similar, "nearest training images")):
        name = route.strip("/")
        paths[route] = {"post": {
            "summary": f"The classifier's {what} of uploaded image files", "operationId": name,
            "parameters": query_parameters(params, classifier),
            "requestBody": {"required": True, "content": {"multipart/form-data": {
                "schema": multipart_body("images", params, many=True)}}},
            "responses": {"200": answer, **image_errors}}}
        paths[f"{route}/json"] = {"post": {
            "summary": f"The classifier's {what} of base64 image files sent in JSON", "operationId": f"{name}_json",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": ref(json_request), "example": {"images": [png], **example_model}}}},
            "responses": {"200": answer, **image_errors}}}
        paths[f"{route}/tensor"] = {"post": {
            "summary": f"The classifier's {what} of a uint8 .npy batch [N,H,W] or [N,C,H,W]",
            "operationId": f"{name}_tensor", "parameters": query_parameters(params, classifier),
            "requestBody": {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}},
            "responses": {"200": answer, **errors("401", "404", "413", "422", "503")}}}
    return paths


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
    paths = {
        "/classify": {"post": {
            "summary": "Classify uploaded image files",
            "operationId": "classify",
            "parameters": query_parameters(ImageParams, classifier),
            "requestBody": {"required": True, "content": {"multipart/form-data": {
                "schema": multipart_body("images", ImageParams, many=True)}}},
            "responses": {"200": classification, **classify_errors},
        }},
        "/classify/json": {"post": {
            "summary": "Classify base64 image files sent in JSON",
            "operationId": "classify_json",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": ref(Base64ImagesRequest),
                "example": {"images": [png], "top_k": 2, **({"model": classifier} if classifier else {})}}}},
            "responses": {"200": classification, **classify_errors},
        }},
        "/classify/tensor": {"post": {
            "summary": "Classify a uint8 .npy batch [N,H,W] or [N,C,H,W] of model-ready pixels",
            "operationId": "classify_tensor",
            "parameters": query_parameters(ImageParams, classifier),
            "requestBody": {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}},
            "responses": {"200": classification, **errors("401", "404", "413", "422", "503")},
        }},
        **feature_paths(classifier, png, classify_errors, errors),
        **explain_paths(classifier, png, classify_errors, errors),
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
        "/generate": {"post": {
            "summary": "Generate samples of a class (a grid PNG, or JSON of base64 PNGs)",
            "operationId": "generate",
            # Required: a JSON Content-Type is (an empty body with it means {}, every field its default).
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": ref(GenerateParams), "example": {"n": 4, "class": 0, "seed": 1, "scale": 1}}}},
            "responses": {
                "200": {"description": "format=grid: one PNG; format=images: JSON",
                        "headers": {"X-Seed": {"required": True, "description": "the seed used",
                                               "schema": {"type": "string", "pattern": "^[0-9]+$"}}},
                        "content": {**PNG_CONTENT, **json_content(ref(GeneratedImages))}},
                **errors("400", "401", "404", "415", "422", "503"),
            },
        }},
        "/generate/interpolate": {"post": {
            "summary": "A strip of samples walking from one seed's noise to another's",
            "operationId": "interpolate",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": ref(InterpolateParams), "example": {"from_seed": 1, "to_seed": 2, "class": 0, "steps": 4}}}},
            "responses": {
                "200": {"description": "one PNG strip",
                        "headers": {name: {"required": True, "schema": {"type": "string"}}
                                    for name in ("X-Model", "X-Class", "X-Steps")},
                        "content": PNG_CONTENT},
                **errors("400", "401", "404", "415", "422", "503"),
            },
        }},
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
    if default_models.get("reconstruction"):  # served where an autoencoder is (models/autoencoder/)
        paths.update(reconstruct_paths(default_models["reconstruction"], png, classify_errors, errors))
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
