"""Failover on two real clusters: a primary and a synchronous streaming replica.

The pool reaches them through libpq's multi-host connection (both hosts,
``target_session_attrs=read-write``). Eight threads write (one INSERT per
request, autocommit) while the primary is (a) demoted in place, as an Aurora
writer flip does it, then the replica promoted, or (b) crashed, then the
replica promoted. An error with SQLSTATE 25006, 57P0x or class 08 retires
every connection opened before it; a borrow that finds no writable host yet
keeps trying for ``failover_timeout``.

The rule is also checked where the error comes from: a server connection lost
at ``commit()``, ``rollback()`` or a COPY (the development server; the backend
ended by ``pg_terminate_backend()``), the crash of another backend (a
throwaway cluster: the postmaster ends every backend, then recovers), and the
ENGINE given the replica first in ``HOST`` (Django on the pair).

What psycopg2 reports for a server that ends a session: libpq (14 and later)
folds the FATAL message it read (57P01) into its "server closed the
connection unexpectedly" error, which carries no SQLSTATE; the crash of
another backend (57P02) is only ever sent as a WARNING, which reaches the
client as a notice if a query is running. Both reach the pool as a closed
connection (``pgcode`` None), which the rule counts as class 08.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import pytest
from django.db import connections

from django_pgpool.pool import ConnectionPool
from tests.conftest import CONNECT_TIMEOUT, MakePool, backend_pid
from tests.helpers import Workers, terminate, wait_for
from tests.pgserver import ThrowawayServer
from tests.replication import (  # the fixtures register under their names without _fixture
    ReplicaPair,
    replica_pair_fixture,  # noqa: F401
    sync_replica_pair_fixture,  # noqa: F401
)
from tests.testapp.models import Item

THREADS = 8
MAXCONN = 4


class WriteLoad(Workers):
    """Eight threads inserting (thread, n) rows through the pool until stopped."""

    def __init__(self, pool: ConnectionPool) -> None:
        super().__init__([threading.Thread(target=self._work, args=(i,)) for i in range(THREADS)])
        self.pool = pool
        self.acknowledged: list[tuple[int, int]] = []
        self.failures: list[tuple[float, str]] = []  # (monotonic time, error)
        self.backends_failed: list[int] = []

    def _work(self, thread: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            conn = None
            try:
                conn = self.pool.getconn()
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO writes (thread, n) VALUES (%s, %s)", [thread, n])
                with self._lock:
                    self.acknowledged.append((thread, n))
            except psycopg2.Error as exc:
                with self._lock:
                    self.failures.append((time.monotonic(), str(exc).splitlines()[0]))
                    if conn is not None:
                        self.backends_failed.append(id(conn))
            finally:
                if conn is not None:
                    self.pool.putconn(conn)


def autocommit(conn: Any) -> None:
    conn.autocommit = True


def failover_pool(pair: ReplicaPair) -> ConnectionPool:
    return ConnectionPool(
        2,
        MAXCONN,
        timeout=15,
        failover_timeout=10,
        check_after=0.2,
        configure=autocommit,
        **pair.multi_host_params(),
    )


def prepare(pair: ReplicaPair) -> None:
    conn = pair.connect(pair.primary_info)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE writes (thread int, n int, PRIMARY KEY (thread, n))")
    conn.close()
    pair.wait_replica_caught_up()


def rows_on(pair: ReplicaPair) -> set[tuple[int, int]]:
    conn = pair.connect(pair.replica_info)
    with conn.cursor() as cur:
        cur.execute("SELECT thread, n FROM writes")
        rows = {(t, n) for t, n in cur.fetchall()}
    conn.close()
    return rows


def run_failover(pair: ReplicaPair, fail_primary: Callable[[], None]) -> dict[str, Any]:
    prepare(pair)
    pool = failover_pool(pair)
    try:
        with WriteLoad(pool) as load:
            time.sleep(0.5)
            began = time.monotonic()
            fail_primary()
            time.sleep(0.3)
            pair.promote_replica()
            promoted = time.monotonic()
            time.sleep(3.0)
            before_end = len(load.acknowledged)
            time.sleep(0.5)
            assert len(load.acknowledged) > before_end, "no write succeeds after the promotion"
    finally:
        pool.closeall()
    lost = set(load.acknowledged) - rows_on(pair)
    last = max((at for at, _ in load.failures), default=None)
    return {
        "load": load,
        "lost": lost,
        "failed": len(load.failures),
        "last_after_promotion": None if last is None else last - promoted,
        "fault_to_promotion": promoted - began,
    }


def report(name: str, result: dict[str, Any]) -> str:
    load: WriteLoad = result["load"]
    last = result["last_after_promotion"]
    return (
        f"\n{name}: {len(load.acknowledged)} writes acknowledged, {result['failed']} failed"
        + (f", the last {last:+.2f} s from the promotion" if last is not None else "")
        + f"; promotion {result['fault_to_promotion']:.2f} s after the fault; "
        f"{len(result['lost'])} acknowledged writes lost; errors: "
        f"{sorted({error for _, error in load.failures})[:3]}"
    )


def test_in_place_demotion_then_promotion(sync_replica_pair: ReplicaPair) -> None:
    result = run_failover(sync_replica_pair, sync_replica_pair.demote_in_place)
    print(report("in-place demotion", result))
    assert result["lost"] == set()
    last = result["last_after_promotion"]
    assert last is None or last <= 2.0
    # At most one failure per pooled connection: the first write on each one
    # after the demotion (25006) retires them all.
    failed_connections = result["load"].backends_failed
    assert len(failed_connections) == len(set(failed_connections)) <= MAXCONN


def test_primary_crash_then_promotion(sync_replica_pair: ReplicaPair) -> None:
    result = run_failover(sync_replica_pair, sync_replica_pair.crash_primary)
    print(report("primary crash", result))
    assert result["lost"] == set()
    last = result["last_after_promotion"]
    assert last is None or last <= 2.0


def not_in_recovery(conn: Any) -> None:
    """OPTIONS['check'] for a writer: a server in recovery (a replica) is not one."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery()")
        if cur.fetchone()[0]:
            raise RuntimeError("the server is in recovery: not the primary")


def test_a_check_rejects_an_idle_connection_that_fails_it(sync_replica_pair: ReplicaPair) -> None:
    calls: list[bool] = []

    def check(conn: Any) -> None:
        calls.append(True)
        not_in_recovery(conn)

    replica = sync_replica_pair.replica_info.connect_kwargs()
    pool = ConnectionPool(0, 2, timeout=5, check_after=0, check=check, **replica)
    try:
        pool.putconn(pool.getconn())  # new: no check (its connect just happened)
        assert calls == []
        conn = pool.getconn()  # idle: checked, rejected, replaced by a new one
        pool.putconn(conn)
        assert calls == [True]
        assert pool.get_stats()["connections_lost"] == 1
    finally:
        pool.closeall()
    primary = sync_replica_pair.primary_info.connect_kwargs()
    pool = ConnectionPool(0, 2, timeout=5, check_after=0, check=check, **primary)
    try:
        pool.putconn(pool.getconn())
        pool.putconn(pool.getconn())  # checked and kept
        assert pool.get_stats()["connections_lost"] == 0
        assert pool.get_stats()["connections_num"] == 1
    finally:
        pool.closeall()


# -- where the error comes from ------------------------------------------------


def leave_a_with_block(conn: Any) -> None:
    with conn:  # psycopg2 calls conn.commit() by name at the end
        pass


# What a borrower does next on a connection whose backend was terminated in
# the middle of its transaction: none of these goes through cursor.execute().
LOST_AT: dict[str, Callable[[Any], object]] = {
    "commit": lambda conn: conn.commit(),
    "rollback": lambda conn: conn.rollback(),
    "with block": leave_a_with_block,
    "copy_expert": lambda conn: conn.cursor().copy_expert(
        "COPY (SELECT 1) TO STDOUT", io.StringIO()
    ),
    "copy_to": lambda conn: conn.cursor().copy_to(io.StringIO(), "pg_namespace"),
}


@pytest.mark.parametrize("call", sorted(LOST_AT))
def test_a_connection_lost_at_commit_retires_every_connection_opened_before_it(
    call: str, make_pool: MakePool, admin: Any
) -> None:
    # check_after: the idle ones are not checked at their borrow, so only the
    # rule keeps an older connection from being lent again.
    pool = make_pool(0, 3, check_after=60)
    older = pool.getconn()
    conn = pool.getconn()
    older_pid, pid = backend_pid(older), backend_pid(conn)  # both in a transaction now
    terminate(admin, {pid})
    with pytest.raises(psycopg2.OperationalError) as caught:
        LOST_AT[call](conn)
    # libpq read the FATAL (57P01) but reports "server closed the connection
    # unexpectedly", without a SQLSTATE: the rule's class 08 case.
    assert caught.value.pgcode is None
    assert conn.closed == 2
    pool.putconn(conn)
    older.rollback()
    pool.putconn(older)

    assert older.closed, "a connection opened before the error was kept"
    fresh = pool.getconn()
    try:
        assert fresh is not older
        assert backend_pid(fresh) not in (pid, older_pid)
    finally:
        pool.putconn(fresh)
    stats = pool.get_stats()
    assert stats.get("connections_expired") == 2, stats  # the one that failed, and the older one
    assert stats["pool_size"] == 1


def test_the_crash_of_another_backend_retires_the_pool_and_a_borrow_rides_through_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="django_pgpool")
    # Its own cluster: a crash restarts every backend of the server.
    with ThrowawayServer() as server:
        kwargs = server.info.connect_kwargs()
        pool = ConnectionPool(
            0,
            3,
            timeout=10,
            failover_timeout=10,
            check_after=60,
            connect_timeout=CONNECT_TIMEOUT,
            **kwargs,
        )
        victim = psycopg2.connect(**kwargs)
        victim.autocommit = True
        try:
            older = pool.getconn()
            conn = pool.getconn()
            older_pid, pid = backend_pid(older), backend_pid(conn)
            older.rollback()
            pool.putconn(older)  # idle, not checked at its next borrow (check_after)
            conn.rollback()
            errors: list[BaseException] = []

            def in_flight() -> None:
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT pg_sleep(20)")
                except BaseException as exc:
                    errors.append(exc)

            query = threading.Thread(target=in_flight)
            query.start()

            def sleeping() -> bool:
                with victim.cursor() as cur:
                    cur.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", [pid])
                    row = cur.fetchone()
                return row is not None and row[0] == "PgSleep"

            wait_for(sleeping, what="the pooled connection's query running")
            os.kill(victim.get_backend_pid(), signal.SIGKILL)  # the crash of a backend
            query.join(15)
            assert not query.is_alive()
            crashed = time.monotonic()
            # The postmaster ended the others with a WARNING 57P02 (a notice,
            # read because a query was running), then closed the connection.
            assert len(errors) == 1 and isinstance(errors[0], psycopg2.OperationalError)
            assert errors[0].pgcode is None and conn.closed == 2
            assert any("crash of another server process" in n for n in conn.notices), conn.notices
            pool.putconn(conn)

            fresh = pool.getconn()  # during crash recovery: refused (57P03), tried again
            recovered = time.monotonic() - crashed
            try:
                assert fresh is not older and older.closed
                assert backend_pid(fresh) not in (pid, older_pid)
            finally:
                pool.putconn(fresh)
            retired = [r for r in caplog.records if "no longer the one to use" in r.getMessage()]
            assert [r.levelno for r in retired] == [logging.WARNING]
            retries = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
            print(
                f"\nbackend crash: a borrow {recovered:.3f} s after the error succeeded, "
                f"after {len(retries)} refused connects ({retries[:1]})"
            )
            # The one that failed, and the older one.
            assert pool.get_stats().get("connections_expired") == 2
        finally:
            pool.closeall()
            victim.close()


# The Django-level test's OPTIONS['check']: the ports of the servers it passed.
WRITER_CHECKS: list[int] = []


def writer_only(conn: Any) -> None:
    """OPTIONS['check'] of the ENGINE test: reject a server in recovery, note the port."""
    not_in_recovery(conn)
    WRITER_CHECKS.append(int(conn.info.port))


@pytest.mark.django_db(transaction=True)
def test_the_engine_given_the_replica_first_reads_and_writes_on_the_primary(
    replica_pair: ReplicaPair, add_alias: Callable[..., str]
) -> None:
    primary, replica = replica_pair.primary_info, replica_pair.replica_info
    WRITER_CHECKS.clear()
    alias = add_alias(
        "failover_writer",
        ENGINE="django_pgpool",
        NAME=primary.dbname,
        USER=primary.user,
        PASSWORD=primary.password,
        HOST=f"{replica.host},{primary.host}",
        PORT=f"{replica.port},{primary.port}",
        CONN_MAX_AGE=0,
        OPTIONS={
            "minconn": 0,
            "maxconn": 2,
            "timeout": 5,
            "check_after": 0,  # every borrow of an idle connection runs the check
            "target_session_attrs": "read-write",
            "connect_timeout": CONNECT_TIMEOUT,
            "check": f"{__name__}.writer_only",
        },
    )
    wrapper = connections[alias]
    with wrapper.schema_editor() as editor:
        editor.create_model(Item)
    wrapper.close()  # back to the pool: each block below is a request of its own
    Item.objects.using(alias).create(name="written")
    wrapper.close()
    for _ in range(2):
        with wrapper.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery(), inet_server_port()")
            assert cur.fetchone() == (False, primary.port)
        wrapper.close()
    assert list(Item.objects.using(alias).values_list("name", flat=True)) == ["written"]
    wrapper.close()

    direct = replica_pair.connect(primary)
    try:
        with direct.cursor() as cur:
            cur.execute("SELECT name FROM testapp_item")
            assert cur.fetchall() == [("written",)]
    finally:
        direct.close()
    assert WRITER_CHECKS and set(WRITER_CHECKS) == {primary.port}
