"""Exceptions raised by the pool.

They subclass ``psycopg2.OperationalError`` so that Django's
``wrap_database_errors`` re-raises them as ``django.db.OperationalError``,
and ``psycopg2.pool.PoolError`` so that code written against psycopg2's own
pool keeps catching them.
"""

from __future__ import annotations

import psycopg2
import psycopg2.pool

__all__ = ["PoolClosed", "PoolError", "PoolTimeout", "TooManyRequests"]


class PoolError(psycopg2.OperationalError, psycopg2.pool.PoolError):
    """Base class of the errors raised by the pool."""


class PoolTimeout(PoolError):
    """No connection could be had within the pool's timeout."""


class TooManyRequests(PoolError):
    """Too many callers are already waiting for a connection (``max_waiting``)."""


class PoolClosed(PoolError):
    """The pool has been closed (``closeall()``) or belongs to another process."""
