"""Managed API keys: create, list, update, revoke. Secrets are random, shown once, stored as
SHA-256 (a 256-bit random secret needs no slow hash: there is nothing to brute-force)."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from mmembed.accounts import schema
from mmembed.accounts.store import Store

SECRET_PREFIX = "mmk-"
# Matched whole (``fullmatch``): with ``match`` and ``$`` a name could end in a newline.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESERVED_NAMES = ("anonymous",)
RESERVED_PREFIXES = ("static-",)  # names the ledger gives to static api_keys


class AccountsError(ValueError):
    """A key operation that cannot be done (bad value, unknown or duplicate name)."""


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    monthly_tokens: int | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.monthly_tokens))


@dataclass(frozen=True)
class KeyRecord:
    id: int
    name: str
    secret_hash: str
    hint: str
    models: frozenset[str] | None  # None: every model
    limits: Limits
    created_at: float
    updated_at: float
    revoked_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def public(self) -> dict[str, Any]:
        """What ``keys list`` and ``GET /admin/keys`` show (never the hash)."""
        return {
            "name": self.name,
            "hint": self.hint + "…",
            "models": sorted(self.models) if self.models is not None else None,
            "rpm": self.limits.rpm,
            "tpm": self.limits.tpm,
            "monthly_tokens": self.limits.monthly_tokens,
            "status": "active" if self.active else "revoked",
            "created_at": _iso(self.created_at),
            "revoked_at": _iso(self.revoked_at) if self.revoked_at else None,
        }


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise AccountsError(
            f"invalid key name {name!r:.80}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if name in RESERVED_NAMES or name.startswith(RESERVED_PREFIXES):
        raise AccountsError(f"invalid key name {name!r}: that name is reserved")
    return name


def parse_limit(value: Any, what: str) -> int | None:
    """A positive integer, or None / 'none' / 'unlimited' for no limit."""
    if value is None or (isinstance(value, str) and value.strip().lower() in {"none", "unlimited"}):
        return None
    if isinstance(value, bool):
        raise AccountsError(f"{what} must be a positive integer or 'none', got {value!r}")
    try:
        n = int(str(value).strip().replace("_", ""))
    except ValueError:
        raise AccountsError(f"{what} must be a positive integer or 'none', got {value!r}") from None
    if n <= 0 or n >= 2**62:
        raise AccountsError(f"{what} must be a positive integer or 'none', got {value!r}")
    return n


def parse_models(value: Any, known: set[str] | None = None) -> frozenset[str] | None:
    """'m1,m2' or a list -> those names; None, '', '*' or 'all' -> every model."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip() in {"", "*", "all"}:
            return None
        names = [v.strip() for v in value.split(",")]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        names = [v.strip() for v in value]
    else:
        raise AccountsError(f"models must be a comma-separated list of model names, got {value!r}")
    if any(not n for n in names):
        raise AccountsError(f"models: empty model name in {value!r}")
    if known is not None:
        unknown = sorted(set(names) - known)
        if unknown:
            raise AccountsError(f"unknown model {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return frozenset(names)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _record(row: Any) -> KeyRecord:
    return KeyRecord(
        id=int(row.id),
        name=row.name,
        secret_hash=row.secret_hash,
        hint=row.hint,
        models=frozenset(row.models.split(",")) if row.models else None,
        limits=Limits(row.rpm, row.tpm, row.monthly_tokens),
        created_at=row.created_at,
        updated_at=row.updated_at,
        revoked_at=row.revoked_at,
    )


def _bump(conn: Connection) -> None:
    conn.execute(
        update(schema.state)
        .where(schema.state.c.name == "keys")
        .values(value=schema.state.c.value + 1)
    )


# accounts_state row: 1 once `mmembed keys allow-anonymous` was run after the last key was
# revoked; creating a key clears it. (A missing row reads as 0.)
ANONYMOUS = "anonymous"


def _set_state(conn: Connection, name: str, value: int) -> None:
    done = conn.execute(update(schema.state).where(schema.state.c.name == name).values(value=value))
    if done.rowcount == 0:
        conn.execute(insert(schema.state).values(name=name, value=value))


def anonymous_allowed(conn: Connection) -> bool:
    row = conn.execute(select(schema.state.c.value).where(schema.state.c.name == ANONYMOUS)).first()
    return bool(row and row.value)


def auth_required(records: list[KeyRecord], anonymous_ok: bool) -> bool:
    """The rule: once a managed key has been created, every request needs a key, also after
    the last one is revoked (revoking a key must never open a server), until someone runs
    ``mmembed keys allow-anonymous``; creating a key makes keys required again."""
    return any(r.active for r in records) or (bool(records) and not anonymous_ok)


def allow_anonymous(store: Store) -> int:
    """Let servers without static keys accept requests without a key again (on loopback only);
    refused while any managed key is active. Returns the number of revoked keys."""
    with store.write() as conn:
        records = load_all(conn)
        active = [r.name for r in records if r.active]
        if active:
            raise AccountsError(
                f"{len(active)} managed key(s) are active ({', '.join(active[:5])}): revoke them "
                "first (mmembed keys revoke NAME), or keep using keys"
            )
        _set_state(conn, ANONYMOUS, 1)
        _bump(conn)
    return len(records)


def revision(conn: Connection) -> int:
    return int(
        conn.execute(select(schema.state.c.value).where(schema.state.c.name == "keys")).scalar_one()
    )


def load_all(conn: Connection) -> list[KeyRecord]:
    return [_record(r) for r in conn.execute(select(schema.api_keys).order_by("id"))]


def create(
    store: Store, name: str, models: frozenset[str] | None = None, limits: Limits | None = None
) -> tuple[KeyRecord, str]:
    """A new key; returns it and its secret (the only time the secret exists in clear)."""
    check_name(name)
    limits = limits or Limits()
    secret = new_secret()
    now = time.time()
    try:
        with store.write() as conn:
            row = _insert_key(conn, name, secret, models, limits, now)
    except IntegrityError:
        # Another process created the name meanwhile. The database's own message is not
        # passed on: PostgreSQL's names the conflicting values, the secret's hash among them.
        raise AccountsError(f"a key named {name!r} exists already") from None
    return _record(row), secret


def _insert_key(
    conn: Connection,
    name: str,
    secret: str,
    models: frozenset[str] | None,
    limits: Limits,
    now: float,
) -> Any:
    if conn.execute(select(schema.api_keys.c.id).where(schema.api_keys.c.name == name)).first():
        raise AccountsError(f"a key named {name!r} exists already")
    conn.execute(
        insert(schema.api_keys).values(
            name=name,
            secret_hash=hash_secret(secret),
            hint=secret[: len(SECRET_PREFIX) + 4],
            models=",".join(sorted(models)) if models is not None else "",
            rpm=limits.rpm,
            tpm=limits.tpm,
            monthly_tokens=limits.monthly_tokens,
            created_at=now,
            updated_at=now,
        )
    )
    # A new key requires keys again (after `keys allow-anonymous`). Only an update: the row
    # exists once that command ran, and an insert here could collide with another creator's.
    conn.execute(update(schema.state).where(schema.state.c.name == ANONYMOUS).values(value=0))
    _bump(conn)
    return conn.execute(select(schema.api_keys).where(schema.api_keys.c.name == name)).one()


def get(store: Store, name: str) -> KeyRecord:
    with store.read() as conn:
        row = conn.execute(select(schema.api_keys).where(schema.api_keys.c.name == name)).first()
    if row is None:
        raise AccountsError(f"no key named {name!r}")
    return _record(row)


def list_keys(store: Store) -> list[KeyRecord]:
    with store.read() as conn:
        return load_all(conn)


_UNSET: Any = object()


def update_key(
    store: Store,
    name: str,
    models: frozenset[str] | None = _UNSET,
    rpm: int | None = _UNSET,
    tpm: int | None = _UNSET,
    monthly_tokens: int | None = _UNSET,
) -> KeyRecord:
    """Change a key's models or limits; arguments left out stay as they are."""
    values: dict[str, Any] = {}
    if models is not _UNSET:
        values["models"] = ",".join(sorted(models)) if models is not None else ""
    for field, value in (("rpm", rpm), ("tpm", tpm), ("monthly_tokens", monthly_tokens)):
        if value is not _UNSET:
            values[field] = value
    if not values:
        raise AccountsError("nothing to update: give --models, --rpm, --tpm or --monthly-tokens")
    values["updated_at"] = time.time()
    with store.write() as conn:
        done = conn.execute(
            update(schema.api_keys).where(schema.api_keys.c.name == name).values(**values)
        )
        if done.rowcount == 0:
            raise AccountsError(f"no key named {name!r}")
        _bump(conn)
        row = conn.execute(select(schema.api_keys).where(schema.api_keys.c.name == name)).one()
    return _record(row)


def revoke(store: Store, name: str) -> KeyRecord:
    """Revoke a key for good (it stays listed, for the ledger's sake). Revoking twice is fine."""
    now = time.time()
    with store.write() as conn:
        row = conn.execute(select(schema.api_keys).where(schema.api_keys.c.name == name)).first()
        if row is None:
            raise AccountsError(f"no key named {name!r}")
        if row.revoked_at is None:
            conn.execute(
                update(schema.api_keys)
                .where(schema.api_keys.c.name == name)
                .values(revoked_at=now, updated_at=now)
            )
            _bump(conn)
            row = conn.execute(select(schema.api_keys).where(schema.api_keys.c.name == name)).one()
    return _record(row)


def count(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(schema.api_keys)).scalar_one())
