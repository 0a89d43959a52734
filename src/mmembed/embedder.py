"""``mmembed.Embedder``: the HTTP route's engine as a Python object, for scripts, batch jobs and
Ray workers.

It builds what the server's start-up builds (catalog, fetcher, engine), loads the backends, and
answers ``embed(items, model=..., dimension=...)`` through the same item parsing
(``api.schemas``) and the same ``Engine.embed``, so limits, errors (``ApiError`` with the
DashScope codes), vectors and usage are those of the HTTP route.

The engine is asyncio code bound to one event loop (batcher, fetcher pool), so the Embedder owns
a private loop on a daemon thread and every call runs there: ``embed`` blocks the caller,
``aembed`` awaits from any other loop. Concurrent calls (threads or tasks) meet in the engine's
batcher, which is what fills forward passes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from mmembed.api.schemas import request_from_data
from mmembed.config import Settings
from mmembed.engine import limits
from mmembed.engine.engine import Engine
from mmembed.errors import ApiError, ErrorCode, echo
from mmembed.media.fetch import Fetcher
from mmembed.models.catalog import Catalog, load_catalog
from mmembed.types import EmbedResult

log = logging.getLogger("mmembed.embedder")
T = TypeVar("T")

Item = str | dict[str, Any]
_SETTINGS: Any = object()  # default timeout: the server's request_timeout_s


class Embedder:
    """Embed texts, images and videos in-process, exactly as the HTTP route does.

    >>> with Embedder() as emb:  # the packaged offline catalog
    ...     result = emb.embed(["a cat", {"image": "data:image/png;base64,..."}],
    ...                        model="tongyi-embedding-vision-plus", dimension=256)
    ...     result.vectors.shape  # (2, 256) float32, rows L2-normalised

    ``settings``: a ``Settings`` (default: from ``MMEMBED_*`` environment variables).
    ``catalog``: a catalog TOML path or packaged profile name, or a loaded ``Catalog``
    (default: ``settings.catalog``). ``fetcher``: how media references become bytes (default:
    the server's guarded ``Fetcher``). ``timeout``: seconds per call, 408 after (default:
    ``settings.request_timeout_s``, as on the HTTP route; None: no deadline).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        catalog: str | Catalog | None = None,
        fetcher: Fetcher | None = None,
        timeout: Any = _SETTINGS,
    ) -> None:
        self.settings = settings or Settings.from_env()
        if catalog is None or isinstance(catalog, str):
            catalog = load_catalog(catalog or self.settings.catalog)
        self.catalog = catalog
        self.timeout: float | None = (
            self.settings.request_timeout_s if timeout is _SETTINGS else timeout
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="mmembed-embedder", daemon=True
        )
        self._thread.start()
        self._closed = False
        try:
            self.engine = Engine(self.settings, catalog, fetcher)
            self.engine.load()
        except BaseException:
            self._stop_loop()
            raise

    # -- embedding -----------------------------------------------------------------------------
    def embed(
        self,
        items: Sequence[Item],
        *,
        model: str,
        dimension: int | None = None,
        fps: float | None = None,
        instruct: str | None = None,
    ) -> EmbedResult:
        """Vectors for ``items`` (strings, or dicts with text / image / video / multi_images,
        or a fused dict; a single one counts as a list of one), in order, as the rows of
        ``result.vectors``. Raises ``ApiError`` as the HTTP route answers errors."""
        return self._call(self._embed(items, model, dimension, fps, instruct)).result()

    async def aembed(
        self,
        items: Sequence[Item],
        *,
        model: str,
        dimension: int | None = None,
        fps: float | None = None,
        instruct: str | None = None,
    ) -> EmbedResult:
        """``embed`` for async callers: awaits the Embedder's loop without blocking yours."""
        future = self._call(self._embed(items, model, dimension, fps, instruct))
        return await asyncio.wrap_future(future)

    async def _embed(
        self,
        items: Sequence[Item],
        model: str,
        dimension: int | None,
        fps: float | None,
        instruct: str | None,
    ) -> EmbedResult:
        if isinstance(items, str | dict):  # one item, not a sequence of characters or keys
            items = [items]
        params = {"dimension": dimension, "fps": fps, "instruct": instruct}
        body = {
            "model": model,
            "input": {"contents": list(items) if items is not None else None},
            "parameters": {k: v for k, v in params.items() if v is not None},
        }
        req = request_from_data(body)
        if self.timeout is None:
            return await self.engine.embed(req)
        try:
            return await asyncio.wait_for(self.engine.embed(req), self.timeout)
        except TimeoutError:
            raise ApiError(
                ErrorCode.REQUEST_TIMEOUT, f"The request took longer than {self.timeout:g} s."
            ) from None

    def _call(self, coro: Coroutine[Any, Any, T]) -> Any:
        if self._closed:
            coro.close()
            raise RuntimeError("this Embedder is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # -- introspection ---------------------------------------------------------------------------
    def status(self) -> dict[str, str]:
        """Per backend: "ready" or why it failed to load."""
        return self.engine.status()

    def dimension(self, model: str, dimension: int | None = None) -> int:
        """The vector length ``embed`` returns for ``model`` and ``dimension``."""
        return resolve_dimension(self.catalog, model, dimension)

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self.engine.aclose(), self._loop).result(30)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_dimension(catalog: Catalog, model: str, dimension: int | None) -> int:
    """The vector length of ``model`` at ``dimension`` (None: its default), checked as the
    engine checks it, so a batch job refuses a bad ``--dimension`` before loading anything."""
    spec = catalog.get(model)
    if spec is None:
        known = ", ".join(catalog.models)
        raise ApiError(
            ErrorCode.INVALID_PARAMETER, f"Model not exist: {echo(model)} (known: {known})."
        )
    return limits.resolve_dimension(spec, dimension)
