"""Device and dtype choice for the torch backends, shared so every family reads the same options.

``device = "auto"`` means CUDA when torch sees a GPU, else CPU; ``dtype = "auto"`` means bfloat16
on CUDA (fp16 where the GPU lacks bf16) and float32 on CPU, where half precision is slow and
lossy. Explicit values (``"cuda:1"``, ``"float16"``) are taken as given.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import Any

from mmembed.extras import MissingExtra, needs_extra

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """(torch.device, torch.dtype) for the options ``device`` and ``dtype``."""
    import torch

    name = (device or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for, but torch sees no CUDA device")

    kind = (dtype or "auto").strip().lower()
    if kind == "auto":
        if dev.type == "cuda":
            kind = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            kind = "float32"
    if kind not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (known: auto, {', '.join(sorted(_DTYPES))})")
    return dev, getattr(torch, _DTYPES[kind])


def set_threads(threads: int) -> None:
    """Cap torch's intra-op threads (0 keeps torch's default: all cores)."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def pooled(output: Any) -> Any:
    """``get_text_features``/``get_image_features`` return a tensor in transformers 4 and an
    output object whose ``pooler_output`` is the projected embedding in transformers 5."""
    return output if hasattr(output, "shape") else output.pooler_output


def import_transformers() -> Any:
    """transformers, or an error naming the extra that installs it."""
    try:
        import transformers
    except ImportError:
        what = "open-weight backends (transformers)"
        raise MissingExtra(needs_extra(what, "open-weights")) from None
    transformers.utils.logging.disable_progress_bar()  # no bars in server logs
    return transformers


class TokenCounter:
    """Counts tokens with a private copy of a tokenizer.

    Hugging Face fast tokenizers keep padding and truncation settings as shared mutable state,
    set on every call. The engine counts tokens on the event loop while the model thread
    tokenises padded batches, so sharing one instance lets a batch come back unpadded.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = copy.deepcopy(tokenizer)
        self._lock = threading.Lock()

    def __call__(self, text: str, special: bool = True) -> int:
        with self._lock:
            return len(self._tokenizer(text, add_special_tokens=special)["input_ids"])


Encoding = dict[str, list[int]]  # one text's tokenizer output, unpadded: input_ids, masks, ...


class TokenIds(TokenCounter):
    """Token counts that keep what they computed: each counted text's encoding (untruncated,
    unpadded) waits here, bounded, until the forward pass takes it (``take``) and pads it into
    its batch instead of tokenising the text again. Counting runs where a tokenizer crash costs
    only the worker (the engine's AUX lane), and the pass then tokenises nothing it was sent
    counted. Keyed by the exact string tokenised and whether special tokens were added, so an
    encoding taken is the one the tokenizer gives for that call: results never change.

    Bounded by entries and tokens (~70 bytes a token kept); the least recently counted go
    first. A text counted but never embedded (over a limit, a cache hit) ages out.
    """

    def __init__(self, tokenizer: Any, max_entries: int = 16384, max_tokens: int = 1 << 19) -> None:
        super().__init__(tokenizer)
        self.max_entries, self.max_tokens = max_entries, max_tokens
        self._kept: OrderedDict[tuple[str, bool], Encoding] = OrderedDict()
        self._tokens = 0

    def __call__(self, text: str, special: bool = True) -> int:
        return self.counts([text], special)[0]

    def counts(self, texts: list[str], special: bool = True) -> list[int]:
        """Token counts of ``texts``, their encodings kept for the pass."""
        encodings = self._encode(texts, special)
        with self._lock:
            for text, enc in zip(texts, encodings, strict=True):
                self._keep((text, special), enc)
        return [len(enc["input_ids"]) for enc in encodings]

    def take(self, texts: list[str], special: bool = True) -> list[Encoding]:
        """The encodings of ``texts``: those kept by counting handed over (and forgotten), the
        rest tokenised now, in one call."""
        with self._lock:
            found = [self._kept.pop((t, special), None) for t in texts]
            for enc in found:
                if enc is not None:
                    self._tokens -= len(enc["input_ids"])
        missing = [t for t, enc in zip(texts, found, strict=True) if enc is None]
        fresh = iter(self._encode(missing, special))
        return [enc if enc is not None else next(fresh) for enc in found]

    def truncated(self, texts: list[str], max_length: int, special: bool = True) -> list[Encoding]:
        """Encodings of ``texts`` cut to ``max_length`` tokens by the tokenizer's truncation
        (never kept: a pass asks for these only for texts longer than it reads)."""
        return self._encode(texts, special, truncation=True, max_length=max_length)

    def _encode(self, texts: list[str], special: bool, **options: Any) -> list[Encoding]:
        if not texts:
            return []
        with self._lock:
            enc = self._tokenizer(texts, add_special_tokens=special, **options)
        return [{name: enc[name][i] for name in enc} for i in range(len(texts))]

    def _keep(self, key: tuple[str, bool], enc: Encoding) -> None:
        old = self._kept.pop(key, None)
        if old is not None:
            self._tokens -= len(old["input_ids"])
        n = len(enc["input_ids"])
        if n > self.max_tokens:
            return
        self._kept[key] = enc
        self._tokens += n
        while len(self._kept) > self.max_entries or self._tokens > self.max_tokens:
            _, dropped = self._kept.popitem(last=False)
            self._tokens -= len(dropped["input_ids"])


def begin_load(backend: Any) -> Any:
    """The steps every transformers backend's ``load()`` starts with: transformers imported (or
    an error naming the extra), torch's threads capped, weights resolved to a folder, device and
    dtype chosen. Sets ``_torch``, ``path``, ``device`` and ``dtype`` on ``backend`` (which has
    ``weights``, ``revision``, ``threads``, ``device_option``, ``dtype_option``); returns
    transformers."""
    import torch

    from mmembed.models.weights import resolve_weights

    transformers = import_transformers()
    set_threads(backend.threads)
    backend._torch = torch
    backend.path = resolve_weights(backend.weights, backend.revision)
    backend.device, backend.dtype = resolve_device(backend.device_option, backend.dtype_option)
    return transformers


class WeightsMismatch(RuntimeError):
    """The checkpoint's tensors do not fill the model: serving it would mean random weights."""


def load_pretrained(
    loader: Any, path: str, *, ignore_missing: tuple[str, ...] = (), **kwargs: Any
) -> Any:
    """``loader.from_pretrained(path, **kwargs)``, refused unless every weight came from the
    checkpoint and every tensor of the checkpoint found its place.

    transformers fills what a checkpoint lacks with random values and only logs a warning,
    e.g. when an older release does not know the checkpoint's layout, or a folder was written
    for another architecture. ``ignore_missing`` names prefixes of parameters the backend never
    uses (BERT's pooler for a sentence encoder), whose absence is harmless.
    """
    model, info = loader.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(ignore_missing))
    unexpected = sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(
        str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ())
    )
    problems = [
        f"{len(keys)} {what} (e.g. {keys[0]})"
        for what, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of the wrong shape", mismatched),
        )
        if keys
    ]
    if problems:
        import transformers

        raise WeightsMismatch(
            f"{path}: the checkpoint does not fit {type(model).__name__} under transformers "
            f"{transformers.__version__}: weights {', '.join(problems)}; refusing to serve "
            "randomly initialised weights (a newer transformers, or the right 'family'?)"
        )
    return model
