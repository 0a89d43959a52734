"""Video sniffing and frame sampling with PyAV (FFmpeg), from memory, bounded on hostile input.

Container detection is by magic bytes only, and FFmpeg is then told which demuxer to use, so
its probing can never pick a demuxer that opens other files or URLs (HLS playlists, concat
lists...). Names:
- ISO base media (``ftyp`` box): major brand ``qt  `` (or a compatible ``qt  `` brand with an
  unknown major brand) is MOV; every other brand is MP4. A file starting with a bare
  ``moov``/``mdat``/``wide``/``free`` box (pre-``ftyp`` QuickTime) is MOV.
- EBML (Matroska) files are WEBM when the DocType is ``webm``, else MKV.
- MPEG: "MPEG" and "MPG" are the same container (MPG is only a file extension); both names
  accept MPEG program streams (``00 00 01 BA``), MPEG-1/2 video elementary streams
  (``00 00 01 B3``) and MPEG transport streams (0x47 sync every 188 bytes).
- AVI (``RIFF....AVI ``), FLV (``FLV\\x01``); ASF/WMV and Ogg are recognised to say so.

Frames are picked evenly in time: n = max(1, min(max_frames, ceil(duration * fps))) targets at
(i + 0.5) * duration / n, and for each target the frame displayed at that instant (the last one
starting at or before it). A backend whose reference recipe picks frames otherwise (Qwen3-VL:
evenly spaced frame indices, first and last included) passes ``frame_times``, which maps
(duration, the stream's frame rate, fps, max_frames) to the target times. Decoding goes
forward, seeking to a later keyframe when the container's index shows one between the current
position and the next target (or, without an index, when the gap is large), so long
videos cost about one GOP per sampled frame.

Work is bounded (decoded frames, demuxed packets, decode errors, wall time, frame size); every
failure is ``InvalidParameter.DataInspection`` except frames over the pixel limit, which are
``BadRequest.TooLarge`` as for images. PyAV/FFmpeg run in-process: a crash inside FFmpeg itself
cannot be caught here (isolate decoding in a subprocess if that risk matters).
"""

from __future__ import annotations

import bisect
import io
import itertools
import math
import time
from collections.abc import Callable, Collection, Iterator

import av
import av.container
import av.stream
import av.video.frame
import av.video.stream
from PIL import Image

from mmembed.errors import ApiError, ErrorCode
from mmembed.media.image import normalise_formats
from mmembed.types import VideoClip

_ALIASES = {"MPG": "MPEG"}
# MPEG streams carry no duration (FFmpeg's estimate can be off by 10-20 %), nor do Matroska
# video streams (the container's includes audio): we measure those with a demux-only pass.
_NO_HEADER_DURATION = frozenset({"mpeg", "mpegvideo", "mpegts"})
# Demuxers whose seeks land on a keyframe before the target with exact timestamps. MPEG
# program/transport streams seek by byte position and then mislabel the first frames (off by a
# frame or more), so they are decoded straight through; MPEG-1/2 decoding is cheap.
_SEEKABLE = frozenset({"mov", "matroska", "avi", "flv"})
_FTYP_IMAGE_BRANDS = {b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"}
_QT_BARE_BOXES = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}

MAX_FRAME_PIXELS = 8192 * 8192  # larger frames are refused before decoding (8K is 33 Mpx)
MAX_DECODED_FRAMES = 10_000  # per call; ~one GOP per target is the normal cost
MAX_PACKETS = 50_000
MAX_DECODE_ERRORS = 50
DEADLINE_S = 60.0  # wall-clock bound on one call, so a hostile file cannot pin a worker
_SEEK_GAP_S = 3.0  # without an index: seek when the next target is further ahead than this
_MIN_SKIP_S = 1.0  # with an index: seek when it skips at least this much video


def sniff_video_format(data: bytes) -> str | None:
    """The container named by the magic bytes of ``data`` (see the module notes), or None."""
    found = _sniff(data)
    return found[0] if found else None


def _sniff(data: bytes) -> tuple[str, str] | None:
    """(API name, FFmpeg demuxer) for ``data``."""
    head = bytes(data[:64])
    if head[4:8] == b"ftyp":
        return _sniff_ftyp(data)
    if head[4:8] in _QT_BARE_BOXES:
        return "MOV", "mov"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI", "avi"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return ("WEBM" if _ebml_doctype(head) == b"webm" else "MKV"), "matroska"
    if head[:4] == b"FLV\x01":
        return "FLV", "flv"
    if head[:4] == b"\x00\x00\x01\xba":
        return "MPEG", "mpeg"
    if head[:4] == b"\x00\x00\x01\xb3":
        return "MPEG", "mpegvideo"
    if len(data) >= 377 and data[0] == data[188] == data[376] == 0x47:
        return "MPEG", "mpegts"
    if head[:16] == bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c"):
        return "ASF", "asf"
    if head[:4] == b"OggS":
        return "OGG", "ogg"
    return None


def _sniff_ftyp(data: bytes) -> tuple[str, str] | None:
    size = int.from_bytes(data[:4], "big")
    major = bytes(data[8:12])
    compatible = {bytes(data[i : i + 4]) for i in range(16, min(size, 64), 4)}
    if major in _FTYP_IMAGE_BRANDS:
        return None  # HEIF/AVIF still images share the box structure
    if major == b"qt  ":
        return "MOV", "mov"
    known_mp4 = major.startswith((b"iso", b"mp4", b"avc", b"M4V", b"3g", b"dash", b"MSNV"))
    if not known_mp4 and b"qt  " in compatible:
        return "MOV", "mov"
    return "MP4", "mov"


def _ebml_doctype(head: bytes) -> bytes | None:
    """The DocType string from an EBML header (element id 0x4282)."""
    at = head.find(b"\x42\x82")
    if at < 0 or at + 3 > len(head):
        return None
    length_byte = head[at + 2]
    if not length_byte & 0x80:  # only the 1-byte size form occurs in practice
        return None
    length = length_byte & 0x7F
    return head[at + 3 : at + 3 + length]


def _fail(message: str) -> ApiError:
    return ApiError(ErrorCode.DATA_INSPECTION, message)


def sample_video(
    data: bytes,
    *,
    fps: float,
    max_frames: int,
    formats: Collection[str],
    min_side: int | None = None,
    frame_times: FrameTimes | None = None,
) -> VideoClip:
    """Sample RGB frames evenly in time (or at ``frame_times``) from an in-memory video."""
    accepted = normalise_formats(formats, _ALIASES)  # MPG -> MPEG
    if not (isinstance(fps, int | float) and fps >= 0 and math.isfinite(fps)):
        raise ApiError(ErrorCode.INVALID_PARAMETER, f"fps must be a number >= 0, not {fps!r}")
    if not data:
        raise _fail("video data is empty")
    found = _sniff(data)
    if found is None:
        raise _fail(f"data is not a video in a recognised container (accepted: {_list(accepted)})")
    name, demuxer = found
    if name not in accepted:
        raise _fail(
            f"video format {name} is not supported by this model (accepted: {_list(accepted)})"
        )
    try:
        with av.open(io.BytesIO(data), mode="r", format=demuxer) as container:
            sampler = _Sampler(container, fps, max(1, max_frames), min_side, frame_times)
            if demuxer in _NO_HEADER_DURATION or not sampler.stream.duration:
                sampler.set_timing(*_scan_timing(data, demuxer))
            sampler.seekable = demuxer in _SEEKABLE
            return sampler.run()
    except ApiError:
        raise
    except MemoryError:
        raise ApiError(ErrorCode.TOO_LARGE, "video needs too much memory to decode") from None
    except Exception as exc:  # FFmpeg errors on hostile bytes are many; none may become a 500
        raise _fail(f"video data could not be decoded as {name}: {_reason(exc)}") from None


_Timed = tuple[float, av.video.frame.VideoFrame]  # (seconds, frame)
# (duration, stream frame rate, fps, max_frames) -> target times in seconds from the start
FrameTimes = Callable[[float, float, float, int], list[float]]


class _Sampler:
    """One pass of forward decoding (with keyframe seeks) that picks a frame per target time."""

    def __init__(
        self,
        container: av.container.InputContainer,
        fps: float,
        max_frames: int,
        min_side: int | None,
        frame_times: FrameTimes | None = None,
    ) -> None:
        self.container = container
        self.stream = _video_stream(container)
        self.frame_times = frame_times
        self.min_side = min_side
        self.fps, self.max_frames = fps, max_frames
        self.set_timing(*_timing(container, self.stream))
        self.keyframes = _keyframe_times(self.stream)
        self.seekable = True
        self.seek_gap = _SEEK_GAP_S
        self.decoded = self.packets = self.errors = 0
        self.deadline = time.monotonic() + DEADLINE_S
        self.position = -math.inf  # time of the last decoded frame
        self.latest = -math.inf  # time of the latest frame decoded at all
        self.exhausted = False

    def set_timing(self, start: float, duration: float) -> None:
        """Fix the time span and the n evenly spaced target times within it."""
        self.start, self.duration = start, duration
        if self.frame_times is not None:
            rate = self.stream.average_rate or self.stream.guessed_rate
            times = self.frame_times(duration, float(rate or 25.0), self.fps, self.max_frames)
            self.targets = [start + t for t in times]
            return
        n = max(1, min(self.max_frames, math.ceil(duration * self.fps)))
        step = duration / n
        self.targets = [start + (i + 0.5) * step for i in range(n)]

    def run(self) -> VideoClip:
        stream = self.stream
        stream.thread_type = "AUTO"  # frame + slice threads: the decode is most of the cost
        _check_frame_size(stream.codec_context.width, stream.codec_context.height)
        frames = self._decode(None)
        last: _Timed | None = None  # latest frame starting at or before the target
        held: _Timed | None = None  # first frame after the previous target
        previous: _Timed | None = None
        images: list[Image.Image] = []
        times: list[float] = []
        for target in self.targets:
            if self._should_seek(target):
                seeked = self._seek_to(target)
                if seeked is not None:
                    frames, last, held = seeked, None, None
            if held is not None and held[0] <= target:
                last, held = held, None
            if held is None:
                for timed in frames:
                    if timed[0] <= target:
                        last = timed
                    else:
                        held = timed
                        break
            chosen = last or held
            if chosen is None:
                break
            # Convert now so full-size decoder frames are not kept; repeats share the image.
            images.append(images[-1] if chosen is previous else self._to_image(chosen[1]))
            times.append(chosen[0] - self.start)
            previous = chosen
        if not images:
            raise _fail("video contains no decodable frames")
        return VideoClip(
            frames=images,
            duration=self._present_duration(),
            timestamps=[max(0.0, t) for t in times],
        )

    def _present_duration(self) -> float:
        """The duration usage is billed for: the container's claim, unless decoding reached the
        end of the data first (a truncated file, or a header that lies): then up to the end of
        the last frame actually present."""
        if not self.exhausted or self.latest == -math.inf:
            return self.duration
        rate = self.stream.average_rate or self.stream.guessed_rate
        period = float(1 / rate) if rate else 0.0
        return max(0.0, min(self.duration, self.latest - self.start + period))

    # -- decoding ---------------------------------------------------------------------------------
    def _decode(self, seeked_to: float | None) -> Iterator[_Timed]:
        """Frames in order from the current demuxer position, within the work bounds."""
        first = True
        for packet in self.container.demux(self.stream):
            self.packets += 1
            self._check_bounds()
            try:
                decoded = packet.decode()
            except av.error.FFmpegError as exc:
                self.errors += 1  # decoders conceal a few damaged packets; so do we
                if self.errors > MAX_DECODE_ERRORS:
                    raise _fail(f"video stream is corrupt: {_reason(exc)}") from None
                continue
            for frame in decoded:
                self.decoded += 1
                _check_frame_size(frame.width, frame.height)
                t = self._time(frame)
                if first and seeked_to is not None and t <= self.position:
                    self.seek_gap *= 2  # landed behind us: keyframes are sparser than assumed
                first = False
                self.position = t
                self.latest = max(self.latest, t)
                yield t, frame
        self.exhausted = True

    def _should_seek(self, target: float) -> bool:
        if self.exhausted or not self.seekable:  # past the end, the last frame stands in
            return False
        position = self.position if self.position > -math.inf else self.start
        if self.keyframes and target <= self.keyframes[-1]:  # indexes may be partial
            i = bisect.bisect_right(self.keyframes, target) - 1
            return i >= 0 and self.keyframes[i] - position >= _MIN_SKIP_S
        return target - position > self.seek_gap

    def _seek_to(self, target: float) -> Iterator[_Timed] | None:
        """Frames from a keyframe at or before ``target``, or None if the container can't seek.

        Some demuxers land after the requested time; then we ask again a little earlier
        (1, 2, 4 s) before settling for the frame we got.
        """
        back = 0.0
        for attempt in range(4):
            if not self._seek(target - back):
                return None
            frames = self._decode(target)
            first = next(frames, None)
            if first is None:  # past the real end: keep the frames we have
                return None
            if first[0] <= target or attempt == 3:
                return itertools.chain([first], frames)
            back = back * 2 or 1.0
        return None

    def _seek(self, target: float) -> bool:
        """Seek to the keyframe at or before ``target``; False if the container cannot."""
        offset = int(target / self.stream.time_base) if self.stream.time_base else 0
        try:
            self.container.seek(offset, stream=self.stream, backward=True, any_frame=False)
        except av.error.FFmpegError:
            self.keyframes, self.seek_gap = [], math.inf  # decode straight through instead
            return False
        self.exhausted = False
        return True

    def _time(self, frame: av.video.frame.VideoFrame) -> float:
        """The frame's time; frames without a timestamp follow the previous one."""
        t = frame.time
        if t is not None:
            return float(t)
        return self.position if self.position > -math.inf else self.start

    def _check_bounds(self) -> None:
        if self.decoded > MAX_DECODED_FRAMES or self.packets > MAX_PACKETS:
            raise _fail(
                f"video needs too much decoding to sample (over {MAX_DECODED_FRAMES} frames "
                f"or {MAX_PACKETS} packets)"
            )
        if time.monotonic() > self.deadline:
            raise _fail(f"video could not be sampled within {DEADLINE_S:g} s")

    def _to_image(self, frame: av.video.frame.VideoFrame) -> Image.Image:
        width, height = frame.width, frame.height
        if self.min_side and min(width, height) > self.min_side:
            scale = self.min_side / min(width, height)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = frame.to_image(width=size[0], height=size[1], interpolation="AREA")
        else:
            image = frame.to_image()
        rotation = round(getattr(frame, "rotation", 0) or 0) % 360
        return image.rotate(rotation, expand=True) if rotation else image


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:  # cover art isn't video
            return stream
    raise _fail("video has no video stream (audio only?)")


def _timing(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> tuple[float, float]:
    """(start, duration) in seconds, from the stream, then the container, then frame count."""
    tb = stream.time_base
    start = 0.0
    if stream.start_time is not None and tb:
        start = float(stream.start_time * tb)
    elif container.start_time is not None:
        start = container.start_time / av.time_base
    duration = 0.0
    if stream.duration and tb:
        duration = float(stream.duration * tb)
    elif container.duration:
        duration = container.duration / av.time_base
    elif stream.frames and stream.average_rate:
        duration = float(stream.frames / stream.average_rate)
    if not math.isfinite(duration) or duration < 0:
        duration = 0.0
    return start, duration


def _scan_timing(data: bytes, demuxer: str) -> tuple[float, float]:
    """(start, duration) measured from packet timestamps: a demux pass, no decoding."""
    first, end = math.inf, -math.inf
    with av.open(io.BytesIO(data), mode="r", format=demuxer) as container:
        stream = _video_stream(container)
        tb = stream.time_base
        rate = stream.average_rate or stream.guessed_rate
        period = float(1 / rate) if rate else 0.0  # for packets that carry no duration (FLV)
        for count, packet in enumerate(container.demux(stream)):
            if count > MAX_PACKETS:
                raise _fail(f"video has more than {MAX_PACKETS} packets")
            if packet.pts is None or not tb:
                continue
            t = float(packet.pts * tb)
            length = float(packet.duration * tb) if packet.duration else period
            first, end = min(first, t), max(end, t + length)
    if not math.isfinite(first):
        return 0.0, 0.0
    return first, max(0.0, end - first)


def _keyframe_times(stream: av.video.stream.VideoStream) -> list[float]:
    """Keyframe times from the container index (MP4, MKV, AVI...); empty when there is none."""
    tb = stream.time_base
    if not tb:
        return []
    try:
        times = [float(e.timestamp * tb) for e in stream.index_entries if e.is_keyframe]
    except Exception:  # an index is an optimisation only
        return []
    return sorted(times)


def _check_frame_size(width: int, height: int) -> None:
    if width * height > MAX_FRAME_PIXELS:
        raise ApiError(
            ErrorCode.TOO_LARGE,
            f"video frames are {width}x{height}, over the limit of {MAX_FRAME_PIXELS} pixels",
        )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _list(names: Collection[str]) -> str:
    return ", ".join(names) or "none"
