"""Accounts tests run against SQLite and a real PostgreSQL server.

The PostgreSQL server is Debian's package, started by ``scripts/postgres`` for this session on
127.0.0.1 (as ``nobody`` when we are root) and stopped afterwards; each test gets a database of
its own. Without the package the PostgreSQL cases are skipped, except in CI (``CI=true``),
where they fail: there, ``scripts/test`` installs it first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "postgres"
HASH_CATALOG = """
[backends.h]
family = "hash"
dim = 64

[models."tongyi-embedding-vision-plus"]
backend = "h"
dimensions = [64]
multi_images = 8
price_text_per_mtok = 0.09
price_image_per_mtok = 0.09

[models."qwen3-vl-embedding"]
backend = "h"
dimensions = [64]
fused = true
price_text_per_mtok = 0.1
price_image_per_mtok = 0.258
"""


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The maintenance URL of a PostgreSQL server for this session."""
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        reason = "PostgreSQL is not installed (scripts/postgres install)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + "; CI must run the PostgreSQL tests")
        pytest.skip(reason)
    pytest.importorskip("psycopg")
    tmp = tempfile.mkdtemp(prefix="mmembed-pg-", dir="/tmp")
    os.chmod(tmp, 0o755)  # the server runs as nobody when we are root
    try:
        out = subprocess.run(
            [str(SCRIPT), "start", tmp, str(free_port())],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        yield out.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([str(SCRIPT), "stop", tmp], check=False, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


def new_pg_database(server_url: str) -> str:
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty accounts database of each kind (the ``database_url`` setting's form)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/accounts.db"
    return new_pg_database(request.getfixturevalue("pg_server"))


@pytest.fixture
def hash_catalog(tmp_path: Path) -> str:
    path = tmp_path / "catalog.toml"
    path.write_text(HASH_CATALOG)
    return str(path)
