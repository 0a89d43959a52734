"""Backend families by name, imported lazily so only the family in use pays its imports.

A family's options are the keyword parameters of its class's ``__init__``; their annotations
(or, without one, their defaults) give their types. ``check_options`` holds a catalog's options
to that when the catalog loads, so a misspelt or mistyped option is an error instead of being
silently ignored.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from typing import Any

from mmembed.models.base import RERANK, Backend

FAMILIES: dict[str, str] = {
    "conse": "mmembed.models.conse:ConSEBackend",
    "hash": "mmembed.models.hashed:HashBackend",
    # Open-weight families (extra "open-weights": transformers, huggingface_hub).
    "sentence": "mmembed.models.sentence:SentenceBackend",
    "dual": "mmembed.models.dual:DualBackend",
    "qwen3vl": "mmembed.models.qwen3vl:Qwen3VLBackend",
    # Rerankers (models.base.Reranker): a relevance score per (query, document) pair.
    "cosine": "mmembed.models.cosine_rerank:CosineReranker",
    "cross-encoder": "mmembed.models.cross_encoder:CrossEncoderReranker",
    "qwen3vl-reranker": "mmembed.models.qwen3vl_reranker:Qwen3VLReranker",
}
INJECTED = {"cache_dir"}  # options the engine passes itself


def backend_class(family: str) -> type:
    try:
        target = FAMILIES[family]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"unknown backend family {family!r} (known: {known})") from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def is_reranker_family(family: str) -> bool:
    return getattr(backend_class(family), "task", None) == RERANK


def create_backend(family: str, options: dict[str, Any]) -> Backend:
    return backend_class(family)(**options)


def check_options(family: str, options: dict[str, Any]) -> None:
    """Raise ValueError naming each option the family does not take or that has the wrong
    type (by its annotation, else its default's type; None as default takes anything)."""
    cls = backend_class(family)
    params = {
        name: p
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve: fall back to the defaults
        hints = {}
    for name, value in options.items():
        if name in INJECTED:
            continue
        if name not in params:
            known = ", ".join(sorted(set(params) - INJECTED))
            raise ValueError(f"unknown option {name!r} for family {family!r} (known: {known})")
        if not _accepts(hints.get(name), params[name].default, value):
            raise ValueError(
                f"option {name!r} of family {family!r} must be {_describe(hints.get(name))}"
                f", not {type(value).__name__} ({value!r})"
            )


def _accepts(hint: Any, default: Any, value: Any) -> bool:
    """Whether ``value`` fits the parameter's annotation (or, without one, its default's
    type). Numbers are strict: a bool is no int, an int is a float."""
    if hint is None:
        if default is inspect.Parameter.empty or default is None:
            return True
        hint = type(default)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(h, None, value) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is Any:
        return True
    hint = origin or hint
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
