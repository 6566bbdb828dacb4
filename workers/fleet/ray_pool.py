"""Worker replicas as Ray actors, one pool per teacher, sized by a controller that reads Postgres.

A replica is today's worker loop with its own engine, in an actor that reserves the teacher's
GPUs (or, for a teacher on vLLM's Ray executor, a placement group of them that may span nodes). Nothing here coordinates work: replicas claim, renew and release leases in Postgres as
any worker does, so a replica that dies (its process, its node) only loses leases, which expire
and are claimed again. Ray restarts a dead replica up to `replica_max_restarts` times; one dead
for good is replaced by the pool on its next reconcile.

The only module of the project that imports Ray.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import ray
from ray.exceptions import ActorDiedError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from service.db import transaction
from service.queue.repository import PendingWork, TaskRepository
from service.runtime import Runtime
from workers.fleet.policy import ScalePolicy
from workers.fleet.settings import FleetSettings
from workers.settings import WorkerSettings

if TYPE_CHECKING:
    from service.teachers.registry import TeacherSpec
    from workers.engine import Engine

log = logging.getLogger(__name__)

NAMESPACE = "teachercache"


class WorkerReplica:
    """One worker: the engine loads in the constructor (so a restart reloads it), the loop runs
    in a thread until `drain` stops it the way SIGTERM stops a worker process."""

    def __init__(self, settings: WorkerSettings) -> None:
        from workers.main import build_engine

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.rt = Runtime.from_settings(settings)
        self.teacher = self.rt.teachers.get(settings.teacher).name
        self.stopping = threading.Event()
        self.draining = False
        self.exit_code: int | None = None
        engine = build_engine(settings, self.rt, self.teacher)
        self.thread = threading.Thread(target=self._run, args=(engine, settings), name="worker-loop", daemon=True)
        self.thread.start()

    def _run(self, engine: Engine, settings: WorkerSettings) -> None:
        from workers.main import run_loop

        try:
            self.exit_code = run_loop(self.rt, engine, settings, self.teacher, self.stopping)
        except Exception:
            log.exception("replica for %s: the worker loop failed", self.teacher)
            self.exit_code = 1
        if not self.draining:
            # The loop ended on its own (the engine died): end the process, not just the thread,
            # so that Ray restarts the actor with a fresh engine. Its leases were released.
            log.error("replica for %s: worker loop exited with %s; restarting", self.teacher, self.exit_code)
            os._exit(self.exit_code or 1)

    def ping(self) -> str:
        return self.teacher

    def drain(self) -> int | None:
        """Stop claiming, let running requests finish for `drain_s`, release the rest, return."""
        self.draining = True
        self.stopping.set()
        self.thread.join()
        self.rt.engine.dispose()
        return self.exit_code


@dataclass
class Replica:
    actor: ray.actor.ActorHandle[WorkerReplica]
    name: str
    ping: ray.ObjectRef[str] | None = None
    # A teacher on vLLM's Ray executor: the GPU bundles its engine's workers run in (any nodes).
    placement_group: PlacementGroup | None = None


@dataclass
class ReplicaPool:
    """The replicas of one teacher. `reconcile` is called by the controller only (one thread)."""

    teacher: str
    worker_settings: WorkerSettings
    policy: ScalePolicy
    num_gpus: float
    num_cpus: float
    max_restarts: int
    runtime_env: dict[str, Any] | None = None
    # The teacher runs on vLLM's Ray executor: the replica reserves no GPU itself but a placement
    # group of `num_gpus` one-GPU bundles (vLLM's requirement), PACKed on as few nodes as fit.
    engine_on_ray_workers: bool = False
    active: list[Replica] = field(default_factory=list)
    draining: dict[ray.ObjectRef[int | None], Replica] = field(default_factory=dict)
    replaced: int = 0  # replicas found dead for good (restart budget spent) and started anew

    @property
    def size(self) -> int:
        """Replicas claiming work (or about to: starting, restarting); draining ones excluded."""
        return len(self.active)

    def reconcile(self, work: PendingWork, now: float) -> int:
        """Drop dead and drained replicas, then start or drain replicas to the policy's size."""
        self._reap_drained()
        self._reap_dead()
        desired = self.policy.desired(work.outstanding, self.size, now)
        if desired != self.size:
            log.info("fleet %s: %d outstanding tasks (%d pending, %d leased): %d -> %d replicas", self.teacher,
                     work.outstanding, work.pending, work.leased, self.size, desired)
        while self.size < desired:
            self._start()
        while self.size > desired:
            self._drain(self.active.pop())  # the newest first: the oldest have warm caches
        return desired

    def _start(self) -> None:
        name = f"{self.teacher}-{uuid.uuid4().hex[:8]}"
        options: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "num_cpus": self.num_cpus,
                                   "max_restarts": self.max_restarts, "runtime_env": self.runtime_env}
        group = None
        if self.engine_on_ray_workers and self.num_gpus:
            # vLLM's Ray executor uses the placement group its caller runs in (child tasks captured),
            # one bundle per GPU worker; the replica itself holds no GPU.
            group = placement_group([{"GPU": 1.0}] * int(self.num_gpus), strategy="PACK", name=f"{name}-engine")
            options.update(num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_capture_child_tasks=True))
        else:
            options.update(num_gpus=self.num_gpus)
        actor_class = ray.remote(WorkerReplica).options(**options)
        actor = cast("ray.actor.ActorHandle[WorkerReplica]", actor_class.remote(self.worker_settings))
        self.active.append(Replica(actor=actor, name=name, placement_group=group))

    def _stopped(self, replica: Replica) -> None:
        """The replica is gone for good: its engine's GPUs go back to the cluster."""
        ray.kill(replica.actor, no_restart=True)
        if replica.placement_group is not None:
            remove_placement_group(replica.placement_group)

    def _drain(self, replica: Replica) -> None:
        log.info("fleet %s: draining replica %s", self.teacher, replica.name)
        self.draining[replica.actor.drain.remote()] = replica

    def _reap_drained(self) -> None:
        if not self.draining:
            return
        done, _ = ray.wait(list(self.draining), num_returns=len(self.draining), timeout=0)
        for ref in done:
            replica = self.draining.pop(ref)
            try:
                ray.get(ref)
            except RayActorError:
                pass  # it died while draining: its leases expire, as any dead worker's do
            self._stopped(replica)
            log.info("fleet %s: replica %s drained and stopped", self.teacher, replica.name)

    def _reap_dead(self) -> None:
        """Ping every replica; one whose ping fails for good is dead (restart budget spent, or
        killed without restart) and leaves the pool, so the policy starts another in its place.
        A ping still waiting means starting or restarting: it keeps its place."""
        for replica in self.active:
            if replica.ping is None:
                replica.ping = replica.actor.ping.remote()
        pings = [r.ping for r in self.active]
        if not pings:
            return
        done, _ = ray.wait(pings, num_returns=len(pings), timeout=0)
        dead = []
        for replica in [r for r in self.active if r.ping in done]:
            try:
                ray.get(replica.ping)  # type: ignore[arg-type]  # in `done`: a ping was sent
            except ActorDiedError as exc:
                if not _restarting(exc):
                    dead.append(replica)
            except RayActorError:
                pass  # unavailable for now (restarting, a network blip): ask again next time
            replica.ping = None
        for replica in dead:
            log.warning("fleet %s: replica %s is dead; starting another", self.teacher, replica.name)
            self._stopped(replica)  # should Ray have restarted it after all: no orphan
            self.active.remove(replica)
            self.replaced += 1

    def shutdown(self, timeout_s: float) -> None:
        """Drain every replica (stop claiming, finish or release), then stop them."""
        for replica in list(self.active):
            self._drain(replica)
        self.active.clear()
        deadline = time.monotonic() + timeout_s
        while self.draining and time.monotonic() < deadline:
            self._reap_drained()
            time.sleep(0.2)
        for replica in self.draining.values():
            self._stopped(replica)
        self.draining.clear()


def _restarting(exc: ActorDiedError) -> bool:
    """An in-flight call fails with ActorDiedError also when Ray is about to restart the actor;
    only the actor's own state says whether it is gone for good."""
    actor_id = getattr(exc, "actor_id", None)
    if not actor_id:
        return False
    try:
        info = ray._private.state.actors(actor_id)  # the GCS's record; no dashboard needed
    except Exception:
        return False
    return (info or {}).get("State") in ("RESTARTING", "PENDING_CREATION", "DEPENDENCIES_UNREADY", "ALIVE")


class Fleet:
    """The controller: every `fleet_interval_s`, read each teacher's outstanding work and resize its pool."""

    def __init__(self, rt: Runtime, settings: FleetSettings, teachers: list[str]) -> None:
        self.rt = rt
        self.settings = settings
        self.pools = {name: self._pool(name) for name in teachers}

    def _pool(self, name: str) -> ReplicaPool:
        teacher = self.rt.teachers.get(name)
        gpus = self.settings.gpus_per_replica
        return ReplicaPool(
            teacher=teacher.name, worker_settings=self.settings.replica_settings(teacher.name, self.rt.database_url),
            policy=self.settings.policy(),
            num_gpus=teacher.spec.gpus_per_engine() if gpus is None else gpus,
            num_cpus=self.settings.cpus_per_replica, max_restarts=self.settings.replica_max_restarts,
            runtime_env=remote_key_env(teacher.spec), engine_on_ray_workers=teacher.spec.engine_on_ray_workers)

    def pending(self, teacher: str) -> PendingWork | None:
        try:
            with transaction(self.rt.sessions) as db:
                return TaskRepository(db).pending_by_teacher(teacher, self.pools[teacher].policy.cap())
        except Exception:
            log.exception("fleet %s: could not read the queue; keeping the pool as it is", teacher)
            return None

    def tick(self) -> dict[str, int]:
        """One controller pass; returns each pool's size."""
        now = time.monotonic()
        for teacher, pool in self.pools.items():
            work = self.pending(teacher)
            if work is not None:
                pool.reconcile(work, now)
        return {teacher: pool.size for teacher, pool in self.pools.items()}

    def run(self, stopping: threading.Event) -> None:
        try:
            while not stopping.is_set():
                self.tick()
                stopping.wait(self.settings.fleet_interval_s)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(self.settings.drain_s + 30)


def remote_key_env(spec: TeacherSpec) -> dict[str, Any] | None:
    """A remote teacher's API key travels to its replicas (on other nodes) in the actor's
    environment, from the fleet's: the registry names the variable, never the key."""
    name = spec.remote.api_key_env if spec.is_remote else None
    if name and os.environ.get(name):
        return {"env_vars": {name: os.environ[name]}}
    return None


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` (`auto`, `ray://...`), or RAY_ADDRESS's, or start a local one."""
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)


def run_fleet(settings: FleetSettings, teachers: list[str]) -> None:
    """The `teachercache fleet` command: migrate, join Ray, run the controller until SIGTERM or
    SIGINT, then drain every replica."""
    from service.migrate import upgrade_on_start
    from workers.main import stop_on_signals

    rt = Runtime.from_settings(settings)
    for name in teachers:
        rt.teachers.get(name)  # NotFound before the database or Ray is touched
    upgrade_on_start(rt.database_url, settings.db_startup_wait_s)
    connect(settings.ray_address)
    stopping = stop_on_signals()  # after ray.init, whose own handlers would abort the process instead
    fleet = Fleet(rt, settings, teachers)
    log.info("fleet: pools for %s, %d..%d replicas each, every %.1f s", ", ".join(fleet.pools),
             settings.min_replicas, settings.max_replicas, settings.fleet_interval_s)
    fleet.run(stopping)
