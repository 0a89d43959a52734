"""Issue 16, finding 8: key names are matched whole (no trailing newline slips past ``$``), and
no database failure while creating a key shows the new key's secret or its hash, on SQLite and
PostgreSQL, through the library, the admin route and the CLI."""

from __future__ import annotations

import asyncio
import logging
import traceback
from pathlib import Path

import httpx
import pytest

from mmembed.accounts import keys
from mmembed.accounts.store import Store, database_url
from mmembed.api.app import create_app
from mmembed.cli import main
from mmembed.config import Settings

BAD_NAMES = ["web\n", "a" * 64 + "\n", "a\nb", "web\r\n", "web\x00", " web", "web "]


@pytest.fixture
def store(db_url: str):
    s = Store(database_url(db_url, ""))
    s.migrate()
    yield s
    s.close()


def test_names_are_matched_whole(store: Store):
    for name in BAD_NAMES:
        with pytest.raises(keys.AccountsError, match="invalid key name"):
            keys.create(store, name)
    assert keys.list_keys(store) == []
    assert keys.check_name("a" * 64) == "a" * 64


def test_a_database_refusal_does_not_carry_the_secret(
    store: Store, monkeypatch: pytest.MonkeyPatch
):
    """A unique-constraint failure on insert (forced here by reusing one secret) surfaces as a
    one-line AccountsError; neither its message nor its traceback holds the secret's hash
    (SQLAlchemy's [parameters: ...] and PostgreSQL's DETAIL both would)."""
    secret = "mmk-" + "s" * 43
    monkeypatch.setattr(keys, "new_secret", lambda: secret)
    keys.create(store, "one")
    with pytest.raises(keys.AccountsError) as caught:
        keys.create(store, "two")
    shown = "".join(traceback.format_exception(caught.value))
    assert keys.hash_secret(secret) not in shown
    assert secret not in shown
    assert [k.name for k in keys.list_keys(store)] == ["one"]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(self.format(record))


def test_admin_route_refuses_a_name_ending_in_a_newline(
    db_url: str, tmp_path: Path, hash_catalog: str
):
    """On PostgreSQL such a name (65 characters with the newline) used to overflow the column:
    a 500 whose logged traceback carried the new key's secret hash."""
    settings = Settings(
        cache_dir=str(tmp_path), database_url=db_url, admin_keys=("adm",), catalog=hash_catalog
    )
    app = create_app(settings)
    logger = logging.getLogger("mmembed")
    collect = _Collect()
    logger.addHandler(collect)

    async def go() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
                auth = {"Authorization": "Bearer adm"}
                return [
                    await c.post("/admin/keys", json={"name": name}, headers=auth)
                    for name in ("a" * 64 + "\n", "web\n")
                ] + [await c.get("/admin/keys", headers=auth)]

    try:
        *created, listed = asyncio.run(go())
    finally:
        logger.removeHandler(collect)
    for r in created:
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "InvalidParameter"
        assert "invalid key name" in r.json()["message"]
    assert listed.json()["keys"] == []
    assert "Traceback" not in "\n".join(collect.text)


def test_cli_refuses_a_name_ending_in_a_newline(capsys: pytest.CaptureFixture, db_url: str):
    code = main(["keys", "create", "--name", "web\n", "--database-url", db_url])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""  # no secret was made
    assert err.count("\n") == 1 and "invalid key name" in err
