"""Failover on two real clusters: a primary and a synchronous streaming replica.

The pool reaches them through libpq's multi-host connection (both hosts,
``target_session_attrs=read-write``). Eight threads write (one INSERT per
request, autocommit) while the primary is (a) demoted in place, as an Aurora
writer flip does it, then the replica promoted, or (b) crashed, then the
replica promoted. An error with SQLSTATE 25006, 57P0x or class 08 retires
every connection opened before it; a borrow that finds no writable host yet
keeps trying for ``failover_timeout``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg2

from django_pgpool.pool import ConnectionPool
from tests.replication import (  # the fixture registers under its name without _fixture
    ReplicaPair,
    sync_replica_pair_fixture,  # noqa: F401
)

THREADS = 8
MAXCONN = 4


class WriteLoad:
    """Eight threads inserting (thread, n) rows through the pool until stopped."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.acknowledged: list[tuple[int, int]] = []
        self.failures: list[tuple[float, str]] = []  # (monotonic time, error)
        self.backends_failed: list[int] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, args=(i,)) for i in range(THREADS)]

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

    def __enter__(self) -> WriteLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


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
