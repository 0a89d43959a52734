"""Hostile clients against a real server process on loopback: oversized echoes, slow clients,
shutdown with requests in flight, storage faults. The server must stay healthy throughout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import API_KEY, EMBED_PATH, Server, start_server, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.network]

PLUS = "tongyi-embedding-vision-plus"
GUARD_ENV = {
    "MMEMBED_HEADER_TIMEOUT_S": "2",
    # Longer than the header timeout: a request answered before its body ended (401) must not
    # get the next request's header deadline meanwhile (test_a_paused_body_is_dropped).
    "MMEMBED_BODY_TIMEOUT_S": "3",
    "MMEMBED_MAX_HEADER_BYTES": "16384",
    "MMEMBED_MAX_CONNECTIONS": "64",
    "MMEMBED_MAX_CONNECTIONS_PER_CLIENT": "8",
}


def mount_tiny_disk(path: Path, size: str) -> bool:
    """A small tmpfs at ``path`` (root only), so the upload disk can really fill up."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    return done.returncode == 0


@pytest.fixture(scope="module")
def hserver(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("hardening")
    uploads = tmp / "uploads"
    tiny_disk = mount_tiny_disk(uploads, "4m")
    try:
        srv = start_server(tmp, {**GUARD_ENV, "MMEMBED_UPLOAD_DIR": str(uploads)})
        srv.tiny_disk = tiny_disk  # type: ignore[attr-defined]
        srv.upload_dir = uploads  # type: ignore[attr-defined]
        yield srv
        stop_server(srv)
    finally:
        if tiny_disk:
            subprocess.run(["umount", "-l", str(uploads)])
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


# -- slow and greedy clients (attackers come from other loopback addresses than the tests) ------
def connect(server: Server, source: str) -> socket.socket:
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a socket it never closes times out)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


PARTIAL = b"POST " + EMBED_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: app"


def embed_once(server: Server, source: str) -> bytes:
    """One short text over a raw socket from ``source``; the whole answer."""
    body = b'{"model": "%s", "input": {"contents": ["a cat"]}}' % PLUS.encode()
    with connect(server, source) as sock:
        sock.sendall(
            b"POST " + EMBED_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        return read_all(sock)


def test_half_sent_requests_are_dropped_after_the_header_timeout(hserver: Server):
    attackers = [connect(hserver, f"127.0.0.{2 + i % 5}") for i in range(40)]  # 8 per address
    try:
        for n, sock in enumerate(attackers):
            if n % 2:  # half of them send part of a request, the others nothing at all
                sock.sendall(PARTIAL)
        # meanwhile a normal client is served
        assert embed_once(hserver, "127.0.0.1").startswith(b"HTTP/1.1 200")
        answers = [read_all(sock) for sock in attackers]  # each must be closed by the server
    finally:
        for sock in attackers:
            sock.close()
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"code":"RequestTimeOut"' in answer
    assert hserver.post({"model": PLUS, "input": {"contents": ["still here"]}}).status_code == 200


def test_a_paused_body_is_dropped(hserver: Server):
    head = (
        b"POST " + EMBED_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
        b"Content-Type: application/json\r\n"
    )
    with connect(hserver, "127.0.0.7") as sock:
        sock.sendall(head + b"Authorization: Bearer " + API_KEY.encode() + b'\r\n\r\n{"m')
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b"body paused" in answer, answer[:300]
    assert answer.count(b"HTTP/1.1") == 1
    with connect(hserver, "127.0.0.7") as sock:  # no key: 401 at once, then closed all the same
        sock.sendall(head + b'\r\n{"m')
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 401") and answer.count(b"HTTP/1.1") == 1, answer[:300]
    with connect(hserver, "127.0.0.7") as sock:  # ... and when the body does end after the 401,
        sock.sendall(head + b'\r\n{"m')  # the next request's headers get their deadline
        first = sock.recv(65536)  # the 401's head at least (its body may come in a later segment)
        assert first.startswith(b"HTTP/1.1 401"), first[:300]
        sock.sendall(b"x" * 997)
        answer = first + read_all(sock)
    answers = [b"HTTP/1.1 " + part for part in answer.split(b"HTTP/1.1 ")[1:]]
    assert [a[9:12] for a in answers] == [b"401", b"408"], answer[:600]
    assert b"headers took longer" in answers[1], answers[1][:300]


def test_endless_headers_are_cut_off(hserver: Server):
    with connect(hserver, "127.0.0.8") as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(64):
                sock.sendall(b"X-Padding: " + b"p" * 1000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on us, as it should be
        try:
            answer = read_all(sock)
        except ConnectionResetError:
            answer = b"reset"
    assert answer.startswith(b"HTTP/1.1 431") or answer == b"reset", answer[:200]


def test_connection_caps_per_client_and_in_all(hserver: Server):
    mine = [connect(hserver, "127.0.0.9") for _ in range(8)]  # the per-address cap
    try:
        with connect(hserver, "127.0.0.9") as extra:
            answer = read_all(extra)
        assert answer.startswith(b"HTTP/1.1 429") and b"Throttling" in answer, answer[:200]
        # another address is still served while this one is at its cap
        assert embed_once(hserver, "127.0.0.10").startswith(b"HTTP/1.1 200")
        # fill the server's cap (64) from more addresses: the next connection gets 503
        others = [connect(hserver, f"127.0.1.{i // 8}") for i in range(56)]
        try:
            time.sleep(0.5)  # let the server accept them all (sequencing only)
            with connect(hserver, "127.0.2.1") as extra:
                answer = read_all(extra)
            assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        finally:
            for sock in others:
                sock.close()
    finally:
        for sock in mine:
            sock.close()
    time.sleep(0.5)  # the server sees the closes (sequencing only)
    assert embed_once(hserver, "127.0.0.1").startswith(b"HTTP/1.1 200")


# -- storage faults ------------------------------------------------------------------------------
def upload(server: Server, data: bytes) -> httpx.Response:
    """The SDK's upload: a policy for our key, then the multipart form to the upload host."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    policy = httpx.get(
        server.api_base + "/uploads", params={"action": "getPolicy", "model": PLUS}, headers=auth
    )
    assert policy.status_code == 200, policy.text
    info = policy.json()["data"]
    form = {
        "OSSAccessKeyId": info["oss_access_key_id"],
        "Signature": info["signature"],
        "policy": info["policy"],
        "key": f"{info['upload_dir']}/photo.png",
    }
    return httpx.post(info["upload_host"], data=form, files={"file": ("photo.png", data)})


def test_a_full_upload_disk_is_a_clear_503_and_health_says_so(hserver: Server):
    if not hserver.tiny_disk:  # type: ignore[attr-defined]
        if os.environ.get("CI"):
            pytest.fail("CI runs as root and must be able to mount a small tmpfs")
        pytest.skip("needs root to mount a small tmpfs as the upload disk")
    filler = hserver.upload_dir / "filler"  # type: ignore[attr-defined]
    free = os.statvfs(hserver.upload_dir).f_bavail * os.statvfs(hserver.upload_dir).f_frsize  # type: ignore[attr-defined]
    filler.write_bytes(b"\0" * (free - 200 * 1024))  # leave 200 KB
    try:
        resp = upload(hserver, os.urandom(1024 * 1024))
        assert resp.status_code == 503, resp.text
        body = resp.json()
        assert body["code"] == "ServiceUnavailable" and "upload store is full" in body["message"]
        assert str(hserver.upload_dir) not in resp.text  # type: ignore[attr-defined]
        health = httpx.get(hserver.url + "/health").json()
        assert health["status"] == "degraded"
        assert health["uploads"] == "unavailable: the upload disk is full"
    finally:
        filler.unlink()
    assert httpx.get(hserver.url + "/health").json()["uploads"] == "ok"
    assert upload(hserver, os.urandom(100 * 1024)).status_code == 200
    assert not list((hserver.upload_dir / "tmp").iterdir())  # type: ignore[attr-defined]
