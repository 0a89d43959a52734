"""Run a torch module under ONNX Runtime: export once (cached on disk), then serve the session.

On this project's CPUs ONNX Runtime runs the default model's classifier ~5x faster than eager
torch, and MiniLM ~1.5x on single sentences, about even on batches of 32
(benchmarks/bench_cpu_paths.py, docs/benchmarks.md). The default exporter is
``torch.export``; the TorchScript tracer is faster to run and to export but records one path
through data-dependent branches (it mis-exports transformers' SDPA attention masks, for one), so
a caller uses it only where it is exact or where ``check`` compares the export with torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class ExportMismatch(Exception):
    """A fresh export failed its caller's check against torch."""


def export_cached(
    cache_dir: str,
    key: Sequence[str],
    build: Callable[[], tuple[Any, tuple, Any]],
    input_names: list[str],
    output_names: list[str],
    *,
    tracer: bool = False,
    check: Callable[[bytes], bool] | None = None,
) -> str | bytes:
    """The ONNX model for ``key``: a cached file path, or the bytes when there is no cache dir.

    ``build`` returns (module, example args, dynamic shapes) and is called only on a miss, so a
    warm start never imports torch. The dynamic shapes are ``torch.onnx.export``'s
    ``dynamic_shapes``; with ``tracer`` (the TorchScript tracer rather than ``torch.export``)
    they map each input and output name to ``{axis: name}``, and None makes the first axis of
    each the dynamic one. ``check`` sees a fresh export before it is stored; when it says no,
    nothing is stored and ``ExportMismatch`` is raised.

    A traced export that fails (the tracer raises, or ``check`` says no) is remembered in the
    cache for this torch version, so later starts raise ``ExportMismatch`` at once instead of
    tracing and checking again.
    """
    parts = [*key, "tracer"] if tracer else list(key)
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir, f"model-{digest}.onnx") if cache_dir else ""
    if path and os.path.exists(path):
        return path
    refused = path[: -len(".onnx")] + ".refused" if path and tracer else ""
    stamp = f"torch {importlib.metadata.version('torch')}\n" if refused else ""
    if refused and os.path.exists(refused):
        with open(refused, errors="replace") as f:  # a damaged marker: traced again
            version, _, reason = f.read().partition("\n")
        if version + "\n" == stamp:
            raise ExportMismatch(f"{reason} (remembered from an earlier start)")
    try:
        return _export(path, key[0], cache_dir, build, input_names, output_names, tracer, check)
    except (OSError, MemoryError):
        raise  # the machine's trouble, not the model's: try again next start
    except Exception as exc:
        if refused:
            with contextlib.suppress(OSError):
                atomic_write(refused, (stamp + str(exc)).encode())
        raise


def _export(
    path: str,
    name: str,
    cache_dir: str,
    build: Callable[[], tuple[Any, tuple, Any]],
    input_names: list[str],
    output_names: list[str],
    tracer: bool,
    check: Callable[[bytes], bool] | None,
) -> str | bytes:
    import torch

    logging.getLogger("mmembed.models").info(
        "exporting %s to ONNX (first start only; cached in %s)", name, cache_dir or "memory"
    )
    started = time.monotonic()
    module, args, dynamic_shapes = build()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    if tracer:
        buf = io.BytesIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                buf,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_shapes
                or {name: {0: "n"} for name in (*input_names, *output_names)},
                opset_version=18,
                dynamo=False,
            )
        return _store(path, buf.getvalue(), name, started, check)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # exporter progress notes and deprecations are noise
        program = torch.onnx.export(
            module,
            args,
            None,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=18,
            dynamo=True,
        )
    return _store(path, program.model_proto.SerializeToString(), name, started, check)


def _store(
    path: str, data: bytes, name: str, started: float, check: Callable[[bytes], bool] | None
) -> str | bytes:
    logging.getLogger("mmembed.models").info(
        "exported %s to ONNX in %.1f s", name, time.monotonic() - started
    )
    if check is not None and not check(data):
        raise ExportMismatch(f"the ONNX export of {name} differs from torch")
    if not path:
        return data
    atomic_write(path, data)
    return path


def session(model: str | bytes, threads: int = 0) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """A function running the model's first output, with CPU settings fit for a shared server."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: one per core
    options.inter_op_num_threads = 1
    # Idle ORT threads spin only briefly (10 µs), then sleep: long enough to catch the next
    # operator of the same pass without a futex wake-up (one text: +18 % at c=1), too short to
    # take the cores that parse and decode (docs/benchmarks.md, "ONNX Runtime's spin"). Before
    # 1.26 the duration is not read and spinning would last ORT's long default: no spinning.
    short_spin = tuple(int(p) for p in ort.__version__.split(".")[:2]) >= (1, 26)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if short_spin else "0")
    options.add_session_config_entry("session.intra_op.spin_duration_us", "10")
    sess = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        return sess.run(None, feed)[0]

    return run


def atomic_write(path: str, data: bytes) -> None:
    """Write via a temporary name, so concurrent starts never read half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
