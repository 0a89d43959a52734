"""Connecting to Ray, for ``mmembed embed --ray`` and ``mmembed serve --ray``.

``local`` starts a single-node cluster owned by this process, pinned to 127.0.0.1 and without
the dashboard: without the pin Ray advertises the machine's address and its processes talk over
it. Any other value is passed to ``ray.init(address=...)`` (an existing cluster).
"""

from __future__ import annotations

import logging
import os
from typing import Any

LOCAL = "local"


def require_ray(command: str, *, serve: bool = False) -> Any:
    """The ``ray`` module, or an exit naming the extra that provides it."""
    try:
        import ray
        import ray.data

        if serve:
            import ray.serve
    except ImportError:
        raise SystemExit(f"{command} needs the [ray] extra: pip install 'mmembed[ray]'") from None
    return ray


def start_ray(
    address: str,
    num_cpus: int | None = None,
    *,
    command: str = "mmembed --ray",
    namespace: str | None = None,
    serve: bool = False,
) -> Any:
    """Connect this process to Ray (see the module doc); a no-op when it already is."""
    ray = require_ray(command, serve=serve)
    if ray.is_initialized():
        return ray
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address == LOCAL:
        # address="local": always a new cluster, never one that happens to run on this machine
        # (RAY_ADDRESS, or the last one started here).
        ray.init(
            address=LOCAL,
            num_cpus=num_cpus or os.cpu_count() or 1,
            _node_ip_address="127.0.0.1",
            namespace=namespace,
            **quiet,
        )
    else:
        ray.init(address=address, namespace=namespace, logging_level=logging.WARNING)
    return ray
