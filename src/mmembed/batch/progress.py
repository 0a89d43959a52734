"""Progress of a batch job: a tqdm bar (items/s, ETA) on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("mmembed.batch")


class Progress:
    def __init__(self, total: int, *, interval_s: float = 10.0, tty: bool | None = None) -> None:
        self.total = total
        self.done = 0
        self.errors = 0
        self.interval_s = interval_s
        self._started = time.monotonic()
        self._last_log = self._started
        self._bar: Any = None
        if sys.stderr.isatty() if tty is None else tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="item", dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1, errors: int = 0) -> None:
        self.done += n
        self.errors += errors
        if self._bar is not None:
            self._bar.update(n)
            if errors:
                self._bar.set_postfix(errors=self.errors, refresh=False)
            return
        now = time.monotonic()
        if now - self._last_log >= self.interval_s:
            self._last_log = now
            log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = self.done / elapsed
        left = self.total - self.done
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"embedded {self.done}/{self.total} ({pct:.1f}%), {rate:.1f} items/s, "
            f"ETA {eta}, {self.errors} errors"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
