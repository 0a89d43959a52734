"""Supervised worker processes: native code that can crash (model runtimes, FFmpeg) runs here.

A :class:`Worker` hosts one object in a child process and runs its methods for the parent.
Calls are multiplexed over one pipe and run in the child on named *lanes* (thread pools): a
backend has a one-thread ``forward`` lane (passes are serialised; the runtimes use every core)
and token-counting lanes (short texts, long texts) so neither a long pass nor a long count
holds up counting for new short requests.

When the child dies (a segfault or abort in native code, or the OOM killer), every call in
flight fails with :class:`WorkerCrashed`, and the parent starts a new child at once; calls made
meanwhile wait for it. The batcher then retries the requests of a crashed pass one by one, so
only the request that causes the crash gets an error (see ``batcher.py``).

The payloads are plain data (texts, arrays, images as pixel buffers, vectors), pickled once.

The child is a fresh interpreter, ``python -m mmembed.engine.worker FD``, that reads what to
host from the pipe it inherits. multiprocessing's "spawn" would re-import the parent's
``__main__``: a user's script that builds an ``Embedder`` at its top level would then build
another one in the child, which fails (and a notebook's or a Ray worker's ``__main__`` is not
the user's to re-run at all). Here nothing of the parent's ``__main__`` is imported.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import multiprocessing.util as mp_util
import os
import pickle
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection, Pipe
from typing import Any, ClassVar

from mmembed import logs
from mmembed.errors import ApiError, ErrorCode
from mmembed.logs import setup_logging

log = logging.getLogger("mmembed.worker")

MODEL_NICE = 5


class WorkerCrashed(RuntimeError):
    """The worker process died while this call was in flight."""


class WorkerUnavailable(RuntimeError):
    """The worker process could not be (re)started."""


# -- child side ------------------------------------------------------------------------------------
def _lower_priority() -> None:
    """Run forward passes below the event loop's CPU priority (see docs/benchmarks.md): a pass
    uses every core and would otherwise starve the threads that read requests and send answers.
    Threads the runtimes start later from this thread inherit its priority."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MODEL_NICE)


def _transportable(exc: BaseException) -> tuple:
    if isinstance(exc, ApiError):
        return ("api", exc.error.name, exc.message, exc.headers)
    try:  # the exception itself where it pickles, so the server sees its own type
        return ("pickled", pickle.dumps(exc))
    except Exception:
        return ("exc", type(exc).__name__, str(exc))


def _rebuild(err: tuple) -> Exception:
    if err[0] == "api":
        return ApiError(ErrorCode[err[1]], err[2], headers=err[3])
    if err[0] == "pickled":
        with contextlib.suppress(Exception):
            exc = pickle.loads(err[1])
            if isinstance(exc, Exception):
                return exc
        return RuntimeError("an exception that could not be rebuilt")
    return RuntimeError(f"{err[1]}: {err[2]}")


def _child_entry(fd: int) -> None:
    """``python -m mmembed.engine.worker FD``: take the parent's import path, then what to host,
    from the pipe on ``FD`` (the path first, so the factory unpickles where the parent found it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    conn = Connection(fd)
    sys.path[:] = conn.recv()
    try:
        factory, args, lanes, log_setup = conn.recv()
    except BaseException as exc:
        conn.send(("failed", _transportable(exc)))
        return
    _child_main(conn, factory, args, lanes, log_setup)


def _child_main(
    conn: Any, factory: Callable[..., Any], args: tuple, lanes: dict, log_setup: tuple | None
) -> None:
    if log_setup is not None:  # the server's level and format (e.g. "exporting ... to ONNX")
        setup_logging(*log_setup)
    pools = {
        lane: ThreadPoolExecutor(
            n, thread_name_prefix=lane, initializer=_lower_priority if low else None
        )
        for lane, (n, low) in lanes.items()
    }
    first = next(iter(pools.values()))
    send_lock = threading.Lock()
    try:
        # Built on the first lane's thread, so the threads its libraries start inherit it.
        host = first.submit(factory, *args).result()
        info = host.info() if hasattr(host, "info") else {}
    except BaseException as exc:
        conn.send(("failed", _transportable(exc)))
        return
    try:
        conn.send(("ready", info))
    except OSError:  # the parent went away while we were loading
        os._exit(0)

    def run(cid: int, method: str, call_args: tuple) -> None:
        try:
            reply = (cid, True, getattr(host, method)(*call_args))
        except BaseException as exc:
            reply = (cid, False, _transportable(exc))
        with send_lock:
            conn.send(reply)

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        cid, lane, method, call_args = msg
        pools[lane].submit(run, cid, method, call_args)
    # Unlink what libraries registered with multiprocessing (torch's semaphores), which the
    # parent's resource tracker would otherwise report as leaked at shutdown; then leave at
    # once, not waiting for passes in flight: the parent is gone or closing us.
    mp_util._run_finalizers()  # type: ignore[attr-defined]
    os._exit(0)


# -- parent side -----------------------------------------------------------------------------------
class ChildProcess:
    """A worker's interpreter (``subprocess.Popen``), with the few ``multiprocessing.Process``
    methods the supervisor uses."""

    _live: ClassVar[weakref.WeakSet[ChildProcess]] = weakref.WeakSet()

    def __init__(self, name: str, conn: Connection) -> None:
        import mmembed

        # The mmembed the parent runs, whatever the child's working directory or sys.path.
        root = os.path.dirname(os.path.dirname(os.path.abspath(mmembed.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        fd = conn.fileno()
        self.name = name
        self.popen = subprocess.Popen(
            [_python(), "-m", "mmembed.engine.worker", str(fd), name],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        ChildProcess._live.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.popen.kill()

    @classmethod
    def kill_all(cls) -> None:
        """At interpreter exit: no worker outlives its parent (they would otherwise notice only
        when they next read the pipe)."""
        for child in list(cls._live):
            if child.is_alive():
                child.kill()


atexit.register(ChildProcess.kill_all)


def _python() -> str:
    """The interpreter to run workers with: this one (``multiprocessing.set_executable`` is
    honoured, for embedded interpreters)."""
    from multiprocessing import spawn

    return spawn.get_executable() or sys.executable


class Worker:
    """One supervised child process hosting ``factory(*args)``; restarted whenever it dies."""

    def __init__(
        self,
        name: str,
        factory: Callable[..., Any],
        args: tuple = (),
        *,
        lanes: dict[str, tuple[int, bool]],
        start_timeout_s: float = 300.0,
    ) -> None:
        if getattr(factory, "__module__", None) == "__main__":
            raise TypeError(
                f"worker {name}: {factory!r} must be importable by the worker process, not "
                "defined in __main__ (the worker does not run the parent's __main__)"
            )
        self.name = name
        self._factory, self._args, self._lanes = factory, args, lanes
        self._start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._backlog: list[tuple] = []  # calls made while the child is (re)starting
        self._ids = itertools.count()
        self._conn: Any = None
        self._proc: Any = None
        self._closing = False
        self.info: dict[str, Any] = {}
        self.restarts = 0
        self.crashes = 0
        self._aborting = False

    # lifecycle
    def start(self) -> dict[str, Any]:
        """Start the child and wait until it is ready; raises what its start-up raised."""
        conn, proc = self._spawn()
        with self._lock:
            self._conn, self._proc = conn, proc
        threading.Thread(
            target=self._supervise, args=(conn, proc), name=f"supervise-{self.name}", daemon=True
        ).start()
        return self.info

    def _spawn(self) -> tuple[Any, Any]:
        # A new interpreter, never a fork (the parent has threads), and never multiprocessing's
        # spawn (it re-imports the parent's __main__; see the module docstring).
        parent_end, child_end = Pipe(duplex=True)
        try:
            proc = ChildProcess(f"mmembed-{self.name}", child_end)
        finally:
            child_end.close()
        try:
            parent_end.send(list(sys.path))
            parent_end.send((self._factory, self._args, self._lanes, logs.current_setup))
        except OSError:
            pass  # it died at once: reported below
        if not parent_end.poll(self._start_timeout_s):
            proc.kill()
            raise WorkerUnavailable(f"worker {self.name} did not start in time")
        try:
            kind, payload = parent_end.recv()
        except (EOFError, OSError):
            proc.join(1)
            raise WorkerUnavailable(
                f"worker {self.name} died while starting (exit code {proc.exitcode})"
            ) from None
        if kind != "ready":
            proc.join(5)
            raise _rebuild(payload)
        self.info = payload
        return parent_end, proc

    def close(self) -> None:
        with self._lock:
            self._closing = True
            conn, proc = self._conn, self._proc
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(None)
        if proc is not None:
            proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(2)

    def abort(self) -> None:
        """Kill the child on purpose (to stop work nobody waits for); it is restarted, and the
        calls in flight fail with ``WorkerCrashed``."""
        with self._lock:
            proc = self._proc if self._conn is not None else None
            if proc is None:
                return
            self._aborting = True
        proc.kill()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # calls
    def submit(self, lane: str, method: str, *args: Any) -> Future:
        """Run ``method(*args)`` on the hosted object; never blocks (queues while restarting)."""
        fut: Future = Future()
        cid = next(self._ids)
        with self._lock:
            if self._closing:
                fut.set_exception(WorkerUnavailable(f"worker {self.name} is closed"))
                return fut
            self._pending[cid] = fut
            msg = (cid, lane, method, args)
            if self._conn is None:
                self._backlog.append(msg)
                return fut
            # If the child just died, the supervisor fails this call.
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(msg)
        return fut

    def call(self, lane: str, method: str, *args: Any) -> Any:
        return self.submit(lane, method, *args).result()

    def _supervise(self, conn: Any, proc: Any) -> None:
        """Deliver replies; when the child dies, fail the calls in flight and restart it."""
        while True:
            self._read(conn, proc)
            proc.join(5)
            with self._lock:
                self._conn = None
                lost, self._pending = self._pending, {}
                closing, aborted, self._aborting = self._closing, self._aborting, False
            if closing:
                for fut in lost.values():
                    fut.set_exception(WorkerUnavailable(f"worker {self.name} is closed"))
                return
            if aborted:
                log.info("worker %s stopped to drop abandoned work; restarting", self.name)
            else:
                self.crashes += 1
                log.error(
                    "worker %s (pid %s) died with exit code %s; %d call(s) lost; restarting",
                    self.name,
                    proc.pid,
                    proc.exitcode,
                    len(lost),
                )
            for fut in lost.values():
                if not fut.done():
                    fut.set_exception(
                        WorkerCrashed(f"worker {self.name} died (exit code {proc.exitcode})")
                    )
            restarted = self._restart()
            if restarted is None:
                return
            conn, proc = restarted

    def _read(self, conn: Any, proc: Any) -> None:
        while True:
            try:
                cid, ok, value = conn.recv()
            except (EOFError, OSError):
                return
            with self._lock:
                fut = self._pending.pop(cid, None)
            if fut is not None and not fut.done():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(_rebuild(value))

    def _restart(self) -> tuple[Any, Any] | None:
        while True:
            try:
                conn, proc = self._spawn()
                break
            except Exception:
                log.exception("worker %s failed to restart", self.name)
                with self._lock:
                    if self._closing:
                        return None
                    backlog, self._backlog = self._backlog, []
                    for msg in backlog:
                        fut = self._pending.pop(msg[0], None)
                        if fut is not None:
                            fut.set_exception(WorkerUnavailable(f"worker {self.name} is down"))
                threading.Event().wait(1.0)
        with self._lock:
            if self._closing:
                proc.kill()
                return None
            self._conn, self._proc = conn, proc
            self.restarts += 1
            backlog, self._backlog = self._backlog, []
            for msg in backlog:
                with contextlib.suppress(OSError, ValueError):
                    conn.send(msg)
        log.info("worker %s restarted (pid %s)", self.name, proc.pid)
        return conn, proc


if __name__ == "__main__":  # python -m mmembed.engine.worker FD NAME (started by Worker)
    from mmembed.engine.worker import _child_entry as entry  # the module, not this __main__ copy

    entry(int(sys.argv[1]))
