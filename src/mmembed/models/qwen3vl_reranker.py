"""Family ``qwen3vl-reranker``: Qwen3-VL-Reranker (2B, 8B) through transformers.

The recipe of the model's reference code (``Qwen3VLReranker`` in the Qwen3-VL-Embedding
repository): each (query, document) pair is one chat, rendered by the checkpoint's chat template
with the assistant prefix appended (an empty assistant turn):

- system turn: ``SYSTEM_PROMPT`` (judge the Document against the Query and the Instruct; answer
  only "yes" or "no");
- user turn, as consecutive content parts: ``"<Instruct>: " + instruction`` (the request's
  ``instruct``, else ``DEFAULT_INSTRUCTION``), ``"<Query>:"``, the query's videos, images and
  texts (``"NULL"`` when it has none), ``"\\n<Document>:"``, the document's videos, images and
  texts.

The score is sigmoid(logit("yes") - logit("no")) of the next token, read from the final hidden
state of the last token (left padding) through the LM head's two rows: the difference of the
"yes" and "no" rows is kept and the rest of the LM head dropped after loading. A sequence longer
than ``max_length`` (10,240, as the reference) is cut as the reference cuts it: the last five
tokens (end of the user turn and the assistant prefix) are kept, and of the rest every special
token (vision placeholders included) and the first non-special tokens that fit.

Images and videos are prepared exactly as the ``qwen3vl`` embedding family prepares them (same
pixel budgets, frame choice, timestamps and patch layout; see ``qwen3vl.py``). A pass may hold
pairs of several requests; the media of a query shared by its pairs is prepared once per pass.

Options: as ``qwen3vl`` (``weights``, ``device``, ``dtype``, pixel budgets, ``attn_implementation``,
``batch_size``, ``threads``), with ``instruction`` the default task and ``max_length`` the
sequence cap.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from mmembed.models.base import RERANK, EmbedInput, RerankPair
from mmembed.models.qwen3vl import (
    _FACTOR,
    VIDEO_TOTAL_PIXELS,
    Qwen3VLBackend,
    _fill,
)
from mmembed.models.torchutil import load_pretrained

SYSTEM_PROMPT = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".'
)
DEFAULT_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
QUERY_PREFIX, DOCUMENT_PREFIX = "<Query>:", "\n<Document>:"
YES, NO = "yes", "no"  # the next-token pair whose logit difference is the relevance
REFERENCE_MAX_LENGTH = 10240  # the reference reranker's MAX_LENGTH
KEPT_TAIL = 5  # "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n": never truncated


def squash(logit_difference: np.ndarray) -> np.ndarray:
    """The relevance score from logit("yes") - logit("no"): their two-way softmax."""
    return 1.0 / (1.0 + np.exp(-logit_difference))


def truncate_ids(ids: list[int], max_length: int, special: set[int]) -> list[int]:
    """The reference's cut: of all but the last ``KEPT_TAIL`` tokens, keep every special token
    and the first non-special ones up to ``max_length`` tokens in all, then the tail."""
    head, tail = ids[:-KEPT_TAIL], ids[-KEPT_TAIL:]
    if len(head) <= max_length:
        return ids
    budget = max_length - sum(t in special for t in head)
    kept: list[int] = []
    for t in head:
        if t in special:
            kept.append(t)
        elif budget > 0:
            kept.append(t)
            budget -= 1
    return kept + tail


class Qwen3VLReranker(Qwen3VLBackend):
    task: ClassVar[str] = RERANK

    def __init__(
        self,
        weights: str = "",
        device: str = "auto",
        dtype: str = "auto",
        instruction: str = DEFAULT_INSTRUCTION,
        image_min_pixels: int = 4 * _FACTOR**2,
        image_max_pixels: int = 1800 * _FACTOR**2,
        video_min_pixels: int = 128 * _FACTOR**2,
        video_max_pixels: int = 768 * _FACTOR**2,
        video_total_pixels: int = VIDEO_TOTAL_PIXELS,
        max_length: int = REFERENCE_MAX_LENGTH,
        attn_implementation: str = "sdpa",
        batch_size: int = 4,
        threads: int = 0,
        cache_dir: str = "",
        revision: str | None = None,
    ) -> None:
        super().__init__(
            weights=weights,
            device=device,
            dtype=dtype,
            instruction=instruction,
            image_min_pixels=image_min_pixels,
            image_max_pixels=image_max_pixels,
            video_min_pixels=video_min_pixels,
            video_max_pixels=video_max_pixels,
            video_total_pixels=video_total_pixels,
            max_length=max_length,
            attn_implementation=attn_implementation,
            batch_size=batch_size,
            threads=threads,
            cache_dir=cache_dir,
            revision=revision,
        )

    # -- loading -------------------------------------------------------------------------------
    def _load_model(self, transformers: Any) -> Any:
        lm = load_pretrained(
            transformers.Qwen3VLForConditionalGeneration,
            self.path,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
        )
        self._lm_head = lm.lm_head.weight.detach()
        return lm.model

    def load(self) -> None:
        super().load()
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (YES, NO) if t not in vocab]
        if missing:
            raise ValueError(f"{self.path}: the vocabulary has no token {missing[0]!r}")
        head = self._lm_head
        # One row instead of the whole LM head (151,936 x hidden): the score needs only this.
        self.direction = (head[vocab[YES]] - head[vocab[NO]]).to(self.device, self.dtype)
        del self._lm_head
        self.tokenizer.padding_side = "left"  # the last position is every pair's last token
        self.special_ids = set(self.tokenizer.all_special_ids)

    # -- scoring -------------------------------------------------------------------------------
    def conversation_pair(self, pair: RerankPair) -> list[dict[str, Any]]:
        instruction = pair.query.instruct or self.instruction
        content: list[dict[str, Any]] = [{"type": "text", "text": f"<Instruct>: {instruction}"}]
        content += _part(QUERY_PREFIX, pair.query)
        content += _part(DOCUMENT_PREFIX, pair.document)
        return [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": content},
        ]

    def score(self, query: EmbedInput, documents: list[EmbedInput]) -> np.ndarray:
        return self.score_pairs([RerankPair(query, d) for d in documents])

    def score_pairs(self, pairs: list[RerankPair]) -> np.ndarray:
        out = np.empty(len(pairs), np.float32)
        prepared: dict[int, Any] = {}  # media shared by pairs (a query's), prepared once
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            out[start : start + len(chunk)] = self._score_batch(chunk, prepared)
        return out

    def _image(self, image: Any, prepared: dict[int, Any]) -> tuple[Any, Any]:
        key = id(image)
        if key not in prepared:
            enc = self.image_pixels_of([np.asarray(self.prepare_image(image))])
            prepared[key] = (image, enc["pixel_values"], enc["image_grid_thw"][0])
        return prepared[key][1:]

    def _video(self, clip: Any, prepared: dict[int, Any]) -> tuple[Any, Any, Any]:
        key = id(clip)
        if key not in prepared:
            prepared[key] = (clip, *self.video_patches(clip))
        return prepared[key][1:]

    def _score_batch(self, pairs: list[RerankPair], prepared: dict[int, Any]) -> np.ndarray:
        torch = self._torch
        pixels, grids, video_pixels, video_grids, rows = [], [], [], [], []
        for pair in pairs:
            video_marks, image_marks = [], []
            for clip in [*pair.query.videos, *pair.document.videos]:
                patches, grid, stamps = self._video(clip, prepared)
                video_pixels.append(patches)
                video_grids.append(grid)
                video_marks.append(self._video_tokens(grid, stamps))
            for image in [*pair.query.images, *pair.document.images]:
                values, grid = self._image(image, prepared)
                pixels.append(values)
                grids.append(grid)
                image_marks.append(self._image_tokens(grid))
            prompt = self.tokenizer.apply_chat_template(
                self.conversation_pair(pair), tokenize=False, add_generation_prompt=True
            )
            prompt = _fill(prompt, self._mark(self.video_pad), video_marks)
            prompt = _fill(prompt, self._mark(self.image_pad), image_marks)
            ids = self.tokenizer(prompt)["input_ids"]
            if self.max_length:
                ids = truncate_ids(ids, self.max_length, self.special_ids)
            rows.append(ids)
        enc = self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        ids = enc["input_ids"]
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(self.device),
            "attention_mask": enc["attention_mask"].to(self.device),
            "mm_token_type_ids": (
                (ids == self.image_token_id).int() + 2 * (ids == self.video_token_id).int()
            ).to(self.device),
        }
        if pixels:
            kwargs["pixel_values"] = torch.cat(pixels).to(self.device, self.dtype)
            kwargs["image_grid_thw"] = torch.stack(grids).to(self.device)
        if video_pixels:
            stacked = torch.from_numpy(np.concatenate(video_pixels))
            kwargs["pixel_values_videos"] = stacked.to(self.device, self.dtype)
            kwargs["video_grid_thw"] = torch.tensor(video_grids, device=self.device)
        with torch.inference_mode():
            hidden = self.model(**kwargs, use_cache=False).last_hidden_state[:, -1]
            difference = hidden @ self.direction
        return squash(difference.float().cpu().numpy())

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        raise TypeError("a reranker scores pairs; it does not embed")


def _part(prefix: str, item: EmbedInput) -> list[dict[str, Any]]:
    """One side of the pair: its prefix, then its videos, images and texts ("NULL" if none)."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": prefix}]
    if not (item.texts or item.images or item.videos):
        return [*parts, {"type": "text", "text": "NULL"}]
    parts += [{"type": "video"} for _ in item.videos]
    parts += [{"type": "image"} for _ in item.images]
    parts += [{"type": "text", "text": t} for t in item.texts]
    return parts
