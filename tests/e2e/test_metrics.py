"""``GET /metrics`` on a real server: parsed with prometheus_client's own parser, and every
counter moves with the traffic the test sends."""

from __future__ import annotations

import base64

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import API_KEY, EMBED_PATH
from tests.media_util import image_bytes

pytestmark = [pytest.mark.slow, pytest.mark.network]

PLUS = "tongyi-embedding-vision-plus"
FAMILIES = {
    "mmembed_requests": "counter",
    "mmembed_request_duration_seconds": "histogram",
    "mmembed_items": "counter",
    "mmembed_tokens": "counter",
    "mmembed_throttled_requests": "counter",
    "mmembed_backend_ready": "gauge",
    "mmembed_queue_depth": "gauge",
    "mmembed_forward_passes": "counter",
    "mmembed_queue_rejections": "counter",
    "mmembed_batch_size": "histogram",
    "mmembed_cache_hits": "counter",
    "mmembed_cache_misses": "counter",
    "mmembed_media_bytes": "counter",
    "mmembed_media_fetch_failures": "counter",
}


def scrape(server) -> tuple[dict[str, str], dict[tuple, float]]:
    r = httpx.get(server.url + "/metrics", timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    types, samples = {}, {}
    for family in text_string_to_metric_families(r.text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, *sorted(s.labels.items()))] = s.value
    return types, samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, *sorted(labels.items())), 0.0)


def test_metrics_exist_and_move_with_traffic(server, origin):
    from skimage import data

    png = image_bytes(data.astronaut(), "PNG")
    url = origin.serve("/metrics-astronaut.png", png, "image/png")
    _, before = scrape(server)

    headers = {"Authorization": f"Bearer {API_KEY}"}
    # DashScope route: two texts, then the same image twice (a cache miss, then a hit)
    assert server.post({"model": PLUS, "input": {"contents": ["a", "b"]}}).status_code == 200
    for _ in range(2):
        r = server.post({"model": PLUS, "input": {"contents": [{"image": url}]}})
        assert r.status_code == 200, r.text
    # OpenAI route: an image as a data: URI
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    r = httpx.post(
        server.url + "/v1/embeddings",
        json={"model": PLUS, "input": [{"image": uri}]},
        headers=headers,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    # an unknown model is labelled "other", never by its (unbounded) name
    assert server.post({"model": "no-such-model", "input": {"contents": ["x"]}}).status_code == 400
    # a media URL that cannot be fetched (refused port on loopback)
    bad = server.post(
        {"model": PLUS, "input": {"contents": [{"image": "http://127.0.0.1:9/x.png"}]}}
    )
    assert bad.status_code == 400

    types, after = scrape(server)
    for name, kind in FAMILIES.items():
        assert types.get(name) == kind, (name, types.get(name))

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("mmembed_requests_total", route=EMBED_PATH, model=PLUS, status="200") == 3
    assert delta("mmembed_requests_total", route="/v1/embeddings", model=PLUS, status="200") == 1
    assert delta("mmembed_requests_total", route=EMBED_PATH, model="other", status="400") == 1
    assert delta("mmembed_requests_total", route=EMBED_PATH, model=PLUS, status="400") == 1
    assert not any("no-such-model" in str(k) for k in after)
    assert delta("mmembed_request_duration_seconds_count", model=PLUS) == 5
    assert delta("mmembed_items_total", model=PLUS, kind="text") == 2
    assert delta("mmembed_items_total", model=PLUS, kind="image") == 3
    assert delta("mmembed_tokens_total", model=PLUS, kind="image") == 3 * 64
    assert delta("mmembed_tokens_total", model=PLUS, kind="text") > 0
    assert (
        delta("mmembed_cache_hits_total") >= 2
    )  # the URL image again, and the same bytes as data:
    assert delta("mmembed_cache_misses_total") >= 1
    assert delta("mmembed_media_bytes_total", source="url") == 2 * len(png)
    assert delta("mmembed_media_bytes_total", source="data") == len(png)
    assert delta("mmembed_media_fetch_failures_total", reason="InvalidURL") == 1
    assert value(after, "mmembed_backend_ready", backend="offline") == 1
    assert value(after, "mmembed_queue_depth", backend="offline") == 0
    assert delta("mmembed_forward_passes_total", backend="offline") >= 2
    passes = value(after, "mmembed_batch_size_count", backend="offline")
    assert passes == value(after, "mmembed_forward_passes_total", backend="offline")
    assert value(after, "mmembed_batch_size_bucket", backend="offline", le="+Inf") == passes
