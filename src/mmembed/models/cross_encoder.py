"""Family ``cross-encoder``: a sentence-transformers ``CrossEncoder`` folder, run with plain
transformers (text only).

A cross-encoder reads the query and a document together as one sequence pair and gives one
logit; the relevance score is that logit through the folder's activation, as
``CrossEncoder.predict`` computes it:

- the pair is tokenised by the folder's tokenizer as ``tokenizer(queries, documents,
  padding=True, truncation="longest_first", max_length=L)``, where ``L`` is the folder's
  ``max_seq_length`` (``sentence_bert_config.json``) or else the tokenizer's
  ``model_max_length``, capped at the model's ``max_position_embeddings``;
- the model is ``AutoModelForSequenceClassification`` with one label;
- the activation is the one the folder names (``config_sentence_transformers.json``
  ``activation_fn``, or ``config.json``'s ``sentence_transformers.activation_fn``, or the
  pre-4.0 ``sbert_ce_default_activation_function``), else sigmoid, sentence-transformers'
  default for one label. Only torch's Sigmoid and Identity are accepted; the API's scores are
  in [0, 1], so a folder whose activation is Identity is served through a sigmoid and says so
  in the log.

Options: ``weights`` (folder or hub id), ``device``, ``dtype`` (see ``torchutil``),
``max_length`` (0: from the folder), ``batch_size`` (pairs per forward pass), ``threads``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, ClassVar

import numpy as np

from mmembed.models.base import RERANK, TEXT, EmbedInput, RerankPair
from mmembed.models.torchutil import TokenCounter, begin_load, load_pretrained

log = logging.getLogger("mmembed.models")

SIGMOID = "torch.nn.modules.activation.Sigmoid"
IDENTITY = "torch.nn.modules.linear.Identity"
_ACTIVATIONS = {SIGMOID: "sigmoid", IDENTITY: "identity"}


def _json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def folder_activation(path: str) -> str:
    """The activation a CrossEncoder folder names, as sentence-transformers looks it up."""
    named = _json(os.path.join(path, "config_sentence_transformers.json")).get("activation_fn")
    if named is None:
        config = _json(os.path.join(path, "config.json"))
        named = (config.get("sentence_transformers") or {}).get("activation_fn") or config.get(
            "sbert_ce_default_activation_function"
        )
    if named is None:
        return "sigmoid"
    if named not in _ACTIVATIONS:
        raise ValueError(
            f"{path}: activation {named!r} is not supported (known: {', '.join(_ACTIVATIONS)})"
        )
    return _ACTIVATIONS[named]


class CrossEncoderReranker:
    task: ClassVar[str] = RERANK
    modalities: ClassVar[frozenset[str]] = frozenset({TEXT})
    image_size: int | None = None

    def __init__(
        self,
        weights: str = "",
        device: str = "auto",
        dtype: str = "auto",
        max_length: int = 0,
        batch_size: int = 32,
        threads: int = 0,
        cache_dir: str = "",
        revision: str | None = None,
    ) -> None:
        self.weights, self.revision = weights, revision
        self.device_option, self.dtype_option = device, dtype
        self.max_length = int(max_length)
        self.batch_size = max(1, int(batch_size))
        self.threads = int(threads)

    def load(self) -> None:
        transformers = begin_load(self)
        model = load_pretrained(
            transformers.AutoModelForSequenceClassification, self.path, dtype=self.dtype
        )
        if int(model.config.num_labels) != 1:
            raise ValueError(
                f"{self.path}: a cross-encoder with {model.config.num_labels} labels gives no "
                "single relevance score; the family serves one-label models"
            )
        self.model = model.to(self.device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path)
        self._count = TokenCounter(self.tokenizer)
        self.activation = folder_activation(self.path)
        if self.activation == "identity":
            log.info("%s: raw logits squashed by a sigmoid into [0, 1]", self.path)
        sbert = _json(os.path.join(self.path, "sentence_bert_config.json"))
        limit = self.max_length or int(sbert.get("max_seq_length") or 0)
        limit = limit or int(self.tokenizer.model_max_length)
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions and positions > 0:
            limit = min(limit, int(positions))
        self.limit = limit

    def count_tokens(self, text: str) -> int:
        return self._count(text)

    def truncate_text(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= max_tokens else self.tokenizer.decode(ids[:max_tokens])

    def score(self, query: EmbedInput, documents: list[EmbedInput]) -> np.ndarray:
        return self.score_pairs([RerankPair(query, d) for d in documents])

    def score_pairs(self, pairs: list[RerankPair]) -> np.ndarray:
        out = np.empty(len(pairs), np.float32)
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            out[start : start + len(chunk)] = self._logits(
                [_text(p.query) for p in chunk], [_text(p.document) for p in chunk]
            )
        # Identity folders too: the API promises scores in [0, 1] (the order is unchanged).
        return 1.0 / (1.0 + np.exp(-out))

    def _logits(self, queries: list[str], documents: list[str]) -> np.ndarray:
        torch = self._torch
        enc = self.tokenizer(
            queries,
            documents,
            padding=True,
            truncation="longest_first",
            max_length=self.limit,
            return_tensors="pt",
        )
        with torch.inference_mode():
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
        return logits[:, 0].float().cpu().numpy()


def _text(item: EmbedInput) -> str:
    return "\n".join(item.texts)
