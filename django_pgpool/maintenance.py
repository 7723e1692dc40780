"""One background thread per process that keeps every pool in shape.

It closes expired and surplus idle connections and refills pools to
``minconn``, so no borrower pays for that work. It is process-global (one
thread, whatever the number of pools) and started lazily by the first pool;
after fork() the child has no thread until its first pool needs one, and
every inherited pool forgets the parent's connections.

Lock discipline: ``_lock`` guards ``_pools`` and ``_thread``. It is never held
while a pool does its maintenance (which may connect), only while the list of
pools is copied.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pool import ConnectionPool

__all__ = ["INTERVAL", "add_hook", "register", "remove_hook", "wake"]

logger = logging.getLogger("django_pgpool")

#: Seconds between two rounds of maintenance.
INTERVAL = 1.0

_lock = threading.Lock()
_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()
# Called after each round (e.g. to publish status snapshots); never raise out.
_hooks: list[Callable[[], None]] = []
_thread: threading.Thread | None = None
_wakeup = threading.Event()


def register(pool: ConnectionPool) -> None:
    """Have ``pool`` maintained; start the thread if this process has none.

    No round is asked for now: the pool's first borrower is about to open a
    connection, and a refill racing it would open minconn + 1.
    """
    with _lock:
        _pools.add(pool)
        _ensure_thread()


def add_hook(hook: Callable[[], None]) -> None:
    """Run ``hook`` in the maintenance thread after every round (once per hook)."""
    with _lock:
        if hook not in _hooks:
            _hooks.append(hook)


def remove_hook(hook: Callable[[], None]) -> None:
    with _lock:
        if hook in _hooks:
            _hooks.remove(hook)


def wake() -> None:
    """Ask for a round of maintenance now (e.g. a pool fell below minconn)."""
    with _lock:
        _ensure_thread()
    _wakeup.set()


def _ensure_thread() -> None:
    """Start the maintenance thread if this process has none. ``_lock`` held."""
    global _thread
    if _thread is None or not _thread.is_alive():
        _thread = threading.Thread(target=_run, name="django_pgpool-maintenance", daemon=True)
        _thread.start()


def _run() -> None:
    wait = INTERVAL
    while True:
        _wakeup.wait(wait)
        _wakeup.clear()
        with _lock:
            pools = list(_pools)
            hooks = list(_hooks)
        for pool in pools:
            try:
                pool.maintain()
            except Exception:
                logger.exception("pool %s: maintenance failed", pool.name)
        for hook in hooks:
            try:
                hook()
            except Exception:
                logger.exception("maintenance hook %r failed", hook)
        # Sleep until the next round, or until a round trip's deadline.
        now = time.monotonic()
        deadlines = [due for pool in pools if (due := pool.next_deadline()) is not None]
        wait = min([INTERVAL, *(max(due - now, 0.01) for due in deadlines)])


def _after_fork_in_child() -> None:
    # Only the forking thread exists in the child: locks held by other
    # threads at fork time would never be released, so replace them.
    global _lock, _thread, _wakeup
    _lock = threading.Lock()
    _thread = None
    _wakeup = threading.Event()
    # The inherited pools keep working in the child, with connections of
    # its own; the thread is started again by the next wake().
    for pool in list(_pools):
        pool.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
