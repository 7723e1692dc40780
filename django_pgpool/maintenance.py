"""One background thread per process that keeps every pool in shape.

It closes expired and surplus idle connections and refills pools to
``minconn``, so no borrower pays for that work. It is process-global (one
thread, whatever the number of pools) and started lazily by the first pool;
after fork() the child has no thread until its first pool needs one, and
every inherited pool forgets the parent's connections.

Lock discipline: ``_lock`` guards ``_pools``, ``_hooks``, ``_thread`` and
``_start_failed``; ``_wakeup`` is an Event, safe without it. It
is never held while a pool does its maintenance (which may connect), only
while the list of pools is copied or the thread started.

What it needs of a pool is the ``Maintained`` protocol: it imports no pool.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

from . import forking

__all__ = ["INTERVAL", "Maintained", "add_hook", "register", "remove_hook", "wake"]

logger = logging.getLogger("django_pgpool")

#: Seconds between two rounds of maintenance.
INTERVAL = 1.0


class Maintained(Protocol):
    """What the maintenance thread needs of a pool."""

    name: str

    def maintain(self) -> None:
        """Do one round: close what must go, refill, cut off overdue round trips."""

    def next_deadline(self) -> float | None:
        """Return when the earliest round trip under way must be cut off, if any."""

    def after_fork_in_child(self) -> None:
        """Forget the parent's connections (runs in a forked child)."""


_lock = threading.Lock()
_pools: weakref.WeakSet[Maintained] = weakref.WeakSet()
# Called after each round (e.g. to publish status snapshots); never raise out.
_hooks: list[Callable[[], None]] = []
_thread: threading.Thread | None = None
_start_failed = False  # the last start failed (said once until one succeeds)
_wakeup = threading.Event()


def register(pool: Maintained) -> None:
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
    """Start the maintenance thread if this process has none. ``_lock`` held.

    Never raises: it is called by pools at every state change that wants a
    round, and a thread that can't be started (``RuntimeError: can't start
    new thread``) must not interrupt one. The next call tries again.
    """
    global _thread, _start_failed
    if _thread is not None and _thread.is_alive():
        return
    thread = threading.Thread(target=_run, name="django_pgpool-maintenance", daemon=True)
    try:
        thread.start()
    except Exception as exc:
        if not _start_failed:
            logger.warning(
                "django_pgpool: couldn't start the maintenance thread (%s); pools are not "
                "refilled or trimmed until it can be started, and it will be tried again",
                exc,
            )
        _start_failed = True
        return
    _thread, _start_failed = thread, False


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
    # The inherited pools stay usable in the child, with connections of its
    # own, but open none until the child borrows from one (a pool only the
    # parent used must not hold minconn sessions in every child); the thread
    # is started again by the next wake().
    for pool in list(_pools):
        pool.after_fork_in_child()


forking.register("maintenance", after_in_child=_after_fork_in_child)
