"""A bilingual text -> image dev set from real photos that ship inside installed packages
(scikit-image's sample data, scikit-learn's sample images), no download: 40 items, whole
photos and crops of them that show something else (a face, a flag, a tripod, boats on a lake),
people and scenes included, each with an English and a Chinese caption written for this
project. Used by ``tests/e2e/test_retrieval.py`` and ``benchmarks/bench_bilingual.py``."""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image

# (name, source, crop box (left, top, right, bottom) or None, English, Chinese)
ITEMS: list[tuple[str, str, tuple[int, int, int, int] | None, str, str]] = [
    (
        "astronaut",
        "astronaut",
        None,
        "an astronaut in an orange space suit",
        "身穿橙色宇航服的宇航员",
    ),
    (
        "astronaut-face",
        "astronaut",
        (140, 0, 310, 180),
        "a smiling woman with short hair",
        "一位短发的微笑女士",
    ),
    ("astronaut-flag", "astronaut", (0, 0, 95, 512), "the American flag", "美国国旗"),
    (
        "astronaut-shuttle",
        "astronaut",
        (330, 0, 480, 290),
        "a model of the space shuttle",
        "航天飞机模型",
    ),
    ("astronaut-helmet", "astronaut", (270, 330, 512, 512), "a space helmet", "太空头盔"),
    (
        "astronaut-patch",
        "astronaut",
        (120, 330, 220, 430),
        "a round embroidered badge",
        "圆形的刺绣徽章",
    ),
    (
        "camera",
        "camera",
        None,
        "a man taking pictures with a camera on a tripod",
        "用三脚架上的相机拍照的男人",
    ),
    (
        "camera-tripod",
        "camera",
        (260, 180, 440, 512),
        "a tripod standing on grass",
        "立在草地上的三脚架",
    ),
    (
        "camera-buildings",
        "camera",
        (330, 90, 512, 250),
        "buildings with a dome in the distance",
        "远处带圆顶的建筑",
    ),
    ("chelsea", "chelsea", None, "a tabby cat", "一只虎斑猫"),
    ("coffee", "coffee", None, "a cup of coffee on a saucer", "碟子上的一杯咖啡"),
    ("coffee-table", "coffee", (430, 220, 560, 340), "a wooden table top", "木质桌面"),
    ("coins", "coins", None, "rows of old coins", "一排排古老的硬币"),
    ("coins-one", "coins", (300, 0, 384, 80), "a single old coin", "一枚古钱币"),
    ("clock", "clock", None, "a blurred wall clock", "一个模糊的挂钟"),
    ("moon", "moon", None, "the surface of the moon with craters", "布满陨石坑的月球表面"),
    ("brick", "brick", None, "a brick wall", "一面砖墙"),
    ("grass", "grass", None, "a lawn of grass", "一片草坪"),
    ("gravel", "gravel", None, "gravel and small stones", "碎石和小石子"),
    ("hubble", "hubble_deep_field", None, "galaxies in deep space", "深空中的星系"),
    ("page", "page", None, "a page of printed text", "一页印刷的文字"),
    ("text", "text", None, "handwritten numbers", "手写的数字"),
    ("rocket", "rocket", None, "a rocket on the launch pad at night", "夜晚发射台上的火箭"),
    ("rocket-tower", "rocket", (0, 0, 110, 427), "a steel lattice tower", "钢架结构的铁塔"),
    ("rocket-lights", "rocket", (0, 350, 640, 427), "bright lights at night", "夜晚明亮的灯光"),
    ("retina", "retina", None, "a photo of the retina of an eye", "眼底视网膜照片"),
    (
        "ihc",
        "immunohistochemistry",
        None,
        "stained tissue under a microscope",
        "显微镜下的染色组织",
    ),
    ("cell", "cell", None, "a single cell under a microscope", "显微镜下的单个细胞"),
    ("motorcycle", "motorcycle", None, "a red motorcycle in a garage", "车库里的一辆红色摩托车"),
    (
        "motorcycle-shelves",
        "motorcycle",
        (520, 0, 741, 270),
        "cardboard boxes on metal shelves",
        "金属货架上的纸箱",
    ),
    ("motorcycle-bench", "motorcycle", (30, 90, 300, 310), "a wooden workbench", "木制工作台"),
    (
        "motorcycle-engine",
        "motorcycle",
        (330, 180, 520, 350),
        "a motorcycle fuel tank and engine",
        "摩托车的油箱和发动机",
    ),
    (
        "motorcycle-wheel",
        "motorcycle",
        (500, 270, 741, 500),
        "the front wheel of a motorcycle",
        "摩托车的前轮",
    ),
    ("china", "china.jpg", None, "a Chinese pagoda by a lake", "湖边的中国宝塔"),
    ("china-lake", "china.jpg", (330, 190, 560, 330), "boats on a lake", "湖面上的船"),
    ("china-trees", "china.jpg", (530, 120, 640, 427), "green trees", "绿色的树木"),
    ("china-roof", "china.jpg", (80, 20, 340, 180), "the tiled roof of a pagoda", "宝塔的瓦屋顶"),
    ("flower", "flower.jpg", None, "an orange dahlia flower", "一朵橙色的大丽花"),
    ("flower-leaves", "flower.jpg", (0, 0, 160, 220), "blurry green leaves", "模糊的绿叶"),
    ("face", "lfw", None, "a black-and-white photo of a man's face", "一张男人面部的黑白照片"),
]


def _source(name: str) -> np.ndarray:
    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)
    from skimage import data

    if name == "motorcycle":
        return data.stereo_motorcycle()[0]
    if name == "lfw":  # 25 x 25 grey faces; the first is a face
        face = (data.lfw_subset()[0] * 255).astype(np.uint8)
        return np.asarray(Image.fromarray(face).resize((100, 100), Image.Resampling.BICUBIC))
    return getattr(data, name)()


@cache
def photos() -> list[Image.Image]:
    """The dev set's images, in ``ITEMS`` order, as RGB."""
    out = []
    for _, source, box, _, _ in ITEMS:
        image = Image.fromarray(_source(source)).convert("RGB")
        out.append(image.crop(box) if box else image)
    return out


def captions(lang: str) -> list[str]:
    return [en if lang == "en" else zh for _, _, _, en, zh in ITEMS]


def ranks(text_vecs: np.ndarray, image_vecs: np.ndarray) -> np.ndarray:
    """1-based rank of each text's own image among all images (ties: the pessimistic rank)."""
    scores = text_vecs @ image_vecs.T
    own = np.diag(scores)
    return 1 + (scores > own[:, None]).sum(axis=1)


def metrics(r: np.ndarray) -> dict[str, float]:
    return {
        "R@1": float(np.mean(r == 1)),
        "R@5": float(np.mean(r <= 5)),
        "MRR": float(np.mean(1.0 / r)),
    }
