"""Threads that exit holding a connection: the pool takes their slots back.

Through the ENGINE, on pools so small (maxconn 1 or 2) that a single leaked
connection would exhaust them: plain threads, ThreadPoolExecutor workers and
the per-context threads of asgiref's ThreadSensitiveContext borrow with the
ORM and exit without closing. The next borrower must be served well within
the pool's timeout, on a new connection: the leaked ones are closed, never
handed out again (their session state is unknown). And ``leak_timeout``
reports a connection held too long, once, with the thread and the stack
that took it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.db import OperationalError, connections

from django_pgpool import base, registry
from django_pgpool.pool import ConnectionPool
from tests.helpers import wait_for
from tests.testapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True)

T = TypeVar("T")

#: The pools' timeout: a borrower stuck behind a leaked connection would fail after it.
TIMEOUT = 3.0
#: "Well within the timeout": a freed slot must reach the borrower faster than this.
PROMPTLY = 2.0


@dataclass
class Borrowed:
    """What a thread borrowed and left open."""

    raw: Any  # the psycopg2 connection, still referenced here to check that it gets closed
    backend_pid: int
    thread: threading.Thread
    seconds: float  # how long the ORM query took, borrowing included


@dataclass
class Alias:
    """An ad-hoc database alias on the test database, with its own small pool.

    Django keeps one wrapper per alias *per thread*, and only aliases in
    settings.DATABASES are created on demand: every thread that uses this
    one calls ``register()`` first (as Django allows in tests).
    """

    name: str
    settings_dict: dict[str, Any]
    kept: list[Borrowed] = field(default_factory=list)  # connections left open by threads

    def register(self) -> None:
        connections[self.name] = base.DatabaseWrapper(dict(self.settings_dict), alias=self.name)

    @property
    def pool(self) -> ConnectionPool:
        (entry,) = registry.entries(self.name)
        return entry.pool

    def stats(self) -> dict[str, int]:
        return self.pool.get_stats()


@pytest.fixture
def make_alias() -> Iterator[Callable[..., Alias]]:
    """Build aliases (registered in the test's thread too); close their pools after the test."""
    default = dict(connections["default"].settings_dict)  # NAME is the test database's
    made: list[Alias] = []

    def make(name: str, changes: dict[str, Any] | None = None, **options: Any) -> Alias:
        settings_dict = {
            **default,
            **(changes or {}),
            "OPTIONS": {**default["OPTIONS"], "minconn": 0, "timeout": TIMEOUT, **options},
        }
        alias = Alias(name, settings_dict)
        alias.register()
        made.append(alias)
        return alias

    yield make
    for alias in made:
        for borrowed in alias.kept:
            # Closed by the pool if it works; else the test database couldn't be dropped.
            if not borrowed.raw.closed:
                borrowed.raw.close()
        connections[alias.name].close()
        del connections[alias.name]
        registry.close_pools(alias=alias.name)


def query_and_keep(alias: Alias) -> Borrowed:
    """Run an ORM query on ``alias`` in this thread and keep the connection (the leak)."""
    started = time.monotonic()
    Item.objects.using(alias.name).count()
    seconds = time.monotonic() - started
    raw = connections[alias.name].connection
    assert raw is not None
    borrowed = Borrowed(raw, raw.info.backend_pid, threading.current_thread(), seconds)
    alias.kept.append(borrowed)
    return borrowed


def register_query_and_keep(alias: Alias) -> Borrowed:
    alias.register()
    return query_and_keep(alias)


def borrow_here(alias: Alias) -> tuple[int, float]:
    """Borrow in this thread (with a cursor), return it; the backend pid and the seconds taken."""
    started = time.monotonic()
    with connections[alias.name].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    seconds = time.monotonic() - started
    connections[alias.name].close()
    return pid, seconds


def in_thread(func: Callable[[], T], name: str) -> T:
    """Run ``func`` in a new thread and wait until the thread has exited; return or raise."""
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(func())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name=name)
    thread.start()
    thread.join(TIMEOUT * 3)
    assert not thread.is_alive(), f"thread {name} is stuck"
    if errors:
        raise errors[0]
    return results[0]


def live_backends(admin: Any, pids: list[int]) -> list[int]:
    with admin.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", [pids])
        return [row[0] for row in cursor.fetchall()]


def assert_closed_and_never_reused(
    leaked: list[Borrowed], later_pids: list[int], admin: Any
) -> None:
    """The leaked connections were closed (client and server side), and no one got them again."""
    leaked_pids = [b.backend_pid for b in leaked]
    assert len(set(leaked_pids)) == len(leaked_pids), "a leaked connection was handed out again"
    assert not set(leaked_pids) & set(later_pids), "a leaked connection was handed out again"
    assert all(b.raw.closed for b in leaked), "a reclaimed connection was left open"
    assert all(not b.thread.is_alive() for b in leaked)
    # Closing sends Terminate: the server sessions end too (asynchronously).
    wait_for(lambda: live_backends(admin, leaked_pids) == [])


def reclaim_warnings(caplog: pytest.LogCaptureFixture, alias: Alias) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "django_pgpool"
        and r.levelno == logging.WARNING
        and alias.pool.name in r.getMessage()
        and "exited without returning" in r.getMessage()
    ]


# -- control: a thread that closes ------------------------------------------------


def test_a_thread_that_closes_its_connection_gives_it_back_for_reuse(
    make_alias: Callable[..., Alias],
) -> None:
    alias = make_alias("tidy", maxconn=1)

    def query_and_close() -> int:
        borrowed = register_query_and_keep(alias)
        connections[alias.name].close()
        return borrowed.backend_pid

    pid = in_thread(query_and_close, "tidy-thread")
    again, seconds = borrow_here(alias)
    assert again == pid  # the same connection, reused
    assert seconds < PROMPTLY
    assert alias.stats()["connections_reclaimed"] == 0


# -- plain threads ----------------------------------------------------------------


def test_plain_threads_that_exit_without_closing_give_their_slot_back(
    make_alias: Callable[..., Alias], admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="django_pgpool")
    alias = make_alias("plain", maxconn=1)
    # One slot: each thread after the first needs the slot of the one before it.
    leaked = [
        in_thread(lambda: register_query_and_keep(alias), f"plain-leaker-{n}") for n in range(3)
    ]
    pid, seconds = borrow_here(alias)

    assert [b.seconds < PROMPTLY for b in leaked] == [True] * 3, [b.seconds for b in leaked]
    assert seconds < PROMPTLY
    assert_closed_and_never_reused(leaked, [pid], admin)
    stats = alias.stats()
    assert stats["connections_reclaimed"] == 3
    assert stats["requests_timeouts"] == 0
    assert stats["pool_size"] <= 1
    warnings = reclaim_warnings(caplog, alias)
    for n in range(3):
        assert any(f"plain-leaker-{n}" in w for w in warnings), warnings


def test_a_caller_already_waiting_gets_the_slot_of_a_thread_that_dies_meanwhile(
    make_alias: Callable[..., Alias], admin: Any
) -> None:
    """The waiter queued while the borrower was alive: the pool must notice the death itself."""
    alias = make_alias("waited", maxconn=1)
    holding, release = threading.Event(), threading.Event()
    leaked: list[Borrowed] = []
    waited: list[tuple[int, float]] = []
    errors: list[BaseException] = []

    def leak_when_told() -> None:
        leaked.append(register_query_and_keep(alias))
        holding.set()
        release.wait(TIMEOUT * 2)

    def wait_for_the_slot() -> None:
        alias.register()
        try:
            waited.append(borrow_here(alias))
        except Exception as exc:
            errors.append(exc)

    leaker = threading.Thread(target=leak_when_told, name="dying-holder")
    waiter = threading.Thread(target=wait_for_the_slot, name="patient-waiter")
    leaker.start()
    assert holding.wait(TIMEOUT)
    waiter.start()
    wait_for(lambda: alias.stats()["requests_waiting"] == 1)
    release.set()
    leaker.join(TIMEOUT)
    died = time.monotonic()
    waiter.join(TIMEOUT * 2)
    assert not leaker.is_alive() and not waiter.is_alive()
    assert not errors, f"the waiter got no connection: {errors[0]!r}"
    (pid, seconds) = waited[0]
    # It had waited a while already; the freed slot must reach it before its timeout.
    assert seconds < TIMEOUT
    assert time.monotonic() - died < PROMPTLY + 0.5
    assert_closed_and_never_reused(leaked, [pid], admin)
    assert alias.stats()["connections_reclaimed"] == 1
    assert alias.stats()["requests_timeouts"] == 0


# -- ThreadPoolExecutor workers -----------------------------------------------------


def test_thread_pool_executor_workers_that_exit_without_closing_give_their_slots_back(
    make_alias: Callable[..., Alias], admin: Any
) -> None:
    alias = make_alias("executor", maxconn=2)
    leaked: list[Borrowed] = []
    for batch in range(3):
        # Both workers hold a connection at once: the pool is full after each batch.
        both_holding = threading.Barrier(2, timeout=TIMEOUT * 2)

        def task(barrier: threading.Barrier = both_holding) -> Borrowed:
            borrowed = query_and_keep(alias)
            barrier.wait()
            return borrowed

        with ThreadPoolExecutor(
            max_workers=2, thread_name_prefix=f"batch{batch}", initializer=alias.register
        ) as executor:
            futures = [executor.submit(task) for _ in range(2)]
            batch_leaked = [f.result(timeout=TIMEOUT * 3) for f in futures]
        # Leaving the with block shut the executor down: its worker threads have exited.
        assert len({b.thread.name for b in batch_leaked}) == 2
        assert all(b.seconds < PROMPTLY for b in batch_leaked), [b.seconds for b in batch_leaked]
        leaked.extend(batch_leaked)

    pid, seconds = borrow_here(alias)
    assert seconds < PROMPTLY
    # Both of the last batch's connections are reclaimed: one for this borrow,
    # the other at that time too or by the next round of maintenance.
    wait_for(lambda: alias.stats()["connections_reclaimed"] == 6)
    assert_closed_and_never_reused(leaked, [pid], admin)
    stats = alias.stats()
    assert stats["requests_timeouts"] == 0
    assert stats["pool_size"] <= 2


# -- asgiref: sync_to_async in ThreadSensitiveContext --------------------------------


def test_each_thread_sensitive_context_that_exits_without_closing_gives_its_slot_back(
    make_alias: Callable[..., Alias], admin: Any
) -> None:
    """As Django's ASGIHandler runs sync views: a ThreadSensitiveContext per request.

    Each context runs its thread-sensitive sync_to_async calls on a thread
    of its own, which exits when the context ends. The event loop runs in a
    plain asyncio.run(): under async_to_sync, thread-sensitive calls would
    go back to the calling thread instead.
    """
    alias = make_alias("asgi", maxconn=1)

    async def request() -> Borrowed:
        async with ThreadSensitiveContext():
            return await sync_to_async(register_query_and_keep, thread_sensitive=True)(alias)

    async def serve(requests: int) -> list[Borrowed]:
        return [await request() for _ in range(requests)]

    leaked = asyncio.run(serve(3))
    pid, seconds = borrow_here(alias)

    threads = {b.thread for b in leaked}
    assert len(threads) == 3, "each context should have run on a thread of its own"
    assert threading.current_thread() not in threads
    assert all(b.seconds < PROMPTLY for b in leaked), [b.seconds for b in leaked]
    assert seconds < PROMPTLY
    assert_closed_and_never_reused(leaked, [pid], admin)
    assert alias.stats()["connections_reclaimed"] == 3
    assert alias.stats()["requests_timeouts"] == 0


# -- reclaiming is not held up by other pools -------------------------------------


def test_a_dead_threads_slot_comes_back_while_another_pool_is_slow_to_connect(
    make_alias: Callable[..., Alias],
) -> None:
    """Reclaiming is done by the process-wide maintenance thread: it must not be held up
    by another pool's connect to a server that does not answer (connect_timeout 10 s)."""
    # A server that accepts connections and never answers: libpq waits connect_timeout.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    accepted: list[socket.socket] = []
    slow = make_alias(
        "slow_server",
        {"HOST": "127.0.0.1", "PORT": silent.getsockname()[1]},
        minconn=2,
        maxconn=2,
        timeout=10.0,
    )

    def borrow_from_the_slow_server() -> None:  # creates its pool; maintenance fills it
        slow.register()
        with contextlib.suppress(OperationalError):  # once the silent server goes away
            borrow_here(slow)

    opener = threading.Thread(target=borrow_from_the_slow_server, name="slow-borrower")
    opener.start()
    try:
        silent.settimeout(TIMEOUT)
        while len(accepted) < 2:  # this thread's connect and the maintenance thread's
            accepted.append(silent.accept()[0])

        alias = make_alias("behind_slow", maxconn=1)
        in_thread(lambda: register_query_and_keep(alias), "dies-holding")
        try:
            _, seconds = borrow_here(alias)
        except OperationalError as exc:
            pytest.fail(f"the dead thread's slot did not come back: {exc}")
        assert seconds < PROMPTLY
    finally:
        for conn in accepted:
            conn.close()
        silent.close()
        opener.join(TIMEOUT * 4)


# -- leak_timeout -----------------------------------------------------------------


def hold_connection_for(alias: Alias, seconds: float) -> None:
    """Borrow with the ORM, keep the connection ``seconds``, then return it properly."""
    Item.objects.using(alias.name).exists()
    time.sleep(seconds)
    connections[alias.name].close()


def pool_records(caplog: pytest.LogCaptureFixture, alias: Alias) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "django_pgpool" and alias.pool.name in r.getMessage()
    ]


def test_a_connection_held_past_leak_timeout_is_reported_once_with_its_thread_and_stack(
    make_alias: Callable[..., Alias], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="django_pgpool")
    alias = make_alias("leaky", maxconn=1, leak_timeout=0.5)

    def hold() -> None:
        alias.register()
        hold_connection_for(alias, 2.0)  # maintenance looks at it at least twice meanwhile

    in_thread(hold, "slow-holder")

    warnings = [r for r in pool_records(caplog, alias) if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    (record,) = warnings
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "slow-holder" in message
    assert re.search(r'File ".*test_threads\.py", line \d+, in hold_connection_for', message), (
        message
    )
    stats = alias.stats()
    assert stats["connections_leaked"] == 1
    assert stats["connections_reclaimed"] == 0  # it was returned, late but properly
    assert stats["pool_in_use"] == 0


def test_leak_timeout_is_off_by_default(
    make_alias: Callable[..., Alias], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="django_pgpool")
    alias = make_alias("patient", maxconn=1)

    def hold() -> None:
        alias.register()
        hold_connection_for(alias, 1.5)  # longer than a round of maintenance

    in_thread(hold, "long-holder")

    assert alias.pool.leak_timeout is None
    assert [r for r in pool_records(caplog, alias) if r.levelno >= logging.WARNING] == []
    assert alias.stats()["connections_leaked"] == 0


# -- closing the pools


def test_closing_the_pools_also_closes_the_connection_of_a_thread_that_died_holding_it(
    make_alias: Callable[..., Alias], admin: Any
) -> None:
    alias = make_alias("closing", maxconn=2)
    holding, release = threading.Event(), threading.Event()
    leaked: list[Borrowed] = []

    def leak_when_told() -> None:
        leaked.append(register_query_and_keep(alias))
        holding.set()
        release.wait(TIMEOUT * 2)

    leaker = threading.Thread(target=leak_when_told, name="leaker-at-close")
    leaker.start()
    # A request in flight in this thread (as during manage.py poolclose or any close_pools()).
    connections[alias.name].ensure_connection()
    assert holding.wait(TIMEOUT)
    registry.close_pools(alias=alias.name)
    release.set()
    leaker.join(TIMEOUT)
    assert not leaker.is_alive()
    (dead,) = leaked

    wait_for(lambda: dead.raw.closed, timeout=TIMEOUT)  # a few rounds of maintenance
    assert live_backends(admin, [dead.backend_pid]) == []


@pytest.mark.django_db(transaction=True)
def test_a_connection_shared_with_other_threads_is_not_reclaimed_when_its_thread_exits(
    make_alias: Callable[..., Alias],
) -> None:
    """Django lets a thread hand its connection to others (inc_thread_sharing())."""
    alias = make_alias("sharing", maxconn=1)
    shared: list[Any] = []

    def borrow_and_share() -> None:
        wrapper = base.DatabaseWrapper(dict(alias.settings_dict), alias=alias.name)
        wrapper.inc_thread_sharing()
        with wrapper.cursor() as cur:
            cur.execute("SELECT 1")
        shared.append(wrapper)

    thread = threading.Thread(target=borrow_and_share, name="sharing-runner")
    thread.start()
    thread.join()
    time.sleep(2.5)  # two maintenance rounds
    wrapper = shared[0]
    with wrapper.cursor() as cur:  # still this wrapper's, still open
        cur.execute("SELECT 2")
        assert cur.fetchone()[0] == 2
    wrapper.close()
    wrapper.dec_thread_sharing()
    assert alias.stats()["connections_reclaimed"] == 0
