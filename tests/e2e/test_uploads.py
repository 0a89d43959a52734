"""Local files through the real dashscope SDK's upload flow, against a real server process:
getPolicy, the multipart POST to the upload host the policy names, then ``oss://`` references
resolved with ``X-DashScope-OssResourceResolve: enable`` for the uploading key only."""

from __future__ import annotations

import base64
from http import HTTPStatus
from pathlib import Path

import dashscope
import httpx
import numpy as np
import pytest
from dashscope.common.error import UploadFileException
from dashscope.utils.oss_utils import OssUtils

from tests.e2e.conftest import API_KEY, EMBED_PATH, V1_ONLY_KEY
from tests.e2e.test_errors import expect, req
from tests.media_util import make_image, make_video

pytestmark = [pytest.mark.slow, pytest.mark.network]

QWEN, PLUS, V1 = "qwen3-vl-embedding", "tongyi-embedding-vision-plus", "multimodal-embedding-v1"
RESOLVE = {"X-DashScope-OssResourceResolve": "enable"}


@pytest.fixture(autouse=True)
def point_sdk_at_server(server, monkeypatch):
    monkeypatch.setattr(dashscope, "base_http_api_url", server.api_base)
    monkeypatch.setattr(dashscope, "api_key", API_KEY)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("local")
    out = {
        "png": tmp / "picture.png",
        "mp4": tmp / "clip one.mp4",  # a space in the name, as users' files have
        "txt": tmp / "note.txt",
    }
    out["png"].write_bytes(make_image("PNG", (96, 64)))
    out["mp4"].write_bytes(make_video("MP4", seconds=2.0))
    out["txt"].write_text("a photo of a golden retriever", encoding="utf-8")
    return out


def call(model: str, contents: list, **kw):
    resp = dashscope.MultiModalEmbedding.call(model=model, input=contents, **kw)
    assert resp.status_code == HTTPStatus.OK, (resp.code, resp.message)
    return resp


def vectors(resp) -> np.ndarray:
    return np.array([e["embedding"] for e in resp.output["embeddings"]], dtype=np.float64)


def data_uri(data: bytes, kind: str) -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def upload(path: Path, model: str = QWEN, key: str = API_KEY) -> str:
    """The SDK's upload step alone; returns the oss:// reference."""
    ref, _ = OssUtils.upload(model, str(path), api_key=key)
    return ref


def post_resolving(server, body: dict, key: str = API_KEY) -> httpx.Response:
    """An embedding request as the SDK sends it after uploading."""
    headers = {"Authorization": f"Bearer {key}", **RESOLVE}
    return httpx.post(server.url + EMBED_PATH, json=body, headers=headers, timeout=60)


# -- the acceptance: local PNG and local MP4 through the SDK -------------------------------------
def test_sdk_embeds_a_local_png(server, files):
    resp = call(QWEN, [{"image": files["png"].as_uri()}])
    (emb,) = resp.output["embeddings"]
    assert emb["type"] == "image" and len(emb["embedding"]) == 2560
    assert resp.usage["image_count"] == 1
    # the same bytes sent inline give the same vector
    inline = server.post(req(QWEN, [{"image": data_uri(files["png"].read_bytes(), "image/png")}]))
    assert inline.status_code == 200
    assert np.allclose(vectors(resp), [inline.json()["output"]["embeddings"][0]["embedding"]])


def test_sdk_embeds_a_local_mp4_by_plain_path(server, files):
    resp = call(PLUS, [{"video": str(files["mp4"])}, {"text": "a striped test pattern"}], fps=1.0)
    assert [e["type"] for e in resp.output["embeddings"]] == ["video", "text"]
    assert resp.usage["duration"] == 2 and resp.usage["image_tokens"] == 2 * 64


def test_sdk_uploads_local_text_files_and_their_content_is_embedded(files):
    from_file = call(PLUS, [{"text": str(files["txt"])}])
    direct = call(PLUS, [{"text": files["txt"].read_text()}])
    assert np.allclose(vectors(from_file), vectors(direct))
    assert from_file.usage["input_tokens"] == direct.usage["input_tokens"]


def test_policy_answers_like_dashscope(server):
    r = httpx.get(
        server.api_base + "/uploads",
        params={"action": "getPolicy", "model": PLUS},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert r.status_code == 200
    data = r.json()["data"]
    assert data["upload_host"] == server.url + "/api/v1/uploads/oss"
    assert data["upload_dir"].startswith("mmembed/")
    assert data["max_file_size_mb"] == 10  # plus: the 10 MB video limit
    assert {"policy", "signature", "oss_access_key_id", "x_oss_forbid_overwrite"} <= set(data)
    assert API_KEY not in r.text


# -- who may use an upload -----------------------------------------------------------------------
def test_oss_reference_needs_the_resolve_header(server, files):
    ref = upload(files["png"])
    expect(
        server.post(req(QWEN, [{"image": ref}])),
        400,
        "InvalidURL",
        "input.contents[0].image",
        "X-DashScope-OssResourceResolve",
    )
    ok = post_resolving(server, req(QWEN, [{"image": ref}]))
    assert ok.status_code == 200, ok.json()
    # the same reference as text, without the header, is just a string to embed
    assert server.post(req(QWEN, [ref])).status_code == 200


def test_oss_reference_is_private_to_the_uploading_key(server, files):
    ref = upload(files["png"], model=V1)
    expect(
        post_resolving(server, req(V1, [{"image": ref}]), key=V1_ONLY_KEY),
        403,
        "AccessDenied",
        "different API key",
    )
    assert post_resolving(server, req(V1, [{"image": ref}])).status_code == 200


def test_unknown_and_forged_references(server, files):
    ref = upload(files["png"])
    missing = ref.rsplit("/", 1)[0] + "/never-uploaded.png"
    expect(
        post_resolving(server, req(QWEN, [{"image": missing}])),
        400,
        "InvalidURL",
        "does not exist",
    )
    expect(
        post_resolving(server, req(QWEN, [{"image": "oss://mmembed/0123/abc/x.png"}])),
        403,
        "AccessDenied",
    )
    expect(
        post_resolving(server, req(QWEN, [{"image": "oss://some-bucket/x.png"}])),
        400,
        "InvalidURL",
        "not a file uploaded to this server",
    )


def test_policy_needs_a_valid_key_and_allowed_model(server):
    url = server.api_base + "/uploads"
    r = httpx.get(url, params={"action": "getPolicy", "model": QWEN})
    expect(r, 401, "InvalidApiKey")
    r = httpx.get(
        url,
        params={"action": "getPolicy", "model": QWEN},
        headers={"Authorization": f"Bearer {V1_ONLY_KEY}"},
    )
    expect(r, 403, "AccessDenied", QWEN)


def test_upload_with_a_forged_policy_is_refused(server):
    form = {
        "policy": base64.b64encode(b'{"owner": "x"}').decode(),
        "Signature": "bm90IGEgc2lnbmF0dXJl",
        "key": "mmembed/x/y/evil.png",
    }
    r = httpx.post(
        server.url + "/api/v1/uploads/oss", data=form, files={"file": ("evil.png", b"\x89PNG")}
    )
    expect(r, 403, "AccessDenied", "signature")


def test_a_file_over_the_policy_limit_fails_cleanly_in_the_sdk(tmp_path):
    big = tmp_path / "big.mp4"
    big.write_bytes(b"\x00" * (10 * 1024 * 1024 + 1))  # plus: 10 MB
    with pytest.raises(UploadFileException, match=r"BadRequest\.TooLarge"):
        dashscope.MultiModalEmbedding.call(model=PLUS, input=[{"video": str(big)}])


def test_health_reports_cache_counters(server, files):
    before = httpx.get(server.url + "/health").json()["cache"]
    call(QWEN, [{"image": files["png"].as_uri()}])  # uploaded again: same bytes, a cache hit
    after = httpx.get(server.url + "/health").json()["cache"]
    assert after["hits"] > before["hits"] and after["entries"] >= 1
