"""django-pgpool: a pooled PostgreSQL ENGINE for Django on psycopg2."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "close_pools"]


def close_pools(alias: str | None = None) -> int:
    """Close this process's pools (for one alias, or all); return how many.

    Idle connections close now, borrowed ones when returned; the next borrow
    opens a fresh pool. Safe to call at any time, any number of times.
    """
    from . import registry

    return registry.close_pools(alias=alias)
