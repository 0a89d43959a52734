"""Text -> image retrieval through the server on real photos that ship with scikit-image, with
English and Chinese captions. Prints recall@1, recall@3 and MRR against chance."""

from __future__ import annotations

import numpy as np
import pytest

from tests.media_util import image_bytes

pytestmark = [pytest.mark.slow, pytest.mark.network]

# scikit-image sample name -> (English caption, Chinese caption)
CAPTIONS = {
    "chelsea": ("a photo of a cat", "一只猫的照片"),
    "coffee": ("a cup of coffee", "一杯咖啡"),
    "rocket": ("a rocket on the launch pad", "发射台上的火箭"),
    "stereo_motorcycle": ("a motorcycle", "一辆摩托车"),
    "coins": ("old coins", "古老的硬币"),
    "clock": ("a wall clock", "挂钟"),
    "camera": ("a camera on a tripod", "三脚架上的相机"),
    "astronaut": ("an astronaut in a space suit", "穿着宇航服的宇航员"),
    "moon": ("the surface of the moon", "月球表面"),
    "brick": ("a brick wall", "砖墙"),
    "grass": ("a patch of grass", "一片草地"),
    "gravel": ("gravel and small stones", "碎石和小石子"),
    "hubble_deep_field": ("galaxies in deep space", "深空中的星系"),
    "page": ("a page of printed text", "印刷的文字页面"),
}
MODEL = "tongyi-embedding-vision-plus"


def _photo(name: str) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    return img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disp)


def _ranks(text_vecs: np.ndarray, image_vecs: np.ndarray) -> np.ndarray:
    scores = text_vecs @ image_vecs.T
    order = np.argsort(-scores, axis=1)
    return np.array([int(np.where(order[i] == i)[0][0]) + 1 for i in range(len(order))])


def test_text_to_image_retrieval(server, origin):
    names = list(CAPTIONS)
    urls = [origin.serve(f"/photo/{n}.png", image_bytes(_photo(n)), "image/png") for n in names]
    resp = server.post(
        {"model": MODEL, "input": {"contents": [{"image": u} for u in urls]}}, timeout=120
    )
    assert resp.status_code == 200, resp.text
    images = np.array([e["embedding"] for e in resp.json()["output"]["embeddings"]])

    n = len(names)
    chance = f"chance: R@1 {1 / n:.2f}, MRR {_chance_mrr(n):.2f}"
    lines = [f"text->image retrieval over {n} photos ({chance})"]
    results = {}
    for lang, col in (("en", 0), ("zh", 1)):
        texts = [CAPTIONS[name][col] for name in names]
        r = server.post({"model": MODEL, "input": {"contents": texts}})
        assert r.status_code == 200, r.text
        text_vecs = np.array([e["embedding"] for e in r.json()["output"]["embeddings"]])
        ranks = _ranks(text_vecs, images)
        results[lang] = ranks
        lines.append(
            f"  {lang}: R@1 {np.mean(ranks == 1):.2f}  R@3 {np.mean(ranks <= 3):.2f}  "
            f"MRR {np.mean(1 / ranks):.2f}  misses: "
            + ", ".join(f"{names[i]}(rank {ranks[i]})" for i in np.where(ranks > 1)[0])
        )
    print("\n".join(lines))

    for lang, ranks in results.items():
        assert np.mean(ranks == 1) >= 0.4, f"{lang}: recall@1 too close to chance"
        assert np.mean(1 / ranks) >= 0.5, f"{lang}: MRR too close to chance"


def _chance_mrr(n: int) -> float:
    return float(np.mean(1 / np.arange(1, n + 1)))
