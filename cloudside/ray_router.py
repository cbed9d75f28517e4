"""Ray Serve request router of the avcloud model deployment (`engine: ray`, `dispatch: edf`).

The deadline-aware choice is made by the dispatcher (`cloudside.dispatch.FleetDispatcher`, run by
`cloudside.ray_engine.RayEngine`); this router only carries it out: a call with `target=REPLICA`
goes to that replica. It also tells the dispatcher which replicas Serve runs, and which died, as
soon as Serve knows (`replica_directory`).

Ray Serve pickles this module by value into the handle's process, so it keeps no state of its
own and reaches the directory through an import at call time.
"""

from __future__ import annotations

from ray.serve.request_router import RequestRouter


class DeadlineRouter(RequestRouter):
    @property
    def supports_rejection_protocol(self) -> bool:
        # The dispatcher never sends a replica more than it can hold (its max_ongoing_requests
        # is far above the dispatch window), so Serve's reject-and-retry round trip is not needed.
        return False

    def update_replicas(self, replicas: list) -> None:
        super().update_replicas(replicas)
        from cloudside.ray_engine import replica_directory

        replica_directory.update(self._deployment_id.app_name, [replica.replica_id.unique_id for replica in replicas])

    def on_replica_actor_died(self, replica_id) -> None:  # noqa: ANN001 (Serve's ReplicaID)
        super().on_replica_actor_died(replica_id)
        from cloudside.ray_engine import replica_directory

        replica_directory.died(self._deployment_id.app_name, replica_id.unique_id)

    async def choose_replicas(self, candidate_replicas: list, pending_request=None) -> list[list]:  # noqa: ANN001
        target = pending_request.kwargs.get("target") if pending_request is not None else None
        if target is not None:
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == target:
                    return [[replica]]
        # Untargeted calls (describe), or a target Serve no longer lists (the dispatcher hears of
        # it at once and re-dispatches; this attempt's answer is then dropped): any replica.
        return [candidate_replicas]
