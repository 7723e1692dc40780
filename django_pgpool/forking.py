"""Everything django_pgpool does around fork(), in one place and in order.

A forked child inherits the parent's pools and their connections (sockets
whose sessions are the parent's), every lock another thread held at fork
time (no thread in the child will ever release it) and no thread but the one
that forked. Each module that keeps such state registers what it must do
under one of the PHASES below, which run in this order whatever the order
in which the modules were imported:

Before fork, in the parent:
  ``connects``: wait (at most FORK_WAIT s) until no connect is in progress
  and hold new ones back: a child forked while another thread was inside
  libpq's connect inherits libpq's and OpenSSL's locks held, and its own
  first connect then blocks forever.

After fork, in the parent:
  ``connects``: let connects go on.

After fork, in the child, in order:
  1. ``connects``: a fresh gate (the parent's may be held).
  2. ``maintenance``: fresh lock and event, no thread; every inherited pool
     forgets the parent's connections (detached below, never closed: the
     sessions are the parent's) and stays *dormant*, opening nothing until
     the child itself borrows from it. First, because everything after it
     may create or look at pools.
  3. ``registry``: a fresh lock, and no pools: the ENGINE's next borrow
     creates the child's own pool (its key carries the pid).
  4. ``status``: a fresh lock; the child publishes a snapshot of its own.
  5. ``wrappers``: Django connections that still hold one of the parent's
     connections let go of it through their ``close()`` (a wrapping
     backend's own close logic runs), so that the next query borrows from
     the child's pool. Last: it may borrow nothing, but it must see the
     registry already emptied.

Lock discipline: ``_hooks`` is only written at import time (module
registration) and read at fork time; no lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

__all__ = ["INHERITED_BUSY", "PHASES", "detach_inherited", "register"]

logger = logging.getLogger("django_pgpool")

PHASES = ("connects", "maintenance", "registry", "status", "wrappers")

Hook = Callable[[], None]
_hooks: dict[str, dict[str, Hook]] = {phase: {} for phase in PHASES}


def register(
    phase: str,
    *,
    before: Hook | None = None,
    after_in_parent: Hook | None = None,
    after_in_child: Hook | None = None,
) -> None:
    """Run these callables at fork time, in ``phase``'s place of PHASES."""
    if phase not in _hooks:
        raise ValueError(f"unknown fork phase {phase!r}; one of {PHASES}")
    for when, hook in (
        ("before", before),
        ("after_in_parent", after_in_parent),
        ("after_in_child", after_in_child),
    ):
        if hook is not None:
            _hooks[phase][when] = hook


def _run(when: str, phases: tuple[str, ...]) -> None:
    for phase in phases:
        hook = _hooks[phase].get(when)
        if hook is None:
            continue
        try:
            hook()
        except Exception:  # one phase failing must not skip the others
            logger.exception("django_pgpool: fork hook %s/%s failed", phase, when)


def _before() -> None:
    _run("before", tuple(reversed(PHASES)))


def _after_in_parent() -> None:
    _run("after_in_parent", PHASES)


def _after_in_child() -> None:
    _run("after_in_child", PHASES)


os.register_at_fork(
    before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
)


# Connections that were in use in the parent when it forked: another parent
# thread may have been inside a query on one, so psycopg2's per-connection
# mutex is copied locked and close() (or freeing it) would block forever.
# They are detached and kept alive for the life of the child.
INHERITED_BUSY: list[Any] = []


def detach_inherited(conn: Any, close: bool = True) -> None:
    """Make a connection inherited through fork() harmless to the parent's session.

    Pointing its socket at /dev/null means that closing it here (or its
    garbage collection) sends nothing to the server, and nothing it sends
    can be read here. ``close=False`` keeps it open and alive (INHERITED_BUSY).
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
        with contextlib.suppress(Exception):
            conn.close()
    else:
        INHERITED_BUSY.append(conn)
