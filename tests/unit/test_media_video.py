"""Video sniffing and frame sampling: every container, frame choice and timing, seeking, limits
and hostile bytes. Generated frames show their index (``frame_index``), so the test can check
which frame was picked, not only how many."""

from __future__ import annotations

import math
import time
from fractions import Fraction

import av
import pytest

from mmembed.errors import ApiError, ErrorCode
from mmembed.media import video
from mmembed.media.video import sample_video, sniff_video_format
from mmembed.types import VideoClip
from tests.media_util import (
    VIDEO_FORMATS,
    corrupted,
    frame_index,
    index_frame,
    make_video,
    truncated,
)

RATE = 25


def sample(data: bytes, fps: float = 1.0, max_frames: int = 64, formats=VIDEO_FORMATS, **kw):
    return sample_video(data, fps=fps, max_frames=max_frames, formats=formats, **kw)


def refused(data: bytes, code: ErrorCode, *fragments: str, **kw) -> ApiError:
    with pytest.raises(ApiError) as info:
        sample(data, **kw)
    assert info.value.error is code, info.value
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    return info.value


def assert_consistent(clip: VideoClip, rate: int = RATE) -> None:
    """Each frame shows the index its timestamp names, and targets are evenly spread."""
    n = len(clip.frames)
    assert len(clip.timestamps) == n
    for i, (image, ts) in enumerate(zip(clip.frames, clip.timestamps, strict=True)):
        assert image.mode == "RGB"
        assert frame_index(image) == round(ts * rate) % 256, (i, ts)
        target = (i + 0.5) * clip.duration / n
        assert target - 1 / rate - 1e-6 <= ts <= target + 1e-6, (i, ts, target)  # shown at target


# -- every container -----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", VIDEO_FORMATS)
def test_every_container_samples(fmt: str) -> None:
    data = make_video(fmt)
    assert sniff_video_format(data) == ("MPEG" if fmt == "MPG" else fmt)
    clip = sample(data, formats=[fmt])
    assert clip.duration == pytest.approx(2.0, abs=0.01)
    assert clip.timestamps == pytest.approx([0.48, 1.48], abs=1e-6)
    assert [frame_index(f) for f in clip.frames] == [12, 37]
    assert all(f.size == (64, 48) for f in clip.frames)
    assert_consistent(clip)


@pytest.mark.parametrize(
    ("fps", "seconds", "max_frames", "count"),
    [
        (1.0, 2.0, 64, 2),
        (0.5, 3.0, 64, 2),  # ceil(1.5)
        (0.0, 2.0, 64, 1),  # fps 0 still gives one frame, from the middle
        (1.0, 6.0, 4, 4),  # capped by max_frames
        (1.0, 6.0, 0, 1),
        (0.25, 2.0, 64, 1),
        (1.0, 0.4, 64, 1),  # shorter than a second
    ],
)
def test_frame_counts_and_timestamps(fps: float, seconds: float, max_frames: int, count: int):
    clip = sample(make_video("MP4", seconds=seconds), fps=fps, max_frames=max_frames)
    assert len(clip.frames) == count
    assert clip.duration == pytest.approx(seconds, abs=0.01)
    assert_consistent(clip)


def test_fps_zero_picks_the_middle() -> None:
    clip = sample(make_video("MKV", seconds=2.0), fps=0)
    assert clip.timestamps == pytest.approx([1.0]) and frame_index(clip.frames[0]) == 25


def test_dense_sampling_repeats_frames_rather_than_inventing_them() -> None:
    clip = sample(make_video("MP4", seconds=1.0, rate=2), fps=1000, max_frames=8)
    assert len(clip.frames) == 8
    assert [round(t, 3) for t in clip.timestamps] == [0.0] * 4 + [0.5] * 4
    assert [frame_index(f) for f in clip.frames] == [0] * 4 + [1] * 4


def test_mpeg_duration_is_measured_not_estimated() -> None:
    """MPEG program streams start at a non-zero time and have no duration header."""
    for fmt in ("MPEG", "MPG"):
        clip = sample(make_video(fmt, seconds=3.0), fps=1)
        assert clip.duration == pytest.approx(3.0, abs=0.01)
        assert len(clip.frames) == 3
        assert_consistent(clip)


def test_frames_are_downscaled_to_min_side() -> None:
    clip = sample(make_video("MP4", size=(320, 240)), min_side=120)
    assert [f.size for f in clip.frames] == [(160, 120)] * 2
    assert_consistent(clip)
    clip = sample(make_video("MP4", size=(320, 240)), min_side=480)  # never upscaled
    assert [f.size for f in clip.frames] == [(320, 240)] * 2


# -- seeking -------------------------------------------------------------------------------------
def run_spied(monkeypatch: pytest.MonkeyPatch, data: bytes, **kw) -> tuple[VideoClip, object]:
    seen: list[video._Sampler] = []

    class Spy(video._Sampler):
        def run(self) -> VideoClip:
            seen.append(self)
            return super().run()

    monkeypatch.setattr(video, "_Sampler", Spy)
    return sample(data, **kw), seen[0]


@pytest.mark.parametrize(("fmt", "rate"), [("MP4", 10), ("MKV", 10), ("AVI", 10), ("FLV", 10)])
def test_long_videos_are_sampled_by_seeking(monkeypatch, fmt: str, rate: int) -> None:
    data = make_video(fmt, seconds=60.0, rate=rate, gop=rate)
    clip, sampler = run_spied(monkeypatch, data, fps=0.1)
    total = 60 * rate
    assert len(clip.frames) == 6
    assert clip.duration == pytest.approx(60.0, abs=0.05)
    assert_consistent(clip, rate)
    assert sampler.decoded < total / 3, f"decoded {sampler.decoded} of {total} frames"


def test_sparse_keyframes_still_give_the_right_frames(monkeypatch) -> None:
    data = make_video("MP4", seconds=20.0, rate=10, gop=250)  # one keyframe only
    clip, sampler = run_spied(monkeypatch, data, fps=0.5)
    assert len(clip.frames) == 10
    assert_consistent(clip, 10)
    assert sampler.decoded <= 200 + 5  # straight through once, no re-decoding


# -- refusals ------------------------------------------------------------------------------------
def test_unsupported_container_is_named() -> None:
    error = refused(make_video("AVI"), ErrorCode.DATA_INSPECTION, formats=["MP4", "MOV"])
    assert error.message == "video format AVI is not supported by this model (accepted: MP4, MOV)"
    refused(make_video("WEBM"), ErrorCode.DATA_INSPECTION, "WEBM is not supported", formats=["MKV"])
    assert sample(make_video("MPEG"), formats=["mpg"]).frames  # MPG and MPEG are one container


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "video data is empty"),
        (b"just some text, not a video at all", "not a video in a recognised container"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "not a video in a recognised container"),
        (b"OggS" + b"\x00" * 100, "video format OGG is not supported"),
    ],
)
def test_not_videos(data: bytes, fragment: str) -> None:
    refused(data, ErrorCode.DATA_INSPECTION, fragment)


def test_audio_only_has_no_video_stream() -> None:
    data = make_video("MP4", video=False, audio=True)
    assert sniff_video_format(data) == "MP4"
    refused(data, ErrorCode.DATA_INSPECTION, "no video stream")


def test_video_with_audio_still_samples() -> None:
    clip = sample(make_video("MKV", audio=True))
    assert [frame_index(f) for f in clip.frames] == [12, 37]


@pytest.mark.parametrize("fps", [-1.0, math.nan, math.inf])
def test_bad_fps(fps: float) -> None:
    refused(make_video("MP4"), ErrorCode.INVALID_PARAMETER, "fps must be", fps=fps)


def test_truncated_and_corrupt_mp4() -> None:
    data = make_video("MP4")
    refused(truncated(data), ErrorCode.DATA_INSPECTION, "could not be decoded as MP4")
    refused(data[:100], ErrorCode.DATA_INSPECTION, "could not be decoded as MP4")
    refused(corrupted(data, start=40), ErrorCode.DATA_INSPECTION, "could not be decoded as MP4")


def test_frame_size_limit(monkeypatch) -> None:
    monkeypatch.setattr(video, "MAX_FRAME_PIXELS", 1000)
    refused(make_video("MP4"), ErrorCode.TOO_LARGE, "64x48, over the limit of 1000 pixels")


def test_decode_budget(monkeypatch) -> None:
    monkeypatch.setattr(video, "MAX_DECODED_FRAMES", 10)
    refused(make_video("AVI"), ErrorCode.DATA_INSPECTION, "too much decoding")


@pytest.mark.parametrize(
    ("head", "name"),
    [
        (b"\x00\x00\x00\x14ftypqt  \x00\x00\x02\x00qt  ", "MOV"),
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2", "MP4"),
        (b"\x00\x00\x00\x18ftypXYZW\x00\x00\x02\x00qt  mp41", "MOV"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", None),
        (b"\x00\x00\x00\x08wide\x00\x00\x00\x10mdat", "MOV"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", "WEBM"),
        (b"\x1a\x45\xdf\xa3\xa3\x42\x86\x81\x01\x42\x82\x88matroska", "MKV"),
        (b"\x00\x00\x01\xba\x44", "MPEG"),
        (b"\x00\x00\x01\xb3\x04", "MPEG"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "AVI"),
        (b"FLV\x01\x01", "FLV"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", None),
    ],
)
def test_sniffing(head: bytes, name: str | None) -> None:
    assert sniff_video_format(head + b"\x00" * 64) == name


@pytest.mark.parametrize("fmt", VIDEO_FORMATS)
def test_fuzzed_videos_never_escape_as_other_errors(fmt: str) -> None:
    """Cuts and byte flips: each attempt decodes or raises ApiError, quickly."""
    import numpy as np

    base = make_video(fmt)
    rng = np.random.default_rng(sum(fmt.encode()))
    for i in range(25):
        data = bytearray(base if i % 2 else truncated(base, rng.uniform(0.1, 0.95)))
        for at in rng.integers(16, len(data), size=1 + i % 6):
            data[at] = int(rng.integers(0, 256))
        start = time.monotonic()
        try:
            clip = sample(bytes(data), max_frames=4)
        except ApiError as exc:
            assert exc.error in (ErrorCode.DATA_INSPECTION, ErrorCode.TOO_LARGE), exc
        else:
            assert 1 <= len(clip.frames) <= 4
        assert time.monotonic() - start < 5


def test_display_rotation_is_applied() -> None:
    """A phone-style rotation tag (display matrix) turns the frames as players do: 90 is
    counter-clockwise, so the white top-left corner ends bottom-left."""
    import io
    from fractions import Fraction

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(90)
        for i in range(10):
            arr = np.zeros((48, 64, 3), np.uint8)
            arr[:24, :32] = 255
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 10)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    image = sample(buf.getvalue(), max_frames=1).frames[0]
    assert image.size == (48, 64)
    grey = np.asarray(image.convert("L"))
    assert grey[-8:, :8].mean() > 200 and grey[:8, :8].mean() < 50


# -- usage duration ------------------------------------------------------------------------------
def _faststart_mp4(tmp_path, seconds: float, rate: int = 25) -> bytes:
    """An MP4 with its index (and so its claimed duration) before the frames."""
    path = tmp_path / "fast.mp4"
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.gop_size = rate
        stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        for i in range(round(seconds * rate)):
            frame = av.VideoFrame.from_ndarray(index_frame(i % 256, (64, 48)), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, rate)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path.read_bytes()


def test_usage_duration_comes_from_the_frames_present(tmp_path) -> None:
    data = _faststart_mp4(tmp_path, 60.0)
    assert sample(data, fps=1, max_frames=64).duration == pytest.approx(60.0, abs=0.05)
    cut = sample(data[: len(data) // 2], fps=1, max_frames=64)  # the index still claims 60 s
    last = max(cut.timestamps)
    assert last < 40
    assert cut.duration == pytest.approx(last + 1 / 25, abs=0.05)
    avi = make_video("AVI", seconds=20.0, gop=25)
    clip = sample(avi[: len(avi) // 5], fps=1, max_frames=32)  # AVI's header claims more too
    assert clip.duration == pytest.approx(max(clip.timestamps) + 1 / 25, abs=0.05)
