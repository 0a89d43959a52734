"""``mmembed keys create|list|revoke|update``, ``mmembed usage`` and ``mmembed jobs``: managed
keys, usage reports and batch jobs, straight on the accounts database (``database_url``), so
they work whether or not a server is running. Errors are one line on stderr and exit status 1
(2 for bad arguments)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from mmembed.accounts import jobs_cli, keys, reports
from mmembed.accounts.keys import AccountsError, Limits
from mmembed.accounts.store import Store, database_url, explain, is_transient
from mmembed.config import Settings


def _limit_arg(what: str) -> Callable[[str], int | None]:
    def parse(value: str) -> int | None:
        try:
            return keys.parse_limit(value, what)
        except AccountsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = what  # argparse names the type in its error message
    return parse


def _date_arg(end: bool) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            return reports.parse_date(value, end=end)
        except AccountsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = "date"
    return parse


def _limit_options(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument("--models", default=default, help="comma-separated model names ('all': every)")
    p.add_argument("--rpm", type=_limit_arg("--rpm"), default=default, help="requests per minute")
    p.add_argument("--tpm", type=_limit_arg("--tpm"), default=default, help="tokens per minute")
    p.add_argument(
        "--monthly-tokens",
        type=_limit_arg("--monthly-tokens"),
        default=default,
        help="token quota per calendar month (UTC); 'none' removes a limit",
    )


# The settings these commands read; their --help lists only these.
SETTINGS = (
    "database_url",
    "database_timeout_s",
    "database_sync",
    "cache_dir",
    "catalog",
    "admin_keys",
    "log_level",
    "log_format",
)


def add_parsers(sub: Any) -> None:
    """Add ``keys`` and ``usage`` to the ``mmembed`` command's subparsers."""
    keys_help = "Manage API keys (create, list, revoke, update) in the accounts database."
    kp = sub.add_parser("keys", help=keys_help, description=keys_help)
    ksub = kp.add_subparsers(
        dest="keys_command", required=True, metavar="create|list|revoke|update|allow-anonymous"
    )

    create = ksub.add_parser("create", help="Create a key; prints its secret once.")
    create.add_argument("--name", required=True)
    _limit_options(create, None)
    create.add_argument("--json", action="store_true", help="print a JSON object (name, key)")

    lst = ksub.add_parser("list", help="List keys (never their secrets).")
    lst.add_argument("--json", action="store_true")

    revoke = ksub.add_parser("revoke", help="Revoke a key (every server refuses it within 1 s).")
    revoke.add_argument("name")

    update = ksub.add_parser("update", help="Change a key's models or limits.")
    update.add_argument("name")
    _limit_options(update, keys._UNSET)
    update.add_argument("--json", action="store_true")

    anonymous_help = (
        "After every managed key was revoked: let servers without api_keys accept requests "
        "without a key again, on loopback only (revoking the last key alone never does). "
        "Creating a key requires keys again."
    )
    anonymous = ksub.add_parser("allow-anonymous", help=anonymous_help, description=anonymous_help)

    usage_help = "Usage report from the ledger: requests, tokens by kind and cost per group."
    up = sub.add_parser("usage", help=usage_help, description=usage_help)
    up.add_argument("--key", help="only this key's requests")
    up.add_argument("--route", help="only this route's requests (dashscope, openai, batch, ...)")
    up.add_argument("--since", type=_date_arg(False), help="YYYY-MM-DD or ISO time (inclusive)")
    up.add_argument("--until", type=_date_arg(True), help="YYYY-MM-DD (inclusive) or ISO time")
    up.add_argument("--by", choices=reports.GROUPS, default="key")
    fmt = up.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")

    for p in (create, lst, revoke, update, anonymous, up):
        Settings.add_arguments(p, SETTINGS)
    jobs_cli.add_parsers(sub, SETTINGS)
    for p in (kp, create, lst, revoke, update, anonymous, up):
        _one_line_errors(p)


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Bad values give one line (not argparse's usage block) and exit status 2."""

    def error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    parser.error = error  # type: ignore[method-assign]


COMMANDS = ("keys", "usage", "jobs")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``mmembed keys ...`` or ``mmembed usage ...``."""
    if settings.database_url.strip().lower() in {"none", "off", "disabled"}:
        return _fail("accounts are disabled (database_url=none)")
    try:
        store = Store(
            database_url(settings.database_url, settings.cache_path), settings.database_timeout_s
        )
    except ValueError as exc:
        return _fail(str(exc))
    try:
        store.migrate()
        if args.command == "usage":
            return _usage(store, args)
        if args.command == "jobs":
            return jobs_cli.run(args, store)
        return _keys(store, args, settings)
    except AccountsError as exc:
        return _fail(str(exc))
    except Exception as exc:
        if is_transient(exc):
            return _fail(explain(exc))
        raise
    finally:
        store.close()


def _fail(message: str) -> int:
    print(f"mmembed: {message}", file=sys.stderr)
    return 1


def _models(value: Any, settings: Settings) -> Any:
    if value is None or value is keys._UNSET:
        return value
    from mmembed.models.catalog import load_catalog

    return keys.parse_models(value, set(load_catalog(settings.catalog).models))


def _keys(store: Store, args: argparse.Namespace, settings: Settings) -> int:
    cmd = args.keys_command
    if cmd == "create":
        limits = Limits(args.rpm, args.tpm, args.monthly_tokens)
        record, secret = keys.create(store, args.name, _models(args.models, settings), limits)
        if args.json:
            print(json.dumps({**record.public(), "key": secret}))
        else:
            print(f"created key {record.name!r}; its secret (shown only now):", file=sys.stderr)
            print(secret)
        return 0
    if cmd == "list":
        records = keys.list_keys(store)
        if args.json:
            print(json.dumps([r.public() for r in records]))
        else:
            _print_keys([r.public() for r in records])
        return 0
    if cmd == "revoke":
        record = keys.revoke(store, args.name)
        print(f"revoked key {record.name!r}")
        if not any(r.active for r in keys.list_keys(store)):
            print(
                "mmembed: no managed key is active now; servers still require a key "
                "(mmembed keys create --name NAME makes one; mmembed keys allow-anonymous "
                "lets loopback servers without api_keys accept requests without one)",
                file=sys.stderr,
            )
        return 0
    if cmd == "allow-anonymous":
        revoked = keys.allow_anonymous(store)
        print(
            f"servers without api_keys now accept requests without a key, on loopback only "
            f"({revoked} revoked key(s) kept for the ledger); creating a key requires keys again"
        )
        return 0
    record = keys.update_key(
        store,
        args.name,
        models=_models(args.models, settings),
        rpm=args.rpm,
        tpm=args.tpm,
        monthly_tokens=args.monthly_tokens,
    )
    if args.json:
        print(json.dumps(record.public()))
    else:
        _print_keys([record.public()])
    return 0


def _print_keys(rows: list[dict[str, Any]]) -> None:
    header = ["name", "hint", "status", "models", "rpm", "tpm", "monthly_tokens", "created_at"]

    def cell(row: dict[str, Any], col: str) -> str:
        v = row[col]
        if col == "models":
            return ",".join(v) if v else "all"
        return "-" if v is None else str(v)

    cells = [[cell(r, c) for c in header] for r in rows]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def _usage(store: Store, args: argparse.Namespace) -> int:
    rows = reports.usage(
        store, key=args.key, route=args.route, since=args.since, until=args.until, by=args.by
    )
    fmt = "json" if args.json else "csv" if args.csv else "table"
    print(reports.render(rows, args.by, fmt))
    return 0


def has_managed_keys(settings: Settings) -> bool:
    """Whether the accounts database makes keys required (``keys.auth_required``: an active
    managed key, or revoked ones and no ``keys allow-anonymous`` since), so a server needs no
    api_keys to require authentication. False when accounts are disabled or the database is
    unreachable."""
    if settings.database_url.strip().lower() in {"none", "off", "disabled"}:
        return False
    try:
        store = Store(
            database_url(settings.database_url, settings.cache_path), settings.database_timeout_s
        )
        try:
            store.migrate()
            with store.read() as conn:
                return keys.auth_required(keys.load_all(conn), keys.anonymous_allowed(conn))
        finally:
            store.close()
    except Exception:
        return False
