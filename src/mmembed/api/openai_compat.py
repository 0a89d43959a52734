"""OpenAI's embeddings wire format, as the hosted service's compatible mode speaks it.

``POST /compatible-mode/v1/embeddings`` and ``POST /v1/embeddings`` parse into the same
``EmbedRequest`` as the DashScope route and run through the same engine (limits, cache,
batching, vectors); only the shapes differ. Errors come from the same ``ErrorCode`` table,
rendered as ``{"error": {"message", "type", "param", "code"}}`` with the same HTTP statuses.
"""

from __future__ import annotations

import base64
import logging
import re
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response

from mmembed.api import door, schemas
from mmembed.api.auth import authenticate
from mmembed.api.routes import read_body, run_embedding
from mmembed.api.startup import check_ready
from mmembed.config import Settings
from mmembed.errors import ApiError, ErrorCode, echo
from mmembed.logs import request_id_var
from mmembed.types import ContentItem, EmbedRequest, EmbedResult

PATHS = ("/compatible-mode/v1/embeddings", "/v1/embeddings")
MODELS_PATHS = ("/compatible-mode/v1/models", "/v1/models")
ENCODINGS = ("float", "base64")
# infinity's convention: ``modality`` says what the strings in ``input`` are.
MODALITIES = {"text": "text", "image": "image", "video": "video"}
log = logging.getLogger("mmembed.api")

# OpenAI's error ``type`` by HTTP status (its SDKs map the status to an exception class).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_PARAM = re.compile(r"^(input(?:\[\d+\])?|model|dimensions|encoding_format|modality)(?=[.: ]|$)")


def parse_openai_request(body: bytes) -> tuple[EmbedRequest, str]:
    """The engine request and the asked ``encoding_format``."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"The request body is not valid JSON: {exc}.") from None
    return openai_request_from_data(data)


def openai_request_from_data(data: Any) -> tuple[EmbedRequest, str]:
    """``parse_openai_request`` for an already decoded body (a batch job's line)."""
    if not isinstance(data, dict):
        raise _bad("The request body must be a JSON object.")

    model = data.get("model")
    if model is None or model == "":
        raise ApiError(ErrorCode.EMPTY_MODEL, "model: must be set.")
    if not isinstance(model, str):
        raise _bad("model: must be a string.")

    encoding = data.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise _bad(f"encoding_format: must be 'float' or 'base64', got {encoding!r}.")

    modality = data.get("modality") or "text"
    if modality not in MODALITIES:
        raise _bad(f"modality: must be one of {', '.join(MODALITIES)}, got {modality!r}.")

    inp = data.get("input")
    if inp is None or inp in ("", []):
        raise ApiError(ErrorCode.EMPTY_INPUT, "input: must be a non-empty string or list.")
    if isinstance(inp, str | dict):
        inp = [inp]
    if not isinstance(inp, list):
        raise _bad("input: must be a string or a list.")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in inp) or any(
        isinstance(v, list) for v in inp
    ):
        raise _bad("input: token arrays are not supported; send the text itself.")
    items = [_item(i, raw, MODALITIES[modality]) for i, raw in enumerate(inp)]

    return (
        EmbedRequest(
            model=model,
            items=items,
            dimension=_dimensions(data.get("dimensions")),
            # not OpenAI's, but free to send through the SDKs' extra_body
            fps=schemas._fps(data.get("fps")),
            instruct=schemas._instruct(data.get("instruct")),
            text_type=_text_type(data.get("text_type")),
        ),
        encoding,
    )


def _item(index: int, raw: Any, modality: str) -> ContentItem:
    if isinstance(raw, str):
        if not raw.strip():
            raise _bad(f"input[{index}]: is empty.")
        raw = {modality: raw}
    # DashScope content objects are taken as they are (messages say input.contents[i], which
    # the renderer turns into input[i]).
    return schemas._item(index, raw)


def _text_type(value: Any) -> str | None:
    """DashScope's ``text_type`` ("query" | "document"), sent through the SDKs' extra_body."""
    if value is None or value in ("query", "document"):
        return value
    raise _bad(f"text_type: must be 'query' or 'document', got {value!r}.")


def _dimensions(value: Any) -> int | None:
    try:
        return schemas._dimension(value)
    except ApiError:
        raise _bad(f"dimensions: must be an integer, got {value!r}.") from None


def _bad(message: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_PARAMETER, message)


# -- rendering ------------------------------------------------------------------------------------
def render_embeddings(result: EmbedResult, model: str, encoding: str) -> bytes:
    vectors = np.ascontiguousarray(result.vectors, dtype="<f4")
    if encoding == "base64":
        rows: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
    else:
        rows = list(vectors)
    tokens = result.usage.total_tokens
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def openai_message(message: str) -> str:
    """A DashScope-route message in this route's vocabulary."""
    return (
        message.replace("input.contents[", "input[")
        .replace("input.contents", "input")
        .replace("parameters.dimension", "dimensions")
    )


def openai_error_body(error: ApiError) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` for ``error``."""
    message = openai_message(error.message)
    status = error.error.status
    match = _PARAM.match(message)
    param = match.group(1) if match else ("model" if message.startswith("Model ") else None)
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "param": param,
            "code": error.error.code,
        }
    }


def render_openai_error(error: ApiError) -> Response:
    headers = {"x-request-id": request_id_var.get(), **error.headers}
    return Response(
        orjson.dumps(openai_error_body(error)),
        status_code=error.error.status,
        media_type="application/json",
        headers=headers,
    )


# -- the handler ----------------------------------------------------------------------------------
async def embeddings(request: Request) -> Response:
    try:
        return await _embeddings(request)
    except ApiError as exc:
        extra = {"route": request.url.path, "status": exc.error.status}
        if exc.error.status >= 500:
            log.error("%s: %s", exc.error.code, exc.message, extra=extra)
        else:
            log.info("rejected %s: %s", exc.error.code, exc.message, extra=extra)
        return render_openai_error(exc)
    except Exception:  # a fault of ours: logged with its traceback, answered in OpenAI's shape
        log.exception("unhandled error")
        return render_openai_error(
            ApiError(ErrorCode.INTERNAL, "An internal error occurred; quote the x-request-id.")
        )


async def _embeddings(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    ctx = door.begin(request, route="openai")
    try:
        check_ready(request)
        req, encoding = parse_openai_request(await read_body(request, settings.max_body_bytes))
        req.max_items = settings.openai_max_inputs  # OpenAI's 2,048, not the DashScope cap
        result = await run_embedding(request, ctx, req)
    except BaseException as exc:
        await door.fail(request, ctx, exc)
        raise
    await door.commit(request, ctx)
    # (the canonical name: a client's 30 MB model string is never echoed back)
    body = render_embeddings(result, ctx.model, encoding)
    return Response(body, media_type="application/json")


# -- models: GET /v1/models, GET /v1/models/{model} -----------------------------------------------
def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "mmembed"}


async def list_models(request: Request) -> Response:
    """OpenAI's model list (``client.models.list()``): the API names this key may use."""
    try:
        principal = authenticate(request)
    except ApiError as exc:
        return render_openai_error(exc)
    names = [n for n in request.app.state.catalog.models if principal.may_use(n)]
    body = {"object": "list", "data": [_model_object(n) for n in names]}
    return Response(orjson.dumps(body), media_type="application/json")


async def get_model(request: Request) -> Response:
    """``client.models.retrieve(name)``; dated snapshots and aliases answer as their name."""
    try:
        principal = authenticate(request)
        name = request.path_params["model"]
        spec = request.app.state.catalog.get(name)
        if spec is None:
            raise ApiError(ErrorCode.NOT_FOUND, f"model: {echo(name)} is not served here.")
        if not principal.may_use(spec.name):
            raise ApiError(ErrorCode.ACCESS_DENIED, f"This API key may not use model {spec.name}.")
    except ApiError as exc:
        return render_openai_error(exc)
    return Response(orjson.dumps(_model_object(spec.name)), media_type="application/json")
