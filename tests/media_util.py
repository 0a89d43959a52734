"""Shared test helpers: generated media in every supported format, and a hostile loopback origin.

Media generators return bytes and are cached (call them freely). Images use a quadrant pattern
(top-left red, top-right green, bottom-left blue, bottom-right yellow) so tests can check
orientation; video frames show their index as binary stripes (see ``frame_index``).

``HostileOrigin`` is a threaded HTTP/1.1 server on 127.0.0.1 (random port) with routes that
misbehave in the ways a media fetcher must survive; ``serve()`` adds arbitrary bytes at a path.
Use it as a context manager::

    with HostileOrigin() as origin:
        url = origin.url("/image.png")
        origin.serve("/cat.jpg", jpeg_bytes, "image/jpeg")
"""

from __future__ import annotations

import functools
import io
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import numpy as np
from PIL import Image

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "ICO", "DIB", "ICNS", "SGI")
VIDEO_FORMATS = ("MP4", "MPEG", "MPG", "AVI", "MOV", "WEBM", "FLV", "MKV")

RED, GREEN, BLUE, YELLOW, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255,) * 3
QUADRANTS = (RED, GREEN, BLUE, YELLOW)  # top-left, top-right, bottom-left, bottom-right


# -- images --------------------------------------------------------------------------------------
def quadrant_image(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    width, height = size
    arr = np.zeros((height, width, 3), np.uint8)
    arr[: height // 2, : width // 2] = RED
    arr[: height // 2, width // 2 :] = GREEN
    arr[height // 2 :, : width // 2] = BLUE
    arr[height // 2 :, width // 2 :] = YELLOW
    image = Image.fromarray(arr)
    return image if mode == "RGB" else image.convert(mode)


@functools.cache
def make_image(fmt: str, size: tuple[int, int] = (64, 48), **save: object) -> bytes:
    """A quadrant image saved as ``fmt`` (any Pillow writer name; ICNS is always 1024 px)."""
    image = quadrant_image(size)
    options: dict[str, object] = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    if fmt == "ICO":
        options = {"sizes": [size]}
    options.update(save)
    return encode(image, fmt, **options)


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def image_bytes(pixels: np.ndarray | Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    """Encode an HxWx3 (or HxW) uint8 array or a PIL image as ``fmt`` (e.g. "PNG", "JPEG")."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.asarray(pixels))
    fmt = {"JPG": "JPEG", "TIF": "TIFF"}.get(fmt.upper(), fmt.upper())
    if fmt == "JPEG" and image.mode not in {"RGB", "L", "CMYK"}:
        image = image.convert("RGB")
    return encode(image, fmt, **options)


def exif_rotated_jpeg(orientation: int = 6, size: tuple[int, int] = (64, 48)) -> bytes:
    """A quadrant JPEG whose EXIF orientation tag says how to display it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(quadrant_image(size), "JPEG", quality=95, exif=exif.tobytes())


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` zero pixels; 20000 x 20000 is ~50 KB."""
    return _png_bomb(width, height)


@functools.cache
def _png_bomb(width: int, height: int) -> bytes:
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    chunks = [compressor.compress(row) for _ in range(height)]
    idat = b"".join(chunks) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND")


def _chunk(kind: bytes, body: bytes = b"") -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: max(1, int(len(data) * keep))]


def corrupted(data: bytes, start: int = 64, length: int | None = None) -> bytes:
    """``data`` with a run of bytes after the header overwritten by a fixed noise pattern."""
    length = length if length is not None else len(data) // 2
    rng = np.random.default_rng(1234)
    noise = rng.integers(0, 256, size=max(0, min(length, len(data) - start)), dtype=np.uint8)
    return data[:start] + noise.tobytes() + data[start + len(noise) :]


# -- videos --------------------------------------------------------------------------------------
# container name -> (PyAV muxer, encoder); MPEG and MPG are the same program stream.
VIDEO_RECIPES: dict[str, tuple[str, str]] = {
    "MP4": ("mp4", "libx264"),
    "MOV": ("mov", "mpeg4"),
    "AVI": ("avi", "mpeg4"),
    "MPEG": ("mpeg", "mpeg1video"),
    "MPG": ("mpeg", "mpeg2video"),
    "WEBM": ("webm", "libvpx"),
    "FLV": ("flv", "flv"),
    "MKV": ("matroska", "mpeg4"),
}
INDEX_BITS = 8  # frame i shows i in binary as 8 vertical stripes, most significant bit left
_DARK, _LIGHT = 40, 215


def index_frame(index: int, size: tuple[int, int]) -> np.ndarray:
    """An RGB frame showing ``index`` as stripes (robust to lossy codecs and downscaling)."""
    width, height = size
    arr = np.full((height, width, 3), _DARK, np.uint8)
    for bit in range(INDEX_BITS):
        if index >> (INDEX_BITS - 1 - bit) & 1:
            arr[:, bit * width // INDEX_BITS : (bit + 1) * width // INDEX_BITS] = _LIGHT
    return arr


def frame_index(image: Image.Image) -> int:
    """The index shown by a frame of a generated video (see ``index_frame``)."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    width = grey.shape[1]
    index = 0
    for bit in range(INDEX_BITS):
        lo, hi = bit * width // INDEX_BITS, (bit + 1) * width // INDEX_BITS
        stripe = grey[:, lo + (hi - lo) // 4 : hi - (hi - lo) // 4]  # stay off the edges
        index = index << 1 | int(stripe.mean() > (_DARK + _LIGHT) / 2)
    return index


@functools.cache
def make_video(
    fmt: str = "MP4",
    *,
    seconds: float = 2.0,
    rate: int = 25,
    size: tuple[int, int] = (64, 48),
    gop: int | None = None,
    audio: bool = False,
    video: bool = True,
    pattern: str = "level",
) -> bytes:
    """A small video in ``fmt`` whose frame i shows i (``frame_index`` reads it back).

    ``pattern="noise"`` paints random frames instead (hard to compress: realistic decode cost).
    ``video=False, audio=True`` gives an audio-only file.
    """
    muxer, codec = VIDEO_RECIPES[fmt]
    buf = io.BytesIO()
    with av.open(buf, "w", format=muxer) as out:
        vstream = _add_video(out, codec, rate, size, gop) if video else None
        astream = out.add_stream("aac", rate=16000) if audio else None
        frames = round(seconds * rate)
        rng = np.random.default_rng(7)
        width, height = size
        for i in range(frames):
            if vstream is not None:
                if pattern == "noise":
                    arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                else:
                    arr = index_frame(i % (1 << INDEX_BITS), size)
                frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
                frame.pts = i
                frame.time_base = Fraction(1, rate)
                out.mux(vstream.encode(frame))
        if astream is not None:
            _write_silence(out, astream, seconds)
        if vstream is not None:
            out.mux(vstream.encode(None))
    return buf.getvalue()


def video_bytes(*, seconds: float = 2.0, container: str = "mp4", **kwargs: object) -> bytes:
    """``make_video`` by container name in any case ("mp4", "mkv", "mpg"...)."""
    return make_video(container.upper(), seconds=seconds, **kwargs)  # type: ignore[arg-type]


def _add_video(
    out: av.container.OutputContainer, codec: str, rate: int, size: tuple[int, int], gop: int | None
) -> av.video.stream.VideoStream:
    stream = out.add_stream(codec, rate=rate)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.codec_context.gop_size = gop or rate  # a keyframe per second: seekable
    if codec == "libx264":
        stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
    if codec == "libvpx":
        stream.options = {"deadline": "realtime", "cpu-used": "8"}
        stream.bit_rate = 500_000
    return stream


def _write_silence(
    out: av.container.OutputContainer, stream: av.stream.Stream, seconds: float
) -> None:
    rate = 16000
    samples = 1024
    for i in range(int(seconds * rate / samples)):
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, samples), np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate = rate
        frame.pts = i * samples
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


# -- hostile origin ------------------------------------------------------------------------------
Handler = Callable[["_RequestHandler"], None]


class _QuietServer(ThreadingHTTPServer):
    """Clients hanging up mid-body is what these tests provoke: no traceback for that."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class HostileOrigin:
    """A loopback HTTP server whose routes misbehave on purpose (see ``_default_routes``)."""

    def __init__(self, *, trickle_interval: float = 0.25) -> None:
        self.trickle_interval = trickle_interval
        self.routes: dict[str, Handler] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, headers) as received
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        # Bound now (so URLs are known before start), served from start() to stop().
        self._server = _QuietServer(("127.0.0.1", 0), _RequestHandler)
        self._server.daemon_threads = True
        self._server.origin = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None
        self._default_routes()

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> HostileOrigin:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        assert self._thread is None, "already started"
        self._thread = threading.Thread(
            target=self._server.serve_forever, daemon=True, kwargs={"poll_interval": 0.05}
        )
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def paths(self) -> list[str]:
        with self._lock:
            return [path for path, _ in self.requests]

    # -- routes -----------------------------------------------------------------------------------
    def route(self, path: str, handler: Handler) -> None:
        self.routes[path] = handler

    def serve(
        self,
        path: str,
        body: bytes,
        content_type: str = "application/octet-stream",
        *,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Serve fixed bytes at ``path``; returns the full URL."""

        def handler(h: _RequestHandler) -> None:
            h.reply(status, body, content_type, headers)

        self.routes[path] = handler
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        def handler(h: _RequestHandler) -> None:
            h.reply(status, b"", "text/plain", {"Location": location})

        self.routes[path] = handler
        return self.url(path)

    def _default_routes(self) -> None:
        png, jpeg = make_image("PNG"), make_image("JPEG")
        self.serve("/image.png", png, "image/png")
        self.serve("/image.jpg", jpeg, "image/jpeg")
        self.serve("/video.mp4", make_video("MP4"), "video/mp4")
        # declared types that lie: the decoder must sniff the bytes
        self.serve("/png-as-jpeg.jpg", png, "image/jpeg")
        self.serve("/image-as-html", png, "text/html")
        self.serve("/video-as-image.png", make_video("MP4"), "image/png")
        self.serve("/bomb.png", png_bomb(), "image/png")
        self.serve("/corrupt.jpg", corrupted(jpeg, start=200), "image/jpeg")
        self.serve("/truncated.jpg", truncated(jpeg), "image/jpeg")
        self.serve("/corrupt.mp4", corrupted(make_video("MP4"), start=40), "video/mp4")
        self.serve("/truncated.mp4", truncated(make_video("MP4")), "video/mp4")
        self.serve("/empty", b"", "image/png")
        self.serve("/status/404", b"not here", "text/plain", status=404)
        self.serve("/status/500", b"oops", "text/plain", status=500)
        self.redirect("/redirect-loop", "/redirect-loop")
        self.redirect("/redirect-relative", "image.png", 301)
        self.redirect("/redirect-metadata", "http://169.254.169.254/latest/meta-data/")
        self.redirect("/redirect-private", "http://10.0.0.1/image.png", 307)
        self.redirect("/redirect-file", "file:///etc/passwd")
        self.route("/redirect-no-location", lambda h: h.reply(302, b"", "text/plain"))
        for n in range(1, 6):
            nxt = f"/redirect-chain/{n - 1}" if n > 1 else "/image.png"
            self.redirect(f"/redirect-chain/{n}", nxt)
        self.route("/endless", _endless)
        self.route("/big-with-length", _big_with_length)
        self.route("/big-without-length", _big_without_length)
        self.route("/lying-length", _lying_length)
        self.route("/trickle", _trickle)
        self.route("/stall", _stall)
        self.route("/slow-headers", _slow_headers)
        self.route("/hold", _hold)
        self.route(
            "/echo-host", lambda h: h.reply(200, h.headers.get("Host", "").encode(), "text/plain")
        )


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    @property
    def origin(self) -> HostileOrigin:
        return self.server.origin  # type: ignore[attr-defined, no-any-return]

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        return

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        with self.origin._lock:
            self.origin.requests.append((path, dict(self.headers.items())))
        handler = self.origin.routes.get(path)
        try:
            if handler is None:
                self.reply(404, b"no such route", "text/plain")
            else:
                handler(self)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True  # the client gave up on us: that is the point

    def reply(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def start_body(
        self, content_type: str = "application/octet-stream", length: int | None = None
    ) -> None:
        """Headers for a streamed body; without a length the body ends when we close."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if length is None:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def pour(self, total: int, chunk: int = 64 * 1024) -> None:
        """Write ``total`` bytes of zeros (or forever when total < 0) until the client leaves."""
        block = b"\x00" * chunk
        sent = 0
        deadline = time.monotonic() + 30  # never outlive a broken test by much
        while (total < 0 or sent < total) and not self.origin.stopping.is_set():
            if time.monotonic() > deadline:
                break
            n = chunk if total < 0 else min(chunk, total - sent)
            self.wfile.write(block[:n])
            sent += n


BIG = 8 * 1024 * 1024  # bigger than any cap the tests set


def _endless(h: _RequestHandler) -> None:
    h.start_body("image/png")
    h.pour(-1)


def _big_with_length(h: _RequestHandler) -> None:
    h.start_body("image/png", BIG)
    h.pour(BIG)


def _big_without_length(h: _RequestHandler) -> None:
    h.start_body("image/png")
    h.pour(BIG)


def _lying_length(h: _RequestHandler) -> None:
    """Claims a small body, then keeps sending: the byte count must not trust the header."""
    h.start_body("image/png", 100)
    h.pour(BIG)


def _trickle(h: _RequestHandler) -> None:
    """One byte per interval, forever: never trips a read timeout, only the total one."""
    h.start_body("image/png")
    while not h.origin.stopping.wait(h.origin.trickle_interval):
        h.wfile.write(b"\x00")
        h.wfile.flush()


def _stall(h: _RequestHandler) -> None:
    """Headers and a little body, then silence: the read timeout must fire."""
    h.start_body("image/png", 1000)
    h.wfile.write(b"\x89PNG")
    h.wfile.flush()
    h.origin.stopping.wait(30)


def _slow_headers(h: _RequestHandler) -> None:
    """Accepts the connection, then sends nothing at all."""
    h.origin.stopping.wait(30)
    h.close_connection = True


def _hold(h: _RequestHandler) -> None:
    """Holds each request 0.3 s and records how many were in flight at once."""
    origin = h.origin
    with origin._lock:
        origin.active += 1
        origin.max_active = max(origin.max_active, origin.active)
    try:
        origin.stopping.wait(0.3)
    finally:
        with origin._lock:
            origin.active -= 1
    h.reply(200, make_image("PNG"), "image/png")


@contextmanager
def hostile_origin(**kwargs: object) -> Iterator[HostileOrigin]:
    """``with hostile_origin() as origin:`` — the same as ``with HostileOrigin() as origin``."""
    with HostileOrigin(**kwargs) as origin:  # type: ignore[arg-type]
        yield origin
