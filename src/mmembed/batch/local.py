"""Media references of a batch job: the operator's own files are read directly; URLs and data:
URIs go through the server's guarded ``Fetcher`` unchanged (same address guard, caps, timeouts).

Only the batch job uses this fetcher: the HTTP server never reads local paths.
"""

from __future__ import annotations

import asyncio
import os

from mmembed.errors import ApiError, ErrorCode
from mmembed.media.fetch import Fetcher, format_bytes


def is_local(ref: str) -> bool:
    return os.path.isabs(ref)


def read_local(path: str, max_bytes: int) -> bytes:
    """The file's bytes, refused (413, as on the server) when larger than ``max_bytes``."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise ApiError(
                    ErrorCode.TOO_LARGE,
                    f"media is {format_bytes(size)}, over the limit of {format_bytes(max_bytes)}",
                )
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ApiError(ErrorCode.INVALID_URL, f"{path}: no such file") from None
    except IsADirectoryError:
        raise ApiError(ErrorCode.INVALID_URL, f"{path}: is a folder, not a file") from None
    except OSError as exc:
        raise ApiError(ErrorCode.INVALID_URL, f"{path}: cannot be read: {exc.strerror}") from None
    if len(data) > max_bytes:  # grew while we read it
        raise ApiError(
            ErrorCode.TOO_LARGE, f"media is larger than the limit of {format_bytes(max_bytes)}"
        )
    return data


class LocalFileFetcher(Fetcher):
    async def load(self, ref: str, *, max_bytes: int, oss_owner: str | None = None) -> bytes:
        if isinstance(ref, str) and is_local(ref):
            return await asyncio.to_thread(read_local, ref, max_bytes)
        return await super().load(ref, max_bytes=max_bytes, oss_owner=oss_owner)
