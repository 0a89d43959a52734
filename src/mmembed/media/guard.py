"""Which media URLs a fetch may reach: URL parsing, name resolution and the address guard.

The guard refuses every address that is not plainly public (loopback, private, link-local
including cloud metadata at 169.254.169.254, multicast, unspecified, reserved, shared/CGNAT,
documentation ranges...), for IPv4 and IPv6, including IPv6 forms that embed an IPv4 address
(IPv4-mapped, 6to4, NAT64). ``fetch_allow_hosts`` entries (hostnames, IPs or CIDRs) lift the
ban for the hosts or addresses they name.

URLs with userinfo (``http://user:pass@host/``) are refused, not stripped: credentials do not
belong in a media reference, and ``http://trusted@evil/`` is a classic way to mislead readers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import httpx

from mmembed.errors import ApiError, ErrorCode, echo

Resolver = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_URL_CHARS = 8192
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*")
# IPv6 prefixes that carry an IPv4 address (RFC 6052 NAT64) or are local-use translation space;
# Python's ipaddress calls some of them global, so they are handled explicitly.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


@dataclass(frozen=True)
class Target:
    """One parsed, normalised http(s) URL."""

    url: str  # normalised absolute URL (no fragment)
    scheme: str  # "http" or "https"
    host: str  # lowercase; IDNA (ASCII) for names; IPv6 without brackets
    port: int  # explicit or the scheme's default
    target: bytes  # request target: path and query

    @property
    def ip_literal(self) -> IPAddress | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    @property
    def host_header(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != _DEFAULT_PORTS[self.scheme]:
            host = f"{host}:{self.port}"
        return host.encode("ascii")


def short_url(url: str, limit: int = 120) -> str:
    """A URL cut down for error messages."""
    return url if len(url) <= limit else url[: limit - 3] + "..."


def parse_url(url: str) -> Target:
    """Parse an http(s) media URL; anything else is an InvalidURL error."""
    if len(url) > MAX_URL_CHARS:
        raise ApiError(ErrorCode.INVALID_URL, f"URL is longer than {MAX_URL_CHARS} characters")
    try:
        parsed = httpx.URL(url.strip())
        host = parsed.host
        raw_host = parsed.raw_host.decode("ascii")
        port = parsed.port
    except (httpx.InvalidURL, UnicodeError, ValueError, TypeError) as exc:
        raise ApiError(
            ErrorCode.INVALID_URL, f"malformed URL {short_url(url)!r}: {str(exc)[:200]}"
        ) from None
    scheme = parsed.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        shown = f"URL scheme {scheme!r}" if scheme else "a URL without a scheme"
        raise ApiError(
            ErrorCode.INVALID_URL,
            f"{shown} is not supported; media URLs must use http or https",
        )
    if not host:
        raise ApiError(ErrorCode.INVALID_URL, f"URL {short_url(url)!r} has no host")
    if parsed.userinfo:
        raise ApiError(
            ErrorCode.INVALID_URL, "URLs with credentials (user:password@host) are not accepted"
        )
    raw_host = raw_host.lower().rstrip(".")
    if not raw_host:
        raise ApiError(ErrorCode.INVALID_URL, f"URL {short_url(url)!r} has no host")
    if not _HOSTNAME.fullmatch(raw_host) and not _is_ip(raw_host):
        raise ApiError(ErrorCode.INVALID_URL, f"URL {short_url(url)!r} has an invalid host")
    if port is not None and not 0 < port < 65536:
        raise ApiError(ErrorCode.INVALID_URL, f"URL {short_url(url)!r} has an invalid port")
    target = parsed.raw_path or b"/"
    normalised = str(parsed.copy_with(fragment=None))
    return Target(normalised, scheme, raw_host, port or _DEFAULT_PORTS[scheme], target)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why a fetch may not reach ``ip`` by default, or None when it is a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return forbidden_reason(inner)  # the IPv6 form reaches the IPv4 address
        if ip in _NAT64_LOCAL:
            return "reserved"
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("non-public", not ip.is_global),
    )
    return next((name for name, hit in checks if hit), None)


def _plain(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 addresses compare as the IPv4 address they carry."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id:
            return ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    return ip


class AddressGuard:
    """Decides whether a host and its resolved addresses may be fetched from.

    An allowlist entry is a hostname, an IP or a CIDR, optionally with a port (``media.lan:9000``,
    ``10.0.0.0/8:443``, ``[::1]:8080``): with a port it allows that port only, which is what
    an internal media host needs; without one it allows every port of that host.
    """

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self._hosts: set[tuple[str, int | None]] = set()
        self._networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int | None]] = []
        for raw in allow:
            entry, port = split_port(raw.strip().lower())
            if not entry:
                continue
            try:
                self._networks.append((ipaddress.ip_network(entry, strict=False), port))
            except ValueError:
                self._hosts.add((entry.rstrip("."), port))

    def host_allowed(self, host: str, port: int | None = None) -> bool:
        """True when the allowlist names this hostname (all its addresses are then allowed),
        for every port or for ``port``."""
        host = host.lower().rstrip(".")
        return (host, None) in self._hosts or (port is not None and (host, port) in self._hosts)

    def ip_allowed(self, ip: IPAddress, port: int | None = None) -> bool:
        ip = _plain(ip)
        return any(
            ip.version == net.version and ip in net and (allowed is None or allowed == port)
            for net, allowed in self._networks
        )

    def check(self, host: str, addresses: Iterable[str], port: int | None = None) -> list[str]:
        """The addresses to connect to; InvalidURL if any of them is forbidden.

        One forbidden answer spoils the lot: a name that resolves to both a public and an
        internal address is treated as hostile rather than filtered.
        """
        allowed_host = self.host_allowed(host, port)
        result: list[str] = []
        for text in addresses:
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                raise ApiError(
                    ErrorCode.INVALID_URL, f"host {echo(host)} resolved to an invalid address"
                ) from None
            allowed = allowed_host or self.ip_allowed(ip, port)
            reason = None if allowed else forbidden_reason(ip)
            if reason:
                shown = f"address {host}" if _is_ip(host) else f"host {echo(host)} resolves to {ip}"
                raise ApiError(
                    ErrorCode.INVALID_URL,
                    f"{shown}, a {reason} address, which media URLs may not reach (an "
                    "operator can allow it with the setting fetch_allow_hosts: "
                    "--fetch-allow-hosts or MMEMBED_FETCH_ALLOW_HOSTS)",
                )
            result.append(str(_plain(ip)))
        if not result:
            raise ApiError(
                ErrorCode.INVALID_URL, f"host {echo(host)} did not resolve to any address"
            )
        return list(dict.fromkeys(result))

    async def resolve(self, target: Target, resolver: Resolver) -> list[str]:
        """Resolve ``target.host`` (unless it is an IP literal) and check every answer."""
        literal = target.ip_literal
        if literal is not None:
            return self.check(target.host, [str(literal)], target.port)
        try:
            addresses = await resolver(target.host, target.port)
        except ApiError:
            raise
        except Exception as exc:  # resolvers are pluggable; none of their failures is a 500
            raise ApiError(
                ErrorCode.INVALID_URL,
                f"could not resolve host {echo(target.host)}: {exc or type(exc).__name__}",
            ) from None
        if isinstance(addresses, str):
            addresses = [addresses]
        return self.check(target.host, addresses, target.port)


def split_port(entry: str) -> tuple[str, int | None]:
    """``host:port`` -> (host, port); a bare host, IP, CIDR or IPv6 address has no port."""
    if entry.startswith("["):  # [v6] or [v6/len], maybe with :port
        inner, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return inner, _port(port, entry) if port else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, _port(port, entry)
    return entry, None


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"allowlist entry {entry!r} has an invalid port")
    return int(text)


async def system_resolver(host: str, port: int) -> list[str]:
    """The operating system's resolver (getaddrinfo in a worker thread)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ApiError(
            ErrorCode.INVALID_URL, f"could not resolve host {echo(host)}: {exc.strerror}"
        ) from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))
