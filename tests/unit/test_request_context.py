"""The request context crosses processes (Ray Serve's ingress to a backend replica) pickled."""

from __future__ import annotations

import pickle

from mmembed.request import RequestContext
from mmembed.types import Usage


def test_a_pickled_context_leaves_the_billing_hook_behind():
    """The door's hook (a closure over the HTTP request) and its queued ledger row stay with
    the process that will commit them; the other process gets the rest of the context."""
    seen: list[Usage] = []
    ctx = RequestContext(request_id="r-1", route="dashscope", model="m", items=3)
    ctx.on_usage = seen.append
    ctx.billing = (object(), object())
    copy = pickle.loads(pickle.dumps(ctx))
    assert copy.on_usage is None and copy.billing is None
    assert (copy.request_id, copy.route, copy.model, copy.items) == ("r-1", "dashscope", "m", 3)
    assert ctx.on_usage is not None and ctx.billing is not None  # the original keeps them
