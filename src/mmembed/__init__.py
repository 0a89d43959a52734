"""mmembed: a self-hosted multimodal embedding service speaking the DashScope API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["ApiError", "EmbedResult", "Embedder"]

if TYPE_CHECKING:
    from mmembed.embedder import Embedder
    from mmembed.errors import ApiError
    from mmembed.types import EmbedResult


def __getattr__(name: str) -> Any:
    # Imported on first use: `import mmembed` (and the CLI) stays light, without the engine.
    if name == "Embedder":
        from mmembed.embedder import Embedder

        return Embedder
    if name == "ApiError":
        from mmembed.errors import ApiError

        return ApiError
    if name == "EmbedResult":
        from mmembed.types import EmbedResult

        return EmbedResult
    raise AttributeError(f"module 'mmembed' has no attribute {name!r}")
