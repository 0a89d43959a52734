"""The README's code blocks, run as written: saved as files, piped to an interpreter, or typed
into a shell, against a real server on loopback where they need one."""

from __future__ import annotations

import os
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
    assert lines[0].startswith("(2, 256) ['text', 'image'] {"), out.stdout
    assert "'input_tokens':" in lines[0] and "'image_tokens': 64" in lines[0]
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
