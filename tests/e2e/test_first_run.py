"""A first run as a new user meets it: `mmembed serve` with an empty cache opens its port at
once and explains itself while models load; mistakes get one clear line, never a traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.e2e.conftest import API_KEY, EMBED_PATH, free_port

pytestmark = [pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def mmembed(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmembed.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def spawn(tmp: Path, env: dict[str, str], *args: str) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = tmp / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmembed.cli", "serve", *args],
            env={
                **os.environ,
                "MMEMBED_PORT": str(port),
                "MMEMBED_CACHE_DIR": str(tmp / "cache"),
                **env,
            },
            stdout=out,
            stderr=out,
        )
    return proc, f"http://127.0.0.1:{port}", log


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(log.read_text())


@pytest.mark.network
def test_empty_cache_first_start_explains_itself(tmp_path):
    started = time.monotonic()
    proc, url, log = spawn(tmp_path, {"MMEMBED_API_KEYS": API_KEY})
    try:
        first = None
        while first is None:
            assert proc.poll() is None, log.read_text()
            try:
                first = httpx.get(url + "/health", timeout=2)
            except httpx.HTTPError:
                time.sleep(0.05)
        opened_after = time.monotonic() - started
        # the port is open and answering long before the models are ready
        assert first.status_code == 503, first.text
        body = first.json()
        assert body["status"] == "loading"
        backends = body["progress"]["backends"]  # the embedder, and the reranker on it
        assert set(backends) == {"offline", "offline-rerank"} and backends["offline"] == "loading"
        assert body["progress"]["total"] == 2
        print(f"first /health answer after {opened_after:.2f} s: {body}")

        r = httpx.post(
            url + EMBED_PATH,
            json={"model": "tongyi-embedding-vision-plus", "input": {"contents": ["hi"]}},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=30,
        )
        assert r.status_code == 503 and r.json()["code"] == "ModelLoading", r.text
        assert r.headers["retry-after"]
        r = httpx.post(
            url + "/v1/embeddings",
            json={"model": "tongyi-embedding-vision-plus", "input": "hi"},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=30,
        )
        assert r.status_code == 503 and r.json()["error"]["code"] == "ModelLoading", r.text

        wait_ready(proc, url, log)
        r = httpx.post(
            url + EMBED_PATH,
            json={"model": "tongyi-embedding-vision-plus", "input": {"contents": ["hi"]}},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=60,
        )
        assert r.status_code == 200
    finally:
        stop(proc)
    text = log.read_text()
    assert "exporting efficientnet-lite0 to ONNX (first start only" in text
    assert re.search(r"exported efficientnet-lite0 to ONNX in [0-9.]+ s", text)  # progress
    assert "class prompts" not in text  # the default prompts' vectors ship with the package
    ready = [line for line in text.splitlines() if " ready in " in line]
    assert len(ready) == 1, text
    assert url + "/api/v1/services/embeddings" in ready[0] and url + "/v1/embeddings" in ready[0]
    assert "tongyi-embedding-vision-plus" in ready[0] and "--fetch-allow-hosts" in ready[0]
    assert "Traceback" not in text
    assert "Loaded pretrained weights" not in text  # a dependency's stray print
    # every line comes from our formatter (time, level, logger): no bare prints
    stray = [line for line in text.splitlines() if not re.match(r"^\d{4}-\d\d-\d\d ", line)]
    assert not stray, stray


@pytest.mark.network
def test_json_logs_and_a_missing_open_weight_model(tmp_path):
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        """
[backends.offline]
family = "conse"

[backends.siglip]
family = "dual"
weights = "/nonexistent/siglip2"

[models."tongyi-embedding-vision-plus"]
backend = "offline"
dimensions = [1152, 512]

[models."tongyi-embedding-vision-flash"]
backend = "siglip"
dimensions = [768]
"""
    )
    proc, url, log = spawn(
        tmp_path, {"MMEMBED_CATALOG": str(catalog)}, "--log-format", "json", "--log-level", "info"
    )
    try:
        wait_ready(proc, url, log)
        ok = httpx.post(
            url + EMBED_PATH,
            json={"model": "tongyi-embedding-vision-plus", "input": {"contents": ["a", "b"]}},
            timeout=60,
        )
        assert ok.status_code == 200
        missing = httpx.post(
            url + "/v1/embeddings", json={"model": "tongyi-embedding-vision-flash", "input": "x"}
        )
        assert missing.status_code == 503
        assert "/nonexistent/siglip2" in missing.json()["error"]["message"]
        health = httpx.get(url + "/health").json()
        assert health["status"] == "degraded"
    finally:
        stop(proc)
    lines = log.read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "request_id", "message"} <= e.keys() for e in entries)
    done = [e for e in entries if e.get("status") == 200 and e.get("model")]
    assert done and done[0]["items"] == 2 and done[0]["latency_ms"] > 0
    assert done[0]["request_id"] == ok.headers["x-request-id"]
    missing_lines = [e for e in entries if "/nonexistent/siglip2" in e["message"]]
    assert missing_lines and missing_lines[0]["level"] == "error"
    assert not any("exception" in e or "Traceback" in e["message"] for e in entries)


@pytest.mark.network
def test_readme_first_curl_works_offline(server):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(curl .*?)```", readme, re.S)
    assert block, "README has no curl example"
    command = block.group(1).replace("http://127.0.0.1:8000", server.url)
    out = subprocess.run(
        ["bash", "-c", command],
        env={**os.environ, "KEY": API_KEY},
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    body = orjson.loads(out.stdout)
    kinds = [e["type"] for e in body["output"]["embeddings"]]
    assert "image" in kinds and "text" in kinds, body


# -- clearer errors for common mistakes ----------------------------------------------------------
@pytest.mark.network
@pytest.mark.parametrize(
    ("image", "code", "needle"),
    [
        (
            "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg==",
            "InvalidParameter",
            "data:image/png;base64,",
        ),
        ("/home/me/cat.png", "InvalidURL", "data: URI"),
        ("C:\\Users\\me\\cat.png", "InvalidURL", "dashscope SDK"),
        ("http://10.1.2.3/cat.png", "InvalidURL", "fetch_allow_hosts"),
    ],
)
def test_media_mistakes_say_what_to_do(server, image, code, needle):
    r = server.post(
        {"model": "tongyi-embedding-vision-plus", "input": {"contents": [{"image": image}]}}
    )
    assert r.status_code == 400
    body = r.json()
    assert body["code"] == code and needle in body["message"], body
    assert body["message"].startswith("input.contents[0].image")


# -- the command line ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["serve", "--port", "abc"], {}, "argument --port: 'abc' is not an integer"),
        (["serve", "--log-level", "verbose"], {}, "invalid choice: 'verbose'"),
        (["serve", "--request-timeout-s", "soon"], {}, "'soon' is not a number"),
        (["serve"], {"MMEMBED_PORT": "abc"}, "MMEMBED_PORT='abc': 'abc' is not an integer"),
        (["serve"], {"MMEMBED_EMBED_CACHE_TEXT": "maybe"}, "is not a boolean"),
        (["serve"], {"MMEMBED_LOG_FORMAT": "xml"}, "'xml' is not one of text, json"),
        (["models", "--port", "1"], {}, "unrecognized arguments: --port"),
        (["models", "--catalog", "/nonexistent.toml"], {}, "/nonexistent.toml"),
        (["serve", "--ssl-certfile", "/nonexistent.pem"], {}, "--ssl-keyfile"),
    ],
)
def test_cli_mistakes_get_one_clear_line(args, env, needle):
    out = mmembed(*args, env=env)
    assert out.returncode in (1, 2), out
    assert needle in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) <= 3, out.stderr  # (argparse adds its usage)


def test_cli_version_switches_and_per_command_help():
    import mmembed as package

    assert mmembed("--version").stdout.strip() == f"mmembed {package.__version__}"
    models_help = mmembed("models", "--help").stdout
    assert "--catalog" in models_help and "--json" in models_help and "--port" not in models_help
    pull_help = mmembed("pull", "--help").stdout
    assert "--cache-dir" in pull_help and "--port" not in pull_help
    serve_help = mmembed("serve", "--help").stdout
    assert "--embed-cache-text, --no-embed-cache-text" in serve_help

    from mmembed.cli import main

    assert main(["serve", "--embed-cache-text", "--port", "1", "--host", "0.0.0.0"]) == 2


def test_switches_need_no_value():
    import argparse

    from mmembed.config import Settings

    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    assert Settings.from_args(parser.parse_args(["--embed-cache-text"]), {}).embed_cache_text
    env = {"MMEMBED_EMBED_CACHE_TEXT": "true"}
    assert not Settings.from_args(
        parser.parse_args(["--no-embed-cache-text"]), env
    ).embed_cache_text


def test_models_table_and_json():
    out = mmembed("models")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:2] == ["MODEL", "DIMENSIONS"]
    plus = next(line for line in lines if line.startswith("tongyi-embedding-vision-plus "))
    assert "1152, 1024, 512" in plus and "offline (conse)" in plus
    assert any(line.startswith("qwen2.5-vl-embedding ") and "fused only" in line for line in lines)
    as_json = [json.loads(line) for line in mmembed("models", "--json").stdout.splitlines()]
    assert {m["name"] for m in as_json} >= {"tongyi-embedding-vision-plus", "qwen3-vl-embedding"}


def test_pull_hints():
    offline = mmembed("pull", "tongyi-embedding-vision-plus")
    assert offline.returncode == 1
    assert "ship with the package" in offline.stderr and "--catalog open-weights" in offline.stderr
    # without the open-weights extra (huggingface_hub cannot be imported)
    code = (
        "import sys; sys.modules['huggingface_hub'] = None; from mmembed.cli import main; "
        "sys.exit(main(['pull', 'tongyi-embedding-vision-flash', '--catalog', 'open-weights']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "scripts/install open-weights" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


# -- start-up failures: one line each, and "ready" only for what serves ---------------------------
def test_port_in_use_is_one_line_and_exit_1(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "mmembed.cli", "serve", "--port", str(port)],
            env={**os.environ, "MMEMBED_CACHE_DIR": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0] and "--port" in lines[0]
    assert "ready" not in out.stderr and "worker" not in out.stderr


def without_open_weights_extra(tmp: Path) -> dict[str, str]:
    """Environment in which `import transformers` and `import huggingface_hub` fail, as
    without the open-weights extra (the shared test environment has them installed)."""
    shim = tmp / "no-extra"
    for name in ("transformers", "huggingface_hub"):
        (shim / name).mkdir(parents=True)
        (shim / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n"
        )
    return {"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}


def wait_started(proc: subprocess.Popen, log: Path, needle: str) -> str:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        text = log.read_text()
        if needle in text:
            return text
        assert proc.poll() is None, text
        time.sleep(0.2)
    raise AssertionError(log.read_text())


@pytest.mark.network
def test_missing_extra_names_each_unavailable_model_once(tmp_path):
    catalog = tmp_path / "mixed.toml"
    catalog.write_text(
        """
[backends.h]
family = "hash"
dim = 64

[backends.siglip]
family = "dual"
weights = "google/siglip2-base-patch16-224"

[models."tongyi-embedding-vision-plus"]
backend = "h"
dimensions = [64]

[models."tongyi-embedding-vision-flash"]
backend = "siglip"
dimensions = [768]

[models."multimodal-embedding-v1"]
backend = "siglip"
dimensions = [768]
"""
    )
    env = without_open_weights_extra(tmp_path)
    proc, _, log = spawn(tmp_path, {**env, "MMEMBED_CATALOG": str(catalog)})
    try:
        text = wait_started(proc, log, " ready in ")
    finally:
        stop(proc)
    assert "Traceback" not in text, text
    unavailable = [line for line in text.splitlines() if " unavailable (backend " in line]
    assert len(unavailable) == 2, text
    for name, line in zip(
        ("tongyi-embedding-vision-flash", "multimodal-embedding-v1"), unavailable, strict=True
    ):
        assert f"ERROR mmembed.engine [-] {name} unavailable (backend siglip)" in line, line
        assert "scripts/install open-weights" in line, line
    ready = next(line for line in text.splitlines() if " ready in " in line)
    assert "models: tongyi-embedding-vision-plus (2 unavailable: " in ready, ready


@pytest.mark.network
def test_open_weights_catalog_without_the_extra_never_says_ready(tmp_path):
    env = without_open_weights_extra(tmp_path)
    proc, _, log = spawn(tmp_path, env, "--catalog", "open-weights")
    try:
        text = wait_started(proc, log, "no model could be loaded")
    finally:
        stop(proc)
    assert "Traceback" not in text and " ready in " not in text, text
    unavailable = [line for line in text.splitlines() if " unavailable (backend " in line]
    from mmembed.models.catalog import load_catalog

    names = load_catalog("open-weights").models
    assert len(unavailable) == len(names), text  # one line per API name
    assert all("scripts/install open-weights" in line for line in unavailable), text
