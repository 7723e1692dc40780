"""Behind PgBouncer 1.18 (Debian 12's), in session and in transaction pooling mode.

PgBouncer before 1.20 refuses libpq's ``options`` startup parameter, where
the pool gives each session its time zone and role for free. The pool finds
out at its first connect and gives them with SET after connecting instead,
replaying them in the same query after each DISCARD ALL. Round trips are
counted by a TCP proxy between the client and PgBouncer.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from django.core.management import call_command
from django.db import connections
from django.db.backends.postgresql.base import DatabaseWrapper as StockWrapper

from django_pgpool import base, registry, status
from django_pgpool.pool import ConnectionPool
from tests.helpers import PoolLoad, wait_for
from tests.pgbouncer import (  # the fixtures register under their names without _fixture
    ThrowawayPgBouncer,
    pgbouncer_session_fixture,  # noqa: F401
    pgbouncer_transaction_fixture,  # noqa: F401
)
from tests.tcpproxy import TcpProxy

ZONE = "America/Caracas"  # not the server's, not Django's: a SET would show


@pytest.fixture(params=["session", "transaction"])
def bouncer(request: pytest.FixtureRequest) -> ThrowawayPgBouncer:
    fixture: ThrowawayPgBouncer = request.getfixturevalue(f"pgbouncer_{request.param}")
    return fixture


@pytest.fixture
def bouncer_proxy(bouncer: ThrowawayPgBouncer) -> Iterator[TcpProxy]:
    """A counting proxy in front of PgBouncer."""
    proxy = TcpProxy("127.0.0.1", bouncer.port)
    yield proxy
    proxy.stop()


@pytest.fixture
def make_bounced_pool(
    bouncer: ThrowawayPgBouncer, bouncer_proxy: TcpProxy
) -> Iterator[Callable[..., ConnectionPool]]:
    pools: list[ConnectionPool] = []

    def make(minconn: int = 0, maxconn: int = 2, **options: Any) -> ConnectionPool:
        kwargs = {**bouncer.info.connect_kwargs(), "port": bouncer_proxy.port}
        options.setdefault("timeout", 5)
        options.setdefault("session_settings", {"TimeZone": ZONE})
        options.setdefault("configure", autocommit)  # as the ENGINE's connections
        pool = ConnectionPool(minconn, maxconn, **kwargs, **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.closeall()


def autocommit(conn: Any) -> None:
    conn.autocommit = True


def query(conn: Any, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        value = cur.fetchone()[0]
    return value


def test_the_pool_connects_through_pgbouncer_and_gives_the_time_zone_by_set(
    make_bounced_pool: Callable[..., ConnectionPool],
) -> None:
    pool = make_bounced_pool()
    conn = pool.getconn()  # refused with options, then again without: one borrow
    assert query(conn, "SHOW TimeZone") == ZONE
    assert conn.session_setup is not None
    pool.putconn(conn)
    assert pool.get_stats()["requests_errors"] == 0


def test_a_clean_borrow_costs_no_round_trip_and_a_dirty_one_one_reset(
    make_bounced_pool: Callable[..., ConnectionPool], bouncer_proxy: TcpProxy
) -> None:
    pool = make_bounced_pool()
    pool.putconn(pool.getconn())  # the connection exists, with its SET
    with bouncer_proxy.counting() as clean:
        conn = pool.getconn()
        query(conn, "SELECT 1")
        pool.putconn(conn)
    assert clean == ["SELECT 1"]
    with bouncer_proxy.counting() as dirty:
        conn = pool.getconn()
        query(conn, "SELECT set_config('work_mem', '7MB', false)")
        pool.putconn(conn)
        conn = pool.getconn()
        assert query(conn, "SHOW work_mem") != "7MB"  # reset
        assert query(conn, "SHOW TimeZone") == ZONE  # and the time zone given again
        pool.putconn(conn)
    # The borrower's query, one reset (DISCARD ALL's parts and the SET in one),
    # the next borrower's two queries: no extra SET at the next borrow.
    assert len(dirty) == 4, dirty
    assert dirty[1].startswith("CLOSE ALL;") and "America/Caracas" in dirty[1]


def test_an_open_transaction_never_leaks_to_the_next_borrower(
    make_bounced_pool: Callable[..., ConnectionPool],
) -> None:
    pool = make_bounced_pool(maxconn=1)
    conn = pool.getconn()
    conn.autocommit = False
    with conn.cursor() as cur:
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS t (n int)")  # in the open transaction
        cur.execute("SELECT txid_current()")
    pool.putconn(conn)  # returned inside its transaction
    conn = pool.getconn()
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert query(conn, "SELECT to_regclass('pg_temp.t') IS NULL") is True
    pool.putconn(conn)


def test_borrowers_wait_for_one_another_through_pgbouncer(
    make_bounced_pool: Callable[..., ConnectionPool],
) -> None:
    pool = make_bounced_pool(maxconn=1)
    with PoolLoad(pool, threads=4, each=20) as load:
        load.join()
    assert not load.errors and load.done == 80
    assert pool.get_stats()["connections_num"] == 1  # one connection, reused


# -- Django: round trips per request, stock ENGINE vs ours, through the same PgBouncer ---


def django_settings(bouncer: ThrowawayPgBouncer, proxy: TcpProxy, engine: str) -> dict[str, Any]:
    info = bouncer.info
    return {
        **connections["default"].settings_dict,
        "ENGINE": engine,
        "HOST": "127.0.0.1",
        "PORT": proxy.port,
        "NAME": info.dbname,
        "USER": info.user,
        "PASSWORD": info.password,
        "OPTIONS": {"minconn": 0, "maxconn": 2} if engine == "django_pgpool" else {},
        "TIME_ZONE": None,
        "CONN_MAX_AGE": 0,
    }


def requests_through(alias: str, count: int, dirty_every: int = 0) -> None:
    for number in range(count):
        wrapper = connections[alias]
        with wrapper.cursor() as cur:
            cur.execute("SELECT 1")
            if dirty_every and number % dirty_every == 0:
                cur.execute("SET work_mem = '7MB'")
        wrapper.close()


@pytest.mark.django_db(transaction=True)
def test_a_request_through_pgbouncer_costs_no_more_round_trips_than_stock_django(
    bouncer: ThrowawayPgBouncer, bouncer_proxy: TcpProxy
) -> None:
    counted = {}
    for engine in ("django.db.backends.postgresql", "django_pgpool"):
        alias = f"bounced_{engine.replace('.', '_')}"
        settings = django_settings(bouncer, bouncer_proxy, engine)
        wrapper_class = base.DatabaseWrapper if engine == "django_pgpool" else StockWrapper
        connections[alias] = wrapper_class(settings, alias=alias)
        try:
            requests_through(alias, 2)  # warm: ours opens its connection here
            with bouncer_proxy.counting() as seen:
                requests_through(alias, 10)
            counted[engine] = len(seen)
        finally:
            connections[alias].close()
            del connections[alias]
            registry.close_pools(alias=alias)
    ours, stock = counted["django_pgpool"], counted["django.db.backends.postgresql"]
    print(f"\n{bouncer.pool_mode} mode, 10 requests: stock Django {stock} queries, ours {ours}")
    assert ours <= stock
    assert ours == 10  # the requests' own queries, nothing else


def test_a_role_given_in_options_that_pgbouncer_ignores_is_given_by_set(
    server: Any, admin: Any
) -> None:
    with admin.cursor() as cur:
        cur.execute("DROP ROLE IF EXISTS pgpool_assumed")
        cur.execute("CREATE ROLE pgpool_assumed NOLOGIN")
    with ThrowawayPgBouncer(server, "session", ignore_startup_parameters="options") as bouncer:
        pool = ConnectionPool(
            0, 2, session_settings={"role": "pgpool_assumed"}, **bouncer.info.connect_kwargs()
        )
        try:
            conn = pool.getconn()
            assert query(conn, "SELECT current_setting('role')") == "pgpool_assumed"
            conn.rollback()
            pool.putconn(conn)
        finally:
            pool.closeall()
    with admin.cursor() as cur:
        cur.execute("DROP ROLE IF EXISTS pgpool_assumed")


@pytest.fixture
def database_access(django_db_blocker: Any) -> Iterator[None]:
    """Database access without pytest-django's test case: the commands reach the ad-hoc
    alias from threads of their own, which a test case's isolation would refuse."""
    with django_db_blocker.unblock():
        yield


@pytest.mark.usefixtures("database_access")
def test_the_commands_work_for_a_database_behind_pgbouncer(
    bouncer: ThrowawayPgBouncer, bouncer_proxy: TcpProxy
) -> None:
    alias = "bounced_commands"
    settings = django_settings(bouncer, bouncer_proxy, "django_pgpool")
    connections.settings[alias] = settings
    connections[alias] = base.DatabaseWrapper(settings, alias=alias)
    out = io.StringIO()
    try:
        requests_through(alias, 3)
        before = opened(alias)
        wait_for(lambda: own_pool_published(alias), what="this process's snapshot")
        call_command("poolstatus", "--database", alias, "--format", "json", stdout=out)
        document = json.loads(out.getvalue())
        processes = document["databases"][alias]["processes"]
        assert [p["pid"] for p in processes] == [os.getpid()]
        for args in ([], ["--wait", "10"]):
            out = io.StringIO()
            call_command("poolclose", "--database", alias, *args, stdout=out)
        assert "every process has reconnected" in out.getvalue()
        for args in (["--wait", "10"],):
            out = io.StringIO()
            call_command("poolpause", "--database", alias, *args, stdout=out)
            call_command("poolresume", "--database", alias, "--wait", "10", stdout=out)
        requests_through(alias, 3)  # and it serves again, on new connections to PgBouncer
        assert opened(alias) > before
    finally:
        connections[alias].close()
        del connections[alias]
        del connections.settings[alias]
        registry.close_pools(alias=alias)


def opened(alias: str) -> int:
    """How many connections the alias's pools in this process have opened."""
    return sum(entry.pool.get_stats()["connections_num"] for entry in registry.entries(alias))


def own_pool_published(alias: str) -> bool:
    snapshots = {s["pid"]: s for s in status.read_snapshots()}
    own = snapshots.get(os.getpid())
    return bool(own) and any(alias in pool["aliases"] for pool in own["pools"])
