"""Media end to end through a real server process: every listed image and video format under a
model that accepts it, each model's unsupported formats refused, and a hostile origin that must
end every request in the right 4xx within the fetch timeouts, with the server healthy and its
memory bounded afterwards. (Rows already in test_errors.py are not repeated here.)"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_errors import expect, req
from tests.media_util import IMAGE_FORMATS, VIDEO_FORMATS, make_image, make_video

pytestmark = [pytest.mark.slow, pytest.mark.network]

PLUS, FLASH, QWEN = (
    "tongyi-embedding-vision-plus",
    "tongyi-embedding-vision-flash",
    "qwen3-vl-embedding",
)
IMAGES = {
    QWEN: set(IMAGE_FORMATS),
    PLUS: {"JPEG", "PNG", "BMP"},
    FLASH: {"JPEG", "PNG", "BMP"},
}
VIDEOS = {QWEN: {"MP4", "AVI", "MOV"}, PLUS: set(VIDEO_FORMATS), FLASH: set(VIDEO_FORMATS)}
DIMS = {QWEN: 2560, PLUS: 1152, FLASH: 768}
# the test server: 1.5 s between bytes, 3 s per download; every case must end before this
DEADLINE_S = 3 + 1


@pytest.fixture(scope="module")
def media_url(origin):
    def url(kind: str, fmt: str) -> str:
        data = make_image(fmt) if kind == "image" else make_video(fmt, seconds=2.0)
        return origin.serve(f"/formats/{kind}.{fmt.lower()}", data)  # untyped on purpose

    return url


# -- every format --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "fmt"), [(m, f) for m in (QWEN, PLUS, FLASH) for f in IMAGE_FORMATS if f in IMAGES[m]]
)
def test_image_format_is_embedded(server, media_url, model, fmt):
    r = server.post(req(model, [{"image": media_url("image", fmt)}]))
    assert r.status_code == 200, r.json()
    (emb,) = r.json()["output"]["embeddings"]
    assert emb["type"] == "image" and len(emb["embedding"]) == DIMS[model]
    assert r.json()["usage"]["image_count"] == 1


@pytest.mark.parametrize(
    ("model", "fmt"), [(m, f) for m in (QWEN, PLUS) for f in VIDEO_FORMATS if f in VIDEOS[m]]
)
def test_video_format_is_embedded(server, media_url, model, fmt):
    r = server.post(req(model, [{"video": media_url("video", fmt)}], fps=1.0))
    assert r.status_code == 200, r.json()
    (emb,) = r.json()["output"]["embeddings"]
    assert emb["type"] == "video" and len(emb["embedding"]) == DIMS[model]
    assert r.json()["usage"]["duration"] == 2


@pytest.mark.parametrize(
    ("model", "fmt"),
    [
        (m, f)
        for m in (PLUS, FLASH)
        for f in IMAGE_FORMATS
        if f not in IMAGES[m] and (m, f) != (PLUS, "WEBP")  # (PLUS, WEBP): test_errors.py
    ],
)
def test_unsupported_image_format_is_refused(server, media_url, model, fmt):
    expect(
        server.post(req(model, [{"image": media_url("image", fmt)}])),
        400,
        "InvalidParameter.DataInspection",
        "input.contents[0].image",
        f"image format {fmt} is not supported",
    )


@pytest.mark.parametrize("fmt", [f for f in VIDEO_FORMATS if f not in VIDEOS[QWEN]])
def test_unsupported_video_format_is_refused(server, media_url, fmt):
    named = "MPEG" if fmt == "MPG" else fmt  # MPG is a file extension of the MPEG container
    expect(
        server.post(req(QWEN, [{"video": media_url("video", fmt)}])),
        400,
        "InvalidParameter.DataInspection",
        "input.contents[0].video",
        f"video format {named} is not supported",
    )


# -- the hostile origin --------------------------------------------------------------------------
# (path, item kind, model, HTTP status, code, message fragment)
HOSTILE = [
    ("/endless", "image", PLUS, 413, "BadRequest.TooLarge", "over the limit"),
    ("/big-with-length", "image", PLUS, 413, "BadRequest.TooLarge", "over the limit"),
    ("/big-without-length", "image", PLUS, 413, "BadRequest.TooLarge", "over the limit"),
    ("/lying-length", "image", PLUS, 400, "InvalidParameter.DataInspection", "not an image"),
    ("/redirect-loop", "image", PLUS, 400, "InvalidURL", "too many redirects"),
    ("/redirect-chain/5", "image", PLUS, 400, "InvalidURL", "too many redirects"),
    ("/redirect-metadata", "image", PLUS, 400, "InvalidURL", "link-local"),
    ("/redirect-private", "image", PLUS, 400, "InvalidURL", "private"),
    ("/redirect-file", "image", PLUS, 400, "InvalidURL", "'file' is not supported"),
    ("/redirect-no-location", "image", PLUS, 400, "InvalidURL", "without a Location"),
    ("/status/500", "image", PLUS, 400, "InvalidURL", "HTTP 500"),
    ("/empty", "image", PLUS, 400, "InvalidParameter.DataInspection", "empty"),
    ("/bomb.png", "image", QWEN, 413, "BadRequest.TooLarge", "pixels"),
    ("/corrupt.jpg", "image", PLUS, 400, "InvalidParameter.DataInspection", "JPEG"),
    ("/truncated.jpg", "image", PLUS, 400, "InvalidParameter.DataInspection", "JPEG"),
    ("/corrupt.mp4", "video", PLUS, 400, "InvalidParameter.DataInspection", "MP4"),
    ("/truncated.mp4", "video", PLUS, 400, "InvalidParameter.DataInspection", "MP4"),
    ("/video-as-image.png", "image", PLUS, 400, "InvalidParameter.DataInspection", "not an image"),
]
SLOW = [  # each takes a timeout to end (test_errors.py covers /stall)
    ("/trickle", "image", PLUS, 408, "RequestTimeOut", "longer than 3 s"),
    ("/slow-headers", "image", PLUS, 408, "RequestTimeOut", "no data for 1.5 s"),
]


def hostile(server, origin, path: str, kind: str, model: str, host: str = "127.0.0.1"):
    started = time.monotonic()
    r = server.post(req(model, ["context", {kind: origin.url(path, host)}]), timeout=30)
    return r, time.monotonic() - started


@pytest.mark.parametrize(("path", "kind", "model", "status", "code", "fragment"), HOSTILE + SLOW)
def test_hostile_origin(server, origin, path, kind, model, status, code, fragment):
    r, took = hostile(server, origin, path, kind, model)
    expect(r, status, code, f"input.contents[1].{kind}", fragment)
    assert took < DEADLINE_S, (path, took)


@pytest.mark.parametrize(
    ("path", "kind"),
    [("/png-as-jpeg.jpg", "image"), ("/image-as-html", "image"), ("/video-as-image.png", "video")],
)
def test_declared_types_are_ignored(server, origin, path, kind):
    r, _ = hostile(server, origin, path, kind, PLUS)
    assert r.status_code == 200, r.json()
    assert r.json()["output"]["embeddings"][1]["type"] == kind


def test_redirects_within_the_limit_are_followed(server, origin):
    r, _ = hostile(server, origin, "/redirect-chain/3", "image", PLUS)
    assert r.status_code == 200, r.json()


@pytest.mark.parametrize(
    ("host", "reason"),
    [("127.0.0.2", "loopback"), ("[::1]", "loopback"), ("0.0.0.0", "unspecified")],
)
def test_allowlist_is_exact(server, origin, host, reason):
    # MMEMBED_FETCH_ALLOW_HOSTS=127.0.0.1 opens that one address, not loopback as a whole
    r, took = hostile(server, origin, "/image.png", "image", PLUS, host=host)
    expect(r, 400, "InvalidURL", reason)
    assert took < DEADLINE_S


def test_localhost_by_name(server, origin):
    """The allowlist names 127.0.0.1 (an address), so a name is allowed only when every address
    it resolves to is allowlisted; one other loopback answer (e.g. ::1) refuses the name."""
    answers = {info[4][0] for info in socket.getaddrinfo("localhost", origin.port)}
    r, took = hostile(server, origin, "/image.png", "image", PLUS, host="localhost")
    assert took < DEADLINE_S
    if answers == {"127.0.0.1"}:
        assert r.status_code == 200, r.json()
    else:
        expect(r, 400, "InvalidURL", "localhost")


# -- healthy and bounded afterwards --------------------------------------------------------------
def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_memory_stays_bounded_under_hostile_load(server, origin):
    cases = [(path, kind, model) for path, kind, model, *_ in HOSTILE]

    def round_() -> list[int]:
        with ThreadPoolExecutor(6) as pool:
            results = pool.map(lambda c: hostile(server, origin, *c)[0].status_code, cases)
            return list(results)

    round_()  # warm-up: decoders, pools and arenas reach their working size
    before = rss_mb(server.proc.pid)
    for _ in range(3):
        statuses = round_()
        assert all(400 <= s < 500 for s in statuses), statuses
    after = rss_mb(server.proc.pid)
    assert after - before < 150, (before, after)
    health = httpx.get(server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and server.proc.poll() is None
