"""Issue 16, finding 10: on Ray Serve, a backend replica that dies (killed, OOM, its node lost)
while answering gives the client a retryable 503 with Retry-After, not a 500; an exception
raised by the replica's own code is still ours (500)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray")

from ray import exceptions as rex
from ray.serve import exceptions as sex

from mmembed.config import Settings
from mmembed.errors import ApiError, ErrorCode
from mmembed.models.catalog import parse_catalog
from mmembed.serving.remote import RemoteEngine
from mmembed.types import ContentItem, EmbedRequest

CATALOG = {
    "backends": {"h": {"family": "hash", "dim": 32}},
    "models": {"m": {"backend": "h", "dimensions": [32]}},
}


class _Method:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def remote(self, *args: object, **kwargs: object) -> object:  # (payload, affinity=)
        raise self.exc


class DyingHandle:
    """A deployment handle whose replica is gone in the way ``exc`` says."""

    def __init__(self, exc: BaseException) -> None:
        self.embed = _Method(exc)


def embed_through(exc: BaseException) -> BaseException:
    engine = RemoteEngine(Settings(), parse_catalog(CATALOG), {"h": DyingHandle(exc)}, None, {})
    req = EmbedRequest(model="m", items=[ContentItem(0, text="a cat")])
    with pytest.raises(BaseException) as caught:
        asyncio.run(engine.embed(req))
    return caught.value


@pytest.mark.parametrize(
    "exc",
    [
        rex.ActorDiedError(),
        rex.ActorUnavailableError("the actor is unreachable", None),
        rex.WorkerCrashedError(),
        rex.NodeDiedError("node lost"),
        sex.ReplicaUnavailableError("replica-1"),
        sex.DeploymentUnavailableError("backend-h"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_lost_replica_is_a_retryable_503(exc: BaseException):
    err = embed_through(exc)
    assert isinstance(err, ApiError), repr(err)
    assert err.error is ErrorCode.MODEL_UNAVAILABLE and err.error.status == 503
    assert err.headers.get("Retry-After") == "1"
    assert "retry" in err.message


def test_a_bug_in_the_replica_stays_ours():
    err = embed_through(RuntimeError("a bug"))
    assert isinstance(err, RuntimeError) and not isinstance(err, ApiError)
