"""Which Ray addresses mmembed keeps on loopback, and the environment it sets for them."""

from __future__ import annotations

import os

import pytest

from mmembed import raylocal


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:6379", True),
        ("127.0.0.2:6379", True),
        ("localhost:6379", True),
        ("ray://127.0.0.1:10001", True),
        ("[::1]:6379", True),
        ("192.0.2.2:6379", False),
        ("head.example.com:6379", False),
        ("auto", False),
    ],
)
def test_is_loopback(address, loopback):
    assert raylocal.is_loopback(address) is loopback


def test_prepare_sets_only_what_the_address_needs(monkeypatch):
    for var in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED"):
        monkeypatch.delenv(var, raising=False)
    raylocal.prepare("10.0.0.5:6379")
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ
    raylocal.prepare("127.0.0.1:6379")
    env = os.environ
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and "RAY_USAGE_STATS_ENABLED" not in env
    raylocal.prepare("local")
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")  # the user's choice wins
    raylocal.prepare("local")
    assert env["RAY_USAGE_STATS_ENABLED"] == "1"
