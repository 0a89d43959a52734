"""``mmembed embed`` as users run it (a subprocess of the real CLI): a folder and a CSV into a
Parquet dataset, bad items as error rows, SIGKILL mid-job then a rerun, and vectors equal to
the HTTP server's for the same items."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmembed.batch.output import part_files, read_embeddings
from tests.media_util import make_image, make_video, truncated
from tests.ray_cluster import node_table, ray_cluster, watch_sockets  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.network]

MODEL, DIM = "tongyi-embedding-vision-plus", 256
N_TEXTS = 400
WORDS = [
    "cat",
    "dog",
    "river",
    "mountain",
    "city",
    "night",
    "rain",
    "bread",
    "music",
    "tree",
    "boat",
    "snow",
]


def embed_cmd(tmp: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mmembed.cli",
        "embed",
        str(tmp / "media"),
        str(tmp / "items.csv"),
        "--model",
        MODEL,
        "--dimension",
        str(DIM),
        "--out",
        str(out),
        "--cache-dir",
        str(tmp / "cache"),
        *extra,
    ]


def run_watched(tmp: Path, out: Path, *extra: str, env: dict, also=None) -> tuple[str, set]:  # type: ignore[no-untyped-def]
    """``mmembed embed`` with every socket of its process tree (and of ``also``) watched:
    its stderr, and the sockets seen on other addresses than loopback."""
    with (tmp / "stderr.log").open("w+") as err:
        proc = subprocess.Popen(
            embed_cmd(tmp, out, *extra), stdout=subprocess.DEVNULL, stderr=err, env=env
        )
        try:
            seen = watch_sockets(proc, also)
        finally:
            if proc.poll() is None:
                proc.kill()
        err.seek(0)
        stderr = err.read()
    assert proc.returncode == 0, stderr
    return stderr, seen


def run_embed(tmp: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        embed_cmd(tmp, out, *extra), capture_output=True, text=True, timeout=900, env=os.environ
    )
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("batch")
    media = tmp / "media"
    (media / "nested" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for n in range(6):
        fmt = ("PNG", "JPEG", "BMP")[n % 3]
        data = make_image(fmt, size=(int(rng.integers(40, 120)), int(rng.integers(40, 120))))
        (media / ("nested" if n % 2 else "") / f"img{n}").write_bytes(data)  # no suffixes
    (media / "nested" / "deeper" / "clip.mov.bak").write_bytes(make_video("MP4", seconds=2.0))
    (media / "nested" / "broken.jpg").write_bytes(truncated(make_image("JPEG", size=(300, 300))))
    (media / "README.txt").write_text("not media")
    lines = ["id,text,image"]
    lines += [
        f"t{n},{' '.join(rng.choice(WORDS, size=int(rng.integers(2, 9))))} {n},"
        for n in range(N_TEXTS)
    ]
    lines += ["pic,,media/img0", "gone,,media/no-such-file.png", "blank,,"]
    (tmp / "items.csv").write_text("\n".join(lines) + "\n")
    return tmp


@pytest.fixture(scope="module")
def clean(corpus) -> Path:
    out = corpus / "clean"
    proc = run_embed(corpus, out, "--part-size", "100")
    assert "411 embedded (3 errors)" in proc.stderr, proc.stderr
    return out


def by_id(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_embeddings(out).to_pylist()}


def test_folder_and_csv_into_one_dataset(corpus, clean):
    rows = by_id(clean)
    media_ids = {"img0", "img2", "img4", "nested/img1", "nested/img3", "nested/img5"}
    assert set(rows) == {f"t{n}" for n in range(N_TEXTS)} | media_ids | {
        "nested/deeper/clip.mov.bak",
        "nested/broken.jpg",
        "pic",
        "gone",
        "blank",
    }
    table = pq.read_table(clean)  # the folder reads as one Parquet dataset
    assert table.num_rows == len(rows) == 411
    assert table.schema.field("embedding").type.list_size == DIM
    assert len(part_files(clean)) == 5
    ok = [r for r in rows.values() if r["error"] is None]
    assert len(ok) == 408
    for r in ok:
        v = np.asarray(r["embedding"], dtype=np.float32)
        assert v.shape == (DIM,) and abs(np.linalg.norm(v) - 1) < 1e-4
    assert rows["nested/deeper/clip.mov.bak"]["kind"] == "video"
    assert rows["nested/deeper/clip.mov.bak"]["image_tokens"] > 0
    assert rows["t0"]["kind"] == "text" and rows["t0"]["input_tokens"] > 0
    assert rows["pic"]["embedding"] == rows["img0"]["embedding"]
    assert rows["pic"]["image_tokens"] == 64


def test_bad_items_become_error_rows(clean):
    rows = by_id(clean)
    broken = rows["nested/broken.jpg"]
    assert broken["embedding"] is None and broken["kind"] == "image"
    assert broken["error"].startswith("InvalidParameter.DataInspection: image: ")
    assert broken["source"].endswith("broken.jpg")
    assert rows["gone"]["error"].startswith("InvalidURL: image: ")
    assert "no-such-file.png" in rows["gone"]["error"]
    assert rows["blank"]["error"].startswith("InvalidParameter")


def test_vectors_equal_the_http_servers(server, corpus, clean):
    rows = by_id(clean)
    ids = ["t0", "t1", "t399", "img0", "nested/img1", "img2", "nested/deeper/clip.mov.bak"]
    contents = []
    for i in ids:
        if i.startswith("t"):
            contents.append({"text": _csv_text(corpus, i)})
        else:
            data = base64.b64encode((corpus / "media" / i).read_bytes()).decode()
            kind = "video" if "clip" in i else "image"
            mime = "video/mp4" if kind == "video" else "image/png"
            contents.append({kind: f"data:{mime};base64,{data}"})
    r = server.post(
        {"model": MODEL, "input": {"contents": contents}, "parameters": {"dimension": DIM}}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    for i, emb in zip(ids, body["output"]["embeddings"], strict=True):
        want = np.asarray(emb["embedding"], dtype=np.float32)
        got = np.asarray(rows[i]["embedding"], dtype=np.float32)
        assert float(got @ want) / (np.linalg.norm(got) * np.linalg.norm(want)) >= 0.9999, i
        assert rows[i]["kind"] == emb["type"]


def _csv_text(corpus: Path, row_id: str) -> str:
    for line in (corpus / "items.csv").read_text().splitlines():
        if line.startswith(row_id + ","):
            return line.split(",")[1]
    raise KeyError(row_id)


def test_sigkill_mid_job_then_rerun_gives_every_id_once(corpus, clean):
    out = corpus / "killed"
    proc = subprocess.Popen(
        embed_cmd(corpus, out, "--part-size", "10", "--concurrency", "8"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=os.environ,
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and len(part_files(out)) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    before = pq.read_table(out, columns=["id"]).num_rows
    assert 20 <= before < 411

    rerun = run_embed(corpus, out, "--part-size", "10")
    assert f"{411 - before} embedded" in rerun.stderr and f"{before} already in" in rerun.stderr
    ids = pq.read_table(out, columns=["id"]).column("id").to_pylist()  # the raw files
    assert len(ids) == len(set(ids)) == 411  # every id exactly once, without dedupe

    want, got = by_id(clean), by_id(out)
    assert set(got) == set(want)
    for i, row in want.items():
        assert got[i]["error"] == row["error"], i
        if row["embedding"] is not None:
            cos = np.dot(got[i]["embedding"], row["embedding"])
            assert cos >= 0.9999, (i, cos)

    again = run_embed(corpus, out)  # complete: nothing left, no model loaded
    assert "0 embedded" in again.stderr and "411 already in" in again.stderr
    assert "backend offline" not in again.stderr


def test_refuses_another_models_output_and_bad_dimension(corpus, clean):
    cmd = embed_cmd(corpus, clean)
    cmd[cmd.index("--dimension") + 1] = "512"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "use another --out" in proc.stderr
    cmd[cmd.index("--dimension") + 1] = "100"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "100 is not supported" in proc.stderr


def test_ray_job_equals_the_local_run_and_resumes(corpus, clean):
    """``--ray`` on a local single-node cluster pinned to loopback: the same rows as the
    in-process run; started over an output that already holds two parts, it adds only the
    rest. Every socket of the job and its cluster stays on loopback."""
    out = corpus / "ray"
    out.mkdir()
    for part in part_files(clean)[:2]:  # a job that got two parts written before it died
        (out / part.name).write_bytes(part.read_bytes())
    stderr, seen = run_watched(corpus, out, "--ray", "--part-size", "100", env=os.environ)
    assert seen == set()
    assert "211 embedded (" in stderr and "200 already in" in stderr, stderr
    ids = pq.read_table(out, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 411

    want, got = by_id(clean), by_id(out)
    for i, row in want.items():
        assert (got[i]["kind"], got[i]["error"]) == (row["kind"], row["error"]), i
        assert (got[i]["input_tokens"], got[i]["image_tokens"]) == (
            row["input_tokens"],
            row["image_tokens"],
        ), i
        if row["embedding"] is not None:
            cos = np.dot(got[i]["embedding"], row["embedding"])
            assert cos >= 0.9999, (i, cos)


def test_urls_go_through_the_servers_address_guard(tmp_path, origin, corpus):
    """Without --fetch-allow-hosts a loopback URL is refused as on the server (an error row);
    the data: URI beside it is embedded."""
    url = origin.serve("/batch/pic.png", make_image("PNG"))
    data = base64.b64encode(make_image("PNG")).decode()
    (tmp_path / "urls.jsonl").write_text(
        f'{{"id": "u", "image": "{url}"}}\n{{"id": "d", "image": "data:image/png;base64,{data}"}}\n'
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mmembed.cli", "embed", str(tmp_path / "urls.jsonl")]
    cmd += ["--model", MODEL, "--out", str(out), "--cache-dir", str(corpus / "cache")]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=900,
        env={k: v for k, v in os.environ.items() if not k.startswith("MMEMBED_")},
    )
    assert proc.returncode == 0, proc.stderr
    rows = by_id(out)
    assert rows["u"]["error"].startswith("InvalidURL: image: ") and rows["u"]["embedding"] is None
    assert "loopback" in rows["u"]["error"] or "internal" in rows["u"]["error"], rows["u"]
    assert rows["u"]["source"] == url
    assert rows["d"]["error"] is None and len(rows["d"]["embedding"]) == 1152
    assert origin.paths().count("/batch/pic.png") == 0  # refused before any connection


def test_ray_job_on_a_two_node_cluster(corpus, clean, ray_cluster):  # noqa: F811
    """``--ray ADDRESS`` on the two-node loopback cluster, one actor per GPU as on a GPU
    cluster (one declared GPU per node): the actors run on both nodes, the rows equal the
    in-process run's, nothing leaves loopback, and a rerun embeds nothing. The driver gets only
    the cluster's token: mmembed keeps 127.0.0.1 as given."""
    nodes = {n["NodeID"][:12] for n in node_table(ray_cluster)}
    assert len(nodes) == 2
    env = {k: v for k, v in ray_cluster.env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env.pop("RAY_ADDRESS")
    out = corpus / "ray2"
    args = ("--ray", ray_cluster.address, "--ray-actors", "2", "--ray-gpus", "1")
    args += ("--part-size", "100")
    stderr, seen = run_watched(corpus, out, *args, env=env, also=ray_cluster.pids)
    assert seen == set()
    assert "411 embedded (3 errors)" in stderr, stderr
    line = next(x for x in stderr.splitlines() if "rows per node: " in x)
    per_node = json.loads(line.split("rows per node: ", 1)[1])
    assert {k.split("@")[0] for k in per_node} == nodes, per_node
    assert all(k.endswith("@127.0.0.1") and n > 0 for k, n in per_node.items()), per_node
    assert sum(per_node.values()) == 411

    ids = pq.read_table(out, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 411
    want, got = by_id(clean), by_id(out)
    for i, row in want.items():
        assert (got[i]["kind"], got[i]["error"]) == (row["kind"], row["error"]), i
        assert got[i]["input_tokens"] == row["input_tokens"], i
        if row["embedding"] is not None:
            cos = np.dot(got[i]["embedding"], row["embedding"])
            assert cos >= 0.9999, (i, cos)

    again, _ = run_watched(corpus, out, *args, env=env)
    assert "0 embedded" in again and "411 already in" in again, again
