"""scripts/install, scripts/serve and scripts/mmembed on a copy of the checkout whose .venv is a
stand-in: its python runs the real interpreter, except that ``-m pip`` only records what it was
asked (the test never installs anything). The install says what it does, and is skipped while
.venv is current, so the scripts start at once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    return fake_checkout(tmp_path)


def fake_checkout(tmp_path: Path) -> Path:
    """scripts/ and pyproject.toml in ``tmp_path/mmembed``, with the stand-in .venv."""
    root = tmp_path / "mmembed"
    (root / "scripts").mkdir(parents=True)
    for name in ("install", "serve", "mmembed"):
        shutil.copy2(ROOT / "scripts" / name, root / "scripts" / name)
    shutil.copy2(ROOT / "pyproject.toml", root / "pyproject.toml")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    pip_log = tmp_path / "pip.log"
    src = ROOT / "src"
    (bin_dir / "python").write_text(
        "#!/usr/bin/env bash\n"
        'if [ "${1:-}" = "-m" ] && [ "${2:-}" = "pip" ]; then\n'
        f'  echo "$*" >> {pip_log}\n'
        '  echo "Collecting something"; echo "Successfully installed something"; exit 0\n'
        "fi\n"
        f'PYTHONPATH={src} exec {sys.executable} "$@"\n'
    )
    (bin_dir / "mmembed").write_text(
        f'#!/usr/bin/env bash\nPYTHONPATH={src} exec {sys.executable} -m mmembed.cli "$@"\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return root


def run(root: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(root / "scripts" / args[0]), *args[1:]],
        cwd=cwd or root,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )


def pip_calls(root: Path) -> list[str]:
    log = root.parent / "pip.log"
    return log.read_text().splitlines() if log.exists() else []


def test_install_says_what_it_does_and_is_skipped_while_current(checkout: Path):
    first = run(checkout, "install")
    assert first.returncode == 0, first.stderr
    assert pip_calls(checkout) == [
        "-m pip install --disable-pip-version-check --progress-bar off -e ."
    ]
    assert "scripts/install: installing mmembed and its dependencies" in first.stderr
    assert "Collecting something" in first.stdout  # pip's own lines are shown
    assert "the next run skips pip" in first.stderr

    again = run(checkout, "install")
    assert again.returncode == 0 and again.stdout == again.stderr == ""
    assert len(pip_calls(checkout)) == 1  # nothing ran

    # scripts/serve --help: no pip, the help at once
    help_out = run(checkout, "serve", "--help")
    assert help_out.returncode == 0, help_out.stderr
    assert "--port" in help_out.stdout and len(pip_calls(checkout)) == 1

    # an extra installs once; the base install is then current too
    assert run(checkout, "install", "ray").returncode == 0
    assert pip_calls(checkout)[-1].endswith("-e .[ray]")
    for args in (("install",), ("install", "ray")):
        assert run(checkout, *args).returncode == 0
    assert len(pip_calls(checkout)) == 2

    # a changed pyproject.toml makes the install stale
    with open(checkout / "pyproject.toml", "a") as f:
        f.write("\n# changed\n")
    assert run(checkout, "install").returncode == 0
    assert len(pip_calls(checkout)) == 3


def test_scripts_mmembed_runs_the_command_from_anywhere(checkout: Path, tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run(checkout, "mmembed", "models", "--json", cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    names = [json.loads(line)["name"] for line in out.stdout.splitlines()]  # stdout: JSON only
    assert "tongyi-embedding-vision-plus" in names
    assert "scripts/install: installing mmembed" in out.stderr  # (the first time)
    again = run(checkout, "mmembed", "--version", cwd=elsewhere)
    assert again.stdout.startswith("mmembed ") and again.stderr == ""
    assert len(pip_calls(checkout)) == 1
