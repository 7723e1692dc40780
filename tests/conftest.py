from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest

from django_pgpool.pool import ConnectionPool
from tests.pgserver import ServerInfo
from tests.settings import SERVER


@pytest.fixture(scope="session")
def server() -> ServerInfo:
    return SERVER


@pytest.fixture
def admin(server: ServerInfo) -> Iterator[Any]:
    """A plain autocommit superuser connection, outside any pool."""
    conn = psycopg2.connect(**server.connect_kwargs())
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def make_pool(server: ServerInfo) -> Iterator[Callable[..., ConnectionPool]]:
    """Build ConnectionPools on the server's maintenance database; closed after the test."""
    pools: list[ConnectionPool] = []

    def make(minconn: int = 0, maxconn: int = 4, **options: Any) -> ConnectionPool:
        options.setdefault("timeout", 5)
        pool = ConnectionPool(minconn, maxconn, **server.connect_kwargs(), **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.closeall()


@pytest.fixture
def add_alias() -> Iterator[Callable[..., str]]:
    """Make an ad-hoc alias usable by the ORM in this thread: ``Model.objects.using(alias)``."""
    from django.db import connections

    from django_pgpool import registry
    from tests.helpers import make_wrapper

    added: list[str] = []

    def add(alias: str, **changes: Any) -> str:
        connections[alias] = make_wrapper(alias, **changes)
        added.append(alias)
        return alias

    yield add
    for alias in added:
        connections[alias].close()
        del connections[alias]
        registry.close_pools(alias=alias)


def backend_pid(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid: int = cur.fetchone()[0]
    return pid
