"""Start-up: the port opens at once and models load in the background.

While loading, ``/health`` answers 503 ``{"status": "loading", "progress": ...}`` and embedding
requests get 503 ``ModelLoading`` with ``Retry-After``, rather than a refused connection for
the ~25 s a first start takes (ONNX export, class prompts). When done, one log line says where
to send requests and which models are served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.requests import Request

from mmembed.errors import ApiError, ErrorCode

log = logging.getLogger("mmembed.api")


class Loader:
    def __init__(self, engine: Any, announce: str = "") -> None:
        self.engine = engine
        self.announce = announce  # the base URL for the ready line ("" in in-process tests)
        self.started = time.monotonic()
        self.ready = asyncio.Event()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        names = self._backend_names()
        log.info("loading %d backend(s): %s", len(names), ", ".join(names) or "-")
        try:
            await asyncio.to_thread(self.engine.load)
        finally:
            self.ready.set()
        self._ready_line()

    async def aclose(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the loading thread itself finishes on its own

    def _backend_names(self) -> list[str]:
        catalog = getattr(self.engine, "catalog", None)
        if catalog is None:
            return []
        used = {m.backend for m in catalog.models.values()}
        return [name for name in catalog.backends if name in used]

    def progress(self) -> dict[str, Any]:
        status = self.engine.status()
        backends, current = {}, True
        for name in self._backend_names():
            state = status.get(name)
            if state is None:
                state, current = ("loading" if current else "waiting"), False
            backends[name] = state
        done = sum(1 for s in backends.values() if s != "loading" and s != "waiting")
        return {
            "backends": backends,
            "done": done,
            "total": len(backends),
            "elapsed_s": round(time.monotonic() - self.started, 1),
        }

    def _ready_line(self) -> None:
        # (each unavailable name has had its own error line, from the engine)
        status = self.engine.status()
        catalog = getattr(self.engine, "catalog", None)
        specs = catalog.models.values() if catalog is not None else ()
        served = [m.name for m in specs if status.get(m.backend) == "ready"]
        missing = [m.name for m in specs if status.get(m.backend) != "ready"]
        models = ", ".join(served) or "none"
        if missing:
            models += f" ({len(missing)} unavailable: {', '.join(missing)}; see above)"
        took = time.monotonic() - self.started
        if catalog is not None and not served:
            log.error(
                "started in %.1f s, but no model could be loaded: every request will get 503 "
                "until the problems above are fixed and the server restarted",
                took,
            )
            return
        if not self.announce:
            log.info("ready in %.1f s; models: %s", took, models)
            return
        log.info(
            "ready in %.1f s: POST %s/api/v1/services/embeddings/multimodal-embedding/"
            "multimodal-embedding (or %s/v1/embeddings, OpenAI-compatible); playground %s/ ; "
            "models: %s. Media URLs on loopback or private addresses are refused unless "
            "allowed with --fetch-allow-hosts (MMEMBED_FETCH_ALLOW_HOSTS).",
            took,
            self.announce,
            self.announce,
            self.announce,
            models,
        )


def check_ready(request: Request) -> None:
    """503 ModelLoading while the start-up load runs (no-op for apps loaded up front)."""
    loader: Loader | None = getattr(request.app.state, "loader", None)
    if loader is not None and not loader.ready.is_set():
        p = loader.progress()
        raise ApiError(
            ErrorCode.MODEL_LOADING,
            f"Models are loading ({p['done']}/{p['total']} backends ready after "
            f"{p['elapsed_s']:g} s); retry shortly.",
            headers={"Retry-After": "2"},
        )
