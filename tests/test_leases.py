"""Leases: with CONN_MAX_AGE other than 0 a thread keeps its connection across requests.

The connection stays the pool's: between requests the pool may revoke it for
a borrower that would otherwise wait, and the former owner must never touch
it again. Requests are served as Django's handlers serve them: the
``request_started`` and ``request_finished`` signals around the work, on
the thread that does it (Django's own handler, ``close_old_connections``,
included).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from django.core import signals
from django.db import OperationalError, connections

from django_pgpool import base, registry
from django_pgpool.pool import ConnectionPool
from tests.helpers import fork_child, scratch_database, wait_for

T = TypeVar("T")


def serve(work: Callable[[], T]) -> T:
    """Run ``work`` as one request of this thread, with Django's request signals."""
    signals.request_started.send(sender=base.DatabaseWrapper, environ={})
    try:
        return work()
    finally:
        signals.request_finished.send(sender=base.DatabaseWrapper)


@dataclass
class LeasedAlias:
    """An alias on the test database, added to the configured ones for the test.

    Configured, not only set on ``connections`` in one thread: Django's request
    handlers act on the configured aliases only (``connections.all()``), and
    every thread gets its own wrapper of it.
    """

    name: str
    settings_dict: dict[str, Any]

    @property
    def wrapper(self) -> Any:
        return connections[self.name]

    @property
    def pool(self) -> ConnectionPool:
        (entry,) = registry.entries(self.name)
        return entry.pool

    def stats(self) -> dict[str, int]:
        return self.pool.get_stats()

    def one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        with self.wrapper.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()

    def backend_pid(self) -> int:
        pid: int = self.one("SELECT pg_backend_pid()")[0]
        return pid


@pytest.fixture(scope="module")
def lease_database() -> Iterator[str]:
    with scratch_database("pgpool_leases") as name:
        yield name


@pytest.fixture
def leased_alias(
    lease_database: str, django_db_blocker: Any
) -> Iterator[Callable[..., LeasedAlias]]:
    """Make leased aliases on a scratch database (the tests need no tables).

    Outside Django's test cases (no transaction around the test, and no
    patches refusing other aliases or threads): as a server's threads use it.
    """
    default = {**connections["default"].settings_dict, "NAME": lease_database}
    made: list[LeasedAlias] = []
    unblocked = django_db_blocker.unblock()
    unblocked.__enter__()

    def make(name: str, conn_max_age: float | None = None, **options: Any) -> LeasedAlias:
        settings_dict = {
            **default,
            "CONN_MAX_AGE": conn_max_age,
            "OPTIONS": {**default["OPTIONS"], "minconn": 0, "timeout": 3.0, **options},
        }
        alias = LeasedAlias(name, settings_dict)
        connections.settings[name] = settings_dict
        made.append(alias)
        return alias

    yield make
    try:
        for alias in made:
            connections[alias.name].close()
            del connections[alias.name]
            del connections.settings[alias.name]
            registry.close_pools(alias=alias.name)
    finally:
        unblocked.__exit__(None, None, None)


def in_thread(alias: LeasedAlias, work: Callable[[], T]) -> T:
    """Run ``work`` in a new thread that uses ``alias`` (and closes it at the end)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections[alias.name].close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    if errors:
        raise errors[0]
    return result[0]


# -- the promise: a revoked lease is never used by its former owner -------------------


@dataclass
class Served:
    thread: str
    backend: int
    began: float  # the server's clock_timestamp(), in epoch seconds
    ended: float
    seen_owner: str  # the session mark left by an earlier request ('' after a reset)


def test_a_revoked_lease_is_never_used_by_its_former_owner(
    leased_alias: Callable[..., LeasedAlias],
) -> None:
    """Two threads, maxconn 1, CONN_MAX_AGE 60, each making requests in turn with
    pauses between them: every request records its backend and the server's
    clock at its first and last query. No backend ever serves two threads'
    overlapping requests, and no request sees the other thread's session mark."""
    alias = leased_alias("leases_two_threads", conn_max_age=60, maxconn=1, timeout=10.0)
    served: list[Served] = []
    lock = threading.Lock()
    stop = time.monotonic() + 3.0

    def request(me: str) -> Served:
        pid, began, seen = alias.one(
            "SELECT pg_backend_pid(), extract(epoch FROM clock_timestamp())::float8,"
            " current_setting('pgpool_test.owner', true)"
        )
        alias.one("SELECT set_config('pgpool_test.owner', %s, false)", (me,))
        time.sleep(0.002)  # the request's own work: the other thread is queued meanwhile
        (ended,) = alias.one("SELECT extract(epoch FROM clock_timestamp())::float8")
        return Served(me, pid, began, ended, seen or "")

    def worker(index: int) -> None:
        rng = random.Random(index)
        me = threading.current_thread().name
        while time.monotonic() < stop:
            record = serve(lambda: request(me))
            with lock:
                served.append(record)
            time.sleep(rng.choice((0, 0.001, 0.003)))  # between requests: revocable

    threads = [threading.Thread(target=_closing(alias, worker), args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(t.is_alive() for t in threads)

    by_thread = {t.name: [s for s in served if s.thread == t.name] for t in threads}
    assert all(len(records) > 20 for records in by_thread.values()), {
        name: len(records) for name, records in by_thread.items()
    }
    overlaps = [
        (a, b)
        for a in served
        for b in served
        if a.thread < b.thread
        and a.backend == b.backend
        and a.began < b.ended
        and b.began < a.ended
    ]
    assert not overlaps, overlaps[:3]
    leaked = [s for s in served if s.seen_owner not in ("", s.thread)]
    assert not leaked, leaked[:3]
    stats = alias.stats()
    assert stats["leases_revoked"] > 10, stats
    # Some requests found their own session still there: the lease persisted.
    assert any(s.seen_owner == s.thread for s in served)
    alias.pool.check_invariants()


def _closing(alias: LeasedAlias, work: Callable[[int], None]) -> Callable[[int], None]:
    def run(index: int) -> None:
        try:
            work(index)
        finally:
            connections[alias.name].close()

    return run


# -- persistent-connection semantics -------------------------------------------------


def test_a_thread_keeps_its_connection_and_session_across_requests(
    leased_alias: Callable[..., LeasedAlias],
) -> None:
    alias = leased_alias("leases_keep", conn_max_age=None)

    def request() -> tuple[int, str]:
        pid = alias.backend_pid()
        seen = alias.one("SELECT current_setting('pgpool_test.mark', true)")[0] or ""
        alias.one("SELECT set_config('pgpool_test.mark', 'kept', false)")
        return pid, seen

    first = serve(request)
    assert alias.stats()["pool_leased"] == 1  # between requests
    second = serve(request)
    third = serve(request)
    assert first[0] == second[0] == third[0]
    assert (first[1], second[1], third[1]) == ("", "kept", "kept")
    stats = alias.stats()
    assert stats["requests_num"] == 1  # borrowed once
    assert stats["pool_in_use"] == 1 and stats["pool_leased"] == 1
    assert stats["leases_revoked"] == 0


def test_a_revoked_lease_is_reset_before_the_next_owner_gets_it(
    leased_alias: Callable[..., LeasedAlias],
) -> None:
    alias = leased_alias("leases_reset", conn_max_age=None, maxconn=1)

    def dirty() -> int:
        return alias.one("SELECT pg_backend_pid(), set_config('work_mem', '77MB', false)")[0]

    owner_pid = serve(dirty)

    def other() -> tuple[int, str]:
        return serve(lambda: (alias.backend_pid(), alias.one("SHOW work_mem")[0]))

    pid, work_mem = in_thread(alias, other)
    assert pid == owner_pid  # the same, revoked and handed over...
    assert work_mem != "77MB"  # ...after a reset
    assert alias.stats()["leases_revoked"] == 1
    # The former owner finds out at its next use, and borrows again.
    assert serve(alias.backend_pid) == owner_pid
    assert alias.stats()["requests_num"] == 3
    alias.pool.check_invariants(quiescent=False)


@pytest.mark.parametrize("hold", ["no request signals", "open transaction"])
def test_a_lease_in_use_is_never_revoked(
    leased_alias: Callable[..., LeasedAlias], hold: str
) -> None:
    """A Celery worker's or a command's thread (no request signals), or a request
    that ended inside a transaction, keeps its connection, as with Django's
    persistent connections: a borrower waits, up to its timeout."""
    alias = leased_alias("leases_in_use", conn_max_age=None, maxconn=1, timeout=0.5)
    if hold == "open transaction":
        owner_pid = serve(lambda: alias.one("BEGIN; SELECT pg_backend_pid()")[0])
    else:
        owner_pid = alias.backend_pid()
    with pytest.raises(OperationalError, match="couldn't get a connection"):
        in_thread(alias, lambda: serve(alias.backend_pid))
    assert alias.stats()["leases_revoked"] == 0
    assert alias.backend_pid() == owner_pid  # still this thread's, and usable


def test_conn_max_age_returns_the_connection_once_it_is_that_old(
    leased_alias: Callable[..., LeasedAlias],
) -> None:
    alias = leased_alias("leases_age", conn_max_age=0.3)
    serve(alias.backend_pid)
    serve(alias.backend_pid)
    assert alias.stats()["requests_num"] == 1
    time.sleep(0.4)
    serve(alias.backend_pid)  # Django closes it at request_started: given back, borrowed again
    stats = alias.stats()
    assert stats["requests_num"] == 2
    assert stats["pool_available"] + stats["pool_in_use"] == stats["pool_size"]


def test_a_lease_that_waits_for_nobody_is_given_back_when_someone_waits(
    leased_alias: Callable[..., LeasedAlias],
) -> None:
    """A borrower queued while the lease was in a request gets it at the request's end."""
    alias = leased_alias("leases_waiter", conn_max_age=None, maxconn=1, timeout=5.0)
    started = threading.Event()
    result: list[int] = []

    def waiting() -> None:
        try:
            started.set()
            result.append(serve(alias.backend_pid))
        finally:
            connections[alias.name].close()

    def request() -> int:
        pid = alias.backend_pid()
        waiter = threading.Thread(target=waiting)
        waiter.start()
        started.wait(5)
        wait_for(lambda: alias.stats()["requests_waiting"] == 1, what="the other borrower queued")
        request.waiter = waiter  # type: ignore[attr-defined]
        return pid

    pid = serve(request)
    request.waiter.join(10)  # type: ignore[attr-defined]
    assert result == [pid]
    assert alias.stats()["leases_revoked"] == 0  # given back at request_finished, not revoked


@pytest.mark.parametrize("action", ["reconnect", "pause", "max_lifetime"])
def test_leases_between_requests_are_closed_by_poolclose_poolpause_and_max_lifetime(
    leased_alias: Callable[..., LeasedAlias], action: str
) -> None:
    alias = leased_alias("leases_retired", conn_max_age=None, max_lifetime=0.2)
    old_pid = serve(alias.backend_pid)
    pool = alias.pool
    if action == "reconnect":
        pool.reconnect()
    elif action == "pause":
        pool.pause()
    else:
        time.sleep(0.3)
        pool.maintain()
    stats = pool.get_stats()
    assert stats["pool_size"] == 0 and stats["leases_revoked"] == 1
    if action == "pause":
        pool.resume()
    assert serve(alias.backend_pid) != old_pid


def test_a_lease_of_a_thread_that_exited_is_taken_back(
    leased_alias: Callable[..., LeasedAlias],
) -> None:
    alias = leased_alias("leases_exit", conn_max_age=None, maxconn=1, timeout=3.0)
    kept: list[Any] = []

    def leave_with_a_lease() -> None:
        serve(alias.backend_pid)
        kept.append(connections[alias.name])  # the wrapper outlives its thread

    thread = threading.Thread(target=leave_with_a_lease)
    thread.start()
    thread.join(10)
    started = time.monotonic()
    serve(alias.backend_pid)
    assert time.monotonic() - started < 2.0
    assert alias.stats()["connections_reclaimed"] + alias.stats()["leases_revoked"] >= 1


def test_a_lease_between_requests_is_no_leak_and_one_in_use_is(
    leased_alias: Callable[..., LeasedAlias], caplog: pytest.LogCaptureFixture
) -> None:
    alias = leased_alias("leases_leak", conn_max_age=None, leak_timeout=0.2)
    serve(alias.backend_pid)
    time.sleep(0.3)
    with caplog.at_level(logging.WARNING, logger="django_pgpool"):
        alias.pool.maintain()
        assert alias.stats()["connections_leaked"] == 0

        def long_request() -> None:
            alias.backend_pid()
            time.sleep(0.3)
            alias.pool.maintain()

        serve(long_request)
        assert alias.stats()["connections_leaked"] == 1
        # Counted under the pool's lock, logged after it is released: when the
        # background maintenance round found the leak first, its record may
        # come a moment after the count (seen in CI).
        wait_for(
            lambda: any("leak_timeout" in r.getMessage() for r in caplog.records),
            what="the leak's warning",
        )


# -- the pool's side, without Django ------------------------------------------------------


def test_the_pool_revokes_the_lease_idle_longest_for_a_borrower_that_would_wait(
    make_pool: Callable[..., ConnectionPool],
) -> None:
    pool = make_pool(0, 2, timeout=2.0)
    first, second = pool.getconn(), pool.getconn()
    first_loan, second_loan = first.loan, second.loan
    assert pool.lease_idle(second, second_loan)
    assert pool.lease_idle(first, first_loan)
    assert pool.get_stats()["pool_leased"] == 2

    got = pool.getconn()  # the pool is full: the lease idle longest (second) is revoked
    assert got is second and got.loan != second_loan
    assert not pool.lease_claim(second, second_loan)  # its former holder must forget it
    assert pool.lease_claim(first, first_loan)  # the other lease is still its holder's
    stats = pool.get_stats()
    assert stats["leases_revoked"] == 1 and stats["pool_leased"] == 0
    pool.check_invariants()
    pool.putconn(got)
    pool.putconn(first, loan=first_loan)
    pool.check_invariants(quiescent=True)


def test_a_waiter_queued_before_a_lease_went_idle_gets_it_at_once(
    make_pool: Callable[..., ConnectionPool],
) -> None:
    pool = make_pool(0, 1, timeout=3.0)
    conn = pool.getconn()
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.getconn()))
    waiter.start()
    wait_for(lambda: pool.get_stats()["requests_waiting"] == 1, what="queued")
    # Someone waits: the holder is told to return it rather than keep a lease.
    assert not pool.lease_idle(conn, conn.loan)
    pool.putconn(conn)
    waiter.join(5)
    assert got == [conn]
    pool.putconn(conn, loan=conn.loan)
    pool.check_invariants(quiescent=True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads running
def test_a_lease_between_requests_at_fork_is_the_parents_alone(
    leased_alias: Callable[..., LeasedAlias],
) -> None:
    """A child forked while its parent's thread holds a lease between requests
    (gunicorn --preload after a warm-up request, Celery prefork) serves its
    requests on a session of its own; the parent's lease is still its own."""
    alias = leased_alias("leases_fork", conn_max_age=None)
    parent_pid = serve(alias.backend_pid)
    read_end, write_end = os.pipe()

    def child() -> int:
        os.close(read_end)
        pids = [serve(alias.backend_pid) for _ in range(2)]
        connections[alias.name].close()
        os.write(write_end, ",".join(map(str, pids)).encode())
        return 0

    assert fork_child(child) == 0
    os.close(write_end)
    child_pids = [int(p) for p in os.read(read_end, 100).decode().split(",")]
    os.close(read_end)
    assert parent_pid not in child_pids
    assert child_pids[0] == child_pids[1]  # the child's own lease, kept across its requests
    assert serve(alias.backend_pid) == parent_pid
    assert alias.stats()["requests_num"] == 1
