"""One Settings object. Each setting is declared once: default, env var, CLI flag and help text.

Precedence: CLI flag > environment (``MMEMBED_*``) > defaults. The model catalog (which backend
answers each API name, and its limits) is a separate TOML file named by ``catalog``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any


def _setting(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


class SettingsError(ValueError):
    """A setting's value is malformed; the message names the env var or flag."""


@dataclass(frozen=True)
class Settings:
    host: str = _setting("127.0.0.1", "Address to bind.")
    port: int = _setting(8000, "Port to bind.")
    catalog: str = _setting(
        "",
        "Model catalog TOML (API names -> backends and limits). "
        "Empty: the packaged offline profile.",
    )
    api_keys: tuple[str, ...] = _setting(
        (),
        "Comma-separated API keys accepted as 'Authorization: Bearer <key>'; 'KEY:m1|m2' "
        "limits a key to those model names (403 otherwise). With no keys, any key is "
        "accepted and only loopback addresses may be bound.",
    )
    allowed_hosts: tuple[str, ...] = _setting(
        (),
        "Host names (the Host header, any port) answered besides loopback ones (localhost, "
        "127.0.0.1, [::1]); '*' answers any. With no API keys only loopback names and these "
        "are answered (421 otherwise), so a web page cannot reach the server by DNS "
        "rebinding; with keys any Host is answered unless this is set.",
    )
    admin_keys: tuple[str, ...] = _setting(
        (), "Comma-separated admin keys: the only keys the /admin routes accept (keys, usage)."
    )
    database_url: str = _setting(
        "",
        "Accounts database (managed keys, limits, usage ledger): postgresql://user@host/db, "
        "or sqlite:///path. Empty: SQLite at <cache_dir>/accounts.db. 'none': no database "
        "(static api_keys only, no limits, no ledger).",
    )
    database_timeout_s: float = _setting(
        5.0, "Accounts database: longest wait for a connection or a lock before a 503."
    )
    database_sync: str = _setting(
        "full",
        "SQLite only: 'full' puts each ledger commit on disk before answering (survives a power "
        "cut); 'normal' survives a killed process but not a power cut, and is faster on "
        "slow disks.",
        choices=("full", "normal"),
    )
    accounts_poll_s: float = _setting(
        0.25, "How often each process checks the database for changed keys (revocations)."
    )
    log_level: str = _setting("info", "Log level.", choices=("debug", "info", "warning", "error"))
    log_format: str = _setting(
        "text",
        "Log format: text, or json (one object per line: time, level, logger, request_id, "
        "message, and model, items, latency_ms, status for requests).",
        choices=("text", "json"),
    )
    max_body_bytes: int = _setting(
        64 * 1024 * 1024, "Largest accepted request body in bytes (Base64 media included)."
    )
    max_items_per_request: int = _setting(
        256,
        "Safety cap on content items per request, for models whose API sets no count limit.",
    )
    openai_max_inputs: int = _setting(
        2048,
        "Cap on inputs per request on the OpenAI-compatible routes (OpenAI's own: 2,048; "
        "LangChain sends up to 1,000), for models whose API sets no count limit; large "
        "requests are split into several forward passes.",
    )
    request_timeout_s: float = _setting(120.0, "Whole-request deadline in seconds (408 after).")
    header_timeout_s: float = _setting(
        10.0,
        "Seconds a client has to send a request's line and headers, from connecting or from "
        "the previous response (408 and closed after).",
    )
    body_timeout_s: float = _setting(
        30.0, "Seconds a request body may pause between two reads (408 and closed after)."
    )
    keep_alive_timeout_s: float = _setting(
        5.0, "Seconds an idle keep-alive connection is kept open after a response."
    )
    max_header_bytes: int = _setting(
        64 * 1024, "Largest request line plus headers in bytes (431 and closed beyond)."
    )
    max_connections: int = _setting(
        4096,
        "Open connections at most; more are answered 503 and closed at once (also kept below "
        "the file-descriptor limit). 0: only that limit.",
    )
    max_connections_per_client: int = _setting(
        256,
        "Open connections from one client address at most; more get 429 and are closed. "
        "0: no limit (behind a reverse proxy every client has the proxy's address).",
    )
    shutdown_grace_s: float = _setting(
        10.0,
        "On SIGTERM/SIGINT: seconds in-flight requests get to finish; those still running "
        "then get 503 ServiceUnavailable.",
    )
    fetch_connect_timeout_s: float = _setting(5.0, "Media fetch: TCP/TLS connect timeout.")
    fetch_read_timeout_s: float = _setting(10.0, "Media fetch: timeout between received bytes.")
    fetch_total_timeout_s: float = _setting(30.0, "Media fetch: deadline for one whole download.")
    fetch_max_redirects: int = _setting(3, "Media fetch: redirects followed at most.")
    fetch_per_host_concurrency: int = _setting(8, "Media fetch: parallel downloads per host.")
    fetch_allow_hosts: tuple[str, ...] = _setting(
        (),
        "Hosts, IPs or CIDRs that media URLs may reach even though they are loopback, private "
        "or otherwise internal (comma-separated); 'HOST:PORT' ('[IPv6]:PORT', 'CIDR:PORT') "
        "allows that port only, a bare entry every port. By default internal addresses are "
        "refused.",
    )
    max_image_pixels: int = _setting(
        40_000_000, "Images larger than this many pixels are refused (decompression bombs)."
    )
    decode_workers: int = _setting(2, "Threads that decode images and videos.")
    batch_max_items: int = _setting(
        64, "Dynamic batching: most inputs (across requests) in one forward pass."
    )
    batch_max_tokens: int = _setting(
        16384, "Dynamic batching: most tokens (text tokens + image tokens) in one forward pass."
    )
    batch_max_wait_ms: float = _setting(
        0.0,
        "Dynamic batching: extra wait for more requests before a pass. 0: start as soon as "
        "requests stop arriving; those arriving during a pass form the next batch.",
    )
    queue_max_items: int = _setting(
        256, "Backpressure: inputs waiting per backend before new requests get 429 Throttling."
    )
    batch_max_images: int = _setting(
        32, "Dynamic batching: most images and video frames in one forward pass (bounds memory)."
    )
    admit_max_units: int = _setting(
        1024,
        "Admission: most work admitted per backend at once, in units (a text per 4,096 "
        "characters, an image, a video's frame cap); beyond it requests get 429 before any "
        "media is fetched. A request to an idle backend is always admitted.",
    )
    max_request_pixels: int = _setting(
        200_000_000, "Most decoded pixels (images and video frames) one request may hold (413)."
    )
    model_isolation: str = _setting(
        "process",
        "Where native model code and video decoding run: 'process' (supervised worker "
        "processes, restarted after a crash; only the request that caused it fails) or "
        "'thread' (in the server process: for development and tests).",
    )
    cache_dir: str = _setting(
        "", "Directory for derived data (fitted bases, uploads). Empty: ~/.cache/mmembed."
    )
    public_url: str = _setting(
        "",
        "Base URL clients reach this server at (e.g. https://embed.example.com), used as the "
        "upload host in upload policies. Empty: taken from each request's Host header.",
    )
    upload_dir: str = _setting(
        "", "Directory for files uploaded by the SDK's local-file flow. Empty: <cache_dir>/uploads."
    )
    upload_ttl_s: float = _setting(
        48 * 3600.0, "Uploaded files expire this many seconds after upload (then deleted)."
    )
    upload_max_bytes_per_key: int = _setting(
        1 << 30, "Most bytes of unexpired uploads one API key may hold (413 beyond)."
    )
    upload_max_file_bytes: int = _setting(
        0,
        "Largest uploaded file in bytes. 0: the model's largest image or video limit "
        "(the catalog's largest when the policy names no model).",
    )
    upload_sweep_interval_s: float = _setting(
        600.0, "Expired uploads are also swept from disk at most this often (seconds)."
    )
    batch_dir: str = _setting(
        "",
        "Directory for batch jobs over HTTP: input and result files, and the part files of jobs "
        "in progress. Empty: <cache_dir>/batches.",
    )
    batch_result_ttl_s: float = _setting(
        24 * 3600.0,
        "Batch output and error files (and DashScope task results) expire this many seconds "
        "after their job ends.",
    )
    batch_file_ttl_s: float = _setting(
        7 * 24 * 3600.0,
        "Uploaded batch input files expire this many seconds after upload (0: kept until "
        "deleted); a file an unfinished job reads is kept until the job ends.",
    )
    batch_max_file_bytes: int = _setting(
        200 * 1024 * 1024, "Largest batch input file in bytes (413 beyond)."
    )
    batch_max_lines: int = _setting(50_000, "Most lines (requests) in one batch input file.")
    batch_max_bytes_per_key: int = _setting(
        10 * 1024**3, "Most bytes of unexpired batch files one API key may hold (413 beyond)."
    )
    batch_max_active_jobs_per_key: int = _setting(
        16, "Most unfinished (queued or running) batch jobs per API key (429 beyond; 0: any)."
    )
    batch_jobs_per_process: int = _setting(
        1,
        "Batch jobs one server process runs at once (the rest wait, in creation order). 0: this "
        "process runs none (other servers on the same accounts database do).",
    )
    batch_concurrency: int = _setting(
        0,
        "Inputs of a batch job in flight at once. 0: twice batch_max_items, as mmembed embed.",
    )
    batch_pass_max_items: int = _setting(
        16,
        "Most batch-job inputs in one forward pass (batch work runs only when no online request "
        "waits, so this bounds how long an arriving request can wait or share the model). "
        "Small passes keep online latency low on CPU; on a GPU raise it toward batch_max_items. "
        "0: batch_max_items.",
    )
    batch_part_lines: int = _setting(
        1000,
        "Batch job lines per part file: finished lines are kept every this many lines, or every "
        "second, whichever comes first (a killed server resumes from there).",
    )
    batch_lease_s: float = _setting(
        60.0,
        "Seconds a batch job's claim by its runner lasts (renewed every third of it): a job "
        "whose runner on another machine stopped is taken over after this; one whose runner "
        "on this machine is gone (killed) at once.",
    )
    batch_sweep_interval_s: float = _setting(
        600.0, "Expired batch files and overdue jobs are swept at most this often (seconds)."
    )
    embed_cache_mb: float = _setting(
        64.0,
        "Embedding cache size in MB (LRU): the same media under the same model and parameters "
        "is decoded and embedded once. 0 disables it.",
    )
    embed_cache_text: bool = _setting(
        False, "Cache text-only items too (media items and fused items are always cached)."
    )
    ssl_certfile: str = _setting(
        "", "TLS certificate (PEM) to serve HTTPS; needs ssl_keyfile. Empty: plain HTTP."
    )
    ssl_keyfile: str = _setting("", "TLS private key (PEM) for ssl_certfile.")
    metrics: bool = _setting(
        True,
        "Serve Prometheus metrics at GET /metrics and count requests (no key needed unless "
        "metrics_keys is set).",
    )
    metrics_keys: tuple[str, ...] = _setting(
        (),
        "Comma-separated keys that GET /metrics requires ('Authorization: Bearer <key>', 401 "
        "otherwise). Empty: /metrics needs no key.",
    )
    metrics_interval_ms: float = _setting(
        1000.0,
        "GET /metrics renders the metrics at most this often and answers scrapes in between "
        "with the last rendering (a scrape costs milliseconds of CPU). 0: render every scrape.",
    )
    ray_ingress_replicas: int = _setting(
        1,
        "serve --ray: replicas of the HTTP layer (auth, parsing, uploads, metering); backend "
        "replicas are set per backend in the catalog's [backends.NAME.ray] table.",
    )
    ray_mode: str = _setting(
        "split",
        "serve --ray: 'split' runs the HTTP layer in ingress replicas behind Serve's proxy and "
        "each backend in its own replicas; 'colocated' runs the HTTP layer inside each backend "
        "replica, which listens on host:port itself (no proxy, one process per request; no "
        "autoscaling).",
        choices=("split", "colocated"),
    )

    def __post_init__(self) -> None:
        for entry in self.api_keys:
            if not entry.partition(":")[0].strip():
                raise ValueError(
                    f"api_keys has an entry with an empty key ({entry[:40]!r}); an empty key "
                    "would accept any client. Remove it or give it a key."
                )

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def env_name(cls, name: str) -> str:
        return "MMEMBED_" + name.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(cls.env_name(f.name))
            if raw is not None:
                try:
                    values[f.name] = _checked(f, _parse(f.type, raw))
                except ValueError as exc:
                    raise SettingsError(f"{cls.env_name(f.name)}={raw!r}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, only: Any = None) -> None:
        """Add one ``--flag`` per setting (or per name in ``only``), typed: a malformed value
        is an argparse error naming the flag; booleans are switches (``--x`` / ``--no-x``)."""
        for f in fields(cls):
            if only is not None and f.name not in only:
                continue
            default = f.default if f.default is not MISSING else None
            shown = ",".join(default) if isinstance(default, tuple) else default
            help = f"{f.metadata['help']} [env {cls.env_name(f.name)}; default {shown!r}]"
            flag = "--" + f.name.replace("_", "-")
            if str(f.type) == "bool":
                parser.add_argument(
                    flag,
                    dest=f.name,
                    default=None,
                    action=argparse.BooleanOptionalAction,
                    help=help,
                )
                continue
            parser.add_argument(
                flag,
                dest=f.name,
                default=None,
                type=_arg_type(f),
                choices=f.metadata.get("choices"),
                metavar=f.name.split("_")[-1].upper(),
                help=help,
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
        raw = {f.name: getattr(args, f.name, None) for f in fields(cls)}
        return cls.from_env(
            environ,
            **{
                k: _parse(_type_of(k), v) if isinstance(v, str) else v
                for k, v in raw.items()
                if v is not None
            },
        )

    @property
    def cache_path(self) -> str:
        return self.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "mmembed")

    @property
    def batch_path(self) -> str:
        return self.batch_dir or os.path.join(self.cache_path, "batches")


def _type_of(name: str) -> str:
    return str(next(f.type for f in fields(Settings) if f.name == name))


def _parse(type_name: Any, raw: str) -> Any:
    t = str(type_name)
    if t.startswith("tuple"):
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    if t == "int":
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not an integer") from None
    if t == "float":
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a number") from None
    if t == "bool":
        word = raw.strip().lower()
        if word in {"1", "true", "yes", "on"}:
            return True
        if word in {"0", "false", "no", "off", ""}:
            return False
        raise ValueError(f"{raw!r} is not a boolean (use true or false)")
    return raw


def _checked(f: Any, value: Any) -> Any:
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
    return value


def _arg_type(f: Any) -> Any:
    """An argparse ``type`` that parses like the env var, with argparse's error on failure."""

    def parse(raw: str) -> Any:
        try:
            return _parse(f.type, raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = str(f.type)
    return parse
