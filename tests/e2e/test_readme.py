"""The README's code blocks, run as written: saved as files, piped to an interpreter, or typed
into a shell, against a real server on loopback where they need one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.readme import block

pytestmark = [pytest.mark.slow]


def python(
    tmp: Path, cache: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=tmp,
        input=stdin,
        env={**os.environ, "MMEMBED_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readme-cache")


def check_embedder_output(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("(2, 256) ['text', 'image'] "), out.stdout
    assert re.search(r"input_tokens'?[=:] ?\d+", lines[0]), out.stdout
    assert re.search(r"image_tokens'?[=:] ?64\b", lines[0]), out.stdout
    assert lines[1].startswith("InvalidParameter.DataInspection "), out.stdout
    assert "Traceback" not in out.stderr, out.stderr


def test_embedder_example_runs_as_a_script(tmp_path, model_cache):
    """Saved as a file and run, with no ``if __name__ == "__main__":`` guard: the model's worker
    process must not re-run the script."""
    script = tmp_path / "example.py"
    script.write_text(block("with Embedder() as emb:", "python").code)
    check_embedder_output(python(tmp_path, model_cache, str(script)))


def test_embedder_example_runs_from_stdin(tmp_path, model_cache):
    """A ``__main__`` without a file, as in a notebook or ``python -``."""
    code = block("with Embedder() as emb:", "python").code
    check_embedder_output(python(tmp_path, model_cache, "-", stdin=code))


# -- every other block: run here, or named with the test that covers it --------------------------
# Blocks not run verbatim by this module, by their first line, with where they are covered.
COVERED_ELSEWHERE = {
    "curl -s http://127.0.0.1:8000/api/v1/services/embeddings/": (
        "tests/e2e/test_first_run.py::test_readme_first_curl_works_offline"
    ),
    "$ mmembed verify all-minilm-l6-v2": "tests/unit/test_models_verify.py (the same command)",
    "mmembed serve --ray --catalog my-catalog.toml": "tests/e2e/test_serve_ray.py (Ray Serve)",
    "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0": "tests/e2e/test_serve_ray.py (Ray Serve)",
    "scripts/ray-cluster start --workers 1": "tests/e2e/test_ray_cluster.py (scripts/ray-cluster)",
    "# head": "a plan for several GPU machines (HEAD is a placeholder); not runnable here",
    "podman build -t mmembed -f Containerfile .": "tests/e2e/test_container.py (its owner)",
    "POSTGRES_PASSWORD=change-me": "tests/e2e/test_container.py (compose settings)",
    "scripts/container build": "tests/e2e/test_container.py (scripts/container)",
    "src/mmembed/": "the source tree, not a command",
    "curl -s http://127.0.0.1:8000/api/v1/services/rerank/": (
        "tests/e2e/test_rerank_api.py (the native rerank route, the same body)"
    ),
    "import io, json, time": (
        "tests/e2e/test_batch_http.py::"
        "test_openai_sdk_batch_of_texts_and_images_equals_the_embeddings_route (the same calls)"
    ),
    "import json": ("tests/e2e/test_batch_http.py::test_dashscope_async_task_with_the_sdk_helpers"),
}


def test_every_readme_block_is_run_or_accounted_for():
    from tests.readme import blocks

    run_here = (
        "scripts/serve ",
        "import dashscope",
        "resp = dashscope.MultiModalEmbedding.call(",
        "import base64, io",
        "mmembed embed photos/ captions.csv",
        "scripts/install open-weights",
        "[backends.my-clip]",
        "[backends.offline.ray]",
        "mmembed keys create --name web-app",
    )
    unaccounted = [
        (b.line, b.first)
        for b in blocks()
        if not b.first.startswith(run_here)
        and not any(b.first.startswith(k) for k in COVERED_ELSEWHERE)
    ]
    assert not unaccounted, f"README blocks no test runs: {unaccounted}"


@pytest.mark.network
def test_sdk_blocks_run_as_written(server, tmp_path):
    """ "Calling it" and "Local files": the dashscope SDK with local files it uploads first."""
    from tests.e2e.conftest import API_KEY
    from tests.media_util import make_image, make_video

    (tmp_path / "cat.png").write_bytes(make_image("PNG", size=(96, 64)))
    (tmp_path / "clip.mp4").write_bytes(make_video("MP4", seconds=2.0))
    first = block('model="qwen3-vl-embedding",  # one fused vector', "python").code
    code = first + block('input=[{"image": "cat.png"}').code
    code = code.replace("http://127.0.0.1:8000", server.url).replace("your-key", API_KEY)
    out = subprocess.run(
        [sys.executable, "-"], input=code, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.startswith("200 vl {") and "'image_count': 1" in first, out.stdout
    assert second == "['image', 'video']", out.stdout


def test_embed_block_runs_as_written(tmp_path, model_cache):
    """`mmembed embed photos/ captions.csv ...` with mmembed on PATH (the venv's bin)."""
    import pyarrow.parquet as pq

    from tests.media_util import make_image

    (tmp_path / "photos").mkdir()
    for name in ("a.png", "b.jpg"):
        fmt = "PNG" if name.endswith(".png") else "JPEG"
        (tmp_path / "photos" / name).write_bytes(make_image(fmt, size=(80, 60)))
    (tmp_path / "captions.csv").write_text("id,text\nc1,a red square\nc2,一只猫\n")
    out = shell(block("mmembed embed photos/ captions.csv", "bash").code, tmp_path, model_cache)
    assert out.returncode == 0, out.stderr
    table = pq.read_table(tmp_path / "vectors").to_pydict()
    assert sorted(table["id"]) == ["a.png", "b.jpg", "c1", "c2"]
    assert all(len(v) == 512 for v in table["embedding"]) and not any(table["error"])


def shell(code: str, cwd: Path, cache: Path, **env: str) -> subprocess.CompletedProcess:
    """A README shell block as a user with the venv activated runs it (``mmembed`` on PATH:
    this interpreter's, whichever environment runs the tests)."""
    bin_dir = cwd / ".bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "mmembed").write_text(f'#!/bin/sh\nexec {sys.executable} -m mmembed.cli "$@"\n')
    (bin_dir / "mmembed").chmod(0o755)
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", code],
        cwd=cwd,
        env={
            **os.environ,
            "PATH": str(bin_dir) + os.pathsep + os.environ["PATH"],
            "MMEMBED_CACHE_DIR": str(cache),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_keys_block_runs_as_written(tmp_path):
    out = shell(block("mmembed keys allow-anonymous", "bash").code, tmp_path, tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("mmk-")  # the secret, once
    assert any(line.startswith("web-app ") for line in lines)
    assert "revoked key 'web-app'" in out.stdout
    assert "servers without api_keys now accept requests without a key" in out.stdout


def test_open_weights_block(tmp_path):
    """Its install line is `scripts/install open-weights` (tests/e2e/test_scripts.py runs the
    script); the pull line, with no model hub reachable, is one line and exit status 1; its
    serve line is tests/e2e/test_first_run.py's open-weights start."""
    lines = block("scripts/install open-weights", "bash").code.splitlines()
    assert lines[0].startswith("scripts/install open-weights ")
    pull = lines[1].split("#")[0].strip()
    out = shell(pull, tmp_path, tmp_path, HF_HUB_OFFLINE="1")
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr and "mmembed:" in out.stderr
    assert lines[2].startswith("mmembed serve --catalog open-weights")


def test_catalog_blocks_load(tmp_path):
    """The TOML blocks are valid catalog entries (a my-clip backend; a backend's Ray table)."""
    from mmembed.models.catalog import load_catalog

    my_clip = tmp_path / "my-clip.toml"
    my_clip.write_text(block("[backends.my-clip]", "toml").code)
    catalog = load_catalog(str(my_clip))
    assert catalog.backends["my-clip"].family == "dual"
    assert catalog.models["tongyi-embedding-vision-plus"].backend == "my-clip"

    ray_table = tmp_path / "ray.toml"
    ray_table.write_text(
        '[backends.offline]\nfamily = "conse"\n\n'
        + block("[backends.offline.ray]", "toml").code
        + '\n[models."tongyi-embedding-vision-plus"]\nbackend = "offline"\ndimensions = [512]\n'
    )
    assert load_catalog(str(ray_table)).backends["offline"].family == "conse"


def test_first_block_serves(tmp_path):
    """`scripts/serve` (first line of the README) on a copy of the checkout whose .venv is a
    stand-in that installs nothing (as in tests/e2e/test_scripts.py), then `scripts/mmembed
    models`; `scripts/test` is what CI runs (.ci/run)."""
    import time

    import httpx

    from tests.e2e.conftest import free_port
    from tests.e2e.test_scripts import fake_checkout

    code = block("scripts/serve    #", "bash").code.splitlines()
    assert [line.split()[0] for line in code] == ["scripts/serve", "scripts/test"]
    root = fake_checkout(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"MMEMBED_PORT": str(port), "MMEMBED_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen(["bash", "-c", code[0]], cwd=root, env=env)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError("scripts/serve did not get ready")
    finally:
        proc.terminate()
        proc.wait(30)
    models = subprocess.run(
        ["bash", "-c", "scripts/mmembed models"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert models.returncode == 0 and "tongyi-embedding-vision-plus" in models.stdout
