"""Every limit and error row of the API, over real HTTP: exact status, code, and a message that
names the offending item. The server must stay healthy throughout."""

from __future__ import annotations

import base64
import time

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import EMBED_PATH, V1_ONLY_KEY, free_port
from tests.media_util import image_bytes, video_bytes

pytestmark = [pytest.mark.slow, pytest.mark.network]

PLUS, FLASH, QWEN, V1 = (
    "tongyi-embedding-vision-plus",
    "tongyi-embedding-vision-flash",
    "qwen3-vl-embedding",
    "multimodal-embedding-v1",
)


@pytest.fixture(scope="module")
def urls(origin):
    rng = np.random.default_rng(0)
    small = np.full((32, 32, 3), 120, dtype=np.uint8)
    noise = rng.integers(0, 256, (1100, 1100, 3), dtype=np.uint8)  # ~3.6 MB as PNG
    return {
        "png": origin.serve("/small.png", image_bytes(small, "PNG"), "image/png"),
        "webp": origin.serve("/small.webp", image_bytes(small, "WEBP"), "image/webp"),
        "big_png": origin.serve("/big.png", image_bytes(noise, "PNG"), "image/png"),
        "not_image": origin.serve("/fake.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 50, "image/png"),
        "mp4": origin.serve("/v.mp4", video_bytes(seconds=1.0, container="mp4"), "video/mp4"),
        "big_mp4": origin.serve("/big.mp4", rng.bytes(11 * 1024 * 1024), "video/mp4"),
        "missing": origin.url("/nothing-here.png"),
    }


def expect(resp: httpx.Response, status: int, code: str, *fragments: str) -> dict:
    body = resp.json()
    assert resp.status_code == status, body
    assert body["code"] == code, body
    for fragment in fragments:
        assert fragment in body["message"], body
    assert body["request_id"] and resp.headers["x-request-id"] == body["request_id"]
    return body


def req(model: str, contents: list, **params) -> dict:
    return {"model": model, "input": {"contents": contents}, "parameters": params}


# -- auth ----------------------------------------------------------------------------------------
def test_missing_and_wrong_key(server):
    expect(server.post(req(PLUS, ["x"]), key=None), 401, "InvalidApiKey")
    expect(server.post(req(PLUS, ["x"]), key="nope"), 401, "InvalidApiKey")


def test_key_limited_to_some_models(server):
    expect(server.post(req(PLUS, ["x"]), key=V1_ONLY_KEY), 403, "AccessDenied", PLUS)
    assert server.post(req(V1, ["x"]), key=V1_ONLY_KEY).status_code == 200


# -- request shape -------------------------------------------------------------------------------
def test_unknown_model(server):
    expect(server.post(req("no-such-model", ["x"])), 400, "InvalidParameter", "Model not exist")


def test_empty_model_and_input(server):
    expect(server.post({"input": {"contents": ["x"]}}), 400, "BadRequest.EmptyModel")
    expect(server.post({"model": PLUS}), 400, "BadRequest.EmptyInput")
    expect(server.post(req(PLUS, [])), 400, "BadRequest.EmptyInput")


def test_not_json(server):
    r = httpx.post(
        server.url + EMBED_PATH,
        content=b"{oops",
        headers={"Authorization": "Bearer test-key-1", "Content-Type": "application/json"},
    )
    expect(r, 400, "InvalidParameter", "not valid JSON")


def test_body_over_cap(server):
    body = req(PLUS, ["x" * (9 * 1024 * 1024)])
    expect(server.post(body), 413, "BadRequest.TooLarge", "request body")


def test_unknown_route_and_method(server):
    r = httpx.get(server.url + "/nope")
    assert r.status_code == 404 and r.json()["code"] == "NotFound"
    r = httpx.get(server.url + EMBED_PATH)
    assert r.status_code == 405 and r.json()["code"] == "MethodNotAllowed"


# -- parameters ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "dimension"), [(PLUS, 768), (FLASH, 1152), (QWEN, 64), (PLUS, 0), (FLASH, -64)]
)
def test_dimension_not_allowed(server, model, dimension):
    expect(
        server.post(req(model, ["x"], dimension=dimension)),
        400,
        "InvalidParameter",
        "parameters.dimension",
        str(dimension),
    )


def test_v1_takes_no_dimension(server):
    expect(server.post(req(V1, ["x"], dimension=512)), 400, "InvalidParameter", "does not support")
    ok = server.post(req(V1, ["x"], dimension=1024))
    assert ok.status_code == 200


def test_fps_and_output_type(server):
    expect(server.post(req(PLUS, ["x"], fps=2)), 400, "InvalidParameter", "fps")
    expect(server.post(req(PLUS, ["x"], output_type="sparse")), 400, "InvalidParameter", "dense")


# -- element rules per model ---------------------------------------------------------------------
def test_v1_element_limits(server, urls):
    expect(
        server.post(req(V1, [{"image": urls["png"]}, {"image": urls["png"]}])),
        400,
        "InvalidParameter",
        "2 images",
        "at most 1",
    )
    expect(
        server.post(req(V1, [{"video": urls["mp4"]}, {"video": urls["mp4"]}])),
        400,
        "InvalidParameter",
        "2 videos",
    )
    expect(server.post(req(V1, ["t"] * 21)), 400, "InvalidParameter", "21 elements", "at most 20")
    assert server.post(req(V1, ["t"] * 20)).status_code == 200


def test_qwen_element_limit(server):
    expect(server.post(req(QWEN, ["t"] * 21)), 400, "InvalidParameter", "at most 20")


def test_plus_has_no_count_limit(server):
    r = server.post(req(PLUS, [f"text {i}" for i in range(40)]))
    assert r.status_code == 200 and len(r.json()["output"]["embeddings"]) == 40


def test_multi_images_only_plus_and_flash(server, urls):
    for model in (QWEN, V1):
        expect(
            server.post(req(model, ["a", {"multi_images": [urls["png"]]}])),
            400,
            "InvalidParameter",
            "input.contents[1]",
            "multi_images",
        )
    expect(
        server.post(req(FLASH, [{"multi_images": [urls["png"]] * 9}])),
        400,
        "InvalidParameter",
        "9 images",
        "at most 8",
    )
    ok = server.post(req(FLASH, [{"multi_images": [urls["png"]] * 8}]))
    assert ok.status_code == 200 and ok.json()["usage"]["image_count"] == 8


def test_fused_only_qwen(server, urls):
    fused = {"text": "t", "image": urls["png"]}
    for model in (PLUS, FLASH, V1):
        expect(
            server.post(req(model, [fused])), 400, "InvalidParameter", "input.contents[0]", "fused"
        )
    r = server.post(req(QWEN, [fused]))
    assert r.status_code == 200 and r.json()["output"]["embeddings"][0]["type"] == "vl"


def test_text_token_limit(server):
    long_text = "word " * 600  # > 512 tokens (v1), < 1024 (plus)
    expect(
        server.post(req(V1, ["short", long_text])),
        400,
        "InvalidParameter",
        "input.contents[1].text",
        "512",
    )
    assert server.post(req(PLUS, [long_text])).status_code == 200


# -- media ---------------------------------------------------------------------------------------
def test_image_over_byte_limit(server, urls):
    expect(
        server.post(req(PLUS, ["ok", {"image": urls["big_png"]}])),
        413,
        "BadRequest.TooLarge",
        "input.contents[1].image",
    )
    # qwen3-vl-embedding allows 5 MB, so the same image passes there
    assert server.post(req(QWEN, [{"image": urls["big_png"]}])).status_code == 200


def test_video_over_byte_limit(server, urls):
    expect(
        server.post(req(PLUS, [{"video": urls["big_mp4"]}])),
        413,
        "BadRequest.TooLarge",
        "input.contents[0].video",
    )


def test_image_format_per_model(server, urls):
    expect(
        server.post(req(PLUS, [{"image": urls["webp"]}])),
        400,
        "InvalidParameter.DataInspection",
        "input.contents[0].image",
        "WEBP",
    )
    assert server.post(req(QWEN, [{"image": urls["webp"]}])).status_code == 200


def test_undecodable_image(server, urls):
    expect(
        server.post(req(PLUS, [{"image": urls["not_image"]}])),
        400,
        "InvalidParameter.DataInspection",
        "input.contents[0].image",
    )


def test_bad_data_uri(server):
    expect(
        server.post(req(PLUS, [{"image": "data:image/png;base64,@@not-base64@@"}])),
        400,
        "InvalidParameter",
        "input.contents[0].image",
    )
    png = image_bytes(np.zeros((8, 8, 3), np.uint8), "PNG")
    good = "data:image/png;base64," + base64.b64encode(png).decode()
    # non-ASCII in Base64 (was a 500): a 400 naming the item, in every place media can be
    for item, where in [
        ({"image": "data:image/png;base64,é"}, "input.contents[0].image"),
        ({"multi_images": [good, "data:image/png;base64,aé"]}, "input.contents[0].multi_images[1]"),
    ]:
        expect(server.post(req(PLUS, [item])), 400, "InvalidParameter", where, "'é'")
    assert server.post(req(PLUS, [{"image": good}])).status_code == 200


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/a.png",
        "file:///etc/passwd",
        "not a url",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.1/a.png",
    ],
)
def test_refused_urls(server, url):
    expect(server.post(req(PLUS, [{"image": url}])), 400, "InvalidURL", "input.contents[0].image")


def test_unreachable_and_missing(server, urls):
    closed = f"http://127.0.0.1:{free_port()}/a.png"
    expect(server.post(req(PLUS, [{"image": closed}])), 400, "InvalidURL")
    expect(server.post(req(PLUS, [{"image": urls["missing"]}])), 400, "InvalidURL", "404")


def test_stalled_origin_times_out(server, origin):
    # the test server's fetch timeouts: 1.5 s between bytes, 3 s per download
    started = time.monotonic()
    body = expect(
        server.post(req(PLUS, [{"image": origin.url("/stall")}])),
        408,
        "RequestTimeOut",
        "input.contents[0].image",
    )
    assert time.monotonic() - started < 3 + 1, body


def test_server_still_healthy(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert server.proc.poll() is None
