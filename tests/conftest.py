from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest

from django_pgpool.pool import ConnectionPool
from tests.pgserver import ServerInfo, ThrowawayServer
from tests.settings import SERVER
from tests.tcpproxy import TcpProxy

MakePool = Callable[..., ConnectionPool]

CONNECT_TIMEOUT = 2  # libpq's connect_timeout, in seconds (its smallest useful value)


@pytest.fixture(scope="session")
def server() -> ServerInfo:
    return SERVER


@pytest.fixture
def pg(server: ServerInfo) -> Iterator[ThrowawayServer]:
    """Control of the test run's own server, running again after the test whatever happened."""
    if server.datadir is None:
        pytest.skip("external server (PGHOST without PGPOOL_TEST_DATADIR): not ours to stop")
    control = ThrowawayServer.attach(server)
    assert control.is_running()
    try:
        yield control
    finally:
        control.start()  # does nothing if it is running; pg_ctl -w: accepting when it returns
        psycopg2.connect(**server.connect_kwargs()).close()


@pytest.fixture(scope="session")
def password_server() -> Iterator[ServerInfo]:
    """A throwaway cluster of the tests' own whose pg_hba.conf asks TCP clients for a
    SCRAM password: the suite's server may trust every connection (any PGHOST)."""
    with ThrowawayServer() as server:
        yield server.info


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
def proxy(server: ServerInfo) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the server, to count queries and to stall or drop the link."""
    proxy = TcpProxy(server.host, server.port)
    yield proxy
    proxy.stop()


@pytest.fixture
def make_proxied_pool(server: ServerInfo, proxy: TcpProxy) -> Iterator[MakePool]:
    """Build ConnectionPools that reach the server through ``proxy``; closed after the test."""
    pools: list[ConnectionPool] = []

    def make(minconn: int, maxconn: int, **options: Any) -> ConnectionPool:
        kwargs = {
            **server.connect_kwargs(),
            "host": "127.0.0.1",
            "port": proxy.port,
            "connect_timeout": CONNECT_TIMEOUT,
            **options,
        }
        pool = ConnectionPool(minconn, maxconn, **kwargs)
        pools.append(pool)
        return pool

    yield make
    proxy.resume()  # closing must not wait on a stalled link
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
