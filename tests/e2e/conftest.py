"""End-to-end fixtures: a real `mmembed serve` process on loopback, and a loopback origin that
serves media the tests generate."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.media_util import HostileOrigin

API_KEY = "test-key-1"
V1_ONLY_KEY = "test-key-v1-only"  # may use multimodal-embedding-v1 and nothing else
EMBED_PATH = "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    @property
    def api_base(self) -> str:
        return f"{self.url}/api/v1"

    def post(self, body: dict, key: str | None = API_KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        kw.setdefault("timeout", 60)
        return httpx.post(self.url + EMBED_PATH, json=body, headers=headers, **kw)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(
    tmp: Path, env_extra: dict[str, str], args: tuple[str, ...] = (), start_s: float = 180
) -> Server:
    port = free_port()
    log = tmp / "server.log"
    env = {
        **os.environ,
        "MMEMBED_PORT": str(port),
        "MMEMBED_API_KEYS": f"{API_KEY},{V1_ONLY_KEY}:multimodal-embedding-v1",
        "MMEMBED_FETCH_ALLOW_HOSTS": "127.0.0.1",
        "MMEMBED_CACHE_DIR": str(tmp / "cache"),
        **env_extra,
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmembed.cli", "serve", *args], env=env, stdout=out, stderr=out
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + start_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.logs()}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{server.logs()}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(15)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The offline default model behind all four API names, with short fetch timeouts."""
    tmp = tmp_path_factory.mktemp("server")
    srv = start_server(
        tmp,
        {
            "MMEMBED_MAX_BODY_BYTES": str(8 * 1024 * 1024),
            "MMEMBED_FETCH_READ_TIMEOUT_S": "1.5",
            "MMEMBED_FETCH_TOTAL_TIMEOUT_S": "3",
            "MMEMBED_METRICS_INTERVAL_MS": "0",  # test_metrics compares scrapes around traffic
        },
    )
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.logs(), srv.logs()


@pytest.fixture(scope="session")
def origin() -> Iterator[HostileOrigin]:
    """Serves generated media (``origin.serve(path, bytes, type)``) and misbehaving routes."""
    with HostileOrigin(trickle_interval=0.5) as o:
        yield o


@pytest.fixture
def sdk(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the dashscope SDK at the module's ``server`` (a module may define its own)."""
    import dashscope

    monkeypatch.setattr(dashscope, "base_http_api_url", server.api_base)
    monkeypatch.setattr(dashscope, "api_key", API_KEY)
