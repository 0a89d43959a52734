"""Keeping a Ray driver on loopback when its cluster is: call ``prepare(address)`` before Ray
is first imported (``mmembed embed --ray``; ``mmembed serve --ray`` should do the same).

Ray swaps 127.0.0.1 (and "localhost") for the machine's outward address -- the source address
of a route to 8.8.8.8 -- both as the address a driver dials and as a new node's own address
(``services.resolve_ip_for_localhost``). So ``ray.init(address="127.0.0.1:P")`` dials e.g.
192.0.2.2:P and never reaches a cluster that listens on loopback only (scripts/ray-cluster),
and ``ray.init(address="local", _node_ip_address="127.0.0.1")`` starts a node on the outward
address whose servers listen on every interface (they keep to loopback only when the node's
address is exactly 127.0.0.1). RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ("no multi-node", read when
Ray is imported) makes Ray's own address 127.0.0.1 and so stops the swap in this process; it
only forbids starting worker nodes (`ray start --address`), which a driver never does.
"""

from __future__ import annotations

import ipaddress
import os

LOCAL = "local"


def is_loopback(address: str) -> bool:
    """Whether a Ray address (HOST:PORT, ray://HOST:PORT) names this machine's loopback."""
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare(address: str) -> None:
    """Set the environment for a driver of ``address`` (``local``: a cluster of its own). A
    value the user set wins; no effect once Ray is imported."""
    if address == LOCAL or is_loopback(address):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address == LOCAL:
        # A cluster of our own sends no usage report, and so probes no cloud metadata address.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
