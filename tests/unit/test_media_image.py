"""Image sniffing and decoding: every accepted format, colour handling, bombs, hostile bytes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmembed.errors import ApiError, ErrorCode
from mmembed.media.image import decode_image, sniff_image_format
from tests.media_util import (
    BLUE,
    GREEN,
    IMAGE_FORMATS,
    QUADRANTS,
    RED,
    WHITE,
    YELLOW,
    encode,
    exif_rotated_jpeg,
    image_bytes,
    make_image,
    png_bomb,
    quadrant_image,
    truncated,
)

MAX_PIXELS = 40_000_000


def decode(data: bytes, formats=IMAGE_FORMATS, **kw) -> Image.Image:
    return decode_image(data, formats=formats, max_pixels=kw.pop("max_pixels", MAX_PIXELS), **kw)


def refused(data: bytes, code: ErrorCode, *fragments: str, **kw) -> ApiError:
    with pytest.raises(ApiError) as info:
        decode(data, **kw)
    assert info.value.error is code, info.value
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    return info.value


def corners(im: Image.Image) -> tuple[tuple[int, ...], ...]:
    """Colours at the centres of the four quadrants: TL, TR, BL, BR."""
    w, h = im.size
    points = [
        (w // 4, h // 4),
        (3 * w // 4, h // 4),
        (w // 4, 3 * h // 4),
        (3 * w // 4, 3 * h // 4),
    ]
    return tuple(im.getpixel(p) for p in points)  # type: ignore[misc]


def close(actual, expected, tol: int = 6) -> bool:
    return all(abs(int(a) - int(e)) <= tol for a, e in zip(actual, expected, strict=True))


def assert_colours(im: Image.Image, expected, tol: int = 6) -> None:
    got = corners(im)
    assert all(close(g, e, tol) for g, e in zip(got, expected, strict=True)), got


# -- every format --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_every_format_decodes(fmt: str) -> None:
    data = make_image(fmt)
    assert sniff_image_format(data) == fmt
    im = decode(data, formats=[fmt])
    assert im.mode == "RGB"
    assert im.size == ((1024, 1024) if fmt == "ICNS" else (64, 48))  # ICNS stores 1024 px
    assert_colours(im, QUADRANTS, tol=12 if fmt == "JPEG" else 3)


def test_dib_is_a_bmp_without_the_file_header() -> None:
    bmp, dib = make_image("BMP"), make_image("DIB")
    assert bmp[:2] == b"BM" and dib[:4] == (40).to_bytes(4, "little")
    assert bmp[14:] == dib  # the same BITMAPINFOHEADER and pixels
    assert sniff_image_format(dib) == "DIB"
    refused(dib, ErrorCode.DATA_INSPECTION, "image format DIB is not supported", formats=["BMP"])


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (make_image("GIF"), "GIF"),
        (make_image("JPEG2000"), "JPEG2000"),
        (b"II+\x00" + b"\x00" * 20, "TIFF"),
        (b"MM\x00*" + b"\x00" * 20, "TIFF"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"\x00\x00\x00\x1cftypavif" + b"\x00" * 20, "AVIF"),
        (b"hello world, not an image", None),
        (b"", None),
    ],
)
def test_sniffing(data: bytes, name: str | None) -> None:
    assert sniff_image_format(data) == name


def test_format_aliases_and_case() -> None:
    assert decode(make_image("JPEG"), formats=["jpg"]).size == (64, 48)
    assert decode(make_image("TIFF"), formats=["Tif"]).size == (64, 48)


def test_format_is_decided_by_the_bytes() -> None:
    error = refused(make_image("WEBP"), ErrorCode.DATA_INSPECTION, formats=["JPEG", "PNG", "BMP"])
    assert error.message == (
        "image format WEBP is not supported by this model (accepted: JPEG, PNG, BMP)"
    )
    refused(make_image("GIF"), ErrorCode.DATA_INSPECTION, "image format GIF is not supported")
    refused(b"<html>hi</html>", ErrorCode.DATA_INSPECTION, "not an image in a recognised format")
    refused(b"", ErrorCode.DATA_INSPECTION, "image data is empty")


# -- orientation and colour ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("orientation", "size", "expected"),
    [
        (1, (64, 48), (RED, GREEN, BLUE, YELLOW)),
        (3, (64, 48), (YELLOW, BLUE, GREEN, RED)),  # rotate 180
        (6, (48, 64), (BLUE, RED, YELLOW, GREEN)),  # rotate 90 clockwise to display
        (8, (48, 64), (GREEN, YELLOW, RED, BLUE)),  # rotate 90 counter-clockwise
        (2, (64, 48), (GREEN, RED, YELLOW, BLUE)),  # mirrored
    ],
)
def test_exif_orientation_is_applied(orientation: int, size, expected) -> None:
    im = decode(exif_rotated_jpeg(orientation))
    assert im.size == size
    assert_colours(im, expected, tol=12)


def test_alpha_is_composited_on_white() -> None:
    rgba = np.zeros((8, 16, 4), np.uint8)
    rgba[:, :8] = (255, 0, 0, 0)  # fully transparent red: white
    rgba[:, 8:] = (0, 0, 255, 128)  # half transparent blue: light blue
    im = decode(image_bytes(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert im.mode == "RGB"
    assert im.getpixel((2, 2)) == WHITE
    assert close(im.getpixel((12, 2)), (127, 127, 255), tol=1)


def test_webp_alpha_and_la_and_palette_transparency() -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 255, 0, 0))
    assert decode(image_bytes(rgba, "WEBP", lossless=True)).getpixel((4, 4)) == WHITE
    la = Image.new("LA", (8, 8), (0, 0))
    assert decode(image_bytes(la, "PNG")).getpixel((4, 4)) == WHITE
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    assert decode(image_bytes(pal, "PNG")).getpixel((4, 4)) == RED
    assert decode(image_bytes(pal, "PNG", transparency=1)).getpixel((4, 4)) == WHITE


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    grey16 = Image.fromarray(np.full((8, 8), 128 * 257, np.uint16))
    for fmt in ("PNG", "TIFF"):
        im = decode(image_bytes(grey16, fmt))
        assert im.mode == "RGB" and close(im.getpixel((4, 4)), (128, 128, 128), tol=1), fmt
    rgb48 = np.full((4, 4, 3), (65535, 0, 32896), np.uint16)  # 16-bit RGB via TIFF
    data = encode(Image.fromarray(rgb48.astype(np.uint8)), "TIFF")  # Pillow can't write RGB;16
    assert decode(data).mode == "RGB"


def test_cmyk_one_bit_and_float() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    assert close(decode(image_bytes(cmyk, "JPEG", quality=95)).getpixel((8, 8)), RED, tol=8)
    assert close(decode(image_bytes(cmyk, "TIFF")).getpixel((8, 8)), RED, tol=1)
    one_bit = Image.new("1", (16, 16), 1)
    assert decode(image_bytes(one_bit, "PNG")).getpixel((8, 8)) == WHITE
    assert decode(image_bytes(one_bit, "BMP")).getpixel((8, 8)) == WHITE
    floats = Image.fromarray(np.full((4, 4), 0.5, np.float32))
    assert close(decode(image_bytes(floats, "TIFF")).getpixel((1, 1)), (127, 127, 127), tol=1)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_give_the_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE, GREEN)]
    extra = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **extra)
    im = decode(data, formats=[fmt])
    assert im.size == (16, 16) and close(im.getpixel((8, 8)), RED, tol=2)


# -- reduced-size decoding -----------------------------------------------------------------------
def test_jpeg_draft_decodes_reduced_size() -> None:
    data = image_bytes(quadrant_image((2000, 1600)), "JPEG", quality=90)
    full = decode(data)
    assert full.size == (2000, 1600)
    small = decode(data, min_side=224)
    assert small.size == (500, 400)  # libjpeg's 1/4 scale: the largest that keeps >= 224
    assert_colours(small, QUADRANTS, tol=12)
    assert decode(data, min_side=800).size == (1000, 800)  # 1/2 scale
    assert decode(data, min_side=801).size == (2000, 1600)  # 1/2 would go below 801
    assert decode(data, min_side=2000).size == (2000, 1600)  # no upscaling, no reduction


def test_other_formats_are_box_reduced_after_decoding() -> None:
    data = image_bytes(quadrant_image((1000, 800)), "PNG")
    im = decode(data, min_side=224)
    assert im.size == (334, 267) and min(im.size) >= 224  # integer factor 3
    assert_colours(im, QUADRANTS, tol=1)
    assert decode(exif_rotated_jpeg(6, (1000, 800)), min_side=200).size == (200, 250)


# -- limits --------------------------------------------------------------------------------------
def test_pixel_limit_is_checked_from_the_header() -> None:
    error = refused(make_image("PNG"), ErrorCode.TOO_LARGE, max_pixels=1000)
    assert error.message == "image is 64x48 = 3072 pixels, over the limit of 1000 pixels"
    assert decode(make_image("PNG"), max_pixels=3072).size == (64, 48)


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((9000, 9000), "image is 9000x9000 = 81000000 pixels, over the limit of 40000000 pixels"),
        ((10000, 10000), "image is 100000000 pixels, over the limit of 40000000 pixels"),
        ((20000, 20000), "image is 400000000 pixels, over the limit of 40000000 pixels"),
    ],
)
def test_decompression_bombs(size: tuple[int, int], message: str) -> None:
    """Below Pillow's limit our own check refuses; between 1x and 2x Pillow warns (an error
    under this suite's filterwarnings=error); above 2x Pillow raises. All end as TooLarge."""
    data = png_bomb(*size)
    assert len(data) < 100_000
    assert refused(data, ErrorCode.TOO_LARGE).message == message


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_when_pillow_only_warns() -> None:
    error = refused(png_bomb(10000, 10000), ErrorCode.TOO_LARGE)
    assert (
        error.message
        == "image is 10000x10000 = 100000000 pixels, over the limit of 40000000 pixels"
    )


# -- hostile bytes -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_truncated_images(fmt: str) -> None:
    data = make_image(fmt) if fmt != "JPEG" else image_bytes(quadrant_image((256, 256)), "JPEG")
    refused(truncated(data, 0.6), ErrorCode.DATA_INSPECTION)


def test_corrupt_headers() -> None:
    jpeg = make_image("JPEG")
    refused(jpeg[:3] + b"\x00" * 60 + jpeg[63:], ErrorCode.DATA_INSPECTION, "decoded as JPEG")
    png = make_image("PNG")
    refused(png[:16] + b"\xff\xff\xff\xff" + png[20:], ErrorCode.DATA_INSPECTION, "as PNG")
    refused(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50, ErrorCode.DATA_INSPECTION, "as PNG")


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_fuzzed_images_never_escape_as_other_errors(fmt: str) -> None:
    """Byte flips and cuts: each attempt either decodes or raises ApiError, nothing else."""
    base = make_image(fmt)
    rng = np.random.default_rng(hash(fmt) & 0xFFFF)
    for i in range(60):
        data = bytearray(base if i % 3 else truncated(base, rng.uniform(0.05, 0.95)))
        for at in rng.integers(0, len(data), size=1 + i % 8):
            data[at] = int(rng.integers(0, 256))
        try:
            im = decode(bytes(data), max_pixels=4_000_000)
        except ApiError as exc:
            assert exc.error in (ErrorCode.DATA_INSPECTION, ErrorCode.TOO_LARGE)
        else:
            assert im.mode == "RGB" and im.width * im.height <= 4_000_000


def test_decoded_image_is_independent_of_input_buffer() -> None:
    buf = bytearray(make_image("PNG"))
    im = decode(bytes(buf))
    buf[:] = b"\x00" * len(buf)
    assert im.getpixel((1, 1)) == RED
