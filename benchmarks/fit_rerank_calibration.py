"""Fit the offline reranker's calibration: score = sigmoid(scale * (cosine - center)).

The offline default reranker (family ``cosine``, src/mmembed/models/cosine_rerank.py) maps the
offline embedding model's cosine to [0, 1] by a fixed increasing curve. This script is how its
two constants were fitted, once: on the bilingual dev set of real photos (tests/devset.py, 40
items), every pair of

- an English caption and a photo, a Chinese caption and a photo (text -> image search), and
- an English and a Chinese caption (text -> text),

is labelled relevant when both describe the same item (40 relevant, 1,560 not, per block);
a logistic regression of the label on the cosine, relevant and irrelevant pairs weighted
equally (so 0.5 sits where a pair is as likely relevant as not, whatever the mix of a result
list), gives ``scale`` and ``center``. It prints them and how well the curve separates the
pairs; the constants in cosine_rerank.py are its output, rounded.

    .venv/bin/python benchmarks/fit_rerank_calibration.py
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.devset import captions, photos


def fit_logistic(x: np.ndarray, y: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    """(scale, center) of the balanced logistic regression y ~ sigmoid(w1 * x + w0), by
    Newton's method."""
    weights = np.where(y == 1, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    design = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-design @ w))
        grad = design.T @ (weights * (p - y))
        hess = (design * (weights * p * (1 - p))[:, None]).T @ design
        w -= np.linalg.solve(hess + 1e-9 * np.eye(2), grad)
    return float(w[1]), float(-w[0] / w[1])


def main() -> None:
    from mmembed.models.catalog import load_catalog
    from mmembed.models.cosine_rerank import CENTER, SCALE, calibrate
    from mmembed.models.registry import create_backend

    entry = load_catalog("offline").backends["offline"]
    with tempfile.TemporaryDirectory() as tmp:
        backend = create_backend(entry.family, {**entry.options, "cache_dir": tmp})
        backend.load()
        images = backend.embed_images(photos())
        en = backend.embed_texts(captions("en"), None)
        zh = backend.embed_texts(captions("zh"), None)
    blocks = {"en -> image": en @ images.T, "zh -> image": zh @ images.T, "en -> zh": en @ zh.T}
    x = np.concatenate([b.ravel() for b in blocks.values()])
    y = np.concatenate([np.eye(len(en)).ravel() for _ in blocks])
    scale, center = fit_logistic(x, y)
    print(f"fitted: scale = {scale:.3f}, center = {center:.4f}")
    print(f"in use: scale = {SCALE}, center = {CENTER}")
    print()
    print(f"{'pairs':14s} {'relevant mean':>14s} {'irrelevant mean':>16s} {'AUC':>7s}")
    for name, block in blocks.items():
        pos = calibrate(np.diag(block))
        neg = calibrate(block[~np.eye(len(block), dtype=bool)])
        auc = float(np.mean(pos[:, None] > neg[None, :]))
        print(f"{name:14s} {pos.mean():14.3f} {neg.mean():16.3f} {auc:7.3f}")


if __name__ == "__main__":
    main()
