"""The worker: keep one engine continuously fed, and index what it produces.

Four threads share a small amount of state (the tasks this worker holds and their fencing
tokens), so that claiming, lease renewal and Parquet writing overlap with generation:

- the engine thread (the caller's) adds claimed requests to the engine and steps it;
- the claimer keeps up to `max_inflight` tasks claimed, so the engine never waits for work;
- the writer turns finished results into result shards and indexes them, fenced by token;
- the heartbeat renews the leases still held and drops those another worker took over.

No database transaction is open while the engine runs: each claim, renewal and index is its
own short transaction.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import sqlalchemy as sa

from service.db import db_retry, is_transient, transaction
from service.jobs.finalizer import Finalizer
from service.notify import TASKS_QUEUED
from service.queue.repository import ClaimedTask, TaskRepository
from service.queue.workers import WorkerRepository
from service.results.index import index_result_shard, record_failure, release_tasks
from service.runtime import Runtime
from teachercache.shard_format import parquet_options, shard_metadata
from workers.engine import Engine, EngineResult
from workers.results import engine_request, result_table, warm_up
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass
class Holdings:
    """The tasks this worker holds, from claim until indexed, failed or released."""

    tasks: dict[str, ClaimedTask] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, claimed: list[ClaimedTask]) -> None:
        with self.lock:
            self.tasks.update({t.key: t for t in claimed})

    def tokens(self, keys: Iterable[str] | None = None) -> dict[str, int]:
        """Fencing tokens of the held tasks (of `keys` only, when given)."""
        with self.lock:
            if keys is None:
                return {k: t.lease_token for k, t in self.tasks.items()}
            return {k: self.tasks[k].lease_token for k in keys if k in self.tasks}

    def drop(self, keys: Iterable[str]) -> None:
        with self.lock:
            for key in keys:
                self.tasks.pop(key, None)

    def prompt(self, key: str) -> list[int]:
        with self.lock:
            return list(self.tasks[key].prompt_token_ids)

    def __len__(self) -> int:
        with self.lock:
            return len(self.tasks)

    def batch_count(self) -> int:
        """Held tasks of batch work (the room kept for interactive work is what they may not fill)."""
        with self.lock:
            return sum(not t.interactive for t in self.tasks.values())

    def any_interactive(self, keys: Iterable[str]) -> bool:
        with self.lock:
            return any(key in self.tasks and self.tasks[key].interactive for key in keys)

    def token_count(self) -> int:
        with self.lock:
            return sum(task_tokens(t) for t in self.tasks.values())


def interactive_share(limit: int, batch_limit: int | None, batch_share: float) -> int:
    """How many of a claim's `limit` places interactive tasks may take: all but `batch_share` of
    the places batch work could take too (`batch_limit`, None: all), so batch work still
    progresses however many interactive tasks wait, while the places only interactive work takes
    (the reserve, or a claim with no room for batch work) go to them whole: a trainer's batch is
    claimed at once, not in shrinking pieces over several claims."""
    shared = limit if batch_limit is None else min(batch_limit, limit)
    return max(1, limit - math.floor(shared * batch_share)) if limit else 0


class Admission:
    """Which held tasks the engine runs now (the engine thread's alone). Interactive tasks start
    at once; a batch task waits while interactive work runs unless fewer than `floor` batch tasks
    run (the batch share of max_inflight): batch sequences that end are not replaced, so a
    trainer's batch soon has the engine's steps and KV cache nearly to itself, and batch jobs
    still progress. With no interactive work running, every batch task starts at once."""

    def __init__(self, floor: int) -> None:
        self.floor = max(floor, 1)
        self.running: dict[str, bool] = {}  # key -> interactive
        self.interactive = 0
        self.waiting: deque[ClaimedTask] = deque()

    def offer(self, task: ClaimedTask) -> None:
        self.waiting.append(task)

    def ready(self) -> list[ClaimedTask]:
        """The tasks to add to the engine now, interactive ones first, and mark them running."""
        starting = [t for t in self.waiting if t.interactive]
        batch = [t for t in self.waiting if not t.interactive]
        room = len(batch) if not self.interactive and not starting else \
            max(self.floor - (len(self.running) - self.interactive), 0)
        starting += batch[:room]
        self.waiting = deque(batch[room:])
        for task in starting:
            self.running[task.key] = task.interactive
            self.interactive += task.interactive
        return starting

    def ended(self, key: str) -> None:
        """A task left the engine (finished, failed, aborted) or its lease was lost."""
        if key in self.running:
            self.interactive -= self.running.pop(key)
        elif any(t.key == key for t in self.waiting):  # a lost lease: it never started
            self.waiting = deque(t for t in self.waiting if t.key != key)


class StoragePause:
    """Claiming stops while storage refuses writes: new work would only fail to be stored too.

    Each failed check doubles the wait before the next (a full disk is not freed in seconds);
    the first write that succeeds ends the pause."""

    def __init__(self, backoff_s: float, max_s: float) -> None:
        self.backoff_s, self.max_s = backoff_s, max_s
        self.lock = threading.Lock()
        self.wait_s = 0.0  # 0: not paused
        self.next_check = 0.0

    def fault(self) -> float:
        with self.lock:
            self.wait_s = min(self.max_s, self.wait_s * 2) if self.wait_s else self.backoff_s
            self.next_check = time.monotonic() + self.wait_s
            return self.wait_s

    def cleared(self) -> bool:
        """End the pause; True when one was on."""
        with self.lock:
            was, self.wait_s = bool(self.wait_s), 0.0
            return was

    @property
    def paused(self) -> bool:
        return bool(self.wait_s)

    def check_due(self) -> bool:
        return self.paused and time.monotonic() >= self.next_check


def is_result_fault(exc: BaseException) -> bool:
    """An error caused by one result's content, not by storage or an unreachable database."""
    if isinstance(exc, OSError) or is_transient(exc):
        return False
    return isinstance(exc, (pa.ArrowException, sa.exc.DataError, sa.exc.StatementError, KeyError, ValueError,
                            OverflowError, TypeError))


def task_tokens(task: ClaimedTask) -> int:
    return len(task.prompt_token_ids) + len(task.response_token_ids or ())


def default_worker_id(teacher: str) -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{teacher}-{uuid.uuid4().hex[:6]}"


class WorkerLoop:
    def __init__(self, rt: Runtime, engine: Engine, settings: WorkerSettings, teacher_name: str,
                 stopping: threading.Event | None = None) -> None:
        self.rt = rt
        self.engine = engine
        self.settings = settings
        self.teacher = teacher_name
        self.worker_id = settings.worker_id or default_worker_id(teacher_name)
        self.held = Holdings()
        self.incoming: queue.Queue[ClaimedTask] = queue.Queue()
        self.lost: queue.Queue[str] = queue.Queue()
        # Interactive work first into the engine; batch work keeps its share (the engine thread's).
        self.admission = Admission(math.ceil(settings.max_inflight * settings.batch_share))
        self.finished: queue.Queue[EngineResult] = queue.Queue()
        self.stopping = stopping or threading.Event()  # stop claiming (SIGTERM, or the engine died)
        self._queued = threading.Event()  # tasks may have been queued for this teacher: claim now
        self.done = threading.Event()  # the engine thread has ended; writer drains and exits
        # Registered, listening (or polling, if Postgres's notifications are down) and claiming.
        self.ready = threading.Event()
        self.finalizer = Finalizer(rt, poll_s=rt.settings.finalizer_poll_s)
        self.engine_error: str | None = None
        self._db = db_retry(rt.settings.db_retry_attempts)
        self.storage_pause = StoragePause(settings.storage_backoff_s, settings.storage_backoff_max_s)
        self.storage_errors = 0  # reported with the engine's stats (/metrics)

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped; return the process exit code (non-zero when the engine died)."""
        self._register()
        self.rt.listener.subscribe(TASKS_QUEUED, self._queued, self.teacher)
        threads = [threading.Thread(target=f, name=f.__name__, daemon=True)
                   for f in (self._claimer, self._writer, self._heartbeat)]
        for thread in threads:
            thread.start()
        self.finalizer.start()
        self.rt.listener.wait_connected(self.settings.claim_poll_s)  # a job queued now wakes the claimer
        self.ready.set()
        code = self._engine_loop()
        self.done.set()
        for thread in threads:
            thread.join(timeout=self.settings.drain_s + 30)
        self._release_all(self.engine_error)
        self.rt.listener.unsubscribe(self._queued)
        self.finalizer.stop()
        self._unregister()
        return code

    def request_stop(self, *_: object) -> None:
        log.info("worker %s: stop requested, draining", self.worker_id)
        self.stopping.set()
        self._queued.set()  # the claimer stops waiting for work

    # -- the engine thread -----------------------------------------------------------------
    def _engine_loop(self) -> int:
        drain_deadline = None
        try:
            while True:
                self._feed_engine()
                if self.stopping.is_set():
                    drain_deadline = drain_deadline or time.monotonic() + self.settings.drain_s
                    if self._drained(drain_deadline):
                        return 0
                if self.engine.has_unfinished():
                    for result in self.engine.step():
                        self.admission.ended(result.key)
                        self.finished.put(result)
                else:
                    self._wait_for_work()
        except Exception as exc:
            log.exception("worker %s: the engine failed; releasing leases and exiting", self.worker_id)
            self.engine_error = f"the engine died: {type(exc).__name__}: {exc}"[:2000]
            self.stopping.set()
            return 1

    def _feed_engine(self) -> None:
        while not self.lost.empty():
            key = self.lost.get_nowait()
            self.engine.abort([key])
            self.admission.ended(key)
        while not self.incoming.empty():
            task = self.incoming.get_nowait()
            if self.stopping.is_set():
                continue  # released at exit, never started
            self.admission.offer(task)
        if self.stopping.is_set():
            self.admission.waiting.clear()  # released at exit, never started
        for task in self.admission.ready():
            self.engine.add(engine_request(task))

    def _wait_for_work(self) -> None:
        try:
            task = self.incoming.get(timeout=self.settings.claim_poll_s)
        except queue.Empty:
            return
        self.incoming.put(task)

    def _drained(self, deadline: float) -> bool:
        """After SIGTERM: done once nothing runs; past `drain_s`, abort (released at exit)."""
        if not self.engine.has_unfinished():
            return True
        if time.monotonic() > deadline:
            self.engine.abort(list(self.held.tokens()))
            return True
        return False

    # -- claimer ---------------------------------------------------------------------------
    def _claimer(self) -> None:
        low_water = max(1, self.settings.max_inflight // 2)
        suspect_turn = True
        while not self.stopping.is_set() and not self.done.is_set():
            if self.storage_pause.paused:
                self._check_storage()
                time.sleep(self.settings.claim_poll_s)
                continue
            if suspect_turn and self._suspect_waiting():
                # Stop claiming and drain, then run one suspect alone: under steady load a worker
                # never empties by itself, and suspects (and their jobs) would wait forever.
                if len(self.held):
                    time.sleep(self.settings.claim_poll_s)
                    continue
                suspect_turn = not self._run_one_suspect()  # then one turn of normal claiming
                continue
            suspect_turn = True
            room = self._room()
            # Claims are batched (at the low-water mark) while the worker is busy, except for the
            # interactive lane: a trainer's request is claimed at once, into the places kept for it.
            batched = len(self.held) <= low_water or room >= low_water
            limit = self._interactive_room(room)
            if limit:
                self._queued.clear()  # before the claim: tasks queued during it wake the next one
            claimed = self._claim(limit, batch_limit=room if batched else 0) if limit else []
            for task in claimed:
                self.incoming.put(task)
            if not claimed:
                self._wait_for_tasks(idle=bool(limit) and batched)

    def _wait_for_tasks(self, idle: bool) -> None:
        """Nothing claimed. `idle`: the queue had nothing this worker could take, so wait until
        Postgres says tasks were queued (an interactive one wakes it at once), at most
        claim_idle_poll_s; otherwise (waiting for room, or the listening connection is down)
        at most claim_poll_s."""
        listening = self.rt.listener.connected
        self._queued.wait(self.settings.claim_idle_poll_s if idle and listening else self.settings.claim_poll_s)

    def _check_storage(self) -> None:
        """While paused, try a small write when the backoff says so; success resumes claiming."""
        if not self.storage_pause.check_due():
            return
        probe = f".writable/{self.worker_id}"
        try:
            self.rt.storage.write_bytes(probe, b"ok")
            self.rt.storage.delete(probe)
        except OSError as exc:
            self.storage_errors += 1
            log.warning("worker %s: storage still refuses writes (%s); next check in %.1f s", self.worker_id,
                        exc, self.storage_pause.fault())
            return
        self._storage_resumed()

    def _storage_resumed(self) -> None:
        """A write succeeded (a check or a real shard): any storage pause is over."""
        if self.storage_pause.cleared():
            log.info("worker %s: storage accepts writes again; claiming resumed", self.worker_id)

    def _room(self) -> int:
        """How many more tasks to claim: bounded by count and, estimated from what is held, by tokens."""
        held, tokens = len(self.held), self.held.token_count()
        room = self.settings.max_inflight - held
        if held and tokens:
            room = min(room, (self.settings.max_inflight_tokens - tokens) * held // tokens)
        return max(room, 0) if held else max(room, 1)

    def _interactive_room(self, room: int) -> int:
        """Room for interactive work: `room` plus `interactive_reserve` places on top of
        `max_inflight` that batch work never takes, so a worker full of a batch job still takes a
        trainer's batch at once (the engine runs it beside the batch work)."""
        return max(room, self.settings.max_inflight + self.settings.interactive_reserve - len(self.held))

    def _run_one_suspect(self) -> bool:
        """A task that was in a dying engine runs alone: nothing else is claimed until it ends."""
        claimed = self._claim(1, suspect=True)
        for task in claimed:
            self.incoming.put(task)
        while claimed and len(self.held) and not self.stopping.is_set():
            time.sleep(self.settings.claim_poll_s)
        return bool(claimed)

    def _suspect_waiting(self) -> bool:
        try:
            with transaction(self.rt.sessions) as db:
                return TaskRepository(db).suspect_waiting(self.teacher)
        except Exception:
            log.exception("worker %s: could not look for suspect tasks", self.worker_id)
            return False

    def _claim(self, limit: int, suspect: bool = False, batch_limit: int | None = None) -> list[ClaimedTask]:
        interactive_limit = interactive_share(limit, batch_limit, self.settings.batch_share)

        @self._db
        def claim() -> list[ClaimedTask]:
            with transaction(self.rt.sessions) as db:
                claimed = TaskRepository(db).claim(self.teacher, self.worker_id, limit, self.settings.lease_s, suspect,
                                                   interactive_limit=interactive_limit, batch_limit=batch_limit)
            self.held.add(claimed)
            return claimed

        try:
            return claim()
        except Exception:
            log.exception("worker %s: claim failed", self.worker_id)
            return []

    # -- heartbeat -------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        interval = self.settings.lease_s * self.settings.renew_fraction
        while not self.done.wait(interval):
            try:
                self._db(self._renew)()
            except Exception:
                log.exception("worker %s: lease renewal failed", self.worker_id)

    def _renew(self) -> None:
        held = self.held.tokens()
        with transaction(self.rt.sessions) as db:
            kept = TaskRepository(db).renew(held, self.settings.lease_s)
            WorkerRepository(db).heartbeat(self.worker_id, self._stats())
        # Tasks the writer indexed (and dropped) since the snapshot are done, not lost.
        lost = (set(held) - kept) & set(self.held.tokens())
        if lost:
            log.warning("worker %s: lost %d leases to other workers", self.worker_id, len(lost))
            self.held.drop(lost)
            for key in lost:
                self.lost.put(key)

    # -- writer ----------------------------------------------------------------------------
    def _writer(self) -> None:
        buffer: list[EngineResult] = []
        first_at = 0.0
        while True:
            try:
                result = self.finished.get(timeout=0.05)
                first_at = first_at if buffer else time.monotonic()
                buffer.append(result)
            except queue.Empty:
                if self.done.is_set() and not buffer:
                    return
            if buffer and self._should_flush(buffer, first_at):
                self._flush(buffer)
                buffer = []

    def _should_flush(self, buffer: list[EngineResult], first_at: float) -> bool:
        rows = sum(max(1, len(r.samples)) for r in buffer)
        idle = self.finished.empty() and not self.engine.has_unfinished()
        # A synchronous request waits on an interactive task: its shard is written at once.
        return rows >= self.settings.result_shard_rows or time.monotonic() - first_at >= self.settings.flush_s \
            or idle or self.done.is_set() or self.held.any_interactive(r.key for r in buffer)

    def _flush(self, results: list[EngineResult]) -> None:
        failures = [r for r in results if r.error is not None]
        held = self.held.tokens([r.key for r in results])  # results of leases lost meanwhile are dropped
        successes = [r for r in results if r.error is None and r.key in held]
        try:
            if successes:
                self._index_isolated(successes)
                self._storage_resumed()
        except OSError as exc:  # storage, never the results' fault (database errors are not OSError)
            self._storage_failed(successes, exc)
        except Exception:
            log.exception("worker %s: indexing failed; the leases will expire and the work is retried",
                          self.worker_id)
        try:
            for failure in failures:
                self._db(self._record_failure)(failure)
        except Exception:
            log.exception("worker %s: recording failures failed; the leases will expire and the work is retried",
                          self.worker_id)
        self.held.drop(r.key for r in results)
        self.finalizer.wake()

    def _storage_failed(self, results: list[EngineResult], exc: OSError) -> None:
        """Storage refused the shard even after its quick retries (a full disk, a lost bucket):
        release the tasks without counting an attempt, so they wait for storage instead of
        expiring into attempts, and pause claiming until a write succeeds."""
        self.storage_errors += 1
        wait_s = self.storage_pause.fault()
        log.error("worker %s: storage write failed (%s: %s); releasing %d tasks without counting an attempt, "
                  "claiming paused (next check in %.1f s)", self.worker_id, type(exc).__name__, exc,
                  len(results), wait_s)
        self._release(self.held.tokens([r.key for r in results]), None)

    def _index_isolated(self, results: list[EngineResult]) -> None:
        """Index the batch as one shard; if that fails for something in the data (a token id past
        int32, a lease dropped meanwhile), index each result alone, so a bad result fails only its
        own task, with the reason. Storage and database outages are not the results' fault: they
        propagate, and the tasks are retried."""
        try:
            self._db(self._index)(results)
            return
        except Exception as exc:
            if not is_result_fault(exc):
                raise
            if len(results) == 1:
                self._fail_unstorable(results[0], exc)
                return
            log.warning("worker %s: a batch of %d results could not be indexed (%s: %s); indexing each alone",
                        self.worker_id, len(results), type(exc).__name__, exc)
        for result in results:
            try:
                self._db(self._index)([result])
            except Exception as exc:
                if not is_result_fault(exc):
                    raise
                self._fail_unstorable(result, exc)

    def _fail_unstorable(self, result: EngineResult, exc: Exception) -> None:
        log.warning("worker %s: result %s could not be stored: %s: %s", self.worker_id, result.key,
                    type(exc).__name__, exc)
        reason = f"the teacher's result could not be stored: {type(exc).__name__}: {exc}"[:2000]
        # Final: the teacher is seeded, so running it again gives the same unstorable output.
        self._db(self._record_failure)(EngineResult(key=result.key, error=reason), final=True)

    def _index(self, results: list[EngineResult]) -> None:
        """Write one result shard, then index it in one fenced transaction."""
        prompts = {r.key: self.held.prompt(r.key) for r in results}
        table, entries = result_table(results, prompts)
        path = f"results/{self.teacher}/{time.strftime('%Y%m%d')}/{uuid.uuid4().hex}.parquet"
        stored = self.rt.storage.write_table(path, table, shard_metadata(self.rt.teacher_metadata().get(self.teacher, {})),
                                             **parquet_options(table.schema))
        with transaction(self.rt.sessions) as db:
            kept = index_result_shard(db, self.teacher, stored, entries, self.held.tokens(prompts))
        if len(kept) < len(results):
            log.warning("worker %s: %d results discarded (lease lost)", self.worker_id, len(results) - len(kept))

    def _record_failure(self, result: EngineResult, final: bool = False) -> None:
        token = self.held.tokens([result.key]).get(result.key)
        if token is None:
            return
        with transaction(self.rt.sessions) as db:
            record_failure(db, result.key, token, result.error or "engine error", final=final)

    # -- registration and release ----------------------------------------------------------
    def _register(self) -> None:
        @self._db
        def register() -> None:
            with transaction(self.rt.sessions) as db:
                WorkerRepository(db).register(self.worker_id, self.teacher)
        register()
        warm_up()
        swept = self.rt.storage.sweep_temporary_files()
        log.info("worker %s serving %s (swept %d temporary files)", self.worker_id, self.teacher, swept)

    def _release_all(self, engine_error: str | None) -> None:
        self._release(self.held.tokens(), engine_error)

    def _release(self, held: dict[str, int], engine_error: str | None) -> None:
        """Give leases back: without an error the attempt is not counted; with one it is."""
        if not held:
            return
        try:
            with transaction(self.rt.sessions) as db:
                released = release_tasks(db, held, engine_error)
            log.info("worker %s: released %d leases", self.worker_id, len(released))
        except Exception:
            log.exception("worker %s: could not release leases; they will expire", self.worker_id)

    def _stats(self) -> dict[str, int]:
        return {**self.engine.stats(), "storage_errors": self.storage_errors}

    def _unregister(self) -> None:
        try:
            with transaction(self.rt.sessions) as db:
                WorkerRepository(db).stopped(self.worker_id, self._stats())
        except Exception:
            log.exception("worker %s: could not record its stop", self.worker_id)
