"""django-pgpool: a pooled PostgreSQL ENGINE for Django on psycopg2."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pool import ConnectionPool

__version__ = "0.1.0"

__all__ = ["__version__", "close_pools", "pool_for"]


def close_pools(alias: str | None = None) -> int:
    """Close this process's pools (for one alias, or all); return how many.

    Idle connections close now, borrowed ones when returned; the next borrow
    opens a fresh pool. Safe to call at any time, any number of times.
    """
    from . import registry

    return registry.close_pools(alias=alias)


def pool_for(alias: str = "default") -> ConnectionPool:
    """Return the pool the ENGINE lends ``alias``'s connections from in this process.

    The same pool Django's own queries use for the alias's current settings
    (created if it doesn't exist yet), for code that wants a raw psycopg2
    connection: ``with pool_for("default").connection() as conn: ...``.
    Raise ImproperlyConfigured if the alias's ENGINE isn't pooled.
    """
    # Imported here: ``import django_pgpool`` must not import Django.
    from django.core.exceptions import ImproperlyConfigured
    from django.db import connections

    from .wrapper import PooledWrapperMixin

    wrapper = connections[alias]
    if not isinstance(wrapper, PooledWrapperMixin) or not wrapper.pooled:
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}]['ENGINE'] is {wrapper.settings_dict['ENGINE']!r}, which "
            "has no pool; use 'django_pgpool' (or 'django_pgpool.postgis') to get one"
        )
    # The lookup get_new_connection() makes at a borrow, with the same
    # arguments: the pool's key, and the set-up of each new connection if this
    # call creates the pool (Django's JSONField needs it).
    plan = wrapper._plan()
    return wrapper._pool_of(plan, dict(plan.params), wrapper._isolation_level())
