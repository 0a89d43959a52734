"""Stages overlap: a download that stalls never holds up other requests' inference."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.e2e.conftest import API_KEY, EMBED_PATH

pytestmark = [pytest.mark.slow, pytest.mark.network]


def test_stalled_download_does_not_block_text_requests(server, origin):
    stalled = {
        "model": "tongyi-embedding-vision-plus",
        "input": {"contents": [{"image": origin.url("/stall")}]},
    }
    text = {"model": "tongyi-embedding-vision-plus", "input": {"contents": ["a quick one"]}}
    done: dict[str, float] = {}

    async def go() -> tuple[httpx.Response, list[httpx.Response]]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as client:

            async def send(name: str, body: dict) -> httpx.Response:
                r = await client.post(EMBED_PATH, json=body)
                done[name] = time.monotonic()
                return r

            slow = asyncio.ensure_future(send("stalled", stalled))
            await asyncio.sleep(0.2)  # the stalled download is under way
            quick = await asyncio.gather(*(send(f"text{i}", text) for i in range(5)))
            return await slow, quick

    slow, quick = asyncio.run(go())
    assert slow.status_code == 408  # the stalled origin hits the fetch deadline
    assert all(r.status_code == 200 for r in quick)
    assert max(done[f"text{i}"] for i in range(5)) < done["stalled"]


def test_health_reports_batching(server):
    before = httpx.get(server.url + "/health").json()["batching"]["offline"]
    body = {"model": "tongyi-embedding-vision-flash", "input": {"contents": ["one", "two"]}}
    assert server.post(body).status_code == 200
    after = httpx.get(server.url + "/health").json()["batching"]["offline"]
    assert after["batches"] >= before["batches"] + 1
    assert after["inputs"] >= before["inputs"] + 2
    assert {"requests", "rejected", "mean_batch"} <= set(after)
