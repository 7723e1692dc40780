"""pause() and resume(): PgBouncer's PAUSE and RESUME, for a planned switchover."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from django_pgpool import registry
from django_pgpool.errors import PoolTimeout
from django_pgpool.options import PoolOptions
from tests.conftest import MakePool, backend_pid
from tests.helpers import PoolLoad, server_connections, wait_for
from tests.pgserver import ServerInfo, ThrowawayServer


def test_pausing_closes_the_idle_connections_at_once(make_pool: MakePool, admin: Any) -> None:
    app = "pgpool-pause-idle"
    pool = make_pool(2, 2, application_name=app)
    pool.putconn(pool.getconn())
    wait_for(lambda: server_connections(admin, app) == 2, what="minconn refill")
    pool.pause()
    assert pool.paused_since is not None
    assert pool.get_stats()["pool_size"] == 0
    wait_for(lambda: server_connections(admin, app) == 0, what="the idle sessions closed")
    time.sleep(1.5)  # a maintenance round or two: no refill while paused
    assert server_connections(admin, app) == 0
    pool.resume()
    wait_for(lambda: server_connections(admin, app) == 2, what="refilled after resume")


def test_a_paused_pool_lends_nothing_closes_what_comes_back_and_resumes_in_order(
    make_pool: MakePool, admin: Any
) -> None:
    app = "pgpool-pause"
    pool = make_pool(0, 1, timeout=10, application_name=app)
    held = pool.getconn()
    old_pid = backend_pid(held)
    pool.pause()
    served: list[int] = []

    def borrower(number: int) -> None:
        conn = pool.getconn()
        served.append(number)
        pool.putconn(conn)

    waiters = []
    for number in range(3):
        waiter = threading.Thread(target=borrower, args=(number,))
        waiter.start()
        wait_for(lambda n=number: pool.get_stats()["requests_waiting"] == n + 1)  # type: ignore[misc]
        waiters.append(waiter)
    pool.putconn(held)  # closed, not lent: the pool is paused
    wait_for(lambda: server_connections(admin, app) == 0, what="every session closed")
    assert pool.get_stats()["pool_size"] == 0
    time.sleep(0.3)
    assert served == []
    pool.resume()
    for waiter in waiters:
        waiter.join(10)
    assert served == [0, 1, 2]  # in the order they came
    conn = pool.getconn()
    assert backend_pid(conn) != old_pid  # a new connection after the resume
    pool.putconn(conn)
    pool.check_invariants(quiescent=True)


def test_a_borrow_that_times_out_while_paused_says_so(make_pool: MakePool) -> None:
    pool = make_pool(0, 2, timeout=0.3)
    pool.pause()
    with pytest.raises(PoolTimeout, match=r"paused .*poolresume"):
        pool.getconn()
    pool.resume()
    pool.putconn(pool.getconn())


def test_pause_restart_resume_under_load_fails_no_request(
    make_pool: MakePool, pg: ThrowawayServer
) -> None:
    pool = make_pool(2, 4, timeout=15, failover_timeout=0)
    with PoolLoad(pool, threads=8) as load:
        time.sleep(0.3)
        started = time.monotonic()
        pool.pause()
        wait_for(lambda: pool.get_stats()["pool_size"] == 0, what="drained")
        drained = time.monotonic() - started
        pg.restart()  # the switchover: nothing of the pool's is connected meanwhile
        pool.resume()
        paused_for = time.monotonic() - started
        before = load.done
        wait_for(lambda: load.done > before + 100, what="serving again")
    assert not load.errors, load.errors[:3]
    print(
        f"\npause, restart, resume under 8 threads: drained in {drained:.2f} s, paused for "
        f"{paused_for:.2f} s, {load.done} requests, none failed"
    )


def test_a_pool_is_not_lent_from_before_the_listeners_of_its_creation_ran(
    server: ServerInfo,
) -> None:
    # What the status listener does for a process started while its alias is
    # paused: pause the new pool. Another thread that finds the pool meanwhile
    # must not borrow before that.
    listening = threading.Event()

    def pause_new_pools() -> None:
        listening.set()
        time.sleep(0.3)
        for entry in registry.entries("paused_at_birth"):
            entry.pool.pause()

    params = {**server.connect_kwargs(), "application_name": "pgpool-paused-at-birth"}
    options = PoolOptions(minconn=0, maxconn=1, timeout=0.5)
    registry._listeners.append(pause_new_pools)
    outcome: list[BaseException | None] = []

    def second_borrower() -> None:
        listening.wait(5)
        pool = registry.get_pool("paused_at_birth", params, options)
        try:
            pool.putconn(pool.getconn())
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    other = threading.Thread(target=second_borrower)
    other.start()
    try:
        registry.get_pool("paused_at_birth", params, options)
        other.join(10)
    finally:
        registry._listeners.remove(pause_new_pools)
        registry.close_pools(alias="paused_at_birth")
    assert len(outcome) == 1 and isinstance(outcome[0], PoolTimeout), outcome
