"""Refilling to minconn after an outage: the background refill's backoff, and what ends it.

The refill backs off after each failed connect (2 s, 4 s, 8 s ... up to 60 s),
so that a server refusing us is not hammered. Once a borrower connects again,
the server is back: the backoff ends and the refill runs at once.

These tests stop and start the test run's own server (the ``pg`` fixture).
``pytest -s`` shows the measured figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg2
import pytest

from django_pgpool import maintenance
from django_pgpool import pool as pool_module
from django_pgpool.pool import ConnectionPool
from tests.conftest import CONNECT_TIMEOUT
from tests.helpers import admin_connection, wait_for
from tests.pgserver import ThrowawayServer

pytestmark = pytest.mark.slow  # they stop and start the server

MakePool = Callable[..., ConnectionPool]


def sessions(admin: Any, application_name: str) -> int:
    with admin.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            [application_name],
        )
        count: int = cursor.fetchone()[0]
    return count


def outage_with_a_failed_refill(pg: ThrowawayServer, pool: ConnectionPool) -> None:
    """Stop the server until the pool has lost its idle connections and a refill has failed."""
    wait_for(lambda: pool.get_stats()["pool_available"] == 2, what="the first refill to minconn")
    pg.stop()
    wait_for(
        lambda: pool.get_stats()["pool_size"] == 0 and pool.get_stats()["connections_errors"] > 0,
        timeout=15,
        what="the lost connections closed and a refill failed",
    )
    pg.start()


def test_a_borrowers_successful_connect_ends_the_refill_backoff(
    pg: ThrowawayServer, make_pool: MakePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The backoff of a refill that failed 4 times in a row (a 30 s outage)
    # from its first failure, so that the test needs no 30 s outage.
    monkeypatch.setattr(pool_module, "REFILL_BACKOFF", 30.0)
    app = "pgpool-refill-backoff"
    pool = make_pool(
        2, 4, timeout=5, failover_timeout=0, connect_timeout=CONNECT_TIMEOUT, application_name=app
    )
    outage_with_a_failed_refill(pg, pool)

    conn = pool.getconn()  # the server is back: this borrow opens a connection
    pool.putconn(conn)
    borrowed = time.monotonic()
    admin = admin_connection()
    try:
        refilled = wait_for(
            lambda: pool.get_stats()["pool_available"] == 2 and sessions(admin, app) == 2,
            timeout=10,  # before the fix: 30 s, the refill's backoff
            what="the refill to minconn after a borrower reached the server again",
        )
    finally:
        admin.close()
    assert refilled < 2 * maintenance.INTERVAL + 0.5
    pool.check_invariants()
    print(
        f"\nafter the outage, minconn=2 refilled {refilled:.2f} s after a borrower's connect "
        f"({time.monotonic() - borrowed:.2f} s), with a refill backoff of 30 s pending"
    )


def test_without_borrowers_the_refill_waits_out_its_backoff(
    pg: ThrowawayServer, make_pool: MakePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backoff still protects a server that refuses us: nothing ends it but a success."""
    monkeypatch.setattr(pool_module, "REFILL_BACKOFF", 4.0)
    app = "pgpool-refill-waits"
    pool = make_pool(
        2, 4, timeout=5, failover_timeout=0, connect_timeout=CONNECT_TIMEOUT, application_name=app
    )
    outage_with_a_failed_refill(pg, pool)
    started = time.monotonic()
    admin = admin_connection()
    try:
        assert sessions(admin, app) == 0
        refilled = wait_for(
            lambda: pool.get_stats()["pool_available"] == 2 and sessions(admin, app) == 2,
            timeout=15,
            what="the refill to minconn by itself, after its backoff",
        )
    finally:
        admin.close()
    # The start itself takes a moment of the 4 s backoff (pg_ctl -w).
    assert 1.0 < time.monotonic() - started < 4.0 + 2 * maintenance.INTERVAL + 0.5
    print(f"\nafter the outage, with no borrower, minconn=2 refilled by itself in {refilled:.2f} s")


def test_a_failed_borrow_does_not_end_the_refill_backoff(
    pg: ThrowawayServer, make_pool: MakePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "REFILL_BACKOFF", 30.0)
    pool = make_pool(
        2, 4, timeout=5, failover_timeout=0, connect_timeout=CONNECT_TIMEOUT, application_name="x"
    )
    wait_for(lambda: pool.get_stats()["pool_available"] == 2, what="the first refill to minconn")
    pg.stop()
    wait_for(lambda: pool.get_stats()["connections_errors"] > 0, timeout=15, what="a failed refill")
    with pytest.raises(psycopg2.OperationalError):
        pool.getconn()
    with pool._lock:
        assert pool._refill_failures > 0
        assert pool._refill_after > time.monotonic() + 20
