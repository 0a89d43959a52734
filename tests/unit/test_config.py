import argparse

import pytest

from mmembed.cli import is_loopback_bind, main
from mmembed.config import Settings
from mmembed.models.catalog import load_catalog, parse_catalog


def test_env_and_flags_precedence():
    env = {
        "MMEMBED_PORT": "9001",
        "MMEMBED_API_KEYS": "a, b",
        "MMEMBED_FETCH_TOTAL_TIMEOUT_S": "2.5",
    }
    s = Settings.from_env(env)
    assert (s.port, s.api_keys, s.fetch_total_timeout_s) == (9001, ("a", "b"), 2.5)
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    s = Settings.from_args(parser.parse_args(["--port", "9002"]), env)
    assert s.port == 9002 and s.api_keys == ("a", "b")


def test_every_setting_has_env_var_and_help(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for name in Settings.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in out
        assert Settings.env_name(name) in out


def test_serve_refuses_public_bind_without_keys(capsys):
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "refusing to bind" in capsys.readouterr().err


def test_an_empty_api_key_is_refused(capsys):
    for keys in ("realkey,:model", "realkey, :a|b", "realkey,:"):
        with pytest.raises(ValueError, match="empty key"):
            Settings.from_env({"MMEMBED_API_KEYS": keys})
    assert main(["serve", "--api-keys", "realkey,:tongyi-embedding-vision-plus"]) == 2
    assert "empty key" in capsys.readouterr().err
    assert Settings.from_env({"MMEMBED_API_KEYS": "k1,k2:m"}).api_keys == ("k1", "k2:m")


def test_loopback_detection():
    assert is_loopback_bind("127.0.0.1") and is_loopback_bind("localhost")
    assert not is_loopback_bind("0.0.0.0")


def test_packaged_catalog_has_the_four_api_names_and_their_limits():
    cat = load_catalog()
    assert set(cat.models) == {
        "tongyi-embedding-vision-plus",
        "tongyi-embedding-vision-flash",
        "qwen3-vl-embedding",
        "multimodal-embedding-v1",
        "qwen2.5-vl-embedding",
        # the text-embedding API's names and the rerank API's (issue 20)
        "text-embedding-v4",
        "text-embedding-v3",
        "text-embedding-v2",
        "text-embedding-v1",
        "qwen3-vl-rerank",
        "gte-rerank-v2",
        "qwen3-rerank",
    }
    v4 = cat.models["text-embedding-v4"]
    assert v4.dimensions == (1024, 2048, 1536, 768, 512, 256, 128, 64) and v4.max_elements == 10
    assert v4.text_max_tokens == 8192 and v4.text_only and v4.default_text_type == "document"
    vl = cat.models["qwen3-vl-rerank"]
    assert (vl.task, vl.max_texts, vl.max_images, vl.max_videos) == ("rerank", 100, 40, 4)
    assert (vl.text_max_tokens, vl.max_request_tokens) == (8000, 120_000)
    assert (vl.price_text_per_mtok, vl.price_image_per_mtok) == (0.1, 0.258)
    assert cat.get("gte-rerank") is cat.models["gte-rerank-v2"]  # LangChain's default name
    assert cat.models["qwen2.5-vl-embedding"].fuse_contents
    plus = cat.models["tongyi-embedding-vision-plus"]
    assert plus.dimensions == (1152, 1024, 512, 256, 128, 64) and plus.multi_images == 8
    qwen = cat.models["qwen3-vl-embedding"]
    assert qwen.default_dimension == 2560 and qwen.fused and qwen.max_elements == 20
    assert "SGI" in qwen.image_formats and qwen.video_formats == {"MP4", "AVI", "MOV"}
    v1 = cat.models["multimodal-embedding-v1"]
    assert (v1.dimensions, v1.dimension_param, v1.max_images, v1.max_videos) == (
        (1024,),
        False,
        1,
        1,
    )


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"backends": {"b": {}}, "models": {}}, "no 'family'"),
        (
            {
                "backends": {"b": {"family": "hash"}},
                "models": {"m": {"backend": "x", "dimensions": [4]}},
            },
            "unknown backend",
        ),
        (
            {"backends": {"b": {"family": "hash"}}, "models": {"m": {"backend": "b"}}},
            "no dimensions",
        ),
        (
            {
                "backends": {"b": {"family": "hash"}},
                "models": {"m": {"backend": "b", "dimensions": [4], "bogus": 1}},
            },
            "unknown keys",
        ),
    ],
)
def test_catalog_errors(raw, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_catalog(raw)
