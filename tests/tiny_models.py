"""Tiny random-weight models of each open-weight family, built from configs and saved like real
checkpoints (config, safetensors, tokenizer, image processor), so tests serve them through the
normal catalog path (``weights = "<folder>"``) without any download.

Tokenizers are ``tokenizers`` WordLevel models over a small word list, wrapped in
``PreTrainedTokenizerFast``; unknown words map to an unknown token, which is all random weights
need. Every builder is seeded: the same call makes the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

_WORD_LIST = (
    "a an the of in on at to and with is are this that photo picture image video cat cats dog "
    "dogs car red blue green yellow white black small big cup coffee woman man beach sunset "
    "playing general multimodal representation hello world async check dimension sports "
    "represent user's input retrieve images for query text . , ' ! ? : - < > seconds "
    "0 1 2 3 4 5 6 7 8 9 system user assistant 一 只 猫 狗 红 色"
)
WORDS = _WORD_LIST.split(" ")


def make_tokenizer(
    specials: list[str],
    *,
    bos: str | None = None,
    eos: str | None = None,
    pad: str = "<pad>",
    unk: str = "<unk>",
    lowercase: bool = False,
    max_length: int = 512,
    padding_side: str = "right",
    extra_words: tuple[str, ...] = (),
):
    """A WordLevel tokenizer whose first ids are ``specials`` (in order), then ``WORDS`` (and
    ``extra_words``)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [*specials, *WORDS, *extra_words]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    if bos or eos:
        single = " ".join(x for x in (bos, "$A", eos) if x)
        pair = " ".join(x for x in (bos, "$A", eos, "$B", eos) if x)
        tok.post_processor = processors.TemplateProcessing(
            single=single,
            pair=pair,
            special_tokens=[(t, vocab[t]) for t in (bos, eos) if t],
        )
    kwargs = {
        "pad_token": pad,
        "unk_token": unk,
        "model_max_length": max_length,
        "padding_side": padding_side,
    }
    if bos:
        kwargs["bos_token"] = bos
    if eos:
        kwargs["eos_token"] = eos
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.add_special_tokens(
        {"additional_special_tokens": [t for t in specials if t not in (bos, eos, pad, unk)]}
    )
    return fast


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def build_sentence(
    folder: Path, seed: int = 0, lowercase: bool = True, padding_side: str = "right"
) -> Path:
    """A 2-layer BERT with a sentence-transformers folder layout, as releases before 6 wrote it
    (legacy ``pooling_mode_mean_tokens`` flag, Normalize)."""
    from transformers import BertConfig, BertModel

    _seed(seed)
    tok = make_tokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
        bos="[CLS]",
        eos="[SEP]",
        pad="[PAD]",
        unk="[UNK]",
        lowercase=lowercase,
        max_length=128,
        padding_side=padding_side,
    )
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    BertModel(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 64, "do_lower_case": False})
    )
    return folder


def build_st_folder(
    folder: Path,
    pooling_mode: str | list[str] = "mean",
    *,
    dense: bool = False,
    normalize: bool = True,
    do_lower_case: bool = False,
    include_prompt: bool = True,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    padding_side: str = "right",
    seed: int = 0,
) -> Path:
    """A sentence-transformers folder written by sentence-transformers itself (its current
    format) around the tiny BERT: Transformer, Pooling, optionally Dense (32 -> 16, tanh) and
    Normalize, with prompts. ``do_lower_case`` pairs with a tokenizer that does not
    lower-case by itself, so only lower-casing by the folder's setting finds the words."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    base = build_sentence(
        folder.parent / f"{folder.name}-base",
        seed=seed,
        lowercase=not do_lower_case,
        padding_side=padding_side,
    )
    transformer = models.Transformer(str(base), do_lower_case=do_lower_case, max_seq_length=64)
    pooling = models.Pooling(32, pooling_mode=pooling_mode, include_prompt=include_prompt)
    modules = [transformer, pooling]
    if dense:
        torch.manual_seed(seed + 100)
        modules.append(models.Dense(pooling.get_embedding_dimension(), 16))
    if normalize:
        modules.append(models.Normalize())
    model = SentenceTransformer(
        modules=modules, prompts=prompts, default_prompt_name=default_prompt_name, device="cpu"
    )
    model.save(str(folder))
    return folder


def _tower(**extra: object) -> dict:
    """A 2-layer, 32-wide transformer tower config (text or vision), with ``extra`` keys."""
    base = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    return {**base, "num_attention_heads": 2, **extra}


def build_clip(folder: Path, seed: int = 1) -> Path:
    """A 2+2-layer CLIP at 32 px, 24-d projections."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    _seed(seed)
    tok = make_tokenizer(
        ["<pad>", "<unk>", "<bos>", "<eos>"], bos="<bos>", eos="<eos>", max_length=77
    )
    ids = tok.convert_tokens_to_ids(["<pad>", "<bos>", "<eos>"])
    config = CLIPConfig(
        text_config=_tower(
            vocab_size=len(tok),
            max_position_embeddings=77,
            pad_token_id=ids[0],
            bos_token_id=ids[1],
            eos_token_id=ids[2],
        ),
        vision_config=_tower(
            image_size=32,
            patch_size=8,
        ),
        projection_dim=24,
    )
    CLIPModel(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


def build_siglip(folder: Path, seed: int = 2, eos: bool = True) -> Path:
    """A 2+2-layer SigLIP at 32 px (the layout of the fixed-resolution SigLIP2 checkpoints).

    The tokenizer behaves as the SigLIP2 checkpoints' files do under transformers 5, not as the
    model was trained: Gemma's special ids (pad 0, eos 1, bos 2, unk 3), a BOS and no EOS added,
    left padding (Gemma's default), an attention mask, and no lower-casing (the files name
    ``GemmaTokenizer``). Only a backend that builds SigLIP's text layout itself matches the
    reference. ``eos=False`` leaves the EOS token out of the vocabulary altogether."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    _seed(seed)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if eos else ["<pad>", "<bos>", "<unk>"]
    tok = make_tokenizer(specials, bos="<bos>", max_length=64, padding_side="left")
    if eos:
        tok.eos_token = "<eos>"
    ids = tok.convert_tokens_to_ids(["<pad>", "<bos>"])
    config = SiglipConfig(
        text_config=_tower(
            vocab_size=len(tok),
            max_position_embeddings=64,
            pad_token_id=ids[0],
            bos_token_id=ids[1],
            eos_token_id=tok.eos_token_id if eos else 1,
        ),
        vision_config=_tower(
            image_size=32,
            patch_size=8,
        ),
    )
    SiglipModel(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


# Qwen3-VL's chat layout (as its chat template renders it): a system turn with the
# instruction, one user turn with videos, images, then text, and the assistant prefix.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message.role }}\n"
    "{%- if message.content is string -%}{{ message.content }}"
    "{%- else -%}{%- for item in message.content -%}"
    "{%- if item.type == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item.type == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif item.type == 'text' -%}{{ item.text }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def build_qwen3vl(folder: Path, seed: int = 3) -> Path:
    """A Qwen3-VL with a 2-layer, 64-wide language model and a 2-block vision tower (16 px
    patches, 2x2 merge, temporal patch 2, one deepstack layer), saved as the embedding
    checkpoints are: a ``Qwen3VLModel`` under ``model.``, plus tokenizer, chat template and
    image processor."""
    from transformers import (
        Qwen2VLImageProcessorPil,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    _seed(seed)
    tok = make_tokenizer(QWEN_SPECIALS, pad="<|endoftext|>", max_length=32768)
    tok.chat_template = QWEN_CHAT_TEMPLATE
    ids = dict(zip(QWEN_SPECIALS, tok.convert_tokens_to_ids(QWEN_SPECIALS), strict=True))
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,  # no lm_head in the file, like the embedding checkpoints
    )
    Qwen3VLForConditionalGeneration(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 64 * 64, "longest_edge": 256 * 256},
    ).save_pretrained(folder)
    return folder


# The words of the Qwen3-VL-Reranker prompt (system turn, <Instruct>/<Query>/<Document>, the
# default instruction) and the answer pair, so that a changed template or token pair changes
# the token ids and is seen by the parity tests, not hidden behind <unk>.
_RERANK_TEXT = (
    "Judge whether Document meets requirements based Query Instruct provided Note answer can "
    'only be yes no Given search query retrieve relevant candidates answer NULL " ". >: '
    "Yes No Question Passage web passages"
)
RERANK_WORDS = tuple(_RERANK_TEXT.split())


def build_qwen3vl_reranker(folder: Path, seed: int = 4, tied: bool = False) -> Path:
    """A Qwen3-VL-Reranker as the checkpoints are saved: a ``Qwen3VLForConditionalGeneration``
    (2-layer, 64-wide language model; 2-block vision tower) with its LM head (``tied``: the
    2B's tied embeddings), tokenizer with "yes"/"no" and the prompt's words, chat template
    and image processor."""
    from transformers import (
        Qwen2VLImageProcessorPil,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    _seed(seed)
    tok = make_tokenizer(
        QWEN_SPECIALS, pad="<|endoftext|>", max_length=32768, extra_words=RERANK_WORDS
    )
    tok.chat_template = QWEN_CHAT_TEMPLATE
    ids = dict(zip(QWEN_SPECIALS, tok.convert_tokens_to_ids(QWEN_SPECIALS), strict=True))
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 4096,
            "initializer_range": 0.2,  # logits far enough apart that a changed recipe shows
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tied,
    )
    Qwen3VLForConditionalGeneration(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 64 * 64, "longest_edge": 256 * 256},
    ).save_pretrained(folder)
    return folder


def build_cross_encoder(folder: Path, seed: int = 5, activation: str | None = None) -> Path:
    """A sentence-transformers ``CrossEncoder`` folder written by sentence-transformers itself
    around a 2-layer BERT with one label (``activation``: the dotted torch class it records;
    None: its default, sigmoid)."""
    import importlib

    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification

    _seed(seed)
    tok = make_tokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
        bos="[CLS]",
        eos="[SEP]",
        pad="[PAD]",
        unk="[UNK]",
        lowercase=True,
        max_length=128,
    )
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
        num_labels=1,
        initializer_range=0.2,
    )
    base = folder.parent / f"{folder.name}-hf"
    BertForSequenceClassification(config).eval().save_pretrained(base)
    tok.save_pretrained(base)
    kwargs = {}
    if activation is not None:
        module, _, name = activation.rpartition(".")
        kwargs["activation_fn"] = getattr(importlib.import_module(module), name)()
    CrossEncoder(str(base), device="cpu", max_length=48, **kwargs).save(str(folder))
    return folder


# -- serving helpers -----------------------------------------------------------------------------
def png_uri(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def data_uri(data: bytes, mime: str) -> str:
    import base64

    return f"data:{mime};base64," + base64.b64encode(data).decode()


def start_engine(catalog: dict, cache_dir: Path, isolation: str = "process"):
    """An in-process engine over ``catalog`` (a TOML-shaped dict), loaded. ``isolation``
    "thread" keeps the backends in this process, for tests that look inside them."""
    from mmembed.config import Settings
    from mmembed.engine.engine import Engine
    from mmembed.models.catalog import parse_catalog

    settings = Settings(cache_dir=str(cache_dir), model_isolation=isolation)
    engine = Engine(settings, parse_catalog(catalog))
    engine.load()
    return engine


def embed(engine, model: str, items: list[dict], **kw):
    import asyncio

    from mmembed.types import ContentItem, EmbedRequest

    req = EmbedRequest(model, [ContentItem(index=i, **it) for i, it in enumerate(items)], **kw)
    return asyncio.run(engine.embed(req))


def close_engine(engine) -> None:
    import asyncio

    asyncio.run(engine.aclose())


def cosines(a, b):
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
