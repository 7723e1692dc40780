"""The connection pool: psycopg2's ThreadedConnectionPool API, with internals made right.

Django-free: usable (and tested) on its own.

Slots, loans and reservations
-----------------------------
Every connection the pool has open, or is opening or closing, takes one of
``maxconn`` *slots*, and every slot is recorded in exactly one place:

* ``_idle``: a connection ready to be lent (most recently returned last);
* ``_used``: a connection lent, keyed by its *loan*: a number drawn from
  ``_tokens`` for each borrow, also kept on the connection (``conn.loan``);
* ``_reserved``: a slot held by a borrow (or the refill, or a close) while a
  connection is opened, checked or closed in it outside the lock, keyed by
  the same kind of number.

The pool's size is never stored: it is ``len(_idle) + len(_used) +
len(_reserved)``, so a record dropped by an interrupted step frees its slot
rather than losing it. A borrow draws its number first and records
everything it holds under it (its place in the queue, a reserved slot, its
loan), so that an exception raised at any point of it (a signal handler's,
between any two bytecodes) is undone by ``_give_back(number)``. A return
proves it holds the loan: ``putconn(conn, loan=...)``, or from the thread
that borrowed; a stale return is an error and touches nothing.

Invariants (checked by ``check_invariants()``, after every step in the tests):

1. ``len(_idle) + len(_used) + len(_reserved) <= maxconn``;
2. nothing is both idle and lent, no connection is lent twice or idle twice;
3. every lent connection carries its loan number (``conn.loan``), every idle
   one none (0) and no lease state; no number is both a loan and a
   reservation; a revoked lease is never revocable again;
4. every queued waiter is unserved, its number holds nothing else, and its
   thread is alive (a borrow that ends, however, leaves the queue first);
5. when nothing is in progress: no reservation and no round trip is left,
   and nobody waits while a connection is idle or a slot is free.

Leases
------
A loan whose holder keeps it across requests (Django's ``CONN_MAX_AGE``) is
a *lease*. Between requests its holder promises not to touch it without
``lease_claim()`` first (``lease_idle()`` sets ``conn.revocable_since``); a
borrower that would otherwise queue revokes the one idle longest
(``conn.revoked_at``: its holder's claim fails from then on) and returns it
with its loan number, which resets it and hands it to the longest waiter.
Both fields are written under the lock.

Lock discipline
---------------
Each pool has one ``threading.Lock``, ``_lock``. It guards every mutable
attribute of the pool: ``_idle``, ``_used``, ``_reserved``, ``_keys``,
``_waiters``, ``_stats``, ``closed``, ``_dormant``, ``_paused_at``,
``_refill_after``, ``_refill_failures``, ``_deadlines`` and
``_reconnected_at`` (the last two floats are also read without it, for
display or a retirement: a stale read only shows or acts a moment late). It
is held only for bookkeeping: never during a connect, a query, a reset or a
close (network I/O), so a slow server never blocks the threads that could be
served from idle connections. (The system calls made under it never block: a
zero-timeout ``poll()`` of idle sockets, and ``dup()`` of a socket about to
be cut off.) Two lock-free reads are deliberate: ``putconn()`` checks
``_used.get(loan) is conn`` before resetting (only the loan's holder can end
the loan, so the answer can't change under it), and ``getconn()`` reads a
keyed connection.

Waiters queue in FIFO order. A returned connection (or a freed slot) is
handed directly to the longest waiter under the lock, which then releases
that waiter's private lock. The returning thread cannot take it back, so no
waiter starves (with a shared Condition the returning thread usually wins
the race under the GIL).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

import psycopg2
import psycopg2.extensions as ext
import psycopg2.pool
from psycopg2 import sql

from . import forking, maintenance
from .errors import PoolClosed, PoolError, PoolTimeout, TooManyRequests
from .forking import detach_inherited
from .probe import input_probe
from .session import Baseline, PooledConnection, reset_session
from .stats import (
    CONNECTIONS_CLOSED,
    CONNECTIONS_ERRORS,
    CONNECTIONS_EXPIRED,
    CONNECTIONS_LEAKED,
    CONNECTIONS_LOST,
    CONNECTIONS_MS,
    CONNECTIONS_NUM,
    CONNECTIONS_RECLAIMED,
    GAUGE_KEYS,
    LEASES_REVOKED,
    REQUESTS_ERRORS,
    REQUESTS_NUM,
    REQUESTS_QUEUED,
    REQUESTS_TIMEOUTS,
    RETURNS_BAD,
    RETURNS_RESET,
    STATS_KEYS,
    USAGE_MS,
    WAIT_BUCKETS,
    PoolStats,
)

__all__ = [
    "STATS_KEYS",
    "WAIT_BUCKETS",
    "ConnectionPool",
    "InvariantError",
    "PersistentConnectionPool",
]

logger = logging.getLogger("django_pgpool")

# Waits at least this long are logged as warnings.
SLOW_WAIT_MS = 1000

# How long the background refill waits after a failed connect.
REFILL_BACKOFF = 2.0
# Relative jitter on max_lifetime, so connections opened together don't expire together.
LIFETIME_JITTER = 0.05
# A borrow whose new connections keep failing waits this long before the
# next try, doubling up to the last: a link that drops every connection
# must not be hammered hundreds of times a second until the timeout.
FRESH_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8)

# A borrow whose connect fails for want of a usable host waits this long
# before the next try, doubling up to the last (see failover_timeout).
CONNECT_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.5)
# Connect errors that trying again won't mend (libpq gives no SQLSTATE for them).
_PERMANENT_CONNECT_ERRORS = (
    "authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "permission denied",
    "invalid ",
    "certificate",
)

# Retirements after a failover error within this many seconds of the last
# one are logged at DEBUG: one event fails several connections.
RETIRE_QUIET = 5.0

# What a reserved slot is for (_Reservation.purpose).
OPENING = "opening"
CLOSING = "closing"
# A reservation left behind this long (its owner thread gone, or a close
# that never finished) is taken back by maintenance (see _Reservation).
ABANDONED_AFTER = 5.0

# What a return does with the connection, besides the stats keys it may be
# closed under (constants: the return path allocates nothing).
KEPT = "kept"
KEPT_RESET = "kept after a reset"
CLOSE = "close"


def _refs_of_a_dict_value() -> int:
    """Return what sys.getrefcount() says of an object only a dict refers to,
    read through a local as _unreferenced_locked() does (measured, not assumed:
    interpreters count the call's own references differently)."""
    holder = {0: object()}
    value = holder[0]
    return sys.getrefcount(value) - 1  # less the local


_REFS_OF_A_DICT_VALUE = _refs_of_a_dict_value()


def fresh_credentials(
    credentials: Callable[[], Mapping[str, Any]], purpose: str
) -> Mapping[str, Any]:
    """Call a credentials callable (OPTIONS['credentials']) for ``purpose``; return
    its connect parameters. Raise PoolError naming it and the cause, never the
    values (a password)."""
    name = callable_name(credentials)
    try:
        fresh = credentials()
    except Exception as exc:
        raise PoolError(
            f"couldn't get credentials for {purpose}: {name} "
            f"(OPTIONS['credentials']) raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(fresh, Mapping):
        raise PoolError(
            f"{name} (OPTIONS['credentials']) returned a {type(fresh).__name__}, not a "
            "dict of libpq connect parameters such as {'password': token}"
        )
    return fresh


class InvariantError(AssertionError):
    """The pool's bookkeeping broke one of its invariants (see the module docstring)."""


class _ForkGate:
    """Keep fork() out of connects (see forking.py, phase ``connects``).

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


forking.register(
    "connects",
    before=_gate_before_fork,
    after_in_parent=_gate_after_fork_in_parent,
    after_in_child=_gate_after_fork_in_child,
)


class _Waiter:
    """A borrow in line. The pool fills in ``conn``, ``granted`` or ``error``
    under the pool lock, then calls ``wake()``; only the waiter reads them."""

    __slots__ = ("_ready", "conn", "error", "granted", "since", "thread", "token")

    def __init__(self, token: int, since: float) -> None:
        self._ready = threading.Lock()
        self._ready.acquire()
        self.token = token
        self.since = since
        self.thread = threading.current_thread()
        self.conn: PooledConnection | None = None
        self.granted = False  # a slot (reserved under self.token) to open a connection in
        self.error: BaseException | None = None

    @property
    def served(self) -> bool:
        return self.conn is not None or self.granted or self.error is not None

    def wait(self, timeout: float) -> bool:
        return self._ready.acquire(timeout=max(timeout, 0.0))

    def wake(self) -> None:
        self._ready.release()


class _RoundTrip:
    """A health check or reset under way outside the lock, and its deadline.

    ``cut`` is set under the pool lock by maintenance when it cuts the
    socket off; the round trip's owner reads it under the lock when it ends,
    so a connection that was cut is never lent, even if its query had
    already succeeded.
    """

    __slots__ = ("conn", "cut", "due")

    def __init__(self, conn: PooledConnection, due: float) -> None:
        self.conn = conn
        self.due = due
        self.cut = False


class _Reservation:
    """A slot held while a connection is opened or closed in it, outside the lock.

    Its owner frees it when done. If an exception stops the owner from doing
    so (a second one, inside the cleanup of a first, or a thread that dies),
    maintenance takes it back once it is ABANDONED_AFTER old: a close is
    finished (closing twice is harmless), an opening whose owner thread is
    no longer alive is given up. ``conn`` is the connection being closed.
    """

    __slots__ = ("conn", "owner", "purpose", "since")

    def __init__(
        self, purpose: str, owner: threading.Thread, conn: PooledConnection | None = None
    ) -> None:
        self.purpose = purpose
        self.owner = owner
        self.conn = conn
        self.since = time.monotonic()


def _escape_startup_value(value: str) -> str:
    """Escape a value for libpq's ``options`` (backslash before spaces and backslashes)."""
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def _worth_retrying(exc: psycopg2.OperationalError) -> bool:
    """Return True if a failed connect may succeed in a moment (refused, starting
    up, no writable host yet), False if it can't (password, database, role)."""
    message = str(exc).lower()
    return not any(permanent in message for permanent in _PERMANENT_CONNECT_ERRORS)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def callable_name(function: Callable[..., Any]) -> str:
    """Return ``module.qualname`` of a callable, for messages and status."""
    module = getattr(function, "__module__", None) or "?"
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return f"{module}.{name}"


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


def _shut_down(fd: int) -> None:
    """Shut down the socket behind ``fd`` (a dup the caller owns), then close ``fd``."""
    duplicate = socket.socket(fileno=fd)
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
    ``args`` and ``kwargs`` go to ``psycopg2.connect()`` (a DSN, libpq
    keywords, ``connection_factory``, ``cursor_factory``). Connections are
    opened lazily, never in ``__init__``. The pool's own knobs are
    keyword-only (docs/configuration.md gives the ENGINE's OPTIONS for each):

    - ``name``: names the pool in log records, errors, ``poolstatus`` and the
      metrics (``db.client.connection.pool.name`` for OpenTelemetry).
    - ``timeout``: seconds ``getconn()`` waits before ``PoolTimeout``;
      ``max_waiting``: borrowers allowed in line (0: no limit), beyond which
      ``TooManyRequests`` is raised at once.
    - ``failover_timeout``: how long a borrow keeps retrying a connect that
      found no usable host (refused, or no writable one yet), within
      ``timeout``.
    - ``max_lifetime``, ``max_idle``: seconds after which a connection is
      replaced, and an idle one beyond ``minconn`` closed.
    - ``check_after``: a connection idle longer than this is checked before
      it is lent (``SELECT 1``, or ``check``: called with the connection, it
      raises to reject it).
    - ``reset``: ``"auto"`` resets the session at return only when it was
      changed (``DISCARD ALL``), ``"always"`` at every return.
    - ``leak_timeout``: seconds a connection may be held before a warning
      with the borrower's stack (None: off).
    - ``configure``: called with each new connection once, after it is
      opened (the ENGINE's set-up, a ``LoggingConnection``'s
      ``initialize()``).
    - ``credentials``: called before every new connection; returns connect
      parameters that override ``kwargs`` for it (a password that rotates;
      never cached or logged).
    - ``session_settings``: settings (``{"TimeZone": "UTC"}``) every session
      gets when it is opened: in libpq's ``options`` (no round trip;
      ``RESET`` then goes back to them), or with ``settings_by_set`` (or once
      a pooler refused ``options``) with ``SET`` right after connecting (one
      round trip per new connection; ``RESET`` goes back to the server's
      defaults, as with Django's own backend), replayed after each
      ``DISCARD ALL`` in the same round trip.
    """

    def __init__(
        self,
        minconn: int,
        maxconn: int,
        *args: Any,
        name: str = "pool",
        timeout: float = 30.0,
        failover_timeout: float = 5.0,
        max_waiting: int = 0,
        max_lifetime: float = 3600.0,
        max_idle: float = 600.0,
        check_after: float = 1.0,
        reset: str = "auto",
        leak_timeout: float | None = None,
        configure: Callable[[PooledConnection], None] | None = None,
        credentials: Callable[[], Mapping[str, Any]] | None = None,
        session_settings: Mapping[str, str] | None = None,
        settings_by_set: bool = False,
        check: Callable[[PooledConnection], object] | None = None,
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
        self.failover_timeout = failover_timeout
        self.max_waiting = max_waiting
        self.max_lifetime = max_lifetime
        self.max_idle = max_idle
        self.check_after = check_after
        self.reset = reset
        self.leak_timeout = leak_timeout
        self.abandoned_after = ABANDONED_AFTER
        self._configure = configure
        # Called for every new connection, its result never kept: a rotating
        # password is never cached, logged or part of the pool's identity.
        self._credentials = credentials
        # Given to every new session: in libpq's ``options`` (free, and kept by
        # DISCARD ALL), or, once a server refused or ignored them there (a
        # pooler: PgBouncer before 1.20), with SET after connecting, replayed
        # after each DISCARD ALL. A plain bool, read without the lock: a
        # stale read costs one refused connect.
        self._session_settings = dict(session_settings or {})
        self._settings_by_set = settings_by_set
        self._role_checked = False  # the role given in options was seen to take
        self._check = check

        factory = kwargs.get("connection_factory") or PooledConnection
        kwargs["connection_factory"] = self._pooled_factory(factory)  # psycopg2's own too
        self._args = args
        self._kwargs = kwargs

        self._init_state()
        maintenance.register(self)

    def _init_state(self) -> None:
        """Set up empty bookkeeping (at creation, and in a forked child)."""
        self._lock = threading.Lock()
        self.closed = False
        self._pid = os.getpid()
        # Inherited through fork() and not borrowed from in this process yet:
        # maintenance opens nothing for it (see forking.py).
        self._dormant = False
        self._idle: deque[PooledConnection] = deque()
        self._used: dict[int, PooledConnection] = {}  # loan number -> connection lent
        self._reserved: dict[int, _Reservation] = {}
        self._keys: dict[Hashable, PooledConnection] = {}  # psycopg2's getconn(key) API
        self._waiters: deque[_Waiter] = deque()
        self._stats = PoolStats()
        # Loan and reservation numbers; next() on a count is atomic under the GIL.
        self._tokens = itertools.count(1)
        # Set once a lease went between requests: until then a queued borrow
        # doesn't look for one to revoke.
        self._leasing = False
        self._refill_after = 0.0
        self._refill_failures = 0  # in a row: sets the backoff
        # Round trips under way outside the lock (health checks, resets), by
        # id(conn). Maintenance cuts off the overdue ones.
        self._deadlines: dict[int, _RoundTrip] = {}
        # Connections opened before this (monotonic) time are retired: closed
        # at return or borrow instead of being reused (reconnect()).
        self._reconnected_at = 0.0
        # Set (wall-clock time) by pause(): nothing is lent or kept until resume().
        self._paused_at: float | None = None

    def _size_locked(self) -> int:
        """Return how many slots are taken: open, opening or closing. Lock held."""
        return len(self._idle) + len(self._used) + len(self._reserved)

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
        """Return a healthy connection, waiting up to ``timeout`` seconds for one.

        The connection's ``loan`` attribute is this loan's number: pass it to
        ``putconn(conn, loan=...)`` to return it from another thread.
        """
        if key is not None:
            conn = self._keys.get(key)  # a dict read is atomic
            if conn is not None:
                return conn
        token = next(self._tokens)
        # Everything the pool records for this borrow is under ``token`` from
        # here on: whatever interrupts it gives all of it back.
        try:
            started = time.monotonic()
            conn = self._take(token, started)
            # The usual case, an idle connection that passes its check, takes
            # no further call; anything else goes to _borrow().
            problem = None if conn is None else self._problem(conn, started + self.timeout, False)
            if conn is None or problem is not None:
                conn = self._borrow(token, conn, problem, started + self.timeout)
            conn.borrowed_at = conn.claimed_at = time.monotonic()
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
        except BaseException:
            self._give_back(token)
            raise

    def _borrow(
        self, token: int, conn: PooledConnection | None, problem: str | None, deadline: float
    ) -> PooledConnection:
        """Lend a healthy connection under loan ``token``, opening one if needed.

        ``conn``: the connection _take() lent, which failed its check with
        ``problem``; or None: a slot was reserved for a new one.
        """
        opened = 0  # connections this borrow opened
        while True:
            if conn is not None:
                if problem is None:
                    return conn
                self._replace_lent(token, conn, problem)
                now = time.monotonic()
                if opened:
                    # Even a new connection failed: wait a little before the next.
                    delay = FRESH_RETRY_DELAYS[min(opened, len(FRESH_RETRY_DELAYS)) - 1]
                    if now + delay >= deadline:
                        raise self._timeout_error(opened)
                    time.sleep(delay)
                elif now >= deadline:
                    raise self._timeout_error(opened)
            conn = self._open_lent_retrying(token, deadline)
            opened += 1
            problem = self._problem(conn, deadline, fresh=True)

    def _open_lent_retrying(self, token: int, deadline: float) -> PooledConnection:
        """Open a connection in the slot reserved under ``token``, trying again with
        backoff while no usable host answers, for ``failover_timeout`` at most.

        During a failover or a restart the server refuses connections, or libpq
        finds no writable host (``target_session_attrs``), for a few seconds:
        a request can ride through that instead of failing at once. A server
        that refuses the password, the database or the role is not retried.
        """
        give_up = min(deadline, time.monotonic() + self.failover_timeout)
        delays = iter(CONNECT_RETRY_DELAYS)
        while True:
            try:
                return self._open_lent(token)
            except psycopg2.OperationalError as exc:
                delay = next(delays, CONNECT_RETRY_DELAYS[-1])
                if (
                    isinstance(exc, PoolError)
                    or not _worth_retrying(exc)
                    or time.monotonic() + delay >= give_up
                ):
                    with self._lock:
                        self._stats[REQUESTS_ERRORS] += 1
                    raise
                self._log(logging.INFO, "couldn't connect, trying again: %s", _first_line(exc))
            time.sleep(delay)

    def _take(self, token: int, started: float) -> PooledConnection | None:
        """Lend an idle connection under ``token``, or reserve a slot under it
        (return None), waiting in line if needed."""
        with self._lock:
            self._stats[REQUESTS_NUM] += 1
            if self.closed:
                raise PoolClosed(f"connection pool {self.name} is closed")
            self._dormant = False
            if not self._waiters and self._paused_at is None:
                if self._idle:
                    # Popped, then recorded: an interruption in between drops
                    # the connection (its slot frees itself, the object closes
                    # when collected), it never leaves a stale loan.
                    conn = self._idle.pop()
                    conn.loan = token
                    self._used[token] = conn
                    return conn
                if self._size_locked() < self.maxconn:
                    self._reserved[token] = _Reservation(OPENING, threading.current_thread())
                    return None
            if self.max_waiting and len(self._waiters) >= self.max_waiting:
                self._stats[REQUESTS_ERRORS] += 1
                raise TooManyRequests(
                    f"couldn't get a connection for {self.name}: {len(self._waiters)} requests "
                    f"are already waiting (max_waiting={self.max_waiting}, maxconn="
                    f"{self.maxconn}, {len(self._used)} in use); raise OPTIONS['max_waiting'] "
                    "or OPTIONS['maxconn'], or return connections sooner"
                )
            waiter = _Waiter(token, started)
            self._waiters.append(waiter)
            self._stats[REQUESTS_QUEUED] += 1
            # Rather than wait, take back a lease whose holder is between
            # requests (the one idle longest): returned below, outside the
            # lock, it goes to the longest waiter (maybe this one).
            revoked = self._revoke_lease_locked() if self._paused_at is None else None
            # A thread died holding a connection: maintenance frees its slot,
            # which goes to the longest waiter (maybe this one). Looked for by
            # the first in line only: the scan calls is_alive() on every
            # borrower under the lock (4.5 µs for 16), and at 32 threads on 16
            # connections every borrow queues; a longer queue is being served,
            # and the maintenance round finds orphans within INTERVAL anyway.
            if len(self._waiters) == 1 and any(_orphaned(c) for c in self._used.values()):
                maintenance.wake()

        if revoked is not None:
            # For its holder, which never touches it again (its lease_claim()
            # fails): reset, then handed over. Interrupted, putconn() closes it.
            self.putconn(revoked, loan=revoked.loan)
        if not waiter.wait(self.timeout - (time.monotonic() - started)):
            # Before giving up: a borrower thread may have died since the last
            # maintenance round; its slot would go to the longest waiter.
            self._close_reserved(self._reclaim_orphans())
            with self._lock:
                if not waiter.served:
                    self._remove_waiter_locked(waiter)
                    self._stats.record_wait(time.monotonic() - waiter.since)
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
        return waiter.conn  # None: granted a slot reserved under our token

    def _remove_waiter_locked(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):  # an interrupted hand-off may have dequeued it
            self._waiters.remove(waiter)

    def _give_back(self, token: int, conn: PooledConnection | None = None) -> None:
        """Undo whatever an interrupted or failed borrow or return holds under ``token``.

        Its place in the queue is given up, a reserved slot freed, and a
        connection still lent under it closed: it may have been interrupted
        in the middle of a health check or a reset, so its session is not
        trusted. ``conn``, if given, is closed too unless it made it back to
        the pool (idle, or handed to a waiter). Nothing happens if nothing is
        held (the usual case).
        """
        with self._lock:
            for waiter in self._waiters:
                if waiter.token == token:
                    self._waiters.remove(waiter)
                    break
            victim = self._used.pop(token, None)
            dropped = False
            if victim is not None:
                # Keep the slot until it is closed.
                self._reserved[token] = _Reservation(CLOSING, threading.current_thread(), victim)
            elif conn is not None and not self._placed_locked(conn):
                victim, dropped = conn, True  # dropped half-way: its slot is free already
            if victim is None and token not in self._reserved:
                # Nothing held. An interrupted step may still have dropped a
                # record (its slot freed, nobody told): pass a free slot on.
                self._slot_freed_locked()
                return
            if victim is not None:
                self._deadlines.pop(id(victim), None)  # left by an interrupted round trip
        if victim is not None:
            victim.loan = 0
            _close_quietly(victim)
            self._log(logging.DEBUG, "connection closed (its borrow or return was interrupted)")
        if dropped:
            with self._lock:
                self._slot_freed_locked()  # closed: now the slot can go to a waiter
        self._release(token)

    def _placed_locked(self, conn: PooledConnection) -> bool:
        """Return True if ``conn`` is idle or lent. Lock held."""
        return (conn.loan and self._used.get(conn.loan) is conn) or any(
            c is conn for c in self._idle
        )

    def _timeout_error(self, opened: int) -> PoolTimeout:
        """Say that no healthy connection could be had in time; count it."""
        with self._lock:
            self._stats[REQUESTS_ERRORS] += 1
            self._stats[REQUESTS_TIMEOUTS] += 1
        message = (
            f"couldn't get a healthy connection for {self.name} within {self.timeout:.1f} s: "
            + (f"{opened} new connection(s) failed their check" if opened else "checks overran")
            + "; the server, or the link to it, may be failing"
        )
        self._log(logging.ERROR, "%s", message)
        return PoolTimeout(message)

    def _timeout_message_locked(self) -> str:
        """Say why a borrow timed out and what to change. Lock held."""
        opening = len(self._reserved)
        if self._paused_at is not None:
            advice = (
                f"the pool has been paused since {time.ctime(self._paused_at)} (poolpause); "
                "run manage.py poolresume, or ConnectionPool.resume()"
            )
        elif opening and not self._used:
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
        socket down makes libpq's read end at once with an error. A round
        trip that was cut raises OperationalError when it ends, even if its
        query had succeeded: the connection must not be lent.
        """
        seconds = max(seconds, 0.1)
        trip = _RoundTrip(conn, time.monotonic() + seconds)
        with self._lock:
            self._deadlines[id(conn)] = trip
        try:
            if seconds < maintenance.INTERVAL:
                maintenance.wake()  # its next round would come too late for this one
            yield
        finally:
            with self._lock:
                if self._deadlines.get(id(conn)) is trip:
                    del self._deadlines[id(conn)]
                cut = trip.cut
            if cut:
                raise psycopg2.OperationalError(
                    f"a round trip on a connection of {self.name} overran its deadline "
                    "and was cut off"
                )

    def next_deadline(self) -> float | None:
        """Return when the earliest round trip under way is due to be cut off, if any."""
        with self._lock:
            return min((trip.due for trip in self._deadlines.values()), default=None)

    def _problem(self, conn: PooledConnection, deadline: float, fresh: bool) -> str | None:
        """Return why ``conn`` can't be handed out (a stats key), or None if it can.

        Runs outside the lock: it may do a round trip. A ``fresh`` connection
        (just opened by this borrow) gets no round trip: it just did one.
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
            if fresh or now - conn.returned_at <= self.check_after:
                return None
            # One round trip: outside autocommit psycopg2 would send BEGIN
            # first and the check would need a ROLLBACK after (three in all).
            # Switching autocommit on and back sends nothing while idle.
            in_transactions = not conn.autocommit
            if in_transactions:
                conn.autocommit = True
            try:
                with self._deadline(conn, deadline - now):
                    if self._check is None:
                        with conn.cursor() as cur:
                            cur.execute("SELECT 1")
                    else:
                        self._run_check(conn)
            finally:
                if in_transactions and not conn.closed:
                    conn.autocommit = False
        except (psycopg2.Error, OSError):
            return CONNECTIONS_LOST
        return None

    def _run_check(self, conn: PooledConnection) -> None:
        """Run the user's check; any exception rejects the connection (logged once
        per connection at INFO: a failover makes every connection fail it)."""
        assert self._check is not None
        try:
            self._check(conn)
        except Exception as exc:
            self._log(
                logging.INFO,
                "%s (OPTIONS['check']) rejected a connection: %s",
                callable_name(self._check),
                _first_line(exc),
            )
            raise psycopg2.OperationalError(f"rejected by the check: {exc}") from exc
        if conn.info.transaction_status != ext.TRANSACTION_STATUS_IDLE:
            conn.rollback()

    def _retired(self, conn: PooledConnection, now: float) -> bool:
        """Return True if ``conn`` outlived max_lifetime or was opened before reconnect()."""
        return conn.expires_at <= now or conn.created_at < self._reconnected_at

    def _replace_lent(self, token: int, conn: PooledConnection, problem: str) -> None:
        """Close a connection lent under ``token`` that failed its check; keep the slot."""
        with self._lock:
            # The loan dropped, then the slot reserved: never both at once,
            # which another thread would see if this were interrupted in
            # between. Interrupted there, the slot is free already and
            # _give_back() has nothing to undo (the connection closes when
            # collected).
            del self._used[token]
            self._reserved[token] = _Reservation(OPENING, threading.current_thread())
            conn.loan = 0
            self._stats[problem] += 1
            self._stats[CONNECTIONS_CLOSED] += 1
        _close_quietly(conn)
        self._log(
            logging.DEBUG, "%s connection closed at borrow", problem.removeprefix("connections_")
        )

    def _open_lent(self, token: int) -> PooledConnection:
        """Open a connection in the slot reserved under ``token`` and lend it under it."""
        conn = self._connect()  # raising, getconn() gives the slot back
        conn.loan = token
        with self._lock:
            closed = self.closed
            if not closed:
                self._used[token] = conn
                del self._reserved[token]
                if self._refill_failures:
                    # The server answers again: the refill stops backing off
                    # (up to a minute) and runs now, not after its backoff.
                    self._refill_failures, self._refill_after = 0, 0.0
                    maintenance.wake()
                return conn
            self._stats[CONNECTIONS_CLOSED] += 1
        _close_quietly(conn)
        raise PoolClosed(f"connection pool {self.name} is closed")

    def _connect(self) -> PooledConnection:
        """Open and configure a new connection (no lock held; the slot is reserved)."""
        started = time.monotonic()
        try:
            kwargs = self._kwargs
            if self._credentials is not None:
                kwargs = {**kwargs, **self._fresh_credentials()}
            conn = self._connect_with_settings(kwargs)
            try:
                if self._session_settings and (
                    self._settings_by_set or not self._settings_took(conn)
                ):
                    self._set_session_settings(conn)
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
        conn.loan = 0
        conn.baseline = Baseline.capture(conn)
        conn.created_at = conn.returned_at = now
        conn.expires_at = now + self.max_lifetime * (1.0 - LIFETIME_JITTER * random.random())
        conn.pool_pid = self._pid
        with self._lock:
            self._stats[CONNECTIONS_NUM] += 1
            self._stats[CONNECTIONS_MS] += int((now - started) * 1000)
        self._log(logging.DEBUG, "connection opened in %.1f ms", (now - started) * 1000)
        return conn

    def _connect_with_settings(self, kwargs: dict[str, Any]) -> PooledConnection:
        """Connect, giving the session settings in libpq's ``options`` unless the
        server refuses that startup parameter (then once more, without)."""
        if self._session_settings and not self._settings_by_set:
            given = " ".join(
                f"-c {name}={_escape_startup_value(value)}"
                for name, value in self._session_settings.items()
            )
            with_settings = {**kwargs, "options": f"{kwargs.get('options', '')} {given}".strip()}
            try:
                with _fork_gate.connecting():
                    conn: PooledConnection = psycopg2.connect(*self._args, **with_settings)
                return conn
            except psycopg2.OperationalError as exc:
                # PgBouncer before 1.20: "unsupported startup parameter: options";
                # 1.20 and later, for a setting it doesn't track (the role):
                # "unsupported startup parameter in options: role".
                message = str(exc)
                if "unsupported startup parameter" not in message or "options" not in message:
                    raise
                self._switch_to_set("refuses the startup parameter 'options'")
        with _fork_gate.connecting():
            conn = psycopg2.connect(*self._args, **kwargs)
        return conn

    def _settings_took(self, conn: PooledConnection) -> bool:
        """Return False if a setting given in ``options`` didn't reach the session
        (a pooler told to ignore ``options``).

        The time zone is reported by the server, so checking it is free. The
        role is not: it is read once per pool, with one round trip, on its
        first connection (a pooler that ignores ``options`` ignores it for all).
        """
        wanted = self._session_settings.get("TimeZone")
        if wanted is not None and conn.info.parameter_status("TimeZone") != wanted:
            self._switch_to_set("ignored the time zone given in 'options'")
            return False
        role = self._session_settings.get("role")
        if role is not None and not self._role_checked:
            with ext.cursor(conn) as cur:  # our own statement needs no tracking
                cur.execute("SELECT current_setting('role')")
                row = cur.fetchone()
            current = row[0] if row else None
            if conn.info.transaction_status != ext.TRANSACTION_STATUS_IDLE:
                conn.rollback()
            if current != role:
                self._switch_to_set("ignored the role given in 'options'")
                return False
            self._role_checked = True
        return True

    def _switch_to_set(self, why: str) -> None:
        if not self._settings_by_set:
            self._settings_by_set = True
            self._log(
                logging.INFO,
                "the server (a pooler?) %s: session settings are given with SET after "
                "connecting from now on (one round trip per new connection)",
                why,
            )

    def _set_session_settings(self, conn: PooledConnection) -> None:
        """Give the session its settings with SET (one round trip), and keep the
        statement on the connection for the reset to replay after DISCARD ALL."""
        statement = sql.SQL(" ").join(
            sql.SQL("SET {} TO {};").format(sql.Identifier(name), sql.Literal(value))
            for name, value in self._session_settings.items()
        )
        setup = statement.as_string(conn)
        # A plain cursor: part of the connection's baseline, not a borrower's change.
        with ext.cursor(conn) as cur:
            cur.execute(setup)
        if conn.info.transaction_status != ext.TRANSACTION_STATUS_IDLE:
            conn.commit()
        conn.session_setup = setup

    def _fresh_credentials(self) -> Mapping[str, Any]:
        """Call the credentials callable; raise PoolError naming it and the cause."""
        assert self._credentials is not None
        return fresh_credentials(self._credentials, f"a new connection of {self.name}")

    # -- returning -----------------------------------------------------------

    def putconn(  # type: ignore[override]
        self,
        conn: ext.connection,
        key: Hashable | None = None,
        close: bool = False,
        *,
        loan: int | None = None,
    ) -> None:
        """Give ``conn`` back. Broken connections are discarded, never raised about.

        ``close=True`` closes it instead of keeping it. ``loan`` is the number
        ``conn.loan`` had when it was borrowed; without it (or ``key``) the
        connection must be returned by the thread that borrowed it. Returning
        a connection this pool did not lend, or did lend but to someone else
        since (a stale return), raises PoolError and touches nothing.

        If an exception interrupts it (a signal handler's), the connection is
        closed and its slot freed before the exception goes on, unless it came
        before putconn() did anything: then the connection is still lent, and
        the next maintenance round takes it back once nobody holds it (as it
        does the connection of a thread that exited holding it).
        """
        if not isinstance(conn, PooledConnection):
            raise PoolError(
                f"{type(conn).__name__} object returned to {self.name} is not a connection "
                "of this pool"
            )
        if conn.pool_pid != self._pid:
            # Inherited through fork(): the parent owns the session.
            detach_inherited(conn)
            return
        if conn.reclaimed:
            return  # closed already: its borrower's thread had exited
        token = conn.loan
        checked = False
        try:
            if loan is None or loan != token or self._used.get(token) is not conn:
                self._check_loan(conn, token, key, loan)  # the ENGINE's returns skip the call
            checked = True
            outcome = self._reset_for_return(conn, close)
            self._finish_return(conn, token, key, outcome, close)
        except BaseException:
            # Interrupted (a signal handler's exception) or failed: the
            # connection is in an unknown state, so it is closed, and its slot
            # freed, before the exception goes on; unless it isn't the
            # caller's to return (a stale return: the check's PoolError).
            if checked or self._owns(conn, token, key, loan):
                self._give_back(token, conn)
            raise

    def _check_loan(
        self, conn: PooledConnection, token: int, key: Hashable | None, loan: int | None
    ) -> None:
        """Raise PoolError unless the caller may return ``conn``, lent under ``token``."""
        if not token or self._used.get(token) is not conn:
            raise PoolError(
                f"connection returned to {self.name} is not checked out from it "
                "(returned twice, or taken from another pool)"
            )
        if not self._owns(conn, token, key, loan):
            raise PoolError(
                f"connection returned to {self.name} is lent to someone else: a stale "
                "return of an earlier loan (to return a connection from another thread "
                "than the borrower's, pass putconn(conn, loan=<conn.loan when borrowed>))"
            )

    def _owns(
        self, conn: PooledConnection, token: int, key: Hashable | None, loan: int | None
    ) -> bool:
        """Return True if the caller holds the loan ``token`` of ``conn``.

        Lock-free: only the loan's holder can end the loan, so for a caller
        that holds it nothing here can change until it returns.
        """
        if not token or self._used.get(token) is not conn:
            return False
        if loan is not None:
            return loan == token
        if key is not None:
            return self._keys.get(key) is conn
        # The borrowing thread, or anyone once it has exited (its connection
        # is an orphan: whoever holds it now may give it back), or a thread
        # it shares the connection with (Django's inc_thread_sharing()).
        borrower = conn.borrower
        return (
            borrower is threading.current_thread()
            or borrower is None
            or not borrower.is_alive()
            or bool(conn.shared is not None and conn.shared())
        )

    def _reset_for_return(self, conn: PooledConnection, close: bool) -> str:
        """Reset a returned connection's session (outside the lock); return the outcome.

        KEPT or KEPT_RESET (a reset was needed): keep it; else the stats key
        it is closed under, or CLOSE to close it without counting it as bad
        (close=True, pool closed).
        """
        if conn.failover_seen_at:
            self._retire_opened_before(conn.failover_seen_at, conn.failover_sqlstate)
        if close or self.closed:
            return CLOSE
        if self._retired(conn, time.monotonic()):
            return CONNECTIONS_EXPIRED
        always = self.reset == "always"
        counted = conn.session_dirty or always
        # Anything reset_session() raises (it returns False for database
        # errors) goes on to the caller: it may be a signal handler's
        # exception, which must not be swallowed. putconn() closes the
        # connection and frees its slot first.
        kept = reset_session(conn, always=always, guard=lambda: self._deadline(conn, self.timeout))
        if not kept:
            return RETURNS_BAD
        return KEPT_RESET if counted else KEPT

    def _finish_return(
        self, conn: PooledConnection, token: int, key: Hashable | None, outcome: str, close: bool
    ) -> None:
        """Take the loan back under the lock: keep the connection, or close it."""
        returned_at = time.monotonic()
        with self._lock:
            if conn.reclaimed:
                return  # its borrower exited and maintenance took it back meanwhile
            if self._used.get(token) is not conn:
                raise PoolError(
                    f"connection returned to {self.name} is not checked out from it "
                    "(returned twice, or taken from another pool)"
                )
            if self._keys:
                if key is None:
                    key = next((k for k, c in self._keys.items() if c is conn), None)
                if key is not None:
                    self._keys.pop(key, None)
            self._stats[USAGE_MS] += int((returned_at - conn.borrowed_at) * 1000)
            if outcome in (KEPT, KEPT_RESET) and not self.closed and self._paused_at is None:
                if outcome is KEPT_RESET:
                    self._stats[RETURNS_RESET] += 1
                conn.returned_at = returned_at
                # No longer this thread's: a handed-over connection must not
                # look orphaned if this thread exits before the waiter runs.
                conn.borrower = None
                conn.revocable_since = conn.revoked_at = 0.0
                del self._used[token]
                conn.loan = 0
                self._make_available(conn)
                return
            # Closed below; the slot stays reserved (under the loan's number)
            # until then. The loan dropped first, as in _replace_lent():
            # interrupted in between, _give_back(token, conn) closes it.
            del self._used[token]
            self._reserved[token] = _Reservation(CLOSING, threading.current_thread(), conn)
            conn.loan = 0
            conn.borrower = None
            reason = None if outcome in (CLOSE, KEPT, KEPT_RESET) else outcome
            if reason is not None:
                self._stats[reason] += 1
            self._stats[CONNECTIONS_CLOSED] += 1
        _close_quietly(conn)
        self._log(
            logging.DEBUG, "connection closed at return (%s)", _why(reason, close or self.closed)
        )
        self._release(token)

    def _make_available(self, conn: PooledConnection) -> None:
        """Hand ``conn`` (lent to no one) to the longest waiter, else keep it idle. Lock held.

        The hand-off dequeues the waiter, lends under its number, then tells
        it. Interrupted in between, the waiter holds a loan it finds when it
        wakes, or one _give_back() takes back when it gives up, or nothing
        (it times out; the connection, recorded nowhere, is closed by the
        returning thread's _give_back()): never a stale loan, never a waiter
        served twice.
        """
        if not self._waiters:
            self._idle.append(conn)
            return
        waiter = self._waiters.popleft()
        now = time.monotonic()
        # The waiter's from now on (for status and dead-borrower checks).
        conn.borrower, conn.borrowed_at = waiter.thread, now
        conn.loan = waiter.token
        self._used[waiter.token] = conn
        self._stats.record_wait(now - waiter.since)
        waiter.conn = conn
        waiter.wake()

    def _release(self, token: int) -> None:
        """Free the slot reserved under ``token`` (if it still is), for the longest waiter."""
        with self._lock:
            if self._reserved.pop(token, None) is not None:
                self._slot_freed_locked()

    def _slot_freed_locked(self) -> None:
        """Pass a freed slot to the longest waiter, or ask for a refill. Lock held."""
        if (
            self._waiters
            and not self.closed
            and self._paused_at is None
            and self._size_locked() < self.maxconn
        ):
            waiter = self._waiters.popleft()  # then reserve: as in _make_available()
            self._reserved[waiter.token] = _Reservation(OPENING, waiter.thread)
            self._stats.record_wait(time.monotonic() - waiter.since)
            waiter.granted = True
            waiter.wake()
        elif self._size_locked() < self.minconn and not (
            self.closed or self._dormant or self._paused_at is not None
        ):
            maintenance.wake()

    # -- leases (Django's CONN_MAX_AGE) ---------------------------------------

    def lease_idle(self, conn: PooledConnection, loan: int) -> bool:
        """Say that the holder of loan ``loan`` is between requests; return True
        if it may keep ``conn`` as a lease.

        Until its ``lease_claim()``, the holder doesn't touch the connection,
        and the pool may revoke the loan for a borrower that would otherwise
        wait: reset the session and lend it on. False: return it now instead,
        because a borrower waits already, or it is retired (max_lifetime,
        reconnect(), a failover), or the pool is paused or closed.
        """
        now = time.monotonic()
        with self._lock:
            if (
                self._used.get(loan) is not conn
                or conn.revoked_at
                or self._waiters
                or self.closed
                or self._paused_at is not None
                or conn.failover_seen_at
                or self._retired(conn, now)
            ):
                return False
            self._leasing = True
            conn.revocable_since = now
            return True

    def lease_claim(self, conn: PooledConnection, loan: int) -> bool:
        """Return True if the holder of loan ``loan`` may use ``conn`` again (it is
        in use until the next ``lease_idle()``), False if the pool revoked the
        loan: the holder must forget ``conn`` and never touch it again."""
        with self._lock:
            if self._used.get(loan) is not conn or conn.revoked_at:
                return False
            conn.revocable_since = 0.0
            conn.claimed_at = time.monotonic()
            conn.leak_reported = False
            return True

    def _revoke_lease_locked(self) -> PooledConnection | None:
        """Revoke the lease between requests the longest, if any; return its
        connection, for the caller to return with its loan. Lock held."""
        if not self._leasing:
            return None
        revoked = None
        for conn in self._used.values():
            if conn.revocable_since and (
                revoked is None or conn.revocable_since < revoked.revocable_since
            ):
                revoked = conn
        if revoked is not None:
            revoked.revocable_since = 0.0
            revoked.revoked_at = time.monotonic()
            # The revoking thread returns it now: were the holder's thread
            # gone, maintenance must not take it back as an orphan meanwhile.
            revoked.borrower = threading.current_thread()
            self._stats[LEASES_REVOKED] += 1
        return revoked

    def _take_leases_locked(
        self,
        reason: str | None,
        reserved: list[tuple[PooledConnection, str | None, int]],
        retired_at: float | None = None,
    ) -> None:
        """Move the leases between requests (with ``retired_at``: the retired ones)
        to slots reserved for closing them, as _take_idle_locked(). Lock held.

        Their holders' lease_claim() fails from then on.
        """
        for loan, conn in list(self._used.items()):
            if not conn.revocable_since or (
                retired_at is not None and not self._retired(conn, retired_at)
            ):
                continue
            reserved.append((conn, reason, loan))
            del self._used[loan]  # the loan ended first, as in _replace_lent()
            self._reserved[loan] = _Reservation(CLOSING, threading.current_thread(), conn)
            conn.revocable_since = 0.0
            conn.revoked_at = time.monotonic()
            self._stats[LEASES_REVOKED] += 1

    # -- closing -------------------------------------------------------------

    def reconnect(self) -> None:
        """Replace every connection, gracefully (PgBouncer's RECONNECT).

        Idle connections and leases between requests are closed now,
        borrowed ones when they are returned (or their lease ends); the pool
        keeps serving with new connections meanwhile.
        """
        reserved: list[tuple[PooledConnection, str | None, int]] = []
        try:
            with self._lock:
                self._reconnected_at = time.monotonic()
                self._take_idle_locked(list(self._idle), CONNECTIONS_EXPIRED, reserved)
                self._take_leases_locked(CONNECTIONS_EXPIRED, reserved)
            maintenance.wake()  # refill minconn with new connections
        finally:
            self._close_reserved(reserved)

    def _take_idle_locked(
        self,
        conns: list[PooledConnection],
        reason: str | None,
        reserved: list[tuple[PooledConnection, str | None, int]],
    ) -> None:
        """Move idle connections to slots reserved for closing them. Lock held.

        Each is recorded in ``reserved``, taken out of ``_idle``, then given
        its reservation: ``_close_reserved(reserved)`` in a ``finally`` then
        closes whatever an interruption left half moved.
        """
        for conn in conns:
            token = next(self._tokens)
            reserved.append((conn, reason, token))
            # Out of _idle first: never counted twice, even for an instant
            # another thread could see after an interruption.
            self._idle.remove(conn)
            self._reserved[token] = _Reservation(CLOSING, threading.current_thread(), conn)

    def pause(self) -> None:
        """Stop lending (PgBouncer's PAUSE): borrowers wait, up to their timeout.

        Idle connections are closed now, borrowed ones when they are returned;
        none is opened until resume(). For a planned switchover: pause, wait
        until no connection is left (``get_stats()["pool_size"] == 0``), move
        the primary, resume.
        """
        reserved: list[tuple[PooledConnection, str | None, int]] = []
        try:
            with self._lock:
                if self._paused_at is None:
                    self._paused_at = time.time()
                self._take_idle_locked(list(self._idle), None, reserved)
                self._take_leases_locked(None, reserved)
        finally:
            self._close_reserved(reserved)
        self._log(logging.INFO, "paused")

    def resume(self) -> None:
        """Lend again after pause(); the borrowers waiting are served first, in order."""
        with self._lock:
            if self._paused_at is None:
                return
            self._paused_at = None
            # Each free slot to the longest waiter, as when a slot is freed.
            for _ in range(min(len(self._waiters), self.maxconn - self._size_locked())):
                self._slot_freed_locked()
        maintenance.wake()  # refill minconn
        self._log(logging.INFO, "resumed")

    @property
    def paused_since(self) -> float | None:
        """Return when pause() was called (``time.time()``), or None if lending."""
        return self._paused_at

    def _retire_opened_before(self, moment: float, sqlstate: str) -> None:
        """Retire every connection opened before ``moment`` (a failover error then).

        As reconnect(): idle ones are closed by the next maintenance round (woken
        now) or at their next borrow, lent ones when they are returned; new
        connections go wherever libpq's host list now leads.
        """
        with self._lock:
            if moment <= self._reconnected_at:
                return  # retired already (another connection said so first)
            # Several connections fail within one event: say it once.
            news = moment - self._reconnected_at > RETIRE_QUIET
            self._reconnected_at = moment
        self._log(
            logging.WARNING if news else logging.DEBUG,
            "SQLSTATE %s: the server is no longer the one to use (a failover?); retiring "
            "every connection opened before it",
            sqlstate,
        )
        maintenance.wake()

    def activity(self) -> dict[str, Any]:
        """Return the stats plus what is going on right now (for status snapshots)."""
        now = time.monotonic()
        with self._lock:
            stats: dict[str, Any] = self._stats_locked()
            longest_wait = now - self._waiters[0].since if self._waiters else 0.0
            oldest = min(self._used.values(), key=lambda c: c.borrowed_at, default=None)
            retired = self._retired_in_use_locked()
            wait_buckets = list(self._stats.wait_counts)
            paused_since = self._paused_at
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
            "paused_since": paused_since,
        }

    def retired_in_use(self) -> int:
        """Return how many connections opened before the last reconnect() are still out."""
        with self._lock:
            return self._retired_in_use_locked()

    def _retired_in_use_locked(self) -> int:
        return sum(1 for c in self._used.values() if c.created_at < self._reconnected_at)

    def closeall(self) -> None:
        """Close idle connections now and the others as they are returned. Idempotent."""
        reserved: list[tuple[PooledConnection, str | None, int]] = []
        try:
            with self._lock:
                self.closed = True
                now = time.monotonic()
                while self._waiters:
                    waiter = self._waiters.popleft()
                    waiter.error = PoolClosed(f"connection pool {self.name} is closed")
                    self._stats.record_wait(now - waiter.since)
                    waiter.wake()
                self._take_idle_locked(list(self._idle), None, reserved)
                self._take_leases_locked(None, reserved)
        finally:
            self._close_reserved(reserved)

    # -- background maintenance (called by the maintenance thread) ------------

    def maintain(self) -> None:
        """Close expired and surplus idle connections, refill to minconn, cut off
        overdue round trips, take back the connections of dead threads."""
        now = time.monotonic()
        reserved: list[tuple[PooledConnection, str | None, int]] = []
        refill: tuple[threading.Thread, list[int]] | None = None
        cut: list[int] = []
        try:
            with self._lock:
                if self._pid != os.getpid() or self._dormant:
                    return
                self._recover_abandoned_locked(now, reserved)
                if not self.closed and self._paused_at is None:
                    self._trim_idle_locked(now, reserved)
                    self._take_leases_locked(CONNECTIONS_EXPIRED, reserved, retired_at=now)
                    refill = self._reserve_refill_locked(now, len(reserved))
                cut = self._claim_overdue_locked(now)
            while cut:
                _shut_down(cut.pop())
                self._log(logging.WARNING, "a health check or reset overran its deadline; cut off")
            if refill is not None:
                self._start_refill(*refill)
            # Borrowed connections close at return, even in a closed pool; those
            # of dead threads never will be returned.
            reserved.extend(self._reclaim_orphans())
            self._report_leaks(now)
        finally:
            for fd in cut:  # interrupted before they were shut down
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._close_reserved(reserved)

    def _recover_abandoned_locked(
        self, now: float, reserved: list[tuple[PooledConnection, str | None, int]]
    ) -> None:
        """Take back the reservations whose owners will never free them. Lock held.

        Closes left unfinished go to ``reserved`` (finished by the caller);
        openings whose owner thread is gone are freed now.
        """
        for token, reservation in list(self._reserved.items()):
            if now - reservation.since < self.abandoned_after:
                continue
            if reservation.purpose == CLOSING and reservation.conn is not None:
                reservation.since = now  # ours now: not taken again by the next round
                reserved.append((reservation.conn, None, token))
            elif reservation.purpose == OPENING and not reservation.owner.is_alive():
                del self._reserved[token]
                self._slot_freed_locked()
            else:
                continue
            self._log(logging.WARNING, "took back a slot abandoned while %s", reservation.purpose)

    def _trim_idle_locked(
        self, now: float, reserved: list[tuple[PooledConnection, str | None, int]]
    ) -> None:
        """Take out expired, dead and surplus idle connections, to be closed. Lock held."""
        surplus = self._size_locked() - self.minconn
        going: list[tuple[PooledConnection, str | None]] = []
        for conn in self._idle:  # oldest returned first
            if self._retired(conn, now):
                going.append((conn, CONNECTIONS_EXPIRED))
            elif conn.closed or _has_pending_input(conn):
                going.append((conn, CONNECTIONS_LOST))
            elif surplus > len(going) and now - conn.returned_at > self.max_idle:
                going.append((conn, None))
        for conn, reason in going:
            self._take_idle_locked([conn], reason, reserved)

    def _reserve_refill_locked(
        self, now: float, closing: int
    ) -> tuple[threading.Thread, list[int]] | None:
        """Reserve the slots a refill to minconn needs; return the thread (not started)
        that will open connections in them and their numbers, or None. Lock held.

        ``closing`` connections are about to go: they are replaced now, as far
        as maxconn allows, not a round later. Slots being opened already (a
        refill under way) count as taken, so two rounds never refill twice.
        """
        if now < self._refill_after:
            return None
        size = self._size_locked()
        deficit = min(self.minconn - (size - closing), self.maxconn - size)
        if deficit <= 0:
            return None
        tokens: list[int] = []
        # A thread of its own: a slow or unreachable server must not hold up
        # the maintenance of every other pool. It owns the reservations: if it
        # never starts, or dies, maintenance takes them back.
        thread = threading.Thread(
            target=self._refill, args=(tokens,), name="django_pgpool-refill", daemon=True
        )
        for _ in range(deficit):
            token = next(self._tokens)
            tokens.append(token)
            self._reserved[token] = _Reservation(OPENING, thread)
        return thread, tokens

    def _claim_overdue_locked(self, now: float) -> list[int]:
        """Mark overdue round trips as cut and return dups of their sockets. Lock held.

        The sockets are shut down after the lock is released, but the round
        trips are marked now: their owners, ending them under the lock, then
        know the connection was cut even if their query had just succeeded.
        A dup (no I/O, never blocks) keeps the socket ours to shut down even
        if its owner closes the connection meanwhile.
        """
        fds: list[int] = []
        for key, trip in list(self._deadlines.items()):
            if trip.due > now or trip.cut:
                continue
            trip.cut = True
            try:
                fds.append(os.dup(trip.conn.fileno()))
            except (OSError, psycopg2.Error):
                del self._deadlines[key]  # closed already: nothing left to cut
        return fds

    def _start_refill(self, thread: threading.Thread, tokens: list[int]) -> None:
        """Start a refill thread; if it can't be started, free its slots and back off."""
        try:
            thread.start()
        except Exception as exc:
            with self._lock:
                self._refill_backoff_locked()
            self._log(logging.WARNING, "couldn't start a refill thread: %s", exc)
            for token in tokens:
                self._release(token)

    def _refill_backoff_locked(self) -> None:
        # Back off exponentially: a server that refuses us (wrong password,
        # dropped database) must not be hammered.
        self._refill_failures += 1
        backoff = min(REFILL_BACKOFF * 2 ** (self._refill_failures - 1), 60.0)
        self._refill_after = time.monotonic() + backoff

    def _refill(self, tokens: list[int]) -> None:
        """Open connections in the slots reserved under ``tokens``; stop at the first failure."""
        try:
            while tokens:
                try:
                    conn = self._connect()
                except Exception as exc:
                    with self._lock:
                        self._refill_backoff_locked()
                    self._log(logging.WARNING, "couldn't open a connection: %s", exc)
                    return
                with self._lock:
                    self._refill_failures = 0
                    token = tokens.pop()
                    ours = self._reserved.pop(token, None) is not None
                    if ours and not self.closed and self._paused_at is None:
                        self._make_available(conn)
                        continue
                    if ours:
                        self._slot_freed_locked()
                    self._stats[CONNECTIONS_CLOSED] += 1
                _close_quietly(conn)
        finally:
            for token in tokens:
                self._release(token)

    def _close_reserved(self, reserved: list[tuple[PooledConnection, str | None, int]]) -> None:
        """Close connections moved to reserved slots (no lock held), then free the slots.

        Every slot is freed, even if closing one is interrupted.
        """
        try:
            for conn, reason, _ in reserved:
                _close_quietly(conn)
                self._log(logging.DEBUG, "connection closed (%s)", _why(reason, self.closed))
                with self._lock:
                    if reason is not None:
                        self._stats[reason] += 1
                    self._stats[CONNECTIONS_CLOSED] += 1
        finally:
            for _, _, token in reserved:
                self._release(token)

    def _reclaim_orphans(self) -> list[tuple[PooledConnection, str | None, int]]:
        """Take back lent connections that nobody can return any more.

        Those of borrower threads that have exited, and those nobody holds
        (only the pool refers to them: a borrower dropped one without
        returning it, or was interrupted before its return did anything, so
        no code can ever return it). Their session state is unknown, so they
        are closed, never reused; the caller closes them and frees their
        slots (``_close_reserved()``).
        """
        reclaimed: list[tuple[PooledConnection, str | None, int]] = []
        with self._lock:
            now = time.monotonic()
            for token in list(self._used):
                revoked_at = self._used[token].revoked_at
                # A revocation whose return never ran (its thread interrupted):
                # the holder, which may never run again, keeps a reference.
                abandoned = (
                    revoked_at
                    and now - revoked_at > self.abandoned_after
                    and id(self._used[token]) not in self._deadlines  # not being reset
                )
                if not (
                    abandoned or self._unreferenced_locked(token) or _orphaned(self._used[token])
                ):
                    continue
                # The slot stays taken until it is closed. The loan dropped
                # first, as in _replace_lent(): never both at once.
                # Interrupted in between, nothing refers to the connection
                # any more: its slot is free and it closes when collected.
                conn = self._used.pop(token)
                self._reserved[token] = _Reservation(CLOSING, threading.current_thread(), conn)
                conn.reclaimed = True
                # A key must not lead to it any more (getconn(key) reads _keys).
                for key in [k for k, c in self._keys.items() if c is conn]:
                    del self._keys[key]
                reclaimed.append((conn, CONNECTIONS_RECLAIMED, token))
        for conn, _, _ in reclaimed:
            borrower = conn.borrower
            self._log(
                logging.WARNING,
                "%s without returning its connection; closing it and freeing its slot",
                f"thread {borrower.name!r} exited"
                if borrower is not None and not borrower.is_alive()
                else "nobody holds a lent connection any more: it was dropped",
            )
        return reclaimed

    def _unreferenced_locked(self, token: int) -> bool:
        """Return True if nothing but the pool refers to the connection lent under ``token``.

        Lock held. The pool's own references: ``_used``, a key in ``_keys``,
        a round trip in ``_deadlines``. Anything else that can reach the
        connection (a variable, a cursor, a Django wrapper, a traceback)
        holds a strong reference, so this is never wrong the other way: a
        connection someone can still use is never taken.
        """
        conn = self._used[token]
        ours = _REFS_OF_A_DICT_VALUE + 1  # + this function's own local
        ours += sum(1 for c in self._keys.values() if c is conn)
        trip = self._deadlines.get(id(conn))
        if trip is not None and trip.conn is conn:
            ours += 1
        return sys.getrefcount(conn) <= ours

    def _report_leaks(self, now: float) -> None:
        """Warn once per borrow about connections held longer than leak_timeout."""
        if self.leak_timeout is None:
            return
        with self._lock:
            leaks = [
                c
                for c in self._used.values()
                # A lease between requests is not in use; in use, it is timed
                # from its claim, not from its borrow.
                if not c.leak_reported
                and not c.revocable_since
                and now - c.claimed_at > self.leak_timeout
            ]
            for conn in leaks:
                conn.leak_reported = True
                self._stats[CONNECTIONS_LEAKED] += 1
        for conn in leaks:
            self._log(
                logging.WARNING,
                "connection held for %.1f s (leak_timeout=%s) by thread %r, taken at:\n%s",
                now - conn.claimed_at,
                self.leak_timeout,
                conn.borrower.name if conn.borrower else "?",
                conn.borrow_stack,
            )

    # -- fork ----------------------------------------------------------------

    def after_fork_in_child(self) -> None:
        """Forget the parent's connections without touching their sessions.

        Runs in the child right after fork(), when no other thread exists: the
        parent's lock may have been held at fork time, so it is not taken.
        The pool stays usable, but dormant: it opens nothing until the child
        borrows from it.
        """
        for conn in self._idle:
            detach_inherited(conn)
        for conn in self._used.values():
            # Another parent thread may have been inside a query on it.
            detach_inherited(conn, close=False)
        closed = self.closed
        self._init_state()
        self.closed = closed
        self._dormant = True

    # -- statistics and invariants ------------------------------------------

    def get_stats(self) -> dict[str, int]:
        """Return the pool's gauges and counters (psycopg_pool's key names)."""
        with self._lock:
            return self._stats_locked()

    def pop_stats(self) -> dict[str, int]:
        """Return the statistics and reset the counters and the wait histogram."""
        with self._lock:
            stats = self._stats_locked()
            self._stats.clear()
            return stats

    def _stats_locked(self) -> dict[str, int]:
        gauges = (
            self.minconn,
            self.maxconn,
            self._size_locked(),
            len(self._idle),
            len(self._used),
            sum(1 for c in self._used.values() if c.revocable_since),
            len(self._waiters),
        )
        return {**dict(zip(GAUGE_KEYS, gauges, strict=True)), **self._stats.counters()}

    def check_invariants(self, quiescent: bool = False) -> None:
        """Raise InvariantError unless the bookkeeping is consistent (module docstring).

        ``quiescent``: nothing is in progress (no borrow, return or
        maintenance round under way), so the stronger invariant 5 holds too.
        """
        with self._lock:
            problems = self._invariant_problems_locked(quiescent)
        if problems:
            raise InvariantError(f"{self.name}: " + "; ".join(problems))

    def _invariant_problems_locked(self, quiescent: bool) -> list[str]:
        problems = []
        size = self._size_locked()
        if size > self.maxconn:
            problems.append(f"{size} slots taken, maxconn {self.maxconn}")
        idle_ids = [id(c) for c in self._idle]
        used_ids = [id(c) for c in self._used.values()]
        if len(set(idle_ids)) != len(idle_ids):
            problems.append("a connection is idle twice")
        if len(set(used_ids)) != len(used_ids):
            problems.append("a connection is lent twice")
        if set(idle_ids) & set(used_ids):
            problems.append("a connection is both idle and lent")
        if any(conn.loan != token for token, conn in self._used.items()):
            problems.append("a lent connection doesn't carry its loan number")
        if any(conn.loan for conn in self._idle):
            problems.append("an idle connection carries a loan number")
        if any(conn.revocable_since or conn.revoked_at for conn in self._idle):
            problems.append("an idle connection is still leased")
        if any(conn.revocable_since and conn.revoked_at for conn in self._used.values()):
            problems.append("a revoked lease is revocable again")
        if self._used.keys() & self._reserved.keys():
            problems.append("a number is both a loan and a reservation")
        for waiter in self._waiters:
            if waiter.served or waiter.token in self._used or waiter.token in self._reserved:
                problems.append("a queued waiter holds something already")
            if not waiter.thread.is_alive():
                problems.append("a queued waiter's thread has exited")
        if quiescent:
            if self._deadlines:
                problems.append(f"{len(self._deadlines)} round trip(s) under way")
            if self._reserved:
                problems.append(f"{len(self._reserved)} slot(s) reserved with nothing in progress")
            lending = self._paused_at is None and not self.closed
            if lending and self._waiters and (self._idle or size < self.maxconn):
                problems.append("a borrower waits while a connection or a slot is free")
            if self._paused_at is not None and self._idle:
                problems.append("a paused pool keeps idle connections")
        return problems

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name} minconn={self.minconn} maxconn={self.maxconn}"
            f"{' closed' if self.closed else ''}>"
        )

    # -- psycopg2 drop-in and context managers -------------------------------
    # What code written for psycopg2's SimpleConnectionPool/ThreadedConnectionPool
    # needs beyond getconn/putconn/closeall, and the observation hook behind
    # django_pgpool.otel. See docs/without-django.md.

    # A psycopg2 connection class given as connection_factory -> the class that
    # is both it and a PooledConnection. Filled with setdefault (atomic under
    # the GIL): two pools racing on the same class both get the one kept.
    _pooled_factories: dict[type, type[PooledConnection]] = {}

    @staticmethod
    def _pooled_factory(factory: Any) -> type[PooledConnection]:
        """Return a PooledConnection class that is also ``factory`` (a psycopg2
        connection class, as psycopg2's pools pass to ``psycopg2.connect()``)."""
        if not isinstance(factory, type) or not issubclass(factory, ext.connection):
            raise TypeError(
                "connection_factory must be a subclass of psycopg2.extensions.connection, "
                f"not {factory!r}"
            )
        if issubclass(factory, PooledConnection):
            return factory
        pooled = ConnectionPool._pooled_factories.get(factory)
        if pooled is None:
            try:
                # The user's class first: its cursor() picks the cursor class
                # (RealDictConnection's), then ours wraps it to track it.
                made = type(
                    f"Pooled{factory.__name__}",
                    (factory, PooledConnection),
                    {"__module__": factory.__module__},
                )
            except TypeError as exc:
                raise TypeError(
                    f"connection_factory {factory.__qualname__} can't be combined with "
                    f"PooledConnection ({exc}); subclass django_pgpool.session.PooledConnection"
                ) from exc
            pooled = ConnectionPool._pooled_factories.setdefault(factory, made)
        return pooled

    @contextlib.contextmanager
    def connection(self) -> Iterator[PooledConnection]:
        """Lend a connection for a ``with`` block, which is one transaction: committed
        at the end, rolled back if the block raises. The connection is returned
        either way (a broken one is discarded)."""
        conn = self.getconn()
        # Returned under its loan number: right even if the generator is
        # finished by another thread (garbage collection).
        loan = conn.loan
        try:
            if conn.autocommit:
                # Django's connections are lent in autocommit mode: the block
                # still gets a transaction (free while idle; the return sets
                # autocommit back).
                conn.autocommit = False
            yield conn
        except BaseException:
            if not conn.closed:
                # A failed rollback leaves a broken connection: the return
                # discards it, and the block's own exception goes on.
                with contextlib.suppress(psycopg2.Error):
                    conn.rollback()
            raise
        else:
            conn.commit()
        finally:
            self.putconn(conn, loan=loan)

    @contextlib.contextmanager
    def cursor(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Like connection(), yielding a cursor (``conn.cursor(*args, **kwargs)``),
        closed before the commit or rollback."""
        with self.connection() as conn, conn.cursor(*args, **kwargs) as cur:
            yield cur

    def __enter__(self) -> ConnectionPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the pool (closeall()): idle connections now, lent ones when returned."""
        self.closeall()

    # Events told to observers: a new connection, a borrow, a return, a timeout.
    CREATE = "create"
    WAIT = "wait"
    USE = "use"
    TIMEOUT = "timeout"
    _observers: tuple[Callable[[ConnectionPool, str, float], None], ...] = ()

    def observe(self, observer: Callable[[ConnectionPool, str, float], None]) -> None:
        """Call ``observer(pool, event, seconds)`` from now on (django_pgpool.otel uses it).

        Events: CREATE, the time a new connection took to open and set up;
        WAIT, the time getconn() took (waiting, checking, opening); USE, the
        time a connection was held, at its return; TIMEOUT, the time a
        borrow waited before PoolTimeout. Called by the thread concerned,
        never under the pool's lock; an observer that raises is logged and
        ignored.

        Costs nothing until a pool is observed: the first observer wraps
        getconn(), putconn() and the connect of this instance only.
        Observers are kept in a tuple replaced (never mutated) under the
        pool's lock and read without it.
        """
        with self._lock:
            first = not self._observers
            self._observers = (*self._observers, observer)
        if first:
            self._wrap_for_observers()

    def unobserve(self, observer: Callable[[ConnectionPool, str, float], None]) -> None:
        """Stop calling ``observer`` (the timing wrappers stay, calling no one)."""
        with self._lock:
            self._observers = tuple(o for o in self._observers if o != observer)

    def _tell(self, event: str, seconds: float) -> None:
        for observer in self._observers:
            try:
                observer(self, event, seconds)
            except Exception:
                logger.exception("pool %s: observer %s failed", self.name, callable_name(observer))

    def _wrap_for_observers(self) -> None:
        """Shadow getconn, putconn and _connect on this instance with timed versions."""
        plain_getconn, plain_putconn, plain_connect = self.getconn, self.putconn, self._connect

        def getconn(key: Hashable | None = None) -> PooledConnection:
            started = time.monotonic()
            try:
                conn = plain_getconn(key)
            except PoolTimeout:
                self._tell(ConnectionPool.TIMEOUT, time.monotonic() - started)
                raise
            self._tell(ConnectionPool.WAIT, time.monotonic() - started)
            return conn

        def putconn(
            conn: ext.connection,
            key: Hashable | None = None,
            close: bool = False,
            *,
            loan: int | None = None,
        ) -> None:
            # Told of a loan of this process's that this call ends, not of a
            # stale return (it raises) nor of an inherited connection.
            lent = (
                isinstance(conn, PooledConnection)
                and conn.loan != 0
                and conn.pool_pid == self._pid
                and not conn.reclaimed
            )
            borrowed_at = conn.borrowed_at if isinstance(conn, PooledConnection) else 0.0
            plain_putconn(conn, key, close, loan=loan)
            if lent:
                self._tell(ConnectionPool.USE, time.monotonic() - borrowed_at)

        def connect() -> PooledConnection:
            started = time.monotonic()
            conn = plain_connect()
            self._tell(ConnectionPool.CREATE, time.monotonic() - started)
            return conn

        self.__dict__.update(getconn=getconn, putconn=putconn, _connect=connect)


class _ThreadKey:
    """The key of one thread's connection in a PersistentConnectionPool."""

    __slots__ = ()


class PersistentConnectionPool(ConnectionPool):
    """One connection per thread, for code written for psycopg2's former
    ``PersistentConnectionPool`` (removed from psycopg2 2.9): ``getconn()``
    returns the calling thread's connection until ``putconn()`` gives it back.

    psycopg2 keyed it by thread id, and ids are reused: a new thread got a
    dead thread's connection, maybe mid-transaction. Here the key is a token
    kept in a ``threading.local``, which dies with its thread: a new thread
    never finds an old one's connection, and the pool takes back the
    connection of a thread that exited holding it (dead-thread reclaim).
    The rest is ConnectionPool's (waiting, checks, the reset at return).
    """

    def __init__(self, minconn: int, maxconn: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(minconn, maxconn, *args, **kwargs)
        # Each thread reads and writes only its own attribute: no lock.
        self._thread_keys = threading.local()

    def _thread_key(self) -> _ThreadKey:
        key: _ThreadKey | None = getattr(self._thread_keys, "key", None)
        if key is None:
            key = self._thread_keys.key = _ThreadKey()
        return key

    def getconn(self, key: Hashable | None = None) -> PooledConnection:
        """Return this thread's connection, borrowing one if it has none (or ``key``'s)."""
        return super().getconn(self._thread_key() if key is None else key)

    def putconn(
        self,
        conn: ext.connection | None = None,
        key: Hashable | None = None,
        close: bool = False,
        *,
        loan: int | None = None,
    ) -> None:
        """Give back this thread's connection (or ``conn``); psycopg2's signature."""
        if conn is None:
            key = self._thread_key() if key is None else key
            conn = self._keys.get(key)  # a dict read is atomic
            if conn is None:
                raise PoolError(f"this thread holds no connection of {self.name} to put back")
        super().putconn(conn, key, close, loan=loan)
