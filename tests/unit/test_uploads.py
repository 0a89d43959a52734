"""The SDK's local-file flow in-process: the streaming multipart reader, the upload store (signed
policies, owners, caps, expiry, safe paths) and the routes on the deterministic hash backend."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import requests

from mmembed.api.app import create_app
from mmembed.api.routes import EMBED_PATH
from mmembed.api.uploads import FormReader
from mmembed.config import Settings
from mmembed.engine.engine import Engine
from mmembed.errors import ApiError, ErrorCode
from mmembed.media.fetch import Fetcher
from mmembed.media.store import UploadStore
from mmembed.models.catalog import parse_catalog
from tests.media_util import make_image

PNG = make_image("PNG")


# -- multipart -----------------------------------------------------------------------------------
def sdk_form(fields: dict[str, str], filename: str, data: bytes) -> tuple[bytes, str]:
    """A body encoded exactly as the SDK's requests.post(files=..., data=...) encodes it."""
    prepared = requests.Request(
        "POST", "http://x/", data=fields, files={"file": (filename, data)}
    ).prepare()
    return prepared.body, prepared.headers["Content-Type"]  # type: ignore[return-value]


async def chunked(body: bytes, sizes: list[int]) -> AsyncIterator[bytes]:
    at, i = 0, 0
    while at < len(body):
        n = sizes[i % len(sizes)]
        yield body[at : at + n]
        at, i = at + n, i + 1


def parse(body: bytes, content_type: str, sizes: list[int]) -> dict[str, bytes]:
    """The fields and the file, read the way the upload route reads them."""
    boundary = content_type.split("boundary=")[1].encode()

    async def go() -> dict[str, bytes]:
        form = FormReader(chunked(body, sizes), boundary, 1 << 30)
        if not await form.until_file():
            raise ApiError(ErrorCode.INVALID_PARAMETER, "no file")
        data = b"".join([c async for c in form.file_data()])
        return {**{k: v.encode() for k, v in form.fields.items()}, "file": data}

    return asyncio.run(go())


@pytest.mark.parametrize("sizes", [[1], [7, 3], [64 * 1024], [10**9], [5, 1, 300, 2]])
def test_multipart_reader_matches_what_requests_sends(sizes):
    # file bytes that look like the start of a delimiter, split across chunks
    data = b"\r\n-" + os.urandom(3000) + b"\r\n--" + b"\r\n" + os.urandom(50)
    fields = {"policy": "cG9saWN5", "Signature": "c2ln", "key": "mmembed/a/b/x.png"}
    body, ctype = sdk_form(fields, "my file.png", data)
    parsed = parse(body, ctype, sizes)
    assert parsed == {**{k: v.encode() for k, v in fields.items()}, "file": data}


def test_multipart_reader_refuses_malformed_bodies():
    body, ctype = sdk_form({"a": "1"}, "f", b"data")
    for broken, why in [
        (body[: len(body) // 2], "ended inside"),
        (b"no boundary at all" * 10, "malformed multipart body"),
        (body.replace(b"Content-Disposition: form-data; ", b"X: "), "Content-Disposition"),
        (body.replace(b'name="a"', b'name="a"; x="' + b"y" * 9000 + b'"'), "malformed"),
    ]:
        with pytest.raises(ApiError) as info:
            parse(broken, ctype, [16])
        assert info.value.error is ErrorCode.INVALID_PARAMETER and why in info.value.message
    many, ctype = sdk_form({f"f{i}": "v" for i in range(40)}, "f", b"data")
    with pytest.raises(ApiError, match="more than 32 fields"):
        parse(many, ctype, [1000])
    long_field, ctype = sdk_form({"a": "v" * 9000}, "f", b"data")
    with pytest.raises(ApiError, match="longer than 8192 bytes"):
        parse(long_field, ctype, [1000])


def test_multipart_reader_caps_the_whole_body():
    body, ctype = sdk_form({"a": "1"}, "f", os.urandom(5000))
    boundary = ctype.split("boundary=")[1].encode()

    async def go() -> None:
        form = FormReader(chunked(body, [1000]), boundary, 3000)
        await form.until_file()
        async for _ in form.file_data():
            pass

    with pytest.raises(ApiError) as info:
        asyncio.run(go())
    assert info.value.error is ErrorCode.TOO_LARGE


# -- the store -----------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = time.time()  # file mtimes are real ones

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> UploadStore:
    return UploadStore(tmp_path / "up", ttl_s=3600, owner_max_bytes=10_000, clock=clock)


async def chunks_of(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def put(store: UploadStore, owner: str, name: str, data: bytes, max_bytes: int = 5000) -> str:
    terms = store.new_policy(owner, max_bytes)
    checked = store.verify_policy(str(terms["policy"]), str(terms["signature"]))
    key = f"{terms['upload_dir']}/{name}"
    asyncio.run(store.save(key, checked, chunks_of(data)))
    return "oss://" + key


def read(store: UploadStore, ref: str, owner: str, max_bytes: int = 5000) -> bytes:
    return asyncio.run(store.read(ref, owner, max_bytes))


def refused(fn, *args) -> ApiError:  # type: ignore[no-untyped-def]
    with pytest.raises(ApiError) as info:
        fn(*args)
    return info.value


ALICE, BOB = UploadStore.owner_id("key-alice"), UploadStore.owner_id("key-bob")


def test_owner_ids_are_stable_hashes():
    assert ALICE == UploadStore.owner_id("key-alice") != BOB
    assert "key-alice" not in ALICE and len(ALICE) == 32
    assert UploadStore.owner_id(None) not in {ALICE, BOB}


def test_round_trip_and_privacy(store):
    ref = put(store, ALICE, "x.png", PNG)
    assert read(store, ref, ALICE) == PNG
    err = refused(read, store, ref, BOB)
    assert err.error is ErrorCode.ACCESS_DENIED and "different API key" in err.message
    assert refused(read, store, ref, ALICE, 10).error is ErrorCode.TOO_LARGE


def test_names_never_become_paths(store, tmp_path):
    ref = put(store, ALICE, "../../../../escape.png", b"abc")
    assert read(store, ref, ALICE) == b"abc"
    files = [p for p in (tmp_path / "up").rglob("*") if p.is_file() and p.name != ".secret"]
    assert len(files) == 1 and files[0].parent == tmp_path / "up" / ALICE
    assert "escape" not in str(files[0])
    assert not list(tmp_path.glob("escape*"))


def test_policies_are_signed_and_expire(store, clock):
    terms = store.new_policy(ALICE, 5000)
    policy, sig = str(terms["policy"]), str(terms["signature"])
    forged = base64.b64encode(base64.b64decode(policy).replace(ALICE.encode(), BOB.encode()))
    assert refused(store.verify_policy, forged.decode(), sig).error is ErrorCode.ACCESS_DENIED
    assert refused(store.verify_policy, policy, "").error is ErrorCode.ACCESS_DENIED
    checked = store.verify_policy(policy, sig)
    assert checked.owner == ALICE and checked.max_bytes == 5000
    # a key outside the policy's directory
    err = refused(asyncio.run, store.save("mmembed/other/dir/x.png", checked, chunks_of(b"x")))
    assert err.error is ErrorCode.ACCESS_DENIED
    clock.now += store.policy_ttl_s + 1
    err = refused(store.verify_policy, policy, sig)
    assert err.error is ErrorCode.ACCESS_DENIED and "expired" in err.message


def test_the_signing_secret_survives_a_restart(store, tmp_path, clock):
    terms = store.new_policy(ALICE, 5000)
    again = UploadStore(tmp_path / "up", ttl_s=3600, owner_max_bytes=10_000, clock=clock)
    assert again.verify_policy(str(terms["policy"]), str(terms["signature"])).owner == ALICE
    assert oct((tmp_path / "up" / ".secret").stat().st_mode & 0o777) == "0o600"


def test_no_overwrite(store):
    terms = store.new_policy(ALICE, 5000)
    checked = store.verify_policy(str(terms["policy"]), str(terms["signature"]))
    key = f"{terms['upload_dir']}/same.png"
    asyncio.run(store.save(key, checked, chunks_of(b"first")))
    err = refused(asyncio.run, store.save(key, checked, chunks_of(b"second")))
    assert err.error is ErrorCode.FILE_EXISTS and err.error.status == 409
    assert read(store, "oss://" + key, ALICE) == b"first"


def test_file_cap_is_enforced_while_streaming(store, tmp_path):
    err = refused(put, store, ALICE, "big.bin", os.urandom(6000), 5000)
    assert err.error is ErrorCode.TOO_LARGE
    assert not list((tmp_path / "up" / "tmp").iterdir())  # the partial file is gone
    assert store.usage(ALICE) == 0


def test_per_owner_quota(store):
    put(store, ALICE, "a", os.urandom(4000))
    put(store, ALICE, "b", os.urandom(4000))
    err = refused(put, store, ALICE, "c", os.urandom(4000))
    assert err.error is ErrorCode.TOO_LARGE and "this API key" in err.message
    put(store, BOB, "c", os.urandom(4000))  # another owner has its own allowance
    assert store.usage(ALICE) == 8000 and store.usage(BOB) == 4000


def test_parallel_uploads_cannot_overshoot_the_quota(store):
    async def go() -> list[BaseException | int]:
        saves = []
        for name in "abc":
            terms = store.new_policy(ALICE, 5000)
            checked = store.verify_policy(str(terms["policy"]), str(terms["signature"]))
            saves.append(store.save(f"{terms['upload_dir']}/{name}", checked, slow(4000)))
        return await asyncio.gather(*saves, return_exceptions=True)

    async def slow(n: int) -> AsyncIterator[bytes]:
        for _ in range(n // 500):
            await asyncio.sleep(0)  # interleave the three uploads
            yield b"x" * 500

    results = asyncio.run(go())
    assert sum(isinstance(r, int) for r in results) == 2
    assert store.usage(ALICE) == 8000


def test_uploaded_files_are_private_on_disk(store, tmp_path):
    ref = put(store, ALICE, "x.png", PNG)
    path = store._path(ALICE, ref[len("oss://") :])
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o077 == 0  # the owner's directory too


def test_quota_message_shows_sizes_that_differ(tmp_path, clock):
    limit = 30_000_000  # 28.6 MB at three digits
    store = UploadStore(tmp_path / "q", ttl_s=3600, owner_max_bytes=limit, clock=clock)
    store._disk = {ALICE: limit - 10}
    err = refused(store._check_quota, ALICE, 20)
    assert "28.61 MB, over the limit of 28.61 MB" not in err.message
    assert "over the limit of" in err.message
    taken, limit_shown = err.message.split("would take ")[1].split(", over the limit of ")
    assert taken != limit_shown.split(";")[0]


def test_a_policy_whose_expiry_is_not_finite_is_invalid(store):
    import orjson

    for exp in ("NaN", "Infinity", "1e999"):
        doc = b'{"dir": "mmembed/x/y", "owner": "%s", "max": 10, "exp": %s}' % (
            ALICE.encode(),
            exp.encode(),
        )
        policy = base64.b64encode(doc).decode()
        try:
            orjson.loads(doc)  # orjson refuses these; json.dumps would write them
        except orjson.JSONDecodeError:
            policy = base64.b64encode(doc.replace(exp.encode(), b'"%s"' % exp.encode())).decode()
        err = refused(store.verify_policy, policy, store._sign(policy))
        assert err.error is ErrorCode.ACCESS_DENIED and "malformed" in err.message


def test_partial_uploads_left_by_a_crash_are_removed_at_start(store, tmp_path):
    ref = put(store, ALICE, "kept.png", PNG)
    tmp_dir = tmp_path / "up" / "tmp"
    (tmp_dir / "abc.part").write_bytes(b"half an upload")
    (tmp_dir / "def.part").write_bytes(b"another")
    again = UploadStore(tmp_path / "up", ttl_s=3600, owner_max_bytes=10_000)
    assert again.sweep_partials() == 2
    assert list(tmp_dir.iterdir()) == []
    assert asyncio.run(again.read(ref, ALICE, 5000)) == PNG  # finished uploads stay


def test_a_full_disk_is_a_clear_503_without_paths(store, tmp_path, monkeypatch):
    real_open = os.open

    def full_disk_open(path, flags, mode=0o777, **kw):  # the kernel's ENOSPC, from /dev/full
        if str(path).endswith(".part"):
            return real_open("/dev/full", os.O_WRONLY)
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr("mmembed.media.store.os.open", full_disk_open)
    err = refused(put, store, ALICE, "x.png", PNG)
    assert err.error is ErrorCode.SERVICE_UNAVAILABLE and err.error.status == 503
    assert "upload store is full" in err.message and str(tmp_path) not in err.message
    assert store.usage(ALICE) == 0


def test_an_unreadable_signing_secret_is_a_503_and_reported(tmp_path):
    (tmp_path / "up" / ".secret").mkdir(parents=True)
    store = UploadStore(tmp_path / "up", ttl_s=3600, owner_max_bytes=10_000)
    err = refused(store.new_policy, ALICE, 100)
    assert err.error is ErrorCode.SERVICE_UNAVAILABLE and str(tmp_path) not in err.message
    assert "signing secret" in (store.check() or "")
    (tmp_path / "up2").mkdir()
    (tmp_path / "up2" / ".secret").write_bytes(b"short")  # damaged
    damaged = UploadStore(tmp_path / "up2", ttl_s=3600, owner_max_bytes=10_000)
    err = refused(damaged.new_policy, ALICE, 100)
    assert err.error is ErrorCode.SERVICE_UNAVAILABLE and str(tmp_path) not in err.message


def test_expiry_lazily_and_by_sweep(store, clock):
    old = put(store, ALICE, "old", b"o" * 4000)
    mid = put(store, ALICE, "mid", b"m" * 4000)
    for ref, age in ((old, 3000), (mid, 1000)):
        written = clock.now - age
        os.utime(store._path(ALICE, ref[len("oss://") :]), (written, written))
    clock.now += 601  # "old" is 3601 s old (ttl 3600), "mid" 1601 s
    err = refused(read, store, old, ALICE)
    assert err.error is ErrorCode.INVALID_URL and "expired" in err.message
    assert store.usage(ALICE) == 4000  # deleted when touched
    assert "does not exist" in refused(read, store, old, ALICE).message
    assert read(store, mid, ALICE) == b"m" * 4000
    clock.now += 2000
    assert store.sweep() == [(ALICE, 4000)]
    assert "does not exist" in refused(read, store, mid, ALICE).message


# -- the routes ----------------------------------------------------------------------------------
CATALOG = {
    "backends": {"h": {"family": "hash", "dim": 32}},
    "models": {
        "m": {"backend": "h", "dimensions": [32], "image_max_bytes": 4000, "video_max_bytes": 9000},
        "only": {"backend": "h", "dimensions": [32]},
    },
}


def serve(tmp_path: Path, **settings) -> tuple[object, Engine]:
    s = Settings(cache_dir=str(tmp_path), **settings)
    store = UploadStore.from_settings(s)
    engine = Engine(s, parse_catalog(CATALOG), fetcher=Fetcher(s, uploads=store))
    return create_app(s, engine=engine, upload_store=store), engine


async def sdk_upload(client: httpx.AsyncClient, key: str | None, data: bytes, name: str) -> str:
    """What dashscope's OssUtils.upload does, over the ASGI transport."""
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    r = await client.get(
        "/api/v1/uploads", params={"action": "getPolicy", "model": "m"}, headers=auth
    )
    assert r.status_code == 200, r.json()
    info = r.json()["data"]
    assert info["upload_host"] == "http://localhost/api/v1/uploads/oss"
    form = {
        "OSSAccessKeyId": info["oss_access_key_id"],
        "Signature": info["signature"],
        "policy": info["policy"],
        "key": f"{info['upload_dir']}/{name}",
        "x-oss-object-acl": info["x_oss_object_acl"],
        "x-oss-forbid-overwrite": info["x_oss_forbid_overwrite"],
        "success_action_status": "200",
    }
    body, ctype = sdk_form(form, name, data)
    up = await client.post(info["upload_host"], content=body, headers={"Content-Type": ctype})
    if up.status_code != 200:
        raise ApiError(ErrorCode.INVALID_PARAMETER, f"{up.status_code} {up.text}")
    return "oss://" + form["key"]


def embed_body(ref: str, model: str = "m") -> dict:
    return {"model": model, "input": {"contents": [{"image": ref}]}}


def run_app(app, fn):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://localhost"
            ) as client:
                return await fn(client)

    return asyncio.run(go())


def test_the_sdk_flow_without_keys(tmp_path):
    app, engine = serve(tmp_path)
    resolve = {"X-DashScope-OssResourceResolve": "enable"}

    async def flow(client):  # type: ignore[no-untyped-def]
        ref = await sdk_upload(client, None, PNG, "x.png")
        plain = await client.post(EMBED_PATH, json=embed_body(ref))
        via_oss = await client.post(EMBED_PATH, json=embed_body(ref), headers=resolve)
        b64 = "data:image/png;base64," + base64.b64encode(PNG).decode()
        inline = await client.post(EMBED_PATH, json=embed_body(b64))
        return plain, via_oss, inline

    plain, via_oss, inline = run_app(app, flow)
    assert plain.status_code == 400 and plain.json()["code"] == "InvalidURL"
    assert "X-DashScope-OssResourceResolve" in plain.json()["message"]
    assert via_oss.status_code == 200, via_oss.json()
    got = via_oss.json()["output"]["embeddings"][0]["embedding"]
    assert np.array_equal(got, inline.json()["output"]["embeddings"][0]["embedding"])
    assert engine.cache.stats()["hits"] == 1  # same bytes, decoded and embedded once
    on_disk = list((tmp_path / "uploads").glob("*/*"))
    assert [p.read_bytes() for p in on_disk] == [PNG]


def test_keys_own_their_uploads(tmp_path):
    app, _ = serve(tmp_path, api_keys=("alice", "bob:only"))
    resolve = {"X-DashScope-OssResourceResolve": "enable"}

    async def flow(client):  # type: ignore[no-untyped-def]
        ref = await sdk_upload(client, "alice", PNG, "x.png")
        as_bob = await client.post(
            EMBED_PATH,
            json=embed_body(ref, "only"),
            headers={"Authorization": "Bearer bob", **resolve},
        )
        bob_policy = await client.get(
            "/api/v1/uploads",
            params={"action": "getPolicy", "model": "m"},
            headers={"Authorization": "Bearer bob"},
        )
        anonymous = await client.get("/api/v1/uploads", params={"action": "getPolicy"})
        return as_bob, bob_policy, anonymous

    as_bob, bob_policy, anonymous = run_app(app, flow)
    assert as_bob.status_code == 403 and "different API key" in as_bob.json()["message"]
    assert bob_policy.status_code == 403 and bob_policy.json()["code"] == "AccessDenied"
    assert anonymous.status_code == 401
    assert not any("alice" in p.name for p in (tmp_path / "uploads").rglob("*"))


def test_upload_limits(tmp_path):
    app, _ = serve(tmp_path, upload_max_bytes_per_key=12_000)

    async def flow(client):  # type: ignore[no-untyped-def]
        errors = []
        for data in (os.urandom(9001), os.urandom(8000), os.urandom(8000)):
            try:
                await sdk_upload(client, None, data, f"{len(errors)}.bin")
                errors.append(None)
            except ApiError as exc:
                errors.append(exc.message)
        return errors

    too_big, ok, over_quota = run_app(app, flow)
    assert ok is None
    assert too_big and too_big.startswith("413") and "upload policy allows" in too_big
    assert over_quota and over_quota.startswith("413") and "this API key" in over_quota


def test_a_large_upload_is_refused_by_its_declared_length(tmp_path):
    app, _ = serve(tmp_path, upload_max_file_bytes=1000)

    async def flow(client):  # type: ignore[no-untyped-def]
        body = b"x" * 200_000
        return await client.post(
            "/api/v1/uploads/oss",
            content=body,
            headers={"Content-Type": "multipart/form-data; boundary=abc"},
        )

    r = run_app(app, flow)
    assert r.status_code == 413 and r.json()["code"] == "BadRequest.TooLarge"


def test_policy_request_must_be_get_policy(tmp_path):
    app, _ = serve(tmp_path, public_url="https://embed.example.com/")

    async def flow(client):  # type: ignore[no-untyped-def]
        bad = await client.get("/api/v1/uploads", params={"action": "list"})
        unknown = await client.get("/api/v1/uploads", params={"action": "getPolicy", "model": "x"})
        good = await client.get("/api/v1/uploads", params={"action": "getPolicy", "model": "m"})
        return bad, unknown, good

    bad, unknown, good = run_app(app, flow)
    assert bad.status_code == 400 and "getPolicy" in bad.json()["message"]
    assert unknown.status_code == 400 and "Model not exist" in unknown.json()["message"]
    data = good.json()["data"]
    assert data["upload_host"] == "https://embed.example.com/api/v1/uploads/oss"
    assert data["max_file_size_mb"] == round(9000 / (1 << 20), 3)  # the model's largest limit


def test_odd_references_and_signatures_are_refused_not_crashed(store):
    assert refused(read, store, "oss://mmembed/ünï/x/y.png", ALICE).error is ErrorCode.ACCESS_DENIED
    assert refused(read, store, "oss://mmembed", ALICE).error is ErrorCode.INVALID_URL
    terms = store.new_policy(ALICE, 10)
    err = refused(store.verify_policy, str(terms["policy"]), "sïgnature")
    assert err.error is ErrorCode.ACCESS_DENIED


def test_the_file_must_come_after_the_policy_fields(tmp_path):
    app, _ = serve(tmp_path)
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        + PNG
        + b'\r\n--b\r\nContent-Disposition: form-data; name="policy"\r\n\r\np\r\n--b--\r\n'
    )

    async def flow(client):  # type: ignore[no-untyped-def]
        headers = {"Content-Type": "multipart/form-data; boundary=b"}
        return await client.post("/api/v1/uploads/oss", content=body, headers=headers)

    r = run_app(app, flow)
    assert r.status_code == 400 and "before the file" in r.json()["message"]
