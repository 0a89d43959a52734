"""`mmembed keys` and `mmembed usage` on SQLite and PostgreSQL, and their one-line errors."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from mmembed.accounts import keys
from mmembed.accounts.ledger import Entry, Ledger
from mmembed.accounts.limits import LimitView
from mmembed.accounts.store import Store, database_url
from mmembed.cli import main
from mmembed.types import Usage


def run(capsys: pytest.CaptureFixture, db_url: str, *args: str) -> tuple[int, str, str]:
    try:
        code = main([*args, "--database-url", db_url])
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_keys_commands(capsys: pytest.CaptureFixture, db_url: str):
    code, out, err = run(capsys, db_url, "keys", "create", "--name", "web", "--rpm", "60")
    assert code == 0 and "shown only now" in err
    secret = out.strip().splitlines()[-1]  # the secret is the last line of stdout
    assert secret.startswith("mmk-")
    store = Store(database_url(db_url, ""))
    try:
        assert keys.get(store, "web").secret_hash == keys.hash_secret(secret)
    finally:
        store.close()

    code, out, _ = run(
        capsys,
        db_url,
        "keys", "create", "--name", "batch", "--models", "qwen3-vl-embedding",
        "--tpm", "10_000", "--monthly-tokens", "5000000", "--json",
    )  # fmt: skip
    made = json.loads(out)
    assert code == 0 and made["name"] == "batch" and made["key"].startswith("mmk-")
    assert (made["tpm"], made["monthly_tokens"], made["models"]) == (
        10_000,
        5_000_000,
        ["qwen3-vl-embedding"],
    )

    code, out, _ = run(capsys, db_url, "keys", "update", "web", "--rpm", "none", "--tpm", "9")
    assert code == 0 and "web" in out
    code, out, _ = run(capsys, db_url, "keys", "revoke", "batch")
    assert code == 0 and "revoked" in out
    code, out, _ = run(capsys, db_url, "keys", "list", "--json")
    listed = {k["name"]: k for k in json.loads(out)}
    assert (listed["web"]["rpm"], listed["web"]["tpm"]) == (None, 9)
    assert listed["batch"]["status"] == "revoked"
    assert secret not in out and made["key"] not in out
    code, out, _ = run(capsys, db_url, "keys", "list")
    assert out.splitlines()[0].split()[:3] == ["name", "hint", "status"]
    assert len(out.splitlines()) == 3


@pytest.mark.parametrize(
    "args, needle",
    [
        (["keys", "create", "--name", "x", "--rpm", "fast"], "--rpm must be a positive integer"),
        (["keys", "create", "--name", "x", "--tpm", "0"], "--tpm must be a positive integer"),
        (["keys", "create", "--name", "bad name"], "invalid key name"),
        (["keys", "create", "--name", "x", "--models", "gpt-4"], "unknown model 'gpt-4'"),
        (["keys", "update", "ghost", "--rpm", "5"], "no key named 'ghost'"),
        (["keys", "update", "ghost"], "nothing to update"),
        (["keys", "revoke", "ghost"], "no key named 'ghost'"),
        (["usage", "--since", "yesterday"], "invalid date 'yesterday'"),
        (["usage", "--by", "week"], "invalid choice: 'week'"),
        (["keys", "rotate"], "invalid choice: 'rotate'"),
    ],
)
def test_malformed_values_give_one_line(
    capsys: pytest.CaptureFixture, db_url: str, args: list[str], needle: str
):
    code, out, err = run(capsys, db_url, *args)
    assert code in (1, 2) and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err


def test_unreachable_database_is_one_line(capsys: pytest.CaptureFixture):
    url = "postgresql://nobody@127.0.0.1:1/none"
    code, out, err = run(capsys, url, "keys", "list", "--database-timeout-s", "1")
    assert out == ""
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "unavailable" in err and "Traceback" not in err


def test_usage_report(capsys: pytest.CaptureFixture, db_url: str):
    store = Store(database_url(db_url, ""))
    store.migrate()
    key, _ = keys.create(store, "team-a")

    def entry(i: int, model: str, tokens: int, images: int, status: int = 200) -> Entry:
        return Entry(
            ts=time.time(),
            request_id=f"r{i}",
            key_id=key.id,
            key_name="team-a",
            model=model,
            route="dashscope",
            items=2,
            usage=Usage(input_tokens=tokens, image_tokens=images, image_count=images // 64),
            status=status,
            code=None,
            cost=(tokens * 0.1 + images * 0.258) / 1e6,
        )

    async def fill() -> None:
        ledger = Ledger(store, LimitView())
        ledger.start()
        await asyncio.gather(
            ledger.record(entry(1, "qwen3-vl-embedding", 100, 128)),
            ledger.record(entry(2, "qwen3-vl-embedding", 50, 0)),
            ledger.record(entry(3, "tongyi-embedding-vision-plus", 10, 0, status=400)),
        )
        await ledger.close()

    asyncio.run(fill())
    store.close()

    code, out, _ = run(capsys, db_url, "usage", "--by", "model", "--json")
    rows = {r["model"]: r for r in json.loads(out)}
    qwen = rows["qwen3-vl-embedding"]
    assert (qwen["requests"], qwen["input_tokens"], qwen["image_tokens"], qwen["image_count"]) == (
        2,
        150,
        128,
        2,
    )
    assert qwen["cost_usd"] == pytest.approx((150 * 0.1 + 128 * 0.258) / 1e6)
    plus = rows["tongyi-embedding-vision-plus"]
    assert (plus["failed"], plus["input_tokens"], plus["cost_usd"]) == (1, 0, 0)

    code, out, _ = run(capsys, db_url, "usage", "--key", "team-a", "--csv")
    lines = out.strip().splitlines()
    assert lines[0].startswith("key,requests,failed") and lines[1].startswith("team-a,3,1,6,150,")
    today = time.strftime("%Y-%m-%d", time.gmtime())
    code, out, _ = run(capsys, db_url, "usage", "--by", "day", "--since", today, "--until", today)
    assert out.splitlines()[1].startswith(today)
    code, out, _ = run(capsys, db_url, "usage", "--key", "nobody")
    assert code == 0
    assert "no requests" in out


def test_serve_counts_managed_keys_as_keys(capsys: pytest.CaptureFixture, db_url: str):
    """`serve` may bind beyond loopback once the database holds a key (even a revoked one)."""
    from mmembed.accounts.cli import has_managed_keys
    from mmembed.config import Settings

    settings = Settings(database_url=db_url)
    assert not has_managed_keys(settings)
    assert run(capsys, db_url, "keys", "create", "--name", "k")[0] == 0
    assert run(capsys, db_url, "keys", "revoke", "k")[0] == 0
    assert has_managed_keys(settings)
    assert not has_managed_keys(Settings(database_url="none"))
