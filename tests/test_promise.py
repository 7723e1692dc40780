"""The pool's promise under interruption and every legal use, one scenario a test.

A slot is never lost, a connection is never lent to two borrowers at once,
and nothing a borrower did reaches the next one. Each test here failed on
the pool before these scenarios were fixed (the closing note of issue 10
lists them); the interruptions are real signals (SIGALRM with a handler that
raises, as Celery's soft time limit or a timeout decorator does), the faults
real links through a TCP proxy, except where a fault cannot be produced for
real (a thread that can't be started, a maintenance round that runs late).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras
import pytest
from django.db import connections

from django_pgpool import pool as pool_module
from django_pgpool.errors import PoolTimeout
from django_pgpool.pool import ConnectionPool
from tests.conftest import MakePool, backend_pid
from tests.helpers import make_wrapper, wait_for
from tests.tcpproxy import TcpProxy


class Interrupted(Exception):
    """Raised by the SIGALRM handler, like Celery's SoftTimeLimitExceeded."""


@contextlib.contextmanager
def alarm_after(seconds: float) -> Iterator[None]:
    """Raise Interrupted in the main thread after ``seconds``, from a signal handler.

    Not inside a text decoder: psycopg2 calls those from C and prints and
    drops an exception raised there; a signal handled there is sent again
    1 ms later (it could as well have come then).
    """

    def interrupt(signum: int, frame: Any) -> None:
        if frame is not None and f"{os.sep}encodings{os.sep}" in frame.f_code.co_filename:
            signal.setitimer(signal.ITIMER_REAL, 0.001)
            return
        raise Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def interruptible_queries() -> Iterator[None]:
    """Queries wait for the server in Python (psycopg2.extras.wait_select), as psycopg2
    documents for making them interruptible: a signal's exception ends them at once."""
    psycopg2.extensions.set_wait_callback(psycopg2.extras.wait_select)
    try:
        yield
    finally:
        psycopg2.extensions.set_wait_callback(None)


def borrow_at_once(pool: ConnectionPool) -> Any:
    """Borrow, failing the test if the pool makes us wait: a slot would have been lost."""
    started = time.monotonic()
    conn = pool.getconn()
    assert time.monotonic() - started < 0.5 * pool.timeout, "the borrow had to wait"
    return conn


def hold_in_thread(pool: ConnectionPool) -> tuple[list[Any], threading.Event, threading.Thread]:
    """Borrow in a thread of its own and hold the connection until the event is set."""
    got: list[Any] = []
    release = threading.Event()

    def hold() -> None:
        conn = pool.getconn()
        got.append(conn)
        release.wait(10)
        pool.putconn(conn)

    thread = threading.Thread(target=hold)
    thread.start()
    wait_for(lambda: got, what="the holder's borrow")
    return got, release, thread


# -- 1. interrupted borrowers --------------------------------------------------


def test_a_borrower_interrupted_while_queued_gives_up_its_place(make_pool: MakePool) -> None:
    pool = make_pool(0, 1, timeout=1.5)
    got, release, holder = hold_in_thread(pool)
    with pytest.raises(Interrupted), alarm_after(0.2):
        pool.getconn()  # queued behind the holder
    release.set()
    holder.join()
    # Before: the returned connection was handed to the interrupted waiter,
    # and this borrow timed out.
    conn = borrow_at_once(pool)
    assert conn is got[0]
    pool.putconn(conn)
    pool.check_invariants(quiescent=True)


@pytest.mark.usefixtures("interruptible_queries")
def test_a_borrower_interrupted_during_the_health_check_frees_its_slot(
    make_proxied_pool: MakePool, proxy: TcpProxy
) -> None:
    pool = make_proxied_pool(0, 1, timeout=1.0, check_after=0)
    pool.putconn(pool.getconn())
    proxy.stall()  # the check's SELECT 1 hangs: the signal comes during it
    with pytest.raises(Interrupted), alarm_after(0.2):
        pool.getconn()
    proxy.resume()
    # Before: the connection stayed "in use" with no borrower, forever.
    conn = borrow_at_once(pool)
    pool.putconn(conn)
    pool.check_invariants(quiescent=True)


@pytest.mark.usefixtures("interruptible_queries")
def test_a_return_interrupted_during_the_reset_frees_its_slot(
    make_proxied_pool: MakePool, proxy: TcpProxy
) -> None:
    pool = make_proxied_pool(0, 1, timeout=1.0)
    conn = pool.getconn()
    with conn.cursor() as cur:
        cur.execute("SET work_mem = '8MB'")  # dirty: the return sends DISCARD ALL
    proxy.stall()
    with pytest.raises(Interrupted), alarm_after(0.2):
        pool.putconn(conn)
    proxy.resume()
    assert conn.closed  # its session is unknown: closed, not kept
    # Before: the slot stayed with the interrupted return for good.
    fresh = borrow_at_once(pool)
    with fresh.cursor() as cur:
        cur.execute("SHOW work_mem")
        assert cur.fetchone()[0] != "8MB"
    pool.putconn(fresh)
    pool.check_invariants(quiescent=True)


def test_a_borrower_interrupted_while_connecting_frees_its_slot(make_pool: MakePool) -> None:
    pool = make_pool(0, 1, timeout=2, configure=lambda conn: time.sleep(0.5))
    with pytest.raises(Interrupted), alarm_after(0.1):
        pool.getconn()
    pool._configure = None
    conn = pool.getconn()
    pool.putconn(conn)
    pool.check_invariants(quiescent=True)


# -- 2. a replaced notices or notifies list ---------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_replaced_notices_deque_neither_breaks_close_nor_leaks_the_slot() -> None:
    connections["deque"] = make_wrapper("deque", OPTIONS={"maxconn": 2, "timeout": 2})
    wrapper = connections["deque"]
    try:
        for _ in range(5):  # more requests than maxconn
            wrapper.ensure_connection()
            wrapper.connection.notices = deque(maxlen=10)
            wrapper.connection.notifies = deque()
            with wrapper.cursor() as cur:
                cur.execute("SELECT 1")
            wrapper.close()  # before: TypeError out of close(), and the slot leaked
        wrapper.ensure_connection()
        assert isinstance(wrapper.connection.notices, list)  # the next borrower's is fresh
        wrapper.close()
    finally:
        wrapper.close()
        del connections["deque"]
        from django_pgpool import registry

        registry.close_pools(alias="deque")


# -- 4. a borrow always ends by its timeout ----------------------------------------


def test_a_borrow_gives_up_at_its_timeout_when_every_new_connection_dies(
    make_pool: MakePool,
) -> None:
    # The server ends every session idle for 1 ms: each new connection is
    # dead by the time the borrow looks at it.
    pool = make_pool(
        0,
        1,
        timeout=1.0,
        check_after=0,
        options="-c idle_session_timeout=1",
        configure=lambda conn: time.sleep(0.02),
    )
    outcome: list[BaseException | Any] = []

    def borrow() -> None:
        try:
            outcome.append(pool.getconn())
        except BaseException as exc:
            outcome.append(exc)

    borrower = threading.Thread(target=borrow)
    started = time.monotonic()
    borrower.start()
    borrower.join(4.0)
    elapsed = time.monotonic() - started
    opened = pool.get_stats()["connections_num"]
    if borrower.is_alive():
        pool.closeall()  # before: it looped until the pool was closed
        borrower.join(5)
    assert outcome and isinstance(outcome[0], PoolTimeout), (
        f"no timeout after {elapsed:.1f} s and {opened} connections"
    )
    assert elapsed < 2.0
    # Backoff between new connections: a handful, not hundreds a second.
    assert opened <= 8, opened
    pool.check_invariants(quiescent=True)


# -- 6. a stale return ---------------------------------------------------------------


def test_a_stale_double_return_is_an_error_and_touches_the_new_loan(make_pool: MakePool) -> None:
    pool = make_pool(0, 2)
    conn = pool.getconn()
    pid = backend_pid(conn)
    pool.putconn(conn)
    got, release, holder = hold_in_thread(pool)
    assert got[0] is conn  # lent again, to the holder
    with conn.cursor() as cur:
        cur.execute("SET application_name = 'the holder'")
    with pytest.raises(psycopg2.pool.PoolError, match="lent to someone else"):
        pool.putconn(conn)  # the main thread's loan ended long ago
    # The holder's loan is untouched: not reset, not lent to anyone else.
    with conn.cursor() as cur:
        cur.execute("SHOW application_name")
        assert cur.fetchone()[0] == "the holder"
    other = pool.getconn()
    assert other is not conn and backend_pid(other) != pid
    pool.putconn(other)
    release.set()
    holder.join()
    pool.check_invariants(quiescent=True)


def test_a_return_from_another_thread_with_the_loan_number_is_accepted(
    make_pool: MakePool,
) -> None:
    pool = make_pool(0, 1)
    conn = pool.getconn()
    loan = conn.loan
    returned: list[BaseException | None] = []

    def give_back() -> None:
        try:
            pool.putconn(conn, loan=loan)
            returned.append(None)
        except BaseException as exc:
            returned.append(exc)

    thread = threading.Thread(target=give_back)
    thread.start()
    thread.join()
    assert returned == [None]
    assert pool.getconn() is conn
    pool.putconn(conn)


# -- 7. the deadline cut-off never cuts a connection that was lent -------------------


def test_a_connection_cut_off_after_its_check_succeeded_is_never_lent(
    make_proxied_pool: MakePool, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = make_proxied_pool(0, 1, timeout=0.5, check_after=0)
    pool.putconn(pool.getconn())
    borrowed = threading.Event()
    # Maintenance runs late (a fault that can't be timed for real): the link
    # comes back and the borrow finishes before the socket is shut down.
    name = "_shut_down" if hasattr(pool_module, "_shut_down") else "_cut_off"
    real_cut = getattr(pool_module, name)

    def late_cut(target: Any) -> None:
        proxy.resume()
        borrowed.wait(2.0)
        real_cut(target)

    monkeypatch.setattr(pool_module, name, late_cut)
    proxy.stall()  # the check hangs past its deadline
    # With the fix the borrow sees the cut and, the check having used up its
    # time, times out (every run seen); without it the borrow returned the
    # cut connection and its next query failed ("server closed the
    # connection unexpectedly", checked on 2026-12-05 by ignoring the cut).
    try:
        conn = pool.getconn()
    except PoolTimeout:
        conn = None
        stats = pool.get_stats()
        assert stats["pool_in_use"] == 0, "a connection was lent and lost"
    finally:
        borrowed.set()
    if conn is not None:
        time.sleep(0.2)  # let the late cut happen
        with conn.cursor() as cur:  # before: "server closed the connection unexpectedly"
            cur.execute("SELECT 1")
        pool.putconn(conn)
    wait_for(lambda: not pool._deadlines, what="the round trip's deadline gone")


# -- 8. a refill thread that can't start ------------------------------------------------


def test_a_refill_thread_that_cannot_start_frees_its_slots(
    make_pool: MakePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name == "django_pgpool-refill":
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    pool = make_pool(2, 2, timeout=1.0)
    pool.maintain()  # a round that wants to refill to minconn
    monkeypatch.setattr(threading.Thread, "start", real_start)
    # Before: the two reserved slots were never freed, and this timed out.
    conn = borrow_at_once(pool)
    pool.putconn(conn)
    # And refilling resumes after its backoff.
    wait_for(lambda: pool.get_stats()["pool_size"] == 2, timeout=8, what="refilled to minconn")


# -- 11. pop_stats() ------------------------------------------------------------------


def test_pop_stats_clears_the_wait_histogram_with_the_counters(make_pool: MakePool) -> None:
    pool = make_pool(0, 1, timeout=0.1)
    conn = pool.getconn()
    with pytest.raises(PoolTimeout):
        pool.getconn()  # queued, counted in the histogram
    assert sum(pool.activity()["wait_buckets"]) == 1
    pool.pop_stats()
    assert pool.activity()["requests_queued"] == 0
    assert sum(pool.activity()["wait_buckets"]) == 0  # before: 1, with no request behind it
    pool.putconn(conn)


# -- 12. API edges ----------------------------------------------------------------------


def test_returning_a_connection_that_is_not_pooled_raises_pool_error(
    make_pool: MakePool, admin: Any
) -> None:
    pool = make_pool(0, 1)
    with pytest.raises(psycopg2.pool.PoolError, match="not a connection of this pool"):
        pool.putconn(admin)  # before: AttributeError
    with pytest.raises(psycopg2.pool.PoolError):
        pool.putconn(object())  # type: ignore[arg-type]


@pytest.mark.django_db
def test_the_wrappers_cached_plan_shows_no_password() -> None:
    wrapper = connections["default"]
    password = wrapper.settings_dict["PASSWORD"]
    assert password
    wrapper.ensure_connection()
    plan = wrapper._pgpool_plan
    assert plan is not None
    assert password not in repr(plan)
    assert password not in repr(vars(wrapper).get("_pgpool_plan"))
