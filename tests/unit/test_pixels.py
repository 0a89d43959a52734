"""Pixels by table lookup (``models/pixels.py``): byte-equal to the image processors' own
rescale, normalise and patch layout on the families' real processors, in use where they match,
and refused where a processor does more than per-value arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmembed.media.video import VideoClip
from mmembed.models.dual import DualBackend
from mmembed.models.pixels import PixelTable
from mmembed.models.qwen3vl import Qwen3VLBackend
from tests.tiny_models import build_clip, build_qwen3vl, build_siglip

RNG = np.random.default_rng(7)


def photos(sizes: list[tuple[int, int]]) -> list[Image.Image]:
    """Random RGB images (every byte value occurs), plus one grey and one palette image."""
    out = [Image.fromarray(RNG.integers(0, 256, (h, w, 3), np.uint8)) for w, h in sizes]
    out.append(Image.fromarray(RNG.integers(0, 256, (50, 70), np.uint8), "L"))
    out.append(out[0].convert("P"))
    return out


@pytest.fixture(scope="module", params=["clip", "siglip"])
def dual(request, tmp_path_factory):
    build = {"clip": build_clip, "siglip": build_siglip}[request.param]
    backend = DualBackend(weights=str(build(tmp_path_factory.mktemp(request.param))))
    backend.load()
    return backend


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    backend = Qwen3VLBackend(weights=str(build_qwen3vl(tmp_path_factory.mktemp("qwen3vl"))))
    backend.load()
    return backend


def test_dual_pixels_are_the_processors_bytes(dual):
    proc = dual._processor()
    prepared = [dual.prepare_image(im) for im in photos([(64, 48), (40, 90), (300, 200)])]
    got = dual._pixels(prepared)["pixel_values"].numpy()
    skip = {"do_resize": False}
    if getattr(proc, "do_center_crop", None) is not None:
        skip["do_center_crop"] = False
    want = proc(images=prepared, return_tensors="np", **skip)["pixel_values"]
    assert isinstance(dual._table, PixelTable)  # the lookup, not the processor, made them
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want)


def test_dual_prepared_pixels_are_the_processors_resize(dual):
    """SigLIP's fixed-size resize is done by PIL directly (checked once), CLIP's resize and
    crop by the processor; either way the bytes are the processor's."""
    proc = dual._processor()
    for image in photos([(123, 77), (384, 384), (31, 500)]):
        want = proc(
            images=[image.convert("RGB")], do_rescale=False, do_normalize=False, return_tensors="np"
        )["pixel_values"][0]
        got = dual.prepare_image(image)
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        assert np.array_equal(got, want), image.size
    assert bool(dual._direct) is dual.siglip


def test_qwen_image_patches_are_the_processors_bytes(qwen):
    images = [np.asarray(qwen.prepare_image(im)) for im in photos([(64, 32), (96, 64), (200, 130)])]
    got = qwen.image_pixels_of(images)
    want = qwen._processed(images)
    assert isinstance(qwen._table, PixelTable)
    for key in ("pixel_values", "image_grid_thw"):
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert np.array_equal(got[key].numpy(), want[key].numpy()), key


def test_qwen_video_patches_keep_their_arithmetic(qwen):
    """Frames: (x / 255 - mean) / std in float32, cut as before the table (the formula and
    layout written out here), the last frame repeated to a whole temporal patch."""
    frames = [Image.fromarray(RNG.integers(0, 256, (64, 96, 3), np.uint8)) for _ in range(3)]
    frames = qwen.prepare_video(VideoClip(frames, 3.0)).frames  # at the frame budget's size
    patches, (t, gh, gw), _ = qwen.video_patches(VideoClip(frames, 3.0))
    arr = np.stack(
        [np.asarray(f, np.float32) for f in frames] + [np.asarray(frames[-1], np.float32)]
    )
    mean = np.asarray(qwen.image_processor.image_mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(qwen.image_processor.image_std, np.float32).reshape(1, 3, 1, 1)
    arr = (arr.transpose(0, 3, 1, 2) / 255.0 - mean) / std
    p, m, tp = qwen.patch, qwen.merge, qwen.temporal
    want = (
        arr.reshape(t, tp, 3, gh // m, m, p, gw // m, m, p)
        .transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        .reshape(t * gh * gw, 3 * tp * p * p)
    )
    assert (t, gh, gw) == (2, frames[0].height // p, frames[0].width // p)
    assert patches.dtype == np.float32 and np.array_equal(patches, want)


def test_a_processor_that_is_not_per_value_keeps_its_own_path(tmp_path):
    backend = DualBackend(weights=str(build_siglip(tmp_path / "siglip")))
    backend.load()
    proc = backend._processor()
    normalize = proc.normalize
    # a normalisation by the image's own mean: no table can give it
    proc.normalize = lambda image, mean, std, **kw: normalize(image, mean, std) - image.mean()
    prepared = [backend.prepare_image(im) for im in photos([(64, 48)])]
    got = backend._pixels(prepared)["pixel_values"].numpy()
    assert backend._table is False
    want = proc(images=prepared, return_tensors="np", do_resize=False)["pixel_values"]
    assert np.array_equal(got, want)


def test_a_table_holds_each_value_once_per_channel():
    table = PixelTable.from_function(lambda v: v.astype(np.float32) * [[[1]], [[2]], [[3]]])
    image = RNG.integers(0, 256, (2, 4, 6, 3), np.uint8)
    assert table.table.shape == (3, 256)
    assert np.array_equal(
        table.chw(image, channels_last=True),
        image.transpose(0, 3, 1, 2) * np.array([1, 2, 3]).reshape(1, 3, 1, 1),
    )
