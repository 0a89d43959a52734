"""The integrations documented in docs/integrations.md, run for real: LangChain's
OpenAIEmbeddings pointed at mmembed, and the Qdrant text -> image search example."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import API_KEY
from tests.media_util import image_bytes

pytestmark = [pytest.mark.slow, pytest.mark.network]
ROOT = Path(__file__).resolve().parents[2]
PLUS = "tongyi-embedding-vision-plus"


def dashscope_vectors(server, contents: list, **params) -> np.ndarray:
    r = server.post({"model": PLUS, "input": {"contents": contents}, "parameters": params})
    assert r.status_code == 200, r.text
    return np.array([e["embedding"] for e in r.json()["output"]["embeddings"]])


def test_langchain_openai_embeddings(server):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model=PLUS,
        base_url=server.url + "/compatible-mode/v1",
        api_key=API_KEY,
        dimensions=512,
        check_embedding_ctx_length=False,  # send texts as they are (no tiktoken)
    )
    docs = ["a violin on a table", "一杯咖啡", "a rocket launch at night"]
    got = np.array(embeddings.embed_documents(docs))
    assert got.shape == (3, 512)
    ref = dashscope_vectors(server, docs, dimension=512)
    assert np.all(np.sum(got * ref, axis=1) >= 0.9999)
    query = np.array(embeddings.embed_query("coffee"))
    assert int(np.argmax(got @ query)) == 1


def test_qdrant_text_to_image_search_example(server, tmp_path):
    from skimage import data

    paths = []
    for name, pixels, fmt in (
        ("coffee.png", data.coffee(), "PNG"),
        ("cat.jpg", data.chelsea(), "JPEG"),
        ("rocket.jpg", data.rocket(), "JPEG"),
    ):
        path = tmp_path / name
        path.write_bytes(image_bytes(pixels, fmt))
        paths.append(str(path))
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "text_to_image_search.py"),
            "a photo of a cat",
            *paths,
        ],
        env={**os.environ, "MMEMBED_URL": server.url, "MMEMBED_KEY": API_KEY},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3, out.stdout
    assert lines[0].startswith("1. ") and lines[0].endswith("cat.jpg"), out.stdout


def _docs_block(needle: str) -> str:
    from tests.readme import blocks

    found = [b.code for b in blocks(ROOT / "docs" / "integrations.md") if needle in b.code]
    assert len(found) == 1, needle
    return found[0]


def _llama_index(module: str):
    """The LlamaIndex packages come with the test extra; an environment without them (a
    shared one) skips, CI fails."""
    if os.environ.get("CI", "").lower() == "true":
        return __import__(module)
    return pytest.importorskip(module)


def test_llamaindex_blocks_of_the_docs_run_as_written(server, tmp_path, monkeypatch):
    """docs/integrations.md's two LlamaIndex blocks: text through OpenAIEmbedding(model_name=),
    images through OpenAILikeEmbedding with extra_body={"modality": "image"}."""
    from skimage import data

    _llama_index("llama_index.embeddings.openai")
    _llama_index("llama_index.embeddings.openai_like")
    (tmp_path / "cat.jpg").write_bytes(image_bytes(data.chelsea(), "JPEG"))
    (tmp_path / "coffee.png").write_bytes(image_bytes(data.coffee(), "PNG"))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for needle in ("OpenAIEmbedding(model_name=", "OpenAILikeEmbedding(model_name="):
        code = _docs_block(needle)
        code = code.replace("http://127.0.0.1:8000", server.url).replace("your-key", API_KEY)
        exec(compile(code, f"docs/integrations.md ({needle})", "exec"), scope)

    docs = ["a violin on a table", "一杯咖啡"]
    got = np.array(scope["doc_vectors"])
    assert got.shape == (2, 512)
    assert np.all(np.sum(got * dashscope_vectors(server, docs, dimension=512), axis=1) >= 0.9999)
    assert int(np.argmax(got @ np.array(scope["query_vector"]))) == 1

    images = np.array(scope["image_vectors"])
    ref = dashscope_vectors(
        server,
        [{"image": scope["data_uri"](name, mime)} for name, mime in
         (("cat.jpg", "image/jpeg"), ("coffee.png", "image/png"))],
        dimension=512,
    )  # fmt: skip
    assert np.all(np.sum(images * ref, axis=1) >= 0.9999)
    cat_query = np.array(scope["embed_model"].get_query_embedding("a photo of a cat"))
    assert int(np.argmax(images @ cat_query)) == 0
