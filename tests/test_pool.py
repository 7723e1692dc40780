"""The pool core, without Django, against a real PostgreSQL."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.pool
import pytest

from django_pgpool.errors import PoolClosed, PoolTimeout, TooManyRequests
from django_pgpool.pool import ConnectionPool
from tests.conftest import backend_pid
from tests.helpers import server_connections, wait_for

MakePool = Callable[..., ConnectionPool]


def test_pool_is_a_psycopg2_threaded_pool_with_its_api(make_pool: MakePool) -> None:
    pool = make_pool(0, 2)
    assert isinstance(pool, psycopg2.pool.ThreadedConnectionPool)
    assert (pool.minconn, pool.maxconn, pool.closed) == (0, 2, False)
    conn = pool.getconn("a")
    assert pool.getconn("a") is conn
    pool.putconn(conn, "a")
    pool.closeall()
    assert pool.closed


def test_creating_a_pool_opens_no_connection(make_pool: MakePool, admin: Any) -> None:
    pool = make_pool(0, 4, application_name="pgpool-lazy")
    time.sleep(0.2)
    assert pool.get_stats()["pool_size"] == 0
    assert server_connections(admin, "pgpool-lazy") == 0


def test_returned_connection_is_reused(make_pool: MakePool) -> None:
    pool = make_pool(0, 4)
    conn = pool.getconn()
    first = backend_pid(conn)
    pool.putconn(conn)
    conn = pool.getconn()
    assert backend_pid(conn) == first
    pool.putconn(conn)
    assert pool.get_stats()["connections_num"] == 1


def test_idle_connections_are_kept_up_to_maxconn(make_pool: MakePool) -> None:
    pool = make_pool(1, 4)
    conns = [pool.getconn() for _ in range(4)]
    for conn in conns:
        pool.putconn(conn)
    stats = pool.get_stats()
    assert (stats["pool_size"], stats["pool_available"]) == (4, 4)


def test_minconn_connections_are_opened_in_the_background_and_refilled(
    make_pool: MakePool, admin: Any
) -> None:
    pool = make_pool(2, 4, application_name="pgpool-minconn")
    wait_for(lambda: pool.get_stats()["pool_available"] == 2)
    with admin.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'pgpool-minconn'"
        )
    # pg_terminate_backend() returns before the backends have gone.
    wait_for(lambda: server_connections(admin, "pgpool-minconn") == 0)
    conn = pool.getconn()  # a dead one is replaced, not handed out
    assert backend_pid(conn) > 0
    pool.putconn(conn)
    wait_for(lambda: server_connections(admin, "pgpool-minconn") == 2)


def test_maxconn_is_never_exceeded_under_50_threads(make_pool: MakePool, admin: Any) -> None:
    pool = make_pool(0, 5, application_name="pgpool-50", timeout=30)
    in_use = 0
    peak = 0
    server_peak = 0
    lock = threading.Lock()
    errors: list[BaseException] = []
    done = threading.Event()

    def borrower() -> None:
        nonlocal in_use, peak
        try:
            for _ in range(20):
                conn = pool.getconn()
                with lock:
                    in_use += 1
                    peak = max(peak, in_use)
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_sleep(0.001)")
                with lock:
                    in_use -= 1
                pool.putconn(conn)
        except BaseException as exc:
            errors.append(exc)

    def monitor() -> None:
        nonlocal server_peak
        while not done.is_set():
            server_peak = max(server_peak, server_connections(admin, "pgpool-50"))
            time.sleep(0.01)

    watcher = threading.Thread(target=monitor)
    watcher.start()
    threads = [threading.Thread(target=borrower) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    watcher.join()
    assert errors == []
    assert peak <= 5
    assert server_peak <= 5
    stats = pool.get_stats()
    assert stats["requests_num"] == 1000
    assert stats["connections_num"] <= 5


def test_waiting_caller_gets_a_connection_returned_within_the_timeout(
    make_pool: MakePool,
) -> None:
    pool = make_pool(0, 1, timeout=5)
    held = pool.getconn()
    pid = backend_pid(held)
    got: list[int] = []

    def waiter() -> None:
        conn = pool.getconn()
        got.append(backend_pid(conn))
        pool.putconn(conn)

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_for(lambda: pool.get_stats()["requests_waiting"] == 1)
    pool.putconn(held)
    thread.join()
    assert got == [pid]
    assert pool.get_stats()["requests_queued"] == 1
    # Counted once, by the thread that handed the connection over.
    assert sum(pool.activity()["wait_buckets"]) == 1


def test_borrow_and_return_leave_no_work_for_the_garbage_collector(make_pool: MakePool) -> None:
    # The collector runs when allocations outnumber deallocations; a full
    # collection takes tens of ms with Django loaded and stalls every thread.
    # A borrow + return (with its reset) must not feed it at every request.
    pool = make_pool(0, 1)
    for _ in range(100):
        pool.putconn(pool.getconn())
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        for _ in range(1000):
            pool.putconn(pool.getconn())
        grown = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert grown < 100


def test_exhausted_pool_waits_then_raises_pool_timeout(make_pool: MakePool) -> None:
    pool = make_pool(0, 1, timeout=0.3, name="database 'default'")
    held = pool.getconn()
    started = time.monotonic()
    with pytest.raises(PoolTimeout) as info:
        pool.getconn()
    assert time.monotonic() - started >= 0.29
    assert isinstance(info.value, psycopg2.OperationalError)
    message = str(info.value)
    assert "database 'default'" in message
    assert "after 0.3 s" in message
    assert "maxconn=1, 1 in use, 0 waiting" in message
    assert "OPTIONS['maxconn']" in message
    stats = pool.get_stats()
    assert (stats["requests_timeouts"], stats["requests_errors"]) == (1, 1)
    assert stats["requests_wait_ms"] >= 290
    assert sum(pool.activity()["wait_buckets"]) == 1
    pool.putconn(held)


def test_max_waiting_rejects_at_once_when_that_many_wait(make_pool: MakePool) -> None:
    pool = make_pool(0, 1, timeout=5, max_waiting=1)
    held = pool.getconn()
    thread = threading.Thread(target=lambda: pool.putconn(pool.getconn()))
    thread.start()
    wait_for(lambda: pool.get_stats()["requests_waiting"] == 1)
    started = time.monotonic()
    with pytest.raises(TooManyRequests, match=r"max_waiting=1"):
        pool.getconn()
    assert time.monotonic() - started < 0.5
    pool.putconn(held)
    thread.join()


def test_waiters_are_served_in_fifo_order(make_pool: MakePool) -> None:
    # Can fail: with the waiters' deque popped from the right (a stack) it
    # failed with served == [5, 4, 3, 2, 1, 0] (checked on 2026-12-05).
    pool = make_pool(0, 1, timeout=10)
    held = pool.getconn()
    served: list[int] = []

    def waiter(number: int) -> None:
        conn = pool.getconn()
        served.append(number)
        pool.putconn(conn)

    threads = []
    for number in range(6):
        thread = threading.Thread(target=waiter, args=(number,))
        thread.start()
        threads.append(thread)
        wait_for(lambda n=number: pool.get_stats()["requests_waiting"] == n + 1)  # type: ignore[misc]
    pool.putconn(held)
    for thread in threads:
        thread.join()
    assert served == list(range(6))


def test_returning_thread_cannot_jump_the_queue(make_pool: MakePool) -> None:
    """A thread that returns and borrows again in a loop must not starve a waiter."""
    pool = make_pool(0, 1, timeout=5)
    stop = threading.Event()
    waited: list[float] = []

    def greedy() -> None:
        while not stop.is_set():
            conn = pool.getconn()
            pool.putconn(conn)

    thread = threading.Thread(target=greedy)
    thread.start()
    time.sleep(0.05)
    for _ in range(20):
        started = time.monotonic()
        pool.putconn(pool.getconn())
        waited.append(time.monotonic() - started)
    stop.set()
    thread.join()
    assert max(waited) < 1.0


def test_killed_idle_backend_is_replaced_without_an_error(make_pool: MakePool, admin: Any) -> None:
    pool = make_pool(0, 2, check_after=0)
    conn = pool.getconn()
    dead_pid = backend_pid(conn)
    pool.putconn(conn)
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", [dead_pid])
    time.sleep(0.1)
    conn = pool.getconn()
    assert backend_pid(conn) != dead_pid
    pool.putconn(conn)
    assert pool.get_stats()["connections_lost"] == 1


def test_returning_a_broken_connection_never_raises_and_frees_its_slot(
    make_pool: MakePool, admin: Any
) -> None:
    pool = make_pool(0, 1)
    conn = pool.getconn()
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", [backend_pid(conn)])
    with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
        cur.execute("SELECT 1")
    pool.putconn(conn)
    assert pool.get_stats()["pool_size"] == 0
    conn = pool.getconn()  # the slot is free again
    pool.putconn(conn)


def test_returning_a_connection_twice_is_an_error(make_pool: MakePool) -> None:
    pool = make_pool(0, 2)
    conn = pool.getconn()
    pool.putconn(conn)
    with pytest.raises(psycopg2.pool.PoolError, match="returned twice"):
        pool.putconn(conn)


def test_returning_a_connection_of_another_pool_is_an_error(make_pool: MakePool) -> None:
    first, second = make_pool(0, 1), make_pool(0, 1)
    conn = first.getconn()
    with pytest.raises(psycopg2.pool.PoolError, match="another pool"):
        second.putconn(conn)
    first.putconn(conn)


def test_closeall_closes_idle_now_and_borrowed_ones_when_returned(
    make_pool: MakePool, admin: Any
) -> None:
    pool = make_pool(0, 3, application_name="pgpool-closeall")
    idle, borrowed = pool.getconn(), pool.getconn()
    pool.putconn(idle)
    pool.closeall()
    assert idle.closed
    assert not borrowed.closed
    with pytest.raises(PoolClosed):
        pool.getconn()
    pool.putconn(borrowed)  # no exception
    assert borrowed.closed
    pool.closeall()  # idempotent
    wait_for(lambda: server_connections(admin, "pgpool-closeall") == 0)


def test_closeall_wakes_waiters_with_pool_closed(make_pool: MakePool) -> None:
    pool = make_pool(0, 1, timeout=10)
    held = pool.getconn()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            pool.getconn()
        except PoolClosed as exc:
            errors.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_for(lambda: pool.get_stats()["requests_waiting"] == 1)
    pool.closeall()
    thread.join(2)
    assert len(errors) == 1
    assert sum(pool.activity()["wait_buckets"]) == 1
    pool.putconn(held)


def test_connections_older_than_max_lifetime_are_replaced(make_pool: MakePool) -> None:
    pool = make_pool(0, 1, max_lifetime=0.3)
    conn = pool.getconn()
    first = backend_pid(conn)
    pool.putconn(conn)
    time.sleep(0.4)
    conn = pool.getconn()
    assert backend_pid(conn) != first
    pool.putconn(conn)
    assert pool.get_stats()["connections_expired"] >= 1


def test_idle_connections_shrink_toward_minconn_after_max_idle(make_pool: MakePool) -> None:
    pool = make_pool(1, 4, max_idle=0.2)
    conns = [pool.getconn() for _ in range(4)]
    for conn in conns:
        pool.putconn(conn)
    wait_for(lambda: pool.get_stats()["pool_size"] == 1, timeout=5)


def test_failed_connect_raises_and_frees_its_slot(server: Any) -> None:
    kwargs = {**server.connect_kwargs(), "port": 1, "connect_timeout": 2}
    pool = ConnectionPool(0, 1, timeout=1, failover_timeout=0, **kwargs)
    try:
        for _ in range(3):
            with pytest.raises(psycopg2.OperationalError):
                pool.getconn()
        stats = pool.get_stats()
        assert stats["pool_size"] == 0
        assert stats["connections_errors"] == 3
    finally:
        pool.closeall()


def test_get_stats_uses_psycopg_pool_names_and_pop_stats_resets_counters(
    make_pool: MakePool,
) -> None:
    pool = make_pool(0, 2)
    pool.putconn(pool.getconn())
    stats = pool.pop_stats()
    for key in ("pool_min", "pool_max", "pool_size", "pool_available", "requests_waiting"):
        assert key in stats
    assert stats["requests_num"] == 1
    assert stats["connections_num"] == 1
    after = pool.get_stats()
    assert after["requests_num"] == 0
    assert after["pool_size"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((2, 1), "minconn"),
        ((0, 0), "maxconn"),
        ((True, 3), "minconn"),
    ],
)
def test_bad_sizes_are_refused(args: tuple[Any, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConnectionPool(*args)


def test_reconnect_closes_idle_now_and_borrowed_ones_when_returned(make_pool: MakePool) -> None:
    pool = make_pool(0, 3)
    idle, borrowed = pool.getconn(), pool.getconn()
    borrowed_pid = backend_pid(borrowed)
    pool.putconn(idle)
    pool.reconnect()
    assert idle.closed
    assert backend_pid(borrowed) == borrowed_pid  # a borrower is never interrupted
    assert pool.retired_in_use() == 1
    pool.putconn(borrowed)
    assert borrowed.closed
    assert pool.retired_in_use() == 0
    fresh = pool.getconn()  # the pool keeps serving, with new connections
    assert backend_pid(fresh) != borrowed_pid
    pool.putconn(fresh)
    assert not pool.closed


def test_log_records_carry_the_pool_and_the_pid(
    make_pool: MakePool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="django_pgpool")
    pool = make_pool(0, 1, timeout=0.1, name="database 'logged'", max_lifetime=0.05)
    held = pool.getconn()
    with pytest.raises(PoolTimeout):
        pool.getconn()
    time.sleep(0.1)
    pool.putconn(held)  # expired: closed at return
    records = [r for r in caplog.records if r.name == "django_pgpool"]
    levels = {r.levelname for r in records}
    assert {"DEBUG", "ERROR"} <= levels
    for record in records:
        assert record.pool == "database 'logged'"  # type: ignore[attr-defined]
        assert record.pid == os.getpid()  # type: ignore[attr-defined]
        assert f"pid {os.getpid()}" in record.getMessage()
    messages = " | ".join(r.getMessage() for r in records)
    assert "connection opened" in messages
    assert "connection closed at return (expired)" in messages


def test_a_waiter_about_to_time_out_takes_the_slot_of_a_thread_that_died(
    make_pool: MakePool,
) -> None:
    pool = make_pool(0, 1, timeout=0.5)
    holding, die = threading.Event(), threading.Event()

    def hold_and_die() -> None:
        pool.getconn()
        holding.set()
        die.wait()

    holder = threading.Thread(target=hold_and_die)
    holder.start()
    holding.wait()
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.getconn()))
    waiter.start()
    wait_for(lambda: pool.get_stats()["requests_waiting"] == 1)
    die.set()  # the holder exits without returning its connection
    holder.join()
    waiter.join()
    assert len(got) == 1 and not got[0].closed
    assert pool.get_stats()["connections_reclaimed"] == 1
    pool.putconn(got[0])


def test_a_connection_opened_while_the_pool_closes_is_counted_as_closed(
    make_pool: MakePool,
) -> None:
    pool = make_pool(0, 2, configure=lambda conn: time.sleep(0.5))
    errors: list[BaseException] = []

    def borrow() -> None:
        try:
            pool.getconn()
        except PoolClosed as exc:
            errors.append(exc)

    thread = threading.Thread(target=borrow)
    thread.start()
    time.sleep(0.2)
    pool.closeall()
    thread.join()
    stats = pool.get_stats()
    assert len(errors) == 1
    assert (stats["connections_num"], stats["connections_closed"], stats["pool_size"]) == (1, 1, 0)
