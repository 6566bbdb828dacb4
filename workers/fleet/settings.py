"""Settings of the `teachercache fleet` process (`TEACHERCACHE_*`): a worker's, plus the fleet's.

The worker settings (lease, drain, engine options, database, storage) are handed to every
replica as they are; the fleet's own say how replicas are placed and scaled.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from workers.fleet.policy import ScalePolicy
from workers.settings import WorkerSettings


class FleetSettings(WorkerSettings):
    # Ray: `auto` (the cluster this host belongs to), `ray://head:10001` (Ray Client), or unset
    # (RAY_ADDRESS, else a local cluster started for the fleet).
    ray_address: str | None = None
    min_replicas: int = Field(0, ge=0)
    max_replicas: int = Field(1, ge=1)
    # Unset: the teacher's tensor_parallel_size (0 for a remote teacher, which needs no GPU).
    gpus_per_replica: float | None = Field(None, ge=0)
    cpus_per_replica: float = Field(1.0, ge=0)
    # How often the controller reads the queue and resizes the pools.
    fleet_interval_s: float = Field(5.0, gt=0)
    # Outstanding tasks (pending + leased) per replica before another one starts; unset: max_inflight.
    requests_per_replica: int | None = Field(None, ge=1)
    # Hysteresis: a smaller size must have sufficed this long before a replica drains...
    scale_down_after_s: float = Field(60.0, ge=0)
    # ...and the queue must have been empty this long before the pool goes to min_replicas.
    idle_s: float = Field(300.0, ge=0)
    # Ray restarts a replica that dies this many times (-1: always); after that the fleet starts a new one.
    replica_max_restarts: int = Field(3, ge=-1)

    @model_validator(mode="after")
    def _bounds(self) -> FleetSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self

    def policy(self) -> ScalePolicy:
        return ScalePolicy(min_replicas=self.min_replicas, max_replicas=self.max_replicas,
                           requests_per_replica=self.requests_per_replica or self.max_inflight,
                           scale_down_after_s=self.scale_down_after_s, idle_s=self.idle_s)

    def replica_settings(self, teacher: str, database_url: str) -> WorkerSettings:
        """What one replica runs with: these settings as a worker's, for `teacher`, on the
        database the fleet resolved (never an embedded server of the replica's own)."""
        fields = self.model_dump(include=set(WorkerSettings.model_fields))
        return WorkerSettings(**{**fields, "teacher": teacher, "database_url": database_url, "worker_id": None})
