"""Files uploaded through the DashScope SDK's local-file flow, referenced later as ``oss://KEY``.

The SDK asks for an upload policy, POSTs the file with the policy's form fields, and sends
``oss://<upload_dir>/<file name>`` in place of the local path. Here:

- A policy names an upload directory ``mmembed/<owner>/<random>`` and is signed (HMAC-SHA256)
  with a secret kept in the store directory; the upload POST carries no API key, so the
  signature is what proves the uploader got the policy from us, for that owner, recently.
- The owner is a keyed hash of the API key (never the key itself); without configured keys
  every upload belongs to one anonymous owner.
- On disk a file lives at ``<root>/<owner>/<sha256 of its key>``: the client's key and file
  name never become a path, so no traversal is possible. Uploads stream into ``<root>/tmp``
  and are hard-linked into place, which fails if the key already exists (OSS's
  ``x-oss-forbid-overwrite``): an ``oss://`` reference can never change meaning.
- A file expires ``ttl_s`` after it was written (its mtime). Expired files are deleted when
  touched and by a sweep that runs at most every ``sweep_interval_s`` (started by uploads).
- Each owner's total is capped; bytes being written count at once, so parallel uploads cannot
  overshoot. Several processes may share one store (Ray Serve replicas, on shared storage):
  each upload is checked as it streams against the owner's bytes as last counted here (counted
  again before a refusal), and linked into place under the owner's lock (``flock`` on that
  directory) only after a fresh count shows it still fits, so the cap holds across processes
  (uploads still being written elsewhere count once they are finished).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import fcntl
import hashlib
import hmac
import logging
import math
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from mmembed.config import Settings
from mmembed.errors import ApiError, ErrorCode, echo

log = logging.getLogger("mmembed.uploads")

OSS_SCHEME = "oss://"
KEY_PREFIX = "mmembed"  # first segment of every key we issue
MAX_KEY_CHARS = 1023  # OSS's own limit on object keys
_OWNER_LEN = 32  # hex characters (128 bits)
_TMP_MAX_AGE_S = 3600.0  # abandoned partial uploads (a crash mid-write) are removed after this
_MIN_FREE_BYTES = 1 << 20  # /health calls the store unusable below this much free disk
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def format_mb(n: int) -> str:
    return f"{n / (1 << 20):.3g} MB"


def format_mb_pair(a: int, b: int) -> tuple[str, str]:
    """Two sizes in MB with enough digits that different sizes never read the same (a quota
    message saying "28.6 MB, over the limit of 28.6 MB" explains nothing)."""
    for digits in (3, 4, 5, 6, 7):
        shown = f"{a / (1 << 20):.{digits}g} MB", f"{b / (1 << 20):.{digits}g} MB"
        if shown[0] != shown[1] or a == b:
            return shown
    return f"{a} bytes", f"{b} bytes"


@dataclass(frozen=True)
class Policy:
    """What a verified policy allows: one owner, one directory, files up to ``max_bytes``."""

    owner: str
    upload_dir: str
    max_bytes: int
    expires: float  # epoch seconds
    holder: str = ""  # who it was issued to (the API layer's id), re-checked at upload time


class UploadStore:
    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        ttl_s: float,
        owner_max_bytes: int,
        policy_ttl_s: float = 300.0,
        sweep_interval_s: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.ttl_s = ttl_s
        self.owner_max_bytes = owner_max_bytes
        self.policy_ttl_s = policy_ttl_s
        self.sweep_interval_s = sweep_interval_s
        self._clock = clock
        self._secret: bytes | None = None
        # Accounting: per owner, bytes of finished uploads as last scanned (then kept up to
        # date here), and bytes of this process's uploads being written.
        self._disk: dict[str, int] = {}
        self._inflight: dict[str, int] = {}  # owner -> bytes of uploads being written
        self._last_sweep = -float("inf")

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadStore:
        root = settings.upload_dir or os.path.join(settings.cache_path, "uploads")
        return cls(
            root,
            ttl_s=settings.upload_ttl_s,
            owner_max_bytes=settings.upload_max_bytes_per_key,
            sweep_interval_s=settings.upload_sweep_interval_s,
        )

    # -- identity and policies ----------------------------------------------------------------
    @staticmethod
    def owner_id(api_key: str | None) -> str:
        """A stable, non-reversible id for an API key (None: the anonymous owner)."""
        name = b"\x00anonymous" if api_key is None else api_key.encode()
        digest = hmac.new(b"mmembed upload owner v1", name, hashlib.sha256).hexdigest()
        return digest[:_OWNER_LEN]

    def new_policy(self, owner: str, max_bytes: int, holder: str = "") -> dict[str, str | int]:
        """The form fields of a fresh upload policy (the SDK's names; see ``api.uploads``).
        ``holder`` names who it is issued to, so the upload can check they still may."""
        expires = self._clock() + self.policy_ttl_s
        upload_dir = f"{KEY_PREFIX}/{owner}/{secrets.token_hex(12)}"
        doc = {"dir": upload_dir, "owner": owner, "max": max_bytes, "exp": round(expires, 3)}
        if holder:
            doc["who"] = holder
        policy = base64.b64encode(orjson.dumps(doc)).decode()
        return {"policy": policy, "signature": self._sign(policy), "upload_dir": upload_dir}

    def verify_policy(self, policy: str, signature: str) -> Policy:
        """The policy's terms if we signed it and it has not expired; 403 otherwise."""
        if not policy or not hmac.compare_digest(
            self._sign(policy).encode(), (signature or "").encode()
        ):
            raise ApiError(ErrorCode.ACCESS_DENIED, "upload policy signature does not match")
        try:
            doc = orjson.loads(base64.b64decode(policy, validate=True))
            terms = Policy(
                str(doc["owner"]),
                str(doc["dir"]),
                int(doc["max"]),
                float(doc["exp"]),
                str(doc.get("who", "")),
            )
            if not math.isfinite(terms.expires):  # NaN would never compare as expired
                raise ValueError("exp")
        except (ValueError, KeyError, TypeError, OverflowError, binascii.Error):
            raise ApiError(ErrorCode.ACCESS_DENIED, "upload policy is malformed") from None
        if terms.expires < self._clock():
            raise ApiError(ErrorCode.ACCESS_DENIED, "upload policy has expired; request a new one")
        return terms

    def _sign(self, policy: str) -> str:
        mac = hmac.new(self._load_secret(), policy.encode(), hashlib.sha256).digest()
        return base64.b64encode(mac).decode()

    def _load_secret(self) -> bytes:
        """A random signing key kept in the store (0600), shared by restarts and processes.
        Written aside and linked into place, so a reader never sees a half-written one.
        Unreadable or damaged: uploads are unavailable (503), and the log says where."""
        if self._secret is None:
            try:
                self._secret = self._read_secret()
            except (OSError, ValueError) as exc:
                log.error("upload signing secret in %s is unusable: %s", self.root, exc)
                raise ApiError(
                    ErrorCode.SERVICE_UNAVAILABLE,
                    "uploads are unavailable: the upload signing secret cannot be read "
                    "(the server log says why)",
                ) from None
        return self._secret

    def _read_secret(self) -> bytes:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.root / ".secret"
        if not path.exists():
            tmp = self.root / f".secret-{secrets.token_hex(8)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(32))
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # the first process to get here wins
            tmp.unlink()
        secret = path.read_bytes()
        if len(secret) < 32:
            raise ValueError(f"upload signing secret {path} is damaged; delete it")
        return secret

    def check(self) -> str | None:
        """Why uploads cannot work right now (for /health), or None. No paths: clients see it."""
        try:
            self._load_secret()
            if not os.access(self.root, os.W_OK | os.X_OK):
                return "the upload directory is not writable"
            if shutil.disk_usage(self.root).free < _MIN_FREE_BYTES:
                return "the upload disk is full"
        except ApiError as exc:
            return exc.message
        except OSError as exc:
            log.error("upload store %s: %s", self.root, exc)
            return "the upload directory cannot be used"
        return None

    # -- writing -------------------------------------------------------------------------------
    def check_key(self, key: str, terms: Policy) -> None:
        """A key the SDK built from the policy: ``<upload_dir>/<file name>``."""
        name = key[len(terms.upload_dir) + 1 :]
        if not key.startswith(terms.upload_dir + "/") or not name:
            raise ApiError(
                ErrorCode.ACCESS_DENIED,
                f"upload key must be {terms.upload_dir}/<file name>, as the policy says",
            )
        if len(key) > MAX_KEY_CHARS or any(ord(c) < 32 or c == "\x7f" for c in key):
            raise ApiError(ErrorCode.INVALID_PARAMETER, "upload key is too long or has controls")

    async def save(
        self, key: str, terms: Policy, chunks: AsyncIterable[bytes], declared: int | None = None
    ) -> int:
        """Stream ``chunks`` to the file for ``key``; returns its size. The per-file and
        per-owner caps are enforced as bytes arrive; nothing is kept on failure."""
        self.check_key(key, terms)
        owner = terms.owner
        await self.maybe_sweep()
        # The owner's bytes as this process last counted them (the commit counts afresh);
        # before refusing on that count, count once more: another process may have deleted.
        recounted = owner not in self._disk
        if recounted:
            self._disk[owner] = await asyncio.to_thread(self._scan_owner, owner)

        async def check_quota(extra: int) -> None:
            nonlocal recounted
            if not recounted and self.usage(owner) + extra > self.owner_max_bytes:
                self._disk[owner] = await asyncio.to_thread(self._scan_owner, owner)
                recounted = True
            self._check_quota(owner, extra)

        final = self._path(owner, key)
        if final.exists():
            raise _exists(key)
        if declared is not None:  # refuse before reading anything when the size is known
            self._check_file_size(declared, terms.max_bytes)
            await check_quota(declared)
        tmp_dir = self.root / "tmp"
        tmp = tmp_dir / f"{secrets.token_hex(16)}.part"
        size = 0
        try:
            tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Owner-only (0600): uploads are private to one API key, on disk as well.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    self._check_file_size(size + len(chunk), terms.max_bytes)
                    await check_quota(len(chunk))
                    self._inflight[owner] = self._inflight.get(owner, 0) + len(chunk)
                    size += len(chunk)
                    out.write(chunk)  # page-cache writes: cheap enough on the event loop
            if size == 0:
                raise ApiError(ErrorCode.INVALID_PARAMETER, "the uploaded file is empty")
            final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            held, linked = await asyncio.to_thread(self._commit, tmp, final, key, owner, size)
            self._disk[owner] = held  # no await until `finally` uncounts it as in flight
            if not linked:
                raise self._quota_error(held + size)
        except OSError as exc:  # a full disk, a read-only or vanished directory
            raise _storage_error("store an upload", exc) from None
        finally:
            self._inflight[owner] = self._inflight.get(owner, 0) - size
            if self._inflight[owner] <= 0:
                del self._inflight[owner]
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        log.info("stored an upload of %d bytes for owner %s", size, owner[:8])
        return size

    def _commit(self, tmp: Path, final: Path, key: str, owner: str, size: int) -> tuple[int, bool]:
        """Link a finished upload into place if the owner's files, counted afresh under the
        owner's lock, leave room for it (other processes' uploads count too). Returns the
        owner's bytes on disk after, and whether it was linked (False: over the quota)."""
        with self._owner_lock(owner):
            used = self._scan_owner(owner)
            if used + size > self.owner_max_bytes:
                return used, False
            try:
                os.link(tmp, final)  # atomic, and never replaces an existing upload
            except FileExistsError:
                raise _exists(key) from None
            return used + size, True

    @contextlib.contextmanager
    def _owner_lock(self, owner: str) -> Iterator[None]:
        """An exclusive ``flock`` on the owner's directory (blocks; call off the event loop).
        The directory itself is the lock: no lock files to sweep or to mistake for uploads."""
        fd = os.open(self.root / owner, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def usage(self, owner: str) -> int:
        """Bytes this owner has stored (not expired) or is uploading right now."""
        return self._disk.get(owner, 0) + self._inflight.get(owner, 0)

    def _check_file_size(self, size: int, max_bytes: int) -> None:
        if size > max_bytes:
            raise ApiError(
                ErrorCode.TOO_LARGE,
                f"the file is larger than this upload policy allows ({format_mb(max_bytes)})",
            )

    def _check_quota(self, owner: str, extra: int) -> None:
        used = self.usage(owner)
        if used + extra > self.owner_max_bytes:
            raise self._quota_error(used + extra)

    def _quota_error(self, total_bytes: int) -> ApiError:
        total, limit = format_mb_pair(total_bytes, self.owner_max_bytes)
        return ApiError(
            ErrorCode.TOO_LARGE,
            f"uploads of this API key would take {total}, over the limit of {limit}; "
            f"uploads expire after {self.ttl_s / 3600:g} h",
        )

    def _add_disk(self, owner: str, size: int) -> None:
        if owner in self._disk:
            self._disk[owner] = max(0, self._disk[owner] + size)

    # -- reading -------------------------------------------------------------------------------
    async def read(self, ref: str, owner: str, max_bytes: int) -> bytes:
        """The bytes behind ``oss://KEY`` for ``owner``; clear errors for everything else."""
        key = ref.strip()[len(OSS_SCHEME) :]
        parts = key.split("/")
        if len(parts) < 4 or parts[0] != KEY_PREFIX or len(key) > MAX_KEY_CHARS:
            raise ApiError(
                ErrorCode.INVALID_URL,
                f"{_short(ref)} is not a file uploaded to this server (upload local files "
                "with the dashscope SDK, which asks this server for an upload policy)",
            )
        if not hmac.compare_digest(parts[1].encode(), owner.encode()):
            raise ApiError(
                ErrorCode.ACCESS_DENIED,
                f"{_short(ref)} was uploaded with a different API key; files are only "
                "visible to the key that uploaded them",
            )
        path = self._path(owner, key)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ApiError(
                ErrorCode.INVALID_URL,
                f"{_short(ref)} does not exist (uploads expire after {self.ttl_s / 3600:g} h; "
                "upload the file again)",
            ) from None
        except OSError as exc:
            raise _storage_error("read an upload", exc) from None
        if self._expired(stat.st_mtime):
            self._delete(path, owner, stat.st_size)
            raise ApiError(
                ErrorCode.INVALID_URL,
                f"{_short(ref)} has expired (uploads are kept {self.ttl_s / 3600:g} h); "
                "upload the file again",
            )
        if stat.st_size > max_bytes:
            raise ApiError(
                ErrorCode.TOO_LARGE,
                f"uploaded file is {stat.st_size} bytes, over the limit of {max_bytes} bytes",
            )

        def load() -> bytes:
            with open(path, "rb") as f:
                return f.read(max_bytes + 1)

        try:
            data = await asyncio.to_thread(load)
        except OSError as exc:
            raise _storage_error("read an upload", exc) from None
        if len(data) > max_bytes:
            raise ApiError(ErrorCode.TOO_LARGE, f"uploaded file is over {max_bytes} bytes")
        return data

    # -- expiry --------------------------------------------------------------------------------
    def _expired(self, mtime: float) -> bool:
        return mtime + self.ttl_s < self._clock()

    def _path(self, owner: str, key: str) -> Path:
        return self.root / owner / hashlib.sha256(key.encode()).hexdigest()

    def _delete(self, path: Path, owner: str, size: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            self._add_disk(owner, -size)

    def _scan_owner(self, owner: str) -> int:
        """Bytes of the owner's unexpired uploads on disk."""
        used = 0
        try:
            entries = list(os.scandir(self.root / owner))
        except FileNotFoundError:
            return 0
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat(follow_symlinks=False)
                if not self._expired(st.st_mtime):
                    used += st.st_size
        return used

    def _entries(self) -> Iterator[tuple[str, os.DirEntry[str], os.stat_result]]:
        """(owner, entry, stat) for every stored file; partial uploads have owner "tmp"."""
        if not self.root.is_dir():
            return
        for owner_dir in os.scandir(self.root):
            if not owner_dir.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(owner_dir.path):
                with contextlib.suppress(FileNotFoundError):
                    yield owner_dir.name, entry, entry.stat(follow_symlinks=False)

    def sweep(self) -> list[tuple[str, int]]:
        """Delete expired uploads and stale partial files (thread-safe: touches only the disk).
        Returns the (owner, size) of each deleted upload, for the caller's accounting."""
        now = self._clock()
        deleted: list[tuple[str, int]] = []
        for owner, entry, st in list(self._entries()):
            if owner == "tmp":
                if st.st_mtime + _TMP_MAX_AGE_S < now:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
            elif self._expired(st.st_mtime):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    deleted.append((owner, st.st_size))
        if deleted:
            log.info("upload sweep deleted %d expired files", len(deleted))
        return deleted

    def sweep_partials(self) -> int:
        """At start-up: delete every partial upload (no upload can be in progress yet; those
        left by a crash or a kill would otherwise sit there for ``_TMP_MAX_AGE_S``)."""
        tmp_dir = self.root / "tmp"
        removed = 0
        if tmp_dir.is_dir():
            for entry in os.scandir(tmp_dir):
                if entry.name.endswith(".part") and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
        if removed:
            log.info("removed %d partial uploads left by an earlier run", removed)
        return removed

    async def maybe_sweep(self) -> None:
        """Sweep on a worker thread if the last sweep is older than the interval."""
        now = time.monotonic()
        if now - self._last_sweep < self.sweep_interval_s:
            return
        self._last_sweep = now
        try:
            deleted = await asyncio.to_thread(self.sweep)
        except OSError as exc:  # a sweep is housekeeping: never fail an upload for it
            log.warning("upload sweep failed: %r", exc)
            return
        for owner, size in deleted:
            self._add_disk(owner, -size)


def _storage_error(doing: str, exc: OSError) -> ApiError:
    """A storage fault as the client sees it: 503, what failed, no paths (those go to the log)."""
    log.error("could not %s: %s", doing, exc)
    if exc.errno in _FULL:
        message = f"could not {doing}: the upload store is full; try again later"
    else:
        message = f"could not {doing}: the upload store is unavailable (the server log says why)"
    return ApiError(ErrorCode.SERVICE_UNAVAILABLE, message, headers={"Retry-After": "60"})


def _exists(key: str) -> ApiError:
    return ApiError(
        ErrorCode.FILE_EXISTS,
        f"an upload named {echo(key)} already exists; request a new upload policy",
    )


def _short(ref: str, limit: int = 120) -> str:
    return ref if len(ref) <= limit else ref[: limit - 3] + "..."
