"""Backend families by name, imported lazily so only the family in use pays its imports.

A family's options are the keyword parameters of its class's ``__init__``; their defaults give
their types. ``check_options`` holds a catalog's options to that when the catalog loads, so a
misspelt or mistyped option is an error instead of being silently ignored.
"""

from __future__ import annotations

import importlib
import inspect
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
INJECTED = {"cache_dir"}  # options the engine passes itself


def backend_class(family: str) -> type:
    try:
        target = FAMILIES[family]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"unknown backend family {family!r} (known: {known})") from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def create_backend(family: str, options: dict[str, Any]) -> Backend:
    return backend_class(family)(**options)


def check_options(family: str, options: dict[str, Any]) -> None:
    """Raise ValueError naming each option the family does not take or that has the wrong
    type (by its default's type; an option defaulting to None takes anything)."""
    params = {
        name: p
        for name, p in inspect.signature(backend_class(family).__init__).parameters.items()
        if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    for name, value in options.items():
        if name in INJECTED:
            continue
        if name not in params:
            known = ", ".join(sorted(set(params) - INJECTED))
            raise ValueError(f"unknown option {name!r} for family {family!r} (known: {known})")
        default = params[name].default
        if default is inspect.Parameter.empty or default is None:
            continue
        expected = type(default)
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ValueError(
                f"option {name!r} of family {family!r} must be {expected.__name__}, "
                f"not {type(value).__name__} ({value!r})"
            )
