"""Media: fetching with limits and an address guard, image decoding, video frame sampling."""

from mmembed.media.fetch import Fetcher
from mmembed.media.image import decode_image, sniff_image_format
from mmembed.media.video import sample_video, sniff_video_format

__all__ = ["Fetcher", "decode_image", "sample_video", "sniff_image_format", "sniff_video_format"]
