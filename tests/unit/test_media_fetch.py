"""Fetcher and address guard against a hostile loopback origin. Only loopback is ever dialled:
every other address in these tests must be refused by the guard before any connection."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from mmembed.config import Settings
from mmembed.errors import ApiError, ErrorCode
from mmembed.media.fetch import Fetcher
from mmembed.media.guard import AddressGuard, forbidden_reason, parse_url
from mmembed.media.image import decode_image
from mmembed.media.video import sample_video
from tests.media_util import IMAGE_FORMATS, VIDEO_FORMATS, HostileOrigin, make_image

pytestmark = pytest.mark.network

SETTINGS = Settings(
    fetch_connect_timeout_s=1.0,
    fetch_read_timeout_s=1.0,
    fetch_total_timeout_s=2.0,
    fetch_max_redirects=3,
    fetch_per_host_concurrency=8,
    fetch_allow_hosts=("127.0.0.1",),
)
MB = 1 << 20


@pytest.fixture(scope="module")
def origin() -> Iterator[HostileOrigin]:
    with HostileOrigin() as server:
        yield server


class Outcome:
    """What one load did: its bytes or error, the time taken, and every address dialled."""

    def __init__(self, data: bytes | None, error: ApiError | None, elapsed: float, dialled):
        self.data, self.error, self.elapsed, self.dialled = data, error, elapsed, dialled


def fetch(ref: str, *, settings: Settings = SETTINGS, max_bytes: int = MB, resolver=None):
    async def go() -> Outcome:
        fetcher = Fetcher(settings, resolver=resolver)
        start = time.monotonic()
        try:
            data, error = await fetcher.load(ref, max_bytes=max_bytes), None
        except ApiError as exc:
            data, error = None, exc
        elapsed = time.monotonic() - start
        await fetcher.aclose()
        return Outcome(data, error, elapsed, list(fetcher._backend.connected))

    return asyncio.run(go())


def expect_error(outcome: Outcome, code: ErrorCode, *fragments: str) -> ApiError:
    assert outcome.error is not None, f"expected {code.code}, got {len(outcome.data or b'')} bytes"
    assert outcome.error.error is code, outcome.error
    for fragment in fragments:
        assert fragment in outcome.error.message, outcome.error.message
    return outcome.error


# -- ordinary fetches ----------------------------------------------------------------------------
def test_fetches_an_image(origin: HostileOrigin) -> None:
    out = fetch(origin.url("/image.png"))
    assert out.data == make_image("PNG")
    assert out.dialled == [("127.0.0.1", origin.port)]


def test_relative_redirect_and_chain_within_limit(origin: HostileOrigin) -> None:
    assert fetch(origin.url("/redirect-relative")).data == make_image("PNG")
    assert fetch(origin.url("/redirect-chain/3")).data == make_image("PNG")


def test_declared_content_type_is_ignored(origin: HostileOrigin) -> None:
    """The decoder sniffs bytes; a PNG served as image/jpeg or text/html is still a PNG."""
    for path in ("/png-as-jpeg.jpg", "/image-as-html"):
        data = fetch(origin.url(path)).data
        assert data is not None
        with pytest.raises(ApiError) as info:
            decode_image(data, formats=["JPEG"], max_pixels=10**6)
        assert info.value.error is ErrorCode.DATA_INSPECTION
        assert "image format PNG is not supported by this model (accepted: JPEG)" in str(info.value)
        assert decode_image(data, formats=["PNG"], max_pixels=10**6).size == (64, 48)
    data = fetch(origin.url("/video-as-image.png")).data
    assert data is not None
    assert len(sample_video(data, fps=1, max_frames=4, formats=VIDEO_FORMATS).frames) == 2


def test_exact_byte_cap(origin: HostileOrigin) -> None:
    url = origin.serve("/exact", b"x" * 1000)
    assert fetch(url, max_bytes=1000).data == b"x" * 1000
    expect_error(fetch(url, max_bytes=999), ErrorCode.TOO_LARGE, "1000 bytes", "999 bytes")


def test_fetcher_survives_a_new_event_loop(origin: HostileOrigin) -> None:
    fetcher = Fetcher(SETTINGS)
    for _ in range(2):  # each asyncio.run is a fresh loop; pooled sockets must not leak across
        data = asyncio.run(fetcher.load(origin.url("/image.png"), max_bytes=MB))
        assert data == make_image("PNG")


# -- limits: size and time -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/big-with-length", "media is 8 MB (8388608 bytes), over the limit of 1 MB"),
        ("/big-without-length", "over the limit of 1 MB (1048576 bytes)"),
        ("/endless", "over the limit of 1 MB (1048576 bytes)"),
    ],
)
def test_oversized_bodies(origin: HostileOrigin, path: str, fragment: str) -> None:
    out = fetch(origin.url(path))
    expect_error(out, ErrorCode.TOO_LARGE, fragment)
    assert out.elapsed < 1.0


def test_lying_content_length_reads_only_the_declared_bytes(origin: HostileOrigin) -> None:
    assert fetch(origin.url("/lying-length")).data == b"\x00" * 100


@pytest.mark.parametrize(
    ("path", "fragment", "limit"),
    [
        ("/trickle", "took longer than 2 s", SETTINGS.fetch_total_timeout_s),
        ("/stall", "sent no data for 1 s", SETTINGS.fetch_read_timeout_s),
        ("/slow-headers", "sent no data for 1 s", SETTINGS.fetch_read_timeout_s),
    ],
)
def test_slow_origins_time_out(origin: HostileOrigin, path: str, fragment: str, limit) -> None:
    out = fetch(origin.url(path))
    expect_error(out, ErrorCode.REQUEST_TIMEOUT, fragment)
    assert limit - 0.1 <= out.elapsed < limit + 1.0


def test_per_host_concurrency_cap() -> None:
    settings = replace(SETTINGS, fetch_per_host_concurrency=2)
    with HostileOrigin() as origin:

        async def go() -> list[bytes]:
            fetcher = Fetcher(settings)
            try:
                urls = [origin.url("/hold")] * 6
                return await asyncio.gather(*(fetcher.load(u, max_bytes=MB) for u in urls))
            finally:
                await fetcher.aclose()

        start = time.monotonic()
        results = asyncio.run(go())
        assert all(r == make_image("PNG") for r in results)
        assert origin.max_active == 2
        assert time.monotonic() - start >= 0.85  # three waves of 0.3 s


# -- HTTP failures -------------------------------------------------------------------------------
def test_http_error_status(origin: HostileOrigin) -> None:
    expect_error(fetch(origin.url("/status/404")), ErrorCode.INVALID_URL, "answered HTTP 404")
    expect_error(fetch(origin.url("/status/500")), ErrorCode.INVALID_URL, "answered HTTP 500")


def test_redirect_limits(origin: HostileOrigin) -> None:
    expect_error(fetch(origin.url("/redirect-loop")), ErrorCode.INVALID_URL, "too many redirects")
    out = fetch(origin.url("/redirect-chain/4"))
    expect_error(out, ErrorCode.INVALID_URL, "too many redirects (more than 3)")
    none = replace(SETTINGS, fetch_max_redirects=0)
    expect_error(fetch(origin.url("/redirect-chain/1"), settings=none), ErrorCode.INVALID_URL)
    out = fetch(origin.url("/redirect-no-location"))
    expect_error(out, ErrorCode.INVALID_URL, "redirect without a Location")


def test_connection_refused() -> None:
    with HostileOrigin() as closed:
        url = closed.url("/image.png")
    expect_error(fetch(url), ErrorCode.INVALID_URL, "could not connect to 127.0.0.1")


# -- the address guard ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/redirect-metadata", "169.254.169.254, a link-local address"),
        ("/redirect-private", "10.0.0.1, a private address"),
        ("/redirect-file", "URL scheme 'file' is not supported"),
    ],
)
def test_redirects_are_checked_again(origin: HostileOrigin, path: str, fragment: str) -> None:
    out = fetch(origin.url(path))
    error = expect_error(out, ErrorCode.INVALID_URL, fragment)
    assert out.dialled == [("127.0.0.1", origin.port)]  # only the origin itself was contacted
    if path != "/redirect-file":
        assert "which media URLs may not reach" in error.message


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://10.0.0.1/a.png", "private"),
        ("http://192.168.1.10/a.png", "private"),
        ("http://172.16.5.4/a.png", "private"),
        ("http://100.64.0.1/a.png", "non-public"),
        ("http://0.0.0.0/a.png", "unspecified"),
        ("http://224.0.0.1/a.png", "multicast"),
        ("http://255.255.255.255/a.png", "private"),
        ("http://127.0.0.2/a.png", "loopback"),  # the allowlist names 127.0.0.1 only
        ("http://[::1]/a.png", "loopback"),
        ("http://[::]/a.png", "unspecified"),
        ("http://[fe80::1]/a.png", "link-local"),
        ("http://[fc00::1]/a.png", "private"),
        ("http://[ff02::1]/a.png", "multicast"),
        ("http://[::ffff:10.0.0.1]/a.png", "private"),
        ("http://[::ffff:169.254.169.254]/a.png", "link-local"),
        ("http://[2002:a00:1::]/a.png", "private"),
        ("http://[64:ff9b::a9fe:a9fe]/a.png", "link-local"),
    ],
)
def test_forbidden_addresses_are_never_dialled(url: str, reason: str) -> None:
    out = fetch(url)
    expect_error(out, ErrorCode.INVALID_URL, f"a {reason} address", "may not reach")
    assert out.dialled == []
    assert out.elapsed < 0.5


def test_loopback_is_refused_without_an_allowlist(origin: HostileOrigin) -> None:
    out = fetch(origin.url("/image.png"), settings=replace(SETTINGS, fetch_allow_hosts=()))
    expect_error(out, ErrorCode.INVALID_URL, "address 127.0.0.1, a loopback address")
    assert out.dialled == []


def _resolver(table: dict[str, list[str]], calls: list[str] | None = None):
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        return table[host]

    return resolve


def test_hostname_connects_to_the_checked_address(origin: HostileOrigin) -> None:
    resolver = _resolver({"media.test": ["127.0.0.1"]})
    out = fetch(origin.url("/echo-host", host="media.test"), resolver=resolver)
    assert out.data == f"media.test:{origin.port}".encode()  # Host header keeps the name
    assert out.dialled == [("127.0.0.1", origin.port)]


def test_hostname_resolving_to_private_is_refused_before_connecting(origin: HostileOrigin) -> None:
    resolver = _resolver({"evil.test": ["10.0.0.1"], "mixed.test": ["127.0.0.1", "10.0.0.1"]})
    for host in ("evil.test", "mixed.test"):
        out = fetch(origin.url("/image.png", host=host), resolver=resolver)
        expect_error(out, ErrorCode.INVALID_URL, f"host '{host}' resolves to 10.0.0.1")
        assert out.dialled == []


def test_dns_rebinding_cannot_switch_the_address(origin: HostileOrigin) -> None:
    """A resolver that answers loopback once and a private address afterwards: the connection
    must use the first (checked) answer; nothing may resolve the name a second time."""
    answers = iter([["127.0.0.1"], ["10.0.0.1"], ["10.0.0.1"]])
    calls: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return next(answers)

    out = fetch(origin.url("/image.png", host="rebind.test"), resolver=rebinding)
    assert out.data == make_image("PNG")
    assert calls == ["rebind.test"]
    assert out.dialled == [("127.0.0.1", origin.port)]


def test_redirect_to_a_hostname_resolving_inside_is_refused(origin: HostileOrigin) -> None:
    url = origin.redirect("/to-internal", "http://internal.test/secret")
    resolver = _resolver({"internal.test": ["192.168.0.1"]})
    out = fetch(url, resolver=resolver)
    expect_error(out, ErrorCode.INVALID_URL, "redirected to", "192.168.0.1, a private")
    assert out.dialled == [("127.0.0.1", origin.port)]


def test_allowlist_by_hostname_and_cidr(origin: HostileOrigin) -> None:
    by_name = replace(SETTINGS, fetch_allow_hosts=("intranet.test",))
    resolver = _resolver({"intranet.test": ["127.0.0.1"]})
    named = fetch(
        origin.url("/image.png", host="intranet.test"), settings=by_name, resolver=resolver
    )
    assert named.data == make_image("PNG")
    expect_error(fetch(origin.url("/image.png"), settings=by_name), ErrorCode.INVALID_URL)
    by_cidr = replace(SETTINGS, fetch_allow_hosts=("127.0.0.0/8",))
    assert fetch(origin.url("/image.png"), settings=by_cidr).data == make_image("PNG")


def test_allowlist_entries_with_a_port_allow_that_port_only(origin: HostileOrigin) -> None:
    for entry in (f"127.0.0.1:{origin.port}", f"127.0.0.0/8:{origin.port}"):
        allowed = replace(SETTINGS, fetch_allow_hosts=(entry,))
        assert fetch(origin.url("/image.png"), settings=allowed).data == make_image("PNG")
    other_port = origin.port + 1 if origin.port < 65535 else origin.port - 1
    for entry in (f"127.0.0.1:{other_port}", f"intranet.test:{other_port}"):
        refused = replace(SETTINGS, fetch_allow_hosts=(entry,))
        resolver = _resolver({"intranet.test": ["127.0.0.1"]})
        for host in ("127.0.0.1", "intranet.test"):
            out = fetch(origin.url("/image.png", host=host), settings=refused, resolver=resolver)
            expect_error(out, ErrorCode.INVALID_URL, "loopback")
            assert out.dialled == []
    named = replace(SETTINGS, fetch_allow_hosts=(f"intranet.test:{origin.port}",))
    resolver = _resolver({"intranet.test": ["127.0.0.1"]})
    out = fetch(origin.url("/image.png", host="intranet.test"), settings=named, resolver=resolver)
    assert out.data == make_image("PNG")


def test_resolver_failures_are_invalid_url(origin: HostileOrigin) -> None:
    out = fetch(origin.url("/image.png", host="nowhere.test"), resolver=_resolver({}))
    expect_error(out, ErrorCode.INVALID_URL, "could not resolve host 'nowhere.test'")
    out = fetch(origin.url("/image.png", host="empty.test"), resolver=_resolver({"empty.test": []}))
    expect_error(out, ErrorCode.INVALID_URL, "did not resolve to any address")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("file:///etc/passwd", "URL scheme 'file' is not supported"),
        ("ftp://example.com/a.png", "URL scheme 'ftp' is not supported"),
        ("gopher://127.0.0.1:70/", "URL scheme 'gopher' is not supported"),
        ("//example.com/a.png", "a URL without a scheme is not supported"),
        ("just words", "not supported"),
        ("http:///a.png", "has no host"),
        ("http://user:pw@127.0.0.1/a.png", "credentials"),
        ("http://127.0.0.1:99999/a.png", "invalid port"),
        ("http://exa mple.com/", "invalid host"),
        ("http://127.0.0.1\t/", "malformed URL"),
        ("http://a\\b/", "invalid host"),
        ("", "empty"),
        ("http://x/" + "a" * 9000, "longer than 8192"),
    ],
)
def test_malformed_urls(url: str, fragment: str) -> None:
    out = fetch(url)
    expect_error(out, ErrorCode.INVALID_URL, fragment)
    assert out.dialled == []


def test_guard_units() -> None:
    import ipaddress

    assert forbidden_reason(ipaddress.ip_address("8.8.8.8")) is None
    assert forbidden_reason(ipaddress.ip_address("2606:4700::1111")) is None
    assert forbidden_reason(ipaddress.ip_address("198.18.0.1")) == "private"
    guard = AddressGuard(["127.0.0.1", "Media.Test.", "10.1.0.0/16", " "])
    assert guard.check("x", ["::ffff:127.0.0.1"]) == ["127.0.0.1"]
    assert guard.check("media.test", ["10.9.9.9"]) == ["10.9.9.9"]
    assert guard.check("x", ["10.1.2.3", "8.8.8.8"]) == ["10.1.2.3", "8.8.8.8"]
    ported = AddressGuard(["[::1]:8080", "::2", "media.test:9000", "10.0.0.0/8:443"])
    assert ported.check("x", ["::1"], 8080) == ["::1"]
    assert ported.check("x", ["::2"], 1) == ["::2"]  # a bare IPv6 address has no port
    assert ported.check("media.test", ["10.9.9.9"], 9000) == ["10.9.9.9"]
    assert ported.check("x", ["10.9.9.9"], 443) == ["10.9.9.9"]
    for host, ip, port in (
        ("x", "::1", 8081),
        ("media.test", "10.9.9.9", 80),
        ("x", "10.1.1.1", 80),
    ):
        with pytest.raises(ApiError):
            ported.check(host, [ip], port)
    with pytest.raises(ValueError, match="invalid port"):
        AddressGuard(["media.test:http"])
    target = parse_url("HTTP://Example.COM:8080/a b?q=1#frag")
    assert (target.host, target.port, target.target) == ("example.com", 8080, b"/a%20b?q=1")
    assert target.host_header == b"example.com:8080"
    assert parse_url("https://bücher.example/").host == "xn--bcher-kva.example"
    assert parse_url("http://[::1]:81/").host_header == b"[::1]:81"


# -- data: URIs ----------------------------------------------------------------------------------
PNG = make_image("PNG")
B64 = base64.b64encode(PNG).decode()


@pytest.mark.parametrize(
    "uri",
    [
        f"data:image/png;base64,{B64}",
        f"DATA:image/png;BASE64,{B64}",
        "data:image/png;base64," + "\n".join(B64[i : i + 76] for i in range(0, len(B64), 76)),
        f"data:image/png;base64,{B64.rstrip('=')}",  # missing padding is tolerated
        f"data:;base64,{base64.urlsafe_b64encode(PNG).decode()}",
        f"data:image/png;base64,{B64.replace('+', '%2B').replace('/', '%2F')}",
    ],
)
def test_data_uris(uri: str) -> None:
    assert fetch(uri).data == PNG


def test_data_uri_without_base64_is_percent_decoded() -> None:
    assert fetch("data:text/plain,hello%20world").data == b"hello world"


@pytest.mark.parametrize(
    ("uri", "code", "fragment"),
    [
        ("data:image/png;base64,iVBOR!w0KGgo=", ErrorCode.INVALID_PARAMETER, "'!' at position 5"),
        ("data:image/png;base64,é", ErrorCode.INVALID_PARAMETER, "character 'é' at position 0"),
        (
            "data:image/png;base64,iVBORw0K\nGgoé=",
            ErrorCode.INVALID_PARAMETER,
            "'é' at position 12",
        ),
        ("data:image/png;base64,%C3%A9", ErrorCode.INVALID_PARAMETER, "invalid character"),
        ("data:image/png;base64,iVBORw0KG", ErrorCode.INVALID_PARAMETER, "wrong length"),
        ("data:image/png;base64,iV=BORw0", ErrorCode.INVALID_PARAMETER, "misplaced '='"),
        ("data:image/png;base64", ErrorCode.INVALID_PARAMETER, "no ',' before the data"),
        ("data:image/png;base64,", ErrorCode.INVALID_PARAMETER, "contains no data"),
        (f"data:image/png;base64,{B64}", ErrorCode.TOO_LARGE, "over the limit of 100 bytes"),
    ],
)
def test_bad_data_uris(uri: str, code: ErrorCode, fragment: str) -> None:
    out = fetch(uri, max_bytes=100 if code is ErrorCode.TOO_LARGE else MB)
    error = expect_error(out, code, fragment)
    if code is ErrorCode.INVALID_PARAMETER and "Base64" in error.message:
        assert error.message.startswith("malformed Base64 in data: URI")


def test_huge_data_uri_is_refused_before_decoding() -> None:
    uri = "data:video/mp4;base64," + "A" * (40 * MB)
    out = fetch(uri, max_bytes=10 * MB)
    expect_error(out, ErrorCode.TOO_LARGE, "30 MB", "over the limit of 10 MB")
    assert out.elapsed < 1.0


# -- hostile media through the whole path --------------------------------------------------------
def test_hostile_media_from_the_origin(origin: HostileOrigin) -> None:
    def image(path: str) -> ApiError:
        data = fetch(origin.url(path), max_bytes=5 * MB).data
        assert data is not None
        with pytest.raises(ApiError) as info:
            decode_image(data, formats=IMAGE_FORMATS, max_pixels=40_000_000)
        return info.value

    bomb = image("/bomb.png")
    assert bomb.error is ErrorCode.TOO_LARGE
    assert bomb.message == "image is 400000000 pixels, over the limit of 40000000 pixels"
    for path in ("/truncated.jpg", "/corrupt.jpg", "/empty"):
        assert image(path).error is ErrorCode.DATA_INSPECTION, path
    for path in ("/truncated.mp4", "/corrupt.mp4"):
        data = fetch(origin.url(path)).data
        assert data is not None
        with pytest.raises(ApiError) as info:
            sample_video(data, fps=1, max_frames=4, formats=VIDEO_FORMATS)
        assert info.value.error is ErrorCode.DATA_INSPECTION, path
        assert "could not be decoded as MP4" in info.value.message
