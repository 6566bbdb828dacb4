"""Postgres LISTEN/NOTIFY: a process learns at once that work appeared, instead of polling for it.

Two channels, one definition each:
- `JOBS_READY`: a job entered `finalizing` (all its requests ended, or it was cancelled); the
  payload is the job's id (migration 0021). Sent by the trigger `jobs_notify_ready` (migration
  0020), so every path that readies a job sends it. Finalizers listen to every payload; a
  request of the synchronous endpoints waits for its own jobs' (service/online/service.py).
- `TASKS_QUEUED`: tasks became claimable; the payload is their teacher, or empty for "any" (a
  release or a retry, rare). Sent by the queue's statements that make tasks pending
  (service/queue/repository.py), in their transaction: Postgres delivers it at commit.

A notification is a hint, never the record: waiters still look on their own, at a long interval,
so a dropped connection or a missed notification costs latency, never a request. A process holds
one listening connection (`Listener`), shared by its finalizer, its worker's claimer and its
waiting HTTP requests (`LoopEvent`: an event an asyncio task awaits); while it is down, waiters
fall back to their short polls (`Listener.connected`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable

import psycopg
import sqlalchemy as sa
from sqlalchemy import orm

log = logging.getLogger(__name__)

JOBS_READY = "teachercache_jobs_ready"
TASKS_QUEUED = "teachercache_tasks_queued"
CHANNELS = (JOBS_READY, TASKS_QUEUED)
ANY = ""  # the payload of a notification for every listener of its channel

NOTIFY_SQL = sa.text("SELECT pg_notify(:channel, :payload)")


def announce(session: orm.Session, channel: str, payload: str = ANY) -> None:
    """Send `channel` when the caller's transaction commits (Postgres folds duplicates)."""
    session.execute(NOTIFY_SQL, {"channel": channel, "payload": payload})


def libpq_url(url: str) -> str:
    """The SQLAlchemy URL (`postgresql+psycopg://`) as psycopg's own connect() takes it."""
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Listener:
    """One LISTEN connection, in a thread of its own, setting the events subscribed to a channel.

    An event subscribed with a payload is set by notifications with that payload or with ANY.
    On every (re)connection each event is set once: whatever was sent while the connection was
    down was missed, so every waiter looks once. The thread runs while something is subscribed:
    the last unsubscribe closes the connection (a process that stops its finalizer and worker
    holds none)."""

    def __init__(self, url: str, retry_s: float = 1.0, retry_max_s: float = 30.0) -> None:
        self.url = libpq_url(url)
        self.retry_s, self.retry_max_s = retry_s, retry_max_s
        self._subscribers: list[tuple[str, str | None, threading.Event]] = []
        self._lock = threading.Lock()
        self._stop: threading.Event | None = None  # the running thread's; None: no thread
        self._connected = threading.Event()

    @property
    def connected(self) -> bool:
        return self._stop is not None and self._connected.is_set()

    def subscribe(self, channel: str, event: threading.Event, payload: str | None = None) -> None:
        """Set `event` on each notification of `channel` (with `payload` or ANY, if given)."""
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}")
        with self._lock:
            self._subscribers.append((channel, payload, event))
            if self._stop is None:
                self._stop = threading.Event()
                threading.Thread(target=self._run, args=(self._stop,), name="listener", daemon=True).start()

    def unsubscribe(self, event: threading.Event) -> None:
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s[2] is not event]
            if not self._subscribers and self._stop is not None:
                self._stop.set()
                self._stop = None
                self._connected.clear()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def _notify(self, channel: str, payload: str) -> None:
        with self._lock:
            events = [e for c, p, e in self._subscribers
                      if c == channel and (p is None or payload == ANY or payload == p)]
        for event in events:
            event.set()

    def _wake_all(self) -> None:
        with self._lock:
            events: Iterable[threading.Event] = [e for _, _, e in self._subscribers]
        for event in events:
            event.set()

    def _run(self, stop: threading.Event) -> None:
        wait_s = self.retry_s
        while not stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
                    for channel in CHANNELS:
                        conn.execute(f"LISTEN {channel}")
                    if stop.is_set():
                        return
                    self._connected.set()
                    self._wake_all()
                    wait_s = self.retry_s
                    while not stop.is_set():
                        # timeout: come back to look at `stop`; psycopg raises if the server goes away.
                        for note in conn.notifies(timeout=1.0):
                            self._notify(note.channel, note.payload)
            except psycopg.Error as exc:
                if stop.is_set():
                    return
                if self._connected.is_set():
                    log.warning("notifications: the listening connection failed (%s); polling until it is back",
                                str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self._connected.clear()
                self._wake_all()  # waiters go back to their short polls now, not after their long wait
                stop.wait(wait_s)
                wait_s = min(wait_s * 2, self.retry_max_s)


class LoopEvent(threading.Event):
    """A subscriber event that an asyncio task can await: the listener's thread sets it, which
    also wakes the task on its loop. A waiting HTTP request holds one of these, not a thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self._woken = asyncio.Event()

    def set(self) -> None:
        super().set()
        try:
            self._loop.call_soon_threadsafe(self._woken.set)
        except RuntimeError:  # the loop closed (the process is stopping): nobody waits any more
            pass

    def clear(self) -> None:
        super().clear()
        self._woken.clear()  # only from the loop's own thread (the waiter's)

    async def wait_async(self, timeout: float) -> bool:
        """Until set or `timeout` seconds; whether it was set."""
        try:
            await asyncio.wait_for(self._woken.wait(), timeout)
        except TimeoutError:
            pass
        return self.is_set()
