"""Address checks shared by the CLI and the accounts layer."""

from __future__ import annotations

import ipaddress
import socket


def is_loopback_bind(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)
