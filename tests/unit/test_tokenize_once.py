"""Texts are tokenised once per worker: the encodings token counting makes wait for the forward
pass (``torchutil.TokenIds``), which pads them instead of tokenising again. Vectors are byte-equal
whether the texts were counted first (warm) or not (cold), and equal to what the tokenizer's
own padded, truncating call gives."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from mmembed.models.base import EmbedInput
from tests.tiny_models import (
    build_clip,
    build_qwen3vl,
    build_sentence,
    build_siglip,
    close_engine,
    embed,
    make_tokenizer,
    start_engine,
)

SHORT = ["hello world", "a small red car on the beach", "一只猫", "", "the cat and the dog"]
LONG = ["dog " * 200, "cat " * 70]  # over the sentence folder's 64, CLIP's 77, SigLIP's 64


class Seen(list):
    """The texts a tokenizer was called on, in order, and how many calls that took."""

    calls = 0


class Spy:
    """A real tokenizer that records every text it tokenises (``__call__``); everything else
    (``pad``, ``decode``, ids) passes through untouched."""

    def __init__(self, inner: Any, seen: Seen) -> None:
        self._inner, self._seen = inner, seen

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        self._seen.calls += 1
        self._seen.extend([text] if isinstance(text, str) else list(text))
        return self._inner(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def spy_on(backend: Any) -> Seen:
    """Every text tokenised from now on by the backend: its own tokenizer and the counter's."""
    seen = Seen()
    backend.tokenizer = Spy(backend.tokenizer, seen)
    backend._count._tokenizer = Spy(backend._count._tokenizer, seen)
    return seen


def test_encodings_are_kept_until_taken_within_bounds():
    from mmembed.models.torchutil import TokenIds

    tok = make_tokenizer(["<pad>", "<unk>", "<s>", "</s>"], bos="<s>", eos="</s>")
    ids = TokenIds(tok, max_entries=2, max_tokens=12)
    assert ids.counts(["a cat", "the dog", "a red car"]) == [4, 4, 5]
    assert list(ids._kept) == [("the dog", True), ("a red car", True)]  # oldest out: 2 entries
    assert ids.counts(["a big red car on the beach"]) == [9]  # 5 + 9 > 12 tokens: both older out
    assert list(ids._kept) == [("a big red car on the beach", True)]
    assert ids.counts(["a cat"], special=False) == [2]  # another key than ("a cat", True)
    assert list(ids._kept) == [("a big red car on the beach", True), ("a cat", False)]

    seen = Seen()
    ids._tokenizer = Spy(ids._tokenizer, seen)
    taken = ids.take(["a cat", "a dog"], special=False)
    assert seen == ["a dog"]  # the kept one is handed over, the other tokenised now
    direct = tok(["a cat", "a dog"], add_special_tokens=False)
    assert taken == [{k: direct[k][i] for k in direct} for i in range(2)]
    assert list(ids._kept) == [("a big red car on the beach", True)]  # taken: forgotten
    assert ids._tokens == 9
    assert ids.counts(["dog " * 20]) == [22]  # alone over the bound: not kept
    assert list(ids._kept) == [("a big red car on the beach", True)] and ids._tokens == 9


def _sentence(folder: Any, runtime: str) -> Any:
    from mmembed.models.registry import create_backend

    backend = create_backend(
        "sentence", {"weights": str(folder), "runtime": runtime, "cache_dir": f"{folder}-cache"}
    )
    backend.load()
    return backend


@pytest.fixture(scope="module")
def sentence_folder(tmp_path_factory):
    return build_sentence(tmp_path_factory.mktemp("sentence"))


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_sentence_warm_and_cold_vectors_are_byte_equal(sentence_folder, runtime):
    backend = _sentence(sentence_folder, runtime)
    texts = SHORT + LONG
    cold = backend.embed_texts(texts)
    seen = spy_on(backend)
    assert backend.count_tokens_batch(texts)[:2] == [4, 9]
    warm = backend.embed_texts(texts)
    assert warm.tobytes() == cold.tobytes()
    # Each text tokenised once across count and pass; only the over-long ones again, cut.
    assert sorted(seen) == sorted(texts + LONG)


def test_sentence_batches_equal_the_tokenizers_own(sentence_folder):
    backend = _sentence(sentence_folder, "torch")
    texts = SHORT + LONG
    backend.count_tokens_batch(texts[::2])  # some counted, some not
    mine = backend._tokenize(texts, "np")
    own = backend.tokenizer(
        texts, padding=True, truncation=True, max_length=backend.max_length, return_tensors="np"
    )
    assert set(mine) == set(own)
    for name in own:
        assert mine[name].dtype == own[name].dtype and np.array_equal(mine[name], own[name])


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_sentence_through_the_engine_tokenises_each_text_once(sentence_folder, tmp_path, runtime):
    """The engine counts (usage) and embeds: the model's tokenizer sees each text once, the
    request's texts in one call."""
    catalog = {
        "backends": {
            "mini": {"family": "sentence", "weights": str(sentence_folder), "runtime": runtime}
        },
        "models": {"text-model": {"backend": "mini", "dimensions": [32]}},
    }
    engine = start_engine(catalog, tmp_path, isolation="thread")
    try:
        backend = engine._backends["mini"].backend
        seen = spy_on(backend)
        texts = ["hello world", "a cat on the beach", "the dog"]
        result = embed(engine, "text-model", [{"text": t} for t in texts])
        assert sorted(seen) == sorted(texts) and seen.calls == 1
        assert result.usage.input_tokens == 4 + 7 + 4
        fresh = _sentence(sentence_folder, runtime).embed_texts(texts)
        assert np.allclose(result.vectors, fresh, atol=1e-6)
    finally:
        close_engine(engine)


def test_the_worker_counts_in_one_call_and_keeps_the_encodings(sentence_folder):
    """The worker's side (``BackendHost``): one tokenizer call for a group of counts; the pass
    then tokenises nothing."""
    from mmembed.engine.contained import BackendHost

    host = BackendHost("sentence", {"weights": str(sentence_folder), "runtime": "torch"})
    seen = spy_on(host.backend)
    texts = ["hello world", "a cat on the beach"]
    assert host.count_tokens(texts) == [4, 7]
    assert seen == texts
    host.embed([EmbedInput(texts=[t]) for t in texts])
    assert seen == texts


@pytest.fixture(scope="module", params=["clip", "siglip"])
def dual_folder(request, tmp_path_factory):
    build = {"clip": build_clip, "siglip": build_siglip}[request.param]
    return build(tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize(
    ("long_text", "padding"),
    [("chunks", "auto"), ("truncate", "auto"), ("truncate", "max_length")],
)
def test_dual_warm_and_cold_vectors_are_byte_equal(dual_folder, long_text, padding):
    from mmembed.models.registry import create_backend

    options = {"weights": str(dual_folder), "long_text": long_text}
    if "siglip" not in str(dual_folder):
        options["text_padding"] = padding
    elif padding != "auto":
        pytest.skip("SigLIP texts are always padded to the model's length")
    backend = create_backend("dual", options)
    backend.load()
    texts = SHORT + LONG
    cold = backend.embed_texts(texts, None)
    seen = spy_on(backend)
    backend.count_tokens_batch(texts)
    warm = backend.embed_texts(texts, None)
    assert warm.tobytes() == cold.tobytes()
    # Each short text tokenised once across count and pass (long CLIP texts are cut or
    # chunked by the tokenizer again; SigLIP builds even those from the counted ids).
    assert sorted(t for t in seen if t in SHORT) == sorted(SHORT)
    if backend.siglip:
        assert sorted(seen) == sorted(texts)


def test_qwen3vl_pass_tokenises_each_sequence_once(tmp_path):
    from mmembed.models.registry import create_backend

    backend = create_backend("qwen3vl", {"weights": str(build_qwen3vl(tmp_path))})
    backend.load()
    items = [EmbedInput(texts=[t]) for t in SHORT]
    before = backend.embed(items)
    seen = spy_on(backend)
    again = backend.embed(items)
    assert again.tobytes() == before.tobytes()
    assert len(seen) == len(items)  # the rendered sequences, once each (was: twice)
    assert all(s.count("<|im_start|>") == 3 for s in seen)
