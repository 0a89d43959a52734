"""A two-node Ray cluster on loopback for tests, and a check that Ray stays on loopback.

``ray_cluster`` (module-scoped) starts ``scripts/ray-cluster`` -- a head and one worker node,
each a separate ``ray start --node-ip-address 127.0.0.1`` with one CPU, a resource naming it
(``node_0``, ``node_1``) and one declared GPU (nothing computes on it: it lets a test place one
actor or replica per node, as on a GPU cluster) -- in a fresh directory, and stops it after the
module. Drivers (``mmembed embed --ray``, ``ray.init``) join it with ``cluster.env``.

Why the script rather than ``ray.cluster_utils.Cluster``: Cluster can be kept on loopback
(``node_ip_address="127.0.0.1"`` in ``head_node_args`` *and* in every ``add_node``, plus
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the driver, which otherwise dials 192.0.2.2-like
outward addresses and hangs), but it records its address in the machine-wide
/tmp/ray/ray_current_cluster, so that every ``ray.init()`` without an address on this machine
(other tests, Ray Serve's own start) would join it while it lives. The script keeps its state
in its own directory, and is what people and the other tests use.

``non_loopback_sockets(pids)`` reads /proc (no psutil: only Ray vendors it) for TCP and UDP
sockets of those processes that listen on, or connect to, anything but loopback.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "ray-cluster"


def _script_module():  # type: ignore[no-untyped-def]
    loader = importlib.machinery.SourceFileLoader("ray_cluster_script", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


script = _script_module()


@dataclass
class RayCluster:
    address: str
    dir: Path
    env: dict[str, str]  # os.environ plus what a driver needs to join
    nodes: list[dict]
    dashboard: str | None = None  # its URL, when started with one (Ray's state API needs it)

    def pids(self) -> list[int]:
        """Every live process of the cluster (GCS, raylets, agents, workers and actors)."""
        return script.alive(script.own_pids(self.dir, self.address))

    def run_script(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(SCRIPT), *args, "--dir", str(self.dir)],
            capture_output=True,
            text=True,
            timeout=600,
        )


def start_cluster(
    workers: int = 1,
    cpus: float = 1,
    gpus: int = 0,
    dashboard: bool = False,
    node_env: dict[str, str] | None = None,
) -> RayCluster:
    """``node_env``: environment for the nodes (and so for every worker and actor on them)."""
    # A short path: Ray's Unix sockets live under it (at most 107 bytes).
    state_dir = Path(tempfile.mkdtemp(prefix="mmray-", dir="/tmp"))
    cmd = [sys.executable, str(SCRIPT), "start", "--dir", str(state_dir)]
    cmd += ["--workers", str(workers), "--cpus", f"{cpus:g}", "--gpus", str(gpus)]
    cmd += ["--dashboard"] if dashboard else []
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(node_env or {})}
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = script.load_state(state_dir)
    env = {**os.environ, **script.driver_env(state_dir, state["address"])}
    env.pop("RAY_NAMESPACE", None)
    return RayCluster(state["address"], state_dir, env, state["nodes"], state.get("dashboard"))


def stop_cluster(cluster: RayCluster) -> None:
    proc = cluster.run_script("stop")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert cluster.pids() == []
    shutil.rmtree(cluster.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster():  # type: ignore[no-untyped-def]
    cluster = start_cluster(gpus=1)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)


def node_table(cluster: RayCluster) -> list[dict]:
    """``ray.nodes()`` as a driver of the cluster sees it (a subprocess: no Ray in pytest)."""
    code = (
        "import json, logging, ray; ray.init(logging_level=logging.WARNING); "
        "print(json.dumps([{k: n[k] for k in ('NodeID', 'Alive', 'NodeManagerAddress', "
        "'Resources')} for n in ray.nodes()]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- sockets -------------------------------------------------------------------------------

_TCP_LISTEN = "0A"


def _addr(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    host = hex_addr.split(":")[0]
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # /proc writes IPv6 as four host-order 32-bit words
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    ip = ipaddress.IPv6Address(words)
    return ip.ipv4_mapped or ip


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except OSError:
        pass
    return out


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace")[:120]


# Ray's dashboard process, even with the dashboard off (it then loads only its usage-stats
# module) and RAY_USAGE_STATS_ENABLED=0, asks the cloud metadata address which cloud it runs on
# (usage_stats_head.run -> get_cluster_config_to_report, 1 s timeout), once at start; no setting
# turns it off. Its own probe, never a connection of mmembed's: told apart, not counted.
_CLOUD_METADATA = ipaddress.ip_address("169.254.169.254")


def _ray_cloud_probe(
    rip: ipaddress.IPv4Address | ipaddress.IPv6Address, remote: str, pid: int
) -> bool:
    if rip != _CLOUD_METADATA or int(remote.split(":")[1], 16) != 80:
        return False
    try:
        return b"/ray/dashboard/dashboard.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def non_loopback_sockets(pids: list[int]) -> list[str]:
    """Sockets of ``pids`` bound to or connected to a non-loopback address (a listener on
    0.0.0.0 or :: counts), as readable lines; [] when all is on loopback."""
    owner = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
    bad = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if inode not in owner:
                continue
            lip, rip = _addr(local), _addr(remote)
            listening = (proto.startswith("tcp") and state == _TCP_LISTEN) or rip.is_unspecified
            if not lip.is_loopback or (not listening and not rip.is_loopback):
                port = int(local.split(":")[1], 16)
                pid = owner[inode]
                if _ray_cloud_probe(rip, remote, pid):
                    continue
                bad.append(f"{proto} {lip}:{port} -> {rip} (state {state}) {pid} {_cmdline(pid)}")
    return bad


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def watch_sockets(proc: subprocess.Popen, also: Callable[[], list[int]] | None = None) -> set[str]:
    """Until ``proc`` ends: every non-loopback socket seen in its process tree (and in the
    processes ``also`` lists, e.g. ``cluster.pids``), polled every 0.2 s."""
    seen: set[str] = set()
    while proc.poll() is None:
        seen.update(non_loopback_sockets(process_tree(proc.pid) + (also() if also else [])))
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.2)
    return seen
