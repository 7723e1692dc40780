"""Session state: notice, for free, what a borrower changed, and undo it at return.

A connection handed out must be indistinguishable from a fresh one. The
thorough way (``DISCARD ALL`` on every return) costs a round trip per request,
which doubles the cost of a one-query request. Instead each connection knows
what it looked like when it was opened (its ``Baseline``) and is marked
*dirty* when a borrower does something that can outlive the transaction:

* SQL that changes the session: every statement passes through
  ``TrackingCursor.execute`` and a cheap regular expression flags
  ``SET``/``RESET``/``LISTEN``/``PREPARE``/``DECLARE``/temp tables/session
  advisory locks/``set_config()``/``DO``/``CALL``... (false positives only
  cost one ``DISCARD ALL``);
* ``WITH HOLD`` named cursors (Django's ``.iterator()`` in autocommit mode);
* client-side signals read at return without a round trip: the server's
  reported parameters (TimeZone, application_name, role, DateStyle, ...),
  pending notifications, psycopg2 session flags (``set_session``).

A clean connection costs nothing at return; an open transaction costs a
``ROLLBACK``; a dirty one a ``DISCARD ALL``. ``reset="always"`` sends
``DISCARD ALL`` on every return for those who want no inference at all.
What no client-side inspection can see (a server function that changes
session state on its own) is the documented limit of ``reset="auto"``.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions as ext

__all__ = [
    "Baseline",
    "PooledConnection",
    "TrackingCursor",
    "changes_session",
    "reset_session",
    "tracking_cursor_class",
]

# Statements that change session state when they start a statement.
# SET LOCAL / SET TRANSACTION / SET CONSTRAINTS only last for the transaction.
_LEADING = re.compile(
    r"(?:^|;)(?:\s|--[^\n]*(?:\n|$)|/\*.*?\*/)*"
    r"(?:SET(?!\s+(?:LOCAL|TRANSACTION|CONSTRAINTS)\b)|RESET|DISCARD|LISTEN|PREPARE|DEALLOCATE"
    r"|DECLARE|LOAD|DO|CALL)\b",
    re.IGNORECASE | re.DOTALL,
)
# Session state created anywhere in a statement.
_ANYWHERE = re.compile(
    r"CREATE\s+(?:GLOBAL\s+|LOCAL\s+)?TEMP|INTO\s+(?:TEMP|TEMPORARY)\b|\bpg_temp\b"
    r"|\bset_config\s*\(|advisory_lock(?:_shared)?\s*\(",
    re.IGNORECASE,
)

# Parameters the server reports to the client on change (GUC_REPORT), so a
# changed value is visible without a query. search_path is reported from PG 18.
_REPORTED = (
    "TimeZone",
    "application_name",
    "DateStyle",
    "IntervalStyle",
    "client_encoding",
    "standard_conforming_strings",
    "is_superuser",
    "session_authorization",
    "default_transaction_read_only",
    "search_path",
)


def changes_session(sql: Any) -> bool:
    """Return True if executing ``sql`` may change state that outlives the transaction."""
    if isinstance(sql, bytes):
        sql = sql.decode("utf-8", "replace")
    elif not isinstance(sql, str):
        # psycopg2.sql.Composable and the like: we cannot read it cheaply.
        return True
    # Cheap tests first: this runs for every statement. Without a ';' only the
    # start of the text can begin a statement, and _ANYWHERE can only match
    # text that contains one of its few words.
    if _LEADING.match(sql) if ";" not in sql else _LEADING.search(sql):
        return True
    lowered = sql.lower()
    if "temp" in lowered or "set_config" in lowered or "advisory_lock" in lowered:
        return bool(_ANYWHERE.search(sql))
    return False


class TrackingCursor(ext.cursor):
    """The cursor class of pooled connections: marks the connection dirty when needed."""

    connection: PooledConnection

    def execute(self, query: Any, vars: Any = None) -> None:
        if self.withhold or changes_session(query):
            self.connection.session_dirty = True
        return super().execute(query, vars)

    def executemany(self, query: Any, vars_list: Any) -> None:
        if changes_session(query):
            self.connection.session_dirty = True
        return super().executemany(query, vars_list)

    def callproc(self, procname: Any, parameters: Any = None) -> Any:
        # A function can do anything to the session.
        self.connection.session_dirty = True
        return super().callproc(procname, parameters)


_tracking_subclasses: dict[type, type] = {}


def tracking_cursor_class(cursor_class: type) -> type:
    """Return ``cursor_class`` with session tracking mixed in (cached per class)."""
    if issubclass(cursor_class, TrackingCursor):
        return cursor_class
    if cursor_class is ext.cursor:
        return TrackingCursor
    # Races only create an equivalent class twice; the dict assignment is atomic.
    tracked = _tracking_subclasses.get(cursor_class)
    if tracked is None:
        tracked = type(f"Tracking{cursor_class.__name__}", (TrackingCursor, cursor_class), {})
        _tracking_subclasses[cursor_class] = tracked
    return tracked


class PooledConnection(ext.connection):
    """A psycopg2 connection that carries the pool's bookkeeping.

    Who writes which attribute, and why none needs a lock of its own:

    * Set once by the thread that opens it, before the pool records it
      anywhere another thread could find it: ``baseline``, ``created_at``,
      ``expires_at``, ``pool_pid``.
    * Written under the pool's lock: ``loan``, ``returned_at``, ``reclaimed``
      (by maintenance, or a waiter about to time out, taking back the
      connection of a thread that exited), ``leak_reported`` when a leak is
      reported (by maintenance), and ``borrower``/``borrowed_at`` when the
      pool hands it to a waiter or takes it back at return.
    * Written by the thread that holds the loan, outside the lock, right
      after its borrow: ``borrower``, ``borrowed_at``, ``leak_reported``
      (cleared), ``shared``, ``borrow_stack``; and while it holds it:
      ``session_dirty`` (its cursors; cleared by the reset at return) and
      ``input_probe`` (made at its first check; maintenance makes it instead,
      under the lock, for an idle one).
    * Read by maintenance under the pool's lock while the connection is lent
      (``borrower``, ``borrowed_at``, ``shared``, ``leak_reported``): a read
      that races the borrower's writes above only delays a leak report or
      a reclaim by one round.
    """

    session_dirty: bool
    baseline: Baseline | None
    created_at: float
    expires_at: float
    returned_at: float
    borrowed_at: float
    pool_pid: int
    input_probe: Callable[[], bool] | None
    borrower: threading.Thread | None
    borrow_stack: str
    leak_reported: bool
    # Says whether the borrower handed the connection to other threads (Django's
    # inc_thread_sharing()): then its thread exiting doesn't orphan it.
    shared: Callable[[], bool] | None
    reclaimed: bool
    # The number of the loan it is lent under (0 while not lent): written by
    # the pool under its lock (see pool.py, "Slots, loans and reservations").
    loan: int

    def __init__(self, dsn: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(dsn, *args, **kwargs)
        self.session_dirty = False
        self.baseline = None
        self.created_at = self.expires_at = self.returned_at = self.borrowed_at = 0.0
        self.pool_pid = 0
        self.input_probe = None
        self.borrower = None
        self.borrow_stack = ""
        self.leak_reported = False
        self.shared = None
        self.reclaimed = False
        self.loan = 0

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        # Track through a subclass of the class the cursor would have had; the
        # connection's own cursor_factory stays the one the user configured.
        configured: Any = self.cursor_factory
        if len(args) >= 2:
            args = (args[0], tracking_cursor_class(args[1] or configured or ext.cursor), *args[2:])
        else:
            kwargs["cursor_factory"] = tracking_cursor_class(
                kwargs.get("cursor_factory") or configured or ext.cursor
            )
        return super().cursor(*args, **kwargs)


@dataclass(frozen=True)
class Baseline:
    """What a connection looked like when it joined the pool."""

    autocommit: bool
    isolation_level: int | None
    readonly: bool | None
    deferrable: bool | None
    cursor_factory: Any
    parameter_names: tuple[str, ...]
    parameter_values: tuple[str | None, ...]
    typecasters: frozenset[Any]

    @classmethod
    def capture(cls, conn: PooledConnection) -> Baseline:
        status = conn.info.parameter_status
        # Only what this server reports (search_path from PostgreSQL 18 on).
        names = tuple(name for name in _REPORTED if status(name) is not None)
        return cls(
            autocommit=conn.autocommit,
            isolation_level=conn.isolation_level,
            readonly=conn.readonly,
            deferrable=conn.deferrable,
            cursor_factory=conn.cursor_factory,
            parameter_names=names,
            parameter_values=_reported_values(conn, names),
            typecasters=frozenset(conn.string_types),
        )


def _reported_values(conn: PooledConnection, names: tuple[str, ...]) -> tuple[str | None, ...]:
    # Runs at every return. Not tuple(map(...)), as fast, but a tuple built
    # from an iterator of unknown length is resized, and that left the garbage
    # collector's allocation count one higher per call (measured: +1.00, this
    # form +0.01). At one per request it triggered collections, full ones
    # included (about 25 ms with Django loaded, every thread stalled), that a
    # process on persistent connections doesn't run.
    status = conn.info.parameter_status
    return tuple([status(name) for name in names])


def _session_flags_changed(conn: PooledConnection, base: Baseline) -> bool:
    return (
        conn.isolation_level != base.isolation_level
        or conn.readonly != base.readonly
        or conn.deferrable != base.deferrable
    )


def _default(value: Any) -> Any:
    return "DEFAULT" if value is None else value


def reset_session(
    conn: PooledConnection,
    always: bool,
    guard: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
) -> bool:
    """Bring ``conn`` back to its baseline; return False if it must be discarded.

    Runs outside the pool lock by the returning thread. ``guard()`` wraps the
    round trips, when there are any (the pool bounds them in time).
    """
    base = conn.baseline
    if conn.closed or base is None:
        return False
    # Client-side state that DISCARD ALL cannot undo: the connection is spoilt.
    if frozenset(conn.string_types) != base.typecasters:
        return False
    status = conn.info.transaction_status
    if status in (ext.TRANSACTION_STATUS_ACTIVE, ext.TRANSACTION_STATUS_UNKNOWN):
        return False
    try:
        if status != ext.TRANSACTION_STATUS_IDLE:
            with guard():
                if conn.autocommit:
                    # A BEGIN sent by hand in autocommit mode: psycopg2 doesn't know of it.
                    with conn.cursor() as cur:
                        cur.execute("ROLLBACK")
                else:
                    conn.rollback()
        dirty = (
            always
            or conn.session_dirty
            or bool(conn.notifies)
            or _session_flags_changed(conn, base)
            or _reported_values(conn, base.parameter_names) != base.parameter_values
        )
        if dirty:
            with guard():
                # ABORT (if psycopg2 opened a transaction) + DISCARD ALL; session
                # defaults given at connect time (libpq options) survive it. It
                # also sets the client-side flags back to psycopg2's defaults.
                conn.reset()
                if conn.autocommit != base.autocommit:
                    conn.autocommit = base.autocommit
                if _session_flags_changed(conn, base):
                    conn.set_session(
                        isolation_level=_default(base.isolation_level),
                        readonly=_default(base.readonly),
                        deferrable=_default(base.deferrable),
                    )
        elif conn.autocommit != base.autocommit:
            # Free while no transaction is open: psycopg2 sends nothing.
            conn.autocommit = base.autocommit
    except psycopg2.Error:
        return False
    if conn.cursor_factory is not base.cursor_factory:
        conn.cursor_factory = base.cursor_factory
    conn.session_dirty = False
    del conn.notices[:]
    del conn.notifies[:]
    return conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE
