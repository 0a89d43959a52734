"""The playground at ``GET /``: hand-written static files shipped in the package (no build
step, no CDN), calling the public API from the browser."""

from __future__ import annotations

from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

INDEX_PATH = "/"
ASSET_PATH = "/web/{name}"
_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


@cache
def _read(name: str) -> bytes:
    return resources.files("mmembed.web").joinpath(name).read_bytes()


def _file(name: str) -> Response:
    if name not in _TYPES:  # only the known files: no path handling at all
        return Response("Not found", status_code=404, media_type="text/plain")
    return Response(_read(name), media_type=_TYPES[name], headers={"cache-control": "no-cache"})


async def index(request: Request) -> Response:
    return _file("index.html")


async def asset(request: Request) -> Response:
    return _file(request.path_params["name"])
