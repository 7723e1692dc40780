"""ConnectionPool as a drop-in for psycopg2's pools, and its context managers.

Every test runs against a real server; after each one the pool's invariants
hold with nothing in progress (check_invariants(quiescent=True)).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import psycopg2.pool
import pytest

from django_pgpool.errors import PoolClosed, PoolTimeout
from django_pgpool.pool import ConnectionPool, PersistentConnectionPool
from django_pgpool.session import PooledConnection
from tests.conftest import backend_pid
from tests.pgserver import ServerInfo

MakePool = Callable[..., ConnectionPool]


def dsn_of(server: ServerInfo) -> str:
    return " ".join(f"{key}={value}" for key, value in server.connect_kwargs().items())


@pytest.fixture
def pools() -> Iterator[list[ConnectionPool]]:
    """Pools a test builds itself; their invariants checked, then closed."""
    made: list[ConnectionPool] = []
    yield made
    for pool in made:
        pool.check_invariants(quiescent=True)
        pool.closeall()


@pytest.fixture
def table(admin: Any) -> Iterator[str]:
    """A fresh table ``(n int)`` with a deferred unique constraint; dropped after."""
    name = f"dropin_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE TABLE {name} (n int, UNIQUE (n) DEFERRABLE INITIALLY DEFERRED)")
    yield name
    with admin.cursor() as cur:
        cur.execute(f"DROP TABLE {name}")


def rows(admin: Any, table: str) -> list[int]:
    with admin.cursor() as cur:
        cur.execute(f"SELECT n FROM {table} ORDER BY n")
        return [n for (n,) in cur.fetchall()]


def quiet(pool: ConnectionPool) -> dict[str, int]:
    """Check the invariants with nothing in progress; return the stats."""
    pool.check_invariants(quiescent=True)
    return pool.get_stats()


# -- the constructor ---------------------------------------------------------


def test_a_dsn_string_is_accepted_positionally_as_by_psycopg2(
    server: ServerInfo, pools: list[ConnectionPool]
) -> None:
    pool = ConnectionPool(1, 2, dsn_of(server) + " application_name=dropin-positional")
    pools.append(pool)
    conn = pool.getconn()
    assert conn.info.parameter_status("application_name") == "dropin-positional"
    pool.putconn(conn)


def test_a_dsn_keyword_and_libpq_keywords_combine_as_in_psycopg2_connect(
    server: ServerInfo, pools: list[ConnectionPool]
) -> None:
    pool = ConnectionPool(0, 2, dsn=dsn_of(server), application_name="dropin-keyword")
    pools.append(pool)
    conn = pool.getconn()
    assert conn.info.parameter_status("application_name") == "dropin-keyword"
    pool.putconn(conn)


def test_the_pool_is_a_psycopg2_pool_and_its_errors_are_psycopg2_pool_errors() -> None:
    assert issubclass(ConnectionPool, psycopg2.pool.AbstractConnectionPool)
    assert issubclass(PoolTimeout, psycopg2.pool.PoolError)
    assert issubclass(PoolClosed, psycopg2.pool.PoolError)


def test_minconn_above_maxconn_is_refused_not_left_to_grow_without_bound(
    server: ServerInfo,
) -> None:
    with pytest.raises(ValueError, match="must not be greater"):
        ConnectionPool(3, 2, dsn_of(server))


# -- getconn, putconn, keys --------------------------------------------------


def test_putconn_then_getconn_reuses_the_same_session(make_pool: MakePool) -> None:
    pool = make_pool(0, 2)
    conn = pool.getconn()
    pid = backend_pid(conn)
    pool.putconn(conn)
    again = pool.getconn()
    assert backend_pid(again) == pid
    pool.putconn(again)
    assert quiet(pool)["pool_available"] == 1


def test_a_key_returns_the_same_connection_until_it_is_put_back(make_pool: MakePool) -> None:
    pool = make_pool(0, 3)
    conn = pool.getconn("job-1")
    assert pool.getconn("job-1") is conn
    other = pool.getconn("job-2")
    assert other is not conn
    pool.putconn(conn, "job-1")
    pool.putconn(conn=other, key="job-2", close=False)
    stats = quiet(pool)
    assert (stats["pool_in_use"], stats["pool_available"]) == (0, 2)
    # Put back, the key no longer holds it: the next getconn(key) borrows afresh.
    assert pool.getconn("job-1") is not None
    pool.putconn(pool.getconn("job-1"), "job-1")


def test_a_keyed_connection_put_back_without_its_key_frees_the_key(make_pool: MakePool) -> None:
    pool = make_pool(0, 2)
    conn = pool.getconn("k")
    pool.putconn(conn)  # psycopg2 finds the key itself; so do we
    assert quiet(pool)["pool_in_use"] == 0
    fresh = pool.getconn("k")
    pool.putconn(fresh, "k")


def test_a_key_whose_borrower_thread_died_gets_a_fresh_connection(make_pool: MakePool) -> None:
    # PersistentConnectionPool-style code keys by thread id, and ids are reused.
    pool = make_pool(0, 2)
    thread = threading.Thread(target=pool.getconn, args=("worker",))
    thread.start()
    thread.join()
    pool.maintain()  # reclaims the dead thread's connection
    conn = pool.getconn("worker")
    try:
        assert not conn.closed
    finally:
        if not conn.closed:
            pool.putconn(conn, "worker")


# -- PersistentConnectionPool: one connection per thread --------------------


def test_persistent_pool_gives_each_thread_its_own_connection_until_put_back(
    server: ServerInfo, pools: list[ConnectionPool]
) -> None:
    pool = PersistentConnectionPool(0, 3, dsn_of(server))
    pools.append(pool)
    conn = pool.getconn()
    assert pool.getconn() is conn  # the same, as often as this thread asks
    others: list[Any] = []

    def other_thread() -> None:
        other = pool.getconn()
        others.append(other)
        pool.putconn()  # psycopg2's signature: no argument, this thread's

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert others and others[0] is not conn
    pool.putconn()
    stats = quiet(pool)
    assert (stats["pool_in_use"], stats["pool_available"]) == (0, 2)
    again = pool.getconn()  # put back: this thread borrows afresh
    pool.putconn(again)  # a connection given explicitly, as psycopg2 allows
    assert quiet(pool)["pool_in_use"] == 0


def test_persistent_pool_never_gives_a_new_thread_a_dead_threads_connection(
    server: ServerInfo, pools: list[ConnectionPool]
) -> None:
    # psycopg2's PersistentConnectionPool keyed by thread id: a thread started
    # after one that exited holding its connection often has the same id, and
    # got that connection, maybe mid-transaction.
    pool = PersistentConnectionPool(0, 2, dsn_of(server))
    pools.append(pool)
    seen: list[tuple[int, Any]] = []

    def work(leave_open: bool) -> None:
        conn = pool.getconn()
        seen.append((threading.get_ident(), conn))
        if leave_open:
            conn.cursor().execute("BEGIN; CREATE TEMP TABLE left_behind (n int)")
        else:
            pool.putconn()

    for leave_open in (True, False):
        thread = threading.Thread(target=work, args=(leave_open,))
        thread.start()
        thread.join()
    (_, dead_threads), (_, new_threads) = seen
    assert new_threads is not dead_threads
    pool.maintain()  # takes back the exited thread's connection
    stats = quiet(pool)
    assert (stats["pool_in_use"], stats["connections_reclaimed"]) == (0, 1)
    assert dead_threads.closed


def test_persistent_pool_putconn_with_nothing_borrowed_raises_pool_error(
    server: ServerInfo, pools: list[ConnectionPool]
) -> None:
    pool = PersistentConnectionPool(0, 1, dsn_of(server))
    pools.append(pool)
    with pytest.raises(psycopg2.pool.PoolError, match="holds no connection"):
        pool.putconn()


def test_putconn_close_true_closes_the_connection_and_frees_its_slot(make_pool: MakePool) -> None:
    pool = make_pool(0, 1)
    conn = pool.getconn()
    pool.putconn(conn, close=True)
    assert conn.closed
    stats = quiet(pool)
    assert (stats["pool_size"], stats["connections_closed"]) == (0, 1)


# -- misuse: PoolError as psycopg2 raises it (or better) -----------------------


def test_putconn_of_a_connection_no_pool_lent_raises_pool_error(
    make_pool: MakePool, server: ServerInfo
) -> None:
    pool = make_pool(0, 2)
    foreign = psycopg2.connect(**server.connect_kwargs())
    try:
        # psycopg2: PoolError("trying to put unkeyed connection")
        with pytest.raises(psycopg2.pool.PoolError):
            pool.putconn(foreign)
        assert not foreign.closed  # touched nothing
    finally:
        foreign.close()
    quiet(pool)


def test_putconn_of_another_pools_connection_raises_and_touches_neither(
    make_pool: MakePool,
) -> None:
    first, second = make_pool(0, 2), make_pool(0, 2)
    conn = first.getconn()
    with pytest.raises(psycopg2.pool.PoolError, match="not checked out"):
        second.putconn(conn)
    assert not conn.closed
    first.putconn(conn)
    quiet(first)
    quiet(second)


def test_putconn_twice_raises_pool_error_the_second_time(make_pool: MakePool) -> None:
    pool = make_pool(0, 2)
    conn = pool.getconn()
    pool.putconn(conn)
    with pytest.raises(psycopg2.pool.PoolError):
        pool.putconn(conn)
    assert quiet(pool)["pool_available"] == 1


def test_getconn_after_closeall_raises_pool_error(make_pool: MakePool) -> None:
    pool = make_pool(0, 2)
    pool.putconn(pool.getconn())
    pool.closeall()
    assert pool.closed
    # psycopg2: PoolError("connection pool is closed")
    with pytest.raises(psycopg2.pool.PoolError, match="is closed"):
        pool.getconn()
    quiet(pool)


def test_closeall_leaves_lent_connections_open_until_returned_then_closes_them(
    make_pool: MakePool,
) -> None:
    # psycopg2 closes connections in use under their borrowers, then raises
    # PoolError at their putconn(); we let them finish, and close them at return.
    pool = make_pool(0, 2)
    conn = pool.getconn()
    pool.closeall()
    pool.closeall()  # idempotent (psycopg2 raises "connection pool is closed")
    assert backend_pid(conn) > 0
    pool.putconn(conn)
    assert conn.closed
    assert quiet(pool)["pool_size"] == 0


def test_an_exhausted_pool_waits_for_a_connection_instead_of_failing_at_once(
    make_pool: MakePool,
) -> None:
    pool = make_pool(0, 1, timeout=5)
    conn = pool.getconn()
    returner = threading.Timer(0.2, pool.putconn, args=(conn,), kwargs={"loan": conn.loan})
    returner.start()
    again = pool.getconn()  # psycopg2: PoolError("connection pool exhausted") at once
    returner.join()
    assert again is conn
    pool.putconn(again)
    quiet(pool)


def test_an_exhausted_pool_raises_a_pool_error_after_its_timeout(make_pool: MakePool) -> None:
    pool = make_pool(0, 1, timeout=0.2)
    conn = pool.getconn()
    with pytest.raises(psycopg2.pool.PoolError, match="couldn't get a connection"):
        pool.getconn()
    pool.putconn(conn)
    assert quiet(pool)["requests_timeouts"] == 1


# -- connection factories --------------------------------------------------------


def test_a_psycopg2_connection_class_is_accepted_as_connection_factory(
    make_pool: MakePool,
) -> None:
    pool = make_pool(0, 2, connection_factory=psycopg2.extras.RealDictConnection)
    conn = pool.getconn()
    assert isinstance(conn, psycopg2.extras.RealDictConnection)
    assert isinstance(conn, PooledConnection)
    with conn.cursor() as cur:
        cur.execute("SELECT 1 AS one")
        assert cur.fetchone() == {"one": 1}
    pool.putconn(conn)
    # Reused after its reset, still a RealDictConnection.
    again = pool.getconn()
    assert again is conn
    with again.cursor() as cur:
        cur.execute("SELECT 2 AS two")
        assert cur.fetchone() == {"two": 2}
    pool.putconn(again)
    quiet(pool)


def test_the_combined_factory_class_is_made_once_per_psycopg2_class(make_pool: MakePool) -> None:
    first = make_pool(0, 1, connection_factory=psycopg2.extras.NamedTupleConnection)
    second = make_pool(0, 1, connection_factory=psycopg2.extras.NamedTupleConnection)
    a, b = first.getconn(), second.getconn()
    assert type(a) is type(b)
    assert type(a).__name__ == "PooledNamedTupleConnection"
    first.putconn(a)
    second.putconn(b)


def test_a_logging_connection_is_initialized_by_configure(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    log = logging.getLogger("tests.dropin.sql")
    pool = make_pool(
        0,
        1,
        connection_factory=psycopg2.extras.LoggingConnection,
        configure=lambda conn: conn.initialize(log),
    )
    with caplog.at_level(logging.DEBUG, logger="tests.dropin.sql"), pool.cursor() as cur:
        cur.execute("SELECT 42")
        assert cur.fetchone() == (42,)
    assert "SELECT 42" in caplog.text
    quiet(pool)


def test_a_pooled_connection_subclass_is_used_as_is(make_pool: MakePool) -> None:
    class Mine(PooledConnection):
        pass

    pool = make_pool(0, 1, connection_factory=Mine)
    conn = pool.getconn()
    assert type(conn) is Mine
    pool.putconn(conn)


def test_a_factory_that_is_not_a_connection_class_is_refused(server: ServerInfo) -> None:
    with pytest.raises(TypeError, match=r"psycopg2\.extensions\.connection"):
        ConnectionPool(0, 1, dsn_of(server), connection_factory=dict)
    with pytest.raises(TypeError, match=r"psycopg2\.extensions\.connection"):
        ConnectionPool(0, 1, dsn_of(server), connection_factory=lambda dsn: None)


# -- context managers --------------------------------------------------------------


def test_connection_block_commits_on_success_and_returns_the_connection(
    make_pool: MakePool, admin: Any, table: str
) -> None:
    pool = make_pool(0, 2)
    with pool.connection() as conn:
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} VALUES (1)")
        assert rows(admin, table) == []  # not yet committed
    assert rows(admin, table) == [1]
    stats = quiet(pool)
    assert (stats["pool_in_use"], stats["pool_available"]) == (0, 1)


def test_connection_block_rolls_back_on_error_and_reraises(
    make_pool: MakePool, admin: Any, table: str
) -> None:
    pool = make_pool(0, 2)
    with pytest.raises(ZeroDivisionError), pool.connection() as conn:
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} VALUES (1)")
        1 / 0  # noqa: B018
    assert rows(admin, table) == []
    stats = quiet(pool)
    assert (stats["pool_in_use"], stats["pool_available"]) == (0, 1)
    # The connection it had is clean for the next borrower.
    with pool.connection() as conn:
        assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE


def test_connection_block_after_a_failed_statement_rolls_back_and_reraises_it(
    make_pool: MakePool, admin: Any, table: str
) -> None:
    pool = make_pool(0, 2)
    with pytest.raises(psycopg2.errors.UndefinedTable), pool.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (1)")
        cur.execute("SELECT * FROM no_such_table")
    assert rows(admin, table) == []
    assert quiet(pool)["pool_available"] == 1


def test_connection_block_whose_commit_fails_raises_and_returns_the_connection(
    make_pool: MakePool, admin: Any, table: str
) -> None:
    pool = make_pool(0, 2)
    # The unique constraint is deferred: the duplicate fails at COMMIT.
    with pytest.raises(psycopg2.errors.UniqueViolation), pool.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (1), (1)")
    assert rows(admin, table) == []
    stats = quiet(pool)
    assert stats["pool_in_use"] == 0
    with pool.cursor() as cur:
        cur.execute("SELECT 1")


def test_connection_block_on_an_autocommit_connection_is_still_one_transaction(
    make_pool: MakePool, admin: Any, table: str
) -> None:
    # Django lends its connections in autocommit mode (see pool_for()).
    def autocommit(conn: PooledConnection) -> None:
        conn.autocommit = True

    pool = make_pool(0, 1, configure=autocommit)
    with pytest.raises(ZeroDivisionError), pool.connection() as conn:
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} VALUES (1)")
        1 / 0  # noqa: B018
    assert rows(admin, table) == []
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (2)")
    assert rows(admin, table) == [2]
    conn = pool.getconn()
    assert conn.autocommit  # set back at its return
    pool.putconn(conn)
    quiet(pool)


def test_cursor_block_commits_and_closes_the_cursor(
    make_pool: MakePool, admin: Any, table: str
) -> None:
    pool = make_pool(0, 2)
    with pool.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (1), (2)")
    assert cur.closed
    assert rows(admin, table) == [1, 2]
    assert quiet(pool)["pool_in_use"] == 0


def test_cursor_block_rolls_back_on_error(make_pool: MakePool, admin: Any, table: str) -> None:
    pool = make_pool(0, 2)
    with pytest.raises(RuntimeError), pool.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (1)")
        raise RuntimeError("boom")
    assert rows(admin, table) == []
    assert quiet(pool)["pool_in_use"] == 0


def test_cursor_block_passes_its_arguments_to_conn_cursor(make_pool: MakePool) -> None:
    pool = make_pool(0, 1)
    with pool.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute("SELECT 1 AS one")
        assert cur.fetchone() == {"one": 1}
    with pool.cursor("named") as cur:  # a server-side cursor: needs the transaction
        cur.execute("SELECT generate_series(1, 3)")
        assert [n for (n,) in cur] == [1, 2, 3]
    quiet(pool)


def test_nested_blocks_get_two_connections(make_pool: MakePool) -> None:
    pool = make_pool(0, 2)
    with pool.connection() as outer, pool.connection() as inner:
        assert backend_pid(outer) != backend_pid(inner)
        assert pool.get_stats()["pool_in_use"] == 2
    assert quiet(pool)["pool_available"] == 2


def test_blocks_in_many_threads_share_the_pool(make_pool: MakePool, admin: Any, table: str) -> None:
    pool = make_pool(0, 3, timeout=10)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(10):
                with pool.cursor() as cur:
                    cur.execute(f"INSERT INTO {table} VALUES (%s)", (n * 100 + i,))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(rows(admin, table)) == 80
    stats = quiet(pool)
    assert stats["pool_size"] <= 3
    assert stats["pool_in_use"] == 0


def test_the_pool_as_a_context_manager_closes_at_exit(server: ServerInfo) -> None:
    with ConnectionPool(1, 2, dsn_of(server)) as pool:
        with pool.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        assert not pool.closed
    assert pool.closed
    stats = quiet(pool)
    assert stats["pool_size"] == 0
    with pytest.raises(psycopg2.pool.PoolError):
        pool.getconn()


def test_the_pool_closes_at_exit_of_a_block_that_raised(server: ServerInfo) -> None:
    with pytest.raises(KeyError), ConnectionPool(0, 2, dsn_of(server)) as pool:
        pool.putconn(pool.getconn())
        raise KeyError("x")
    assert pool.closed
    assert quiet(pool)["pool_size"] == 0


# -- the seeds' code, as written for psycopg2, run on our pool --------------------


def test_the_seeds_getcursor_helper_runs_unchanged(
    server: ServerInfo, admin: Any, table: str, pools: list[ConnectionPool]
) -> None:
    import contextlib

    pool = ConnectionPool(1, 4, dsn=dsn_of(server))
    pools.append(pool)

    @contextlib.contextmanager
    def getcursor() -> Iterator[Any]:
        con = pool.getconn()
        try:
            yield con.cursor()
            con.commit()
        except Exception:
            con.rollback()
            raise
        finally:
            pool.putconn(con)

    with getcursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (1)")
    with pytest.raises(ValueError), getcursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (2)")
        raise ValueError
    assert rows(admin, table) == [1]


# -- pool_for(): the ENGINE's pool, for raw psycopg2 code in a Django project --------


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_pool_for_returns_the_pool_the_engine_borrows_from() -> None:
    from django.db import connection

    import django_pgpool

    connection.ensure_connection()
    try:
        assert django_pgpool.pool_for("default") is connection._pgpool
    finally:
        connection.close()
    assert django_pgpool.pool_for("other") is not django_pgpool.pool_for("default")


def test_pool_for_an_alias_without_a_pool_says_which_engine_to_use(
    add_alias: Callable[..., str],
) -> None:
    from django.core.exceptions import ImproperlyConfigured

    import django_pgpool

    alias = add_alias("stock", ENGINE="django.db.backends.postgresql")
    with pytest.raises(
        ImproperlyConfigured, match=r"DATABASES\['stock'\]\['ENGINE'\].*'django_pgpool'"
    ):
        django_pgpool.pool_for(alias)


@pytest.mark.django_db(transaction=True, databases=["default"])
def test_a_pool_created_by_pool_for_is_the_one_the_engine_then_uses() -> None:
    from django.db import connection

    import django_pgpool
    from django_pgpool import registry
    from tests.testapp.models import Item

    connection.close()
    registry.close_pools()
    pool = django_pgpool.pool_for("default")
    with pool.cursor() as cur:
        cur.execute("SELECT current_database()")
        assert cur.fetchone() == ("test_pgpool",)  # the test database, as Django's queries
    # Connections opened by pool_for()'s pool get Django's set-up (JSONField).
    item = Item.objects.create(name="via pool_for", data={"a": [1]})
    assert Item.objects.get(pk=item.pk).data == {"a": [1]}
    assert connection._pgpool is pool
    connection.close()
    pool.check_invariants(quiescent=True)


@pytest.mark.django_db(transaction=True, databases=["default"])
def test_pool_for_blocks_are_transactions_on_djangos_autocommit_connections() -> None:
    from django.db import connection

    import django_pgpool
    from tests.testapp.models import Item

    pool = django_pgpool.pool_for("default")
    with pytest.raises(ZeroDivisionError), pool.cursor() as cur:
        cur.execute(
            "INSERT INTO testapp_item (name, data, created) "
            "VALUES ('raw, rolled back', '{}', now())"
        )
        1 / 0  # noqa: B018
    with pool.cursor() as cur:
        cur.execute(
            "INSERT INTO testapp_item (name, data, created) VALUES ('raw, kept', '{}', now())"
        )
    names = set(Item.objects.values_list("name", flat=True))
    assert "raw, kept" in names
    assert "raw, rolled back" not in names
    connection.close()
    pool.check_invariants(quiescent=True)


def test_pool_for_an_unknown_alias_raises_djangos_error() -> None:
    from django.utils.connection import ConnectionDoesNotExist

    import django_pgpool

    with pytest.raises(ConnectionDoesNotExist):
        django_pgpool.pool_for("no-such-alias")


def test_importing_the_package_imports_neither_django_nor_the_pool() -> None:
    import subprocess
    import sys

    code = (
        "import sys, django_pgpool; "
        "print('django' in sys.modules, 'django_pgpool.pool' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False"]


def test_connection_block_interrupted_by_a_base_exception_rolls_back_and_returns(
    make_pool: MakePool, admin: Any, table: str
) -> None:
    pool = make_pool(0, 1)
    with pytest.raises(KeyboardInterrupt), pool.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (1)")
        raise KeyboardInterrupt
    assert rows(admin, table) == []
    assert quiet(pool)["pool_in_use"] == 0


def test_a_connection_broken_inside_the_block_is_discarded_and_its_slot_freed(
    make_pool: MakePool, admin: Any
) -> None:
    pool = make_pool(0, 1)
    with pytest.raises(psycopg2.OperationalError), pool.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        (pid,) = cur.fetchone()
        with admin.cursor() as kill:
            kill.execute("SELECT pg_terminate_backend(%s)", (pid,))
        cur.execute("SELECT 1")
    stats = quiet(pool)
    assert (stats["pool_size"], stats["pool_in_use"]) == (0, 0)
    with pool.cursor() as cur:  # a new connection in the freed slot
        cur.execute("SELECT 1")
