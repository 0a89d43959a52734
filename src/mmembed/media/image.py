"""Image sniffing and decoding with Pillow, hardened for untrusted bytes.

- The format is decided from the bytes' magic numbers, never from a URL or declared type, and
  Pillow is told to use only that format's plugin (no guessing among its ~40 readers).
- Size is checked from the header before any pixel is decoded: more than ``max_pixels`` is
  ``BadRequest.TooLarge`` (413), like every other "over its limit" failure. Pillow's own
  decompression-bomb error/warning is converted to the same error.
- Anything else Pillow cannot read (truncated, corrupt, unsupported variant) is
  ``InvalidParameter.DataInspection``.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Collection

import numpy as np
from PIL import Image, ImageFile, ImageOps

from mmembed.errors import ApiError, ErrorCode

# Accepted-name aliases: the API speaks of "JPG" and "TIF" as well.
_ALIASES = {"JPG": "JPEG", "TIF": "TIFF"}
# Sniffed names that Pillow opens under another plugin name.
_PILLOW_PLUGIN = {"DIB": "DIB"}
_DIB_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})
_WHITE = (255, 255, 255)
_ORIENTATION = 0x0112  # EXIF tag


def normalise_formats(formats: Collection[str], aliases: dict[str, str] = _ALIASES) -> list[str]:
    """Upper-case accepted format names with aliases folded (JPG -> JPEG, TIF -> TIFF)."""
    out: list[str] = []
    for name in formats:
        name = aliases.get(name.strip().upper(), name.strip().upper())
        if name not in out:
            out.append(name)
    return out


def sniff_image_format(data: bytes) -> str | None:
    """The image format named by the magic bytes at the start of ``data``, or None."""
    head = bytes(data[:32])
    simple = (
        (b"\xff\xd8\xff", "JPEG"),
        (b"\x89PNG\r\n\x1a\n", "PNG"),
        (b"BM", "BMP"),
        (b"II*\x00", "TIFF"),
        (b"MM\x00*", "TIFF"),
        (b"II+\x00", "TIFF"),  # BigTIFF
        (b"MM\x00+", "TIFF"),
        (b"\x00\x00\x01\x00", "ICO"),
        (b"icns", "ICNS"),
        (b"\x01\xda", "SGI"),
        (b"GIF87a", "GIF"),
        (b"GIF89a", "GIF"),
        (b"8BPS", "PSD"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
        (b"\xff\x4f\xff\x51", "JPEG2000"),
    )
    for magic, name in simple:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in {b"avif", b"avis", b"heic", b"heix", b"mif1"}:
        return "AVIF" if head[8:11] == b"avi" else "HEIC"
    if _looks_like_dib(head):
        return "DIB"
    return None


def _looks_like_dib(head: bytes) -> bool:
    """A headerless BMP: a BITMAPINFOHEADER with plausible planes and bit depth."""
    if len(head) < 16:
        return False
    size = struct.unpack_from("<I", head)[0]
    if size not in _DIB_HEADER_SIZES:
        return False
    if size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit width/height
        planes, bits = struct.unpack_from("<HH", head, 8)
    else:
        planes, bits = struct.unpack_from("<HH", head, 12)
    return planes == 1 and bits in {1, 2, 4, 8, 16, 24, 32, 64}


def _fail(message: str) -> ApiError:
    return ApiError(ErrorCode.DATA_INSPECTION, message)


def _pixel_limit_error(width: int, height: int, max_pixels: int) -> ApiError:
    return ApiError(
        ErrorCode.TOO_LARGE,
        f"image is {width}x{height} = {width * height} pixels, over the limit of "
        f"{max_pixels} pixels",
    )


def decode_image(
    data: bytes,
    *,
    formats: Collection[str],
    max_pixels: int,
    min_side: int | None = None,
) -> Image.Image:
    """Decode ``data`` to an RGB image (EXIF orientation applied, alpha composited on white)."""
    accepted = normalise_formats(formats)
    if not data:
        raise _fail("image data is empty")
    fmt = sniff_image_format(data)
    if fmt is None:
        raise _fail(f"data is not an image in a recognised format (accepted: {_list(accepted)})")
    if fmt not in accepted:
        raise _fail(
            f"image format {fmt} is not supported by this model (accepted: {_list(accepted)})"
        )
    try:
        return _decode(data, fmt, max_pixels, min_side)
    except ApiError:
        raise
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow names the size, not the dims
        size = f"{found.group(1)} pixels" if found else "too many pixels"
        raise ApiError(
            ErrorCode.TOO_LARGE, f"image is {size}, over the limit of {max_pixels} pixels"
        ) from None
    except MemoryError:
        raise ApiError(ErrorCode.TOO_LARGE, "image needs too much memory to decode") from None
    except Exception as exc:  # Pillow raises many kinds on hostile bytes; none may become a 500
        raise _fail(f"image data could not be decoded as {fmt}: {_reason(exc)}") from None


def _decode(data: bytes, fmt: str, max_pixels: int, min_side: int | None) -> Image.Image:
    im = _open(data, fmt)
    width, height = im.size
    if width < 1 or height < 1:
        raise _fail("image has zero width or height")
    if width * height > max_pixels:
        raise _pixel_limit_error(width, height, max_pixels)
    if min_side and fmt == "JPEG":
        _jpeg_draft(im, min_side)
    im.load()
    if im.width * im.height > max_pixels:  # ICO/ICNS/TIFF may only learn the real size on load
        raise _pixel_limit_error(im.width, im.height, max_pixels)
    im = _apply_orientation(im)
    im = to_rgb(im)
    if min_side:
        im = _reduce(im, min_side)
    return im


def _open(data: bytes, fmt: str) -> ImageFile.ImageFile:
    try:
        return Image.open(io.BytesIO(data), formats=[_PILLOW_PLUGIN.get(fmt, fmt)])
    except Image.DecompressionBombWarning as exc:
        # Pillow only warns between 1x and 2x its own limit; where warnings are errors (tests,
        # strict deployments) the warning is raised and must still end as TooLarge.
        raise Image.DecompressionBombError(str(exc)) from None


def _jpeg_draft(im: Image.Image, min_side: int) -> None:
    """Ask libjpeg for a 1/2, 1/4 or 1/8 scale decode that keeps the shorter side >= min_side."""
    width, height = im.size
    scale = min_side / min(width, height)
    if scale >= 1:
        return
    wanted = (max(1, int(np.ceil(width * scale))), max(1, int(np.ceil(height * scale))))
    im.draft(None, wanted)


def _reduce(im: Image.Image, min_side: int) -> Image.Image:
    """Integer box-downscale (cheap and alias-free) while the shorter side stays >= min_side."""
    factor = min(im.size) // min_side
    return im.reduce(factor) if factor >= 2 else im


def _apply_orientation(im: Image.Image) -> Image.Image:
    try:
        if im.getexif().get(_ORIENTATION, 1) in range(2, 9):
            return ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block should not cost the user the whole image
        pass
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB with alpha composited on white; 16-bit and float modes scaled to 8 bits."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        im = _to_8bit(im)
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in {"RGBA", "LA", "PA", "RGBa", "La"} or "transparency" in im.info


def _to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale to 8-bit "L" (Pillow's convert would clip)."""
    arr = np.asarray(im)
    if im.mode == "F":
        peak = float(np.nanmax(arr)) if arr.size else 0.0
        arr = np.nan_to_num(arr * (255.0 if peak <= 1.0 else 1.0))
    elif im.mode.startswith("I;16") or int(arr.max(initial=0)) > 255:
        arr = arr.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))  # 2-D uint8 -> "L"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _list(names: Collection[str]) -> str:
    return ", ".join(names) or "none"
