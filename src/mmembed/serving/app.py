"""The Serve application: deployments from the catalog, ``mmembed serve --ray``, ``serve run``.

Two layouts (``ray_mode``):

    split:      HTTP -> Serve proxy -> ingress replicas (api.app, RemoteEngine)
                  -> backend-<name> replicas (Engine: media, cache, batcher, model)
    colocated:  HTTP -> backend-<name> replicas, each the app and its Engine on its own
                  listener (SO_REUSEPORT on host:port); other backends' requests -> theirs
    both:       every replica -> stats board (one replica) -> /health, /metrics

Colocated takes two process hops and Serve's proxy off each request (the proxy alone costs
more CPU per request than mmembed's HTTP layer; see docs/benchmarks.md), at the price of
HTTP parsing in the backend replicas and no Serve autoscaling (Serve never sees the requests).
In both, a request holding media goes to the replica that owns it by content
(``serving.affinity``, ``serving.router``), so each item is cached once across replicas.

Each catalog backend in use becomes a deployment ``backend-<name>`` with its ``[ray]`` table:
a fixed replica count or autoscaling (min/max, target ongoing requests), CPUs and GPUs per
replica (its model threads follow the CPUs). ``max_ongoing_requests`` defaults to the server's
``queue_max_items``: Serve's default (5) would hold requests back in Serve's queue instead of
letting mmembed's batcher form full batches and answer 429 itself when its queue is full.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Any

from mmembed.config import Settings
from mmembed.models.catalog import BackendSpec, Catalog, load_catalog
from mmembed.serving.board import BOARD, StatsBoard
from mmembed.serving.deployments import BackendReplica, ColocatedReplica, IngressReplica, hosts

log = logging.getLogger("mmembed.serving")

APP_NAME = "mmembed"
MODES = ("split", "colocated")
INGRESS_MAX_ONGOING = 1024  # requests per ingress replica; the engine's queues bound the rest
BOARD_MAX_ONGOING = 1024
# No Serve access log line per call: the ingress logs each request with its id (and the
# board gets a report per replica every 0.5 s).
QUIET = {"enable_access_log": False}
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "mmembed.serving.proxy:middlewares"  # one x-request-id (serving.proxy)
# By import path: importing it here would import Ray before raylocal pins it to 127.0.0.1.
ROUTER = "mmembed.serving.router:ContentAffinityRouter"


def backend_options(spec: BackendSpec, settings: Settings) -> dict[str, Any]:
    """``serve.deployment`` options for one backend, from its catalog ``[ray]`` table."""
    o = spec.ray
    threads = o.model_threads()
    max_ongoing = o.max_ongoing_requests or settings.queue_max_items
    if max_ongoing < settings.batch_max_items:
        log.warning(
            "backend %s: max_ongoing_requests %d is below batch_max_items %d; its replicas "
            "can never form a full batch of single-item requests",
            spec.name,
            max_ongoing,
            settings.batch_max_items,
        )
    options: dict[str, Any] = {
        "name": f"backend-{spec.name}",
        "max_ongoing_requests": max_ongoing,
        "request_router_config": {"request_router_class": ROUTER},  # content affinity
        "logging_config": QUIET,
        "ray_actor_options": {
            "num_cpus": o.num_cpus,
            "num_gpus": o.num_gpus,
            # Idle OpenMP threads sleep (as `mmembed serve` sets), and no more of them than
            # the replica's CPU share.
            "runtime_env": {
                "env_vars": {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
            },
        },
    }
    if o.autoscaling:
        lo = o.min_replicas if o.min_replicas is not None else 1
        options["autoscaling_config"] = {
            "min_replicas": lo,
            "max_replicas": o.max_replicas if o.max_replicas is not None else max(lo, 1),
            "target_ongoing_requests": o.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = o.num_replicas
    return options


def check_colocated(catalog: Catalog) -> None:
    """Colocated replicas take requests that Serve never sees: it cannot autoscale them."""
    for name in hosts(catalog):
        if catalog.backends[name].ray.autoscaling:
            raise ValueError(
                f"backend {name}: ray_mode colocated cannot autoscale (its replicas take "
                "requests directly, which Serve does not see); set num_replicas, or use "
                "ray_mode split"
            )


def build_app(settings: Settings, catalog: Catalog | None = None) -> Any:
    """The Serve application (``serve.run`` it, or return it from a ``serve run`` builder)."""
    from ray import serve

    if settings.ray_mode not in MODES:  # (the CLI checks it; `serve run` arguments too)
        raise ValueError(f"ray_mode {settings.ray_mode!r} is not one of {', '.join(MODES)}")
    catalog = catalog or load_catalog(settings.catalog)
    used = hosts(catalog)
    board = serve.deployment(
        StatsBoard,
        name=BOARD,
        num_replicas=1,
        max_ongoing_requests=BOARD_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0},
        logging_config=QUIET,
    )
    if settings.ray_mode == "colocated":
        check_colocated(catalog)
        replicas = {
            name: serve.deployment(
                ColocatedReplica, **backend_options(catalog.backends[name], settings)
            ).bind(settings, catalog, name)
            for name in used
        }
        return board.bind(replicas)  # the root; the replicas find it by name
    bound_board = board.bind()
    backends = {
        name: serve.deployment(
            BackendReplica, **backend_options(catalog.backends[name], settings)
        ).bind(settings, catalog, name, bound_board)
        for name in used
    }
    ingress = serve.deployment(
        serve.ingress()(IngressReplica),
        name="ingress",
        num_replicas=settings.ray_ingress_replicas,
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0},  # light work; the backends hold the CPUs
        logging_config=QUIET,
    )
    return ingress.bind(settings, catalog, backends, bound_board)


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run mmembed.serving:app_builder catalog=my.toml api_keys=...``: any setting
    by name (as its env var takes it); the rest from ``MMEMBED_*``."""
    import argparse
    from dataclasses import fields

    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown settings {unknown} (see `mmembed serve --help`)")
    settings = Settings.from_args(argparse.Namespace(**args))
    return build_app(settings)


def run(settings: Settings, address: str) -> int:
    """``mmembed serve --ray [ADDRESS]``: deploy on a local single-node cluster (``local``,
    every connection on 127.0.0.1) or on the cluster at ADDRESS, with Serve's proxy (split) or
    the replicas themselves (colocated) on settings.host/port; block until SIGINT/SIGTERM,
    then take the application down."""
    from mmembed.raylocal import LOCAL, start_ray

    catalog = load_catalog(settings.catalog)
    colocated = settings.ray_mode == "colocated"
    if colocated:
        check_colocated(catalog)
    # Serve's proxy takes middlewares only from this variable, read where the proxy starts:
    # a cluster started here inherits it; one at ADDRESS needs it set when it is started.
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    ray = start_ray(address, command="mmembed serve --ray", namespace=APP_NAME, serve=True)
    from ray import serve

    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if colocated:  # the replicas listen themselves: no proxy
            serve.start(proxy_location="Disabled")
        else:
            serve.start(
                http_options={
                    "host": settings.host,
                    "port": settings.port,
                    "ssl_certfile": settings.ssl_certfile or None,
                    "ssl_keyfile": settings.ssl_keyfile or None,
                    "keep_alive_timeout_s": max(1, round(settings.keep_alive_timeout_s)),
                }
            )
        started = time.monotonic()
        prefix = None if colocated else "/"
        serve.run(build_app(settings, catalog), name=APP_NAME, route_prefix=prefix, blocking=False)
        scheme = "https" if settings.ssl_certfile else "http"
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        where = "a local Ray cluster on 127.0.0.1" if address == LOCAL else f"Ray at {address}"
        log.info(
            "ready in %.1f s on %s, %s: %s://%s:%d (models: %s)",
            time.monotonic() - started,
            where,
            settings.ray_mode,
            scheme,
            host,
            settings.port,
            ", ".join(catalog.models),
        )
        while not stop.wait(1.0):
            pass
        log.info("stopping: taking the application down")
        return 0
    except RuntimeError as exc:  # a deployment that cannot start: say why, in one line
        print(f"mmembed: could not deploy on Ray Serve: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            if address == LOCAL:
                serve.shutdown()
            else:  # someone else's cluster: remove only our application
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
