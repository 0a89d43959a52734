"""Hostile clients against a real server process on loopback: oversized echoes, slow clients,
shutdown with requests in flight, storage faults. The server must stay healthy throughout."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.conftest import API_KEY, EMBED_PATH, Server, start_server, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.network]

PLUS = "tongyi-embedding-vision-plus"


@pytest.fixture(scope="module")
def hserver(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("hardening")
    srv = start_server(tmp, {})
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.logs(), srv.logs()[-5000:]


def post_raw(server: Server, body: bytes, key: str = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(server.url + EMBED_PATH, content=body, headers=headers, timeout=60)


def test_a_10_mb_model_name_is_not_echoed(hserver: Server):
    before = len(hserver.logs())
    model = "m" * (10 * 1024 * 1024)
    body = b'{"model": "' + model.encode() + b'", "input": {"contents": ["hi"]}}'
    resp = post_raw(hserver, body)
    assert resp.status_code == 400, resp.text[:300]
    assert resp.json()["code"] == "InvalidParameter"
    assert "Model not exist" in resp.json()["message"]
    assert len(resp.content) < 1000
    new_lines = hserver.logs()[before:].splitlines()
    assert new_lines and max(map(len, new_lines)) < 1000
    # other echoed values: a huge dimension or fps value of the wrong type
    for params in ({"dimension": "d" * 1_000_000}, {"fps": "f" * 1_000_000}):
        resp = hserver.post({"model": PLUS, "input": {"contents": ["hi"]}, "parameters": params})
        assert resp.status_code == 400 and len(resp.content) < 1000, resp.text[:300]


def test_requests_in_flight_after_the_grace_period_get_503(tmp_path, origin):
    srv = start_server(
        tmp_path,
        {
            "MMEMBED_SHUTDOWN_GRACE_S": "1",
            "MMEMBED_FETCH_READ_TIMEOUT_S": "60",
            "MMEMBED_FETCH_TOTAL_TIMEOUT_S": "60",
        },
    )
    try:
        body = {"model": PLUS, "input": {"contents": [{"image": origin.url("/stall")}]}}
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(srv.post, body)
            time.sleep(1.0)  # let the request reach the stalled download (sequencing only)
            srv.proc.send_signal(signal.SIGTERM)
            resp = pending.result(timeout=60)
        assert resp.status_code == 503, resp.text
        assert resp.json()["code"] == "ServiceUnavailable"
        assert "shutting down" in resp.json()["message"]
        assert srv.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
        assert "Traceback" not in srv.logs(), srv.logs()[-3000:]
    finally:
        stop_server(srv)
