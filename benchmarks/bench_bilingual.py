"""Text -> image retrieval of the offline default model in English and Chinese, on the bilingual
dev set of real photos (tests/devset.py): recall@1, recall@5 and MRR per language, for several
class-prompt configurations of the ConSE backend in one run (the first is the baseline).

    .venv/bin/python benchmarks/bench_bilingual.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.devset import ITEMS, captions, metrics, photos, ranks

# name -> ConSE options (on top of the packaged offline entry)
EN_ENSEMBLE = ["a photo of a {}.", "a picture of a {}.", "a close-up photo of a {}.", "{}"]
ZH_ENSEMBLE = ["一张{}的照片。", "{}的图片", "一张{}的特写照片。", "{}"]
CONFIGS: dict[str, dict] = {
    "before: EN prompt only": {"prompts_en": ["a photo of a {}."], "languages": ["en"]},
    "EN ensemble only": {"prompts_en": EN_ENSEMBLE, "languages": ["en"]},
    "EN+ZH ensembles (4 templates each)": {"prompts_en": EN_ENSEMBLE, "prompts_zh": ZH_ENSEMBLE},
    "after: packaged default (EN+ZH, one each)": {},
}


def evaluate(options: dict, cache_dir: str) -> dict[str, dict[str, float]]:
    from mmembed.models.catalog import load_catalog
    from mmembed.models.registry import create_backend

    entry = load_catalog("offline").backends["offline"]
    backend = create_backend(entry.family, {**entry.options, **options, "cache_dir": cache_dir})
    backend.load()
    images = backend.embed_images(photos())
    out = {}
    for lang in ("en", "zh"):
        texts = backend.embed_texts(captions(lang), None)
        out[lang] = metrics(ranks(texts, images))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run only configurations whose name contains this")
    args = parser.parse_args()
    print(f"text -> image over {len(ITEMS)} photos (chance: R@1 {1 / len(ITEMS):.3f})")
    print(f"{'configuration':44s} {'lang':4s} {'R@1':>6s} {'R@5':>6s} {'MRR':>6s}")
    with tempfile.TemporaryDirectory() as cache_dir:
        for name, options in CONFIGS.items():
            if args.only and args.only not in name:
                continue
            result = evaluate(options, cache_dir)
            for lang, m in result.items():
                print(f"{name:44s} {lang:4s} {m['R@1']:6.3f} {m['R@5']:6.3f} {m['MRR']:6.3f}")
            gap = result["en"]["MRR"] - result["zh"]["MRR"]
            print(f"{'':44s} MRR gap EN - ZH: {gap:+.3f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
