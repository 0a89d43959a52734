"""Metrics on the ASGI app itself: one registry per app, statuses counted as clients saw them."""

from __future__ import annotations

import asyncio

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


def requests(samples: dict, route: str, model: str, status: str) -> float:
    key = ("mmembed_requests_total", ("model", model), ("route", route), ("status", status))
    return samples.get(key, 0.0)


def test_throttled_and_crashed_requests_are_counted_per_app():
    throttling = create_app(Settings(), engine=BrokenEngine("throttle"))  # type: ignore[arg-type]
    crashing = create_app(Settings(), engine=BrokenEngine("bug"))  # type: ignore[arg-type]
    a = run(throttling, [("POST", EMBED_PATH)] * 3)
    b = run(crashing, [("POST", EMBED_PATH), ("GET", "/nowhere")])
    # the stand-in engine has no catalog: its model name is not a served one
    assert requests(a, EMBED_PATH, "other", "429") == 3
    assert a[("mmembed_throttled_requests_total", ("model", "other"))] == 3
    assert requests(b, EMBED_PATH, "other", "500") == 1
    assert requests(b, "other", "none", "404") == 1  # unknown paths share one label
    assert requests(a, EMBED_PATH, "other", "500") == 0  # registries are not shared
    assert requests(b, EMBED_PATH, "other", "429") == 0


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
