"""What the management commands share: choosing the databases, what may be shown
of one, and the two ways of seeing (and steering) the pools of other processes.

* This host: every process that has a pool publishes a snapshot of it in the
  status directory (``status.py``); ``read_host_snapshots()`` reads them and
  ``status.request_reconnect()`` asks those processes to reconnect.
* The server, across hosts: every pooled session carries the tag
  ``[pgpool <alias>@<host>:<pid>]`` at the end of its application_name
  (``identity.application_name()``); ``server_view()`` reads pg_stat_activity
  through the alias's own connection and ``terminate()`` ends sessions.

Nothing here ever returns a password: the PASSWORD setting is never read, and
OPTIONS values are shown only for keys known to hold no secret.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from argparse import ArgumentParser
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError
from django.db import Error as DatabaseError
from django.db import connections
from django.db.backends.utils import CursorWrapper

from .. import registry, status
from ..base import NO_DB_ALIAS, DatabaseWrapper
from ..checks import ENGINES
from ..identity import HOSTNAME, TAG_PATTERN
from ..options import POOL_KEYS
from ..pool import STATS_KEYS

__all__ = [
    "ACTIVITY_KEYS",
    "ENGINES",
    "HIDDEN",
    "Backend",
    "Termination",
    "add_database_argument",
    "database_identity",
    "host_processes",
    "pool_config",
    "read_host_snapshots",
    "selected_aliases",
    "server_view",
    "shown_options",
    "terminate",
    "unreachable_server_view",
    "wait_until_gone",
]

#: What is shown in place of an OPTIONS value that may hold a secret.
HIDDEN = "<hidden>"

#: OPTIONS keys (besides the pool's own) whose values are shown. Any other
#: key may hold a secret (password, passfile, sslpassword, sslkey, a service
#: file...) and is shown by name only.
SHOWN_OPTIONS = frozenset(
    {
        "application_name",
        "assume_role",
        "client_encoding",
        "connect_timeout",
        "gssencmode",
        "isolation_level",
        "keepalives",
        "keepalives_count",
        "keepalives_idle",
        "keepalives_interval",
        "options",
        "server_side_binding",
        "sslmode",
        "target_session_attrs",
    }
)


def add_database_argument(parser: ArgumentParser, action: str) -> None:
    """Add the repeatable ``--database ALIAS`` option; ``action`` says what it does."""
    parser.add_argument(
        "--database",
        action="append",
        dest="databases",
        metavar="ALIAS",
        help=f"{action}; repeat it for several. Default: every database whose ENGINE is "
        f"{ENGINES[0]!r}.",
    )


def _pooled_aliases() -> list[str]:
    return [alias for alias in connections if connections.settings[alias].get("ENGINE") in ENGINES]


def selected_aliases(requested: Iterable[str] | None) -> list[str]:
    """Return the aliases asked for (default: all on this ENGINE); raise CommandError if one
    is unknown or on another ENGINE."""
    pooled = _pooled_aliases()
    if not requested:
        return pooled
    valid = ", ".join(repr(alias) for alias in pooled) or "none"
    chosen: list[str] = []
    for alias in requested:
        if alias not in connections.settings:
            raise CommandError(
                f"unknown database {alias!r}; databases on ENGINE {ENGINES[0]!r}: {valid}"
            )
        if alias not in pooled:
            engine = connections.settings[alias].get("ENGINE")
            raise CommandError(
                f"database {alias!r} uses ENGINE {engine!r}, not {ENGINES[0]!r}; "
                f"databases on ENGINE {ENGINES[0]!r}: {valid}"
            )
        if alias not in chosen:
            chosen.append(alias)
    return chosen


def _wrapper(alias: str) -> DatabaseWrapper:
    wrapper = connections[alias]
    if not isinstance(wrapper, DatabaseWrapper):  # an ENGINE string we know, another class
        raise CommandError(f"database {alias!r} is not a django_pgpool DatabaseWrapper")
    return wrapper


def pool_config(alias: str) -> dict[str, Any]:
    """Return the validated pool options; raise CommandError if they are invalid."""
    try:
        return _wrapper(alias).pool_options().as_dict()
    except ImproperlyConfigured as exc:
        raise CommandError(str(exc)) from exc


def shown_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Return the OPTIONS that go to libpq, with every value that may be a secret hidden."""
    return {
        str(key): (value if key in SHOWN_OPTIONS else HIDDEN)
        for key, value in options.items()
        if key not in POOL_KEYS
    }


def _shown_name(name: str) -> str:
    # libpq takes a dbname holding "=" or a postgres:// URI as a connection
    # string, which may carry a password.
    return HIDDEN if "=" in name or "://" in name else name


def database_identity(alias: str) -> dict[str, Any]:
    """Return the database an alias reaches (NAME, HOST, PORT, USER, OPTIONS), no password."""
    settings_dict = _wrapper(alias).settings_dict
    identity: dict[str, Any] = {
        key: str(settings_dict.get(key) or "") for key in ("NAME", "HOST", "PORT", "USER")
    }
    identity["NAME"] = _shown_name(identity["NAME"])
    identity["OPTIONS"] = shown_options(settings_dict.get("OPTIONS") or {})
    return identity


# -- this host: the snapshots the processes publish ------------------------------

#: What a published pool holds besides STATS_KEYS, and its value when missing.
ACTIVITY_KEYS: dict[str, Any] = {
    "longest_wait_s": 0.0,
    "oldest_checkout": None,
    "retired_in_use": 0,
    "wait_buckets": [],  # queued borrowers' waits, counted per pool.WAIT_BUCKETS bound, +Inf
}


def read_host_snapshots() -> list[dict[str, Any]]:
    """Return the snapshots of this host's live processes that have pools, by pid.

    This process (when it has pools: call_command() inside a worker) is
    described by its live figures, taken now; its published file may be a
    second old.
    """
    own_pid = os.getpid()
    try:
        published = status.read_snapshots()
    except (ImproperlyConfigured, OSError) as exc:
        raise CommandError(status.describe_failure(exc)) from exc
    snapshots = [s for s in published if s.get("pid") != own_pid]
    if registry.entries():
        own = next((s for s in published if s.get("pid") == own_pid), {})
        live = status.snapshot()
        live["updated"] = time.time()
        live["reconnect_seen"] = own.get("reconnect_seen", {})
        snapshots.append(live)
    return sorted(snapshots, key=lambda s: int(s.get("pid", 0)))


def _shown_database(database: Mapping[str, Any]) -> dict[str, str]:
    shown = {str(key): str(value) for key, value in database.items()}
    if "dbname" in shown:
        shown["dbname"] = _shown_name(shown["dbname"])
    return shown


def _published_pool(pool: Mapping[str, Any]) -> dict[str, Any]:
    """Return a published pool with every documented key, in a stable order."""
    figures = {key: pool.get(key, 0) for key in STATS_KEYS}
    activity = {key: pool.get(key, default) for key, default in ACTIVITY_KEYS.items()}
    known = {"aliases", "database", "options", *figures, *activity}
    return {
        "aliases": list(pool.get("aliases", [])),
        "database": _shown_database(pool.get("database", {})),
        "options": dict(pool.get("options", {})),
        **figures,
        **activity,
        **{key: value for key, value in pool.items() if key not in known},
    }


def host_processes(alias: str, snapshots: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return the processes (of these snapshots) that have a pool of ``alias``, with those pools."""
    processes = []
    for snapshot in snapshots:
        pools = [
            _published_pool(pool)
            for pool in snapshot.get("pools", [])
            if alias in pool.get("aliases", ())
        ]
        if pools:
            processes.append(
                {
                    "pid": int(snapshot["pid"]),
                    "host": str(snapshot.get("host", HOSTNAME)),
                    "updated": snapshot.get("updated"),
                    "reconnect_seen": int(snapshot.get("reconnect_seen", {}).get(alias, 0)),
                    "pools": pools,
                }
            )
    return processes


# -- the server: pg_stat_activity, across hosts ----------------------------------

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


def _one_line(exc: BaseException, alias: str) -> str:
    """Return an error's message on one line, with what poolstatus hides hidden.

    libpq's messages may name a service, a key file or a connection string
    given in the settings; the command shows those as "<hidden>".
    """
    text = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
    settings_dict = _wrapper(alias).settings_dict
    name = str(settings_dict.get("NAME") or "")
    hidden = [settings_dict.get("PASSWORD"), name if _shown_name(name) == HIDDEN else None]
    options = settings_dict.get("OPTIONS") or {}
    hidden += [
        value for key, value in options.items() if shown_options({key: value}).get(key) == HIDDEN
    ]
    for value in hidden:
        if value is not None and len(str(value)) >= 4:  # shorter: no secret, and too common
            text = text.replace(str(value), HIDDEN)
    return text


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
    wrapper = _wrapper(alias)
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
                f"{_one_line(exc, alias)}"
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
                    f"({done}{_one_line(exc, alias)}). {_run_as(role, 'pg_signal_backend')}."
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
