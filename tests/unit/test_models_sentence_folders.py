"""Family ``sentence`` against sentence-transformers itself, on tiny folders that
sentence-transformers wrote: every pooling mode (and a concatenation), with and without Dense
and Normalize, either padding side, ``include_prompt``, ``do_lower_case`` and the folder's
prompts. The reference is ``SentenceTransformer(folder).encode``."""

from __future__ import annotations

import json

import pytest

from mmembed.models.registry import create_backend
from tests.tiny_models import build_sentence, build_st_folder, cosines

# Different lengths (padding matters), upper case (lower-casing matters), one over the limit.
TEXTS = ["hello world", "A small RED car on the beach", "cat", "dog " * 200, "一只猫"]
MODES = ["mean", "cls", "max", "lasttoken", "weightedmean", "mean_sqrt_len_tokens", ["cls", "mean"]]


def reference(folder, texts, **kwargs):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return model.encode(texts, convert_to_numpy=True, **kwargs)


def served(folder, runtime="torch", **options):
    backend = create_backend("sentence", {"weights": str(folder), "runtime": runtime, **options})
    backend.load()
    return backend


def assert_parity(folder, runtime="torch", ref_kwargs=None, **options):
    backend = served(folder, runtime, **options)
    expected = reference(folder, TEXTS, **(ref_kwargs or {}))
    got = backend.embed_texts(TEXTS)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert cosines(got, expected).min() >= 0.9999
    return backend


@pytest.mark.parametrize("dense", [False, True], ids=["plain", "dense"])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m if isinstance(m, str) else "+".join(m))
def test_pooling_modes_match_sentence_transformers(tmp_path, mode, dense):
    folder = build_st_folder(tmp_path / "st", mode, dense=dense, normalize=not dense)
    config = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert config["pooling_mode"] == mode  # the current format: a string or a list
    backend = assert_parity(folder)
    modes = 1 if isinstance(mode, str) else len(mode)
    assert backend.native_dim == (16 if dense else 32 * modes)


@pytest.mark.parametrize("mode", ["lasttoken", "cls", "weightedmean", "mean"])
def test_left_padding(tmp_path, mode):
    assert_parity(build_st_folder(tmp_path / "st", mode, padding_side="left"))


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("mode", ["mean", "cls", "lasttoken", "weightedmean"])
def test_include_prompt_false_leaves_the_prompt_out(tmp_path, mode, padding_side):
    folder = build_st_folder(
        tmp_path / "st",
        mode,
        include_prompt=False,
        prompts={"query": "query : ", "document": ""},
        default_prompt_name="query",
        padding_side=padding_side,
    )
    backend = assert_parity(folder)
    assert backend.prompt == "query : " and backend._prompt_length == 3  # [CLS] query :


def test_folder_prompts_default_and_by_name(tmp_path):
    prompts = {"query": "query : ", "passage": "picture of "}
    folder = build_st_folder(tmp_path / "st", prompts=prompts, default_prompt_name="passage")
    assert served(folder).prompt == "picture of "
    assert_parity(folder)
    assert_parity(folder, prompt_name="query", ref_kwargs={"prompt_name": "query"})
    with pytest.raises(ValueError, match="prompt_name 'nope'"):
        served(folder, prompt_name="nope")


def test_do_lower_case(tmp_path):
    folder = build_st_folder(tmp_path / "st", do_lower_case=True)
    backend = assert_parity(folder)
    assert backend.count_tokens("A RED CAR") == backend.count_tokens("a red car")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_onnx_runtime_pools_like_torch(tmp_path, padding_side, caplog):
    folder = build_st_folder(
        tmp_path / "st", ["cls", "lasttoken"], dense=True, padding_side=padding_side
    )
    cache = tmp_path / "cache"
    with caplog.at_level("WARNING", logger="mmembed.models"):
        assert_parity(folder, runtime="onnxruntime", cache_dir=str(cache))
    assert "differs from torch" not in caplog.text  # the traced graph passed its check
    assert len(list(cache.glob("*.onnx"))) == 1
    assert_parity(folder, runtime="onnxruntime", cache_dir=str(cache))  # from the cache


def test_onnx_check_refuses_a_graph_that_ignores_the_mask(tmp_path):
    """The check a traced export must pass: the real export passes it, and the same graph fed
    an all-ones mask (what a tracer that baked in the unpadded branch would compute) fails."""
    import numpy as np

    from mmembed.models import onnxrt

    folder = build_st_folder(tmp_path / "st", "mean")
    cache = tmp_path / "cache"
    names = served(folder, "onnxruntime", cache_dir=str(cache))._input_names
    (path,) = cache.glob("*.onnx")
    run = onnxrt.session(str(path), 1)
    ref = served(folder)

    def encoder(*tensors):
        return ref.model(**dict(zip(names, tensors, strict=True))).last_hidden_state

    def unmasked(feed):
        return run({**feed, "attention_mask": np.ones_like(feed["attention_mask"])})

    assert ref._matches(encoder, names, run)
    assert not ref._matches(encoder, names, unmasked)


@pytest.mark.parametrize("fault", ["differs from torch", "tracer failed"])
def test_onnx_traced_export_falls_back_to_torch_export(tmp_path, monkeypatch, caplog, fault):
    """A traced graph that differs from torch, or a model the tracer cannot follow, is served by
    ``torch.export``'s graph; the refusal is remembered, so the next start does not trace again."""
    import torch

    from mmembed.models.sentence import SentenceBackend

    traced = []
    if fault == "differs from torch":
        monkeypatch.setattr(SentenceBackend, "_matches", lambda *args: traced.append(1) or False)
    else:
        export = torch.onnx.export

        def failing(*args, dynamo=True, **kwargs):
            if not dynamo:
                traced.append(1)
                raise RuntimeError("tracer failed")
            return export(*args, dynamo=dynamo, **kwargs)

        monkeypatch.setattr(torch.onnx, "export", failing)
    folder = build_st_folder(tmp_path / "st", "mean")
    cache = tmp_path / "cache"
    with caplog.at_level("WARNING", logger="mmembed.models"):
        assert_parity(folder, runtime="onnxruntime", cache_dir=str(cache))
    assert f"{fault}; exporting with torch.export" in caplog.text
    assert len(list(cache.glob("*.onnx"))) == 1  # only the torch.export graph was stored
    assert traced == [1]
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmembed.models"):
        assert_parity(folder, runtime="onnxruntime", cache_dir=str(cache))
    assert traced == [1]  # not traced again
    assert f"{fault} (remembered from an earlier start); exporting with torch.export" in (
        caplog.text
    )
    (marker,) = cache.glob("*.refused")  # another torch version may trace it: try again
    marker.write_text("torch 0.0\n" + marker.read_text().partition("\n")[2])
    assert_parity(folder, runtime="onnxruntime", cache_dir=str(cache))
    assert traced == [1, 1]


def test_legacy_folder_format(tmp_path):
    """Folders written before sentence-transformers 6: ``pooling_mode_*`` flags,
    ``word_embedding_dimension``, ``max_seq_length`` in ``sentence_bert_config.json``."""
    folder = build_sentence(tmp_path / "legacy")
    backend = assert_parity(folder)
    assert backend.pooling == "mean" and backend.max_length == 64


def test_bfloat16_runs_in_torch_and_onnxruntime_stays_float32(tmp_path):
    """``dtype = "bfloat16"`` (for CPUs with bf16 matrix units) runs in torch under ``auto``,
    close to the float32 reference; asking ONNX Runtime, which runs the float32 export, for
    bfloat16 is refused by name rather than silently ignored."""
    import torch

    folder = build_st_folder(tmp_path / "st", "mean")
    backend = served(folder, "auto", dtype="bfloat16", cache_dir=str(tmp_path / "cache"))
    assert backend.runtime == "torch" and backend.dtype == torch.bfloat16
    assert cosines(backend.embed_texts(TEXTS), reference(folder, TEXTS)).min() >= 0.99
    assert served(folder, "auto", cache_dir=str(tmp_path / "cache")).runtime == "onnxruntime"
    with pytest.raises(ValueError, match="onnxruntime runs float32 only"):
        served(folder, "onnxruntime", dtype="bfloat16")
