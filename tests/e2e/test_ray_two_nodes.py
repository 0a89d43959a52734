"""``mmembed serve --ray ADDRESS`` on the two-node loopback cluster: a backend with two
replicas, one GPU each (one declared GPU per node), gets one replica on each node; requests
are served through them with the plain server's vectors, and nothing leaves loopback (but
the listeners Ray Serve opens on every interface, see the test).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from mmembed.models.catalog import PACKAGED_PROFILES
from tests.e2e.conftest import API_KEY, EMBED_PATH, free_port
from tests.ray_cluster import node_table, non_loopback_sockets, start_cluster, stop_cluster

pytestmark = [pytest.mark.slow, pytest.mark.network]

MODEL, DIM = "tongyi-embedding-vision-plus", 256
# The offline profile, its backend deployed as two replicas of one GPU each.
REPLICAS = """
[backends.offline.ray]
num_replicas = 2
num_gpus = 1
num_cpus = 0.25
"""
PROXY_CALLBACK = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "mmembed.serving.proxy:middlewares"}


@pytest.fixture(scope="module")
def cluster():  # type: ignore[no-untyped-def]
    c = start_cluster(gpus=1, dashboard=True, node_env=PROXY_CALLBACK)
    try:
        yield c
    finally:
        stop_cluster(c)


@pytest.fixture(scope="module")
def served(cluster, tmp_path_factory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("serve-ray")
    catalog = tmp / "catalog.toml"
    catalog.write_text(Path(PACKAGED_PROFILES["offline"]).read_text() + REPLICAS)
    port = free_port()
    env = {
        **cluster.env,
        "MMEMBED_PORT": str(port),
        "MMEMBED_API_KEYS": API_KEY,
        "MMEMBED_CACHE_DIR": str(tmp / "cache"),
    }
    log = tmp / "serve.log"
    with log.open("wb") as out:
        cmd = [sys.executable, "-m", "mmembed.cli", "serve", "--ray", cluster.address]
        proc = subprocess.Popen([*cmd, "--catalog", str(catalog)], env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def replica_nodes(cluster) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    """Alive Serve replicas by deployment: the node id of each (Ray's state API, a driver)."""
    code = (
        "import json, sys; from ray.util.state import list_actors; "
        "actors = list_actors(address=sys.argv[1], filters=[('state', '=', 'ALIVE')], "
        "limit=1000); print(json.dumps([[a.class_name, a.node_id] for a in actors]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, cluster.dashboard],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, list[str]] = {}
    for class_name, node_id in json.loads(proc.stdout.strip().splitlines()[-1]):
        if class_name.startswith("ServeReplica:"):
            out.setdefault(class_name.rsplit(":", 1)[-1], []).append(node_id)
    return out


def test_replicas_on_both_nodes_and_requests_through_them(cluster, served, server):
    url, _ = served
    placed = replica_nodes(cluster)
    two = [nodes for nodes in placed.values() if len(nodes) == 2]
    assert len(two) == 1, placed  # the backend of two replicas
    node_ids = {n["NodeID"] for n in node_table(cluster)}
    assert set(two[0]) == node_ids, (placed, node_ids)  # one replica on each node

    body = {
        "model": MODEL,
        "input": {"contents": [{"text": f"a dog on a boat {n}"} for n in range(8)]},
        "parameters": {"dimension": DIM},
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    # Several requests at once, so both replicas take some (the ingress balances them).
    with httpx.Client(timeout=120) as client:
        answers = [client.post(url + EMBED_PATH, json=body, headers=headers) for _ in range(4)]
    want = server.post(body).json()["output"]["embeddings"]
    for r in answers:
        assert r.status_code == 200, r.text
        for got, exp in zip(r.json()["output"]["embeddings"], want, strict=True):
            a, b = np.asarray(got["embedding"]), np.asarray(exp["embedding"])
            assert float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) >= 0.9999
    # Ray Serve 2.60 gives every replica an inter-deployment gRPC server on [::]:0, whatever
    # the node's address (serve/_private/replica.py, _on_initialized); no setting changes it.
    # Everything else listens on, and every connection stays on, loopback.
    bad = non_loopback_sockets(cluster.pids())
    replica_listeners = [
        b for b in bad if b.startswith("tcp6 :::") and "(state 0A)" in b and "ServeReplica:" in b
    ]
    assert bad == replica_listeners, bad
    unauthorized = httpx.post(url + EMBED_PATH, json=body, timeout=60)
    assert unauthorized.status_code == 401
