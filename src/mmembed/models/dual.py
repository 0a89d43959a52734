"""Family ``dual``: two-tower image-text models (CLIP, SigLIP, SigLIP2) through transformers.

Each tower runs with the checkpoint's own preprocessing (``AutoTokenizer`` and
``AutoImageProcessor`` from the weights folder): CLIP pads texts to the longest in the batch
(77 positions at most), SigLIP/SigLIP2 pad to ``max_length`` 64 as they were trained. Images are
resized and cropped by the image processor. ``PooledBackend`` does the rest: a video is the mean
of its frame vectors, ``multi_images`` the mean of its images, a fused item the mean of its parts.
Not Matryoshka-trained: shorter dimensions use the ordered basis fitted on caption and synthetic
image embeddings (``basis.py``).

Options: ``weights``, ``device``, ``dtype`` (see ``torchutil``), ``text_padding`` (``auto``,
``max_length`` or ``longest``), ``text_max_length`` (0: 64 for SigLIP, else the model's limit),
``lowercase`` (SigLIP2 was trained on lower-cased text), ``batch_size``, ``basis_images``
(synthetic pictures in the basis samples), ``threads``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from mmembed.models import basis
from mmembed.models.base import PooledBackend, l2_normalize
from mmembed.models.torchutil import (
    TokenCounter,
    begin_load,
    pooled,
)

SIGLIP_TEXT_LENGTH = 64  # the SigLIP model cards: padding="max_length", max_length=64


class DualBackend(PooledBackend):
    def __init__(
        self,
        weights: str = "",
        device: str = "auto",
        dtype: str = "auto",
        text_padding: str = "auto",
        text_max_length: int = 0,
        lowercase: bool = False,
        batch_size: int = 32,
        basis_images: int = 48,
        threads: int = 0,
        cache_dir: str = "",
        revision: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if text_padding not in {"auto", "max_length", "longest"}:
            raise ValueError(f"unknown text_padding {text_padding!r}")
        self.weights, self.revision = weights, revision
        self.device_option, self.dtype_option = device, dtype
        self.text_padding = text_padding
        self.text_max_length = int(text_max_length)
        self.lowercase = bool(lowercase)
        self.batch_size = max(1, int(batch_size))
        self.basis_images = int(basis_images)
        self.threads = int(threads)
        self.cache_dir = cache_dir

    def load(self) -> None:
        transformers = begin_load(self)
        model = transformers.AutoModel.from_pretrained(self.path, dtype=self.dtype)
        if not hasattr(model, "get_text_features") or not hasattr(model, "get_image_features"):
            raise ValueError(
                f"{self.path}: {type(model).__name__} is not a two-tower image-text model "
                "(family 'dual' serves CLIP, SigLIP and SigLIP2)"
            )
        self.model = model.to(self.device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path)
        self._count = TokenCounter(self.tokenizer)
        self.image_processor = transformers.AutoImageProcessor.from_pretrained(self.path)

        model_type = str(getattr(model.config, "model_type", ""))
        is_siglip = model_type.startswith("siglip")
        if self.text_padding == "auto":
            self.text_padding = "max_length" if is_siglip else "longest"
        text_config = getattr(model.config, "text_config", model.config)
        limit = int(getattr(text_config, "max_position_embeddings", 0) or 77)
        if not self.text_max_length:
            self.text_max_length = SIGLIP_TEXT_LENGTH if is_siglip else limit
        self.text_max_length = min(self.text_max_length, limit)
        self.image_size = _image_size(self.image_processor)
        self.native_dim = int(self.embed_texts(["warm-up"], None).shape[1])

    def count_tokens(self, text: str) -> int:
        return self._count(self._text(text))

    def _text(self, text: str) -> str:
        return text.lower() if self.lowercase else text

    def embed_texts(self, texts: list[str], instruct: str | None) -> np.ndarray:
        # CLIP and SigLIP are not instruction-tuned: ``instruct`` is not used.
        torch = self._torch
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    [self._text(t) for t in texts[start : start + self.batch_size]],
                    padding="max_length" if self.text_padding == "max_length" else True,
                    truncation=True,
                    max_length=self.text_max_length,
                    return_tensors="pt",
                ).to(self.device)
                chunks.append(pooled(self.model.get_text_features(**enc)).float().cpu().numpy())
        return l2_normalize(np.concatenate(chunks))

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        torch = self._torch
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
                enc = self.image_processor(images=batch, return_tensors="pt")
                enc = {k: self._to_device(v) for k, v in enc.items()}
                chunks.append(pooled(self.model.get_image_features(**enc)).float().cpu().numpy())
        return l2_normalize(np.concatenate(chunks))

    def _to_device(self, value: Any) -> Any:
        value = value.to(self.device)
        return value.to(self.dtype) if value.is_floating_point() else value

    def basis_samples(self) -> np.ndarray:
        captions = basis.basis_captions()
        images = basis.synthetic_images(self.basis_images)
        key = [
            "dual",
            self.path,
            basis.folder_fingerprint(self.path),
            self.text_padding,
            str(self.text_max_length),
            str(self.lowercase),
            str(self.dtype),
            str(len(images)),
            *captions,
        ]

        def compute() -> np.ndarray:
            parts = [self.embed_texts(captions, None)]
            if images:
                parts.append(self.embed_images(images))
            return np.concatenate(parts)

        return basis.cached(self.cache_dir, key, compute)


def _image_size(processor: Any) -> int | None:
    """The shorter side the processor crops or resizes to (media decode no larger)."""
    for attr in ("crop_size", "size"):
        size = getattr(processor, attr, None)
        if not size:
            continue
        values = [size[k] for k in ("height", "width", "shortest_edge") if size.get(k)]
        if values:
            return int(min(values))
    return None
