"""Session state: notice, for free, what a borrower changed, and undo it at return.

A connection handed out must be indistinguishable from a fresh one. The
thorough way (``DISCARD ALL`` on every return) costs a round trip per request,
which doubles the cost of a one-query request. Instead each connection knows
what it looked like when it was opened (its ``Baseline``) and is marked
*dirty* when a borrower does something that can outlive the transaction:

* SQL that changes the session: every statement passes through
  ``TrackingCursor.execute`` and a cheap regular expression flags
  ``SET``/``RESET``/``LISTEN``/``PREPARE``/``DECLARE``/temp objects/session
  advisory locks/``set_config()``/``DO``/``CALL``... (false positives only
  cost one ``DISCARD ALL``);
* SQL that can draw from a sequence (``INSERT``, ``COPY ... FROM``,
  ``MERGE``, ``nextval()``, ``setval()``...): ``currval()`` and ``lastval()``
  are session state, and only need a ``DISCARD SEQUENCES``;
* cursors whose statements can't be seen (a callable ``cursor_factory``
  making plain psycopg2 cursors) and ``WITH HOLD`` named cursors (Django's
  ``.iterator()`` in autocommit mode);
* client-side signals read at return without a round trip: the server's
  reported parameters (TimeZone, application_name, role, DateStyle, ...),
  pending notifications, psycopg2 session flags (``set_session``).

A clean connection costs nothing at return; an open transaction costs a
``ROLLBACK``; one that only drew from sequences a ``DISCARD SEQUENCES``; any
other change a ``DISCARD ALL``. ``reset="always"`` sends ``DISCARD ALL`` on
every return for those who want no inference at all. What no client-side
inspection can see (a server function or trigger that changes session state
or draws from a sequence on its own) is the documented limit of
``reset="auto"`` (docs/session-state.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions as ext

__all__ = [
    "SEQUENCES",
    "SESSION",
    "Baseline",
    "PooledConnection",
    "TrackingCursor",
    "changes_session",
    "reset_session",
    "session_effects",
    "tracking_cursor_class",
]

logger = logging.getLogger("django_pgpool")

# What a connection's borrower left to undo: bits of PooledConnection.session_dirty.
#: Anything at all: the return sends DISCARD ALL. Equal to True, so that
#: ``session_dirty = True`` keeps its meaning.
SESSION = 1
#: Only currval()/lastval(): the return sends DISCARD SEQUENCES (DISCARD ALL
#: includes it, so SESSION covers it too).
SEQUENCES = 2

# A comment, as PostgreSQL reads them: block comments nest (one level here).
_COMMENT = r"(?:--[^\n]*(?:\n|$)|/\*(?:[^*/]|\*(?!/)|/(?!\*)|/\*.*?\*/)*\*/)"
_GAP = rf"(?:\s|{_COMMENT})"

# What a statement does, told by its first word (after comments). Group 1:
# changes the session (SET LOCAL / SET TRANSACTION / SET CONSTRAINTS only last
# for the transaction). Group 2: can draw from a sequence (a serial or
# identity default; ALTER TABLE ... ADD COLUMN fills one). COPY (query) can
# only be TO, and COPY table TO reads. Group 3: can draw from one if it
# contains an INSERT, a MERGE (a data-modifying CTE) or a DEFAULT; group 4
# only through UPDATE ... SET col = DEFAULT. See _WRITES.
_LEADING = re.compile(
    rf"(?:^|;){_GAP}*(?:"
    r"(SET(?!\s+(?:LOCAL|TRANSACTION|CONSTRAINTS)\b)|RESET|DISCARD|LISTEN|PREPARE|DEALLOCATE"
    r"|DECLARE|LOAD|DO|CALL)"
    r"|(INSERT|MERGE|ALTER|COPY\b(?!\s*\()[^;]*?\bFROM)"
    r"|(WITH)|(UPDATE)"
    r")\b",
    re.IGNORECASE | re.DOTALL,
)
# Session state created anywhere in a statement. Anything between CREATE and
# TEMP counts (OR REPLACE, GLOBAL/LOCAL, comments of any depth): a false
# positive such as CREATE TABLE t (temp int) only costs a DISCARD ALL.
_ANYWHERE = re.compile(
    rf"\bCREATE\b[^;]*?\bTEMP(?:ORARY)?\b|\bINTO{_GAP}+TEMP(?:ORARY)?\b|\bpg_temp\b"
    r"|\bset_config\s*\(|advisory_lock(?:_shared)?\s*\(",
    re.IGNORECASE | re.DOTALL,
)
# A call that sets currval() (and lastval(), for nextval()) anywhere in a statement.
_DRAWS = re.compile(r"\b(?:nextval|setval)\b\"?\s*\(", re.IGNORECASE)
# What makes an UPDATE or a WITH statement draw from a sequence.
_WRITES = re.compile(r"\b(?:INSERT|MERGE|DEFAULT)\b", re.IGNORECASE)

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


# The answers of session_effects() for the texts seen last: an ORM sends the
# same few query texts over and over (parameters apart), and a dict lookup
# (50-70 ns, hashing the text) is cheaper than the tests below (0.6-0.9 us
# for a typical statement). Bounded: emptied when full. Read and written
# without a lock: each dict operation is atomic under the GIL, and a lost
# entry only means the tests run again.
_EFFECTS_SEEN: dict[str, int] = {}
_EFFECTS_SEEN_MAX = 512
_EFFECTS_TEXT_MAX = 4096  # longer texts (bulk inserts) are tested, not kept


def session_effects(sql: Any) -> int:
    """Return what executing ``sql`` may leave in the session: 0, SEQUENCES or SESSION.

    Only the query text is read, before psycopg2 merges the parameters in:
    the data of a parametrized query can't cause false positives.
    """
    if isinstance(sql, str):
        effects = _EFFECTS_SEEN.get(sql)
        if effects is None:
            effects = _session_effects(sql)
            if len(sql) <= _EFFECTS_TEXT_MAX:
                if len(_EFFECTS_SEEN) >= _EFFECTS_SEEN_MAX:
                    _EFFECTS_SEEN.clear()
                _EFFECTS_SEEN[sql] = effects
        return effects
    if isinstance(sql, bytes):
        return _session_effects(sql.decode("utf-8", "replace"))
    # psycopg2.sql.Composable and the like: we cannot read it cheaply.
    return SESSION


def _session_effects(sql: str) -> int:
    """session_effects() of a text, without the memo."""
    # Cheap tests first: this runs for every statement. Without a ';' only the
    # start of the text can begin a statement, and the other patterns can
    # only match text that contains one of their few words.
    if ";" not in sql:
        match = _LEADING.match(sql)
        kind = (match.lastindex or 0) if match is not None else 0
    else:
        # The groups are numbered by precedence: a session change wins.
        kind = min({match.lastindex or 0 for match in _LEADING.finditer(sql)}, default=0)
    if kind == 1:
        return SESSION
    lowered = sql.lower()
    # Each word test scans the whole text (0.3 to 0.6 ns a character, so 2.8
    # us for five over a 1.4 KB SELECT); the function names are only looked
    # for in text that calls a function: a '(' is found by memchr (30 ns).
    calls = "(" in sql
    if (
        "temp" in lowered or (calls and ("set_config" in lowered or "advisory_lock" in lowered))
    ) and _ANYWHERE.search(sql):
        return SESSION
    if kind == 2:
        return SEQUENCES
    if calls and ("nextval" in lowered or "setval" in lowered) and _DRAWS.search(sql):
        return SEQUENCES
    if kind == 3:
        words = "insert" in lowered or "merge" in lowered or "default" in lowered
    else:
        words = kind == 4 and "default" in lowered
    return SEQUENCES if words and _WRITES.search(sql) else 0


def changes_session(sql: Any) -> bool:
    """Return True if executing ``sql`` may change state that only DISCARD ALL undoes."""
    return session_effects(sql) == SESSION


# SQLSTATEs that say this server is not the one to use any more: read-only
# (an in-place demotion, as an Aurora writer flip does it), shutting down,
# crashed, not accepting connections; and class 08, connection exceptions.
FAILOVER_SQLSTATES = frozenset({"25006", "57P01", "57P02", "57P03"})


def note_failover(conn: PooledConnection, exc: psycopg2.Error) -> None:
    """Mark ``conn`` if ``exc`` says its server is no longer the one to use.

    The pool then retires it and every connection opened before it, when it
    is returned (new ones go where libpq's host list now leads). Called for
    every error of the statements a borrower sends: the tracking cursor's
    execute(), executemany(), callproc() and COPY, and the connection's
    commit() and rollback() (a session ended by the server is often first
    seen there). A server that ends a session (57P01, or a crash: the other
    backends are told 57P02, as a warning) is seen by psycopg2 as a closed
    connection, without a SQLSTATE: libpq reports its "server closed the
    connection unexpectedly" only.
    """
    code = exc.pgcode
    if (
        code in FAILOVER_SQLSTATES
        or (code is not None and code.startswith("08"))
        or (code is None and isinstance(exc, psycopg2.OperationalError) and conn.closed)
    ):
        conn.failover_seen_at = time.monotonic()
        conn.failover_sqlstate = code or "08000"


class TrackingCursor(ext.cursor):
    """The cursor class of pooled connections: marks the connection dirty when needed."""

    connection: PooledConnection

    def execute(self, query: Any, vars: Any = None) -> None:
        conn = self.connection
        # Once a DISCARD ALL is due there is nothing more to learn: skip the check.
        if not conn.session_dirty & SESSION:
            if self.withhold:
                conn.session_dirty = SESSION
            else:
                effects = session_effects(query)
                if effects:
                    conn.session_dirty |= effects
        try:
            return super().execute(query, vars)
        except psycopg2.Error as exc:
            note_failover(conn, exc)
            raise

    def executemany(self, query: Any, vars_list: Any) -> None:
        conn = self.connection
        if not conn.session_dirty & SESSION:
            effects = session_effects(query)
            if effects:
                conn.session_dirty |= effects
        try:
            return super().executemany(query, vars_list)
        except psycopg2.Error as exc:
            note_failover(conn, exc)
            raise

    def callproc(self, procname: Any, parameters: Any = None) -> Any:
        # A function can do anything to the session.
        self.connection.session_dirty = SESSION
        try:
            return super().callproc(procname, parameters)
        except psycopg2.Error as exc:
            note_failover(self.connection, exc)
            raise

    # COPY FROM only works through these two (execute() refuses it), and it
    # fills serial and identity defaults like an INSERT.
    def copy_expert(self, sql: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        conn = self.connection
        if not conn.session_dirty & SESSION:
            conn.session_dirty |= session_effects(sql)
        try:
            return super().copy_expert(sql, file, *args, **kwargs)
        except psycopg2.Error as exc:
            note_failover(conn, exc)
            raise

    def copy_from(self, *args: Any, **kwargs: Any) -> None:
        self.connection.session_dirty |= SEQUENCES
        try:
            return super().copy_from(*args, **kwargs)
        except psycopg2.Error as exc:
            note_failover(self.connection, exc)
            raise

    def copy_to(self, *args: Any, **kwargs: Any) -> None:
        try:
            return super().copy_to(*args, **kwargs)
        except psycopg2.Error as exc:
            note_failover(self.connection, exc)
            raise


_tracking_subclasses: dict[type, type] = {}


def tracking_cursor_class(cursor_class: type) -> type:
    """Return the class ``cursor_class`` with session tracking mixed in (cached per class)."""
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


# psycopg2's own methods, called without super() by PooledConnection's.
_commit = ext.connection.commit
_rollback = ext.connection.rollback


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
    * Written under the pool's lock by the lease calls (``lease_idle()``,
      ``lease_claim()``) and by a revocation: ``revocable_since``,
      ``revoked_at`` and ``claimed_at``; read under it by the pool.
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

    # What the borrower left to undo: 0, or the bits SESSION and SEQUENCES.
    session_dirty: int
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
    # When a statement failed with a SQLSTATE that means "not this server any
    # more" (note_failover()), and which; written by the holding thread.
    failover_seen_at: float
    failover_sqlstate: str
    # The SETs the pool gave this session after connecting, because the server
    # (a pooler) wouldn't take them in libpq's options; None when it took
    # them there. Set once by the opening thread; the reset replays it.
    session_setup: str | None
    # Leases (CONN_MAX_AGE): when its holder went between requests, letting the
    # pool revoke the loan (0.0 while it may be in use); when it was last
    # claimed for use (a lease's leak timer starts there, not at the borrow).
    revocable_since: float
    # When the pool revoked the lease (0.0: not revoked): its holder's next
    # lease_claim() fails, and the revoking thread returns it for the holder.
    revoked_at: float
    claimed_at: float

    def __init__(self, dsn: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(dsn, *args, **kwargs)
        self.session_dirty = 0
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
        self.session_setup = None
        self.failover_seen_at = 0.0
        self.failover_sqlstate = ""
        self.revocable_since = self.revoked_at = self.claimed_at = 0.0

    # A session the server ended is often first seen at the end of the
    # transaction: note the error, as the tracking cursor does for statements
    # (note_failover()). A Python frame around psycopg2's C method, and a try
    # that costs nothing unless it raises (Python 3.11): 55 to 75 ns a call
    # (measured with nothing to commit: 135 ns plain, 190 ns here), no round
    # trip. `with conn:` calls these by name, so it goes through them.
    def commit(self) -> None:
        try:
            _commit(self)
        except psycopg2.Error as exc:
            note_failover(self, exc)
            raise

    def rollback(self) -> None:
        try:
            _rollback(self)
        except psycopg2.Error as exc:
            note_failover(self, exc)
            raise

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        # Track through a subclass of the class the cursor would have had; the
        # connection's own cursor_factory stays the one the user configured.
        configured: Any = self.cursor_factory
        if len(args) >= 2:
            factory = args[1] or configured or ext.cursor
            if isinstance(factory, type):
                args = (args[0], tracking_cursor_class(factory), *args[2:])
                return super().cursor(*args, **kwargs)
        else:
            factory = kwargs.get("cursor_factory") or configured or ext.cursor
            if isinstance(factory, type):
                kwargs["cursor_factory"] = tracking_cursor_class(factory)
                return super().cursor(*args, **kwargs)
        # Any callable is a legal factory (psycopg2 calls factory(conn, name)
        # and checks it made a cursor): it makes the cursor as configured.
        cur = super().cursor(*args, **kwargs)
        if not isinstance(cur, TrackingCursor):
            try:
                # The same object, now also tracked: allowed between classes
                # of the same layout, as a subclass that adds only methods.
                cur.__class__ = tracking_cursor_class(type(cur))
            except TypeError:
                # psycopg2's own cursor class (a static type) or a subclass
                # with __slots__: its statements can't be seen, so assume the worst.
                self.session_dirty = SESSION
        return cur


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


# The process that said it last (0: none yet), so that a forked child says it
# again, once. Guarded by _warned_lock; read without it first (a plain read).
_typecasters_warned_pid = 0
_warned_lock = threading.Lock()


def _warn_typecasters(conn: PooledConnection, base: Baseline) -> None:
    """Say once per process why connections with their own typecasters are discarded."""
    global _typecasters_warned_pid
    pid = os.getpid()
    if _typecasters_warned_pid == pid:
        return
    with _warned_lock:
        if _typecasters_warned_pid == pid:
            return
        _typecasters_warned_pid = pid
    casters = conn.string_types
    added = ", ".join(
        f"{getattr(casters[oid], 'name', '?')} (oid {oid})"
        for oid in sorted(casters.keys() - base.typecasters)
    )
    logger.warning(
        "connection to database %r closed at its return instead of being reused: "
        "typecasters were registered on it (%s), and a connection can't forget them. "
        "Registered at every borrow (say in a connection_created handler), this opens "
        "a new connection per request. Register them once for all connections instead: "
        "psycopg2.extensions.register_type(caster) without the connection argument "
        "(e.g. in AppConfig.ready()). Logged once per process.",
        conn.info.dbname,
        added or "replaced",
    )


def _clear_notices(conn: PooledConnection) -> None:
    """Hand the next borrower empty plain lists, as a fresh connection has.

    psycopg2 documents replacing them (a ``deque(maxlen=...)``); anything may
    have been put there (None, an object with ``append()``). The usual list
    is emptied in place, so the usual return allocates nothing.
    """
    notices = conn.notices
    if type(notices) is list:
        notices.clear()
    else:
        conn.notices = []
    notifies = conn.notifies
    if type(notifies) is list:
        notifies.clear()
    else:
        conn.notifies = []


def _discard_sequences(conn: PooledConnection) -> None:
    """Forget currval() and lastval(), in one round trip."""
    # Outside autocommit psycopg2 would send a BEGIN first (and leave the
    # transaction open); switching is free while no transaction is open.
    # reset_session() sets it back to the baseline's.
    if not conn.autocommit:
        conn.autocommit = True
    # Not conn.cursor(): our own statement needs no tracking.
    with ext.cursor(conn) as cur:
        cur.execute("DISCARD SEQUENCES")


# DISCARD ALL as PostgreSQL documents it, statement by statement: unlike
# DISCARD ALL itself these can share a query (one round trip) with the SETs
# that follow (DISCARD ALL refuses a transaction block, and a query of
# several statements is one).
_DISCARD_ALL_IN_PARTS = (
    "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; UNLISTEN *; "
    "SELECT pg_advisory_unlock_all(); DISCARD PLANS; DISCARD TEMP; DISCARD SEQUENCES; "
)


def _discard_all_and_replay(conn: PooledConnection, setup: str) -> None:
    """DISCARD ALL, then give the session its settings again, in one round trip.

    reset_session() then sets psycopg2's client-side flags back to the
    baseline's, as after conn.reset().
    """
    if not conn.autocommit:
        conn.autocommit = True  # free: no transaction is open here
    with ext.cursor(conn) as cur:  # our own statement needs no tracking
        cur.execute(_DISCARD_ALL_IN_PARTS + setup)


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
        _warn_typecasters(conn, base)
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
        left = conn.session_dirty
        notifies = conn.notifies
        dirty = (
            always
            or left & SESSION
            # Pending notifications mean the session listens (maybe through a
            # function). A replaced notifies may hide them: assume it does.
            or type(notifies) is not list
            or bool(notifies)
            or _session_flags_changed(conn, base)
            or _reported_values(conn, base.parameter_names) != base.parameter_values
        )
        if dirty:
            with guard():
                if conn.session_setup:
                    # Settings given with SET after connecting (behind a pooler)
                    # don't survive DISCARD ALL: given again in the same query.
                    _discard_all_and_replay(conn, conn.session_setup)
                else:
                    # ABORT (if psycopg2 opened a transaction) + DISCARD ALL;
                    # settings given at connect time (libpq options) survive it.
                    # It also sets the client-side flags back to psycopg2's
                    # defaults.
                    conn.reset()
                if conn.autocommit != base.autocommit:
                    conn.autocommit = base.autocommit
                if _session_flags_changed(conn, base):
                    conn.set_session(
                        isolation_level=_default(base.isolation_level),
                        readonly=_default(base.readonly),
                        deferrable=_default(base.deferrable),
                    )
        else:
            if left:
                # Only sequences were drawn from (SEQUENCES): currval() and
                # lastval() would show the next borrower this one's values.
                with guard():
                    _discard_sequences(conn)
            if conn.autocommit != base.autocommit:
                # Free while no transaction is open: psycopg2 sends nothing.
                conn.autocommit = base.autocommit
    except psycopg2.Error:
        return False
    if conn.cursor_factory is not base.cursor_factory:
        conn.cursor_factory = base.cursor_factory
    conn.session_dirty = 0
    _clear_notices(conn)
    return conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE
