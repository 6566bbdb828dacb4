"""The fleet on a real local Ray cluster (2 CPUs, loopback), with scripted engines and a real
Postgres: pools scale from zero when work arrives and back to zero when the queue stays empty,
a killed replica (with and without restart budget) loses nothing, two teachers' pools follow
their own work only, and scale-down during work counts no attempt against any request.

One Ray cluster serves the module; every Ray process is gone at teardown.
"""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from service.settings import PROJECT_ROOT, ServiceSettings
from tests.jobs import download_rows, wait_for

ray = pytest.importorskip("ray", reason="the fleet needs the optional extra teachercache[ray]")

from workers.fleet.ray_pool import Fleet  # noqa: E402  (after the importorskip)
from workers.fleet.settings import FleetSettings  # noqa: E402

TEACHER = "smollm2-135m-instruct"
OTHER = "smollm2-copy"  # a second teacher on the same weights: its own queue, its own pool
# A teacher declared as spanning nodes (vLLM's Ray executor, 2 x 2 GPUs); the scripted engine
# stands in for vLLM, so what is tested is the fleet's placement of it, on the cluster's 4
# declared GPUs (no device is touched).
SPANNING = "smollm2-spanning"
DECLARED_GPUS = 4
INTERVAL_S = 0.5


def ray_processes() -> list:
    import psutil

    names = ("raylet", "gcs_server", "ray::", "dashboard", "plasma", "log_monitor", "runtime_env")
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any(n in " ".join(proc.cmdline()) for n in names):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, num_gpus=DECLARED_GPUS, include_dashboard=False, namespace="teachercache-tests",
             log_to_driver=False)
    yield
    ray.shutdown()
    deadline = time.monotonic() + 30
    while ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = ray_processes()
    for proc in left:
        proc.kill()
    assert not left, f"Ray processes left after shutdown: {[p.cmdline()[:2] for p in left]}"


@pytest.fixture
def settings(tmp_path, database_url) -> ServiceSettings:
    teachers = tmp_path / "teachers.yaml"
    model = PROJECT_ROOT / "models" / TEACHER
    teachers.write_text(f"teachers:\n  - name: {OTHER}\n    model: {model}\n"
                        "    max_model_len: 2048\n    max_top_logprobs: 20\n    dtype: float32\n"
                        f"  - name: {SPANNING}\n    model: {model}\n    max_model_len: 2048\n"
                        "    tensor_parallel_size: 2\n    pipeline_parallel_size: 2\n"
                        "    distributed_executor_backend: ray\n")
    return ServiceSettings(database_url=database_url, state_dir=tmp_path / "state", models_dir=PROJECT_ROOT / "models",
                           teachers_file=teachers, finalizer_poll_s=0.1)


def fleet_settings(rt, **overrides) -> FleetSettings:
    values = {**rt.settings.model_dump(), "engine": "scripted", "scripted_step_delay_s": 0.05,
              "lease_s": 3.0, "max_inflight": 4, "max_inflight_tokens": 100_000, "flush_s": 0.2,
              "claim_poll_s": 0.1, "drain_s": 5.0, "fleet_interval_s": INTERVAL_S, "requests_per_replica": 4,
              "min_replicas": 0, "max_replicas": 2, "scale_down_after_s": 1.0, "idle_s": 2.0,
              "cpus_per_replica": 0, "gpus_per_replica": 0, **overrides}
    return FleetSettings(**values)


class RunningFleet:
    """The controller in a thread of the test process; every size it set is recorded."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.stopping = threading.Event()
        self.sizes: list[dict[str, int]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopping.is_set():
                self.sizes.append(self.fleet.tick())
                self.stopping.wait(self.fleet.settings.fleet_interval_s)
        finally:
            self.fleet.shutdown()

    def size(self, teacher: str = TEACHER) -> int:
        return self.fleet.pools[teacher].size

    def wait_size(self, predicate, timeout: float, teacher: str = TEACHER) -> float:
        """Seconds until the pool's size satisfies `predicate`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if predicate(self.size(teacher)):
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"pool {teacher} stayed at {self.size(teacher)} replicas for {timeout} s")

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(120)


@pytest.fixture
def start_fleet(rt):
    started: list[RunningFleet] = []

    def start(teachers=(TEACHER,), **overrides) -> RunningFleet:
        running = RunningFleet(Fleet(rt, fleet_settings(rt, **overrides), list(teachers)))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
    assert not ray.util.list_named_actors(all_namespaces=True), "replicas left running after the fleet stopped"


def batch(n: int, teacher: str = TEACHER, max_tokens: int = 8, tag: str = "") -> dict:
    return {"teacher": teacher, "top_logprobs": 3, "sampling": {"max_tokens": max_tokens},
            "requests": [{"custom_id": f"{tag}q{i}", "prompt_token_ids": [1, 2, 3, 100 + i]} for i in range(n)]}


def assert_every_request_once(api, job: dict, n: int) -> None:
    assert job["status"] == "succeeded", job
    assert job["counts"]["completed"] == n and job["counts"]["failed"] == 0
    rows = download_rows(api, job)
    assert sorted(r["custom_id"] for r in rows) == sorted({r["custom_id"] for r in rows})
    assert len(rows) == n and all(r["error"] is None for r in rows)


def task_attempts(rt) -> list[tuple[str, int, list]]:
    with rt.engine.connect() as db:
        return [tuple(row) for row in db.execute(sa.text("SELECT state, attempts, errors FROM tasks"))]


def tasks_in(rt, state: str) -> int:
    with rt.engine.connect() as db:
        return db.execute(sa.text("SELECT count(*) FROM tasks WHERE state = :s"), {"s": state}).scalar()


def lease_owners(rt) -> set[str]:
    with rt.engine.connect() as db:
        return set(db.execute(sa.text("SELECT DISTINCT lease_owner FROM tasks WHERE state = 'leased'")).scalars())


def test_pool_scales_from_zero_with_work_and_back_to_zero(api, rt, start_fleet):
    fleet = start_fleet()
    time.sleep(3 * INTERVAL_S)
    assert fleet.size() == 0, "no work, no replicas"
    job = api.post("/v1/jobs", json=batch(12)).json()
    # The controller reads the queue every interval: one pass after the job lands starts replicas.
    assert fleet.wait_size(lambda n: n >= 1, timeout=INTERVAL_S * 3) <= INTERVAL_S * 3
    job = wait_for(api, job["id"], timeout=180)
    assert_every_request_once(api, job, 12)
    assert max(s[TEACHER] for s in fleet.sizes) == 2, "12 outstanding tasks at 4 per replica ask for the maximum"
    # idle_s (2 s) without work, then drained to zero.
    fleet.wait_size(lambda n: n == 0, timeout=30)
    assert all(state == "done" and attempts == 1 and errors == [] for state, attempts, errors in task_attempts(rt))


@pytest.mark.parametrize("restart_budget", [0, 3], ids=["no-restart", "restarted"])
def test_killed_replica_loses_no_request(api, rt, start_fleet, restart_budget):
    fleet = start_fleet(min_replicas=1, max_replicas=1, scripted_step_delay_s=0.25,
                        replica_max_restarts=restart_budget)
    fleet.wait_size(lambda n: n == 1, timeout=10)
    n = 32
    job = api.post("/v1/jobs", json=batch(n, max_tokens=16)).json()
    # Kill it mid-job: some tasks done, others leased to it (in its engine or waiting there).
    deadline = time.monotonic() + 120
    while not (tasks_in(rt, "done") and lease_owners(rt)):
        assert tasks_in(rt, "done") < n and time.monotonic() < deadline, "no moment with work done and work held"
        time.sleep(0.05)
    pool = fleet.fleet.pools[TEACHER]
    victim = pool.active[0]
    ray.kill(victim.actor, no_restart=restart_budget == 0)
    job = wait_for(api, job["id"], timeout=240)
    assert_every_request_once(api, job, n)
    # Without a budget the pool replaced the dead replica; with one, Ray restarted it in place.
    assert pool.replaced == (1 if restart_budget == 0 else 0)
    states = task_attempts(rt)
    assert all(state == "done" for state, _, _ in states)
    # The killed replica's leases expired and were requeued without counting an attempt.
    assert any("lease lost" in str(errors) for _, _, errors in states), "nothing was held by the killed replica"
    assert all(attempts == 1 for _, attempts, _ in states), states


def test_two_teachers_scale_on_their_own_work(api, rt, start_fleet):
    fleet = start_fleet(teachers=(TEACHER, OTHER))
    job = api.post("/v1/jobs", json=batch(8, teacher=OTHER, tag="b")).json()
    fleet.wait_size(lambda n: n >= 1, timeout=INTERVAL_S * 3, teacher=OTHER)
    assert_every_request_once(api, wait_for(api, job["id"], timeout=180), 8)
    fleet.wait_size(lambda n: n == 0, timeout=30, teacher=OTHER)
    assert all(s[TEACHER] == 0 for s in fleet.sizes), "the idle teacher's pool never started a replica"
    assert max(s[OTHER] for s in fleet.sizes) >= 1


def test_scale_down_during_work_loses_nothing_and_counts_no_failed_attempt(api, rt, start_fleet):
    # Short drain: a draining replica releases what it has not finished, which must not count.
    fleet = start_fleet(max_replicas=2, scripted_step_delay_s=0.15, drain_s=0.3, scale_down_after_s=0.0)
    n = 40
    job = api.post("/v1/jobs", json=batch(n, max_tokens=16)).json()
    fleet.wait_size(lambda size: size == 2, timeout=10)
    # Scale down while both replicas hold leases: the policy is told a 1-replica maximum.
    deadline = time.monotonic() + 60
    while len(lease_owners(rt)) < 2:
        assert time.monotonic() < deadline, "the two replicas never held work at once"
        time.sleep(0.05)
    fleet.fleet.pools[TEACHER].policy.max_replicas = 1
    fleet.wait_size(lambda size: size == 1, timeout=5)
    job = wait_for(api, job["id"], timeout=240)
    assert_every_request_once(api, job, n)
    states = task_attempts(rt)
    assert all(state == "done" and errors == [] for state, _, errors in states), states
    assert all(attempts == 1 for _, attempts, _ in states), "a drained replica's release counted an attempt"


def test_fleet_command_serves_a_job_and_drains_on_sigterm(api, rt, settings):
    """`teachercache fleet` as an operator runs it, on the module's cluster (`--address`)."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "TEACHERCACHE_DATABASE_URL": rt.database_url, "TEACHERCACHE_STATE_DIR": str(settings.state_dir),
           "TEACHERCACHE_TEACHERS_FILE": str(settings.teachers_file), "TEACHERCACHE_FLEET_INTERVAL_S": "0.5",
           "TEACHERCACHE_CPUS_PER_REPLICA": "0", "TEACHERCACHE_FLUSH_S": "0.2", "TEACHERCACHE_IDLE_S": "1"}
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "teachercache", "fleet", "--teacher", OTHER, "--max-replicas", "1",
               "--gpus-per-replica", "0", "--engine", "scripted", "--address", address]
    fleet = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        job = api.post("/v1/jobs", json=batch(6, teacher=OTHER, tag="cli")).json()
        assert_every_request_once(api, wait_for(api, job["id"], timeout=180), 6)
    finally:
        fleet.send_signal(signal.SIGTERM)
        output, _ = fleet.communicate(timeout=120)
    assert fleet.returncode == 0, output
    assert "fleet: pools for smollm2-copy" in output
    assert not ray.util.list_named_actors(all_namespaces=True), "SIGTERM left replicas running"


def engine_groups() -> list[dict]:
    return [g for g in ray.util.placement_group_table().values() if g["name"].endswith("-engine")]


def test_a_teacher_spanning_nodes_runs_in_a_placement_group_of_its_gpus_given_back_after(api, rt, start_fleet):
    """vLLM's Ray executor places its workers in the placement group its caller runs in: the
    replica holds none of the GPUs itself, the group holds tensor x pipeline one-GPU bundles
    (PACKed on as few nodes as fit), and scaling down removes the group."""
    fleet = start_fleet(teachers=(SPANNING,), gpus_per_replica=None, max_replicas=1)
    job = api.post("/v1/jobs", json=batch(6, teacher=SPANNING, tag="s")).json()
    fleet.wait_size(lambda n: n == 1, timeout=INTERVAL_S * 4, teacher=SPANNING)
    [group] = [g for g in engine_groups() if g["state"] != "REMOVED"]
    assert group["strategy"] == "PACK"
    assert list(group["bundles"].values()) == [{"GPU": 1.0}] * DECLARED_GPUS
    assert_every_request_once(api, wait_for(api, job["id"], timeout=180), 6)
    fleet.wait_size(lambda n: n == 0, timeout=30, teacher=SPANNING)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("GPU", 0) < DECLARED_GPUS and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("GPU", 0) == DECLARED_GPUS, "the engine's GPUs were not given back"
    assert all(g["state"] == "REMOVED" for g in engine_groups())
