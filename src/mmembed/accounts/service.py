"""Accounts in a server process: who is calling (keys), may they (limits), what it cost (ledger).

Built once at start-up by the app's composition root. Authentication reads an in-memory copy of
the managed keys, reloaded whenever the database's key revision changes; a poller reads that
revision every ``accounts_poll_s`` (0.25 s by default), so a key revoked by any process is
refused by every process within about that long. While the database is down or locked, the
metered routes answer 503 and ``/health`` says why; the poller keeps trying and everything
recovers by itself when the database is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mmembed.accounts import keys, limits
from mmembed.accounts.keys import KeyRecord, Limits
from mmembed.accounts.ledger import Entry, Ledger, Void
from mmembed.accounts.store import Store, database_url, describe_url, explain
from mmembed.netaddr import is_loopback_bind

log = logging.getLogger("mmembed.accounts")
DISABLED = {"none", "off", "disabled"}


@dataclass(frozen=True)
class Principal:
    """Who a request authenticated as."""

    name: str  # a managed key's name, "static-<hash prefix>", or "anonymous"
    key_id: int | None = None  # managed keys only
    models: frozenset[str] | None = None  # None: every model
    limits: Limits = field(default_factory=Limits)
    anonymous: bool = False  # no keys configured at all: any caller is accepted

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


class Unauthorized(Exception):
    """Missing or unknown key (401)."""


class Forbidden(Exception):
    """Admin routes without any admin key configured (403)."""


class Unavailable(Exception):
    """The accounts database is down or locked (503); the message says which."""


def _static_principal(entry: str, catalog: Any) -> tuple[bytes, Principal]:
    key, _, models = entry.partition(":")
    name = "static-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    allowed = canonical_models(catalog, frozenset(models.split("|"))) if models else None
    return key.encode(), Principal(name=name, models=allowed)


def canonical_models(catalog: Any, models: frozenset[str] | None) -> frozenset[str] | None:
    """A key's allowed models by their served names: a key created for an alias or a dated
    snapshot may use the model it names, under any of its names."""
    if models is None or catalog is None:
        return models
    return frozenset(spec.name if (spec := catalog.get(m)) is not None else m for m in models)


def bearer(authorization: str | None) -> str | None:
    scheme, _, given = (authorization or "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" and given.strip() else None


class Accounts:
    def __init__(
        self, settings: Any, catalog: Any = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.clock = clock  # wall clock for limit windows (tests inject their own)
        self.static = [_static_principal(e, catalog) for e in settings.api_keys]
        self.admin = [k.encode() for k in getattr(settings, "admin_keys", ())]
        self.poll_s = float(getattr(settings, "accounts_poll_s", 0.25))
        raw_url = getattr(settings, "database_url", "")
        self.enabled = raw_url.strip().lower() not in DISABLED
        self.url = database_url(raw_url, settings.cache_path) if self.enabled else ""
        self.store: Store | None = None
        self.by_hash: dict[str, tuple[KeyRecord, Principal]] = {}  # active keys by secret hash
        # Managed keys make auth required: while any is active, and after the last one is
        # revoked until `mmembed keys allow-anonymous` (keys.auth_required).
        self.has_managed = False
        self.revoked_only = False  # managed keys exist, and all of them are revoked
        # Never anonymous on a non-loopback address, whatever the database says.
        self.exposed = not is_loopback_bind(getattr(settings, "host", "127.0.0.1"))
        self.revision: int | None = None
        self.migrated = False
        self.poll_error: str | None = "not started" if self.enabled else None
        self.view = limits.LimitView()
        self.ledger: Ledger | None = None
        self._poller: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._warned: str | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the database (migrating it), load the keys, start the poller and the ledger.
        A database that cannot be reached is reported, not fatal: the poller keeps trying."""
        if not self.enabled:
            return
        self.store = Store(
            self.url,
            float(getattr(self.settings, "database_timeout_s", 5.0)),
            getattr(self.settings, "database_sync", "full"),
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmembed-accounts")
        self.ledger = Ledger(self.store, self.view, self.clock)
        self.ledger.start()
        await self._poll()
        self._poller = asyncio.create_task(self._poll_forever(), name="mmembed-accounts-poll")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self.ledger is not None:
            await self.ledger.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self.store is not None:
            self.store.close()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self._poll()

    async def _poll(self) -> None:
        assert self._executor is not None
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._poll_sync)
        except Exception as exc:
            self.poll_error = explain(exc)
            if self.poll_error != self._warned:
                log.warning("accounts: %s", self.poll_error)
                self._warned = self.poll_error
        else:
            if self.poll_error and self._warned:
                log.warning("accounts: the database is back")
            self.poll_error = self._warned = None

    def _poll_sync(self) -> None:
        assert self.store is not None
        if not self.migrated:
            self.store.migrate()
            self.migrated = True
        if self.ledger is not None and self.ledger.error:
            with self.store.write():  # can we write again? (a lock is gone, a server is back)
                pass
            self.ledger.error = None
        with self.store.read() as conn:
            rev = keys.revision(conn)
            if rev == self.revision:
                return
            records = keys.load_all(conn)
            anonymous_ok = keys.anonymous_allowed(conn)
        self.by_hash = {
            r.secret_hash: (
                r,
                Principal(
                    name=r.name,
                    key_id=r.id,
                    models=canonical_models(self.catalog, r.models),
                    limits=r.limits,
                ),
            )
            for r in records
            if r.active
        }
        self.has_managed = keys.auth_required(records, anonymous_ok)
        self.revoked_only = bool(records) and not self.by_hash
        self.revision = rev

    def refresh_now(self) -> None:
        """Reload keys at once (after this process changed them); called from a thread."""
        self._poll_sync()

    # -- state -----------------------------------------------------------------------------
    @property
    def reason(self) -> str | None:
        """Why the accounts database cannot be used right now (None: it can)."""
        if not self.enabled:
            return None
        return self.poll_error or (self.ledger.error if self.ledger else None)

    def check_available(self) -> None:
        if self.reason:
            raise Unavailable(f"{self.reason}; the service recovers by itself when it is back")

    def health(self) -> dict[str, Any]:
        if not self.enabled:
            return {"status": "disabled"}
        body: dict[str, Any] = {
            "status": "unavailable" if self.reason else "ok",
            "database": describe_url(self.url),
            "managed_keys": len(self.by_hash),
            "keys_required": self.keys_required,
        }
        if self.reason:
            body["reason"] = self.reason
        if self.ledger is not None:
            body["ledger"] = {"commits": self.ledger.commits, "rows": self.ledger.rows}
        return body

    @property
    def keys_required(self) -> bool:
        """Whether requests need a key: static keys, managed keys, or revoked ones that still
        lock the server (see the 401's message), or a non-loopback address."""
        return bool(self.static) or self.has_managed or self.exposed

    # -- authentication --------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an ``Authorization`` header. Managed keys are looked up by the
        SHA-256 of the given secret and the hashes compared in constant time; static keys
        (``api_keys``) are compared in constant time too."""
        if self.enabled and self.poll_error:
            self.check_available()  # the key list may be stale: do not guess
        given = bearer(authorization)
        if not self.static and not self.has_managed and not self.exposed:
            return Principal(name="anonymous", anonymous=True)
        if given is None:
            raise Unauthorized("Invalid API-key provided." + self._why_keys())
        digest = keys.hash_secret(given)
        found = self.by_hash.get(digest)
        if found is not None and hmac.compare_digest(found[0].secret_hash, digest):
            return found[1]
        encoded = given.encode("utf-8", "surrogatepass")
        for secret, principal in self.static:
            if hmac.compare_digest(encoded, secret):
                return principal
        raise Unauthorized("Invalid API-key provided." + self._why_keys())

    def _why_keys(self) -> str:
        """Why a server with no usable key still asks for one (else nothing to add)."""
        if self.static or self.by_hash:
            return ""
        if self.revoked_only and self.has_managed:
            return (
                " This server requires a key although every managed key is revoked: once keys "
                "were created, revoking the last one does not open the server. Create a key "
                "(mmembed keys create --name NAME), or run 'mmembed keys allow-anonymous' to "
                "accept requests without a key again (on loopback only)."
            )
        if self.exposed:
            return (
                " This server listens on a non-loopback address and has no usable key: create "
                "one (mmembed keys create --name NAME) or set api_keys."
            )
        return ""

    def authenticate_admin(self, authorization: str | None) -> None:
        if not self.admin:
            raise Forbidden("The admin routes are disabled: no admin key is configured.")
        given = (bearer(authorization) or "").encode("utf-8", "surrogatepass")
        if not any(hmac.compare_digest(given, k) for k in self.admin):
            raise Unauthorized("Invalid admin API-key provided.")

    # -- limits and the ledger --------------------------------------------------------------
    def reserve(self, principal: Principal, tokens: int) -> limits.Refusal | None:
        """Admit a request estimated at ``tokens`` against the key's remaining budget, without
        touching the database: a refusal, or None (then ``release`` when it is recorded)."""
        if principal.key_id is None:
            return None
        if principal.limits.any:
            now = self.clock()
            refusal = self.view.refusal(
                principal.key_id, principal.name, principal.limits, now, tokens
            )
            if refusal is not None:
                return refusal
        self.view.hold(principal.key_id, tokens)
        return None

    def release(self, principal: Principal, tokens: int) -> None:
        if principal.key_id is not None:
            self.view.release(principal.key_id, tokens)

    async def record(self, entry: Entry) -> limits.Refusal | None:
        """Write ``entry`` to the ledger (charging its key's limits) before the answer goes out."""
        if self.ledger is None:
            return None
        return await self.ledger.record(entry)

    def enqueue(self, op: Entry | Void) -> asyncio.Future:
        """Queue ``op`` for the ledger now, without waiting (``Ledger.enqueue``); the ledger
        commits what is queued before it closes. Done at once when there is no ledger."""
        if self.ledger is not None:
            return self.ledger.enqueue(op)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def run(self, fn: Any, *args: Any) -> Any:
        """Run a blocking accounts call (admin routes) off the event loop, and off the poller's
        thread: a long report must not delay noticing a revocation."""
        return await asyncio.to_thread(fn, *args)
