"""Parts that let the service run as several processes (Ray Serve): errors that pickle, an
upload quota that holds across processes, the catalog's ray table, adopted request ids."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from pathlib import Path

import pytest

from mmembed.api.app import adopted_request_id
from mmembed.errors import ApiError, ErrorCode
from mmembed.media.store import UploadStore
from mmembed.models.catalog import parse_catalog
from mmembed.models.ray_options import RayOptions
from tests.unit.test_uploads import ALICE, put, refused


def test_api_error_pickles_whole():
    err = ApiError(ErrorCode.RATE_QUOTA, "slow down: item 3", headers={"Retry-After": "7"})
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ApiError
    assert back.error is ErrorCode.RATE_QUOTA and back.error.status == 429
    assert back.message == "slow down: item 3" and str(back) == "slow down: item 3"
    assert back.headers == {"Retry-After": "7"}
    at = pickle.loads(pickle.dumps(err.at("input.contents[1]")))
    assert at.message == "input.contents[1]: slow down: item 3"


def _upload_in_another_process(root: str, size: int, out: multiprocessing.Queue) -> None:
    store = UploadStore(root, ttl_s=3600, owner_max_bytes=10_000)
    try:
        put(store, ALICE, "from-b", os.urandom(size))
        out.put("stored")
    except ApiError as exc:
        out.put(f"{exc.error.code}: {exc.message}")


def test_upload_quota_holds_across_processes(tmp_path: Path):
    """Two processes on one store directory (two replicas on shared storage): the second sees
    the first's upload although its own counter never did."""
    root = str(tmp_path / "shared")
    here = UploadStore(root, ttl_s=3600, owner_max_bytes=10_000)
    put(here, ALICE, "from-a", os.urandom(4000))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_upload_in_another_process, args=(root, 4000, out))
    proc.start()
    assert out.get(timeout=60) == "stored"  # 8000 of 10000
    proc.join(30)
    # This process's counter still says 4000; the scan under the owner's lock sees 8000.
    err = refused(put, here, ALICE, "third", os.urandom(4000))
    assert err.error is ErrorCode.TOO_LARGE and "this API key" in err.message
    assert here.usage(ALICE) == 8000
    proc = ctx.Process(target=_upload_in_another_process, args=(root, 3000, out))
    proc.start()
    assert out.get(timeout=60).startswith("BadRequest.TooLarge: uploads of this API key")
    proc.join(30)


def test_an_upload_made_in_one_store_reads_in_another(tmp_path: Path):
    """The signing secret and the files live in the directory: a policy signed by one process
    verifies in another, and its upload resolves there."""
    a = UploadStore(tmp_path / "s", ttl_s=3600, owner_max_bytes=10_000)
    b = UploadStore(tmp_path / "s", ttl_s=3600, owner_max_bytes=10_000)
    terms = a.new_policy(ALICE, 5000)
    b.verify_policy(str(terms["policy"]), str(terms["signature"]))
    ref = put(a, ALICE, "x.bin", b"hello")
    import asyncio

    assert asyncio.run(b.read(ref, ALICE, 5000)) == b"hello"


def _catalog(ray: dict) -> dict:
    return {
        "backends": {"h": {"family": "hash", "dim": 8, "ray": ray}},
        "models": {"m": {"backend": "h", "dimensions": [8]}},
    }


def test_catalog_ray_table_is_typed_and_checked():
    cat = parse_catalog(_catalog({"num_replicas": 2, "num_cpus": 0.5, "max_ongoing_requests": 64}))
    opts = cat.backends["h"].ray
    assert opts == RayOptions(num_replicas=2, num_cpus=0.5, max_ongoing_requests=64)
    assert opts.model_threads() == 1 and not opts.autoscaling
    auto = parse_catalog(_catalog({"min_replicas": 1, "max_replicas": 4})).backends["h"].ray
    assert auto.autoscaling and auto.target_ongoing_requests == 2.0
    assert parse_catalog(_catalog({})).backends["h"].ray == RayOptions()
    assert "ray" not in parse_catalog(_catalog({})).backends["h"].options


@pytest.mark.parametrize(
    ("ray", "says"),
    [
        ({"num_replica": 2}, "unknown keys ['num_replica']"),
        ({"num_replicas": "2"}, "ray.num_replicas must be an integer"),
        ({"num_replicas": 0}, "at least one replica"),
        ({"num_cpus": -1}, "ray.num_cpus must be a number >= 0"),
        ({"num_gpus": True}, "ray.num_gpus must be a number"),
        ({"min_replicas": 3, "max_replicas": 2}, "above ray.max_replicas"),
        ({"min_replicas": 0, "max_replicas": 2}, "scaling to zero"),
        ({"num_replicas": 2, "max_replicas": 3}, "not both"),
        ({"max_ongoing_requests": 0}, "at least 1"),
    ],
)
def test_catalog_ray_table_errors_name_the_key(ray, says):
    with pytest.raises(ValueError) as info:
        parse_catalog(_catalog(ray), source="cat.toml")
    assert "cat.toml: backends.h:" in str(info.value) and says in str(info.value)


@pytest.mark.parametrize(
    ("value", "adopted"),
    [
        (b"abc-123", True),
        (b"x" * 128, True),
        (b"x" * 129, False),
        (b"has space", False),
        (b"caf\xc3\xa9", False),
        (b"", False),
    ],
)
def test_incoming_request_ids_are_adopted_only_when_safe(value, adopted):
    scope = {"headers": [(b"host", b"x"), (b"x-request-id", value)]}
    assert adopted_request_id(scope) == (value.decode() if adopted else None)
    assert adopted_request_id({"headers": []}) is None


def test_deployment_options_follow_the_catalog(tmp_path: Path):
    from mmembed.config import Settings
    from mmembed.serving.app import backend_options

    raw = _catalog({"num_replicas": 3, "num_cpus": 2.0, "num_gpus": 0.5})
    spec = parse_catalog(raw).backends["h"]
    opts = backend_options(spec, Settings(queue_max_items=300))
    assert opts["name"] == "backend-h" and opts["num_replicas"] == 3
    assert opts["max_ongoing_requests"] == 300  # never Serve's 5: the batcher needs company
    actor = opts["ray_actor_options"]
    assert (actor["num_cpus"], actor["num_gpus"]) == (2.0, 0.5)
    assert actor["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"
    auto = parse_catalog(_catalog({"max_replicas": 4, "target_ongoing_requests": 8}))
    opts = backend_options(auto.backends["h"], Settings())
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 8,
    }


def test_backend_replicas_get_their_own_catalog_and_threads():
    from mmembed.serving.deployments import backend_catalog, with_threads

    raw = {
        "backends": {
            "a": {"family": "hash", "dim": 8},
            "c": {"family": "conse", "ray": {"num_cpus": 3}},
            "d": {"family": "conse", "threads": 1, "ray": {"num_cpus": 4}},
        },
        "models": {
            "ma": {"backend": "a", "dimensions": [8], "aliases": ["ma-old"]},
            "mc": {"backend": "c", "dimensions": [8]},
            "md": {"backend": "d", "dimensions": [8]},
        },
    }
    cat = parse_catalog(raw)
    only_c = with_threads(backend_catalog(cat, "c"), "c")
    assert list(only_c.backends) == ["c"] and list(only_c.models) == ["mc"]
    assert only_c.backends["c"].options["threads"] == 3  # its CPU share
    assert with_threads(backend_catalog(cat, "d"), "d").backends["d"].options["threads"] == 1
    only_a = with_threads(backend_catalog(cat, "a"), "a")  # the hash family takes no threads
    assert "threads" not in only_a.backends["a"].options and only_a.aliases == {"ma-old": "ma"}


def test_a_cosine_reranker_is_served_by_the_replicas_of_the_backend_it_scores_with():
    from mmembed.serving.deployments import backend_catalog

    raw = {
        "backends": {
            "emb": {"family": "hash", "dim": 8},
            "rr": {"family": "cosine", "backend": "emb"},
            "other": {"family": "hash", "dim": 8},
        },
        "models": {
            "e": {"backend": "emb", "dimensions": [8]},
            "r": {"backend": "rr", "task": "rerank"},
            "o": {"backend": "other", "dimensions": [8]},
        },
    }
    cat = parse_catalog(raw)
    assert [cat.host(b) for b in ("emb", "rr", "other")] == ["emb", "emb", "other"]
    hosted = backend_catalog(cat, "emb")
    assert sorted(hosted.backends) == ["emb", "rr"] and sorted(hosted.models) == ["e", "r"]
    assert sorted(backend_catalog(cat, "other").models) == ["o"]


def test_the_serve_run_builder_takes_settings_by_name(tmp_path: Path):
    from ray.serve import Application

    from mmembed.serving import app_builder

    toml = tmp_path / "c.toml"
    toml.write_text('[backends.h]\nfamily = "hash"\n[models.m]\nbackend = "h"\ndimensions = [64]\n')
    app = app_builder({"catalog": str(toml), "api_keys": "k1,k2", "ray_ingress_replicas": "2"})
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="unknown settings \\['catalogue'\\]"):
        app_builder({"catalogue": str(toml)})


def test_files_deleted_by_another_process_free_the_quota(tmp_path: Path):
    """This process's count is refreshed before it refuses: another replica's sweep (or an
    expiry) may have freed the room."""
    store = UploadStore(tmp_path / "s", ttl_s=3600, owner_max_bytes=10_000)
    put(store, ALICE, "a", os.urandom(4000))
    put(store, ALICE, "b", os.urandom(4000))
    assert store.usage(ALICE) == 8000
    for path in (tmp_path / "s" / ALICE).iterdir():  # as another process's sweep would
        path.unlink()
    put(store, ALICE, "c", os.urandom(4000))
    assert store.usage(ALICE) == 4000
