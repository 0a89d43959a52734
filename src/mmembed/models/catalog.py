"""The model catalog: which backend answers each API name, and that name's limits (TOML)."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

from mmembed.models.ray_options import RayOptions, parse_ray_options
from mmembed.models.registry import check_options, is_reranker_family

PACKAGED_PROFILES = {
    "offline": os.path.join(os.path.dirname(__file__), "offline.toml"),
    "open-weights": os.path.join(os.path.dirname(__file__), "open-weights.toml"),
}


EMBEDDING, RERANK = "embedding", "rerank"
TASKS = (EMBEDDING, RERANK)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    backend: str
    dimensions: tuple[int, ...] = ()
    task: str = EMBEDDING  # "rerank": served by the rerank routes, by a reranker family
    # rerank: query tokens x documents + document tokens, at most (0: no limit)
    max_request_tokens: int = 0
    text_only: bool = False  # images and videos are refused (the text embedding/rerank names)
    # the text-embedding API's text_type when a request sends none ("document", as hosted)
    default_text_type: str | None = None
    dimension_param: bool = True
    text_max_tokens: int = 512
    image_max_bytes: int = 3 * 1024 * 1024
    image_formats: frozenset[str] = frozenset({"JPEG", "PNG", "BMP"})
    video_max_bytes: int = 10 * 1024 * 1024
    video_formats: frozenset[str] = frozenset({"MP4", "AVI", "MOV"})
    multi_images: int = 0
    fused: bool = False
    max_elements: int = 0
    max_texts: int = 0
    max_images: int = 0
    max_videos: int = 0
    max_video_frames: int = 16
    image_tokens: int = 64
    aliases: tuple[str, ...] = ()  # other names clients use for it (e.g. dated snapshots)
    fuse_contents: bool = False  # the whole contents list gives one vector (qwen2.5-vl-embedding)
    price_text_per_mtok: float = 0.0  # USD per million text tokens (usage ledger)
    price_image_per_mtok: float = 0.0  # USD per million image/video tokens
    batch_price_ratio: float = 0.5  # batch jobs' price as a share of the online price

    @property
    def default_dimension(self) -> int:
        return self.dimensions[0]

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary for ``mmembed models`` and ``GET /models``."""
        if self.task == RERANK:
            return {
                "name": self.name,
                "task": self.task,
                "backend": self.backend,
                "text_max_tokens": self.text_max_tokens,
                "image": {"max_bytes": self.image_max_bytes, "formats": sorted(self.image_formats)},
                "video": {"max_bytes": self.video_max_bytes, "formats": sorted(self.video_formats)},
                "max_documents": {
                    "text": self.max_texts,
                    "image": self.max_images,
                    "video": self.max_videos,
                },
                "max_request_tokens": self.max_request_tokens,
            }
        return {
            "name": self.name,
            "task": self.task,
            "backend": self.backend,
            "dimensions": list(self.dimensions),
            "default_dimension": self.default_dimension,
            "text_max_tokens": self.text_max_tokens,
            "image": {"max_bytes": self.image_max_bytes, "formats": sorted(self.image_formats)},
            "video": {"max_bytes": self.video_max_bytes, "formats": sorted(self.video_formats)},
            "multi_images": self.multi_images,
            "fused": self.fused,
            "max_elements": self.max_elements,
        }


@dataclass(frozen=True)
class BackendSpec:
    name: str
    family: str
    options: dict[str, Any] = field(default_factory=dict)
    ray: RayOptions = field(default_factory=RayOptions)  # `mmembed serve --ray` only

    @property
    def embedder(self) -> str:
        """The catalog backend a reranker scores with (``cosine``'s ``backend`` option), or ""."""
        return str(self.options.get("backend") or "") if self.family == "cosine" else ""


_SNAPSHOT = re.compile(r"(?P<base>.+)-\d{4}-\d{2}-\d{2}")


@dataclass(frozen=True)
class Catalog:
    backends: dict[str, BackendSpec]
    models: dict[str, ModelSpec]
    source: str = ""
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> served name

    def get(self, name: str) -> ModelSpec | None:
        """The spec for a served name, one of its aliases, or a dated snapshot of either
        (``<name>-YYYY-MM-DD``, as the hosted service names its snapshots)."""
        spec = self.models.get(name) or self.models.get(self.aliases.get(name, ""))
        if spec is None and (m := _SNAPSHOT.fullmatch(name)) and m["base"] != name:
            return self.get(m["base"])
        return spec

    def host(self, backend: str) -> str:
        """The backend whose process (or Ray replica) serves BACKEND: a reranker that scores
        with an embedding backend's vectors runs beside that backend, which loads the model
        once; every other backend is its own host."""
        return self.backends[backend].embedder or backend


def load_catalog(path_or_profile: str = "") -> Catalog:
    """Read a catalog file; an empty name or a packaged profile name reads the packaged file."""
    path = PACKAGED_PROFILES.get(path_or_profile or "offline", path_or_profile)
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    return parse_catalog(raw, source=path)


def parse_catalog(raw: dict[str, Any], source: str = "") -> Catalog:
    backends = {}
    for name, body in raw.get("backends", {}).items():
        body = dict(body)
        if "family" not in body:
            raise ValueError(f"{source}: backends.{name} has no 'family'")
        family = body.pop("family")
        try:
            ray = parse_ray_options(body.pop("ray", {}))
            _check_common_options(body)
            check_options(family, body)  # typed per-family options: a typo is an error
        except ValueError as exc:
            raise ValueError(f"{source}: backends.{name}: {exc}") from None
        backends[name] = BackendSpec(name=name, family=family, options=body, ray=ray)

    for name, entry in backends.items():
        target = entry.options.get("backend") if entry.family == "cosine" else None
        if target is not None and (
            target not in backends or is_reranker_family(backends[target].family)
        ):
            raise ValueError(
                f"{source}: backends.{name}: backend {target!r} is not an embedding backend "
                "of this catalog"
            )
    known = {f.name for f in fields(ModelSpec)} - {"name"}
    models = {}
    for name, body in raw.get("models", {}).items():
        unknown = set(body) - known
        if unknown:
            raise ValueError(f"{source}: models.{name!r} has unknown keys {sorted(unknown)}")
        if body.get("backend") not in backends:
            raise ValueError(
                f"{source}: models.{name!r} names unknown backend {body.get('backend')!r}"
            )
        task = body.get("task", EMBEDDING)
        if task not in TASKS:
            raise ValueError(f"{source}: models.{name!r}: task must be one of {list(TASKS)}")
        reranker = is_reranker_family(backends[body["backend"]].family)
        if reranker != (task == RERANK):
            raise ValueError(
                f"{source}: models.{name!r} (task {task!r}) names backend {body['backend']!r}, "
                f"{'a reranker' if reranker else 'an embedding model'}"
            )
        if task == EMBEDDING and not body.get("dimensions"):
            raise ValueError(f"{source}: models.{name!r} lists no dimensions")
        values = dict(body)
        values["dimensions"] = tuple(int(d) for d in body.get("dimensions", ()))
        for key in ("image_formats", "video_formats"):
            if key in values:
                values[key] = frozenset(str(v).upper() for v in values[key])
        values["aliases"] = tuple(str(a) for a in body.get("aliases", ()))
        models[name] = ModelSpec(name=name, **values)
    if not models:
        raise ValueError(f"{source}: the catalog serves no models")
    aliases = {a: spec.name for spec in models.values() for a in spec.aliases}
    clash = sorted(set(aliases) & set(models))
    if clash:
        raise ValueError(f"{source}: aliases {clash} are also model names")
    return Catalog(backends=backends, models=models, source=source, aliases=aliases)


# Options several families share, checked when the catalog loads rather than at model load.
_CHOICES = {"long_text": ("truncate", "chunks")}


def _check_common_options(body: dict[str, Any]) -> None:
    for key, allowed in _CHOICES.items():
        if key in body and body[key] not in allowed:
            raise ValueError(f"{key} must be one of {list(allowed)}, not {body[key]!r}")
    if "revision" in body and not isinstance(body["revision"], str):
        raise ValueError("revision must be a string (a commit, tag or branch)")
