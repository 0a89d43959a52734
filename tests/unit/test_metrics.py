"""Metrics on the ASGI app itself: one registry per app, statuses counted as clients saw them."""

from __future__ import annotations

import asyncio
import tempfile

import httpx
from prometheus_client.parser import text_string_to_metric_families

from mmembed.api.app import create_app
from mmembed.api.routes import EMBED_PATH
from mmembed.config import Settings
from tests.unit.test_app import BrokenEngine


def run(app, calls: list[tuple[str, str]]) -> dict[tuple, float]:
    async def go() -> str:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost"
            ) as client:
                for method, path in calls:
                    body = {"model": "m", "input": {"contents": ["x"]}}
                    await client.request(method, path, json=body if method == "POST" else None)
                return (await client.get("/metrics")).text

    samples = {}
    for family in text_string_to_metric_families(asyncio.run(go())):
        for s in family.samples:
            samples[(s.name, *sorted(s.labels.items()))] = s.value
    return samples


def isolated(**settings) -> Settings:  # type: ignore[no-untyped-def]
    """Settings that keep the app off ~/.cache (whose accounts database other processes on
    the machine may hold busy: a 503 instead of the engine's answer)."""
    return Settings(
        cache_dir=tempfile.mkdtemp(prefix="mmembed-metrics-"), database_url="none", **settings
    )


def requests(samples: dict, route: str, model: str, status: str) -> float:
    key = ("mmembed_requests_total", ("model", model), ("route", route), ("status", status))
    return samples.get(key, 0.0)


def test_throttled_and_crashed_requests_are_counted_per_app():
    throttling = create_app(isolated(), engine=BrokenEngine("throttle"))  # type: ignore[arg-type]
    crashing = create_app(isolated(), engine=BrokenEngine("bug"))  # type: ignore[arg-type]
    a = run(throttling, [("POST", EMBED_PATH)] * 3)
    b = run(crashing, [("POST", EMBED_PATH), ("GET", "/nowhere")])
    # the stand-in engine's catalog serves "m"
    assert requests(a, EMBED_PATH, "m", "429") == 3
    assert a[("mmembed_throttled_requests_total", ("model", "m"))] == 3
    assert requests(b, EMBED_PATH, "m", "500") == 1
    assert requests(b, "other", "none", "404") == 1  # unknown paths share one label
    assert requests(a, EMBED_PATH, "m", "500") == 0  # registries are not shared
    assert requests(b, EMBED_PATH, "m", "429") == 0


def test_metrics_can_be_switched_off():
    app = create_app(Settings(metrics=False), engine=BrokenEngine("bug"))  # type: ignore[arg-type]

    async def go() -> int:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost"
            ) as client:
                return (await client.get("/metrics")).status_code

    assert asyncio.run(go()) == 404


def _app_with_clock(**settings):  # type: ignore[no-untyped-def]
    app = create_app(isolated(**settings), engine=BrokenEngine("throttle"))  # type: ignore[arg-type]
    now = [100.0]
    app.state.metrics.clock = lambda: now[0]
    return app, now


def _scrapes(app, steps, headers=None):  # type: ignore[no-untyped-def]
    """Run ``steps`` (callables taking the client) in one app; the metrics texts they return."""

    async def go() -> list:
        out = []
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost"
            ) as client:
                for step in steps:
                    out.append(await step(client))
        return out

    return asyncio.run(go())


def test_scrapes_reuse_one_rendering_per_interval():
    """Issue 16, finding 9: a flood of scrapers costs one rendering per interval (clock
    injected); traffic shows up once the interval has passed."""
    app, now = _app_with_clock(metrics_interval_ms=1000.0)
    body = {"model": "m", "input": {"contents": ["x"]}}

    async def scrape(client):  # type: ignore[no-untyped-def]
        r = await client.get("/metrics")
        assert r.status_code == 200
        return r.text

    async def embed(client):  # type: ignore[no-untyped-def]
        return (await client.post(EMBED_PATH, json=body)).status_code

    async def tick(client):  # type: ignore[no-untyped-def]
        now[0] += 1.0
        return None

    out = _scrapes(app, [scrape, embed, *[scrape] * 20, tick, scrape])
    first, status, *cached, _, fresh = out
    assert status == 429
    assert all(text == first for text in cached)  # the 429 is not in them: not rendered again
    assert app.state.metrics.renders == 2
    assert 'route="/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"' in fresh
    assert 'status="429"' in fresh and 'status="429"' not in first


def test_metrics_keys_close_the_route():
    app, _ = _app_with_clock(metrics_keys=("scrape-1", "scrape-2"), metrics_interval_ms=0.0)

    def get(headers):  # type: ignore[no-untyped-def]
        async def step(client):  # type: ignore[no-untyped-def]
            return await client.get("/metrics", headers=headers)

        return step

    answers = _scrapes(
        app,
        [
            get({}),
            get({"Authorization": "Bearer wrong"}),
            get({"Authorization": "scrape-1"}),
            get({"Authorization": "Bearer scrape-2"}),
            get({"Authorization": "Bearer scrape-1"}),
        ],
    )
    assert [r.status_code for r in answers] == [401, 401, 401, 200, 200]
    assert answers[0].json()["code"] == "InvalidApiKey"
    assert "mmembed_requests_total" in answers[-1].text
    assert app.state.metrics.renders == 2  # refused scrapes render nothing
