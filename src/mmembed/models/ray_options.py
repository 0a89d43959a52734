"""A backend's ``[backends.NAME.ray]`` table: how ``mmembed serve --ray`` deploys it on Ray
Serve (replicas or autoscaling, resources per replica). Checked when the catalog loads, so a
typo is an error there rather than a surprise at deploy time; plain ``mmembed serve`` ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class RayOptions:
    num_replicas: int = 1  # fixed replica count (without min/max_replicas)
    min_replicas: int | None = None  # min/max: autoscale between them
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0  # autoscaling target per replica
    num_cpus: float = 1.0  # per replica; its model threads follow it
    num_gpus: float = 0.0
    max_ongoing_requests: int | None = None  # None: the server's queue_max_items

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    def model_threads(self) -> int:
        """Threads a replica's model uses: its CPU share, at least one."""
        return max(1, int(self.num_cpus))


_INTS = {"num_replicas", "min_replicas", "max_replicas", "max_ongoing_requests"}


def parse_ray_options(raw: Any) -> RayOptions:
    """The checked options, or ValueError naming the offending key."""
    if not isinstance(raw, dict):
        raise ValueError("ray must be a table ([backends.NAME.ray])")
    known = {f.name for f in fields(RayOptions)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"ray: unknown keys {unknown} (known: {', '.join(sorted(known))})")
    for key, value in raw.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if key in _INTS and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ValueError(f"ray.{key} must be an integer, not {value!r}")
        if not number or value < 0:
            raise ValueError(f"ray.{key} must be a number >= 0, not {value!r}")
    opts = RayOptions(**raw)
    if opts.num_replicas < 1 or (opts.max_replicas is not None and opts.max_replicas < 1):
        raise ValueError("ray: a backend needs at least one replica")
    if opts.min_replicas == 0:  # (its replicas' reports are what tell the ingress it is up)
        raise ValueError("ray.min_replicas must be at least 1: scaling to zero is not supported")
    lo, hi = opts.min_replicas or 0, opts.max_replicas
    if hi is not None and lo > hi:
        raise ValueError(f"ray.min_replicas ({lo}) is above ray.max_replicas ({hi})")
    if opts.autoscaling and "num_replicas" in raw:
        raise ValueError("ray: give num_replicas or min_replicas/max_replicas, not both")
    if opts.target_ongoing_requests <= 0:
        raise ValueError("ray.target_ongoing_requests must be above 0")
    if opts.max_ongoing_requests is not None and opts.max_ongoing_requests < 1:
        raise ValueError("ray.max_ongoing_requests must be at least 1")
    return opts
