"""The process-global registry of pools.

Why process-global: Django keeps one DatabaseWrapper per alias *per thread*,
and a pool is only worth having if those threads share it.

Pools are keyed by (process id, keyed hash of the final psycopg2.connect
parameters and the pool options), not by alias: when the test runner
switches NAME to the test database, or override_settings changes the time
zone, the parameters change and a new pool is used; several aliases with the
same parameters (a TEST MIRROR) share one. The hash is keyed with a random
per-process secret, so a key shown anywhere reveals nothing of the password.

Lock discipline: ``_lock`` guards ``_pools`` and ``_listeners``. Creating a
pool does no I/O (pools connect lazily), so it is done under the lock; the
listeners are told after it is released (they may read files); closing a
pool does I/O, so pools are removed under the lock and closed after it is
released. ``get_pool()`` reads ``_pools`` without the lock first: a dict
read is atomic, and a miss is looked up again under the lock.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import forking
from .options import PoolOptions
from .pool import ConnectionPool
from .session import PooledConnection

__all__ = ["PoolEntry", "close_pools", "entries", "get_pool", "on_pool_created"]

_SECRET = secrets.token_bytes(16)


@dataclass
class PoolEntry:
    """A pool and what we may show about it (never a password)."""

    key: tuple[int, str]
    pool: ConnectionPool
    options: PoolOptions
    # Replaced (never mutated) under the registry lock, so readers need no lock.
    aliases: frozenset[str] = frozenset()
    database: dict[str, str] = field(default_factory=dict)
    # Set once the listeners have been told of the new pool (a pause applied,
    # say): until then other threads that find it wait rather than borrow.
    ready: threading.Event = field(default_factory=threading.Event, repr=False)


# How long a thread waits for the listeners of a pool another thread has just
# created (they read a small file); past it, it goes on without them.
READY_WAIT = 5.0

_lock = threading.Lock()
_pools: dict[tuple[int, str], PoolEntry] = {}
# Told of every new pool, outside the lock (e.g. to start publishing status):
# the registry announces, so that it imports none of its listeners.
_listeners: list[Callable[[], None]] = []


def on_pool_created(listener: Callable[[], None]) -> None:
    """Call ``listener()`` after each pool this process creates (once per listener)."""
    with _lock:
        if listener not in _listeners:
            _listeners.append(listener)


def _digest(params: dict[str, Any], extra: tuple[Any, ...]) -> str:
    text = repr((sorted(params.items(), key=lambda item: item[0]), extra))
    return hashlib.blake2b(text.encode(), key=_SECRET, digest_size=12).hexdigest()


def database_of(params: dict[str, Any]) -> dict[str, str]:
    """Return the identity of the database a set of connect parameters reaches."""
    return {
        name: str(params[name]) for name in ("dbname", "host", "port", "user") if params.get(name)
    }


def get_pool(
    alias: str,
    params: dict[str, Any],
    options: PoolOptions,
    *,
    configure: Callable[[PooledConnection], None] | None = None,
    extra_key: tuple[Any, ...] = (),
    session_settings: dict[str, str] | None = None,
) -> ConnectionPool:
    """Return this process's pool for these connect parameters, creating it lazily."""
    settings = session_settings or {}
    key = (os.getpid(), _digest(params, (options, extra_key, sorted(settings.items()))))
    entry = _pools.get(key)  # dict reads are atomic: the common case takes no lock
    if entry is None or alias not in entry.aliases:
        tell: list[Callable[[], None]] = []
        with _lock:
            entry = _pools.get(key)
            if entry is None:
                database = database_of(params)
                # PoolOptions' fields are ConnectionPool's keyword arguments;
                # params has none of them (POOL_KEYS never reach libpq).
                pool = ConnectionPool(
                    name=f"database {alias!r}",
                    configure=configure,
                    session_settings=settings,
                    # SET after connecting, as Django's own backend does: the
                    # same RESET semantics, and errors (a role that doesn't
                    # exist), at one round trip per new connection.
                    settings_by_set=True,
                    **options.as_dict(),
                    **params,
                )
                entry = PoolEntry(key, pool, options, database=database)
                _pools[key] = entry
                tell = list(_listeners)
            entry.aliases = entry.aliases | {alias}
        if tell:
            try:
                for listener in tell:
                    listener()  # may read a file: not under the lock
            finally:
                entry.ready.set()
    if not entry.ready.is_set():
        # Another thread is telling the listeners of this new pool; a moment.
        entry.ready.wait(READY_WAIT)
    return entry.pool


def entries(alias: str | None = None) -> list[PoolEntry]:
    """Return this process's live pools, for one alias or all."""
    pid = os.getpid()
    with _lock:
        return [
            e for e in _pools.values() if e.key[0] == pid and (alias is None or alias in e.aliases)
        ]


def close_pools(alias: str | None = None, database: dict[str, str] | None = None) -> int:
    """Close this process's pools for an alias and/or a database; return how many.

    Idle connections close now, borrowed ones when they are returned. The
    next borrow creates a fresh pool.
    """
    pid = os.getpid()
    with _lock:
        closing = [
            e
            for e in _pools.values()
            if e.key[0] == pid
            and (alias is None or alias in e.aliases)
            and (database is None or all(e.database.get(k) == v for k, v in database.items()))
        ]
        for entry in closing:
            del _pools[entry.key]
    for entry in closing:
        entry.pool.closeall()
    return len(closing)


def _after_fork_in_child() -> None:
    # The parent's lock may be held by one of its threads at fork time. Its
    # pools are the parent's: wrappers still holding one of their connections
    # hand it back to the pool object itself, which detaches it.
    global _lock
    _lock = threading.Lock()
    _pools.clear()


forking.register("registry", after_in_child=_after_fork_in_child)
