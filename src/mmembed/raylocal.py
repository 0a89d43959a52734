"""Connecting to Ray, for ``mmembed embed --ray`` and ``mmembed serve --ray``.

``local`` starts a single-node cluster owned by this process, pinned to 127.0.0.1 and without
the dashboard: without the pin Ray advertises the machine's address and its processes talk over
it. Any other value is passed to ``ray.init(address=...)`` (an existing cluster).

Ray also swaps a loopback address for the machine's outward one (``resolve_ip_for_localhost``):
a driver would dial 127.0.0.1:P at that address, and a "local" node's servers would listen on
every interface. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when Ray is imported, keeps Ray's
own address at 127.0.0.1 in this process (it only forbids joining worker nodes, which a driver
never does), so it is set for ``local`` and loopback addresses before Ray is first imported.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import Any

from mmembed.extras import needs_extra

LOCAL = "local"
_SINGLE_HOST = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(address: str) -> bool:
    """Whether a Ray address (HOST:PORT, ray://HOST:PORT) names this machine's loopback."""
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare(address: str) -> None:
    """The environment for a driver of ``address`` (``local``: a cluster of its own). A value
    the user set wins; no effect once Ray is imported."""
    if address == LOCAL or is_loopback(address):
        os.environ.setdefault(_SINGLE_HOST, "0")
    if address == LOCAL:  # a cluster of our own: no usage report (nor its cloud probes)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def require_ray(command: str, *, serve: bool = False) -> Any:
    """The ``ray`` module, or an exit naming the extra that provides it."""
    try:
        import ray
        import ray.data

        if serve:
            import ray.serve
    except ImportError:
        raise SystemExit(needs_extra(command, "ray")) from None
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
    prepare(address)
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
