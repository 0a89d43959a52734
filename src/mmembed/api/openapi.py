"""``GET /openapi.json`` (an OpenAPI 3.1 document, built here by hand from small schema
declarations, since the routes parse JSON themselves) and ``GET /docs`` (a self-contained page
that renders it, no CDN)."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

import mmembed
from mmembed.api import metrics, openai_compat, playground, rerank, text_embedding, uploads
from mmembed.api.routes import EMBED_PATH
from mmembed.errors import ErrorCode

JSON_PATH = "/openapi.json"
DOCS_PATH = "/docs"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props, **extra}
    if required:
        out["required"] = list(required)
    return out


_STR = {"type": "string"}
_INT = {"type": "integer"}
_MEDIA = {"type": "string", "description": "http(s) URL, data: URI, or oss:// (uploads)"}

SCHEMAS: dict[str, Any] = {
    "ContentItem": {
        "description": "A string (text) or an object with text, image, video (several of them: "
        "one fused vector, where the model allows) or multi_images.",
        "oneOf": [
            _STR,
            _obj(
                {
                    "text": _STR,
                    "image": _MEDIA,
                    "video": _MEDIA,
                    "multi_images": {"type": "array", "items": _MEDIA, "maxItems": 8},
                    "factor": {"type": "number", "description": "sent by SDKs; ignored"},
                }
            ),
        ],
    },
    "EmbedRequest": _obj(
        {
            "model": _STR,
            "input": _obj(
                {"contents": {"type": "array", "items": _ref("ContentItem"), "minItems": 1}},
                ("contents",),
            ),
            "parameters": _obj(
                {
                    "dimension": _INT,
                    "output_type": {"type": "string", "enum": ["dense"]},
                    "fps": {"type": "number", "minimum": 0, "maximum": 1},
                    "instruct": _STR,
                    "enable_fusion": {"type": "boolean"},
                    "max_video_frames": _INT,
                },
                additionalProperties=True,
            ),
        },
        ("model", "input"),
    ),
    "EmbedResponse": _obj(
        {
            "output": _obj(
                {
                    "embeddings": {
                        "type": "array",
                        "items": _obj(
                            {
                                "index": _INT,
                                "embedding": {"type": "array", "items": {"type": "number"}},
                                "type": {
                                    "type": "string",
                                    "enum": ["text", "image", "video", "multi_images", "vl"],
                                },
                            },
                            ("index", "embedding", "type"),
                        ),
                    }
                },
                ("embeddings",),
            ),
            "usage": _obj(
                {
                    "input_tokens": _INT,
                    "image_tokens": _INT,
                    "image_count": _INT,
                    "duration": _INT,
                }
            ),
            "request_id": _STR,
        },
        ("output", "usage", "request_id"),
    ),
    "Error": _obj(
        {
            "code": {"type": "string", "enum": sorted({e.code for e in ErrorCode})},
            "message": _STR,
            "request_id": _STR,
        },
        ("code", "message", "request_id"),
    ),
    "OpenAIEmbeddingRequest": _obj(
        {
            "model": _STR,
            "input": {
                "oneOf": [
                    _STR,
                    {"type": "array", "items": _ref("ContentItem"), "minItems": 1},
                ]
            },
            "dimensions": _INT,
            "encoding_format": {"type": "string", "enum": list(openai_compat.ENCODINGS)},
            "modality": {
                "type": "string",
                "enum": list(openai_compat.MODALITIES),
                "description": "what the strings in input are (infinity's convention)",
            },
            "user": _STR,
        },
        ("model", "input"),
    ),
    "OpenAIEmbeddingResponse": _obj(
        {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": _obj(
                    {
                        "object": {"const": "embedding"},
                        "index": _INT,
                        "embedding": {
                            "oneOf": [
                                {"type": "array", "items": {"type": "number"}},
                                {"type": "string", "description": "base64, little-endian f32"},
                            ]
                        },
                    },
                    ("object", "index", "embedding"),
                ),
            },
            "model": _STR,
            "usage": _obj({"prompt_tokens": _INT, "total_tokens": _INT}),
        },
        ("object", "data", "model", "usage"),
    ),
    "OpenAIError": _obj(
        {
            "error": _obj(
                {
                    "message": _STR,
                    "type": _STR,
                    "param": {"type": ["string", "null"]},
                    "code": _STR,
                },
                ("message", "type", "param", "code"),
            )
        },
        ("error",),
    ),
    "Health": _obj(
        {
            "status": {"type": "string", "enum": ["ok", "degraded", "loading"]},
            "backends": {"type": "object", "additionalProperties": _STR},
            "cache": {"type": "object"},
            "batching": {"type": "object"},
        },
        ("status",),
    ),
    "RerankItem": {
        "description": "A query or document: a string (text) or an object with text, image "
        "or video (what the model accepts).",
        "oneOf": [_STR, _obj({"text": _STR, "image": _MEDIA, "video": _MEDIA})],
    },
    "RerankRequest": _obj(
        {
            "model": _STR,
            "input": _obj(
                {
                    "query": _ref("RerankItem"),
                    "documents": {"type": "array", "items": _ref("RerankItem"), "minItems": 1},
                },
                ("query", "documents"),
            ),
            "parameters": _obj(
                {
                    "top_n": {"type": "integer", "minimum": 1},
                    "return_documents": {"type": "boolean"},
                    "instruct": _STR,
                    "fps": {"type": "number", "minimum": 0, "maximum": 1},
                },
                additionalProperties=True,
            ),
        },
        ("model", "input"),
    ),
    "RerankResult": _obj(
        {
            "index": _INT,
            "relevance_score": {"type": "number", "minimum": 0, "maximum": 1},
            "document": {"type": "object", "description": "with return_documents"},
        },
        ("index", "relevance_score"),
    ),
    "RerankResponse": _obj(
        {
            "output": _obj(
                {"results": {"type": "array", "items": _ref("RerankResult")}}, ("results",)
            ),
            "usage": _obj({"total_tokens": _INT}, ("total_tokens",)),
            "request_id": _STR,
        },
        ("output", "usage", "request_id"),
    ),
    "FlatRerankRequest": _obj(
        {
            "model": _STR,
            "query": _ref("RerankItem"),
            "documents": {"type": "array", "items": _ref("RerankItem"), "minItems": 1},
            "top_n": {"type": "integer", "minimum": 1},
            "return_documents": {"type": "boolean", "default": True},
            "instruct": _STR,
        },
        ("model", "query", "documents"),
    ),
    "FlatRerankResponse": _obj(
        {
            "id": _STR,
            "object": {"const": "list"},
            "model": _STR,
            "results": {"type": "array", "items": _ref("RerankResult")},
            "usage": _obj({"total_tokens": _INT}, ("total_tokens",)),
        },
        ("id", "model", "results", "usage"),
    ),
    "TextEmbeddingRequest": _obj(
        {
            "model": _STR,
            "input": _obj({"texts": {"type": "array", "items": _STR, "minItems": 1}}, ("texts",)),
            "parameters": _obj(
                {
                    "text_type": {"type": "string", "enum": ["query", "document"]},
                    "dimension": _INT,
                    "output_type": {
                        "type": "string",
                        "enum": ["dense", "sparse", "dense&sparse"],
                        "description": "sparse forms: 400 (no served backend has a sparse head)",
                    },
                    "instruct": _STR,
                },
                additionalProperties=True,
            ),
        },
        ("model", "input"),
    ),
    "TextEmbeddingResponse": _obj(
        {
            "output": _obj(
                {
                    "embeddings": {
                        "type": "array",
                        "items": _obj(
                            {
                                "text_index": _INT,
                                "embedding": {"type": "array", "items": {"type": "number"}},
                            },
                            ("text_index", "embedding"),
                        ),
                    }
                },
                ("embeddings",),
            ),
            "usage": _obj({"total_tokens": _INT}, ("total_tokens",)),
            "request_id": _STR,
        },
        ("output", "usage", "request_id"),
    ),
    "Models": _obj({"models": {"type": "array", "items": {"type": "object"}}}, ("models",)),
    "OpenAIModel": _obj(
        {"id": _STR, "object": _STR, "created": _INT, "owned_by": _STR}, ("id", "object")
    ),
    "OpenAIModelList": _obj(
        {"object": _STR, "data": {"type": "array", "items": _ref("OpenAIModel")}},
        ("object", "data"),
    ),
    "UploadPolicy": _obj({"request_id": _STR, "data": {"type": "object"}}, ("data",)),
    "UploadResult": _obj({"request_id": _STR, "key": _STR, "size": _INT}),
}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _errors(schema: str, *statuses: int) -> dict[str, Any]:
    return {str(s): _json(schema, "error") for s in statuses}


_DS_ERRORS = (400, 401, 403, 408, 413, 415, 421, 429, 500, 503)  # 415/421: request_guard
_SECURE: list[dict[str, list[str]]] = [{"bearer": []}]


def _openai_op(path: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": "Embeddings, OpenAI-compatible",
            "operationId": "openai_embeddings"
            + path.split("/v1")[0].replace("/", "_").replace("-", "_"),
            "tags": ["OpenAI-compatible"],
            "security": _SECURE,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("OpenAIEmbeddingRequest")}},
            },
            "responses": {
                "200": _json("OpenAIEmbeddingResponse", "vectors"),
                **_errors("OpenAIError", *_DS_ERRORS),
            },
        }
    }


def _post(
    summary: str, op: str, tag: str, request: str, response: str, error: str
) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "operationId": op,
            "tags": [tag],
            "security": _SECURE,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request)}},
            },
            "responses": {"200": _json(response, "the answer"), **_errors(error, *_DS_ERRORS)},
        }
    }


def _openai_models_ops(path: str) -> dict[str, Any]:
    """``GET {base}/models`` and ``GET {base}/models/{model}`` (OpenAI's list and retrieve)."""
    suffix = path.split("/v1")[0].replace("/", "_").replace("-", "_")
    common = {"tags": ["OpenAI-compatible"], "security": _SECURE}
    return {
        path: {
            "get": {
                "summary": "Model names this key may use (OpenAI's list)",
                "operationId": "openai_models" + suffix,
                **common,
                "responses": {
                    "200": _json("OpenAIModelList", "models"),
                    **_errors("OpenAIError", 401),
                },
            }
        },
        path + "/{model}": {
            "get": {
                "summary": "One model (aliases and dated snapshots answer as their name)",
                "operationId": "openai_model" + suffix,
                **common,
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": _STR}],
                "responses": {
                    "200": _json("OpenAIModel", "the model"),
                    **_errors("OpenAIError", 401, 403, 404),
                },
            }
        },
    }


PATHS: dict[str, Any] = {
    EMBED_PATH: {
        "post": {
            "summary": "Multimodal embeddings (DashScope API); with X-DashScope-Async: enable "
            "and input.url, an async task over a table of items",
            "operationId": "multimodal_embedding",
            "parameters": [
                {"name": "X-DashScope-Async", "in": "header", "schema": {"const": "enable"}}
            ],
            "tags": ["DashScope"],
            "security": _SECURE,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("EmbedRequest")}},
            },
            "responses": {
                "200": _json("EmbedResponse", "vectors"),
                **_errors("Error", *_DS_ERRORS),
            },
        }
    },
    **{path: _openai_op(path) for path in openai_compat.PATHS},
    text_embedding.PATH: _post(
        "Text embeddings (DashScope API, dashscope.TextEmbedding)",
        "text_embedding",
        "DashScope",
        "TextEmbeddingRequest",
        "TextEmbeddingResponse",
        "Error",
    ),
    rerank.NATIVE_PATH: _post(
        "Rerank (DashScope API, dashscope.TextReRank)",
        "text_rerank",
        "DashScope",
        "RerankRequest",
        "RerankResponse",
        "Error",
    ),
    rerank.COMPATIBLE_PATH: _post(
        "Rerank, the hosted compatible shape (flat body)",
        "compatible_rerank",
        "OpenAI-compatible",
        "FlatRerankRequest",
        "FlatRerankResponse",
        "OpenAIError",
    ),
    rerank.V1_PATH: _post(
        "Rerank, the Cohere / Jina / vLLM shape",
        "v1_rerank",
        "OpenAI-compatible",
        "FlatRerankRequest",
        "FlatRerankResponse",
        "OpenAIError",
    ),
    **{k: v for path in openai_compat.MODELS_PATHS for k, v in _openai_models_ops(path).items()},
    "/health": {
        "get": {
            "summary": "Readiness, backend status, cache and batching counters",
            "operationId": "health",
            "tags": ["Operations"],
            "responses": {
                "200": _json("Health", "serving"),
                "503": _json("Health", "loading models"),
            },
        }
    },
    "/models": {
        "get": {
            "summary": "Served model names and their limits",
            "operationId": "models",
            "tags": ["Operations"],
            "security": _SECURE,
            "responses": {"200": _json("Models", "the catalog"), **_errors("Error", 401)},
        }
    },
    metrics.PATH: {
        "get": {
            "summary": "Prometheus metrics",
            "operationId": "metrics",
            "tags": ["Operations"],
            "responses": {
                "200": {
                    "description": "text exposition format",
                    "content": {"text/plain": {"schema": _STR}},
                },
                **_errors("Error", 401),  # only with metrics_keys
            },
        }
    },
    uploads.POLICY_PATH: {
        "get": {
            "summary": "Upload policy for the SDK's local-file flow",
            "operationId": "upload_policy",
            "tags": ["Uploads"],
            "security": _SECURE,
            "parameters": [
                {
                    "name": "action",
                    "in": "query",
                    "required": True,
                    "schema": {"const": "getPolicy"},
                },
                {"name": "model", "in": "query", "required": False, "schema": _STR},
            ],
            "responses": {
                "200": _json("UploadPolicy", "policy"),
                **_errors("Error", 400, 401, 403),
            },
        }
    },
    uploads.UPLOAD_PATH: {
        "post": {
            "summary": "Upload a file (OSS-style form post, as the SDK sends it)",
            "operationId": "upload",
            "tags": ["Uploads"],
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": _obj(
                            {
                                "key": _STR,
                                "policy": _STR,
                                "Signature": _STR,
                                "file": {"type": "string", "format": "binary"},
                            },
                            ("key", "policy", "Signature", "file"),
                        )
                    }
                },
            },
            "responses": {
                "200": _json("UploadResult", "stored"),
                **_errors("Error", 400, 401, 403, 409, 413),
            },
        }
    },
    JSON_PATH: {
        "get": {
            "summary": "This document",
            "operationId": "openapi",
            "tags": ["Operations"],
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    },
    playground.INDEX_PATH: {
        "get": {
            "summary": "The playground: rank images, videos and texts by similarity in a browser",
            "operationId": "playground",
            "tags": ["Playground"],
            "responses": {
                "200": {"description": "HTML", "content": {"text/html": {"schema": _STR}}}
            },
        }
    },
    playground.ASSET_PATH: {
        "get": {
            "summary": "The playground's script and style sheet",
            "operationId": "playground_asset",
            "tags": ["Playground"],
            "parameters": [
                {
                    "name": "name",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": ["app.js", "style.css", "index.html"]},
                }
            ],
            "responses": {
                "200": {"description": "the file", "content": {"text/plain": {"schema": _STR}}},
                "404": {"description": "no such file"},
            },
        }
    },
    DOCS_PATH: {
        "get": {
            "summary": "This document as a web page",
            "operationId": "docs",
            "tags": ["Operations"],
            "responses": {
                "200": {"description": "HTML", "content": {"text/html": {"schema": _STR}}}
            },
        }
    },
}

# Admin routes (api/admin.py), for admin keys only.
_KEY_BODY = _obj(
    {
        "name": _STR,
        "models": {"type": "array", "items": _STR},
        "rpm": {"type": ["integer", "null"]},
        "tpm": {"type": ["integer", "null"]},
        "monthly_tokens": {"type": ["integer", "null"]},
    },
    ("name",),
)
_ANY = {"description": "JSON", "content": {"application/json": {"schema": {"type": "object"}}}}
_ADMIN = {"tags": ["Admin"], "security": _SECURE}
_NAME = [{"name": "name", "in": "path", "required": True, "schema": _STR}]
ADMIN_PATHS: dict[str, Any] = {
    "/admin/keys": {
        "get": {
            **_ADMIN,
            "summary": "List managed API keys (never their secrets)",
            "operationId": "listKeys",
            "responses": {"200": _ANY, **_errors("Error", 401, 403, 503)},
        },
        "post": {
            **_ADMIN,
            "summary": "Create a managed API key; the answer holds its secret, shown once",
            "operationId": "createKey",
            "requestBody": {"content": {"application/json": {"schema": _KEY_BODY}}},
            "responses": {"201": _ANY, "200": _ANY, **_errors("Error", 400, 401, 403, 503)},
        },
    },
    "/admin/keys/{name}": {
        "patch": {
            **_ADMIN,
            "summary": "Change a key's models or limits (null removes a limit)",
            "operationId": "updateKey",
            "parameters": _NAME,
            "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": {"200": _ANY, **_errors("Error", 400, 401, 403, 404, 503)},
        },
        "delete": {
            **_ADMIN,
            "summary": "Revoke a key (every server refuses it within 1 s)",
            "operationId": "revokeKey",
            "parameters": _NAME,
            "responses": {"200": _ANY, **_errors("Error", 401, 403, 404, 503)},
        },
    },
    "/admin/usage": {
        "get": {
            **_ADMIN,
            "summary": "Usage report: requests, tokens by kind, cost per key, model or day",
            "operationId": "usage",
            "parameters": [
                {"name": n, "in": "query", "schema": _STR}
                for n in ("key", "route", "since", "until", "by")
            ],
            "responses": {"200": _ANY, **_errors("Error", 400, 401, 403, 503)},
        }
    },
}


# Batch jobs (api/batches.py: OpenAI Files + Batches; api/tasks.py: DashScope async tasks).
_NO_BODY = {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}}


def _id(name: str) -> list[dict[str, Any]]:
    return [{"name": name, "in": "path", "required": True, "schema": _STR}]


def _batch_ops(prefix: str) -> dict[str, Any]:
    tag = {"tags": ["Batch jobs (OpenAI)"], "security": _SECURE}
    op = prefix.strip("/").replace("/", "_").replace("-", "_")
    errors = _errors("OpenAIError", 400, 401, 404, 413, 429, 503)
    return {
        f"{prefix}/files": {
            "post": {
                **tag,
                "summary": "Upload a batch input file (JSONL, purpose=batch)",
                "operationId": f"{op}_create_file",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": _obj(
                                {
                                    "purpose": {"const": "batch"},
                                    "file": {"type": "string", "format": "binary"},
                                },
                                ("purpose", "file"),
                            )
                        }
                    },
                },
                "responses": {"200": _ANY, **errors},
            },
            "get": {
                **tag,
                "summary": "This key's files (purpose, after, limit, order)",
                "operationId": f"{op}_list_files",
                "responses": {"200": _ANY, **errors},
            },
        },
        f"{prefix}/files/{{file_id}}": {
            "get": {
                **tag,
                "summary": "A file object",
                "operationId": f"{op}_retrieve_file",
                "parameters": _id("file_id"),
                "responses": {"200": _ANY, **errors},
            },
            "delete": {
                **tag,
                "summary": "Delete a file (not while an unfinished batch reads it)",
                "operationId": f"{op}_delete_file",
                "parameters": _id("file_id"),
                "responses": {"200": _ANY, **errors},
            },
        },
        f"{prefix}/files/{{file_id}}/content": {
            "get": {
                **tag,
                "summary": "A file's bytes (inputs, output and error files)",
                "operationId": f"{op}_file_content",
                "parameters": _id("file_id"),
                "responses": {
                    "200": {
                        "description": "JSONL",
                        "content": {"application/jsonl": {"schema": _STR}},
                    },
                    **errors,
                },
            }
        },
        f"{prefix}/batches": {
            "post": {
                **tag,
                "summary": "Create a batch (input_file_id, endpoint, completion_window, metadata)",
                "operationId": f"{op}_create_batch",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {"200": _ANY, **errors},
            },
            "get": {
                **tag,
                "summary": "This key's batches, newest first (after, limit)",
                "operationId": f"{op}_list_batches",
                "responses": {"200": _ANY, **errors},
            },
        },
        f"{prefix}/batches/{{id}}": {
            "get": {
                **tag,
                "summary": "A batch: status, request_counts, output and error file ids",
                "operationId": f"{op}_retrieve_batch",
                "parameters": _id("id"),
                "responses": {"200": _ANY, **errors},
            }
        },
        f"{prefix}/batches/{{id}}/cancel": {
            "post": {
                **tag,
                "summary": "Cancel a batch (what is done is kept)",
                "operationId": f"{op}_cancel_batch",
                "parameters": _id("id"),
                "requestBody": _NO_BODY,
                "responses": {"200": _ANY, **errors},
            }
        },
    }


_TASK = {"tags": ["Batch jobs (DashScope async tasks)"], "security": _SECURE}
_TASK_ERRORS = _errors("Error", 400, 401, 404, 503)
TASK_PATHS: dict[str, Any] = {
    "/api/v1/tasks": {
        "get": {
            **_TASK,
            "summary": "This key's async tasks (page_no, page_size, status)",
            "operationId": "list_tasks",
            "responses": {"200": _ANY, **_TASK_ERRORS},
        }
    },
    "/api/v1/tasks/{task_id}": {
        "get": {
            **_TASK,
            "summary": "An async task: task_status, task_metrics, result url when done",
            "operationId": "get_task",
            "parameters": _id("task_id"),
            "responses": {"200": _ANY, **_TASK_ERRORS},
        }
    },
    "/api/v1/tasks/{task_id}/cancel": {
        "post": {
            **_TASK,
            "summary": "Cancel a task (what is done is kept)",
            "operationId": "cancel_task",
            "parameters": _id("task_id"),
            "requestBody": _NO_BODY,
            "responses": {"200": _ANY, **_TASK_ERRORS},
        }
    },
    "/api/v1/tasks/{task_id}/result": {
        "get": {
            **_TASK,
            "summary": "A task's result file (the signed url of the task, or the task's key)",
            "operationId": "task_result",
            "parameters": _id("task_id"),
            "responses": {
                "200": {"description": "JSONL", "content": {"application/jsonl": {"schema": _STR}}},
                **_TASK_ERRORS,
            },
        }
    },
}
BATCH_PATHS: dict[str, Any] = {
    path: item
    for prefix in ("/v1", "/compatible-mode/v1")
    for path, item in _batch_ops(prefix).items()
} | TASK_PATHS


@cache
def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mmembed",
            "version": mmembed.__version__,
            "description": "Multimodal embeddings speaking the DashScope multimodal-embedding "
            "API, with OpenAI-compatible embeddings routes.",
        },
        "paths": PATHS | ADMIN_PATHS | BATCH_PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


async def openapi_json(request: Request) -> Response:
    return JSONResponse(document())


async def docs(request: Request) -> Response:
    page = resources.files("mmembed.api").joinpath("docs.html").read_text(encoding="utf-8")
    return HTMLResponse(page)
