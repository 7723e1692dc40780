"""django-prometheus' PostgreSQL backend, pooled: the recipe of docs/wrapping.md, as tested.

django-prometheus (2.5 on) counts statements with a cursor class it gives
psycopg2 in ``get_connection_params()``; the mixin keeps those parameters
(its pools are keyed by them), so every statement on a pooled connection is
counted. Its ``get_new_connection()`` is not called: the mixin's borrows
instead of connecting.
"""

from __future__ import annotations

from django_prometheus.db.backends.postgresql.base import (
    DatabaseWrapper as PrometheusDatabaseWrapper,
)

from django_pgpool.wrapper import PooledWrapperMixin

__all__ = ["DatabaseWrapper"]


class DatabaseWrapper(PooledWrapperMixin, PrometheusDatabaseWrapper):
    """PostgreSQL through the pool, with django-prometheus' statement metrics."""
