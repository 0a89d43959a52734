"""docs/integrations.md's DashScope classes, unchanged, against mmembed's base URL: LangChain's
``DashScopeEmbeddings`` and ``DashScopeRerank`` (langchain-community), LlamaIndex's
``DashScopeEmbedding`` and ``DashScopeRerank``. Their answers equal the native routes'."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import API_KEY
from tests.e2e.test_rerank_api import server  # noqa: F401 (fixture)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.network,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
]
TEXT_EMBED = "/api/v1/services/embeddings/text-embedding/text-embedding"
RERANK = "/api/v1/services/rerank/text-rerank/text-rerank"
DOCS = ["a rocket launch at night", "一杯热咖啡", "espresso in a white cup", "a violin"]
QUERY = "a cup of coffee"


@pytest.fixture
def base_url(server, monkeypatch):  # noqa: F811
    import dashscope

    monkeypatch.setattr(dashscope, "base_http_api_url", server.api_base)
    monkeypatch.setenv("DASHSCOPE_API_KEY", API_KEY)
    return server


def native_vectors(srv, model: str, texts: list[str], text_type: str) -> np.ndarray:
    r = httpx.post(
        srv.url + TEXT_EMBED,
        json={"model": model, "input": {"texts": texts}, "parameters": {"text_type": text_type}},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return np.array([e["embedding"] for e in r.json()["output"]["embeddings"]])


def native_order(srv, model: str) -> list[tuple[int, float]]:
    r = httpx.post(
        srv.url + RERANK,
        json={"model": model, "input": {"query": QUERY, "documents": DOCS}},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return [(x["index"], x["relevance_score"]) for x in r.json()["output"]["results"]]


def test_langchain_dashscope_embeddings(base_url):
    pytest.importorskip("langchain_community")
    from langchain_community.embeddings import DashScopeEmbeddings

    emb = DashScopeEmbeddings(dashscope_api_key=API_KEY)  # model text-embedding-v1, as shipped
    docs = np.array(emb.embed_documents(DOCS))
    query = np.array(emb.embed_query(QUERY))
    assert docs.shape == (4, 1536)
    np.testing.assert_allclose(
        docs, native_vectors(base_url, "text-embedding-v1", DOCS, "document"), atol=1e-6
    )
    np.testing.assert_allclose(
        query, native_vectors(base_url, "text-embedding-v1", [QUERY], "query")[0], atol=1e-6
    )
    assert int(np.argmax(docs @ query)) in (1, 2)


def test_langchain_dashscope_rerank(base_url):
    pytest.importorskip("langchain_community")
    from langchain_community.document_compressors.dashscope_rerank import DashScopeRerank
    from langchain_core.documents import Document

    reranker = DashScopeRerank(dashscope_api_key=API_KEY, top_n=2)  # sends "gte-rerank"
    kept = reranker.compress_documents([Document(d) for d in DOCS], QUERY)
    want = native_order(base_url, "gte-rerank-v2")[:2]
    assert [d.page_content for d in kept] == [DOCS[i] for i, _ in want]
    for doc, (_, score) in zip(kept, want, strict=True):
        assert doc.metadata["relevance_score"] == pytest.approx(score, abs=1e-6)


def test_llamaindex_dashscope_embedding(base_url):
    pytest.importorskip("llama_index.embeddings.dashscope")
    from llama_index.embeddings.dashscope import DashScopeEmbedding

    emb = DashScopeEmbedding(api_key=API_KEY)  # model text-embedding-v2, as shipped
    doc = np.array(emb.get_text_embedding(DOCS[1]))
    query = np.array(emb.get_query_embedding(QUERY))
    np.testing.assert_allclose(
        doc, native_vectors(base_url, "text-embedding-v2", [DOCS[1]], "document")[0], atol=1e-6
    )
    np.testing.assert_allclose(
        query, native_vectors(base_url, "text-embedding-v2", [QUERY], "query")[0], atol=1e-6
    )
    batch = np.array(emb.get_text_embedding_batch(DOCS))
    assert batch.shape == (4, 1536)


def test_llamaindex_dashscope_rerank(base_url):
    pytest.importorskip("llama_index.postprocessor.dashscope_rerank")
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.postprocessor.dashscope_rerank import DashScopeRerank

    reranker = DashScopeRerank(top_n=2, api_key=API_KEY)  # sends "gte-rerank"
    nodes = [NodeWithScore(node=TextNode(text=d), score=0.0) for d in DOCS]
    kept = reranker.postprocess_nodes(nodes, query_str=QUERY)
    want = native_order(base_url, "gte-rerank-v2")[:2]
    assert [n.node.get_content() for n in kept] == [DOCS[i] for i, _ in want]
    assert [n.score for n in kept] == pytest.approx([s for _, s in want], abs=1e-6)
