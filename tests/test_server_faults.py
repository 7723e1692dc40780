"""The pool under server faults: killed backends, a restart, a stopped server, a stalled network.

Everything runs against the real server of the test run. The tests that stop
or restart it need a cluster this run owns (tests/pgserver.py; ``./dev test``
exports PGPOOL_TEST_DATADIR for the one it starts): on an external server
they are skipped. The ``pg`` fixture leaves the server running after each
test, whatever happened.

``pytest -s`` shows the measured figures: how many requests failed, for how
long, and how long recovery took.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import psycopg2
import pytest
from django.db import OperationalError as DjangoOperationalError
from django.db import connection, connections

from django_pgpool import base, maintenance, registry
from django_pgpool.errors import PoolTimeout
from django_pgpool.pool import REFILL_BACKOFF, ConnectionPool
from tests.conftest import CONNECT_TIMEOUT, backend_pid
from tests.helpers import make_wrapper, scalar, terminate, wait_for
from tests.pgserver import ServerInfo, ThrowawayServer
from tests.tcpproxy import TcpProxy
from tests.testapp.models import Item

pytestmark = pytest.mark.slow  # they stop, restart and stall the server

MakePool = Callable[..., ConnectionPool]


# -- helpers -------------------------------------------------------------------


def connect_admin(server: ServerInfo) -> Any:
    kwargs: dict[str, Any] = server.connect_kwargs()
    conn = psycopg2.connect(**kwargs)
    conn.autocommit = True
    return conn


def backends(admin: Any, application_name: str) -> set[int]:
    """The pids of the server's backends opened with this application_name."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", [application_name]
        )
        return {row[0] for row in cur.fetchall()}


def select_one(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)


def request(pool: ConnectionPool) -> int:
    """One request: borrow, query, return. Return the backend's pid."""
    conn = pool.getconn()
    try:
        return backend_pid(conn)
    finally:
        pool.putconn(conn)


def run_requests(
    target: Callable[[], int], threads: int, each: int
) -> tuple[list[BaseException], set[int]]:
    """Run ``target`` ``each`` times in each of ``threads`` threads at once.

    Return the exceptions raised and the backend pids seen.
    """
    errors: list[BaseException] = []
    pids: set[int] = set()
    lock = threading.Lock()

    def loop() -> None:
        for _ in range(each):
            try:
                pid = target()
            except BaseException as exc:
                with lock:
                    errors.append(exc)
            else:
                with lock:
                    pids.add(pid)

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert not any(w.is_alive() for w in workers), "a request thread is stuck"
    return errors, pids


@dataclass
class Outcome:
    """What happened to one call, timed."""

    elapsed: float
    error: BaseException | None = None


def timed(call: Callable[[], object]) -> Outcome:
    started = time.monotonic()
    try:
        call()
    except Exception as exc:
        return Outcome(time.monotonic() - started, exc)
    return Outcome(time.monotonic() - started)


def in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[Outcome]]:
    """Start ``timed(call)`` in a thread; the list gets its outcome."""
    outcome: list[Outcome] = []
    thread = threading.Thread(target=lambda: outcome.append(timed(call)), daemon=True)
    thread.start()
    return thread, outcome


def borrow_and_return(pool: ConnectionPool) -> Callable[[], None]:
    def call() -> None:
        conn = pool.getconn()
        try:
            select_one(conn)
        finally:
            pool.putconn(conn)

    return call


# -- fixtures ------------------------------------------------------------------


def django_request(using: str = "default") -> int:
    """A request as Django serves it with CONN_MAX_AGE=0: queries, then close (= return)."""
    try:
        Item.objects.using(using).count()
        pid: int = scalar("SELECT pg_backend_pid()", using)
        return pid
    finally:
        connections[using].close()


# -- 1. idle backends killed by the server -------------------------------------


def test_idle_backends_killed_by_the_server_are_replaced_without_an_error(
    make_pool: MakePool, admin: Any
) -> None:
    pool = make_pool(0, 4, application_name="pgpool-faults-kill")
    held = [pool.getconn() for _ in range(4)]
    killed = {backend_pid(conn) for conn in held}
    for conn in held:
        pool.putconn(conn)
    terminate(admin, killed)

    errors, pids = run_requests(lambda: request(pool), threads=4, each=25)

    assert errors == []
    assert pids and not pids & killed
    stats = pool.get_stats()
    assert stats["connections_lost"] == 4  # each noticed once, at a borrow or in maintenance
    assert stats["requests_errors"] == 0


@pytest.mark.django_db(transaction=True)
def test_idle_backends_killed_under_django_are_replaced_without_an_error(admin: Any) -> None:
    # Borrow every connection of the pool at once (maxconn is 4), then return them.
    connection.close()
    others = [make_wrapper("default") for _ in range(3)]
    killed = set()
    for wrapper in [connection, *others]:
        wrapper.ensure_connection()
        killed.add(backend_pid(wrapper.connection))
    pool = cast(base.DatabaseWrapper, connection)._pgpool
    assert pool is not None
    assert pool.get_stats()["pool_size"] == 4
    for wrapper in [connection, *others]:
        wrapper.close()
    lost_before = pool.get_stats()["connections_lost"]
    terminate(admin, killed)

    pids = {django_request() for _ in range(10)}
    # And from four threads at once, each with its own django.db.connection.
    errors, more_pids = run_requests(django_request, threads=4, each=10)

    assert errors == []
    assert not (pids | more_pids) & killed
    # Each dead one is noticed at its next borrow or, if no borrow reached it
    # (the threads need not overlap four ways), by the next maintenance round.
    wait_for(lambda: pool.get_stats()["connections_lost"] - lost_before == 4, timeout=5)


# -- 2. a restart under load ---------------------------------------------------


@dataclass
class Request:
    started: float
    ended: float
    error: BaseException | None
    stage: str  # where it failed: "borrow" or "query"


def test_a_restart_under_load_fails_only_requests_in_flight_and_recovery_is_immediate(
    pg: ThrowawayServer, make_pool: MakePool, server: ServerInfo
) -> None:
    pool = make_pool(2, 4, timeout=10, application_name="pgpool-faults-restart")
    wait_for(lambda: pool.get_stats()["pool_available"] == 2, what="minconn refill")
    requests: list[Request] = []
    # Connections whose request raised, kept alive so that their id() is not
    # reused: getconn() must never hand one of them out again.
    raised: dict[int, Any] = {}
    handed_out_again: list[Any] = []
    crashes: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker() -> None:
        try:
            while not stop.is_set():
                started = time.monotonic()
                conn = None
                stage = "borrow"
                error: BaseException | None = None
                try:
                    conn = pool.getconn()
                    with lock:
                        if raised.get(id(conn)) is conn or conn.closed:
                            handed_out_again.append(conn)
                    stage = "query"
                    select_one(conn)
                except psycopg2.Error as exc:
                    error = exc
                ended = time.monotonic()
                if conn is not None:
                    if error is not None:
                        with lock:
                            raised[id(conn)] = conn
                    pool.putconn(conn)  # never raises for a broken connection
                with lock:
                    requests.append(Request(started, ended, error, stage))
                if error is not None:
                    time.sleep(0.01)  # a client would back off a little
        except BaseException as exc:
            crashes.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        restart_began = time.monotonic()
        pg.restart()  # pg_ctl restart -m fast -w: accepting connections when it returns
        server_back = time.monotonic()
        time.sleep(2.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
    assert not any(t.is_alive() for t in threads), "a worker is stuck"

    assert crashes == []
    assert handed_out_again == []
    failures = [r for r in requests if r.error is not None]
    assert [r.error for r in failures if not isinstance(r.error, psycopg2.OperationalError)] == []
    assert [r.error for r in failures if isinstance(r.error, PoolTimeout)] == []
    # Once the server is back, no request fails.
    assert [r.error for r in failures if r.started >= server_back] == []
    after = [r for r in requests if r.started >= server_back]
    assert len(after) > 100
    stats = pool.get_stats()
    # The restart was seen: connections found dead, failed at return, or
    # retired with all the older ones after an error that said so (class 08).
    seen = stats["connections_lost"] + stats["returns_bad"] + stats["connections_expired"]
    assert seen >= 1
    assert (stats["pool_in_use"], stats["requests_waiting"]) == (0, 0)
    assert stats["pool_size"] <= 4
    admin = connect_admin(server)
    try:
        assert len(backends(admin, "pgpool-faults-restart")) <= 4
    finally:
        admin.close()

    last_failure = max((r.ended for r in failures), default=restart_began)
    assert last_failure - server_back < 2.0
    recovered = min(r.ended for r in requests if r.error is None and r.started >= last_failure)
    first_failure = min((r.ended for r in failures), default=restart_began)
    print(
        f"\nrestart under load (8 threads, maxconn 4): pg_ctl restart took "
        f"{server_back - restart_began:.2f} s; {len(failures)} of {len(requests)} requests "
        f"failed ({sum(r.stage == 'borrow' for r in failures)} at borrow, "
        f"{sum(r.stage == 'query' for r in failures)} in flight), from "
        f"{first_failure - restart_began:+.2f} s to {last_failure - restart_began:+.2f} s "
        f"after the restart began ({last_failure - first_failure:.2f} s); first success "
        f"after the last failure at {recovered - restart_began:+.2f} s; "
        f"{len(after)} requests after the server was back, none failed"
    )


# -- 3. the server is down ------------------------------------------------------


def test_while_the_server_is_down_callers_fail_fast_and_the_pool_refills_itself_after(
    pg: ThrowawayServer, make_pool: MakePool, server: ServerInfo
) -> None:
    app = "pgpool-faults-down"
    pool = make_pool(
        2,
        4,
        timeout=2,
        failover_timeout=0,  # no riding through: see the next test
        connect_timeout=CONNECT_TIMEOUT,
        application_name=app,
    )
    wait_for(lambda: pool.get_stats()["pool_available"] == 2, what="minconn refill")
    pg.stop()

    # Eight callers at once (maxconn 4: half of them wait for a slot first).
    started = time.monotonic()
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def caller() -> None:
        for _ in range(3):
            outcome = timed(borrow_and_return(pool))
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    wall = time.monotonic() - started

    assert len(outcomes) == 24
    assert all(isinstance(o.error, psycopg2.OperationalError) for o in outcomes), outcomes
    slowest = max(o.elapsed for o in outcomes)
    assert slowest < 5.0
    assert wall < 5.0  # nobody waited behind somebody else's failing connect
    assert pool.get_stats()["connections_errors"] >= 24

    pg.start()
    admin = connect_admin(server)
    try:
        refilled = wait_for(
            lambda: pool.get_stats()["pool_available"] == 2 and len(backends(admin, app)) == 2,
            what="background refill to minconn after the server came back",
        )
    finally:
        admin.close()
    # At worst: a refill failed just before the start, then the backoff and a round.
    assert refilled < REFILL_BACKOFF + 2 * maintenance.INTERVAL + 1.0
    errors, _ = run_requests(lambda: request(pool), threads=4, each=10)
    assert errors == []
    print(
        f"\nserver down (connect_timeout={CONNECT_TIMEOUT}, timeout=2): 24 of 24 requests "
        f"failed, the slowest in {slowest:.3f} s, all 8 callers done in {wall:.3f} s; "
        f"after the start, back to minconn=2 by itself in {refilled:.2f} s"
    )


def test_a_borrow_rides_through_a_short_outage_within_failover_timeout(
    pg: ThrowawayServer, make_pool: MakePool
) -> None:
    pool = make_pool(0, 2, timeout=10, failover_timeout=5, connect_timeout=CONNECT_TIMEOUT)
    pg.stop()
    outcome: list[Outcome] = []
    borrower = threading.Thread(target=lambda: outcome.append(timed(borrow_and_return(pool))))
    borrower.start()
    time.sleep(1.0)  # refused all along
    pg.start()
    borrower.join(10)
    assert outcome and outcome[0].error is None, outcome
    assert 1.0 < outcome[0].elapsed < 5.0
    assert pool.get_stats()["requests_errors"] == 0
    print(f"\nserver down for ~1 s: the borrow waited {outcome[0].elapsed:.2f} s and succeeded")


def test_a_server_that_stays_down_fails_the_borrow_after_failover_timeout(
    pg: ThrowawayServer, make_pool: MakePool
) -> None:
    pool = make_pool(0, 2, timeout=10, failover_timeout=1.5, connect_timeout=CONNECT_TIMEOUT)
    pg.stop()
    try:
        outcome = timed(borrow_and_return(pool))
    finally:
        pg.start()
    assert isinstance(outcome.error, psycopg2.OperationalError), outcome
    assert 1.0 < outcome.elapsed < 2.5, outcome
    assert pool.get_stats()["requests_errors"] == 1
    assert pool.get_stats()["connections_errors"] >= 4  # tried again, with backoff


def test_a_wrong_password_is_not_tried_again(password_server: ServerInfo) -> None:
    kwargs = {**password_server.connect_kwargs(), "password": "wrong-" + "x" * 8}
    pool = ConnectionPool(0, 1, timeout=10, failover_timeout=5, **kwargs)
    try:
        outcome = timed(borrow_and_return(pool))
    finally:
        pool.closeall()
    assert isinstance(outcome.error, psycopg2.OperationalError)
    assert "password authentication failed" in str(outcome.error)
    assert outcome.elapsed < 1.0
    assert pool.get_stats()["connections_errors"] == 1


@pytest.mark.django_db(transaction=True)
def test_django_raises_operational_error_at_once_while_the_server_is_down_and_then_recovers(
    pg: ThrowawayServer, add_alias: Callable[..., str]
) -> None:
    options = {
        **connections["default"].settings_dict["OPTIONS"],
        "minconn": 0,
        "maxconn": 2,
        "timeout": 2,
        "failover_timeout": 0,
        "connect_timeout": CONNECT_TIMEOUT,
    }
    alias = add_alias("faults_down", OPTIONS=options)
    django_request(alias)  # one idle connection in the pool, about to die
    connection.close()
    pg.stop()

    outcomes = [timed(lambda: django_request(alias)) for _ in range(3)]

    assert all(isinstance(o.error, DjangoOperationalError) for o in outcomes), outcomes
    slowest = max(o.elapsed for o in outcomes)
    assert slowest < 5.0
    pg.start()
    back = time.monotonic()
    django_request(alias)
    django_request()
    first_success = time.monotonic() - back
    print(
        f"\nserver down under Django: django.db.OperationalError in at most {slowest:.3f} s; "
        f"first request after the start succeeded in {first_success:.3f} s"
    )


# -- 4. a stalled network path -------------------------------------------------
#
# A query already in flight on a stalled link (the server unreachable, the
# socket still open) waits for the link: psycopg2 blocks in the socket read
# and neither the pool's timeout nor connect_timeout applies to it. Only
# TCP-level settings can bound that (libpq's tcp_user_timeout and keepalives_*
# connect parameters, for a real network where unacknowledged data piles up;
# statement_timeout is enforced by the server, which the query never reaches).
# Through this proxy even they would not fire: it acknowledges every byte.


def test_on_a_stalled_link_a_new_connection_fails_after_connect_timeout_and_waiters_time_out(
    proxy: TcpProxy, make_proxied_pool: MakePool, make_pool: MakePool
) -> None:
    pool = make_proxied_pool(0, 1, timeout=1)
    pool.putconn(pool.getconn(), close=True)  # the link works; nothing stays idle
    direct = make_pool(0, 1)  # another pool, straight to the server
    proxy.stall()

    opener, opened = in_thread(borrow_and_return(pool))
    wait_for(lambda: pool.get_stats()["pool_size"] == 1, what="the opener reserved the slot")
    waiters = [in_thread(borrow_and_return(pool)) for _ in range(3)]
    # Meanwhile nothing else is held up: the pool's lock is free, other pools serve.
    assert timed(pool.get_stats).elapsed < 0.1
    other = timed(borrow_and_return(direct))
    assert other.error is None
    assert other.elapsed < 0.5
    for thread, _ in [(opener, opened), *waiters]:
        thread.join(10)
        assert not thread.is_alive()

    (connect,) = opened
    assert isinstance(connect.error, psycopg2.OperationalError)
    assert not isinstance(connect.error, PoolTimeout)
    assert "timeout expired" in str(connect.error)
    assert CONNECT_TIMEOUT - 0.5 < connect.elapsed < CONNECT_TIMEOUT + 2.0
    waited = [outcome for _, (outcome,) in waiters]
    assert all(isinstance(o.error, PoolTimeout) for o in waited), waited
    assert all(0.9 < o.elapsed < 2.5 for o in waited), waited
    assert pool.get_stats()["pool_size"] == 0  # the failed connect freed its slot

    proxy.resume()
    errors, _ = run_requests(lambda: request(pool), threads=2, each=5)
    assert errors == []
    print(
        f"\nstalled link (connect_timeout={CONNECT_TIMEOUT}, timeout=1): the new connection "
        f"failed after {connect.elapsed:.2f} s, 3 waiters got PoolTimeout after "
        f"{min(o.elapsed for o in waited):.2f}-{max(o.elapsed for o in waited):.2f} s; "
        f"another pool served in {other.elapsed * 1000:.1f} ms meanwhile; "
        "requests succeed once the link resumes"
    )


def test_a_query_in_flight_on_a_stalled_link_waits_until_the_link_drops_then_the_pool_recovers(
    proxy: TcpProxy, make_proxied_pool: MakePool
) -> None:
    pool = make_proxied_pool(0, 2, timeout=2)
    busy, idle = pool.getconn(), pool.getconn()
    pool.putconn(idle)
    proxy.stall()

    query, outcome = in_thread(lambda: select_one(busy))
    query.join(1.0)
    assert query.is_alive()  # it waits for the link (see the comment above)
    dropped = time.monotonic()
    proxy.drop_all()
    query.join(5)
    assert not query.is_alive()
    errored_after = time.monotonic() - dropped
    (result,) = outcome
    assert isinstance(result.error, psycopg2.OperationalError)
    assert errored_after < 1.0
    pool.putconn(busy)  # broken: discarded, its slot freed, nothing raised
    proxy.resume()

    errors, _ = run_requests(lambda: request(pool), threads=2, each=5)

    assert errors == []
    stats = pool.get_stats()
    # A connection exception (the link dropped) retires every connection opened
    # before it: the busy one at its return, the idle one before its next borrow.
    assert stats["connections_expired"] + stats["connections_lost"] == 2
    assert stats["returns_bad"] == 0
    assert stats["requests_errors"] == 0
    print(
        f"\nin-flight query on a stalled link: still waiting after 1 s; OperationalError "
        f"{errored_after * 1000:.0f} ms after the link dropped; the dropped idle connection "
        "was replaced without an error"
    )


def test_idle_connections_cut_by_a_network_drop_are_replaced_without_an_error(
    proxy: TcpProxy, make_proxied_pool: MakePool
) -> None:
    pool = make_proxied_pool(0, 3)
    held = [pool.getconn() for _ in range(3)]
    for conn in held:
        pool.putconn(conn)
    proxy.drop_all()

    errors, _ = run_requests(lambda: request(pool), threads=3, each=5)

    assert errors == []
    assert pool.get_stats()["connections_lost"] == 3


def test_a_borrower_is_not_held_beyond_its_timeout_by_the_health_check_on_a_stalled_link(
    proxy: TcpProxy, make_proxied_pool: MakePool
) -> None:
    timeout = 1.0
    pool = make_proxied_pool(0, 1, timeout=timeout, check_after=0)  # check at every borrow
    pool.putconn(pool.getconn())  # one idle connection, checked at the next borrow
    proxy.stall()

    borrower, outcome = in_thread(borrow_and_return(pool))
    borrower.join(timeout + CONNECT_TIMEOUT + 1.0)
    bounded = not borrower.is_alive()
    # Free it whatever happened: cut the link (the check fails), let new connections in.
    proxy.drop_all()
    proxy.resume()
    borrower.join(10)
    assert not borrower.is_alive()

    assert bounded, f"getconn() still blocked after {timeout + CONNECT_TIMEOUT + 1.0} s"
    assert outcome


def test_a_stalled_database_does_not_hold_up_the_refill_of_another_pool(
    proxy: TcpProxy, make_proxied_pool: MakePool, make_pool: MakePool, admin: Any
) -> None:
    app = "pgpool-faults-neighbour"
    healthy = make_pool(2, 4, application_name=app)
    wait_for(lambda: len(backends(admin, app)) == 2, what="the healthy pool's refill")
    proxy.stall()
    make_proxied_pool(3, 4)  # its refill: 3 connects of connect_timeout each
    wait_for(lambda: proxy.connections == 1, what="the stalled pool's first connect")
    killed = backends(admin, app)
    terminate(admin, killed)
    try:
        started = time.monotonic()
        wait_for(
            lambda: len(backends(admin, app) - killed) == 2,
            timeout=CONNECT_TIMEOUT,
            what="the healthy pool refilled while the other one is stalled",
        )
    finally:
        proxy.resume()  # the stalled refill completes, maintenance moves on
    print(f"\nneighbour refilled in {time.monotonic() - started:.2f} s")
    assert healthy.get_stats()["connections_lost"] == 2


# -- 5. Django: pool timeouts and connect failures are django.db.OperationalError


@pytest.mark.django_db(transaction=True)
def test_django_raises_operational_error_for_a_stalled_connect_and_for_a_pool_timeout(
    proxy: TcpProxy, add_alias: Callable[..., str]
) -> None:
    options = {
        **connections["default"].settings_dict["OPTIONS"],
        "minconn": 0,
        "maxconn": 1,
        "timeout": 1,
        "connect_timeout": CONNECT_TIMEOUT,
    }
    changes = {"HOST": "127.0.0.1", "PORT": proxy.port, "OPTIONS": options}
    alias = add_alias("faults_stalled", **changes)
    assert django_request(alias) > 0
    registry.close_pools(alias=alias)  # nothing idle: the next borrower must connect
    opener = make_wrapper(alias, **changes)  # another thread's connection, same pool
    opener.inc_thread_sharing()
    proxy.stall()

    thread, opened = in_thread(opener.ensure_connection)

    def slot_taken() -> bool:
        entries = registry.entries(alias)
        return bool(entries) and entries[0].pool.get_stats()["pool_size"] == 1

    wait_for(slot_taken, what="the opener reserved the only slot")
    waited = timed(lambda: django_request(alias))
    thread.join(10)
    assert not thread.is_alive()

    assert isinstance(waited.error, DjangoOperationalError)
    assert isinstance(waited.error.__cause__, PoolTimeout)
    assert "couldn't get a connection" in str(waited.error)
    assert 0.9 < waited.elapsed < 2.5
    (connect,) = opened
    assert isinstance(connect.error, DjangoOperationalError)
    assert "timeout expired" in str(connect.error)
    assert CONNECT_TIMEOUT - 0.5 < connect.elapsed < CONNECT_TIMEOUT + 2.0
    assert opener.connection is None

    proxy.resume()
    assert django_request(alias) > 0
    print(
        f"\nDjango on a stalled link: django.db.OperationalError (PoolTimeout) after "
        f"{waited.elapsed:.2f} s, (connect timeout) after {connect.elapsed:.2f} s; "
        "requests succeed once the link resumes"
    )
