import orjson
import pytest

from mmembed.api.schemas import parse_request
from mmembed.errors import ApiError, ErrorCode


def parse(body) -> object:
    return parse_request(orjson.dumps(body))


def error_of(body) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_request(body if isinstance(body, bytes) else orjson.dumps(body))
    return info.value


def test_every_content_form():
    req = parse(
        {
            "model": "m",
            "input": {
                "contents": [
                    "bare",
                    {"text": "t"},
                    {"image": "http://x/a.png"},
                    {"video": "http://x/v.mp4"},
                    {"multi_images": ["http://x/1.png", "data:image/png;base64,AAAA"]},
                    {"text": "t", "image": "http://x/a.png", "video": "http://x/v.mp4"},
                ]
            },
            "parameters": {"dimension": 512, "fps": 0.5, "instruct": "Find it", "extra": 1},
        }
    )
    assert [i.kind for i in req.items] == ["text", "text", "image", "video", "multi_images", "vl"]
    assert [i.index for i in req.items] == list(range(6))
    assert req.items[0].text == "bare"
    assert (req.dimension, req.fps, req.instruct) == (512, 0.5, "Find it")


def test_sdk_nested_parameters_are_flattened():
    body = {
        "model": "m",
        "input": {"contents": ["x"]},
        "parameters": {"parameters": {"dimension": 64}},
    }
    assert parse(body).dimension == 64


def test_parameters_optional_and_unknown_ignored():
    req = parse({"model": "m", "input": {"contents": ["x"]}, "extra_top": True})
    assert (req.dimension, req.fps, req.instruct) == (None, None, None)
    req = parse({"model": "m", "input": {"contents": ["x"]}, "parameters": {"dimension": 256.0}})
    assert req.dimension == 256


@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        (b"{not json", ErrorCode.INVALID_PARAMETER, "not valid JSON"),
        ([1, 2], ErrorCode.INVALID_PARAMETER, "JSON object"),
        ({"input": {"contents": ["x"]}}, ErrorCode.EMPTY_MODEL, "Model"),
        ({"model": "", "input": {"contents": ["x"]}}, ErrorCode.EMPTY_MODEL, "Model"),
        ({"model": 3, "input": {"contents": ["x"]}}, ErrorCode.INVALID_PARAMETER, "model"),
        ({"model": "m"}, ErrorCode.EMPTY_INPUT, "Input"),
        ({"model": "m", "input": {"contents": []}}, ErrorCode.EMPTY_INPUT, "contents"),
        ({"model": "m", "input": {"contents": "x"}}, ErrorCode.INVALID_PARAMETER, "list"),
        ({"model": "m", "input": {"contents": [5]}}, ErrorCode.INVALID_PARAMETER, "contents[0]"),
        (
            {"model": "m", "input": {"contents": ["a", {}]}},
            ErrorCode.INVALID_PARAMETER,
            "[1]: has none",
        ),
        (
            {"model": "m", "input": {"contents": [{"text": ""}]}},
            ErrorCode.INVALID_PARAMETER,
            "[0].text: is empty",
        ),
        (
            {"model": "m", "input": {"contents": [{"image": 7}]}},
            ErrorCode.INVALID_PARAMETER,
            "[0].image: must be a string",
        ),
        (
            {"model": "m", "input": {"contents": [{"multi_images": []}]}},
            ErrorCode.INVALID_PARAMETER,
            "multi_images",
        ),
        (
            {"model": "m", "input": {"contents": [{"multi_images": ["a"], "text": "b"}]}},
            ErrorCode.INVALID_PARAMETER,
            "cannot be combined",
        ),
        (
            {"model": "m", "input": {"contents": ["x"]}, "parameters": []},
            ErrorCode.INVALID_PARAMETER,
            "parameters",
        ),
        (
            {"model": "m", "input": {"contents": ["x"]}, "parameters": {"dimension": "512"}},
            ErrorCode.INVALID_PARAMETER,
            "dimension",
        ),
        (
            {"model": "m", "input": {"contents": ["x"]}, "parameters": {"dimension": True}},
            ErrorCode.INVALID_PARAMETER,
            "dimension",
        ),
        (
            {"model": "m", "input": {"contents": ["x"]}, "parameters": {"fps": 1.5}},
            ErrorCode.INVALID_PARAMETER,
            "fps",
        ),
        (
            {"model": "m", "input": {"contents": ["x"]}, "parameters": {"fps": -0.1}},
            ErrorCode.INVALID_PARAMETER,
            "fps",
        ),
        (
            {"model": "m", "input": {"contents": ["x"]}, "parameters": {"output_type": "sparse"}},
            ErrorCode.INVALID_PARAMETER,
            "dense",
        ),
        (
            {"model": "m", "input": {"contents": ["x"]}, "parameters": {"instruct": 3}},
            ErrorCode.INVALID_PARAMETER,
            "instruct",
        ),
    ],
)
def test_bad_requests(body, code, fragment):
    err = error_of(body)
    assert err.error is code
    assert fragment in err.message


def test_long_client_values_are_not_echoed_in_full():
    huge = "m" * (10 * 1024 * 1024)
    bodies = [  # (a huge model name is refused at the door: tests/e2e/test_integrity.py)
        {"model": "m", "input": {"contents": ["x"]}, "parameters": {"dimension": huge}},
        {"model": "m", "input": {"contents": ["x"]}, "parameters": {"fps": [huge] * 3}},
        {"model": "m", "input": {"contents": ["x"]}, "parameters": {"output_type": huge}},
    ]
    for body in bodies:
        with pytest.raises(ApiError) as info:
            parse_request(orjson.dumps(body))
        assert info.value.error is ErrorCode.INVALID_PARAMETER
        assert len(info.value.message) < 300, info.value.message[:300]
