"""The ``mmembed`` command: ``serve`` the API, list ``models``."""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys

from mmembed.config import Settings


def is_loopback_bind(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def serve(settings: Settings) -> int:
    import uvicorn

    from mmembed.api.app import create_app
    from mmembed.logs import setup_logging

    setup_logging(settings.log_level)
    if not settings.api_keys and not is_loopback_bind(settings.host):
        print(
            f"mmembed: refusing to bind {settings.host!r} without API keys: anyone who can reach "
            "it could use the service. Set MMEMBED_API_KEYS (or --api-keys), or bind 127.0.0.1.",
            file=sys.stderr,
        )
        return 2
    if not settings.api_keys:
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

    for spec in load_catalog(settings.catalog).models.values():
        print(json.dumps(spec.describe(), ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmembed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("serve", "Run the HTTP API."), ("models", "List served models.")):
        Settings.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    settings = Settings.from_args(args)
    return {"serve": serve, "models": models}[args.command](settings)


if __name__ == "__main__":
    sys.exit(main())
