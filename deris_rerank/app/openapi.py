"""The HTTP API's own OpenAPI 3.0 description, served at GET /openapi.json.

`api_description(limits, has_gate)` documents exactly the API of `api.py` (POST /api/segment,
GET /api/health, GET /openapi.json): the two request forms of /api/segment (multipart and JSON)
with this server's limits, the response JSON field by field (`Result.to_json()`), and the error
shape {"error": "<one line>"} with each status it can answer. The page's (Gradio's) routes are
not part of the API and are left out.

Imports neither gradio nor fastapi; the JSON example's image is a small PNG drawn here.
"""
from __future__ import annotations

import base64
import io
from typing import Any, Dict

from ..version import __version__
from .service import Limits

Schema = Dict[str, Any]

# the values a multipart `gate` field may take (Python's requests sends str(True) == "True")
FORM_BOOLEANS = {"true": True, "false": False, "True": True, "False": False, "1": True, "0": False}

# every error status of the API: (in a few words, in full); each answers {"error": "<one line>"}
ERROR_STATUSES = {
    "400": ("bad input", "Bad input: an image that cannot be decoded or is above the pixel limit, no or too many "
                         "expressions, an empty expression, bad base64, invalid or too deeply nested JSON, unknown "
                         "fields, gate or tau of the wrong kind, tau outside [0, 1], tau without a re-ranker."),
    "404": ("no such path", "No such path in the API (under /api/, only /api/segment and /api/health exist)."),
    "405": ("a method the path does not take", "A method the path does not take; the Allow header names the one it takes."),
    "413": ("too large: the image file, the request body, or an expression",
            "Too large: the image file above the upload limit, the request body above what the limits allow, "
            "or an expression above the character limit."),
    "415": ("a content type other than multipart/form-data or application/json",
            "A content type other than multipart/form-data or application/json (or none)."),
    "429": ("the model stayed busy: retry later",
            "The model stayed busy past the queue limits (too many requests waiting, or one waited too long): "
            "retry later."),
    "500": ("a bug", "A bug in the server (the message names it; please report it). The server goes on serving."),
}


def _rle(what: str) -> Schema:
    return {"type": "object", "description": f"{what} as COCO RLE (compressed counts, column-major as pycocotools)",
            "required": ["size", "counts"],
            "properties": {"size": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                    "minItems": 2, "maxItems": 2, "description": "[H, W] of the image"},
                           "counts": {"type": "string"}}}


def _nullable(schema: Schema, description: str) -> Schema:
    return {**schema, "nullable": True, "description": description}


def _scores(description: str) -> Schema:
    return {"type": "array", "items": {"type": "number"}, "description": description}


RESULT_PROPERTIES: Schema = {
    "text": {"type": "string", "description": "the expression, as given"},
    "image_size": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2,
                   "description": "[H, W] of the decoded image (after its EXIF orientation)"},
    "answer": {"type": "string", "enum": ["single", "set"],
               "description": "single: one candidate; set: none (no object matches), one or several"},
    "selected": _nullable({"type": "integer", "minimum": 0},
                          "rank by DeRIS score of the chosen candidate (0 = Query-0, DeRIS's own first choice); for a set "
                          "its best-scored member; null when no object matches"),
    "selected_slot": _nullable({"type": "integer", "minimum": 0}, "DeRIS query slot of `selected`"),
    "selected_set": {"type": "array", "items": {"type": "integer", "minimum": 0},
                     "description": "ranks of the answer's candidates (empty: no object matches); their union is `mask`"},
    "objects": {"type": "integer", "minimum": 0, "description": "how many candidates the answer holds"},
    "p_no_target": _nullable({"type": "number"}, "a set re-ranker's probability that nothing matches (null otherwise)"),
    "member_scores": _nullable(_scores(""), "a set re-ranker's membership probabilities, in the order of scores"),
    "default_index": {"type": "integer", "minimum": 0, "description": "DeRIS query slot of Query-0"},
    "switched": {"type": "boolean", "description": "true when the answer differs from DeRIS's own: another candidate than "
                 "Query-0 (single), another set than DeRIS's union answer (set)"},
    "p_fail": _nullable({"type": "number"}, "the re-ranker's probability that Query-0 is wrong (null: gate off or none)"),
    "scores": _scores("DeRIS's referring scores of the candidates, best first (the ranks of the other fields)"),
    "rerank_scores": _nullable(_scores(""), "what the re-ranker ranked by, in the order of scores (null without it)"),
    "calibrated_scores": _nullable(_scores(""), "a calibrated re-ranker's candidate-text logits (null otherwise)"),
    "retrieved_scores": _nullable(_scores(""), "a retrieval memory's IoU-gain estimates (null without one)"),
    "slots": {"type": "array", "items": {"type": "integer", "minimum": 0},
              "description": "DeRIS query slot of each candidate, in the order of scores"},
    "existence": {"type": "number", "description": "DeRIS's probability that the expression refers to something"},
    "mask_area": {"type": "integer", "minimum": 0, "description": "pixels in the chosen mask"},
    "mask_empty": {"type": "boolean", "description": "true when the chosen mask has no pixel"},
    "unknown_words": {"type": "array", "items": {"type": "string"},
                      "description": "words of the expression outside the tokenizer's vocabulary"},
    "truncated_to_tokens": _nullable({"type": "integer"}, "tokens kept when the expression was too long (else null)"),
    "embedded_default": {"type": "boolean", "description": "answered by the RefShapes-only embedded default model"},
    "notes": {"type": "array", "items": {"type": "string"}, "description": "caveats about this answer, in words"},
    "mask": _rle("the chosen mask"),
    "deris_mask": _rle("DeRIS's own answer (union of its candidates above its threshold)"),
    "timings_ms": {"type": "object", "additionalProperties": {"type": "number"},
                   "description": "milliseconds per stage (stages shared by several pairs split evenly)"},
}


def example_image_png() -> bytes:
    """A small RefShapes-like scene (a red square and a blue circle on white), as PNG bytes."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((6, 20, 28, 42), fill=(220, 30, 30))
    draw.ellipse((36, 22, 58, 44), fill=(30, 60, 220))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _error_responses(*statuses: str) -> Dict[str, Schema]:
    return {status: {"$ref": f"#/components/responses/Error{status}"} for status in statuses}


def api_description(limits: Limits, has_gate: bool) -> Schema:
    """The OpenAPI 3.0.3 document of this server's API, with its `limits` as schema bounds."""
    text = {"type": "string", "minLength": 1, "maxLength": limits.max_text_chars, "pattern": r"\S",
            "description": f"a referring expression, at most {limits.max_text_chars:,} characters "
                           "(longer ones answer 413)"}
    texts = {"type": "array", "items": text, "minItems": 1, "maxItems": limits.max_texts,
             "description": f"the expressions, 1 to {limits.max_texts}; one result each, in order"}
    tau = {"type": "number", "minimum": 0, "maximum": 1,
           "description": "the gate's threshold for this request: switch only if p_fail > tau (left out or "
                          "null: its own)" + ("" if has_gate else "; this server has no re-ranker, so leave it out")}
    gate = {"type": "boolean", "default": True,
            "description": "false answers with DeRIS's own Query-0" + ("" if has_gate else " (always, here)")}
    image_limit = (f"at most {limits.max_upload_bytes:,} bytes (413 above) and {limits.max_pixels:,} pixels "
                   "(400 above); PNG, JPEG, WebP, BMP or TIFF")
    statuses = "; ".join(f"{status} {short}" for status, (short, _) in ERROR_STATUSES.items())
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "deris-rerank API",
            "version": __version__,
            "description": ("Referring image segmentation with DeRIS, re-ranked by a failure gate. Every error "
                            "answers {\"error\": \"<one line>\"} with its status: " + statuses + "."),
        },
        "paths": {
            "/api/segment": {"post": {
                "operationId": "segment",
                "summary": "Segment one image for one or more referring expressions",
                "requestBody": {"required": True, "content": {
                    "multipart/form-data": {
                        "schema": {"type": "object", "required": ["image", "text"], "properties": {
                            "image": {"type": "string", "format": "binary", "description": f"the image file, {image_limit}"},
                            "text": {**texts, "description": "one form field per expression: " + texts["description"]},
                            "gate": {"type": "string", "enum": list(FORM_BOOLEANS), "default": "true",
                                     "description": gate["description"]},
                            "tau": tau}},
                        "encoding": {"text": {"style": "form", "explode": True}},
                    },
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/SegmentJSON"},
                        "example": {"image": base64.b64encode(example_image_png()).decode(),
                                    "texts": ["the red square"], "gate": True},
                    },
                }},
                "responses": {
                    "200": {"description": "one result per expression, in order",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SegmentResponse"}}}},
                    **_error_responses("400", "413", "415", "429", "500"),
                },
            }},
            "/api/health": {"get": {
                "operationId": "health",
                "summary": "Liveness, and what this server runs: model, re-ranker, limits, batching, counters",
                "responses": {"200": {"description": "the server is up",
                                      "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}}},
            }},
            "/openapi.json": {"get": {
                "operationId": "openapi",
                "summary": "This description",
                "responses": {"200": {"description": "the OpenAPI document",
                                      "content": {"application/json": {"schema": {"type": "object"}}}}},
            }},
        },
        "components": {
            "schemas": {
                "SegmentJSON": {"type": "object", "required": ["image", "texts"], "additionalProperties": False,
                                "properties": {"image": {"type": "string", "format": "byte",
                                                         "description": f"base64 of the image file's bytes, {image_limit}"},
                                               "texts": texts, "gate": gate, "tau": {**tau, "nullable": True}}},
                "SegmentResponse": {"type": "object", "required": ["results"], "properties": {
                    "results": {"type": "array", "items": {"$ref": "#/components/schemas/Result"}}}},
                "Result": {"type": "object", "description": "the answer for one expression (Result.to_json())",
                           "required": sorted(RESULT_PROPERTIES), "properties": RESULT_PROPERTIES},
                "Health": {"type": "object", "required": ["status", "limits", "batching"], "properties": {
                    "status": {"type": "string", "enum": ["ok"]},
                    "embedded_default": {"type": "boolean"},
                    "deris": {"type": "string", "nullable": True, "description": "the DeRIS model file's name (null: embedded)"},
                    "reranker": {"type": "string", "nullable": True, "description": "the re-ranker's kind (null: none)"},
                    "tau": {"type": "number", "nullable": True, "description": "the re-ranker's own threshold"},
                    "limits": {"type": "object", "properties": {
                        name: {"type": "number" if name == "queue_timeout_s" else "integer"}
                        for name in ("max_upload_bytes", "max_pixels", "max_texts", "max_text_chars",
                                     "queue_timeout_s", "max_waiting")}},
                    "batching": {"type": "object", "properties": {"max_pairs": {"type": "integer"},
                                                                  "wait_ms": {"type": "number"}}},
                    **{name: {"type": "integer", "minimum": 0} for name in (
                        "served", "refused_busy", "encoded", "waiting", "cached_images", "batches",
                        "batched_pairs", "largest_batch_pairs", "largest_batch_requests")},
                }},
                "Error": {"type": "object", "required": ["error"], "additionalProperties": False,
                          "properties": {"error": {"type": "string", "description": "what went wrong and what to do, one line"}}},
            },
            "responses": {
                f"Error{status}": {"description": why,
                                   "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                for status, (_, why) in ERROR_STATUSES.items()
            },
        },
    }
