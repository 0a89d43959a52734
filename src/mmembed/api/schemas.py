"""The DashScope wire shapes: request JSON -> engine request, engine result -> response JSON.

Parsed by hand rather than with pydantic so that every message names the offending item the
way DashScope clients expect ("input.contents[2].image: ..."), and unknown fields pass through.
"""

from __future__ import annotations

from typing import Any

import orjson

from mmembed.errors import ApiError, ErrorCode, echo
from mmembed.types import ContentItem, EmbedRequest, EmbedResult

MODALITY_KEYS = ("text", "image", "video")


def _bad(message: str) -> ApiError:
    return ApiError(ErrorCode.INVALID_PARAMETER, message)


def parse_request(body: bytes) -> EmbedRequest:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"The request body is not valid JSON: {exc}.") from None
    return request_from_data(data)


def request_from_data(data: Any) -> EmbedRequest:
    """The engine request for an already decoded body (also used by ``mmembed.Embedder``)."""
    if not isinstance(data, dict):
        raise _bad("The request body must be a JSON object.")

    model = data.get("model")
    if model is None or model == "":
        raise ApiError(ErrorCode.EMPTY_MODEL, "Model can not be empty: set 'model'.")
    if not isinstance(model, str):
        raise _bad(f"model must be a string, got {type(model).__name__}.")

    contents = _contents(data.get("input"))
    items = [_item(i, raw) for i, raw in enumerate(contents)]

    params = data.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _bad("parameters must be a JSON object.")
    nested = params.get("parameters")
    if isinstance(nested, dict):
        # dashscope.MultiModalEmbedding.call(..., parameters={"dimension": 1024}), as the
        # reference page writes it, sends {"parameters": {"parameters": {...}}}.
        params = {**params, **nested}
    _check_output_type(params.get("output_type"))
    return EmbedRequest(
        model=model,
        items=items,
        dimension=_dimension(_dimension_alias(data, params)),
        fps=_fps(params.get("fps")),
        instruct=_instruct(params.get("instruct")),
        fuse=_flag(params.get("enable_fusion"), "parameters.enable_fusion"),
        max_video_frames=_max_frames(params.get("max_video_frames")),
    )


def _dimension_alias(data: dict[str, Any], params: dict[str, Any]) -> Any:
    """``parameters.dimension``, also under OpenAI's spelling ``dimensions`` or at the top
    level, where clients put it by mistake: taken when unambiguous, never silently dropped."""
    given = {
        where: value
        for where, value in (
            ("parameters.dimension", params.get("dimension")),
            ("parameters.dimensions", params.get("dimensions")),
            ("dimension", data.get("dimension")),
            ("dimensions", data.get("dimensions")),
        )
        if value is not None
    }
    if len(set(map(repr, given.values()))) > 1:
        raise _bad(f"conflicting dimensions: {', '.join(f'{k}={v!r}' for k, v in given.items())}.")
    return next(iter(given.values()), None)


def _flag(value: Any, where: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _bad(f"{where}: must be true or false, got {value!r}.")


def _max_frames(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(f"parameters.max_video_frames: must be a positive integer, got {value!r}.")
    return value


def _contents(inp: Any) -> list[Any]:
    if inp is None:
        raise ApiError(ErrorCode.EMPTY_INPUT, "Input can not be empty: set input.contents.")
    contents = inp.get("contents") if isinstance(inp, dict) else inp
    if contents is None or contents == []:
        raise ApiError(ErrorCode.EMPTY_INPUT, "input.contents is empty: send at least one item.")
    if not isinstance(contents, list):
        raise _bad("input.contents must be a list.")
    return contents


def _item(index: int, raw: Any) -> ContentItem:
    where = f"input.contents[{index}]"
    if isinstance(raw, str):
        raw = {"text": raw}
    if not isinstance(raw, dict):
        raise _bad(
            f"{where}: must be a string or an object with text, image, video or multi_images."
        )
    item = ContentItem(index=index)
    for key in MODALITY_KEYS:
        if key in raw:
            setattr(item, key, _string(raw[key], f"{where}.{key}"))
    if "multi_images" in raw:
        if any(getattr(item, k) is not None for k in MODALITY_KEYS):
            raise _bad(f"{where}: multi_images cannot be combined with text, image or video.")
        images = raw["multi_images"]
        if not isinstance(images, list) or not images:
            raise _bad(f"{where}.multi_images: must be a non-empty list of images.")
        item.multi_images = [_string(v, f"{where}.multi_images[{j}]") for j, v in enumerate(images)]
    elif all(getattr(item, k) is None for k in MODALITY_KEYS):
        raise _bad(f"{where}: has none of text, image, video or multi_images.")
    return item


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(f"{where}: must be a string, got {type(value).__name__}.")
    if not value.strip():
        raise _bad(f"{where}: is empty.")
    return value


def _dimension(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"parameters.dimension: must be an integer, got {echo(value)}.")
    return value


def _fps(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"parameters.fps: must be a number in [0, 1], got {echo(value)}.")
    if not 0.0 <= value <= 1.0:
        raise _bad(f"parameters.fps: {value} is outside [0, 1].")
    return float(value)


def _instruct(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _bad("parameters.instruct: must be a string.")
    return value


def _check_output_type(value: Any) -> None:
    if value is not None and value != "dense":
        raise _bad(f"parameters.output_type: only 'dense' is supported, got {echo(value)}.")


def render_result(result: EmbedResult, request_id: str) -> bytes:
    embeddings = [
        {"index": i, "embedding": vec, "type": kind}
        for i, (vec, kind) in enumerate(zip(result.vectors, result.kinds, strict=True))
    ]
    body = {
        "output": {"embeddings": embeddings},
        "usage": result.usage.wire(),
        "request_id": request_id,
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def render_error(error: ApiError, request_id: str) -> bytes:
    return orjson.dumps(
        {"code": error.error.code, "message": error.message, "request_id": request_id}
    )
