"""scripts/ray-cluster: two Ray nodes on this machine, each on 127.0.0.1 only, with their own
resources; idempotent start, a status, and a stop that ends only this cluster's processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.ray_cluster import SCRIPT, node_table, non_loopback_sockets, ray_cluster  # noqa: F401

pytestmark = [pytest.mark.slow]


def test_two_nodes_on_loopback(ray_cluster):  # noqa: F811
    nodes = [n for n in node_table(ray_cluster) if n["Alive"]]
    assert len(nodes) == 2
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
    named = {r: n["NodeID"] for n in nodes for r in n["Resources"] if r.startswith("node_")}
    assert set(named) == {"node_0", "node_1"} and named["node_0"] != named["node_1"]
    assert all(n["Resources"]["CPU"] == n["Resources"]["GPU"] == 1 for n in nodes)
    pids = ray_cluster.pids()
    assert len(pids) >= 6  # GCS, two raylets, their agents
    assert non_loopback_sockets(pids) == []  # no listener on 0.0.0.0, no outward connection


def test_start_again_and_status(ray_cluster):  # noqa: F811
    before = ray_cluster.pids()
    again = ray_cluster.run_script("start")
    assert again.returncode == 0 and f"already running at {ray_cluster.address}" in again.stdout
    assert ray_cluster.pids() == before
    status = ray_cluster.run_script("status")
    assert status.returncode == 0, status.stderr
    assert "node_0" in status.stdout and "node_1" in status.stdout
    env = ray_cluster.run_script("env")
    assert f"export RAY_ADDRESS={ray_cluster.address}" in env.stdout


def test_stop_without_a_cluster(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "stop", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "not running" in proc.stdout
    status = subprocess.run(
        [sys.executable, str(SCRIPT), "status", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 1 and "not running" in status.stdout
