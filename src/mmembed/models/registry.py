"""Backend families by name, imported lazily so only the family in use pays its imports."""

from __future__ import annotations

import importlib
from typing import Any

from mmembed.models.base import Backend

FAMILIES: dict[str, str] = {
    "conse": "mmembed.models.conse:ConSEBackend",
    "hash": "mmembed.models.hashed:HashBackend",
    # Open-weight families (extra "open-weights": transformers, huggingface_hub).
    "sentence": "mmembed.models.sentence:SentenceBackend",
    "dual": "mmembed.models.dual:DualBackend",
    "qwen3vl": "mmembed.models.qwen3vl:Qwen3VLBackend",
}


def create_backend(family: str, options: dict[str, Any]) -> Backend:
    try:
        target = FAMILIES[family]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"unknown backend family {family!r} (known: {known})") from None
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**options)
