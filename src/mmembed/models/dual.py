"""Family ``dual``: two-tower image-text models (CLIP, SigLIP, SigLIP2) through transformers.

Each tower runs with the checkpoint's own preprocessing (``AutoTokenizer`` and
``AutoImageProcessor`` from the weights folder). CLIP pads texts to the longest in the batch
(77 positions at most) with an attention mask. SigLIP/SigLIP2 texts are built here as big_vision
trained them, whatever the tokenizer files or transformers defaults say (SigLIP2 checkpoints name
``GemmaTokenizer``, which neither lower-cases nor pads on the right in transformers 5): the text
lower-cased, no BOS, the tokens truncated to 63, an EOS appended ("sticky": present even when the
text was cut), right-padded with the pad id to the model's 64 positions, and NO attention mask —
the pooled text vector is the hidden state of the last position, a pad, which was trained
attending to every position. ``load()`` checks that layout once and refuses otherwise. Images are
resized and cropped by the image processor. ``PooledBackend`` does the rest: a video is the mean
of its frame vectors, ``multi_images`` the mean of its images, a fused item the mean of its parts.
Not Matryoshka-trained: shorter dimensions use the ordered basis fitted on caption and synthetic
image embeddings (``basis.py``).

Options: ``weights``, ``device``, ``dtype`` (see ``torchutil``), ``text_padding`` (CLIP only:
``auto``/``longest`` or ``max_length``), ``text_max_length`` (0: the model's positions; SigLIP
accepts only its own 64), ``lowercase`` (``auto``: on for SigLIP, trained on lower-cased text),
``batch_size``, ``basis_images`` (synthetic pictures in the basis samples), ``threads``,
``long_text``: what a text longer than the model's length (SigLIP 64, CLIP 77 tokens, far below
the API names' 512 / 1,024) becomes: ``chunks`` (default: consecutive windows of its tokens,
embedded and averaged, so the whole text counts) or ``truncate`` (its beginning only; the engine
then reports cut texts in ``usage.truncated_texts``).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from PIL import Image

from mmembed.models import basis
from mmembed.models.base import PooledBackend, l2_normalize
from mmembed.models.pixels import PixelTable
from mmembed.models.torchutil import (
    Encoding,
    TokenIds,
    begin_load,
    load_pretrained,
    pooled,
)


class DualBackend(PooledBackend):
    def __init__(
        self,
        weights: str = "",
        device: str = "auto",
        dtype: str = "auto",
        text_padding: str = "auto",
        text_max_length: int = 0,
        lowercase: bool | str = "auto",
        batch_size: int = 32,
        basis_images: int = 48,
        threads: int = 0,
        cache_dir: str = "",
        revision: str | None = None,
        long_text: str = "chunks",
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if long_text not in {"truncate", "chunks"}:
            raise ValueError(f"long_text must be truncate or chunks, not {long_text!r}")
        self.long_text = long_text
        if text_padding not in {"auto", "max_length", "longest"}:
            raise ValueError(f"unknown text_padding {text_padding!r}")
        self.weights, self.revision = weights, revision
        self.device_option, self.dtype_option = device, dtype
        self.text_padding = text_padding
        self.text_max_length = int(text_max_length)
        if lowercase not in (True, False, "auto"):
            raise ValueError(f'lowercase must be true, false or "auto", not {lowercase!r}')
        self.lowercase = lowercase
        self.batch_size = max(1, int(batch_size))
        self.basis_images = int(basis_images)
        self.threads = int(threads)
        self.cache_dir = cache_dir
        self.siglip = False
        self.image_processor: Any = None
        self._processor_lock = threading.Lock()
        # False: the processor's own path; None: not checked yet
        self._table: PixelTable | bool | None = None
        self._direct: tuple[tuple[int, int], int] | bool | None = None

    def load(self) -> None:
        transformers = begin_load(self)
        model = load_pretrained(transformers.AutoModel, self.path, dtype=self.dtype)
        if not hasattr(model, "get_text_features") or not hasattr(model, "get_image_features"):
            raise ValueError(
                f"{self.path}: {type(model).__name__} is not a two-tower image-text model "
                "(family 'dual' serves CLIP, SigLIP and SigLIP2)"
            )
        self.model = model.to(self.device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path)
        self._count = TokenIds(self.tokenizer)
        self._specials = self.tokenizer.num_special_tokens_to_add()
        self._processor()

        model_type = str(getattr(model.config, "model_type", ""))
        self.siglip = model_type.startswith("siglip")
        text_config = getattr(model.config, "text_config", model.config)
        limit = int(getattr(text_config, "max_position_embeddings", 0) or 77)
        if self.lowercase == "auto":
            self.lowercase = self.siglip
        if self.siglip:
            if not self.lowercase:
                raise ValueError("SigLIP was trained on lower-cased text: lowercase must be on")
            # Pooling reads the last position, so texts fill exactly the trained positions.
            if self.text_padding == "longest":
                raise ValueError("SigLIP texts are always padded to the model's length")
            if self.text_max_length not in (0, limit):
                raise ValueError(
                    f"text_max_length {self.text_max_length}: SigLIP texts are always "
                    f"{limit} tokens, as the checkpoint was trained"
                )
            self.text_padding = "max_length"
            self.text_max_length = limit
            check_siglip_text(self)
        else:
            if self.text_padding == "auto":
                self.text_padding = "longest"
            self.text_max_length = min(self.text_max_length or limit, limit)
        self.image_size = _image_size(self.image_processor)
        self.native_dim = int(self.embed_texts(["warm-up"], None).shape[1])

    def count_tokens(self, text: str) -> int:
        return self.count_tokens_batch([text])[0]

    def count_tokens_batch(self, texts: list[str]) -> list[int]:
        """Token counts in one tokenizer call; the encodings wait for the pass (``TokenIds``):
        SigLIP's are the ones its rows are built from, CLIP's the ones it pads."""
        if self.siglip:  # the text's tokens and the EOS, before truncation
            return [n + 1 for n in self._count.counts([self._text(t) for t in texts], False)]
        return self._count.counts([self._text(t) for t in texts])

    def _text(self, text: str) -> str:
        return text.lower() if self.lowercase else text

    @property
    def text_window(self) -> int:
        """Tokens (as ``count_tokens`` counts them) past which a text is cut; 0 when long texts
        are embedded in chunks, so nothing is cut. The engine reports cut texts in usage."""
        return 0 if self.long_text == "chunks" else self.text_max_length

    def _siglip_row(self, body: list[int]) -> list[int]:
        """No BOS, the tokens, a sticky EOS, right padding with the pad id to the length."""
        ids = [*body[: self.text_max_length - 1], self.tokenizer.eos_token_id]
        return ids + [self.tokenizer.pad_token_id] * (self.text_max_length - len(ids))

    def siglip_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids as SigLIP was trained on them, one row per text (cut to the length)."""
        tokens = self.tokenizer([self._text(t) for t in texts], add_special_tokens=False)
        return [self._siglip_row(ids) for ids in tokens["input_ids"]]

    def _pieces(self, text: str, counted: Encoding) -> list[Any]:
        """What goes through the text tower for one text: SigLIP id rows, CLIP encodings (or
        strings, for a text longer than the model's length); more than one when ``long_text =
        "chunks"`` and the text is longer than the model's length (consecutive windows of its
        tokens, each with the model's special tokens). ``counted`` is the text's encoding as
        ``count_tokens_batch`` made it."""
        if self.siglip:
            body = counted["input_ids"]
            n = self.text_max_length - 1
            if self.long_text == "chunks" and len(body) > n:
                return [self._siglip_row(body[i : i + n]) for i in range(0, len(body), n)]
            return [self._siglip_row(body)]
        # Within the model's length (and, for chunks, not over the window below, which the
        # tokenizer's fixed count of special tokens turns into this bound), the tokenizer's
        # truncating call would give this very encoding.
        size = len(counted["input_ids"])
        length = self.text_max_length
        if size <= length and (self.long_text != "chunks" or size - self._specials <= length - 2):
            return [counted]
        if self.long_text == "chunks":
            body = self.tokenizer(self._text(text), add_special_tokens=False)["input_ids"]
            n = self.text_max_length - 2  # BOS and EOS
            if len(body) > n:
                return [self.tokenizer.decode(body[i : i + n]) for i in range(0, len(body), n)]
        return [self._text(text)]

    def embed_texts(self, texts: list[str], instruct: str | None) -> np.ndarray:
        # CLIP and SigLIP are not instruction-tuned: ``instruct`` is not used. A text in chunks
        # is the normalised mean of its chunks' vectors.
        owners, pieces = [], []
        counted = self._count.take([self._text(t) for t in texts], special=not self.siglip)
        for i, (text, enc) in enumerate(zip(texts, counted, strict=True)):
            parts = self._pieces(text, enc)
            owners += [i] * len(parts)
            pieces += parts
        vecs = self._encode_pieces(pieces)
        if len(pieces) == len(texts):
            return vecs
        out = np.zeros((len(texts), vecs.shape[1]), np.float32)
        np.add.at(out, owners, vecs)
        return l2_normalize(out)

    def _encode_pieces(self, pieces: list[Any]) -> np.ndarray:
        torch = self._torch
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(pieces), self.batch_size):
                batch = pieces[start : start + self.batch_size]
                if self.siglip:  # input ids only: the checkpoints were trained without a mask
                    ids = torch.tensor(batch, device=self.device)
                    out = self.model.get_text_features(input_ids=ids)
                else:  # as tokenizer(batch, padding=..., truncation=True, max_length=...)
                    strings = [i for i, p in enumerate(batch) if isinstance(p, str)]
                    cut = self._count.truncated([batch[i] for i in strings], self.text_max_length)
                    for i, e in zip(strings, cut, strict=True):
                        batch[i] = e
                    fixed = self.text_padding == "max_length"
                    enc = self.tokenizer.pad(
                        batch,
                        padding="max_length" if fixed else True,
                        max_length=self.text_max_length if fixed else None,
                        return_tensors="pt",
                    ).to(self.device)
                    out = self.model.get_text_features(**enc)
                chunks.append(pooled(out).float().cpu().numpy())
        return l2_normalize(np.concatenate(chunks))

    def _processor(self) -> Any:
        """The checkpoint's image processor (loaded on first use: an unloaded instance in the
        server process prepares images with it)."""
        with self._processor_lock:
            if self.image_processor is None:
                from mmembed.models.torchutil import import_transformers
                from mmembed.models.weights import resolve_weights

                path = getattr(self, "path", None) or resolve_weights(self.weights, self.revision)
                auto = import_transformers().AutoImageProcessor
                self.image_processor = auto.from_pretrained(path)
            return self.image_processor

    def prepare_image(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """The checkpoint's resize and crop of an image, as uint8 CHW pixels at the model's
        input size, on the decode pool: the forward pass only rescales and normalises, and a
        384 px input crosses to the model process as 442 KB of contiguous bytes (cheap to
        pickle) instead of the decoded image. Idempotent."""
        if isinstance(image, np.ndarray):
            return image
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        if self._direct is None:
            self._direct = self._plain_resize() or False
        if self._direct:
            size, resample = self._direct
            return np.ascontiguousarray(np.asarray(rgb.resize(size, resample)).transpose(2, 0, 1))
        return self._processor_resize(rgb)

    def _processor_resize(self, rgb: Image.Image) -> np.ndarray:
        out = self._processor()(
            images=[rgb], do_rescale=False, do_normalize=False, return_tensors="np"
        )["pixel_values"][0]
        # uint8 as it is (np.rint would go through float16); older processors give whole floats
        return np.ascontiguousarray(out if out.dtype == np.uint8 else np.rint(out).astype(np.uint8))

    def _plain_resize(self) -> tuple[tuple[int, int], int] | None:
        """((width, height), resample) when the processor's resize is one PIL resize to a fixed
        size and nothing else (SigLIP's: the processor converts to arrays and back around the
        same resize), checked once on a sample; None otherwise (CLIP crops)."""
        proc = self._processor()
        size = getattr(proc, "size", None)
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        height, width = get("height"), get("width")
        if not (height and width) or getattr(proc, "do_center_crop", False):
            return None
        if getattr(proc, "do_pad", False) or not getattr(proc, "do_resize", True):
            return None
        resample = getattr(proc, "resample", None)
        plain = ((int(width), int(height)), 2 if resample is None else int(resample))
        sample = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), np.uint8))
        got = np.asarray(sample.resize(*plain)).transpose(2, 0, 1)
        return plain if np.array_equal(got, self._processor_resize(sample)) else None

    def _pixels(self, batch: list[np.ndarray]) -> dict[str, Any]:
        """The processor's rescale and normalise of prepared pixels, as a table lookup where it
        gives the same bytes (checked once), else by the processor."""
        proc = self._processor()
        skip = {"do_resize": False}
        if getattr(proc, "do_center_crop", None) is not None:
            skip["do_center_crop"] = False
        if self._table is None:

            def same(table: PixelTable) -> bool:
                sample = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 48), np.uint8)
                want = proc(images=list(sample), return_tensors="np", **skip)["pixel_values"]
                return bool(np.array_equal(table.chw(sample), want))

            self._table = PixelTable.of(proc, same) or False
        if self._table:
            return {"pixel_values": self._torch.from_numpy(self._table.chw(np.stack(batch)))}
        return dict(proc(images=batch, return_tensors="pt", **skip))

    def embed_images(self, images: list[Image.Image | np.ndarray]) -> np.ndarray:
        torch = self._torch
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = [self.prepare_image(im) for im in images[start : start + self.batch_size]]
                enc = {k: self._to_device(v) for k, v in self._pixels(batch).items()}
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
            self.long_text,
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


def check_siglip_text(backend: DualBackend) -> None:
    """Refuse a SigLIP tokenizer that cannot give the trained text layout (no EOS or pad
    token), and check the layout once on a probe text."""
    tok = backend.tokenizer
    if tok.eos_token_id is None or tok.pad_token_id is None:
        raise ValueError(
            f"{backend.path}: the SigLIP tokenizer has no "
            f"{'EOS' if tok.eos_token_id is None else 'pad'} token; texts cannot be encoded "
            "as the model was trained (EOS, right padding)"
        )
    probe = "A Photo Of A Cat"
    body = tok(backend._text(probe), add_special_tokens=False)["input_ids"]
    row = backend.siglip_ids([probe])[0]
    length = backend.text_max_length
    layout_ok = (
        len(row) == length
        and row[: len(body)] == body[: length - 1]
        and row[min(len(body), length - 1)] == tok.eos_token_id
        and all(i == tok.pad_token_id for i in row[len(body) + 1 :])
    )
    if not layout_ok:
        raise ValueError(f"{backend.path}: SigLIP text layout check failed for {probe!r}: {row}")


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
