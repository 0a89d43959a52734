"""Everything the README's install gives works, and every "missing extra" hint names a command
that works from a checkout (mmembed is not on the package index: `pip install 'mmembed[x]'`
cannot work)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_batch_embedding_needs_no_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {re.split(r"[<>=!~;\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert {"pyarrow", "tqdm"} <= base


def test_no_hint_names_a_package_index_install_of_mmembed():
    pattern = re.compile(r"pip install[^\n]*mmembed\[")
    files = [*ROOT.joinpath("src").rglob("*.py"), *ROOT.joinpath("scripts").iterdir()]
    files += [ROOT / "README.md", *ROOT.joinpath("docs").glob("*.md")]
    offenders = [str(f) for f in files if f.is_file() and pattern.search(f.read_text())]
    assert not offenders


def test_missing_extras_name_scripts_install():
    code = (
        "import sys; sys.modules['ray'] = None; sys.modules['psycopg'] = None\n"
        "from mmembed.raylocal import require_ray\n"
        "from mmembed.accounts.store import Store\n"
        "try:\n    Store('postgresql://u@127.0.0.1:1/db')\n"
        "except ValueError as exc:\n    print(exc)\n"
        "require_ray('mmembed serve --ray', serve=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "scripts/install postgres" in out.stdout, out.stdout
    assert out.stderr.strip().startswith(
        "mmembed serve --ray needs the ray extra: scripts/install ray"
    )
