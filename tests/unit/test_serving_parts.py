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
    router = opts["request_router_config"]["request_router_class"]
    assert router == "mmembed.serving.router:ContentAffinityRouter"
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


# -- cache affinity across replicas (serving.affinity, serving.router, ColocatedEngine) ----------
def _req(*items, model: str = "m", instruct: str | None = None):
    from mmembed.types import ContentItem, EmbedRequest

    return EmbedRequest(
        model=model,
        items=[ContentItem(index=i, **item) for i, item in enumerate(items)],
        instruct=instruct,
    )


def _key(req, texts: bool = False) -> str | None:
    from mmembed.serving.affinity import affinity_key

    return affinity_key(req, req.model, texts=texts)


def test_the_affinity_key_follows_what_the_replicas_cache():
    cat = {"image": "http://h/cat.png"}
    assert _key(_req({"text": "hello"})) is None  # texts are not cached by default
    assert _key(_req({"text": "hello"}), texts=True) is not None
    key = _key(_req(cat, {"text": "hello"}))
    assert key == _key(_req(cat, {"text": "hello"}))  # the same request: one owner
    assert key == _key(_req(cat, {"text": "bye"}))  # an uncached text does not count
    video = _req({"video": "http://h/v.mp4"})
    faster = _req({"video": "http://h/v.mp4"})
    faster.fps = 2.0
    others = [
        _req({"image": "http://h/dog.png"}),
        _req({"video": "http://h/cat.png"}),
        _req(cat, model="other"),
        _req(cat, instruct="find the animal"),
        _req({"image": "http://h/cat.png", "text": "a cat"}),  # fused: the text is part of it
        _req({"multi_images": ["http://h/cat.png", "http://h/dog.png"]}),
        video,
        faster,  # the frame rate is part of a video's cache key
    ]
    keys = {_key(r) for r in others} | {_key(_req(cat))}
    assert len(keys) == len(others) + 1 and None not in keys
    # data: URIs of megabytes are keyed by length, head and tail: still one key per content
    big = "data:image/png;base64," + "A" * 200_000
    assert _key(_req({"image": big})) == _key(_req({"image": big}))
    variants = {big[:-1] + "B", big[:30] + "B" + big[31:], big + "A"}
    assert len({_key(_req({"image": v})) for v in variants | {big}}) == 4


def _rerank(query: dict, *docs: dict, instruct: str | None = None):
    from mmembed.types import ContentItem, RerankRequest

    return RerankRequest(
        model="r",
        query=ContentItem(index=0, **query),
        documents=[ContentItem(index=i, **d) for i, d in enumerate(docs)],
        instruct=instruct,
    )


def test_a_rerank_request_is_keyed_by_its_query_and_documents_when_its_pairs_are_cached():
    """The cache holds each (query, document) pair's score under both keys: a rerank request
    holding media documents is keyed by the query and the documents; one of uncached texts is
    left to two-choice routing."""
    q, cat, dog = {"text": "a pet"}, {"image": "http://h/cat.png"}, {"image": "http://h/dog.png"}
    assert _key(_rerank(q, {"text": "x"}, {"text": "y"})) is None
    assert _key(_rerank(cat, {"text": "x"})) is None  # a media query alone: no cached pair
    assert _key(_rerank(q, {"text": "x"}), texts=True) is not None
    key = _key(_rerank(q, cat, dog))
    assert key is not None and key == _key(_rerank(q, cat, dog))
    assert key == _key(_rerank(q, cat, dog, {"text": "uncached"}))
    differ = [
        _rerank({"text": "a wild animal"}, cat, dog),  # another query: other pairs
        _rerank(q, dog, cat),
        _rerank(q, cat),
        _rerank(q, cat, dog, instruct="rank pets"),
    ]
    assert len({_key(r) for r in differ} | {key}) == len(differ) + 1
    # the query's role counts: an embed request of the same parts is another key
    assert _key(_req(q, cat, dog), texts=True) != _key(_rerank(q, cat, dog), texts=True)


def test_rendezvous_ranking_is_stable_and_moves_only_the_keys_of_a_lost_replica():
    from mmembed.serving.affinity import rank

    keys = [f"key-{i}" for i in range(2000)]
    three = {k: rank(k, ["a", "b", "c"]) for k in keys}
    assert all(sorted(r) == ["a", "b", "c"] for r in three.values())
    assert all(rank(k, ["c", "a", "b"]) == three[k] for k in keys[:50])  # order-independent
    owners = [r[0] for r in three.values()]
    assert all(550 < owners.count(x) < 780 for x in "abc")  # about a third each
    for k in keys:  # "c" leaves: its keys go to their second choice, the rest stay
        assert rank(k, ["a", "b"])[0] == (three[k][1] if three[k][0] == "c" else three[k][0])


def test_the_router_offers_the_owner_first_and_spreads_the_rest():
    import asyncio
    from types import SimpleNamespace

    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    from mmembed.serving.affinity import rank
    from mmembed.serving.router import ContentAffinityRouter

    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=u)) for u in "pqrs"]
    router = object.__new__(ContentAffinityRouter)  # choose_replicas reads only its arguments

    async def choose(**kwargs):
        meta = RequestMetadata(request_id="r", internal_request_id="i")
        pending = PendingRequest(args=[b"payload"], kwargs=kwargs, metadata=meta)
        ranks = await router.choose_replicas(replicas, pending)
        assert pending.routing_context.should_backoff
        return [[r.replica_id.unique_id for r in group] for group in ranks]

    for key in ("k1", "k2", "k3"):
        assert asyncio.run(choose(affinity=key)) == [[u] for u in rank(key, list("pqrs"))]
    for _ in range(20):  # no key: two distinct random replicas, the less busy one takes it
        (pair,) = asyncio.run(choose(affinity=None))
        assert len(pair) == 2 and len(set(pair)) == 2 and set(pair) <= set("pqrs")
    assert asyncio.run(router.choose_replicas([], None)) == []


class _Handle:
    """Serve's deployment handle as ``RemoteEngine`` uses it (``handle.embed.remote``,
    ``handle.rerank.remote``), calling the peer replica's answer function in process instead
    of over Ray."""

    def __init__(self, engine) -> None:
        from types import SimpleNamespace

        self.engine = engine
        self.calls: list[tuple[str, str | None]] = []
        self.embed = SimpleNamespace(remote=self._caller("embed"))
        self.rerank = SimpleNamespace(remote=self._caller("rerank"))

    def _caller(self, method: str):
        async def remote(payload: bytes, affinity: str | None = None) -> bytes:
            from mmembed.serving.deployments import answer

            self.calls.append((method, affinity))
            return await answer(self.engine, method, payload)

        return remote


def test_a_colocated_replica_embeds_what_it_owns_and_hands_the_rest_to_the_owner():
    import asyncio
    import base64

    from mmembed.config import Settings
    from mmembed.engine.engine import Engine
    from mmembed.serving.affinity import rank
    from mmembed.serving.remote import ColocatedEngine, snapshot
    from tests.media_util import make_image

    cat = parse_catalog(_catalog({"num_replicas": 2}))
    settings = Settings(model_isolation="thread")
    here, peer = Engine(settings, cat), Engine(settings, cat)
    handle = _Handle(peer)
    me = {"replica": "me", "role": "backend", "pid": 1, "node": "n", "backend": "h"}
    eng = ColocatedEngine(settings, cat, {"h": handle}, None, me, here, "h")

    def image(i: int) -> dict:
        data = base64.b64encode(make_image("PNG", (40 + i, 32))).decode()
        return {"image": f"data:image/png;base64,{data}"}

    async def run() -> None:
        eng._reported.set()  # as the board poll does once every backend has reported
        await asyncio.to_thread(eng.load)
        peer.load()
        assert eng.loaded.is_set() and eng.status() == {"h": "ready"}
        them = me | {"replica": "peer", "pid": 2}
        eng._entries = [snapshot(peer, them, None)]  # as the board lists the peer
        mine = next(i for i in range(40) if eng.owns(_key(_req(image(i)))))
        theirs = next(i for i in range(40) if not eng.owns(_key(_req(image(i)))))
        assert rank(_key(_req(image(theirs))), ["me", "peer"])[0] == "peer"
        for _ in range(3):
            for i in (mine, theirs):
                got = await eng.embed(_req(image(i)))
                assert got.kinds == ["image"] and got.vectors.shape == (1, 8)
        assert await eng.embed(_req({"text": "hi"}))  # nothing cached: here, no hop
        # each image embedded once, by its owner; its repeats are hits there
        assert here.cache.stats()["entries"] == 1 and here.cache.stats()["hits"] == 2
        assert peer.cache.stats()["entries"] == 1 and peer.cache.stats()["hits"] == 2
        assert handle.calls == [("embed", _key(_req(image(theirs))))] * 3
        # the peer's refusal arrives whole
        bad = _req(image(theirs))
        bad.dimension = 7
        with pytest.raises(ApiError) as info:
            await eng.embed(bad)
        assert info.value.error is ErrorCode.INVALID_PARAMETER and "dimension" in info.value.message
        # /health: the board's entries, this replica's own taken live
        eng._entries = [snapshot(peer, them, None), snapshot(here, me, None)]
        assert eng.cache.stats()["entries"] == 2 and eng.batch_stats()["h"]["replicas"] == 2
        await eng.aclose()
        await peer.aclose()

    asyncio.run(run())


def _image(i: int) -> dict:
    import base64

    from tests.media_util import make_image

    data = base64.b64encode(make_image("PNG", (40 + i, 32))).decode()
    return {"image": f"data:image/png;base64,{data}"}


def test_a_colocated_replica_hands_rerank_and_batch_work_over_with_their_context():
    """A cosine reranker runs in its embedding backend's replicas (``Catalog.host``): its
    requests are answered in process or by the owner of their documents; a batch job's
    context keeps ``background`` across the hop (its results are not cached there)."""
    import asyncio

    from mmembed.config import Settings
    from mmembed.engine.engine import Engine
    from mmembed.serving.remote import ColocatedEngine, snapshot

    raw = {
        "backends": {
            "emb": {"family": "hash", "dim": 8, "ray": {"num_replicas": 2}},
            "rr": {"family": "cosine", "backend": "emb"},
        },
        "models": {
            "e": {"backend": "emb", "dimensions": [8]},
            "r": {"backend": "rr", "task": "rerank"},
        },
    }
    cat = parse_catalog(raw)
    settings = Settings(model_isolation="thread")
    here, peer = Engine(settings, cat), Engine(settings, cat)
    handle = _Handle(peer)
    me = {"replica": "me", "role": "backend", "pid": 1, "node": "n", "backend": "emb"}
    eng = ColocatedEngine(settings, cat, {"emb": handle}, None, me, here, "emb")

    def owned_by_peer(make):  # the first request made by ``make(i)`` the peer owns
        return next(r for r in map(make, range(40)) if not eng.owns(_key(r)))

    async def run() -> None:
        eng._reported.set()
        await asyncio.to_thread(eng.load)
        peer.load()
        eng._entries = [snapshot(peer, me | {"replica": "peer", "pid": 2}, None)]
        # text documents are not cached: answered here, whoever would own them
        got = await eng.rerank(_rerank({"text": "q"}, {"text": "a"}, {"text": "b"}))
        assert got.scores.shape == (2,) and handle.calls == []
        assert here.batch_stats()["rr"]["requests"] == 1  # in this process
        # image documents: scored by their owner, whose cache then holds the pairs
        req = owned_by_peer(lambda i: _rerank({"text": "q"}, _image(i), _image(i + 50)))
        for _ in range(2):
            got = await eng.rerank(req)
            assert got.scores.shape == (2,) and got.usage.image_count == 2
        assert handle.calls == [("rerank", _key(req))] * 2
        assert peer.cache.stats()["entries"] == 2 and peer.cache.stats()["hits"] == 2
        # a batch job's line keeps its meaning across the hop: not cached by the owner
        handle.calls.clear()
        embed = owned_by_peer(lambda i: _req(_image(i), model="e"))
        ctx = here.context("e")
        ctx.background = True
        await eng.embed(embed, ctx)
        assert handle.calls == [("embed", _key(embed))]
        assert peer.cache.stats()["entries"] == 2  # unchanged
        await eng.embed(embed, here.context("e"))  # online: cached
        assert peer.cache.stats()["entries"] == 3
        await eng.aclose()
        await peer.aclose()

    asyncio.run(run())


def test_colocated_mode_is_checked_when_the_app_is_built(tmp_path: Path):
    from ray.serve import Application

    from mmembed.serving import app_builder

    toml = tmp_path / "c.toml"
    base = '[backends.h]\nfamily = "hash"\n[models.m]\nbackend = "h"\ndimensions = [64]\n'
    toml.write_text(base)
    app = app_builder({"catalog": str(toml), "ray_mode": "colocated"})
    assert isinstance(app, Application)
    toml.write_text(base + "[backends.h.ray]\nmin_replicas = 1\nmax_replicas = 3\n")
    with pytest.raises(ValueError, match="backend h: ray_mode colocated cannot autoscale"):
        app_builder({"catalog": str(toml), "ray_mode": "colocated"})
    with pytest.raises(ValueError, match="ray_mode 'sideways' is not one of split, colocated"):
        app_builder({"catalog": str(toml), "ray_mode": "sideways"})


def test_the_serving_app_imports_no_ray_before_it_is_pinned_to_loopback():
    """raylocal sets Ray's loopback switch before Ray is first imported; a module-level Ray
    import on the way (the router, say) would let the cluster use the outward address."""
    import subprocess
    import sys

    code = "import sys, mmembed.cli, mmembed.serving.app; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
