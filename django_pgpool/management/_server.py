"""The server, across hosts: the sessions of the pools in pg_stat_activity, and ending them.

Every pooled session carries the tag ``[pgpool <alias>@<host>:<pid>]`` at
the end of its application_name (``identity.application_name()``);
``server_view()`` reads pg_stat_activity in a session of the command's own
and ``terminate()`` ends the pools' sessions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from django.core.management import CommandError
from django.db import Error as DatabaseError
from django.db.backends.utils import CursorWrapper

from ..identity import HOSTNAME, TAG_PATTERN
from ..wrapper import NO_DB_ALIAS
from ._aliases import database_wrapper
from ._redaction import database_identity, one_line

__all__ = [
    "CONNECT_TIMEOUT",
    "Backend",
    "Termination",
    "server_view",
    "terminate",
    "this_hosts_clients",
    "unreachable_server_view",
    "wait_until_gone",
]

IDLE = "idle"
ACTIVE = "active"
IDLE_IN_TRANSACTION = ("idle in transaction", "idle in transaction (aborted)")

# The command's own session carries no tag; it is left out all the same.
_TAGGED_SESSIONS = """
SELECT pid, application_name, state,
       GREATEST(EXTRACT(EPOCH FROM clock_timestamp() - backend_start), 0)::float8,
       GREATEST(EXTRACT(EPOCH FROM clock_timestamp() - state_change), 0)::float8
  FROM pg_stat_activity
 WHERE datname = current_database()
   AND application_name LIKE %s
   AND pid <> pg_backend_pid()
 ORDER BY pid
"""
_TAG_LIKE = "%[pgpool %"


@dataclass(frozen=True)
class Backend:
    """A server session of a pool, as pg_stat_activity shows it.

    ``state`` and the ages are None when the role running the command may
    not see them (another role's session, without pg_read_all_stats).
    """

    pid: int  # the server process
    host: str  # the client's host, from the tag (at most 24 characters)
    process: int  # the client process id, from the tag
    state: str | None
    backend_age: float | None  # seconds since the session started
    state_age: float | None  # seconds in its current state


def _where(alias: str) -> str:
    identity = database_identity(alias)
    where = f"{identity['NAME'] or '?'} on {identity['HOST'] or 'localhost'}"
    if identity["PORT"]:
        where += f":{identity['PORT']}"
    return f"{where} as {identity['USER']}" if identity["USER"] else where


#: Seconds the command waits for the server to answer a connection attempt
#: (when OPTIONS has no connect_timeout).
CONNECT_TIMEOUT = 10


@contextlib.contextmanager
def _server_cursor(alias: str, command: str, purpose: str) -> Iterator[CursorWrapper]:
    """Open a session of its own with the alias's settings, for a look at the server.

    Not pooled (Django's "no db" alias): the command never creates a pool,
    so it publishes no snapshot of its own and its session carries no tag.
    Raises CommandError if the database can't be reached.
    """
    wrapper = database_wrapper(alias)
    options = dict(wrapper.settings_dict.get("OPTIONS") or {})
    options.setdefault("connect_timeout", CONNECT_TIMEOUT)
    options["application_name"] = f"django_pgpool {command}"
    look = type(wrapper)({**wrapper.settings_dict, "OPTIONS": options}, alias=NO_DB_ALIAS)
    try:
        try:
            look.ensure_connection()
        except DatabaseError as exc:
            raise CommandError(
                f"couldn't connect to database {alias!r} ({_where(alias)}) for {purpose}: "
                f"{one_line(exc, alias)}"
            ) from exc
        with look.cursor() as cursor:
            yield cursor
    finally:
        look.close()


def _tagged_backends(cursor: CursorWrapper, alias: str) -> list[Backend]:
    """Return the sessions of ``alias``'s pools on the current database, every host."""
    cursor.execute(_TAGGED_SESSIONS, [_TAG_LIKE])
    backends = []
    for pid, name, state, backend_age, state_age in cursor.fetchall():
        match = TAG_PATTERN.search(name or "")
        if match is not None and match["alias"] == alias[:20]:  # application_name() cuts at 20
            backends.append(
                Backend(pid, match["host"], int(match["pid"]), state, backend_age, state_age)
            )
    return backends


def _oldest(backends: Iterable[Backend], age: str) -> dict[str, Any] | None:
    aged = [(getattr(b, age), b.pid) for b in backends if getattr(b, age) is not None]
    if not aged:
        return None
    seconds, pid = max(aged)
    return {"pid": pid, "age_s": round(seconds, 3)}


def _count_states(backends: list[Backend]) -> dict[str, int]:
    active = sum(1 for b in backends if b.state == ACTIVE)
    idle = sum(1 for b in backends if b.state == IDLE)
    in_transaction = sum(1 for b in backends if b.state in IDLE_IN_TRANSACTION)
    return {
        "connections": len(backends),
        "active": active,
        "idle": idle,
        "idle_in_transaction": in_transaction,
        "other": len(backends) - active - idle - in_transaction,
    }


def server_view(alias: str) -> dict[str, Any]:
    """Return the server's view of ``alias``'s pools: their sessions, by client host and pid.

    Raises CommandError if the database can't be reached.
    """
    with _server_cursor(alias, "poolstatus", "the server's view") as cursor:
        cursor.execute("SELECT current_database()")
        (database,) = cursor.fetchone()
        backends = _tagged_backends(cursor, alias)
    groups: dict[tuple[str, int], list[Backend]] = {}
    for backend in backends:
        groups.setdefault((backend.host, backend.process), []).append(backend)
    processes = []
    for (host, pid), members in sorted(groups.items()):
        in_transaction = [b for b in members if b.state in IDLE_IN_TRANSACTION]
        processes.append(
            {
                "host": host,
                "pid": pid,
                **_count_states(members),
                "oldest_backend": _oldest(members, "backend_age"),
                "longest_idle_in_transaction": _oldest(in_transaction, "state_age"),
                "backend_pids": [b.pid for b in members],
            }
        )
    return {"database": database, "error": None, **_count_states(backends), "processes": processes}


# Every pooled session on the alias's database as the alias's user, whatever
# the alias in its tag (the workers may name the database otherwise).
_USERS_TAGGED_SESSIONS = """
SELECT application_name,
       GREATEST(EXTRACT(EPOCH FROM clock_timestamp() - backend_start), 0)::float8
  FROM pg_stat_activity
 WHERE datname = current_database()
   AND usename = session_user
   AND application_name LIKE %s
   AND pid <> pg_backend_pid()
"""


def this_hosts_clients(alias: str, command: str) -> dict[int, tuple[int, float]]:
    """Return the processes of this host that have pooled sessions on ``alias``'s
    database as its user: client pid -> (sessions, age of the oldest in seconds).

    Raises CommandError if the database can't be reached.
    """
    with _server_cursor(alias, command, "a look at the server's sessions") as cursor:
        cursor.execute(_USERS_TAGGED_SESSIONS, [_TAG_LIKE])
        rows = cursor.fetchall()
    clients: dict[int, tuple[int, float]] = {}
    for name, age in rows:
        match = TAG_PATTERN.search(name or "")
        if match is None or match["host"] != HOSTNAME[:24]:  # application_name() cuts at 24
            continue
        count, oldest = clients.get(int(match["pid"]), (0, 0.0))
        clients[int(match["pid"])] = (count + 1, max(oldest, age or 0.0))
    return clients


def unreachable_server_view(message: str) -> dict[str, Any]:
    """Return the server's view of a database that could not be reached."""
    counts = dict.fromkeys(("connections", "active", "idle", "idle_in_transaction", "other"))
    return {"database": None, "error": message, **counts, "processes": []}


# -- the server: ending sessions -------------------------------------------------

# A session lent by a pool is "idle" on the server between two statements:
# only sessions idle for a while are taken for idle in the pool.
_TERMINATE = """
SELECT pg_terminate_backend(pid)
  FROM pg_stat_activity
 WHERE pid = %s
   AND (%s OR (state = 'idle' AND state_change <= clock_timestamp() - make_interval(secs => %s)))
"""
INSUFFICIENT_PRIVILEGE = "42501"


@dataclass
class Termination:
    """What ``terminate()`` did on one database."""

    database: str
    terminated: list[Backend]
    left: list[Backend]  # in use (or became so), not terminated


def _run_as(role: str, grants: str) -> str:
    return (
        "Run poolclose --kill as the role the pools connect as or as a superuser, or "
        f"GRANT {grants} TO {role} (pg_signal_backend never covers a superuser's sessions)"
    )


def terminate(alias: str, include_active: bool, idle_for: float) -> Termination:
    """End the server sessions of ``alias``'s pools on its database, from every host.

    Only those idle for at least ``idle_for`` seconds unless ``include_active``
    (a session lent to a request is idle between two statements); each is
    checked again, alone, just before it is ended, so one lent meanwhile is
    left alone.
    Raises CommandError if the database can't be reached or the role may
    not see or end those sessions.
    """
    with _server_cursor(alias, "poolclose", "poolclose --kill") as cursor:
        cursor.execute("SELECT current_database(), current_user")
        database, role = cursor.fetchone()
        backends = _tagged_backends(cursor, alias)
        hidden = [b for b in backends if b.state is None]
        if hidden and not include_active:
            raise CommandError(
                f"role {role!r} can't see the state of {len(hidden)} "
                f"session{'' if len(hidden) == 1 else 's'} of database {alias!r} (they belong "
                "to other roles), so it can't tell the idle ones. "
                f"{_run_as(role, 'pg_read_all_stats, pg_signal_backend')}; "
                "--include-active ends them all, busy or not."
            )
        targets = [
            b
            for b in backends
            if include_active or (b.state == IDLE and (b.state_age or 0.0) >= idle_for)
        ]
        left = [b for b in backends if b not in targets]
        terminated: list[Backend] = []
        for backend in targets:
            try:
                # Autocommit: a statement sees pg_stat_activity as it is now.
                cursor.execute(_TERMINATE, [backend.pid, include_active, idle_for])
                row = cursor.fetchone()
            except DatabaseError as exc:
                if getattr(exc.__cause__, "pgcode", None) != INSUFFICIENT_PRIVILEGE:
                    raise
                done = f"ended {len(terminated)} of {len(targets)}; " if terminated else ""
                raise CommandError(
                    f"role {role!r} may not end the sessions of database {alias!r} "
                    f"({done}{one_line(exc, alias)}). {_run_as(role, 'pg_signal_backend')}."
                ) from exc
            if row is None:
                left.append(backend)  # lent meanwhile (or gone)
            elif row[0]:
                terminated.append(backend)
    return Termination(database, terminated, left)


def wait_until_gone(alias: str, pids: Iterable[int], deadline: float, poll: float) -> list[int]:
    """Wait until these server sessions have ended, or the (monotonic) deadline.

    Return those still there.
    """
    pids = list(pids)
    with _server_cursor(alias, "poolclose", "poolclose --wait") as cursor:
        while True:
            cursor.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", [pids])
            remaining = sorted(pid for (pid,) in cursor.fetchall())
            if not remaining or time.monotonic() >= deadline:
                return remaining
            time.sleep(poll)
