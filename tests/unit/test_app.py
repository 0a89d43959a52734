"""The ASGI app's error handling, with engines that misbehave on purpose."""

from __future__ import annotations

import asyncio
import tempfile

import httpx

from mmembed.api.app import create_app
from mmembed.api.routes import EMBED_PATH
from mmembed.config import Settings
from mmembed.errors import ApiError, ErrorCode
from mmembed.models.catalog import parse_catalog


class BrokenEngine:
    """Stands in for the engine: raises a programming error, or stalls past the deadline."""

    catalog = parse_catalog(
        {
            "backends": {"broken": {"family": "hash"}},
            "models": {"m": {"backend": "broken", "dimensions": [8]}},
        }
    )

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def load(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def status(self) -> dict[str, str]:
        if self.mode == "unavailable":
            return {"broken": "failed: OSError: [Errno 2] No such file: '/srv/weights/secret-x'"}
        return {"broken": "ready"}

    async def embed(self, req, ctx=None):
        if self.mode == "unavailable":
            raise ApiError(
                ErrorCode.MODEL_UNAVAILABLE, f"Model m is not available here ({self.status()})."
            )
        if self.mode == "stall":
            await asyncio.sleep(30)
        if self.mode == "throttle":
            raise ApiError(ErrorCode.THROTTLING, "busy", headers={"Retry-After": "1"})
        raise RuntimeError("a bug, not the client's fault")


def post(engine: BrokenEngine, **settings) -> tuple[int, dict, dict]:
    settings.setdefault("cache_dir", tempfile.mkdtemp(prefix="mmembed-app-"))
    app = create_app(Settings(**settings), engine=engine)  # type: ignore[arg-type]

    async def go() -> httpx.Response:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost"
            ) as client:
                body = {"model": "m", "input": {"contents": ["x"]}}
                return await client.post(EMBED_PATH, json=body)

    r = asyncio.run(go())
    return r.status_code, r.json(), dict(r.headers)


def test_unexpected_exception_is_a_dashscope_500_with_request_id():
    status, body, headers = post(BrokenEngine("bug"))
    assert status == 500
    assert body["code"] == "InternalError"
    assert "a bug" not in body["message"]  # internals stay in the log
    assert body["request_id"] == headers["x-request-id"]


def test_request_deadline_gives_408():
    status, body, _ = post(BrokenEngine("stall"), request_timeout_s=0.2)
    assert (status, body["code"]) == (408, "RequestTimeOut")


def test_error_headers_pass_through():
    status, body, headers = post(BrokenEngine("throttle"))
    assert (status, body["code"], headers["retry-after"]) == (429, "Throttling", "1")


def get(engine: BrokenEngine, path: str, **settings) -> tuple[int, dict]:
    settings.setdefault("cache_dir", tempfile.mkdtemp(prefix="mmembed-app-"))
    app = create_app(Settings(**settings), engine=engine)  # type: ignore[arg-type]

    async def go() -> httpx.Response:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost"
            ) as client:
                return await client.get(path)

    r = asyncio.run(go())
    return r.status_code, r.json()


def test_503_messages_and_health_show_no_file_paths():
    status, body, _ = post(BrokenEngine("unavailable"))
    assert (status, body["code"]) == (503, "ModelUnavailable")
    assert "/srv/weights" not in body["message"] and "<path>" in body["message"]
    status, body = get(BrokenEngine("unavailable"), "/health")
    assert body["status"] == "degraded"
    assert "/srv" not in str(body) and "<path>" in body["backends"]["broken"]


def test_health_tells_when_uploads_cannot_work(tmp_path):
    status, body = get(BrokenEngine("bug"), "/health", cache_dir=str(tmp_path / "ok"))
    assert (body["status"], body["uploads"]) == ("ok", "ok")
    (tmp_path / "bad" / "uploads" / ".secret").mkdir(parents=True)  # unreadable as a file
    status, body = get(BrokenEngine("bug"), "/health", cache_dir=str(tmp_path / "bad"))
    assert status == 200 and body["status"] == "degraded"
    assert body["uploads"].startswith("unavailable: uploads are unavailable: the upload signing")
    assert str(tmp_path) not in str(body)
