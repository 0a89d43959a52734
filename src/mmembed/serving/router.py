"""Serve's request router for the backend deployments: content affinity, else two choices.

A call that carries an ``affinity`` keyword (``serving.affinity``) is offered to the replicas
in rendezvous order for that key, one at a time: the first that accepts takes it (the owner,
unless it is full). A call without one gets the power of two choices among two random
replicas, as Serve's default router does.

Unlike Serve's default, this router is not FIFO across calls: a replica chosen for one call
goes to that call (the base class's exact matching), since handing it to another queued call
would break the affinity.
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from mmembed.serving.affinity import rank


def affinity_of(request: PendingRequest | None) -> str | None:
    if request is None:
        return None
    key = request.kwargs.get("affinity")
    return key if isinstance(key, str) and key else None


class ContentAffinityRouter(RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        pass

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # when every choice is full, wait with backoff instead of spinning
            pending_request.routing_context.should_backoff = True
        key = affinity_of(pending_request)
        if key is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[i]] for i in rank(key, list(by_id))]
