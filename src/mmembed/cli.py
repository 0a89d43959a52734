"""The ``mmembed`` command: ``serve`` the API, list ``models``, ``pull`` model weights."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys

from mmembed.accounts import cli as accounts_cli
from mmembed.config import Settings


def is_loopback_bind(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def serve(settings: Settings) -> int:
    # Idle OpenMP threads (the e5 text engine, torch) sleep instead of spinning, so they leave
    # the cores to the event loop and media decoding between passes. Must precede the first
    # load of libgomp; a value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn

    from mmembed.api.app import create_app
    from mmembed.logs import setup_logging

    setup_logging(settings.log_level)
    keyed = bool(settings.api_keys) or accounts_cli.has_managed_keys(settings)
    if not keyed and not is_loopback_bind(settings.host):
        print(
            f"mmembed: refusing to bind {settings.host!r} without API keys: anyone who can reach "
            "it could use the service. Set MMEMBED_API_KEYS (or --api-keys), or bind 127.0.0.1.",
            file=sys.stderr,
        )
        return 2
    if not keyed:
        print(
            "mmembed: no API keys configured; accepting any key on loopback only.", file=sys.stderr
        )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # the app logs each request with its request_id
        timeout_graceful_shutdown=10,
    )
    return 0


def models(settings: Settings) -> int:
    from mmembed.models.catalog import load_catalog

    catalog = load_catalog(settings.catalog)
    for spec in catalog.models.values():
        backend = catalog.backends[spec.backend]
        extra = {"family": backend.family}
        if "weights" in backend.options:
            extra["weights"] = backend.options["weights"]
        print(json.dumps(spec.describe() | extra, ensure_ascii=False))
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
                print(f"mmembed: {name}: family {spec.family!r} has no weights to download")
                return 0
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
        from mmembed.models.weights import pull as pull_weights

        path = pull_weights(str(weights), revision)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmembed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("serve", "Run the HTTP API."), ("models", "List served models.")):
        Settings.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    pull_help = "Download a model's weights into the local cache (needs the model hub)."
    pull_parser = sub.add_parser("pull", help=pull_help, description=pull_help)
    pull_parser.add_argument("name", help="API name or backend name of the catalog, or a hub id")
    Settings.add_arguments(pull_parser)
    accounts_cli.add_parsers(sub)  # keys, usage
    args = parser.parse_args(argv)
    settings = Settings.from_args(args)
    if args.command in accounts_cli.COMMANDS:
        return accounts_cli.run(args, settings)
    if args.command == "pull":
        return pull(settings, args.name)
    return {"serve": serve, "models": models}[args.command](settings)


if __name__ == "__main__":
    sys.exit(main())
