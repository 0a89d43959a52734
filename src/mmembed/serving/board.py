"""The stats board: one small Serve deployment every replica reports to.

Each backend replica sends a snapshot of its engine's counters (status, batching, cache, media
bytes) about every ``REPORT_S``, and each ingress replica its identity; the answer is every
live replica's latest entry, which the ingress's ``RemoteEngine`` sums for ``/health`` and
``/metrics``. A replica silent for ``STALE_S`` (stopped, crashed, scaled down) is dropped.
"""

from __future__ import annotations

import time
from typing import Any

BOARD = "stats-board"  # the deployment's name
REPORT_S = 0.5
STALE_S = 10.0


class StatsBoard:
    def __init__(self, members: Any = None) -> None:
        # ``members``: the colocated replicas' deployments, bound here only so that they are
        # part of the application (the board is its root; they find it by name).
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}

    def report(self, entry: dict[str, Any]) -> list[dict[str, Any]]:
        """Record ``entry`` (keyed by its ``replica`` id); returns every live entry."""
        self._entries[entry["replica"]] = (time.monotonic(), entry)
        return self.view()

    def view(self) -> list[dict[str, Any]]:
        cutoff = time.monotonic() - STALE_S
        for key in [k for k, (seen, _) in self._entries.items() if seen < cutoff]:
            del self._entries[key]
        return [entry for _, entry in sorted(self._entries.values(), key=lambda e: e[1]["replica"])]
