"""The connection pool: psycopg2's ThreadedConnectionPool API, with internals made right.

Django-free: usable (and tested) on its own.

Lock discipline
---------------
Each pool has one ``threading.Lock``, ``_lock``. It guards every mutable
attribute of the pool: ``_idle``, ``_used``, ``_keys``, ``_nconns``,
``_waiters``, ``_stats``, ``closed``, ``_refill_after``, ``_refilling``,
``_refill_failures``, ``_deadlines``, ``_wait_counts`` and ``_reconnected_at``
(a float also read without it: a stale read only delays a retirement). It is
held only for
bookkeeping: never during a connect, a query, a reset or a close (network
I/O), so a slow server never blocks the threads that could be served from
idle connections. (The one system call made under it is a zero-timeout
``poll()`` of idle sockets during maintenance, which never blocks.)

A connection being opened, checked or closed is outside both ``_idle`` and
``_used`` but still counted in ``_nconns``: its *slot* is reserved, so the
pool never has more than ``maxconn`` connections, counting the ones being
opened. A connection being reset at return is still in ``_used`` (its
borrower's) until putconn() takes the lock once to hand it on: fewer lock
acquisitions mean fewer chances of a GIL switch while the lock is held,
which makes the next borrower block.

Waiters queue in FIFO order. A returned connection (or a freed slot) is
handed directly to the longest waiter under the lock, which then releases
that waiter's private lock. The returning thread cannot take it back, so no
waiter starves (with a shared Condition the returning thread usually wins
the race under the GIL).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import random
import socket
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import psycopg2
import psycopg2.extensions as ext
import psycopg2.pool

from . import maintenance
from .errors import PoolClosed, PoolTimeout, TooManyRequests
from .probe import input_probe
from .session import Baseline, PooledConnection, reset_session

__all__ = ["STATS_KEYS", "ConnectionPool"]

logger = logging.getLogger("django_pgpool")

# Counters (psycopg_pool's names, plus a few of our own).
REQUESTS_NUM = "requests_num"
REQUESTS_QUEUED = "requests_queued"
REQUESTS_WAIT_MS = "requests_wait_ms"
REQUESTS_ERRORS = "requests_errors"
REQUESTS_TIMEOUTS = "requests_timeouts"
USAGE_MS = "usage_ms"
RETURNS_BAD = "returns_bad"
RETURNS_RESET = "returns_reset"
CONNECTIONS_NUM = "connections_num"
CONNECTIONS_MS = "connections_ms"
CONNECTIONS_ERRORS = "connections_errors"
CONNECTIONS_LOST = "connections_lost"
CONNECTIONS_EXPIRED = "connections_expired"
CONNECTIONS_CLOSED = "connections_closed"
CONNECTIONS_RECLAIMED = "connections_reclaimed"
CONNECTIONS_LEAKED = "connections_leaked"

#: Every figure get_stats() returns, in display order: gauges, then counters.
GAUGE_KEYS = (
    "pool_min",
    "pool_max",
    "pool_size",
    "pool_available",
    "pool_in_use",
    "requests_waiting",
)
COUNTER_KEYS = (
    REQUESTS_NUM,
    REQUESTS_QUEUED,
    REQUESTS_WAIT_MS,
    REQUESTS_ERRORS,
    REQUESTS_TIMEOUTS,
    USAGE_MS,
    RETURNS_BAD,
    RETURNS_RESET,
    CONNECTIONS_NUM,
    CONNECTIONS_MS,
    CONNECTIONS_ERRORS,
    CONNECTIONS_LOST,
    CONNECTIONS_EXPIRED,
    CONNECTIONS_CLOSED,
    CONNECTIONS_RECLAIMED,
    CONNECTIONS_LEAKED,
)
STATS_KEYS = GAUGE_KEYS + COUNTER_KEYS

#: Upper bounds (seconds) of the wait-time buckets of queued borrowers.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)

# Waits at least this long are logged as warnings.
SLOW_WAIT_MS = 1000

# How long the background refill waits after a failed connect.
REFILL_BACKOFF = 2.0
# Relative jitter on max_lifetime, so connections opened together don't expire together.
LIFETIME_JITTER = 0.05


class _ForkGate:
    """Keep fork() out of connects: a child forked while another thread was
    inside libpq's connect inherits libpq's and OpenSSL's internal locks held,
    and its own first connect then blocks forever.

    Connects hold the gate shared; fork() (``before`` hook) waits until none
    is in progress, at most FORK_WAIT seconds, and holds new ones back until
    it has happened. ``_cond`` guards ``_active`` and ``_forking``.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._forking = False

    @contextlib.contextmanager
    def connecting(self) -> Iterator[None]:
        with self._cond:
            while self._forking:
                self._cond.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def before_fork(self) -> None:
        with self._cond:
            self._forking = True
            self._cond.wait_for(lambda: self._active == 0, timeout=FORK_WAIT)

    def after_fork_in_parent(self) -> None:
        with self._cond:
            self._forking = False
            self._cond.notify_all()


FORK_WAIT = 15.0
_fork_gate = _ForkGate()


# Named functions, not bound methods: the child replaces _fork_gate.
def _gate_before_fork() -> None:
    _fork_gate.before_fork()


def _gate_after_fork_in_parent() -> None:
    _fork_gate.after_fork_in_parent()


def _gate_after_fork_in_child() -> None:
    global _fork_gate
    _fork_gate = _ForkGate()  # the parent's may be held: start afresh


os.register_at_fork(
    before=_gate_before_fork,
    after_in_parent=_gate_after_fork_in_parent,
    after_in_child=_gate_after_fork_in_child,
)


class _Waiter:
    """A caller in line. The pool fills in ``conn``, ``granted`` or ``error``
    under the pool lock, then calls ``wake()``; only the waiter reads them."""

    __slots__ = ("_ready", "conn", "error", "granted", "since", "thread")

    def __init__(self, since: float) -> None:
        self._ready = threading.Lock()
        self._ready.acquire()
        self.since = since
        self.thread = threading.current_thread()
        self.conn: PooledConnection | None = None
        self.granted = False  # a slot to open a new connection in
        self.error: BaseException | None = None

    @property
    def served(self) -> bool:
        return self.conn is not None or self.granted or self.error is not None

    def wait(self, timeout: float) -> bool:
        return self._ready.acquire(timeout=max(timeout, 0.0))

    def wake(self) -> None:
        self._ready.release()


def _has_pending_input(conn: PooledConnection) -> bool:
    """Return True if an idle connection's socket is readable: the server spoke
    (an idle session only hears from it on a fatal error) or closed it."""
    probe = conn.input_probe
    if probe is None:
        # Kept per connection: only the thread holding the connection calls it.
        probe = conn.input_probe = input_probe(conn.fileno())
    return probe()


def _orphaned(conn: PooledConnection) -> bool:
    """Return True if the thread that borrowed ``conn`` is gone and shared it with no one."""
    borrower = conn.borrower
    if borrower is None or borrower.is_alive():
        return False
    return not (conn.shared is not None and conn.shared())


def _why(reason: str | None, closing: bool) -> str:
    """Say in words why a connection was closed, for the DEBUG log."""
    if reason is not None:
        return {RETURNS_BAD: "broken or failed its reset"}.get(
            reason, reason.removeprefix("connections_")
        )
    return "pool closed" if closing else "surplus idle"


def _cut_off(conn: PooledConnection) -> None:
    """Shut a connection's socket down, so a read blocked on it ends at once."""
    try:
        duplicate = socket.socket(fileno=os.dup(conn.fileno()))
    except (OSError, psycopg2.Error):
        return
    try:
        duplicate.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        duplicate.close()


def _close_quietly(conn: PooledConnection) -> None:
    with contextlib.suppress(Exception):  # a broken connection may fail to say goodbye
        conn.close()


class ConnectionPool(psycopg2.pool.ThreadedConnectionPool):
    """A thread-safe, fork-safe pool with waiting, health checks and session reset.

    ``ConnectionPool(minconn, maxconn, *args, **kwargs)`` like psycopg2's pool:
    ``args`` and ``kwargs`` go to ``psycopg2.connect()``. The pool's own knobs
    are keyword-only. Connections are opened lazily, never in ``__init__``.
    """

    def __init__(
        self,
        minconn: int,
        maxconn: int,
        *args: Any,
        name: str = "pool",
        timeout: float = 30.0,
        max_waiting: int = 0,
        max_lifetime: float = 3600.0,
        max_idle: float = 600.0,
        check_after: float = 1.0,
        reset: str = "auto",
        leak_timeout: float | None = None,
        configure: Callable[[PooledConnection], None] | None = None,
        **kwargs: Any,
    ) -> None:
        # psycopg2's __init__ is not called: it opens minconn connections at
        # once. We set the attributes its public API exposes ourselves.
        for label, value, low in (("minconn", minconn, 0), ("maxconn", maxconn, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{label} must be an integer >= {low}, not {value!r}")
        if minconn > maxconn:
            raise ValueError(f"minconn ({minconn}) must not be greater than maxconn ({maxconn})")
        if reset not in ("auto", "always"):
            raise ValueError(f"reset must be 'auto' or 'always', not {reset!r}")
        self.minconn = minconn
        self.maxconn = maxconn
        self.name = name
        self.timeout = timeout
        self.max_waiting = max_waiting
        self.max_lifetime = max_lifetime
        self.max_idle = max_idle
        self.check_after = check_after
        self.reset = reset
        self.leak_timeout = leak_timeout
        self._configure = configure

        factory = kwargs.get("connection_factory") or PooledConnection
        if not issubclass(factory, PooledConnection):
            raise TypeError("connection_factory must be a subclass of PooledConnection")
        kwargs["connection_factory"] = factory
        self._args = args
        self._kwargs = kwargs

        self._init_state()
        maintenance.register(self)

    def _init_state(self) -> None:
        """Set up empty bookkeeping (at creation, and in a forked child)."""
        self._lock = threading.Lock()
        self.closed = False
        self._pid = os.getpid()
        self._idle: deque[PooledConnection] = deque()  # most recently returned last
        self._used: dict[int, PooledConnection] = {}  # id(conn) -> conn, checked out
        self._keys: dict[Hashable, PooledConnection] = {}  # psycopg2's getconn(key) API
        self._nconns = 0  # idle + used + being opened/checked/reset/closed
        self._waiters: deque[_Waiter] = deque()
        self._stats: Counter[str] = Counter()
        self._refill_after = 0.0
        self._refilling = False  # a refill thread is running
        self._refill_failures = 0  # in a row: sets the backoff
        # Round trips under way outside the lock (health checks, resets), by
        # id(conn): (conn, deadline). Maintenance cuts off the overdue ones.
        self._deadlines: dict[int, tuple[PooledConnection, float]] = {}
        # How long queued borrowers waited: counts per WAIT_BUCKETS upper bound
        # (the last one is +Inf). Borrowers served at once are not counted here.
        self._wait_counts = [0] * (len(WAIT_BUCKETS) + 1)
        # Connections opened before this (monotonic) time are retired: closed
        # at return or borrow instead of being reused (reconnect()).
        self._reconnected_at = 0.0

    # -- logging -------------------------------------------------------------

    def _log(self, level: int, message: str, *args: Any) -> None:
        """Log with the pool's name and the process id, in the text and on the record."""
        if logger.isEnabledFor(level):
            pid = os.getpid()
            logger.log(
                level,
                "pool %s (pid %d): " + message,
                self.name,
                pid,
                *args,
                extra={"pool": self.name, "pid": pid},
            )

    # -- borrowing -----------------------------------------------------------

    def getconn(self, key: Hashable | None = None) -> PooledConnection:
        """Return a healthy connection, waiting up to ``timeout`` seconds for one."""
        if key is not None:
            with self._lock:
                conn = self._keys.get(key)
            if conn is not None:
                return conn
        started = time.monotonic()
        conn = self._take(started)
        while True:
            if conn is not None:
                problem = self._problem(conn, started + self.timeout)
                if problem is None:
                    break
                # Dead or expired: close it and open a new one in its slot.
                _close_quietly(conn)
                with self._lock:
                    del self._used[id(conn)]
                    self._stats[problem] += 1
                    self._stats[CONNECTIONS_CLOSED] += 1
                self._log(
                    logging.DEBUG,
                    "%s connection closed at borrow",
                    problem.removeprefix("connections_"),
                )
            conn = self._open_in_reserved_slot()
            with self._lock:
                self._used[id(conn)] = conn
        conn.borrowed_at = time.monotonic()
        conn.borrower = threading.current_thread()
        conn.leak_reported = False
        conn.shared = None
        if self.leak_timeout is not None:
            # Costly (tens of µs), so only when leak detection is on.
            conn.borrow_stack = "".join(traceback.format_stack(limit=30)[:-1])
        if key is not None:
            with self._lock:
                self._keys[key] = conn
        return conn

    def _take(self, started: float) -> PooledConnection | None:
        """Take an idle connection, or reserve a slot (return None), waiting in line if needed."""
        with self._lock:
            self._stats[REQUESTS_NUM] += 1
            if self.closed:
                raise PoolClosed(f"connection pool {self.name} is closed")
            if not self._waiters:
                if self._idle:
                    conn = self._idle.pop()
                    self._used[id(conn)] = conn
                    return conn
                if self._nconns < self.maxconn:
                    self._nconns += 1
                    return None
            if self.max_waiting and len(self._waiters) >= self.max_waiting:
                self._stats[REQUESTS_ERRORS] += 1
                raise TooManyRequests(
                    f"couldn't get a connection for {self.name}: {len(self._waiters)} requests "
                    f"are already waiting (max_waiting={self.max_waiting}, maxconn="
                    f"{self.maxconn}, {len(self._used)} in use); raise OPTIONS['max_waiting'] "
                    "or OPTIONS['maxconn'], or return connections sooner"
                )
            waiter = _Waiter(started)
            self._waiters.append(waiter)
            self._stats[REQUESTS_QUEUED] += 1
            # A thread died holding a connection: maintenance frees its slot,
            # which goes to the longest waiter (maybe this one). Looked for by
            # the first in line only: the scan calls is_alive() on every
            # borrower under the lock (4.5 µs for 16), and at 32 threads on 16
            # connections every borrow queues; a longer queue is being served,
            # and the maintenance round finds orphans within INTERVAL anyway.
            if len(self._waiters) == 1 and any(_orphaned(c) for c in self._used.values()):
                maintenance.wake()

        if not waiter.wait(self.timeout - (time.monotonic() - started)):
            # Before giving up: a borrower thread may have died since the last
            # maintenance round; its slot would go to the longest waiter.
            self._close_and_release(self._reclaim_orphans())
            with self._lock:
                if not waiter.served:
                    self._waiters.remove(waiter)
                    self._record_wait_locked(waiter, time.monotonic())
                    self._stats[REQUESTS_ERRORS] += 1
                    self._stats[REQUESTS_TIMEOUTS] += 1
                    message = self._timeout_message_locked()
            if not waiter.served:
                self._log(logging.ERROR, "%s", message)
                raise PoolTimeout(message)
        # Served: whoever served this waiter recorded its wait under the lock,
        # so a woken waiter doesn't take the lock again (at 32 threads on 16
        # connections every borrow queues, and each acquisition is a chance
        # of a GIL switch while the lock is held).
        if waiter.error is not None:
            raise waiter.error
        waited = time.monotonic() - started
        if waited * 1000 >= SLOW_WAIT_MS:
            self._log(
                logging.WARNING,
                "waited %.1f s for a connection (maxconn=%d); consider raising maxconn",
                waited,
                self.maxconn,
            )
        return waiter.conn

    def _record_wait_locked(self, waiter: _Waiter, now: float) -> None:
        """Count how long ``waiter`` waited, once: when served or given up. Lock held."""
        waited = now - waiter.since
        self._stats[REQUESTS_WAIT_MS] += int(waited * 1000)
        self._wait_counts[bisect.bisect_left(WAIT_BUCKETS, waited)] += 1

    def _timeout_message_locked(self) -> str:
        """Say why a borrow timed out and what to change. Lock held."""
        opening = self._nconns - len(self._used) - len(self._idle)
        if opening and not self._used:
            advice = "the server may be slow or unreachable"
        else:
            advice = "raise OPTIONS['maxconn'] or OPTIONS['timeout'], or return connections sooner"
        return (
            f"couldn't get a connection for {self.name} after {self.timeout:.1f} s "
            f"(maxconn={self.maxconn}, {len(self._used)} in use, "
            + (f"{opening} being opened or checked, " if opening else "")
            + f"{len(self._waiters)} waiting); {advice}"
        )

    @contextlib.contextmanager
    def _deadline(self, conn: PooledConnection, seconds: float) -> Iterator[None]:
        """Bound a round trip on ``conn``: past the deadline, maintenance cuts its socket.

        psycopg2 can't time out a query on a link that stalls; shutting the
        socket down makes libpq's read end at once with an error.
        """
        seconds = max(seconds, 0.1)
        with self._lock:
            self._deadlines[id(conn)] = (conn, time.monotonic() + seconds)
        if seconds < maintenance.INTERVAL:
            maintenance.wake()  # its next round would come too late for this one
        try:
            yield
        finally:
            with self._lock:
                self._deadlines.pop(id(conn), None)

    def next_deadline(self) -> float | None:
        """Return when the earliest round trip under way is due to be cut off, if any."""
        with self._lock:
            return min((due for _, due in self._deadlines.values()), default=None)

    def _problem(self, conn: PooledConnection, deadline: float) -> str | None:
        """Return why ``conn`` can't be handed out (a stats key), or None if it can.

        Runs outside the lock: it may do a round trip.
        """
        if conn.closed:
            return CONNECTIONS_LOST
        now = time.monotonic()
        if self._retired(conn, now):
            return CONNECTIONS_EXPIRED
        try:
            # Free (no round trip): a backend that was terminated has said so.
            if _has_pending_input(conn):
                return CONNECTIONS_LOST
            if now - conn.returned_at <= self.check_after:
                return None
            # One round trip: outside autocommit psycopg2 would send BEGIN
            # first and the check would need a ROLLBACK after (three in all).
            # Switching autocommit on and back sends nothing while idle.
            in_transactions = not conn.autocommit
            if in_transactions:
                conn.autocommit = True
            try:
                with self._deadline(conn, deadline - now), conn.cursor() as cur:
                    cur.execute("SELECT 1")
            finally:
                if in_transactions and not conn.closed:
                    conn.autocommit = False
        except (psycopg2.Error, OSError):
            return CONNECTIONS_LOST
        return None

    def _retired(self, conn: PooledConnection, now: float) -> bool:
        """Return True if ``conn`` outlived max_lifetime or was opened before reconnect()."""
        return conn.expires_at <= now or conn.created_at < self._reconnected_at

    def _open_in_reserved_slot(self) -> PooledConnection:
        """Open a connection in a slot already counted in ``_nconns``."""
        try:
            conn = self._connect()
        except BaseException:
            with self._lock:
                self._stats[REQUESTS_ERRORS] += 1
                self._release_slot()
            raise
        with self._lock:
            closed = self.closed
            if closed:
                self._stats[CONNECTIONS_CLOSED] += 1
                self._release_slot()
        if closed:
            _close_quietly(conn)
            raise PoolClosed(f"connection pool {self.name} is closed")
        return conn

    def _connect(self) -> PooledConnection:
        """Open and configure a new connection (no lock held; the slot is reserved)."""
        started = time.monotonic()
        try:
            with _fork_gate.connecting():
                conn: PooledConnection = psycopg2.connect(*self._args, **self._kwargs)
            try:
                if self._configure is not None:
                    self._configure(conn)
                if conn.info.transaction_status != ext.TRANSACTION_STATUS_IDLE:
                    conn.rollback()
            except BaseException:
                _close_quietly(conn)
                raise
        except BaseException:
            with self._lock:
                self._stats[CONNECTIONS_ERRORS] += 1
            raise
        now = time.monotonic()
        conn.baseline = Baseline.capture(conn)
        conn.created_at = conn.returned_at = now
        conn.expires_at = now + self.max_lifetime * (1.0 - LIFETIME_JITTER * random.random())
        conn.pool_pid = self._pid
        with self._lock:
            self._stats[CONNECTIONS_NUM] += 1
            self._stats[CONNECTIONS_MS] += int((now - started) * 1000)
        self._log(logging.DEBUG, "connection opened in %.1f ms", (now - started) * 1000)
        return conn

    # -- returning -----------------------------------------------------------

    def putconn(  # type: ignore[override]
        self,
        conn: PooledConnection,  # type: ignore[override]
        key: Hashable | None = None,
        close: bool = False,
    ) -> None:
        """Give ``conn`` back. Broken connections are discarded, never raised about.

        ``close=True`` closes it instead of keeping it. Returning a connection
        this pool did not lend (or lent and got back already) raises PoolError.
        """
        if getattr(conn, "pool_pid", self._pid) != self._pid:
            # Inherited through fork(): the parent owns the session.
            detach_inherited(conn)
            return
        conn_id = id(conn)
        # Reset before taking the lock, so that a return takes it once: under
        # the GIL, every acquisition is a chance that the holder is switched
        # out inside it and the next borrower blocks (a thread switch each).
        # Only while the connection is checked out from here (a dict read is
        # atomic): a foreign or twice-returned one is refused below, untouched.
        # The lock's check below is the one that counts.
        outcome = None  # None: not reset; else the reset's result
        reset_counts = False
        if not (close or self.closed or conn.reclaimed) and self._used.get(conn_id) is conn:
            if self._retired(conn, time.monotonic()):
                outcome = CONNECTIONS_EXPIRED
            else:
                reset_counts = conn.session_dirty or self.reset == "always"
                kept = reset_session(
                    conn,
                    always=self.reset == "always",
                    guard=lambda: self._deadline(conn, self.timeout),
                )
                outcome = "kept" if kept else RETURNS_BAD
        returned_at = time.monotonic()
        with self._lock:
            if conn.reclaimed:
                return  # closed already: its borrower's thread had exited
            if self._used.get(conn_id) is not conn:
                raise psycopg2.pool.PoolError(
                    f"connection returned to {self.name} is not checked out from it "
                    "(returned twice, or taken from another pool)"
                )
            del self._used[conn_id]
            # No longer this thread's: a handed-over connection must not look
            # orphaned if this thread exits before the waiter runs.
            conn.borrower = None
            if self._keys:
                if key is None:
                    key = next((k for k, c in self._keys.items() if c is conn), None)
                if key is not None:
                    self._keys.pop(key, None)
            self._stats[USAGE_MS] += int((returned_at - conn.borrowed_at) * 1000)
            closing = close or self.closed
            if outcome == "kept" and not closing:
                conn.returned_at = returned_at
                if reset_counts:
                    self._stats[RETURNS_RESET] += 1
                self._make_available(conn)
                return
            # Reserved for closing below: the slot stays counted until then.

        # Not kept: expired, failed its reset, or (not reset above: it wasn't
        # checked out from here a moment before) closed as a broken one.
        reason = None if closing else outcome or RETURNS_BAD
        _close_quietly(conn)
        self._log(logging.DEBUG, "connection closed at return (%s)", _why(reason, closing))
        with self._lock:
            if reason is not None:
                self._stats[reason] += 1
            self._stats[CONNECTIONS_CLOSED] += 1
            self._release_slot()

    def _make_available(self, conn: PooledConnection) -> None:
        """Hand ``conn`` to the longest waiter, else keep it idle. Lock held."""
        if self._waiters:
            waiter = self._waiters.popleft()
            self._used[id(conn)] = conn
            # The waiter's from now on (for status and dead-borrower checks).
            conn.borrower, conn.borrowed_at = waiter.thread, time.monotonic()
            self._record_wait_locked(waiter, conn.borrowed_at)
            waiter.conn = conn
            waiter.wake()
        else:
            self._idle.append(conn)

    def _release_slot(self) -> None:
        """Forget a closed connection's slot, or pass it to the longest waiter. Lock held."""
        self._nconns -= 1
        if self._waiters and not self.closed and self._nconns < self.maxconn:
            waiter = self._waiters.popleft()
            self._record_wait_locked(waiter, time.monotonic())
            waiter.granted = True
            self._nconns += 1
            waiter.wake()
        elif self._nconns < self.minconn and not self.closed:
            maintenance.wake()

    # -- closing -------------------------------------------------------------

    def reconnect(self) -> None:
        """Replace every connection, gracefully (PgBouncer's RECONNECT).

        Idle connections are closed now, borrowed ones when they are
        returned; the pool keeps serving with new connections meanwhile.
        """
        with self._lock:
            self._reconnected_at = time.monotonic()
            idle = list(self._idle)
            self._idle.clear()
        self._close_and_release([(conn, CONNECTIONS_EXPIRED) for conn in idle])
        maintenance.wake()  # refill minconn with new connections

    def activity(self) -> dict[str, Any]:
        """Return the stats plus what is going on right now (for status snapshots)."""
        now = time.monotonic()
        with self._lock:
            stats: dict[str, Any] = self._stats_locked()
            longest_wait = now - self._waiters[0].since if self._waiters else 0.0
            oldest = min(self._used.values(), key=lambda c: c.borrowed_at, default=None)
            retired = self._retired_in_use_locked()
            wait_buckets = list(self._wait_counts)
            oldest_checkout = (
                {
                    "age_s": round(now - oldest.borrowed_at, 3),
                    "thread": oldest.borrower.name if oldest.borrower else None,
                }
                if oldest is not None
                else None
            )
        return {
            **stats,
            "longest_wait_s": round(longest_wait, 3),
            "oldest_checkout": oldest_checkout,
            "retired_in_use": retired,
            "wait_buckets": wait_buckets,
        }

    def retired_in_use(self) -> int:
        """Return how many connections opened before the last reconnect() are still out."""
        with self._lock:
            return self._retired_in_use_locked()

    def _retired_in_use_locked(self) -> int:
        return sum(1 for c in self._used.values() if c.created_at < self._reconnected_at)

    def closeall(self) -> None:
        """Close idle connections now and the others as they are returned. Idempotent."""
        with self._lock:
            self.closed = True
            idle = list(self._idle)
            self._idle.clear()
            self._nconns -= len(idle)
            self._stats[CONNECTIONS_CLOSED] += len(idle)
            now = time.monotonic()
            for waiter in self._waiters:
                self._record_wait_locked(waiter, now)
                waiter.error = PoolClosed(f"connection pool {self.name} is closed")
                waiter.wake()
            self._waiters.clear()
        for conn in idle:
            _close_quietly(conn)

    # -- background maintenance (called by the maintenance thread) ------------

    def maintain(self) -> None:
        """Close expired and surplus idle connections, refill to minconn."""
        now = time.monotonic()
        to_close: list[tuple[PooledConnection, str | None]] = []
        with self._lock:
            if self._pid != os.getpid():
                return
            closed = self.closed
        if closed:
            # Borrowed connections close at return; those of dead threads never
            # will be returned.
            self._close_and_release(self._reclaim_orphans())
            return
        with self._lock:
            keep: deque[PooledConnection] = deque()
            surplus = self._nconns - self.minconn
            for conn in self._idle:  # oldest returned first
                if self._retired(conn, now):
                    to_close.append((conn, CONNECTIONS_EXPIRED))
                    surplus -= 1
                elif conn.closed or _has_pending_input(conn):
                    to_close.append((conn, CONNECTIONS_LOST))
                    surplus -= 1
                elif surplus > 0 and now - conn.returned_at > self.max_idle:
                    to_close.append((conn, None))
                    surplus -= 1
                else:
                    keep.append(conn)
            self._idle = keep
            deficit = 0
            if now >= self._refill_after and not self._refilling:
                deficit = max(0, self.minconn - self._nconns + len(to_close))
                deficit = min(deficit, self.maxconn - self._nconns)
                self._nconns += deficit
                self._refilling = deficit > 0
            overdue = [c for c, due in self._deadlines.values() if due <= now]
        for conn in overdue:
            _cut_off(conn)
            self._log(logging.WARNING, "a health check or reset overran its deadline; cut off")
        if deficit:
            # A thread of its own: a slow or unreachable server must not hold
            # up the maintenance of every other pool.
            threading.Thread(
                target=self._refill, args=(deficit,), name="django_pgpool-refill", daemon=True
            ).start()
        to_close.extend(self._reclaim_orphans())
        self._report_leaks(now)
        self._close_and_release(to_close)

    def _close_and_release(self, to_close: list[tuple[PooledConnection, str | None]]) -> None:
        """Close connections taken out of the pool (no lock held) and free their slots."""
        for conn, reason in to_close:
            _close_quietly(conn)
            self._log(logging.DEBUG, "connection closed (%s)", _why(reason, False))
            with self._lock:
                if reason is not None:
                    self._stats[reason] += 1
                self._stats[CONNECTIONS_CLOSED] += 1
                self._release_slot()

    def _refill(self, reserved: int) -> None:
        """Open connections in ``reserved`` slots; stop at the first failure."""
        try:
            for opened in range(reserved):
                try:
                    conn = self._connect()
                except Exception as exc:
                    with self._lock:
                        # Back off exponentially: a server that refuses us (wrong
                        # password, dropped database) must not be hammered.
                        self._refill_failures += 1
                        backoff = min(REFILL_BACKOFF * 2 ** (self._refill_failures - 1), 60.0)
                        self._refill_after = time.monotonic() + backoff
                        for _ in range(reserved - opened):
                            self._release_slot()
                    self._log(logging.WARNING, "couldn't open a connection: %s", exc)
                    return
                with self._lock:
                    self._refill_failures = 0
                    if not self.closed:
                        self._make_available(conn)
                        continue
                    self._stats[CONNECTIONS_CLOSED] += 1
                    self._release_slot()
                _close_quietly(conn)
        finally:
            with self._lock:
                self._refilling = False

    def _reclaim_orphans(self) -> list[tuple[PooledConnection, str | None]]:
        """Take back the connections of borrower threads that have exited.

        Their session state is unknown, so they are closed, never reused; the
        caller closes them and releases their slots.
        """
        with self._lock:
            orphans = [c for c in self._used.values() if _orphaned(c)]
            for conn in orphans:
                del self._used[id(conn)]
                conn.reclaimed = True
        for conn in orphans:
            self._log(
                logging.WARNING,
                "thread %r exited without returning its connection; closing it and "
                "freeing its slot",
                conn.borrower.name if conn.borrower else "?",
            )
        return [(conn, CONNECTIONS_RECLAIMED) for conn in orphans]

    def _report_leaks(self, now: float) -> None:
        """Warn once per borrow about connections held longer than leak_timeout."""
        if self.leak_timeout is None:
            return
        with self._lock:
            leaks = [
                c
                for c in self._used.values()
                if not c.leak_reported and now - c.borrowed_at > self.leak_timeout
            ]
            for conn in leaks:
                conn.leak_reported = True
                self._stats[CONNECTIONS_LEAKED] += 1
        for conn in leaks:
            self._log(
                logging.WARNING,
                "connection held for %.1f s (leak_timeout=%s) by thread %r, taken at:\n%s",
                now - conn.borrowed_at,
                self.leak_timeout,
                conn.borrower.name if conn.borrower else "?",
                conn.borrow_stack,
            )

    # -- fork ----------------------------------------------------------------

    def after_fork_in_child(self) -> None:
        """Forget the parent's connections without touching their sessions.

        Runs in the child right after fork(), when no other thread exists: the
        parent's lock may have been held at fork time, so it is not taken.
        """
        for conn in self._idle:
            detach_inherited(conn)
        for conn in self._used.values():
            # Another parent thread may have been inside a query on it at fork
            # time: psycopg2's per-connection mutex is then copied locked, and
            # close() (or freeing it) would block forever. Point its socket at
            # /dev/null and keep the object alive for the life of this process.
            detach_inherited(conn, close=False)
            INHERITED_BUSY.append(conn)
        closed = self.closed
        self._init_state()
        self.closed = closed

    # -- statistics ----------------------------------------------------------

    def get_stats(self) -> dict[str, int]:
        """Return the pool's gauges and counters (psycopg_pool's key names)."""
        with self._lock:
            return self._stats_locked()

    def pop_stats(self) -> dict[str, int]:
        """Return the statistics and reset the counters."""
        with self._lock:
            stats = self._stats_locked()
            self._stats.clear()
            return stats

    def _stats_locked(self) -> dict[str, int]:
        gauges = (
            self.minconn,
            self.maxconn,
            self._nconns,
            len(self._idle),
            len(self._used),
            len(self._waiters),
        )
        return {
            **dict(zip(GAUGE_KEYS, gauges, strict=True)),
            **{key: self._stats[key] for key in COUNTER_KEYS},
        }

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name} minconn={self.minconn} maxconn={self.maxconn}"
            f"{' closed' if self.closed else ''}>"
        )


# Connections checked out in the parent when it forked (see after_fork_in_child).
INHERITED_BUSY: list[Any] = []


def detach_inherited(conn: Any, close: bool = True) -> None:
    """Make a connection inherited through fork() harmless to the parent's session.

    Pointing its socket at /dev/null means that closing it here (or its
    garbage collection) sends nothing to the server, and nothing it sends
    can be read here.
    """
    try:
        fd = conn.fileno()
    except Exception:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    if close:
        _close_quietly(conn)
