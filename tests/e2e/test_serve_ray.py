"""``mmembed serve --ray`` as a real process: a local Ray cluster on 127.0.0.1, Serve's proxy on a
loopback port, two ingress replicas, the offline backend plus a second backend at 2 replicas.

The dashscope SDK's core cases run against it unchanged (imported from test_sdk); errors,
request ids, uploads, /health and /metrics are compared with plain ``mmembed serve`` on the same
catalog, or checked across replicas.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dashscope
import httpx
import pytest

from mmembed.models.catalog import PACKAGED_PROFILES
from tests.e2e.conftest import API_KEY, EMBED_PATH, Server, start_server, stop_server
from tests.e2e.test_sdk import (  # noqa: F401  (the SDK's core cases, run against Serve)
    media,
    test_async_client,
    test_dimension,
    test_fused,
    test_image_url,
    test_independent_items_keep_order_and_types,
    test_local_image_as_base64_matches_the_url,
    test_text,
    test_video_url,
    test_wrong_key_is_reported_not_raised,
)
from tests.media_util import make_image

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.usefixtures("sdk")]

HASH = "hash-embed"  # the second backend's model (deterministic, no weights)
HASH_CATALOG = """
[backends.hash]
family = "hash"
dim = 64

[backends.hash.ray]
num_replicas = 2
num_cpus = 0.25

[models."hash-embed"]
backend = "hash"
dimensions = [64, 32]

[backends.hash-rerank]
family = "cosine"
backend = "hash"

[models."hash-rerank"]
task = "rerank"
backend = "hash-rerank"
"""
ENV = {
    "MMEMBED_MAX_BODY_BYTES": str(8 * 1024 * 1024),
    "MMEMBED_FETCH_READ_TIMEOUT_S": "1.5",
    "MMEMBED_FETCH_TOTAL_TIMEOUT_S": "3",
    "MMEMBED_RAY_INGRESS_REPLICAS": "2",
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A catalog of two backends, and the cache and upload directories both servers use."""
    tmp = tmp_path_factory.mktemp("serve-ray")
    catalog = tmp / "catalog.toml"
    offline = Path(PACKAGED_PROFILES["offline"]).read_text(encoding="utf-8")
    catalog.write_text(offline + HASH_CATALOG, encoding="utf-8")
    return {
        **ENV,
        "MMEMBED_CATALOG": str(catalog),
        "MMEMBED_CACHE_DIR": str(tmp / "cache"),
        "MMEMBED_UPLOAD_DIR": str(tmp / "uploads"),
    }


def every_replica_ready(srv: Server, in_a_row: int = 20, timeout: float = 120) -> None:
    """Until /health answers 200 ``in_a_row`` times running: the first 200 came from one
    ingress replica; another may still be loading ("loading", 503 with Retry-After, as a
    starting `mmembed serve` answers), and Serve's proxy spreads requests over them."""
    deadline, streak = time.monotonic() + timeout, 0
    while streak < in_a_row:
        assert time.monotonic() < deadline, f"replicas not all ready:\n{srv.logs()[-3000:]}"
        ok = httpx.get(srv.url + "/health", timeout=10).status_code == 200
        streak = streak + 1 if ok else 0
        time.sleep(0 if ok else 0.3)


def stop_ray_server(srv: Server) -> int | None:
    srv.proc.terminate()  # SIGTERM: Serve shuts down, then the local cluster
    try:
        return srv.proc.wait(90)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        return None


def ray_server(shared: dict[str, str], tmp_path_factory, start_s: float) -> Iterator[Server]:
    """``mmembed serve --ray`` with ``shared``'s settings, every replica ready; after the
    module it must stop by itself, without a traceback."""
    srv = start_server(tmp_path_factory.mktemp("ray-log"), shared, ("--ray",), start_s=start_s)
    every_replica_ready(srv)
    yield srv
    assert stop_ray_server(srv) == 0, srv.logs()[-3000:]
    assert "Traceback" not in srv.logs(), srv.logs()


def plain_server(shared: dict[str, str], tmp_path_factory) -> Iterator[Server]:
    """Plain ``mmembed serve`` on the same catalog and directories. It shares the accounts
    database, so it runs no batch jobs: they are left to the Serve application."""
    env = {k: v for k, v in shared.items() if k != "MMEMBED_RAY_MODE"}
    env["MMEMBED_BATCH_JOBS_PER_PROCESS"] = "0"
    srv = start_server(tmp_path_factory.mktemp("plain-log"), env)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def server(shared, tmp_path_factory) -> Iterator[Server]:
    """``mmembed serve --ray`` (overrides the session's plain server for this module)."""
    yield from ray_server(shared, tmp_path_factory, start_s=420)


@pytest.fixture(scope="module")
def plain(shared, server, tmp_path_factory) -> Iterator[Server]:
    """Plain serve, started after the Serve one (so the offline model's exports are cached)."""
    yield from plain_server(shared, tmp_path_factory)


def body(model: str, contents: list, **parameters) -> dict:
    return {"model": model, "input": {"contents": contents}, "parameters": parameters}


def post(srv: Server, data: dict, **headers: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", **headers}
    return httpx.post(srv.url + EMBED_PATH, json=data, headers=headers, timeout=60)


def health(srv: Server) -> dict:
    resp = httpx.get(srv.url + "/health", timeout=10)
    assert resp.status_code == 200
    return resp.json()


def eventually(probe, what: str, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    """``probe()`` once it is truthy: the replicas report to the board every 0.5 s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            assert value, f"never true: {what}"
            return value
        time.sleep(0.25)


def test_rerank_is_answered_as_plain_serve_answers_it(server, plain):
    """The offline reranker, hosted by the offline backend's replica: the same scores."""
    query = {"model": "gte-rerank-v2", "input": {"query": "a cup of coffee"}}
    query["input"]["documents"] = ["espresso in a cup", "a red bicycle", "tea and coffee beans"]
    got = []
    for srv in (server, plain):
        resp = httpx.post(
            srv.url + "/api/v1/services/rerank/text-rerank/text-rerank",
            json=query,
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=60,
        )
        assert resp.status_code == 200, resp.text
        got.append(
            [(r["index"], round(r["relevance_score"], 6)) for r in resp.json()["output"]["results"]]
        )
    assert got[0] == got[1] and len(got[0]) == 3


def test_a_batch_job_runs_on_the_backend_replicas(server, plain):
    """The OpenAI Batch API on Serve: the ingress runs the job, its lines reach the backend
    replicas as background work; every vector equals plain serve's synchronous answer."""
    from openai import OpenAI

    from tests.e2e.test_batch_http import cosines, vectors, wait_batch

    bodies = [{"model": HASH, "input": [f"ray batch {i}", f"second {i}"]} for i in range(6)]
    bodies.append({"model": "tongyi-embedding-vision-plus", "input": "a cup of coffee"})
    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/embeddings", "body": b}
        for i, b in enumerate(bodies)
    ]
    client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    data = "\n".join(json.dumps(line) for line in lines).encode()
    # Counted before the job exists: a small job can be done before the create call returns,
    # and a colocated replica's /health counts its own batcher live.
    before = health(server)["batching"]["hash"]["inputs"]
    upload = client.files.create(file=("lines.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    done = wait_batch(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == len(lines), done
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == sorted(x["custom_id"] for x in lines)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for o in out:
        body = bodies[int(o["custom_id"][1:])]
        want = httpx.post(plain.url + "/v1/embeddings", json=body, headers=auth, timeout=60)
        assert want.status_code == 200, want.text
        got = vectors(o["response"]["body"])
        assert (cosines(got, vectors(want.json())) >= 0.9999).all(), o["custom_id"]
    # the hash lines' 12 texts went through the Serve backend replicas' batchers
    eventually(lambda: health(server)["batching"]["hash"]["inputs"] >= before + 12, "inputs")


# -- errors and request ids: as plain serve answers them -------------------------------------
ERRORS = {
    "unknown model": body("no-such-model", [{"text": "x"}]),
    "bad image url": body("tongyi-embedding-vision-plus", [{"image": "http://10.1.2.3/cat.png"}]),
    "too many items": body("multimodal-embedding-v1", [{"text": f"t{i}"} for i in range(21)]),
    "bad dimension": body(HASH, [{"text": "x"}], dimension=7),
    "empty input": body(HASH, []),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_are_those_of_plain_serve(server, plain, case):
    got, want = post(server, ERRORS[case]), post(plain, ERRORS[case])
    assert want.status_code == 400  # a client error, not our fault
    assert got.status_code == want.status_code
    g, w = got.json(), want.json()
    assert (g["code"], g["message"]) == (w["code"], w["message"])
    assert g["request_id"] == got.headers["x-request-id"]


@pytest.mark.parametrize("which", ["serve", "plain"])
def test_an_incoming_request_id_is_adopted_end_to_end(server, plain, which):
    srv = server if which == "serve" else plain
    ok = post(srv, body(HASH, [{"text": "hello"}]), **{"x-request-id": "trace-42.a"})
    assert ok.status_code == 200, ok.text
    assert ok.headers.get_list("x-request-id") == ["trace-42.a"]
    assert ok.json()["request_id"] == "trace-42.a"
    again = post(srv, body(HASH, [{"text": "hello"}]), **{"x-request-id": "trace-42.a"})
    assert again.status_code == 200, again.text  # a repeated id is recorded in the ledger too
    bad = post(srv, ERRORS["bad image url"], **{"x-request-id": "trace-43"})
    assert bad.headers.get_list("x-request-id") == ["trace-43"]
    assert bad.json()["request_id"] == "trace-43"
    # unusable (a space, or too long): replaced by a fresh id, the same in header and body
    for sent in ("has a space", "x" * 129):
        resp = post(srv, body(HASH, [{"text": "hello"}]), **{"x-request-id": sent})
        (rid,) = resp.headers.get_list("x-request-id")
        assert rid != sent and resp.json()["request_id"] == rid and len(rid) == 36


def test_backend_log_lines_carry_the_request_id(server):
    resp = post(server, ERRORS["bad image url"], **{"x-request-id": "find-me-in-the-backend"})
    assert resp.status_code == 400
    # the fetch refusal is logged by the backend replica's fetcher, under the same id
    eventually(
        lambda: any(
            "find-me-in-the-backend" in line and "ServeReplica:mmembed:backend-" in line
            for line in server.logs().splitlines()
        ),
        "a backend replica's log line with the request id",
    )


# -- replicas: /health lists them, /metrics sums them -----------------------------------------
def test_health_lists_every_replica(server):
    def complete() -> dict | None:
        h = health(server)
        roles = [(r["role"], r.get("backend")) for r in h["replicas"]]
        want = [("backend", "hash")] * 2 + [("backend", "offline")] + [("ingress", None)] * 2
        return h if sorted(roles, key=str) == sorted(want, key=str) else None

    h = eventually(complete, "2 hash, 1 offline and 2 ingress replicas in /health")
    # the offline reranker runs in the offline backend's replica (no deployment of its own)
    ready = {"hash": "ready", "offline": "ready", "offline-rerank": "ready"}
    ready |= {"hash-rerank": "ready"}
    assert h["status"] == "ok" and h["backends"] == ready
    pids = [r["pid"] for r in h["replicas"]]
    assert len(set(pids)) == 5  # five processes
    assert all(r["status"] == "ready" for r in h["replicas"] if r["role"] == "backend")
    offline = next(r for r in h["replicas"] if r.get("backend") == "offline")
    assert offline["threads"] == 1  # its CPU share (num_cpus = 1 by default)
    assert h["batching"]["hash"]["replicas"] == 2


def _metric(text: str, name: str, label: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_sum_over_replicas(server):
    def hash_counts() -> tuple[float, float]:
        text = httpx.get(server.url + "/metrics", timeout=10).text
        label = 'backend="hash"'
        return (
            _metric(text, "mmembed_batch_size_sum", label),
            _metric(text, "mmembed_forward_passes_total", label),
        )

    eventually(lambda: health(server)["replicas"], "replicas reported")
    time.sleep(1.5)  # the board is current
    before_items, before_passes = hash_counts()
    n = 24
    with ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(
                lambda i: post(server, body(HASH, [{"text": f"metrics {i}"}])).status_code,
                range(n),
            )
        )
    assert codes == [200] * n
    # One /metrics read per probe: two reads may come from ingress replicas a report apart.
    items = eventually(
        lambda: (counts := hash_counts())[0] >= before_items + n and counts, f"{n} more items"
    )[0]
    assert items == before_items + n  # texts are not cached: every item went through a pass

    def agreeing() -> tuple[dict, float] | None:
        # Each ingress replica reads the board on its own clock: /health and /metrics may
        # come from different ones, a report apart.
        h, passes = health(server), hash_counts()[1]
        return (h, passes) if passes == h["batching"]["hash"]["batches"] else None

    h, passes = eventually(agreeing, "/health and /metrics agree")
    per_replica = [r for r in h["replicas"] if r.get("backend") == "hash"]
    assert sum(r["batches"] for r in per_replica) == h["batching"]["hash"]["batches"]
    assert passes >= before_passes + 1


def on_hash(key: str, h: dict) -> int:
    """``key`` (cache_hits, cache_entries) summed over the hash backend's replicas."""
    return sum(r[key] for r in h["replicas"] if r.get("backend") == "hash")


def settled(server: Server) -> dict:
    """/health once both hash replicas are on the board and their cache counts have stopped
    moving. Each ingress replica reads the board on its own clock, so a single reading may be a
    report behind (and count an earlier test's hit later, in the test's own difference)."""

    def probe() -> dict | None:
        first = health(server)
        if first["batching"].get("hash", {}).get("replicas") != 2:
            return None
        time.sleep(1.2)  # more than two reports apart
        again = health(server)
        counts = [(on_hash("cache_hits", h), on_hash("cache_entries", h)) for h in (first, again)]
        return again if counts[0] == counts[1] else None

    return eventually(probe, "the hash replicas' cache counts settled on the board")


def test_repeated_media_meet_the_replica_that_caches_them(server):
    """The backend's router sends a request holding media to the replica that owns it by
    content: five images, three passes, each embedded once across the two hash replicas."""
    images = []
    for i in range(5):
        data = base64.b64encode(make_image("PNG", (70 + i, 36))).decode()
        images.append({"image": f"data:image/png;base64,{data}"})

    before = settled(server)
    for _ in range(3):
        for image in images:
            resp = post(server, body(HASH, [image]))
            assert resp.status_code == 200, resp.text
    hits = on_hash("cache_hits", before)
    after = eventually(
        lambda: on_hash("cache_hits", h := health(server)) >= hits + 10 and h, "10 more hits"
    )
    assert on_hash("cache_hits", after) == hits + 10
    # once, not twice (the hash replicas' own counts: another backend's may lag on the board)
    assert on_hash("cache_entries", after) == on_hash("cache_entries", before) + 5


def rerank(srv: Server, data: dict) -> httpx.Response:
    return httpx.post(
        srv.url + "/api/v1/services/rerank/text-rerank/text-rerank",
        json=data,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )


def test_repeated_rerank_documents_meet_the_replica_that_caches_them(server):
    """A reranker hosted by the hash backend's two replicas: a rerank request holding images
    goes to the replica that owns it by its query and documents, so each (query, document)
    pair is scored once across the replicas and its repeats are hits there."""

    def image(i: int) -> dict:
        data = base64.b64encode(make_image("PNG", (90 + i, 30))).decode()
        return {"image": f"data:image/png;base64,{data}"}

    before = settled(server)
    queries = [{"query": f"picture {i}", "documents": [image(i), image(i + 10)]} for i in range(4)]
    for _ in range(3):
        for q in queries:
            resp = rerank(server, {"model": "hash-rerank", "input": q})
            assert resp.status_code == 200, resp.text
            assert len(resp.json()["output"]["results"]) == 2
    hits = on_hash("cache_hits", before)
    after = eventually(
        lambda: on_hash("cache_hits", h := health(server)) >= hits + 16 and h, "16 more hits"
    )
    assert on_hash("cache_hits", after) == hits + 16  # 4 requests x 2 pairs x 2 repeats
    assert on_hash("cache_entries", after) == on_hash("cache_entries", before) + 8  # pairs, once


# -- uploads: stored by an ingress replica, resolved by a backend replica ---------------------
def test_an_upload_is_resolved_in_another_process(server, tmp_path, shared):
    pictures = []
    for i in range(4):  # several: the policy and the upload POST may meet different ingresses
        path = tmp_path / f"picture-{i}.png"
        path.write_bytes(make_image("PNG", (48 + i, 40)))
        pictures.append(path)
    before = health(server)
    for path in pictures:
        resp = dashscope.MultiModalEmbedding.call(model=HASH, input=[{"image": path.as_uri()}])
        assert resp.status_code == 200, (resp.code, resp.message)
        assert resp.output["embeddings"][0]["type"] == "image"
    stored = list(Path(shared["MMEMBED_UPLOAD_DIR"]).glob("*/*"))
    assert len([p for p in stored if p.parent.name != "tmp"]) >= len(pictures)

    def oss_bytes() -> dict[int, int]:
        return {
            r["pid"]: r["media_bytes"].get("oss", 0)
            for r in health(server)["replicas"]
            if r["role"] == "backend"
        }

    was = sum(r["media_bytes"].get("oss", 0) for r in before["replicas"] if r["role"] == "backend")
    total = sum(p.stat().st_size for p in pictures)

    def all_read() -> dict[int, int] | None:  # one /health read (the ingresses' views differ)
        got = oss_bytes()
        return got if sum(got.values()) >= was + total else None

    readers = eventually(all_read, "oss bytes read")
    ingress = {r["pid"] for r in health(server)["replicas"] if r["role"] == "ingress"}
    assert len(ingress) == 2
    assert {pid for pid, n in readers.items() if n} - ingress  # read by a backend process
    assert not {pid for pid, n in readers.items() if n} & ingress


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--host", "0.0.0.0"), "refusing to bind '0.0.0.0' without API keys"),
        (("--ssl-certfile", "/nonexistent.pem"), "TLS needs both"),
    ],
)
def test_start_up_rules_of_plain_serve_apply(args, says, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMEMBED_")}
    env["MMEMBED_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "mmembed.cli", "serve", "--ray", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and says in proc.stderr


def _process_tree(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    tree, todo = {root}, [root]
    while todo:
        parent = todo.pop()
        kids = [c for c, p in parents.items() if p == parent]
        tree.update(kids)
        todo += kids
    return tree


def _sockets(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    return inodes


def _tcp(inodes: set[str]) -> list[tuple[str, str, str, int]]:
    """(state, local ip, remote ip, local port) of the TCP sockets with these inodes (state
    and addresses in hex, as in /proc)."""
    rows = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[9] in inodes:
                    local, _, port = cols[1].partition(":")
                    rows.append((cols[3], local, cols[2].split(":")[0], int(port, 16)))
    return rows


def _is_loopback_hex(ip: str) -> bool:
    if len(ip) == 8:  # IPv4, little-endian: 0100007F is 127.0.0.1
        return ip.endswith("7F")
    v4_mapped = ip.startswith("0000000000000000FFFF0000")
    return (v4_mapped and ip.endswith("7F")) or ip == "00000000000000000000000001000000"


def test_ray_stays_on_loopback(server):
    """Every connection of the server's processes (driver, GCS, raylet, proxy, replicas) is
    between loopback addresses; listeners are on loopback, except the one each Serve replica
    opens on every interface itself (Ray hard-codes it; nothing connects to it here)."""
    h = eventually(lambda: health(server)["replicas"], "replicas")
    rows = _tcp(_sockets(_process_tree(server.proc.pid)))
    assert len(rows) > 20  # the cluster's sockets were found
    connected = [r for r in rows if r[0] == "01"]  # ESTABLISHED
    assert connected and all(_is_loopback_hex(r[1]) and _is_loopback_hex(r[2]) for r in connected)
    wide = [r for r in rows if r[0] == "0A" and not _is_loopback_hex(r[1])]  # LISTEN
    assert len(wide) <= len(h) + 1  # one per replica (and the board) at most
    assert "proxy 127.0.0.1" in server.logs()
