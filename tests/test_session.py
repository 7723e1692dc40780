"""No session state leaks from one borrower to the next, at the least cost."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg2.extensions as ext
import psycopg2.extras
import pytest

from django_pgpool.pool import ConnectionPool
from django_pgpool.session import changes_session
from tests.conftest import backend_pid
from tests.pgserver import ServerInfo
from tests.tcpproxy import TcpProxy

MakePool = Callable[..., ConnectionPool]


def scalar(conn: Any, sql: str, params: Any = None) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0]


@pytest.fixture(scope="module")
def role(server: ServerInfo) -> Iterator[str]:
    import psycopg2

    conn = psycopg2.connect(**server.connect_kwargs())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP ROLE IF EXISTS pgpool_other_role")
        cur.execute("CREATE ROLE pgpool_other_role")
    yield "pgpool_other_role"
    with conn.cursor() as cur:
        cur.execute("DROP ROLE IF EXISTS pgpool_other_role")
    conn.close()


def dirty_transaction(conn: Any) -> None:
    conn.autocommit = False
    scalar(conn, "SELECT txid_current()")
    scalar(conn, "CREATE TEMP TABLE IF NOT EXISTS t_in_tx (x int) ON COMMIT DROP; SELECT 1")


def dirty_manual_begin(conn: Any) -> None:
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("SELECT 1")


def dirty_set(sql: str) -> Callable[[Any], None]:
    def dirty(conn: Any) -> None:
        with conn.cursor() as cur:
            cur.execute(sql)

    return dirty


def dirty_role(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("SET ROLE pgpool_other_role")


def dirty_held_cursor(conn: Any) -> None:
    conn.autocommit = True
    cur = conn.cursor("held", withhold=True)
    cur.execute("SELECT generate_series(1, 1000)")
    cur.fetchmany(10)  # a partial .iterator(): the cursor is left open


def dirty_session_flags(conn: Any) -> None:
    conn.set_session(readonly=True, isolation_level="SERIALIZABLE", deferrable=True)


def dirty_set_config(conn: Any) -> None:
    scalar(conn, "SELECT set_config('search_path', 'pg_catalog', false)")


def dirty_dict_cursor(conn: Any) -> None:
    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute("SET statement_timeout = 1234")


ADVISORY_LOCKS = (
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
)

# (what a borrower does, how the next borrower checks it's gone)
LEAKS: dict[str, tuple[Callable[[Any], None], Callable[[Any], bool]]] = {
    "open transaction": (
        dirty_transaction,
        lambda c: c.info.transaction_status == ext.TRANSACTION_STATUS_IDLE,
    ),
    "manual BEGIN in autocommit": (
        dirty_manual_begin,
        lambda c: c.info.transaction_status == ext.TRANSACTION_STATUS_IDLE,
    ),
    "search_path": (
        dirty_set("SET search_path TO pg_catalog"),
        lambda c: scalar(c, "SHOW search_path") == '"$user", public',
    ),
    "statement_timeout": (
        dirty_set("SET statement_timeout = 1234"),
        lambda c: scalar(c, "SHOW statement_timeout") == "0",
    ),
    "application_name": (
        dirty_set("SET application_name = 'leaky'"),
        lambda c: scalar(c, "SHOW application_name") != "leaky",
    ),
    "custom GUC": (
        dirty_set("SET myapp.tenant = '42'"),
        lambda c: scalar(c, "SELECT current_setting('myapp.tenant', true)") in (None, ""),
    ),
    "set_config()": (
        dirty_set_config,
        lambda c: scalar(c, "SHOW search_path") == '"$user", public',
    ),
    "SET ROLE": (
        dirty_role,
        lambda c: scalar(c, "SELECT current_user") == scalar(c, "SELECT session_user"),
    ),
    "time zone": (
        dirty_set("SET TIME ZONE 'Asia/Tokyo'"),
        lambda c: scalar(c, "SHOW TimeZone") != "Asia/Tokyo",
    ),
    "temp table": (
        dirty_set("CREATE TEMP TABLE leaked (x int)"),
        lambda c: scalar(c, "SELECT to_regclass('pg_temp.leaked')") is None,
    ),
    "advisory lock": (
        dirty_set("SELECT pg_advisory_lock(4242)"),
        lambda c: scalar(c, ADVISORY_LOCKS) == 0,
    ),
    "LISTEN": (
        dirty_set("LISTEN leaky_channel"),
        lambda c: scalar(c, "SELECT count(*) FROM pg_listening_channels()") == 0,
    ),
    "prepared statement": (
        dirty_set("PREPARE leaky_plan AS SELECT 1"),
        lambda c: scalar(c, "SELECT count(*) FROM pg_prepared_statements") == 0,
    ),
    "WITH HOLD cursor": (
        dirty_held_cursor,
        lambda c: scalar(c, "SELECT count(*) FROM pg_cursors") == 0,
    ),
    "psycopg2 session flags": (
        dirty_session_flags,
        lambda c: (
            (c.readonly, c.isolation_level, c.deferrable) == (None, None, None)
            and scalar(c, "SHOW default_transaction_read_only") == "off"
            and scalar(c, "SHOW default_transaction_isolation") == "read committed"
        ),
    ),
    "SET through a cursor_factory": (
        dirty_dict_cursor,
        lambda c: scalar(c, "SHOW statement_timeout") == "0",
    ),
}


@pytest.mark.parametrize("reset", ["auto", "always"])
@pytest.mark.parametrize("kind", list(LEAKS))
def test_session_state_does_not_leak_to_the_next_borrower(
    make_pool: MakePool, role: str, kind: str, reset: str
) -> None:
    dirty, is_clean = LEAKS[kind]
    pool = make_pool(0, 1, reset=reset)
    conn = pool.getconn()
    conn.autocommit = True
    pid = backend_pid(conn)
    assert is_clean(conn), "the check must pass on a fresh connection"
    dirty(conn)
    pool.putconn(conn)

    conn = pool.getconn()
    assert conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE
    conn.autocommit = True
    assert backend_pid(conn) == pid, "the same backend must be reused"
    assert is_clean(conn)
    pool.putconn(conn)


def test_notices_and_notifications_are_not_handed_to_the_next_borrower(
    make_pool: MakePool,
) -> None:
    pool = make_pool(0, 1)
    conn = pool.getconn()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("LISTEN ch; NOTIFY ch, 'secret'; DO $$ BEGIN RAISE NOTICE 'private'; END $$")
    assert conn.notices and conn.notifies
    pool.putconn(conn)
    conn = pool.getconn()
    assert conn.notices == [] and conn.notifies == []
    pool.putconn(conn)


def test_a_connection_with_its_own_typecasters_is_discarded(make_pool: MakePool) -> None:
    pool = make_pool(0, 1)
    conn = pool.getconn()
    pid = backend_pid(conn)
    psycopg2.extras.register_uuid(conn_or_curs=conn)
    pool.putconn(conn)
    conn = pool.getconn()
    assert backend_pid(conn) != pid
    pool.putconn(conn)


@pytest.fixture
def proxy(server: ServerInfo) -> Iterator[TcpProxy]:
    proxy = TcpProxy(server.host, server.port)
    yield proxy
    proxy.stop()


def proxied_pool(make_pool: MakePool, proxy: TcpProxy, **options: Any) -> ConnectionPool:
    pool = make_pool(0, 1, **options)
    pool._kwargs["host"], pool._kwargs["port"] = "127.0.0.1", proxy.port
    return pool


def borrow_and_query(pool: ConnectionPool, sql: str = "SELECT 1") -> None:
    conn = pool.getconn()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql)
    pool.putconn(conn)


def test_a_clean_connection_costs_no_extra_round_trip(make_pool: MakePool, proxy: TcpProxy) -> None:
    pool = proxied_pool(make_pool, proxy)
    borrow_and_query(pool)  # warm up: open the connection
    with proxy.counting() as sent:
        for _ in range(10):
            borrow_and_query(pool)
    assert sent == ["SELECT 1"] * 10
    assert pool.get_stats().get("returns_reset", 0) == 0


def test_a_health_check_costs_one_round_trip(make_pool: MakePool, proxy: TcpProxy) -> None:
    # psycopg2's default is not autocommit: the check must not add BEGIN/ROLLBACK.
    pool = proxied_pool(make_pool, proxy, check_after=0)
    pool.putconn(pool.getconn())  # warm up: open the connection
    with proxy.counting() as sent:
        conn = pool.getconn()
    assert sent == ["SELECT 1"]
    assert conn.autocommit is False
    with conn.cursor() as cur:  # and its transactions work as before
        cur.execute("SELECT 1")
    assert conn.info.transaction_status == ext.TRANSACTION_STATUS_INTRANS
    pool.putconn(conn)


def test_a_dirty_connection_costs_one_discard_all(make_pool: MakePool, proxy: TcpProxy) -> None:
    pool = proxied_pool(make_pool, proxy)
    borrow_and_query(pool)
    with proxy.counting() as sent:
        borrow_and_query(pool, "SET search_path TO pg_catalog")
        borrow_and_query(pool)
    assert sent == ["SET search_path TO pg_catalog", "DISCARD ALL", "SELECT 1"]


def test_reset_always_discards_after_every_borrow(make_pool: MakePool, proxy: TcpProxy) -> None:
    pool = proxied_pool(make_pool, proxy, reset="always")
    borrow_and_query(pool)
    with proxy.counting() as sent:
        borrow_and_query(pool)
    assert sent == ["SELECT 1", "DISCARD ALL"]


@pytest.mark.parametrize(
    "sql",
    [
        "SET search_path TO x",
        "  set TIME ZONE 'UTC'",
        "/* comment */ SET x.y = 1",
        "SELECT 1; SET x.y = 1",
        "RESET ALL",
        "LISTEN c",
        "PREPARE p AS SELECT 1",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "CREATE TEMP TABLE t (x int)",
        "create temporary table t (x int)",
        "SELECT * INTO TEMP t FROM x",
        "CREATE TABLE pg_temp.t (x int)",
        "SELECT pg_advisory_lock(1)",
        "SELECT pg_try_advisory_lock_shared(1)",
        "SELECT set_config('a.b', 'c', false)",
        "DO $$ BEGIN END $$",
        "CALL proc()",
        "DISCARD PLANS",
        b"SET x.y = 1",
    ],
)
def test_statements_that_change_the_session_are_noticed(sql: str | bytes) -> None:
    assert changes_session(sql)


@pytest.mark.parametrize(
    "sql",
    [
        'SELECT "app_item"."id" FROM "app_item" WHERE "app_item"."id" = 1',
        'UPDATE "app_item" SET "name" = \'x\' WHERE "id" = 1',
        'INSERT INTO "app_item" ("name") VALUES (\'set\') RETURNING "id"',
        "SET LOCAL statement_timeout = 5",
        "SET CONSTRAINTS ALL IMMEDIATE",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SELECT pg_advisory_xact_lock(1)",
        'SELECT "temperature" FROM "weather"',
        "DELETE FROM t",
    ],
)
def test_ordinary_statements_are_not_taken_for_session_changes(sql: str) -> None:
    assert not changes_session(sql)
