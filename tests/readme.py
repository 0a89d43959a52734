"""The README's code blocks, as the tests that run them read them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```$", re.S | re.M)


@dataclass(frozen=True)
class Block:
    lang: str  # the fence's info string ("" when none)
    code: str
    line: int  # where the block starts in README.md (1-based), for messages

    @property
    def first(self) -> str:
        return self.code.strip().splitlines()[0] if self.code.strip() else ""


def blocks(path: Path = README) -> list[Block]:
    text = path.read_text()
    return [
        Block(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
        for m in _FENCE.finditer(text)
    ]


def block(needle: str, lang: str | None = None) -> Block:
    """The one block containing ``needle`` (and of ``lang``, when given)."""
    found = [b for b in blocks() if needle in b.code and (lang is None or b.lang == lang)]
    assert len(found) == 1, f"README.md: {len(found)} blocks contain {needle!r}"
    return found[0]
