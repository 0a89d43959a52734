"""The ``mmembed`` command: ``serve`` the API, list ``models``, ``pull`` model weights."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing

import mmembed
from mmembed.accounts import cli as accounts_cli
from mmembed.config import Settings
from mmembed.netaddr import is_loopback_bind

# The settings each subcommand reads (serve: all of them); its --help lists only these.
COMMAND_SETTINGS = {
    "models": ("catalog", "log_level", "log_format"),
    "pull": ("catalog", "cache_dir", "log_level", "log_format"),
    "verify": ("catalog", "cache_dir", "log_level", "log_format"),
}


def serve(settings: Settings, ray: str | None = None) -> int:
    # Idle OpenMP threads (the e5 text engine, torch) sleep instead of spinning, so they leave
    # the cores to the event loop and media decoding between passes. Must precede the first
    # load of libgomp; a value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from mmembed.api import server
    from mmembed.api.app import create_app
    from mmembed.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("mmembed")
    keyed = bool(settings.api_keys) or accounts_cli.has_managed_keys(settings)
    if not keyed and not is_loopback_bind(settings.host):
        print(
            f"mmembed: refusing to bind {settings.host!r} without API keys: anyone who can reach "
            "it could use the service. Set MMEMBED_API_KEYS (or --api-keys), or bind 127.0.0.1.",
            file=sys.stderr,
        )
        return 2
    if bool(settings.ssl_certfile) != bool(settings.ssl_keyfile):
        print("mmembed: TLS needs both --ssl-certfile and --ssl-keyfile", file=sys.stderr)
        return 2
    for path in (settings.ssl_certfile, settings.ssl_keyfile):
        if path and not os.path.isfile(path):
            print(f"mmembed: TLS file {path!r} does not exist", file=sys.stderr)
            return 2
    try:  # first of all: a port in use is one line and exit 1, before any start-up work
        sock = server.bind(settings)
    except OSError as exc:
        print(server.bind_error(settings, exc), file=sys.stderr)
        return 1
    if not keyed:
        log.warning("no API keys configured; accepting any key on loopback only")
    if ray is not None:  # the same app on Ray Serve: a local cluster or the one at ADDRESS
        from mmembed.serving.app import run as run_on_ray

        sock.close()  # (Serve's proxy binds it, or the colocated replicas do)
        return run_on_ray(settings, ray)
    scheme = "https" if settings.ssl_certfile else "http"
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    try:
        app = create_app(
            settings, load_in_background=True, announce=f"{scheme}://{host}:{settings.port}"
        )
    except ValueError as exc:  # a malformed catalog or allowlist entry: one line, no traceback
        sock.close()
        print(f"mmembed: {exc}", file=sys.stderr)
        return 2
    return server.run(app, settings, sock)  # uvicorn behind a guard against slow clients


def models(settings: Settings, as_json: bool = False) -> int:
    """The served API names: a table, or one JSON object per line with ``--json``."""
    from mmembed.models.catalog import load_catalog

    catalog = load_catalog(settings.catalog)
    rows = []
    for spec in catalog.models.values():
        backend = catalog.backends[spec.backend]
        extra = {"family": backend.family}
        if "weights" in backend.options:
            extra["weights"] = backend.options["weights"]
        if as_json:
            print(json.dumps(spec.describe() | extra, ensure_ascii=False))
            continue
        forms = ["fused only" if spec.fuse_contents else "fused" if spec.fused else ""]
        forms.append(f"multi_images<={spec.multi_images}" if spec.multi_images else "")
        rows.append(
            (
                spec.name,
                "(rerank)"
                if spec.task == "rerank"
                else ", ".join(map(str, spec.dimensions))
                + ("" if spec.dimension_param else " (fixed)"),
                f"{spec.text_max_tokens:,}",
                " ".join(f for f in forms if f) or "-",
                f"{spec.backend} ({backend.family})",
                str(backend.options.get("weights", "packaged")),
            )
        )
    if rows:
        head = ("MODEL", "DIMENSIONS (default first)", "TEXT TOKENS", "FORMS", "BACKEND", "WEIGHTS")
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        for row in (head, *rows):
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        print(f"\ncatalog: {catalog.source}")
    return 0


def pull(settings: Settings, name: str) -> int:
    """Download the weights of NAME (an API name or backend name of the catalog, or a model-hub
    id) into the local cache. Errors are one line on stderr and exit status 1."""
    from mmembed.models.catalog import load_catalog

    try:
        catalog = load_catalog(settings.catalog)
        backend_name = catalog.models[name].backend if name in catalog.models else name
        if backend_name in catalog.backends:
            spec = catalog.backends[backend_name]
            weights = spec.options.get("weights")
            if not weights:
                print(
                    f"mmembed: {name} is served by backend {backend_name!r} (family "
                    f"{spec.family!r}) of {catalog.source}, whose weights ship with the package: "
                    "nothing to download. To pull open weights, name that catalog: "
                    f"mmembed pull {name} --catalog open-weights",
                    file=sys.stderr,
                )
                return 1
            revision = spec.options.get("revision")
        elif "/" in name:
            weights, revision = name, None
        else:
            known = ", ".join([*catalog.models, *catalog.backends])
            print(
                f"mmembed: {name!r} is neither a model nor a backend of {catalog.source} "
                f"(known: {known}) nor a model-hub id (owner/name)",
                file=sys.stderr,
            )
            return 1
        from mmembed.models.weights import OPEN_WEIGHTS_HINT
        from mmembed.models.weights import pull as pull_weights

        try:
            path = pull_weights(str(weights), revision)
        except ImportError as exc:  # huggingface_hub is in the open-weights extra
            print(f"mmembed: cannot download {name}: {exc}; {OPEN_WEIGHTS_HINT}", file=sys.stderr)
            return 1
    except Exception as exc:  # offline, unknown id, no permission, missing extra: say it plainly
        reason = (str(exc).strip().splitlines() or [""])[0]
        print(
            f"mmembed: could not get the weights for {name}: {type(exc).__name__}: {reason}\n"
            "mmembed: is the model hub reachable from here (HF_ENDPOINT picks a mirror)? "
            "Otherwise copy the weights folder to this machine and set 'weights' to its path.",
            file=sys.stderr,
        )
        return 1
    print(f"mmembed: {name}: weights ready in {path}")
    return 0


def verify(settings: Settings, name: str) -> int:
    """Served vectors of NAME's backend against its reference recipe (models/verify.py)."""
    from mmembed.models.catalog import load_catalog
    from mmembed.models.verify import run

    try:
        return run(load_catalog(settings.catalog), name, settings)
    except Exception as exc:  # missing weights or extra, unknown name: one line, exit 2
        reason = (str(exc).strip().splitlines() or [""])[0]
        print(f"mmembed: cannot verify {name}: {type(exc).__name__}: {reason}", file=sys.stderr)
        return 2


class _Parser(argparse.ArgumentParser):
    """Errors as one line and a pointer to --help, instead of a screenful of usage."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="mmembed", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mmembed {mmembed.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_help = "Run the HTTP API (DashScope and OpenAI-compatible routes, playground at /)."
    serve_parser = sub.add_parser("serve", help=serve_help, description=serve_help)
    serve_parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="Serve on Ray Serve: on a local single-node cluster on 127.0.0.1, or on the "
        "cluster at ADDRESS (e.g. auto or HOST:6379); replicas per backend from the "
        "catalog's [backends.NAME.ray] tables. Needs the [ray] extra.",
    )
    Settings.add_arguments(serve_parser)
    models_help = "List the served API names, their dimensions and backends."
    models_parser = sub.add_parser("models", help=models_help, description=models_help)
    models_parser.add_argument("--json", action="store_true", help="one JSON object per line")
    Settings.add_arguments(models_parser, COMMAND_SETTINGS["models"])
    pull_help = "Download a model's weights into the local cache (needs the model hub)."
    pull_parser = sub.add_parser("pull", help=pull_help, description=pull_help)
    pull_parser.add_argument("name", help="API name or backend name of the catalog, or a hub id")
    Settings.add_arguments(pull_parser, COMMAND_SETTINGS["pull"])
    verify_help = "Compare a model's served vectors with its reference recipe (needs its weights)."
    verify_parser = sub.add_parser("verify", help=verify_help, description=verify_help)
    verify_parser.add_argument("name", help="API name or backend name of the catalog")
    Settings.add_arguments(verify_parser, COMMAND_SETTINGS["verify"])
    from mmembed import batch

    batch.add_arguments(sub.add_parser("embed", help=batch.HELP, description=batch.HELP))
    accounts_cli.add_parsers(sub)  # keys, usage
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_args(args)
    except ValueError as exc:  # a malformed number, an empty API key... (SettingsError)
        print(f"mmembed: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command in accounts_cli.COMMANDS:
            return accounts_cli.run(args, settings)
        if args.command == "embed":
            return batch.run(args, settings)
        if args.command == "pull":
            return pull(settings, args.name)
        if args.command == "verify":
            return verify(settings, args.name)
        if args.command == "models":
            return models(settings, as_json=args.json)
        return serve(settings, getattr(args, "ray", None))
    except (OSError, ValueError) as exc:  # a catalog file that is missing or malformed
        print(f"mmembed: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
