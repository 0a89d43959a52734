"""DashScope's text-embedding wire shape: ``POST
/api/v1/services/embeddings/text-embedding/text-embedding``, what
``dashscope.TextEmbedding.call(model, input=[...], dimension=, text_type=, instruct=,
output_type=)`` sends: ``{"model", "input": {"texts": [...]}, "parameters": {"text_type",
"dimension", "output_type", "instruct"}}`` -> ``{"output": {"embeddings": [{"text_index",
"embedding"}]}, "usage": {"total_tokens"}, "request_id"}``.

The texts run through the embedding path of the multimodal route (``routes.run_embedding``:
door, engine, ledger). ``text_type`` is "query" or "document" (the SDK's default, when not
sent, is the name's ``default_text_type`` in the catalog); ``output_type`` is "dense" - the
sparse forms need a backend with a sparse head, which no served family has, so they get a 400
that says so.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from mmembed.api import door, schemas
from mmembed.api.routes import read_body, run_embedding
from mmembed.api.startup import check_ready
from mmembed.config import Settings
from mmembed.errors import ApiError, ErrorCode, echo
from mmembed.types import ContentItem, EmbedRequest, EmbedResult

PATH = "/api/v1/services/embeddings/text-embedding/text-embedding"
TEXT_TYPES = ("query", "document")
SPARSE = ("sparse", "dense&sparse")


def _bad(message: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_PARAMETER, message)


def parse(body: bytes) -> tuple[EmbedRequest, str]:
    """The engine request, and the asked ``output_type``."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise _bad("The request body must be a JSON object.")
    model = data.get("model")
    if model is None or model == "":
        raise ApiError(ErrorCode.EMPTY_MODEL, "Model can not be empty: set 'model'.")
    if not isinstance(model, str):
        raise _bad(f"model must be a string, got {type(model).__name__}.")
    texts = _texts(data.get("input"))
    params = data.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _bad("parameters must be a JSON object.")
    for nested in ("parameters", "kwargs"):
        # TextEmbedding.call(..., kwargs={"text_type": "query"}), as LlamaIndex's
        # DashScopeEmbedding calls it, sends {"parameters": {"kwargs": {...}}}.
        if isinstance(params.get(nested), dict):
            params = {**params, **params[nested]}
    text_type = params.get("text_type")
    if text_type is not None and text_type not in TEXT_TYPES:
        raise _bad(f"parameters.text_type: must be 'query' or 'document', got {echo(text_type)}.")
    output_type = params.get("output_type") or "dense"
    if output_type != "dense" and output_type not in SPARSE:
        raise _bad(
            "parameters.output_type: must be 'dense', 'sparse' or 'dense&sparse', "
            f"got {echo(output_type)}."
        )
    items = [ContentItem(index=i, text=_text(i, t)) for i, t in enumerate(texts)]
    req = EmbedRequest(
        model=model,
        items=items,
        dimension=schemas._dimension(schemas._dimension_alias(data, params)),
        instruct=schemas._instruct(params.get("instruct")),
        text_type=text_type,
    )
    return req, output_type


def _texts(inp: Any) -> list[Any]:
    if inp is None:
        raise ApiError(ErrorCode.EMPTY_INPUT, "Input can not be empty: set input.texts.")
    texts = inp.get("texts") if isinstance(inp, dict) else inp
    if isinstance(texts, str):
        texts = [texts]
    if texts is None or texts == []:
        raise ApiError(ErrorCode.EMPTY_INPUT, "input.texts is empty: send at least one text.")
    if not isinstance(texts, list):
        raise _bad("input.texts must be a list of strings.")
    return texts


def _text(index: int, value: Any) -> str:
    where = f"input.texts[{index}]"
    if not isinstance(value, str):
        raise _bad(f"{where}: must be a string, got {type(value).__name__}.")
    if not value.strip():
        raise _bad(f"{where}: is empty.")
    return value


def render(result: EmbedResult, request_id: str) -> bytes:
    body = {
        "output": {
            "embeddings": [
                {"text_index": i, "embedding": vec} for i, vec in enumerate(result.vectors)
            ]
        },
        "usage": {"total_tokens": result.usage.total_tokens},
        "request_id": request_id,
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


async def embed(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    ctx = door.begin(request, route="text-embedding")
    try:
        check_ready(request)
        try:
            req, output_type = parse(await read_body(request, settings.max_body_bytes))
            if output_type in SPARSE:
                door.resolve(request, ctx, req.model)
                raise _bad(
                    f"parameters.output_type: {output_type!r} needs a backend with a sparse "
                    f"head; {ctx.model} is served by a dense model here: use 'dense'."
                )
            result = await run_embedding(request, ctx, req)
        except ApiError as exc:  # this route's items are input.texts[i]
            message = exc.message.replace("input.contents[", "input.texts[")
            raise ApiError(exc.error, message, headers=exc.headers) from None
    except BaseException as exc:
        await door.fail(request, ctx, exc)
        raise
    await door.commit(request, ctx)
    return Response(render(result, ctx.request_id), media_type="application/json")
