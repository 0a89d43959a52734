"""``mmembed serve --ray`` with ``ray_mode = colocated`` as a real process: a local Ray cluster on
127.0.0.1, no Serve proxy, each backend replica serving the app on the loopback port itself
(the offline backend, and a second backend at 2 replicas sharing the port).

The SDK's core cases run against it; errors and request ids are compared with plain ``mmembed
serve``; repeated media (and rerank documents) meet the replica that caches them; rerank
requests are answered as plain serve answers them; a batch job's lines reach the replicas (as
background work, also when handed to another replica); uploads cross replicas.
(A module of its own, so that its cluster does not run beside test_serve_ray's.)
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dashscope
import pytest

from mmembed.models.catalog import PACKAGED_PROFILES
from tests.e2e.conftest import Server
from tests.e2e.test_sdk import (  # noqa: F401  (the SDK's core cases, run against Serve)
    media,
    test_image_url,
    test_text,
)
from tests.e2e.test_serve_ray import (
    ERRORS,
    HASH,
    HASH_CATALOG,
    _is_loopback_hex,
    _sockets,
    _tcp,
    body,
    eventually,
    health,
    on_hash,
    plain_server,
    post,
    ray_server,
    settled,
    test_a_batch_job_runs_on_the_backend_replicas,  # noqa: F401
    test_repeated_rerank_documents_meet_the_replica_that_caches_them,  # noqa: F401
    test_rerank_is_answered_as_plain_serve_answers_it,  # noqa: F401
)
from tests.media_util import make_image
from tests.ray_cluster import process_tree

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.usefixtures("sdk")]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("serve-ray-colocated")
    catalog = tmp / "catalog.toml"
    offline = Path(PACKAGED_PROFILES["offline"]).read_text(encoding="utf-8")
    catalog.write_text(offline + HASH_CATALOG, encoding="utf-8")
    return {
        "MMEMBED_RAY_MODE": "colocated",
        "MMEMBED_FETCH_READ_TIMEOUT_S": "1.5",
        "MMEMBED_FETCH_TOTAL_TIMEOUT_S": "3",
        "MMEMBED_CATALOG": str(catalog),
        "MMEMBED_CACHE_DIR": str(tmp / "cache"),
        "MMEMBED_UPLOAD_DIR": str(tmp / "uploads"),
    }


@pytest.fixture(scope="module")
def server(shared, tmp_path_factory) -> Iterator[Server]:
    """``mmembed serve --ray`` colocated (overrides the session's plain server here)."""
    yield from ray_server(shared, tmp_path_factory, start_s=600)


@pytest.fixture(scope="module")
def plain(shared, server, tmp_path_factory) -> Iterator[Server]:
    yield from plain_server(shared, tmp_path_factory)


def replicas(srv: Server) -> list[dict]:
    """/health's replicas once all three have reported (each answer may come from another)."""

    def complete() -> list[dict] | None:
        listed = health(srv)["replicas"]
        return listed if len(listed) == 3 else None

    return eventually(complete, "3 replicas in /health")


def test_every_replica_serves_its_backend_and_the_port(server):
    listed = replicas(server)
    assert sorted(r["backend"] for r in listed) == ["hash", "hash", "offline"]
    assert {r["role"] for r in listed} == {"backend"}  # no ingress replicas: no extra hop
    assert len({r["pid"] for r in listed}) == 3 and all(r["status"] == "ready" for r in listed)
    h = health(server)
    # the rerankers run in the replicas of the backends they score with
    hosted = {"offline-rerank": "ready", "hash-rerank": "ready"}
    assert h["status"] == "ok" and h["backends"] == {"hash": "ready", "offline": "ready"} | hosted
    # both models answer whichever replica takes the connection (one connection per request)
    for model in (HASH, "tongyi-embedding-vision-plus"):
        for i in range(6):
            resp = post(server, body(model, [{"text": f"hello {i}"}]))
            assert resp.status_code == 200, resp.text
    assert "proxy 127.0.0.1" not in server.logs()  # Serve's proxy never started


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_are_those_of_plain_serve(server, plain, case):
    got, want = post(server, ERRORS[case]), post(plain, ERRORS[case])
    assert want.status_code == 400
    assert got.status_code == want.status_code
    g, w = got.json(), want.json()
    assert (g["code"], g["message"]) == (w["code"], w["message"])
    assert got.headers.get_list("x-request-id") == [g["request_id"]]


def test_request_ids_are_adopted_and_logged_by_the_replica(server):
    ok = post(server, body(HASH, [{"text": "hello"}]), **{"x-request-id": "coloc-7"})
    assert ok.status_code == 200 and ok.headers.get_list("x-request-id") == ["coloc-7"]
    assert ok.json()["request_id"] == "coloc-7"
    bad = post(server, ERRORS["bad image url"], **{"x-request-id": "coloc-find-me"})
    assert bad.status_code == 400 and bad.json()["request_id"] == "coloc-find-me"
    eventually(
        lambda: any(
            "coloc-find-me" in line and "ServeReplica:mmembed:backend-" in line
            for line in server.logs().splitlines()
        ),
        "a replica's log line with the request id",
    )


def test_repeated_media_meet_the_replica_that_caches_them(server):
    """Six images, three passes, a new connection per request (the kernel spreads them over
    the port's replicas): each image is embedded once in all, by one replica."""
    replicas(server)
    images = []
    for i in range(6):
        data = base64.b64encode(make_image("PNG", (60 + i, 44))).decode()
        images.append({"image": f"data:image/png;base64,{data}"})

    replicas(server)  # all three have reported
    seen = settled(server)  # and the hash replicas' counts are current on the board
    before_hits, before_entries = on_hash("cache_hits", seen), on_hash("cache_entries", seen)
    for _ in range(3):
        for image in images:
            resp = post(server, body(HASH, [image]))
            assert resp.status_code == 200, resp.text
            assert resp.json()["output"]["embeddings"][0]["type"] == "image"

    def counted() -> dict | None:
        h = health(server)
        return h if on_hash("cache_hits", h) >= before_hits + 12 else None

    h = eventually(counted, "12 more cache hits")
    assert on_hash("cache_hits", h) == before_hits + 12
    assert on_hash("cache_entries", h) == before_entries + 6  # each image once, not twice


def test_an_upload_crosses_replicas(server, tmp_path, shared):
    """The policy, the upload and the request may each meet another replica; the file is on
    the shared store, and the replica that embeds it reads it there."""
    for i in range(4):
        path = tmp_path / f"picture-{i}.png"
        path.write_bytes(make_image("PNG", (52 + i, 40)))
        resp = dashscope.MultiModalEmbedding.call(model=HASH, input=[{"image": path.as_uri()}])
        assert resp.status_code == 200, (resp.code, resp.message)
        assert resp.output["embeddings"][0]["type"] == "image"
    stored = [p for p in Path(shared["MMEMBED_UPLOAD_DIR"]).glob("*/*") if p.parent.name != "tmp"]
    assert len(stored) >= 4
    oss = eventually(
        lambda: sum(r["media_bytes"].get("oss", 0) for r in health(server)["replicas"]),
        "oss bytes read",
    )
    assert oss > 0


def test_the_replicas_listen_on_loopback_only(server):
    replicas(server)
    rows = _tcp(_sockets(process_tree(server.proc.pid)))
    connected = [r for r in rows if r[0] == "01"]
    assert connected and all(_is_loopback_hex(r[1]) and _is_loopback_hex(r[2]) for r in connected)
    port = int(server.url.rsplit(":", 1)[1])
    ours = [r for r in rows if r[0] == "0A" and r[3] == port]  # LISTEN on the service port
    assert len(ours) == 3 and all(_is_loopback_hex(r[1]) for r in ours)  # one per replica


def test_colocated_replicas_cannot_autoscale(tmp_path):
    catalog = tmp_path / "auto.toml"
    catalog.write_text(
        '[backends.h]\nfamily = "hash"\n[backends.h.ray]\nmin_replicas = 1\nmax_replicas = 2\n'
        '[models.m]\nbackend = "h"\ndimensions = [64]\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMEMBED_")}
    env |= {"MMEMBED_CACHE_DIR": str(tmp_path), "MMEMBED_CATALOG": str(catalog)}
    proc = subprocess.run(
        [sys.executable, "-m", "mmembed.cli", "serve", "--ray", "--ray-mode", "colocated"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "backend h: ray_mode colocated cannot autoscale" in proc.stderr
