"""``mmembed verify`` for the reranker families: on tiny models, every sample pair's served
score equals the family's reference (exit 0); a changed recipe is caught (exit 1)."""

from __future__ import annotations

import pytest

from mmembed.config import Settings
from mmembed.models import qwen3vl_reranker
from mmembed.models.catalog import parse_catalog
from mmembed.models.verify import run
from tests.tiny_models import build_cross_encoder, build_qwen3vl_reranker


def verify(tmp_path, backends: dict, backend: str = "r") -> tuple[int, list[str]]:
    catalog = parse_catalog(
        {
            "backends": backends,
            "models": {"m": {"backend": backend, "task": "rerank", "max_video_frames": 32}},
        }
    )
    lines: list[str] = []
    code = run(catalog, "m", Settings(cache_dir=str(tmp_path)), lines.append)
    print("\n".join(lines))
    return code, lines


def pairs(lines: list[str]) -> int:
    return sum(" score " in line for line in lines)


def test_qwen3vl_reranker_passes_and_a_missing_sigmoid_fails(tmp_path, monkeypatch):
    folder = build_qwen3vl_reranker(tmp_path / "w")
    backends = {"r": {"family": "qwen3vl-reranker", "weights": str(folder)}}
    code, lines = verify(tmp_path, backends)
    assert code == 0 and lines[-1].startswith("ok")
    assert pairs(lines) == 2 * (5 + 3 + 1)  # two queries x texts, images, the video
    monkeypatch.setattr(qwen3vl_reranker, "squash", lambda x: x)
    code, lines = verify(tmp_path, backends)
    assert code == 1 and lines[-1].startswith("FAILED")


def test_cross_encoder_passes_and_a_wrong_folder_fails(tmp_path):
    folder = build_cross_encoder(tmp_path / "ce")
    code, lines = verify(tmp_path, {"r": {"family": "cross-encoder", "weights": str(folder)}})
    assert code == 0 and pairs(lines) == 2 * 5
    # served with a shorter cut than the folder's: the long sample text scores differently
    code, _ = verify(
        tmp_path, {"r": {"family": "cross-encoder", "weights": str(folder), "max_length": 16}}
    )
    assert code == 1


@pytest.mark.slow
def test_offline_cosine_reranker_passes(tmp_path):
    from mmembed.models.catalog import load_catalog

    lines: list[str] = []
    code = run(
        load_catalog("offline"), "qwen3-vl-rerank", Settings(cache_dir=str(tmp_path)), lines.append
    )
    print("\n".join(lines))
    assert code == 0 and pairs(lines) == 2 * (5 + 3 + 1)
