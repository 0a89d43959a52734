"""The hosted API as public integrations call it today: enable_fusion, max_video_frames,
qwen2.5-vl-embedding, dated snapshot names, the SDKs' ``factor`` key, dimension spellings, and
HTTPS (Dify's plugin always calls its host over https)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
import time
from http import HTTPStatus
from pathlib import Path

import dashscope
import httpx
import numpy as np
import pytest

from tests.e2e.conftest import API_KEY, EMBED_PATH, free_port
from tests.media_util import image_bytes, video_bytes

pytestmark = [pytest.mark.slow, pytest.mark.network]

PLUS = "tongyi-embedding-vision-plus"
QWEN3 = "qwen3-vl-embedding"


@pytest.fixture(scope="module")
def media(origin):
    from skimage import data

    return {
        "coffee": origin.serve("/hc-coffee.png", image_bytes(data.coffee(), "PNG"), "image/png"),
        "cat": origin.serve("/hc-cat.jpg", image_bytes(data.chelsea(), "JPEG"), "image/jpeg"),
        "video": origin.serve("/hc-clip.mp4", video_bytes(seconds=3.0), "video/mp4"),
    }


def vectors(r: httpx.Response) -> tuple[np.ndarray, list[str]]:
    assert r.status_code == 200, r.text
    embs = r.json()["output"]["embeddings"]
    return np.array([e["embedding"] for e in embs]), [e["type"] for e in embs]


@pytest.fixture
def sdk(server, monkeypatch):
    monkeypatch.setattr(dashscope, "base_http_api_url", server.api_base)
    monkeypatch.setattr(dashscope, "api_key", API_KEY)


def test_enable_fusion_gives_one_fused_vector(server, media, sdk):
    contents = [{"text": "a cup of coffee"}, {"image": media["coffee"]}]
    resp = dashscope.MultiModalEmbedding.call(model=QWEN3, input=contents, enable_fusion=True)
    assert resp.status_code == HTTPStatus.OK, (resp.code, resp.message)
    (emb,) = resp.output["embeddings"]
    assert emb["type"] == "vl" and emb["index"] == 0 and len(emb["embedding"]) == 2560
    fused_object, kinds = vectors(
        server.post({"model": QWEN3, "input": {"contents": [{**contents[0], **contents[1]}]}})
    )
    assert kinds == ["vl"]
    assert float(np.array(emb["embedding"]) @ fused_object[0]) >= 0.9999
    # without the flag: independent vectors, as before
    _, kinds = vectors(server.post({"model": QWEN3, "input": {"contents": contents}}))
    assert kinds == ["text", "image"]


def test_enable_fusion_refusals(server, media):
    r = server.post(
        {
            "model": PLUS,
            "input": {"contents": ["a", {"image": media["cat"]}]},
            "parameters": {"enable_fusion": True},
        }
    )
    assert r.status_code == 400 and "enable_fusion" in r.json()["message"]
    r = server.post(
        {
            "model": QWEN3,
            "input": {"contents": [{"image": media["cat"]}, {"image": media["coffee"]}]},
            "parameters": {"enable_fusion": True},
        }
    )
    assert r.status_code == 400
    assert "input.contents[0], input.contents[1]" in r.json()["message"]
    r = server.post(
        {"model": QWEN3, "input": {"contents": ["a"]}, "parameters": {"enable_fusion": "yes"}}
    )
    assert r.status_code == 400 and "parameters.enable_fusion" in r.json()["message"]


def test_max_video_frames_is_honoured_within_the_cap(media, sdk):
    full = dashscope.MultiModalEmbedding.call(model=PLUS, input=[{"video": media["video"]}])
    assert full.usage["image_tokens"] == 3 * 64  # 3 s at 1 frame/s
    fewer = dashscope.MultiModalEmbedding.call(
        model=PLUS, input=[{"video": media["video"]}], max_video_frames=2
    )
    assert fewer.status_code == HTTPStatus.OK
    assert fewer.usage["image_tokens"] == 2 * 64
    a = np.array(full.output["embeddings"][0]["embedding"])
    b = np.array(fewer.output["embeddings"][0]["embedding"])
    assert float(a @ b) < 0.999999  # a different sampling, not a cached answer
    more = dashscope.MultiModalEmbedding.call(
        model=PLUS, input=[{"video": media["video"]}], max_video_frames=1000
    )
    assert more.usage["image_tokens"] == 3 * 64  # fps still decides; the name's cap bounds it


def test_qwen25_vl_embedding_fuses_the_whole_request(server, media):
    contents = [{"text": "a cup of coffee"}, {"image": media["coffee"]}]
    got, kinds = vectors(
        server.post({"model": "qwen2.5-vl-embedding", "input": {"contents": contents}})
    )
    assert kinds == ["vl"] and got.shape == (1, 1024)
    ref, _ = vectors(
        server.post(
            {
                "model": QWEN3,
                "input": {"contents": [{**contents[0], **contents[1]}]},
                "parameters": {"dimension": 1024},
            }
        )
    )
    assert float(got[0] @ ref[0]) >= 0.9999


def test_dated_snapshot_names_are_aliases(server):
    ref, _ = vectors(server.post({"model": PLUS, "input": {"contents": ["snapshot"]}}))
    got, _ = vectors(
        server.post({"model": PLUS + "-2026-03-06", "input": {"contents": ["snapshot"]}})
    )
    assert float(got[0] @ ref[0]) >= 0.9999
    r = server.post({"model": "no-such-model-2026-03-06", "input": {"contents": ["x"]}})
    assert r.status_code == 400


def test_unknown_model_lists_served_names(server):
    r = server.post({"model": "no-such-embedding-v9", "input": {"contents": ["x"]}})
    assert r.status_code == 400
    message = r.json()["message"]
    assert "no-such-embedding-v9" in message
    for name in (PLUS, QWEN3, "multimodal-embedding-v1", "qwen2.5-vl-embedding"):
        assert name in message


def test_factor_key_is_accepted(server, media):
    # the SDKs' MultiModalEmbeddingItem* classes send a "factor" beside each item
    body = {
        "model": PLUS,
        "input": {
            "contents": [{"text": "a cat", "factor": 1}, {"image": media["cat"], "factor": 1}]
        },
    }
    got, kinds = vectors(server.post(body))
    assert kinds == ["text", "image"]
    plain, _ = vectors(
        server.post({"model": PLUS, "input": {"contents": ["a cat", {"image": media["cat"]}]}})
    )
    assert np.allclose(got, plain, atol=1e-6)


@pytest.mark.parametrize(
    "body",
    [
        {"parameters": {"dimensions": 256}},
        {"dimension": 256},
        {"dimensions": 256, "parameters": {}},
        {"parameters": {"dimension": 256, "dimensions": 256}},
    ],
)
def test_dimension_spellings(server, body):
    got, _ = vectors(server.post({"model": PLUS, "input": {"contents": ["dims"]}, **body}))
    assert got.shape == (1, 256)


def test_conflicting_dimensions_are_refused(server):
    r = server.post(
        {
            "model": PLUS,
            "input": {"contents": ["x"]},
            "dimension": 64,
            "parameters": {"dimension": 256},
        }
    )
    assert r.status_code == 400
    assert "conflicting" in r.json()["message"]


# -- HTTPS ---------------------------------------------------------------------------------------
def self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https(tmp_path):
    import openai

    cert, key = self_signed(tmp_path)
    port = free_port()
    env = {
        **os.environ,
        "MMEMBED_PORT": str(port),
        "MMEMBED_API_KEYS": API_KEY,
        "MMEMBED_CACHE_DIR": str(tmp_path / "cache"),
        "MMEMBED_SSL_CERTFILE": str(cert),
        "MMEMBED_SSL_KEYFILE": str(key),
    }
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmembed.cli", "serve"], env=env, stdout=out, stderr=out
        )
    base = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(base + "/health", verify=trust, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        r = httpx.post(
            base + EMBED_PATH,
            json={"model": PLUS, "input": {"contents": ["over tls"]}},
            headers={"Authorization": f"Bearer {API_KEY}"},
            verify=trust,
            timeout=60,
        )
        assert (
            r.status_code == 200 and len(r.json()["output"]["embeddings"][0]["embedding"]) == 1152
        )
        client = openai.OpenAI(
            base_url=base + "/compatible-mode/v1",
            api_key=API_KEY,
            http_client=httpx.Client(verify=trust),
        )
        assert len(client.embeddings.create(model=PLUS, input="tls").data[0].embedding) == 1152
        with pytest.raises(httpx.ConnectError):  # an untrusted certificate is refused
            httpx.get(base + "/health", timeout=5)
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served on a TLS port
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).raise_for_status()
    finally:
        proc.terminate()
        proc.wait(15)
    assert "Traceback" not in log.read_text()
