"""What to run when an optional part is missing: one wording for every "needs the X extra" hint.

mmembed is installed from its checkout (it is not on the package index), so a hint names the
checkout's install script, and the pip command it runs for other environments."""

from __future__ import annotations


def install_hint(extra: str) -> str:
    """``scripts/install ray (in the mmembed checkout; or pip install -e '.[ray]' there)``."""
    return (
        f"scripts/install {extra} (in the mmembed checkout; in another environment: "
        f"pip install -e '.[{extra}]' from the checkout)"
    )


def pip_hint(package: str) -> str:
    """For a single package outside the extras: pip into the checkout's environment."""
    return (
        f".venv/bin/pip install {package} (in the mmembed checkout; in another environment: "
        f"pip install {package} there)"
    )


def needs_extra(what: str, extra: str) -> str:
    """``mmembed serve --ray needs the ray extra: scripts/install ray (...)``."""
    return f"{what} needs the {extra} extra: {install_hint(extra)}"


class MissingExtra(RuntimeError):
    """An optional dependency is not installed; the message names the command that installs it
    (reported as one line, never a traceback)."""
