"""Admission at the door, bounded token counting, and typed backend options.

- A request's estimated cost is admitted or refused (429) before its media is fetched.
- A text too long to be within the token limit is refused by its length, without tokenising.
- A misspelt or mistyped backend option is an error when the catalog loads."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mmembed.config import Settings
from mmembed.engine import limits
from mmembed.engine.admission import Admission, estimate
from mmembed.engine.engine import Engine
from mmembed.errors import ApiError, ErrorCode
from mmembed.models.catalog import parse_catalog
from mmembed.types import ContentItem, EmbedRequest
from tests.media_util import HostileOrigin, make_image

CATALOG = {
    "backends": {"h": {"family": "hash", "dim": 16}},
    "models": {
        "m": {"backend": "h", "dimensions": [16], "multi_images": 8, "text_max_tokens": 100},
        "v": {"backend": "h", "dimensions": [16], "max_video_frames": 12},
    },
}


def items(*specs: dict) -> list[ContentItem]:
    return [ContentItem(index=i, **s) for i, s in enumerate(specs)]


def test_estimate_counts_texts_images_and_video_frames():
    spec = parse_catalog(CATALOG).models["v"]
    cost = estimate(
        spec,
        items({"text": "a"}, {"text": "x" * 10_000}, {"image": "u"}, {"video": "u"}),
    )
    assert cost == 1 + 3 + 1 + 12


def test_idle_backend_admits_anything_busy_one_refuses():
    adm = Admission(capacity=100)
    with adm.admit(500):  # alone: admitted however large
        with pytest.raises(ApiError) as info, adm.admit(1):
            pass
        assert info.value.error is ErrorCode.THROTTLING
    with adm.admit(60), adm.admit(15):  # large requests share up to 3/4 of the capacity
        assert adm.admitted == 75
    assert adm.admitted == 0 and adm.rejected == 1


def test_large_requests_leave_room_for_small_ones():
    adm = Admission(capacity=1024)
    with adm.admit(512):  # the largest multi_images request (64 × 8)
        with pytest.raises(ApiError), adm.admit(512):  # a second: over 3/4 of the capacity
            pass
        with adm.admit(200), adm.admit(1), adm.admit(16):  # one-text requests still get in
            assert adm.admitted == 729


def test_throttled_before_media_is_fetched():
    release = threading.Event()
    png = make_image("PNG")

    def gate(h):
        release.wait(30)
        h.reply(200, png, "image/png")

    with HostileOrigin() as origin:
        origin.route("/gate.png", gate)
        other = origin.serve("/other.png", png, "image/png")
        settings = Settings(
            model_isolation="thread", admit_max_units=10, fetch_allow_hosts=("127.0.0.1",)
        )
        engine = Engine(settings, parse_catalog(CATALOG))
        engine.load()

        async def go():
            big = EmbedRequest("m", items({"multi_images": [origin.url("/gate.png")] * 8}))
            small = EmbedRequest("m", items({"image": other}, {"image": other}, {"text": "t"}))
            first = asyncio.ensure_future(engine.embed(big))
            while "/gate.png" not in origin.paths():
                await asyncio.sleep(0.01)
            with pytest.raises(ApiError) as info:
                await engine.embed(small)
            fetched_while_busy = "/other.png" in origin.paths()
            release.set()
            await first
            after = await engine.embed(small)  # admitted once the first is answered
            await engine.aclose()
            return info.value, fetched_while_busy, after

        err, fetched, after = asyncio.run(go())
    assert err.error is ErrorCode.THROTTLING and err.headers["Retry-After"] == "1"
    assert not fetched  # refused at the door: its media was never downloaded
    assert after.vectors.shape == (3, 16)
    assert engine.batch_stats()["h"]["admission_rejected"] == 1


class CountingEngine(Engine):
    counted: list[int]

    @staticmethod
    async def _tokens(backend, texts, where):
        CountingEngine.counted.extend(len(t) for t in texts)
        return [backend.count_tokens(t) for t in texts]


def test_overlong_text_is_refused_without_tokenising():
    CountingEngine.counted = []
    engine = CountingEngine(Settings(model_isolation="thread"), parse_catalog(CATALOG))
    engine.load()
    text = "w " * (100 * limits.MAX_CHARS_PER_TOKEN)  # 2× the characters 100 tokens may have
    with pytest.raises(ApiError) as info:
        asyncio.run(engine.embed(EmbedRequest("m", items({"text": "ok"}, {"text": text}))))
    assert info.value.error is ErrorCode.INVALID_PARAMETER
    assert info.value.message.startswith("input.contents[1].text: 3200 characters")
    assert CountingEngine.counted == []  # nothing went to the tokenizer


def test_long_text_is_counted_on_a_prefix_first():
    spec = parse_catalog(
        {
            "backends": CATALOG["backends"],
            "models": {"q": {"backend": "h", "dimensions": [16], "text_max_tokens": 32000}},
        }
    ).models["q"]
    text = "ab " * 100_000  # 300,000 characters
    prefix = limits.prefix_to_count(spec, text)
    assert prefix is not None and len(prefix) == 128_000
    assert limits.prefix_to_count(spec, "short text") is None
    with pytest.raises(ApiError) as info:
        limits.check_tokens(spec, "input.contents[0].text", 42_668, prefix=len(prefix))
    assert "its first 128000 characters are 42668 tokens" in info.value.message


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"dimm": 8}, "unknown option 'dimm' for family 'hash'"),
        ({"dim": "8"}, "option 'dim' of family 'hash' must be int, not str"),
        ({"crash_on": 3}, "must be str"),
    ],
)
def test_backend_options_are_checked_when_the_catalog_loads(options, fragment):
    raw = {
        "backends": {"h": {"family": "hash", **options}},
        "models": {"m": {"backend": "h", "dimensions": [8]}},
    }
    with pytest.raises(ValueError) as info:
        parse_catalog(raw, source="cat.toml")
    assert "cat.toml: backends.h: " in str(info.value) and fragment in str(info.value)
